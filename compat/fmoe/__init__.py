"""FastMoE's `fmoe` package on this repository's Mixture-of-Experts layer (moe.py), without FastMoE's CUDA
extension: FMoE (any module as the expert), FMoELinear, FMoETransformerMLP, the gates of fmoe.gates with
FastMoE's call convention, DistributedGroupedDataParallel, expert parallelism on torch.distributed (gloo or
NCCL). Put this directory's parent on the path:

    PYTHONPATH=/path/to/this/repository/compat python your_fastmoe_script.py

This repository's moe.py is found by its file path, whatever else is on sys.path (a user's own moe.py included).
FMoETransformerMLP keeps this repository's parameter layout (experts fused: experts.htoh4.weight [E, H, D]), so
state dicts move between FastMoE code and this repository's models as they are. What the shim does not provide
raises fmoe.Unsupported (options) or ImportError (names) with one line saying why; docs/fastmoe.md lists it all.
"""
from ._repo import Unsupported
from .distributed import DistributedGroupedDataParallel
from .layers import FMoE
from .linear import FMoELinear
from .transformer import FMoETransformerMLP

__all__ = ['DistributedGroupedDataParallel', 'FMoE', 'FMoELinear', 'FMoETransformerMLP', 'Unsupported']
