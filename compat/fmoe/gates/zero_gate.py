"""fmoe.gates.zero_gate: every token to expert 0."""
import torch

from .base_gate import BaseGate


class ZeroGate(BaseGate):
    """FastMoE's ZeroGate(d_model, num_expert, world_size, top_k=2): all top_k copies of every token go to
    expert 0 with score 1/top_k; gate(x) -> (index [N * top_k], score [N, 1, top_k]), as FastMoE's."""

    def __init__(self, d_model, num_expert, world_size, top_k=2):
        super().__init__(num_expert, world_size)
        self.top_k = top_k

    def forward(self, inp):
        n_copies = inp.shape[0] * self.top_k
        expert = torch.zeros(n_copies, dtype=torch.long, device=inp.device)
        score = torch.full((inp.shape[0], 1, self.top_k), 1 / self.top_k, device=inp.device)
        return expert, score
