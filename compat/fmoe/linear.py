"""fmoe.linear: num_expert linear maps in one tensor (FastMoE's FMoELinear) on moe.FusedExpertLinear."""
import math

import torch
import torch.nn as nn

from ._repo import moe


def expert_plan(fwd_expert_count, device):
    """A moe.Dispatch for rows already grouped by expert, fwd_expert_count[e] rows for expert e."""
    counts_host = [int(c) for c in fwd_expert_count.tolist()]
    counts = torch.as_tensor(counts_host, dtype=torch.long, device=device)
    expert = torch.repeat_interleave(torch.arange(len(counts_host), device=device), counts,
                                     output_size=sum(counts_host))
    return moe.Dispatch(order=None, token=None, expert=expert, counts=counts, counts_host=counts_host,
                        num_rows=sum(counts_host), num_copies=sum(counts_host), padded=False)


def linear_rows(module, inp, fwd_expert_count, weight, bias):
    """Rows grouped by expert through weight [E, out, in] (+ bias [E, out]): one grouped_mm where it runs
    fast on this device and dtype, else one product per expert."""
    dev = inp.device
    dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else weight.dtype
    rows = inp.to(dtype)
    plan = expert_plan(fwd_expert_count, dev)
    path = 'grouped_mm' if moe.grouped_mm_fits(dev, dtype, (weight.shape[1], weight.shape[2])) else 'slices'
    return moe.FusedExpertLinear.forward(module, rows, plan, path)


class FMoELinear(moe.FusedExpertLinear):
    """FastMoE's FMoELinear(num_expert, in_feat, out_feat, bias=True, rank=0): weight [E, out, in], bias [E, out]
    (zeros), weight drawn with kaiming_uniform_ as FastMoE's. forward(inp, fwd_expert_count): the rows of
    expert e are the fwd_expert_count[e] rows after those of experts < e. The input is cast to the weight's
    dtype, as FastMoE's (to the autocast dtype under autocast)."""

    def __init__(self, num_expert, in_feat, out_feat, bias=True, rank=0):
        super().__init__(num_expert, in_feat, out_feat, bias)
        self.rank = rank

    def forward(self, inp, fwd_expert_count):
        return linear_rows(self, inp, fwd_expert_count, self.weight, self.bias)

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def extra_repr(self):
        return super().extra_repr() + f', rank={self.rank}'


class MOELinear:
    """FastMoE's MOELinear.apply(inp, fwd_expert_count, weight, bias=None) as a differentiable function (FastMoE:
    an autograd Function over its CUDA kernels; here autograd follows the products themselves)."""

    @staticmethod
    def apply(inp, fwd_expert_count, weight, bias=None):
        holder = _Weights(weight, bias)
        return linear_rows(holder, inp.type_as(weight), fwd_expert_count, weight, bias)


class _Weights:
    """What moe.FusedExpertLinear.forward reads from its module, for MOELinear's bare tensors."""

    def __init__(self, weight, bias):
        self.weight, self.bias, self.num_expert = weight, bias, weight.shape[0]

    def weight_in(self, dtype):
        """As moe.FusedExpertLinear.weight_in, for a bare tensor: no copy kept between calls."""
        return self.weight.detach() if self.weight.dtype == dtype else None
