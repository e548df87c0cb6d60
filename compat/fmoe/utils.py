"""fmoe.utils: the process-group helpers FastMoE exports, on torch.distributed."""
import torch.distributed as dist


def get_torch_default_comm():
    """The default process group (FastMoE digs it out for its NCCL communicator; here it is simply the group)."""
    if not dist.is_initialized():
        raise RuntimeError('get_torch_default_comm: torch.distributed is not initialized')
    return dist.group.WORLD


def get_rank_0_in_comm(comm):
    """The global rank of comm's first member."""
    return dist.get_global_rank(comm, 0)
