"""Typed configurations whose every option is defined once.

An option is a dataclass field: its name, type and default are the field's, and its help text, its check and
its command-line flag are the field's metadata (`option`). A configuration checks every value when it is
made (`check_options`, called from __post_init__), so an object that exists is valid; a bad value is one
ConfigError line that names the option, as the caller knows it: a keyword (`moe_top_k=5`) or a flag
(`--moe-top-k 5`, see OptionError.with_flags). `add_flags` makes the argparse flags of some options and
`from_flags` reads them back, so a command line has the same names, defaults and help as the configuration.

A check is a function (value, config) -> None when the value is good, else the reason it is not, in which
another option is named as {its_name}: rendered as that option's keyword or flag and value.
"""
import dataclasses
import typing

from utils.errors import ConfigError


def option(default=dataclasses.MISSING, help='', flag=None, check=None, negated=False, choices=None):
    """A configuration field. flag: its command-line spelling (None: no flag); negated: the flag is a
    store_true switch that sets the option to False (--not_tied for tie_weight)."""
    return dataclasses.field(default=default, metadata=dict(help=help, flag=flag, check=check, negated=negated,
                                                            choices=choices))


def plain(value):
    """A value as a checkpoint stores it (tuples as lists), as torch.load(weights_only=True) reads it."""
    return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def keyword(name, value, meta):
    return f'{name}={plain(value)!r}'


def flag_or_keyword(name, value, meta):
    if meta.get('flag') is None:
        return keyword(name, value, meta)
    if meta['negated'] or isinstance(value, bool):
        return meta['flag'] if meta['negated'] != bool(value) else f'no {meta["flag"]}'
    return f'{meta["flag"]} {value}'


class OptionError(ConfigError):
    """A value an option cannot take, with why: its message names the options as keywords (str), or as the
    command line's flags (with_flags). prefix: how an enclosing configuration spells the options of a nested
    one (the model's moe_top_k is MoEConfig's top_k)."""

    def __init__(self, config, name, why, prefix=''):
        self.config, self.name, self.why, self.prefix = config, name, why, prefix
        super().__init__(self.render(keyword))

    def render(self, show):
        meta = {f.name: f.metadata for f in dataclasses.fields(self.config)}
        named = {n: show(self.prefix + n, getattr(self.config, n), meta[n]) for n in meta}
        return f'{named[self.name]}: {self.why.format_map(named)}'

    def with_prefix(self, prefix):
        return OptionError(self.config, self.name, self.why, prefix + self.prefix)

    def with_flags(self):
        """The same error, each option named by its flag (where it has one) and value."""
        return ConfigError(self.render(flag_or_keyword))


def check_options(config):
    """Run each field's check, in field order; raise the first OptionError."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        why = type_error(value, hints[f.name]) or (f.metadata.get('check') or (lambda v, c: None))(value, config)
        if why:
            raise OptionError(config, f.name, why)


def type_error(value, hint):
    """Why `value` is not of the annotated type (int for float is fine; bool is not an int here), or None."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:   # Optional[X]
        return None if value is None else type_error(value, next(a for a in args if a is not type(None)))
    if origin is tuple:
        if not isinstance(value, tuple) or any(type_error(v, args[0]) for v in value):
            return f'must be a list of {args[0].__name__}'
        return None
    if dataclasses.is_dataclass(hint):
        return None if isinstance(value, hint) else f'must be a {hint.__name__}'
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, hint)
    return None if ok else f'must be {TYPE_NAMES.get(hint, "a " + hint.__name__)}'


TYPE_NAMES = {int: 'an integer', float: 'a number', bool: 'True or False', str: 'a string'}


# ----------------------------------------------------------------------------- checks

def positive(value, config):
    return None if value >= 1 else 'must be a positive integer'


def at_least_zero(value, config):
    # `not value >= 0` also refuses NaN
    return None if value >= 0 else 'must be >= 0'


def finite_positive(value, config):
    return None if 0 < value < float('inf') else 'must be a finite number above 0'


def finite_at_least_zero(value, config):
    return None if 0 <= value < float('inf') else 'must be a finite number at least 0'


def probability(value, config):
    return None if 0 <= value < 1 else 'must be in [0, 1)'


def all_checks(*checks):
    def check(value, config):
        return next((why for why in (c(value, config) for c in checks) if why), None)
    return check


# ----------------------------------------------------------------------------- command-line flags

def flag_fields(config_type):
    """{name: field} of the options that have a flag, nested configurations' included (with their field's
    name as the path: ('moe_options', 'top_k'))."""
    out = {}
    hints = typing.get_type_hints(config_type)
    for f in dataclasses.fields(config_type):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update({(f.name, *path): g for path, g in flag_fields(hints[f.name]).items()})
        elif f.metadata.get('flag'):
            out[(f.name,)] = f
    return out


def dest(f):
    return f.metadata['flag'].lstrip('-').replace('-', '_')


def add_flag(parser, config_type, name):
    """The argparse flag of one option (a nested one's name as in flag_fields: 'moe_options.top_k')."""
    path = tuple(name.split('.'))
    f = flag_fields(config_type)[path]
    owner = config_type
    for part in path[:-1]:
        owner = typing.get_type_hints(owner)[part]
    hint = typing.get_type_hints(owner)[path[-1]]
    meta = f.metadata
    if hint is bool:
        parser.add_argument(meta['flag'], action='store_true', help=meta['help'])
        return
    kind = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    extra = {'choices': meta['choices']} if meta['choices'] else {}
    parser.add_argument(meta['flag'], type=kind, default=f.default, help=meta['help'], **extra)


def add_flags(parser, config_type, *names):
    for name in names:
        add_flag(parser, config_type, name)


def flag_values(config_type, args):
    """{path: value} of every option of config_type with a flag, read from parsed args (negated switches
    turned back into the option's value)."""
    values = {}
    for path, f in flag_fields(config_type).items():
        value = getattr(args, dest(f))
        values[path] = (not value) if f.metadata['negated'] else value
    return values
