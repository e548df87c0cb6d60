"""fmoe.functions: FastMoE's internal MoE steps. ensure_comm is kept (a no-op here); the others are FastMoE's
CUDA-extension plumbing, which this shim replaces with moe.dispatch/combine and torch.distributed, and are
refused by name with a one-line ImportError."""
from ._repo import refuse

_WHY = {name: 'an internal step of FastMoE\'s CUDA extension; fmoe.FMoE does the whole MoE forward'
        for name in ('count_by_gate', 'prepare_forward', 'MOEScatter', 'MOEGather', 'AllGather', 'Slice',
                     'get_moe_group', 'set_moe_group', 'get_slice_group', 'set_slice_group')}


def ensure_comm(t, comm):
    """FastMoE creates its CUDA extension's NCCL communicator here; torch.distributed needs none: no-op."""


def __getattr__(name):
    if name in _WHY:
        raise ImportError(str(refuse(f'fmoe.functions.{name}', _WHY[name])))
    raise AttributeError(f"module 'fmoe.functions' has no attribute {name!r}")
