"""fmoe.gates.utils: the capacity limit for gates written against FastMoE (moe.limit_by_capacity)."""
import torch

from .._repo import moe, refuse


def limit_by_capacity(topk_idx, num_expert, world_size, capacity):
    """FastMoE's limit_by_capacity on one worker: at most `capacity` copies per expert, the others set to -1
    (earlier tokens kept first). Returns (local counts, global counts, new index) as FastMoE; the counts are
    the same tensor here ([num_expert] int32)."""
    if world_size != 1:
        raise refuse(f'limit_by_capacity(world_size={world_size!r})',
                     'FastMoE exchanges the counts between workers in its CUDA extension')
    with torch.no_grad():
        expert, _ = moe.limit_by_capacity(topk_idx, capacity, num_expert)
        counts = moe.sort_by_expert(expert.reshape(-1), num_expert)[2][:num_expert].to(torch.int32)
    return counts, counts, expert
