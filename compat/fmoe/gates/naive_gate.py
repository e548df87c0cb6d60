"""fmoe.gates.naive_gate: top-k of a linear layer's logits (moe.NaiveGate)."""
from .._repo import moe
from .base_gate import RoutedGate


class NaiveGate(RoutedGate, moe.NaiveGate):
    """FastMoE's NaiveGate(d_model, num_expert, world_size, top_k=2, gate_bias=True).

    gate(x [N, d_model]) -> (expert index [N, top_k], score [N, top_k]), and with return_all_scores=True also the
    logits [N, num_expert * world_size]. The k experts come in descending score order (FastMoE's order is
    unspecified); the logits are computed in the gate's weight dtype even under autocast."""

    repository_forward = moe.NaiveGate.forward

    def __init__(self, d_model, num_expert, world_size, top_k=2, gate_bias=True):
        moe.NaiveGate.__init__(self, d_model, num_expert * world_size, top_k, gate_bias)
        self.set_sizes(num_expert, world_size)

    def forward(self, inp, return_all_scores=False):
        routing = self.route(inp)
        if return_all_scores:
            return routing.expert, routing.score, routing.logits
        return routing.expert, routing.score
