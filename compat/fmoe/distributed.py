"""fmoe.distributed: FastMoE's data parallelism with one process group per kind of parameter, on
torch.distributed (gloo or NCCL)."""
import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ._repo import refuse

DEFAULT_COMMS = ('dp', 'gate', 'moe', 'world')


class DistributedGroupedDataParallel(nn.Module):
    """FastMoE's DistributedGroupedDataParallel(module, auto_allreduce=False, need_sync=True, **{kind}_group).

    Each parameter's gradient is averaged over the group of its `dp_comm` tag (mark_module_parallel_comm;
    untagged: 'dp'): `<kind>_group=` keyword arguments name the groups, and 'dp', 'gate', 'moe' and 'world'
    default to the default process group; a tag with no group (e.g. 'none') is not reduced. Call
    allreduce_gradients() (alias allreduce_params) after backward. need_sync broadcasts every parameter from its
    group's first rank at construction. forward calls the module."""

    def __init__(self, module, auto_allreduce=False, need_sync=True, **kwargs):
        if auto_allreduce:
            raise refuse('DistributedGroupedDataParallel(auto_allreduce=True)',
                         'FastMoE does not implement it either; call allreduce_gradients() after backward')
        super().__init__()
        self.module = module
        self.comms = {key[:-len('_group')]: group for key, group in kwargs.items() if key.endswith('_group')}
        unknown = sorted(key for key in kwargs if not key.endswith('_group'))
        if unknown:
            raise TypeError(f'DistributedGroupedDataParallel: unexpected arguments {unknown} '
                            '(groups are passed as <kind>_group=)')
        for kind in DEFAULT_COMMS:
            self.comms.setdefault(kind, dist.group.WORLD)
        if need_sync:
            self._sync_params()

    def _groups(self, params):
        """params by (dp_comm tag, dtype), only the tags that have a group."""
        groups = {}
        for p in params:
            comm = getattr(p, 'dp_comm', 'dp')
            if comm in self.comms:
                groups.setdefault((comm, p.dtype), []).append(p)
        return groups

    def allreduce_gradients(self, no_scale=False, reduce_after=False, fp32_allreduce=False):
        """Average (no_scale: sum) each gradient over its group; reduce_after divides after the sum rather than
        before; fp32_allreduce sums half-precision gradients in float32."""
        params = [p for p in self.module.parameters() if p.requires_grad and p.grad is not None]
        for (comm, dtype), group in self._groups(params).items():
            group_size = dist.get_world_size(self.comms[comm])
            grads = [p.grad.data for p in group]
            flat = _flatten_dense_tensors(grads)
            if fp32_allreduce and dtype != torch.float32:
                flat = flat.float()
            if not no_scale and not reduce_after:
                flat /= group_size
            dist.all_reduce(flat, group=self.comms[comm])
            if not no_scale and reduce_after:
                flat /= group_size
            for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(synced)

    def allreduce_params(self, *args, **kwargs):
        return self.allreduce_gradients(*args, **kwargs)

    def _sync_params(self):
        for (comm, _), group in self._groups(list(self.module.parameters())).items():
            datas = [p.detach() for p in group]
            flat = _flatten_dense_tensors(datas)
            dist.broadcast(flat, dist.get_global_rank(self.comms[comm], 0), group=self.comms[comm])
            with torch.no_grad():   # not through .data: the parameters' versions move, as moe.weight_in reads them
                for param, synced in zip(group, _unflatten_dense_tensors(flat, datas)):
                    param.copy_(synced)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
