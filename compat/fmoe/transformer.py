"""fmoe.transformer: FastMoE's FMoETransformerMLP and its fused experts (_Expert)."""
import torch
import torch.nn as nn

from ._repo import moe, refuse
from .layers import FMoE
from .linear import FMoELinear


class ExpertView:
    """Expert i of a fused _Expert, shaped as FastMoE >= 1.0.1's per-expert _Expert(1, ...): its htoh4/h4toh
    weight [1, out, in] and bias [1, out] are views of the fused parameters (reading them, or writing through
    .data, reaches the fused tensors); calling it runs that expert alone."""

    def __init__(self, fused, index):
        self.fused, self.index = fused, index
        self.htoh4 = _LinearView(fused.htoh4, index)
        self.h4toh = _LinearView(fused.h4toh, index)
        self.activation = fused.activation

    def named_parameters(self):
        for name in ('htoh4', 'h4toh'):
            for param_name in ('weight', 'bias'):
                value = getattr(getattr(self, name), param_name)
                if value is not None:
                    yield f'{name}.{param_name}', value

    def parameters(self):
        return (value for _, value in self.named_parameters())

    def __call__(self, inp, fwd_expert_count=None):
        counts = torch.zeros(self.fused.num_expert, dtype=torch.long)
        counts[self.index] = inp.shape[0]
        return self.fused(inp, counts)


class _LinearView:
    def __init__(self, linear, index):
        self.weight = linear.weight[index:index + 1]
        self.bias = None if linear.bias is None else linear.bias[index:index + 1]


class _Expert(nn.Module):
    """FastMoE's _Expert(num_expert, d_model, d_hidden, activation, rank=0): num_expert two-layer MLPs fused in
    two FMoELinear (htoh4 [E, d_hidden, d_model], h4toh [E, d_model, d_hidden]); forward(inp, fwd_expert_count).
    len() and indexing give the experts one by one (ExpertView), as FastMoE >= 1.0.1's list of experts."""

    def __init__(self, num_expert, d_model, d_hidden, activation, rank=0):
        super().__init__()
        self.htoh4 = FMoELinear(num_expert, d_model, d_hidden, bias=True, rank=rank)
        self.h4toh = FMoELinear(num_expert, d_hidden, d_model, bias=True, rank=rank)
        self.activation = activation

    @property
    def num_expert(self):
        return self.htoh4.num_expert

    def forward(self, inp, fwd_expert_count):
        return self.h4toh(self.activation(self.htoh4(inp, fwd_expert_count)), fwd_expert_count)

    def __len__(self):
        return self.num_expert

    def __getitem__(self, index):
        if not -self.num_expert <= index < self.num_expert:
            raise IndexError(f'expert index {index} out of range for {self.num_expert} experts')
        return ExpertView(self, index % self.num_expert)

    def __iter__(self):
        return (self[i] for i in range(self.num_expert))


class FMoETransformerMLP(FMoE):
    """FastMoE's FMoETransformerMLP(num_expert=32, d_model=1024, d_hidden=4096, activation=GELU(),
    expert_dp_comm='none', expert_rank=0, **FMoE's options). forward([..., d_model]) -> [..., d_model]: the
    mixture alone (no residual, no norm), as FastMoE's.

    The experts are one fused _Expert (experts.htoh4.weight [E, d_hidden, d_model]: FastMoE < 1.0.1's layout,
    this repository's); state dicts of FastMoE >= 1.0.1's per-expert layout (experts.{i}.htoh4.weight) load too."""

    def __init__(self, num_expert=32, d_model=1024, d_hidden=4096, activation=torch.nn.GELU(),
                 expert_dp_comm='none', expert_rank=0, **kwargs):
        if 'expert' in kwargs:
            raise refuse('FMoETransformerMLP(expert=...)', 'its experts are the two-layer MLPs it builds; '
                         'use fmoe.FMoE for experts of your own')
        super().__init__(num_expert=num_expert, d_model=d_model, **kwargs)
        self.d_hidden = d_hidden
        self.experts = _Expert(num_expert, d_model, d_hidden, activation, rank=expert_rank)
        self.experts_fused = True
        self.expert_dp_comm, self.expert_rank = expert_dp_comm, expert_rank
        self.mark_parallel_comm(expert_dp_comm)
        # FastMoE >= 1.0.1 saves one module per expert: moe.py's pre-hook stacks those into the fused layout
        self.register_load_state_dict_pre_hook(moe._fuse_per_expert_layout)

    def forward(self, inp):
        original_shape = inp.shape
        return super().forward(inp.reshape(-1, self.d_model)).reshape(original_shape)
