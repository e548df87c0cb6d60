"""fmoe.megatron: FastMoE's Megatron-LM plug-ins. The weight initializers of fmoe.megatron.layers need no
Megatron and are kept; everything else patches or wraps Megatron-LM itself and is refused by name with a
one-line ImportError."""
from .._repo import refuse

_NEEDS_MEGATRON = ('add_fmoe_args', 'MegatronMLP', 'fmoefy', 'save_checkpoint', 'load_checkpoint',
                   'DistributedDataParallel', 'reset_gate_hook', 'get_balance_profile',
                   'generate_megatron_gate_hook', 'add_balance_log', 'patch_forward_step', 'patch_model_provider')


def refused_name(module, name, names):
    """The module-level __getattr__ of a module whose `names` are refused because they need Megatron-LM."""
    if name in names:
        raise ImportError(str(refuse(f'{module}.{name}', 'it plugs FastMoE into Megatron-LM, which this shim does '
                                     'not wrap; use fmoe.FMoETransformerMLP in your own model')))
    raise AttributeError(f'module {module!r} has no attribute {name!r}')


def __getattr__(name):
    return refused_name('fmoe.megatron', name, _NEEDS_MEGATRON)
