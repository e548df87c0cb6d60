"""fmoe.gates.gshard_gate: GShard's top-2 with a capacity limit and random routing (moe.GShardGate)."""
from .._repo import moe, refuse
from .naive_gate import NaiveGate


def check_top_k(gate, topk, expected):
    if topk != expected:
        raise refuse(f'{gate}(topk={topk!r})', f'{gate} routes to exactly {expected} expert(s)')


class GShardGate(NaiveGate, moe.GShardGate):
    """FastMoE's GShardGate(d_model, num_expert, world_size, topk=2, capacity=(1.2, 2.4), random_routing=True,
    gate_bias=True). Dropped copies have index -1. Differences: random routing of the second expert applies in
    training only (FastMoE applies it in evaluation too), and copies beyond the capacity are dropped in token
    order, earlier tokens first (FastMoE: in the order its CUDA threads happen to run)."""

    repository_forward = moe.GShardGate.forward

    def __init__(self, d_model, num_expert, world_size, topk=2, capacity=(1.2, 2.4), random_routing=True,
                 gate_bias=True):
        check_top_k('GShardGate', topk, 2)
        moe.GShardGate.__init__(self, d_model, num_expert * world_size, 2, tuple(capacity), random_routing,
                                gate_bias)
        self.set_sizes(num_expert, world_size)
