"""fmoe.gates.dc_gate: GShard's gate with a capacity of its own (per expert, not split among the experts)."""
import math

import torch
import torch.nn.functional as F

from .._repo import moe
from .naive_gate import NaiveGate
from .switch_gate import check_local_capacity


class DCGate(NaiveGate):
    """FastMoE's DCGate(d_model, num_expert, world_size, topk=2, capacity=(1.2, 2.4), random_routing=True,
    gate_bias=True): top-2, GShard's balance loss, at most ceil(capacity * tokens) copies per expert, random
    routing of the second expert in training. world_size must be 1 (the capacity is over every worker's tokens)."""

    def __init__(self, d_model, num_expert, world_size, topk=2, capacity=(1.2, 2.4), random_routing=True,
                 gate_bias=True):
        check_local_capacity('DCGate', topk, 2, world_size)
        super().__init__(d_model, num_expert, world_size, top_k=2, gate_bias=gate_bias)
        self.capacity, self.random_routing = capacity, random_routing

    def route(self, inp):
        naive = super().route(inp)
        n_tok, n_exp = inp.shape[0], self.num_expert
        first_choice = moe.sort_by_expert(naive.expert[:, 0], n_exp)[2][:n_exp].to(naive.logits.dtype) / n_tok
        balance_loss = (first_choice * F.softmax(naive.logits, dim=-1).mean(0)).mean() * n_exp ** 2
        self.set_loss(balance_loss)
        capacity = math.ceil(self.capacity[0 if self.training else 1] * n_tok)
        expert, dropped = moe.limit_by_capacity(naive.expert, capacity, n_exp)
        if self.random_routing and self.training:
            unlucky = 2 * naive.score[:, 1] < torch.rand(n_tok, device=inp.device)
            expert = torch.cat([expert[:, :1], expert[:, 1:].masked_fill(unlucky[:, None], -1)], 1)
        return naive._replace(expert=expert, balance_loss=balance_loss, dropped=dropped, may_drop=True)
