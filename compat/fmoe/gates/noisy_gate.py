"""fmoe.gates.noisy_gate: noisy top-k gating (Shazeer et al., 2017) with its balance loss (moe.NoisyGate)."""
from .._repo import moe
from .base_gate import RoutedGate


class NoisyGate(RoutedGate, moe.NoisyGate):
    """FastMoE's NoisyGate(d_model, num_expert, world_size, top_k=2): parameters w_gate, w_noise
    [d_model, num_expert * world_size]; gate(x) -> (expert index [N * top_k], score [N, 1, top_k]), FastMoE's
    shapes for this gate."""

    repository_forward = moe.NoisyGate.forward

    def __init__(self, d_model, num_expert, world_size, top_k=2):
        moe.NoisyGate.__init__(self, d_model, num_expert * world_size, top_k)
        self.set_sizes(num_expert, world_size)

    def forward(self, inp):
        routing = self.route(inp)
        return routing.expert.reshape(-1), routing.score.unsqueeze(1)
