"""This repository's MoE module (moe.py) for the shim, found by its file path, never by its name on sys.path.

A FastMoE user's folder often holds a `moe.py` of its own (FastMoE's tests/ does) ahead of everything else on
sys.path; `import moe` would then pick that one. The repository's file is loaded here under a private module
name instead, or reused when the process has already imported that same file as `moe`.
"""
import contextlib
import importlib.util
import os
import sys

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MOE_PATH = os.path.join(REPOSITORY, 'moe.py')
PRIVATE_NAME = 'fmoe._repository_moe'


class Unsupported(ValueError):
    """A FastMoE option or name this compatibility layer does not provide; the message names it and why."""


def refuse(what, why):
    """The shim's one-line refusal for `what` (an option or a name)."""
    return Unsupported(f'fmoe (compat/fmoe): {what} is not supported: {why}')


def _same_file(module):
    path = getattr(module, '__file__', None)
    return path is not None and os.path.realpath(path) == os.path.realpath(MOE_PATH)


def _load():
    if PRIVATE_NAME in sys.modules:
        return sys.modules[PRIVATE_NAME]
    imported = sys.modules.get('moe')
    if imported is not None and _same_file(imported):
        return imported   # one module object, so isinstance checks agree with the repository's code
    if not os.path.isfile(MOE_PATH):
        raise ImportError(f'fmoe (compat/fmoe): this repository\'s moe.py is missing at {MOE_PATH}')
    spec = importlib.util.spec_from_file_location(PRIVATE_NAME, MOE_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[PRIVATE_NAME] = module
    try:
        with _repository_utils():
            spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PRIVATE_NAME]
        raise
    return module


@contextlib.contextmanager
def _repository_utils():
    """While moe.py loads, `utils` is the repository's package (moe.py imports its configuration helpers and
    errors from it); afterwards the names are the user's again (a user's folder may hold a utils.py of its own)."""
    user = {name: sys.modules.pop(name) for name in list(sys.modules) if name == 'utils' or name.startswith('utils.')}
    sys.path.insert(0, REPOSITORY)
    try:
        yield
    finally:
        sys.path.remove(REPOSITORY)
        for name in [n for n in sys.modules if n == 'utils' or n.startswith('utils.')]:
            del sys.modules[name]
        sys.modules.update(user)


moe = _load()
