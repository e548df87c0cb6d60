"""This repository's MoE module (moe.py) for the shim, found by its file path, never by its name on sys.path.

A FastMoE user's folder often holds a `moe.py` of its own (FastMoE's tests/ does) ahead of everything else on
sys.path; `import moe` would then pick that one. The repository's file is loaded here under a private module
name instead, or reused when the process has already imported that same file as `moe`.
"""
import importlib.util
import os
import sys

MOE_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'moe.py')
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
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PRIVATE_NAME]
        raise
    return module


moe = _load()
