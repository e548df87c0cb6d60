"""fmoe.gates: FastMoE's gates, one module each as in FastMoE, on this repository's routing (moe.py).

Every gate is called as FastMoE's: gate(x) -> (expert index, score); the balance loss is kept on the gate
(get_loss). Constructors take FastMoE's order: (d_model, num_expert, world_size, top_k, ...)."""
from .base_gate import BaseGate
from .dc_gate import DCGate
from .gshard_gate import GShardGate
from .naive_gate import NaiveGate
from .noisy_gate import NoisyGate
from .swipe_gate import SwipeGate
from .switch_gate import SwitchGate
from .zero_gate import ZeroGate

__all__ = ['BaseGate', 'DCGate', 'GShardGate', 'NaiveGate', 'NoisyGate', 'SwipeGate', 'SwitchGate', 'ZeroGate']
