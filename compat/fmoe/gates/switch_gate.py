"""fmoe.gates.switch_gate: Switch Transformer's top-1 with jitter and a capacity limit."""
import math

import torch
import torch.nn.functional as F

from .._repo import moe, refuse
from .gshard_gate import check_top_k
from .naive_gate import NaiveGate


def check_local_capacity(gate, topk, routes, world_size):
    """The gates whose capacity counts every worker's tokens: exactly `routes` experts per token, one worker."""
    check_top_k(gate, topk, routes)
    if world_size != 1:
        raise refuse(f'{gate}(world_size={world_size!r})',
                     f'{gate}\'s capacity counts the tokens of every worker (FastMoE exchanges the counts in its '
                     'CUDA extension); use GShardGate, whose capacity is per worker')


class SwitchGate(NaiveGate):
    """FastMoE's SwitchGate(d_model, num_expert, world_size, topk=1, switch_eps=.1, capacity=(1.2, 2.4),
    gate_bias=True): in training, uniform noise from [1-eps, 1+eps] is added to the logits (drawn and scaled
    exactly as FastMoE does, so the same generator state gives the same bits); top-1 of the fp32 softmax;
    copies beyond the capacity get index -1, earlier tokens kept first. world_size must be 1."""

    def __init__(self, d_model, num_expert, world_size, topk=1, switch_eps=.1, capacity=(1.2, 2.4),
                 gate_bias=True):
        check_local_capacity('SwitchGate', topk, 1, world_size)
        super().__init__(d_model, num_expert, world_size, top_k=1, gate_bias=gate_bias)
        self.switch_eps, self.capacity = switch_eps, capacity

    def route(self, inp):
        logits = self.compute_logits(inp)
        score = logits
        if self.training:
            # FastMoE's expression, operation for operation: another order rounds differently
            noise = torch.rand_like(logits)
            score = logits + (noise * 2 * self.switch_eps + 1.0 - self.switch_eps)
        prob = F.softmax(score.float(), dim=-1)
        top1_prob, expert = torch.topk(prob, 1, dim=-1)
        capacity = math.ceil(self.capacity[0 if self.training else 1] * inp.shape[0] / self.num_expert)
        expert, dropped = moe.limit_by_capacity(expert, capacity, self.num_expert)

        kept = moe.sort_by_expert(expert.view(-1), self.num_expert)[2][:self.num_expert].to(prob.dtype)
        n_kept = kept.sum().clamp(min=1)
        balance_loss = (kept / n_kept * (prob.sum(0) / n_kept)).sum() * self.num_expert
        self.set_loss(balance_loss)
        return moe.Routing(expert, top1_prob.to(inp.dtype), logits, balance_loss, dropped, may_drop=True)
