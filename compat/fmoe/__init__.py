"""FastMoE's `fmoe` names running on this repository's Mixture-of-Experts layer (moe.py).

Code written for FastMoE (`from fmoe import FMoETransformerMLP`, gates from `fmoe.gates`, subclasses calling
`super().__init__(num_expert=, d_model=, d_hidden=, top_k=, activation=)` and `super().forward(x)`) runs
unchanged, on CPUs and GPUs, without FastMoE's CUDA extension, with this directory's parent on the path:

    PYTHONPATH=/path/to/this/repository/compat python your_fastmoe_script.py

The layers hold this repository's parameter layout (experts fused: `experts.htoh4.weight` [E, H, D]), so
state dicts move between such code and this repository's models as they are. What needs FastMoE's
distributed machinery (world_size > 1, process groups, gate hooks, masks, custom experts) raises
fmoe.Unsupported naming the option.
"""
import os
import sys

# The repository root, so that `moe` imports wherever the user's script runs from.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from .gates import Unsupported  # noqa: E402
from .transformer import FMoETransformerMLP  # noqa: E402

__all__ = ['FMoETransformerMLP', 'Unsupported']
