"""torch.distributed steps of FMoE: expert parallelism (all_to_all of the rows between the workers that hold
different experts) and the slicing of a batch over a group (each member computes a slice, all gather it)."""
import torch
import torch.distributed as dist


def exchange(rows, send_splits, recv_splits, group):
    """all_to_all of rows: send_splits[r] rows go to rank r of group, recv_splits[r] rows come from it."""
    out = rows.new_empty((sum(recv_splits),) + tuple(rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), recv_splits, send_splits, group=group)
    return out


class AllToAll(torch.autograd.Function):
    """The rows exchange, differentiable: each gradient goes back to the worker its row came from."""

    @staticmethod
    def forward(ctx, rows, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return exchange(rows, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        return exchange(grad, recv_splits, send_splits, ctx.group), None, None, None


class ExpertExchange:
    """One forward's routes between workers. Rows arrive sorted by global expert (worker-major); `send` gives
    the rows this worker's experts must compute, grouped by local expert, with their counts; `receive` takes
    those rows' outputs back to the workers (and the order) they came from."""

    def __init__(self, counts, num_expert, world_size, group):
        self.group, self.world, self.n_local = group, world_size, num_expert
        send_counts = counts.view(world_size, num_expert).to(torch.long)
        recv_counts = exchange(send_counts.reshape(-1), [num_expert] * world_size, [num_expert] * world_size,
                               group).view(world_size, num_expert)
        self.send_splits = send_counts.sum(1).tolist()
        self.recv_splits = recv_counts.sum(1).tolist()
        self.local_counts = recv_counts.sum(0).cpu()
        # arrivals come grouped by source worker, then local expert: a stable sort regroups them by expert
        expert_of_row = torch.repeat_interleave(torch.arange(num_expert, device=counts.device).repeat(world_size),
                                                recv_counts.reshape(-1).to(counts.device))
        self.by_expert = torch.sort(expert_of_row, stable=True)[1]
        self.arrival = torch.empty_like(self.by_expert)
        self.arrival[self.by_expert] = torch.arange(self.by_expert.numel(), device=counts.device)

    def send(self, rows):
        received = AllToAll.apply(rows, self.send_splits, self.recv_splits, self.group)
        return received.index_select(0, self.by_expert)

    def receive(self, rows_out):
        return AllToAll.apply(rows_out.index_select(0, self.arrival), self.recv_splits, self.send_splits,
                              self.group)


def batch_slice(tensor, rank, size):
    """This member's rows of a batch split over `size` members (FastMoE's Slice)."""
    n = tensor.shape[0]
    if n % size:
        raise ValueError(f'a batch of {n} rows does not split over slice_group of {size} members')
    step = n // size
    return tensor[rank * step:(rank + 1) * step]


class AllGather(torch.autograd.Function):
    """Every member's slice, concatenated. Backward: each member keeps the gradient of its own slice (every
    member computes the same loss from the whole batch, as FastMoE's AllGather assumes)."""

    @staticmethod
    def forward(ctx, tensor, rank, size, group):
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None, None, None
