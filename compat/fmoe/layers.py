"""fmoe.layers: FastMoE's general MoE layer (FMoE: any module as the expert) on this repository's dispatch and
combine (moe.dispatch: a stable sort of the token copies by expert; moe.combine: the weighted sum back)."""
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

from . import _parallel
from ._repo import moe, refuse
from ._tree import tree_leaves, tree_map
from .gates import NaiveGate


def mark_module_parallel_comm(module, comm):
    """Tag every parameter of module with dp_comm=comm ('world', 'dp', 'gate', 'none', ...): the group in which
    DistributedGroupedDataParallel averages its gradient."""
    for p in module.parameters():
        p.dp_comm = comm


def gate_routing(expert, score, top_k):
    """A gate's (index, score), in any of the shapes FastMoE's gates return, as a moe.Routing [N, top_k]."""
    expert, score = expert.reshape(-1, top_k).long(), score.reshape(-1, top_k)
    return moe.Routing(expert, score, logits=None, balance_loss=None, dropped=None, may_drop=True)


def grouped_rows(inp, expert, num_expert):
    """The rows of inp (a tensor or a nest of them) copied and sorted by expert (index [N, k] or [N], -1 =
    none), and the moe.Dispatch that put them so. expert_counts(plan) gives the rows per expert on the host."""
    routing = moe.Routing(expert.reshape(expert.shape[0], -1).long(), None, None, None, None, may_drop=True)
    plan = moe.dispatch(routing, num_expert, need_host_counts=True)
    return tree_map(lambda t: t.index_select(0, plan.token), inp), plan


def expert_counts(plan):
    return torch.tensor(plan.counts_host, dtype=torch.long)


def copies_in_token_order(rows_out, plan):
    """FastMoE's gather: the expert outputs back to one row per token copy, [N * k, ...]; 0 for a dropped copy."""
    out = rows_out.new_zeros((plan.num_copies,) + tuple(rows_out.shape[1:]))
    return out.index_copy(0, plan.order, rows_out)


def _fmoe_general_global_forward(inp, gate, expert_fn, num_expert, world_size, **kwargs):
    """FastMoE's private one-worker MoE step, kept for code that calls it: the rows of inp go to expert_fn
    grouped by expert (gate: index [N] or [N, k]); returns the expert outputs per token copy [N * k, ...]."""
    if world_size != 1:
        raise refuse(f'_fmoe_general_global_forward(world_size={world_size!r})',
                     'use FMoE(world_size=...) for expert parallelism')
    rows, plan = grouped_rows(inp, gate, num_expert)
    rows_out = expert_fn(rows, expert_counts(plan))
    return tree_map(lambda t: copies_in_token_order(t, plan), rows_out)


def _make_experts(expert, num_expert, d_model):
    """FastMoE's `expert=`: a class or callable (called with d_model, num_expert times) or a list of them."""
    if expert is None:
        return None, num_expert
    if isinstance(expert, list):
        return nn.ModuleList([make(d_model) for make in expert]), len(expert)
    if not callable(expert):
        raise TypeError(f'expert must be a module class, a callable or a list of them, got {expert!r}')
    return nn.ModuleList([expert(d_model) for _ in range(num_expert)]), num_expert


def _make_gate(gate, d_model, num_expert, world_size, top_k, gate_bias):
    if isinstance(gate, type) and issubclass(gate, NaiveGate):
        return gate(d_model, num_expert, world_size, top_k, gate_bias=gate_bias)
    if not callable(gate):
        raise TypeError(f'gate must be a gate class or a callable returning a gate, got {gate!r}')
    return gate(d_model, num_expert, world_size, top_k)


class FMoE(nn.Module):
    """FastMoE's FMoE(num_expert=32, d_model=1024, world_size=1, mp_group=None, slice_group=None, moe_group=None,
    top_k=2, gate=NaiveGate, expert=None, gate_hook=None, mask=None, mask_dict=None, gate_bias=True).

    num_expert experts on each of world_size workers (world_size > 1: expert parallelism over moe_group, the
    default process group by default, with torch.distributed all_to_all on gloo or NCCL). expert: a module
    class or callable made with d_model, num_expert times, or a list of them (num_expert is then its length);
    None: a subclass sets self.experts (a fused module called as experts(rows, fwd_expert_count), e.g. _Expert).
    slice_group (mp_group: its deprecated name): its members hold the same batch; each computes one slice, then
    they all gather the outputs. gate_hook(index, score, None) is called after the gate. mask [N] with
    mask_dict {value: tensor [d]}: tokens whose mask is not 0 skip the experts, and every copy of them
    outputs mask_dict[mask value] (0 when absent). forward(inp) takes a tensor [N, d_model] or a list, tuple or
    dict of tensors with N rows (the gate and the experts then receive that structure) and returns the same."""

    def __init__(self, num_expert=32, d_model=1024, world_size=1, mp_group=None, slice_group=None, moe_group=None,
                 top_k=2, gate=NaiveGate, expert=None, gate_hook=None, mask=None, mask_dict=None, gate_bias=True):
        super().__init__()
        if mp_group is not None:
            warnings.warn('FMoE: mp_group is deprecated, use slice_group', DeprecationWarning, stacklevel=2)
            slice_group = mp_group
        if (mask is None) != (mask_dict is None):
            raise ValueError('FMoE: mask and mask_dict go together (FastMoE ignores one without the other)')
        self.d_model, self.world_size, self.top_k = d_model, world_size, top_k
        self.slice_group, self.moe_group = slice_group, moe_group
        self.slice_size = 1 if slice_group is None else dist.get_world_size(slice_group)
        self.slice_rank = 0 if slice_group is None else dist.get_rank(slice_group)
        if world_size > 1:
            self._check_moe_group()
        self.experts, self.num_expert = _make_experts(expert, num_expert, d_model)
        self.experts_fused = expert is None
        self.gate = _make_gate(gate, d_model, self.num_expert, world_size, top_k, gate_bias)
        self.gate_hook, self.mask, self.mask_dict = gate_hook, mask, mask_dict

    def _check_moe_group(self):
        if not dist.is_initialized():
            raise RuntimeError(f'FMoE(world_size={self.world_size}) needs torch.distributed initialized first')
        size = dist.get_world_size(self.moe_group)
        if size != self.world_size:
            raise ValueError(f'FMoE: world_size={self.world_size} but moe_group has {size} processes')

    def expert_fn(self, inp, fwd_expert_count):
        """The experts on rows grouped by expert: the fused module at once, or each expert on its slice."""
        if self.experts is None:
            raise RuntimeError('FMoE has no experts: pass expert= or set self.experts in a subclass')
        if self.experts_fused:
            return self.experts(inp, fwd_expert_count)
        counts = fwd_expert_count.tolist()
        starts = [sum(counts[:i]) for i in range(len(counts))]
        outputs = [self.experts[i](tree_map(lambda t: t[start:start + n], inp), torch.tensor([n]))
                   for i, (start, n) in enumerate(zip(starts, counts))]
        return _concat(outputs)

    def expert_fn_single(self, inp, fwd_expert_count, idx):
        """Expert idx alone (FasterMoE's scheduling calls experts one by one)."""
        return self.experts[idx](inp, fwd_expert_count)

    def mark_parallel_comm(self, expert_dp_comm='none'):
        """Tag the experts' parameters with expert_dp_comm and the gate's with 'gate' (see
        DistributedGroupedDataParallel)."""
        if self.experts is not None:
            mark_module_parallel_comm(self.experts, expert_dp_comm)
        mark_module_parallel_comm(self.gate, 'gate')

    def forward(self, moe_inp):
        sizes = {t.shape[0] for t in tree_leaves(moe_inp)}
        if len(sizes) != 1:
            raise ValueError(f'FMoE inputs must have the same batch size, got {sorted(sizes)}')
        if self.slice_size > 1:
            moe_inp = tree_map(lambda t: _parallel.batch_slice(t, self.slice_rank, self.slice_size), moe_inp)
        expert, score = self.gate(moe_inp)
        if self.gate_hook is not None:
            self.gate_hook(expert, score, None)
        routing = gate_routing(expert, score, self.top_k)
        if self.mask is not None:
            out = self._masked_forward(moe_inp, routing)
        else:
            out = self._experts_forward(moe_inp, routing.expert, routing.score)
        if self.slice_size > 1:
            out = tree_map(lambda t: _parallel.AllGather.apply(t, self.slice_rank, self.slice_size,
                                                               self.slice_group), out)
        return out

    def _experts_forward(self, inp, expert, score):
        """sum_j score[n, j] * expert[n, j](inp[n]) for every token n (0 for a copy with index -1)."""
        rows, plan = grouped_rows(inp, expert, self.num_expert * self.world_size)
        counts = expert_counts(plan)
        if self.world_size > 1:
            routes = _parallel.ExpertExchange(plan.counts, self.num_expert, self.world_size, self.moe_group)
            rows_out = tree_map(routes.receive, self.expert_fn(tree_map(routes.send, rows), routes.local_counts))
        else:
            rows_out = self.expert_fn(rows, counts)
        return tree_map(lambda t: moe.combine(t, score, plan), rows_out)

    def _masked_forward(self, inp, routing):
        mask = self.mask.reshape(-1).to(routing.expert.device)
        kept = torch.nonzero(mask == 0).squeeze(1)
        out = self._experts_forward(tree_map(lambda t: t.index_select(0, kept), inp),
                                    routing.expert.index_select(0, kept), routing.score.index_select(0, kept))

        def recover(t):
            full = t.new_zeros((mask.shape[0],) + tuple(t.shape[1:])).index_copy(0, kept, t)
            for value, fill in self.mask_dict.items():
                rows = torch.nonzero(mask == value).squeeze(1)
                copies = fill.to(t).expand(self.top_k, *t.shape[1:]).reshape(self.top_k, -1)
                weighted = routing.score.index_select(0, rows).to(t) @ copies
                full = full.index_copy(0, rows, weighted.reshape((-1,) + tuple(t.shape[1:])))
            return full
        return tree_map(recover, out)


def _concat(outputs):
    """Per-expert outputs (tensors, or nests of tensors of the same structure) concatenated along the rows."""
    first = outputs[0]
    if isinstance(first, dict):
        return type(first)((key, _concat([o[key] for o in outputs])) for key in first)
    if isinstance(first, (list, tuple)):
        return type(first)(_concat([o[i] for o in outputs]) for i in range(len(first)))
    return torch.cat(outputs)
