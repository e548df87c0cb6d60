"""The one family of errors that bad input raises: a flag, a file, a checkpoint, a path the user gave.

A script turns a UserError (and an OSError from the file system: a full disk, a missing permission) into one
line on stderr and exit code 2; anything else is a bug and keeps its traceback. UserError subclasses
ValueError so that code written against the old ValueErrors still catches them; the scripts catch only this
family, never ValueError itself."""


class UserError(ValueError):
    """Bad input, said in one line that names what is wrong and what to do."""


class ConfigError(UserError):
    """An impossible or contradictory configuration: command-line flags, or a model's stored configuration."""


class DataError(UserError):
    """A corpus, vocabulary or data directory that cannot be used as given."""


class CheckpointError(UserError):
    """A model.pt, checkpoint.pt or optimizer.pt that cannot be used as given."""


class ConversionError(UserError):
    """A model file from elsewhere (the original's, Hugging Face's, FastMoE's) that cannot be converted."""
