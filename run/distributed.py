"""Data and expert parallelism on PyTorch's own distributed engine: torchrun, DDP, all_to_all.

`torchrun --nproc_per_node N train.py ...` sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; `Dist.from_env`
joins the process group (NCCL on GPUs, gloo on CPUs, with a bounded timeout). Everything else is a method of `Dist`
that is the identity with one process, so the drivers call the same hooks either way:

    data      every rank reads the same ordered batch and keeps its slice of the batch dimension (`local`), so
              its memory holds its own columns; losses are averaged over ranks (`mean`); DDP averages the
              gradients of the dense model (`wrap`).
    experts   with --expert-parallel each rank holds num_expert / world experts of every MoE layer (`shard_experts`);
              `ExpertParallel.run` sends each token row to the rank of its expert with all_to_all (counts first,
              then the rows, then the results back) and the backward pass exchanges the gradients the same way.
              Expert weights are not all-reduced (FastMoE's dp_comm='none'); their gradients are scaled by 1/world
              so that every rank's loss counts as its share of the global mean, as in one process.
    files     rank 0 writes checkpoints; expert shards, optimizer moments and memories are gathered into the
              single-process layout first, so a checkpoint resumes with any world size or on one process.
"""
import datetime
import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from utils import checkpoint as ckpt
from utils.errors import ConfigError
from moe import Dispatch, FMoETransformerMLP

DEFAULT_TIMEOUT_S = 600
# Under torchrun a stop signal takes effect at the next multiple of this many steps (see Dist.stop_check_due).
STOP_CHECK_STEPS = 10
TORCHRUN_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')
# Marks expert weights, as FastMoE's `dp_comm`: 'none' = each rank owns its own, never all-reduced.
EXPERT_COMM = 'none'


def launched_with_several_processes(environ=None):
    environ = os.environ if environ is None else environ
    return int(environ.get('WORLD_SIZE', '1') or 1) > 1


def column_range(bsz, rank, world_size):
    """Rank's contiguous share [start, stop) of bsz batch columns; the first bsz % world ranks get one more."""
    base, extra = divmod(bsz, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def is_expert_param(param):
    return getattr(param, 'dp_comm', None) == EXPERT_COMM


def is_peer_failure(error):
    """Whether an exception comes from the process group: a rank that died, a dropped link or a timeout."""
    if isinstance(error, getattr(dist, 'DistError', ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        word in text for word in ('gloo', 'NCCL', 'Connection', 'connection', 'timed out', 'Timeout', 'peer'))


class SilentLog:
    """The Logger interface for ranks other than 0: they print and write nothing."""
    bar = None

    def __call__(self, line=''):
        pass


class Dist:
    """This process's place in the run. With world_size 1 every method leaves its input as it is."""

    def __init__(self, rank=0, world_size=1, local_rank=0, expert_parallel=False):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.expert_parallel = expert_parallel and world_size > 1
        self.ddp = None
        # NCCL reduces GPU tensors only; gloo reduces CPU tensors
        self.comm_device = torch.device('cpu')

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def active(self):
        return self.world_size > 1

    # ------------------------------------------------------------------ setup
    @classmethod
    def from_env(cls, cuda, expert_parallel=False, timeout_s=DEFAULT_TIMEOUT_S):
        """Join torchrun's process group, or a one-process Dist when not launched with several processes.

        Raises ConfigError (one line) for an incomplete environment or a CUDA request without enough GPUs.
        """
        if not launched_with_several_processes():
            return cls(expert_parallel=expert_parallel)
        missing = [v for v in TORCHRUN_VARS if v not in os.environ]
        if missing:
            raise ConfigError(f'WORLD_SIZE is set but {", ".join(missing)} not: launch with torchrun '
                              '(see docs/distributed.md)')
        rank, world_size, local_rank = (int(os.environ[v]) for v in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'))
        use_cuda = cuda and torch.cuda.is_available()
        if use_cuda:
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(f'LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} GPUs: '
                                 'lower --nproc_per_node')
            torch.cuda.set_device(local_rank)
        dist.init_process_group('nccl' if use_cuda else 'gloo', timeout=datetime.timedelta(seconds=timeout_s))
        joined = cls(rank, world_size, local_rank, expert_parallel)
        if use_cuda:
            joined.comm_device = torch.device('cuda', local_rank)
        return joined

    def device(self, device):
        """This rank's device: its own GPU (cuda:LOCAL_RANK) where the single-process choice is a GPU."""
        if self.active and device.type == 'cuda':
            return torch.device('cuda', self.local_rank)
        return device

    def seed_rank(self, seed):
        """After the model is built from the common seed: rank 0 keeps the single-process stream, the others
        draw their own dropout masks (python and numpy stay common: they choose the batches)."""
        if self.rank > 0:
            torch.manual_seed(seed + self.rank)

    def stop_check_due(self, step):
        """Whether the ranks agree on a stop signal after this step: every STOP_CHECK_STEPS steps, as the
        agreement is an all-reduce whose answer the host waits for (a GPU sync); every step in one process."""
        return not self.active or step % STOP_CHECK_STEPS == 0

    def agree(self, signum):
        """The stop signal any rank received (or None), so that all ranks stop after the same step."""
        if not self.active:
            return signum
        flag = torch.tensor([signum or 0], device=self.comm_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag) or None

    def shares(self, bsz):
        return [stop - start for start, stop in (column_range(bsz, r, self.world_size)
                                                 for r in range(self.world_size))]

    def check_batch(self, bsz, n_chunk=1):
        """Every rank needs at least one column of the global batch, and a share that n_chunk divides."""
        if not self.active:
            return
        self.check_eval_batch(bsz, '--batch_size')
        shares = self.shares(bsz)
        if any(share % n_chunk for share in shares):
            raise ConfigError(f'--batch_chunk {n_chunk} must divide the batch columns of every process '
                             f'(--batch_size {bsz} over {self.world_size} processes: {shares})')

    def loss_weight(self, bsz):
        """Factor on this rank's mean loss so that DDP's plain average over ranks is the mean over the global
        batch even when the shares differ (22 columns over 4 ranks: 6, 6, 5, 5); 1 for equal shares."""
        if not self.active:
            return 1.
        start, stop = column_range(bsz, self.rank, self.world_size)
        return (stop - start) * self.world_size / bsz

    def check_eval_batch(self, bsz, what):
        if self.active and bsz < self.world_size:
            raise ConfigError(f'{what} {bsz} gives some of the {self.world_size} processes no batch column: '
                             f'use a batch of at least {self.world_size}')

    def check_experts(self, num_expert):
        if self.expert_parallel and num_expert % self.world_size:
            raise ConfigError(f'--expert-parallel: --moe-num-expert {num_expert} must be divisible by the number '
                             f'of processes ({self.world_size}), each holding the same number of experts')

    def close(self):
        """Leave the process group together: gloo can abort a process whose peer tears down mid-exchange. For a
        process that goes on; a script ends with `leave` instead."""
        if self.active and dist.is_initialized():
            self._leave_together()
            dist.destroy_process_group()

    def leave(self, code):
        """A script's last call, from the frame that holds its model: returns the exit code with one process; under
        torchrun, leaves the process group together and ends the process at once (os._exit), nothing freed.

        Freeing the process group (DDP's reducer holds it) joins gloo's worker threads while holding the GIL, and a
        worker that is still freeing the last collective's work, whose tensors are Python objects, waits for the
        GIL: a deadlock, seen as a rank that never exits after a finished run. Files are closed by then."""
        if not self.active:
            return code
        if dist.is_initialized():
            self._leave_together()
        leave_now(code)

    @staticmethod
    def _leave_together():
        try:
            dist.barrier()
        except RuntimeError:  # a peer is gone already; nothing left to wait for
            pass

    # ------------------------------------------------------------------ data
    def local(self, batch):
        """This rank's columns of a [len, bsz] batch (a view)."""
        if not self.active:
            return batch
        start, stop = column_range(batch.size(1), self.rank, self.world_size)
        return batch[:, start:stop]

    def mean(self, tensor):
        """The mean over ranks of a tensor that every rank holds (a new tensor; the input is untouched)."""
        if not self.active:
            return tensor
        return self.sum(tensor) / self.world_size

    def sum(self, tensor):
        if not self.active:
            return tensor
        tensor = torch.as_tensor(tensor)
        out = tensor.detach().to(self.comm_device, copy=True)
        dist.all_reduce(out)
        return out.to(tensor.device)

    def barrier(self):
        if self.active:
            dist.barrier()

    # ------------------------------------------------------------------ model and gradients
    def shard_experts(self, model):
        """Keep this rank's slice of the experts of every MoE layer (call before building the optimizer).

        Every rank builds the full model from the same seed, so the shards are the single-process experts.
        """
        if not self.expert_parallel:
            return model
        for layer in model.modules():
            if isinstance(layer, FMoETransformerMLP):
                layer.shard(ExpertParallel(layer.num_expert, self.rank, self.world_size))
                for shard in layer.experts.parameters():
                    shard.dp_comm = EXPERT_COMM
        return model

    def expert_names(self, model):
        return [name for name, p in model.named_parameters() if is_expert_param(p)]

    def wrap(self, model):
        """The module to call for training forwards: DDP over the dense (and gate) weights, or the model."""
        if not self.active:
            return model
        ignored = self.expert_names(model)
        if ignored:
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
        device = next(model.parameters()).device
        # Buffers are constants (positions), so they need no broadcast at every forward.
        # The gradients are views into DDP's buckets: no copy into them after the backward, less memory.
        options = dict(device_ids=[device.index] if device.type == 'cuda' else None, gradient_as_bucket_view=True)
        try:
            self.ddp = nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False, **options)
        except TypeError:  # torch before forward_sync_buffers
            self.ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False, **options)
        return self.ddp

    def sync_context(self, last_chunk):
        """DDP all-reduces once per optimizer step: not after the backward of earlier batch chunks."""
        return self.ddp.no_sync() if self.ddp is not None and not last_chunk else nullcontext()

    def finish_grads(self, model):
        """After backward: an expert's gradient summed the losses of all ranks; scale it to their mean."""
        if self.expert_parallel:
            for p in model.parameters():
                if p.grad is not None and is_expert_param(p):
                    p.grad.div_(self.world_size)

    def grad_norm(self, params):
        """The global 2-norm of the gradients: dense ones are equal on all ranks, expert shards add up."""
        grads = [p.grad for p in params if p.grad is not None]
        if not self.expert_parallel:
            return torch.nn.utils.get_total_norm(grads)
        dense = [p.grad for p in params if p.grad is not None and not is_expert_param(p)]
        experts = [p.grad for p in params if p.grad is not None and is_expert_param(p)]
        device = grads[0].device
        squares = torch.stack([torch.nn.utils.get_total_norm(g).to(device).float() ** 2 if g else
                               torch.zeros((), device=device) for g in (dense, experts)])
        return (squares[0] + self.sum(squares[1])).sqrt()

    def clip_grad_norm_(self, params, max_norm):
        """torch.nn.utils.clip_grad_norm_ over the whole model, wherever its shards are."""
        params = list(params)
        if not self.expert_parallel:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        total = self.grad_norm(params)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    # ------------------------------------------------------------------ checkpoints
    def write(self, save):
        """Rank 0 writes (save()), the others wait for the file to exist before reading anything."""
        if self.is_main:
            save()
        self.barrier()

    def full_model_state(self, model):
        """model.state_dict() with every expert shard gathered into the fused [num_expert, ...] tensors."""
        state = model.state_dict()
        if self.expert_parallel:
            for name in self.expert_names(model):
                state[name] = self._gather_rows(state[name])
        return state

    def local_model_state(self, state, model):
        """This rank's slice of a full (single-process layout) state dict."""
        if not self.expert_parallel:
            return state
        state = dict(state)
        for name in self.expert_names(model):
            state[name] = self._own_rows(state[name])
        return state

    def _expert_slots(self, optimizer):
        params = [p for group in optimizer.param_groups for p in group['params']]
        return {i for i, p in enumerate(params) if is_expert_param(p)}

    def full_optimizer_state(self, optimizer):
        """optimizer.state_dict() with the moments of expert weights gathered like the weights."""
        state = optimizer.state_dict()
        if not self.expert_parallel:
            return state
        slots = self._expert_slots(optimizer)
        state['state'] = {i: {k: self._gather_rows(v) if i in slots and torch.is_tensor(v) and v.dim() else v
                              for k, v in s.items()} for i, s in state['state'].items()}
        return state

    def local_optimizer_state(self, state, optimizer):
        if not self.expert_parallel:
            return state
        slots = self._expert_slots(optimizer)
        state = dict(state)
        state['state'] = {i: {k: self._own_rows(v) if int(i) in slots and torch.is_tensor(v) and v.dim() else v
                              for k, v in s.items()} for i, s in state['state'].items()}
        return state

    def _gather_rows(self, shard):
        parts = [torch.empty_like(shard) for _ in range(self.world_size)]
        dist.all_gather(parts, shard.contiguous())
        return torch.cat(parts).cpu()

    def _own_rows(self, full):
        per_rank = full.size(0) // self.world_size
        return full[self.rank * per_rank:(self.rank + 1) * per_rank].clone()

    def full_mems(self, mems):
        """Memories of every batch chunk gathered into the single-process layout (chunk c = global columns
        c*B/C ...), so a checkpoint resumes on any number of processes; on the CPU."""
        if not self.active:
            return [[m.cpu() for m in chunk] for chunk in mems]
        if not mems[0]:
            return [[] for _ in mems]
        per_layer = [torch.cat(layer, 1) for layer in zip(*mems)]   # [mlen, share, d], this rank's columns
        shares = self.gather_objects(per_layer[0].size(1))
        full = []
        for local in per_layer:
            # all_gather needs equal shapes: pad every share to the widest, then cut the padding off
            padded = local.new_zeros(local.size(0), max(shares), *local.shape[2:])
            padded[:, :local.size(1)] = local
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            dist.all_gather(parts, padded)
            full.append(torch.cat([part[:, :share] for part, share in zip(parts, shares)], 1).cpu())
        return [list(chunk) for chunk in zip(*(layer.chunk(len(mems), 1) for layer in full))]

    def local_mems(self, mems, device):
        """The inverse of full_mems for this rank (and its device)."""
        if not self.active or not mems[0]:
            return [[m.to(device) for m in chunk] for chunk in mems]
        per_layer = [self.local(torch.cat(layer, 1)) for layer in zip(*mems)]
        return [[m.to(device) for m in chunk] for chunk in zip(*(layer.chunk(len(mems), 1) for layer in per_layer))]

    def set_rng_state(self, state, seed, step):
        """Each rank's saved RNG state when the world size is unchanged (exact resume); otherwise rank 0's
        for all, with a fresh torch stream per rank > 0."""
        per_rank = state.get('rng_per_rank')
        if per_rank is not None and len(per_rank) == self.world_size:
            ckpt.set_rng_state(per_rank[self.rank])
            return
        ckpt.set_rng_state(state['rng'])
        if self.rank > 0:
            torch.manual_seed(seed + self.rank + 7919 * step)

    def gather_objects(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank (pickled over the process group, not from a file)."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


# ----------------------------------------------------------------------------- expert parallelism

def exchange(rows, send_splits, recv_splits):
    """all_to_all of rows: send_splits[r] rows go to rank r, recv_splits[r] rows come from it."""
    out = rows.new_empty((sum(recv_splits),) + tuple(rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), recv_splits, send_splits)
    return out


class AllToAll(torch.autograd.Function):
    """The rows exchange as a differentiable step: the backward sends each gradient back where its row came from."""

    @staticmethod
    def forward(ctx, rows, send_splits, recv_splits):
        ctx.splits = send_splits, recv_splits
        return exchange(rows, send_splits, recv_splits)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        return exchange(grad, recv_splits, send_splits), None, None


class ExpertParallel:
    """The experts of one MoE layer split over the ranks: rank r holds experts [r*E/W, (r+1)*E/W).

    `run` takes the rows of this rank's tokens sorted by (global) expert, as `moe.dispatch` leaves them,
    and returns their expert outputs in the same order, having computed them on the experts' ranks.
    """

    def __init__(self, num_expert, rank, world_size):
        self.num_expert, self.rank, self.world_size = num_expert, rank, world_size
        self.num_local = num_expert // world_size
        self.local_range = (rank * self.num_local, (rank + 1) * self.num_local)

    def run(self, experts, rows, plan, use_grouped_mm):
        world, n_local = self.world_size, self.num_local
        # 1. counts: send_counts[r, e] rows go to local expert e of rank r; receive the transpose of that.
        send_counts = plan.counts.view(world, n_local)
        recv_counts = exchange(send_counts.reshape(-1), [n_local] * world, [n_local] * world).view(world, n_local)
        # The one host sync of an expert-parallel layer: all_to_all_single takes its split sizes as Python
        # ints (NCCL needs them on the host to post the sends and receives).
        counts_host = torch.cat([send_counts.sum(1), recv_counts.reshape(-1)]).tolist()
        send_splits = counts_host[:world]
        recv_counts_host = [counts_host[world + r * n_local:world + (r + 1) * n_local] for r in range(world)]
        recv_splits = [sum(c) for c in recv_counts_host]
        local_counts_host = [sum(c) for c in zip(*recv_counts_host)]
        # 2. rows: they arrive grouped by source rank, then by local expert; regroup them by local expert.
        # Padding rows (dropped copies after the kept ones, see moe.dispatch) are not sent.
        kept = sum(send_splits)
        received = AllToAll.apply(rows[:kept], send_splits, recv_splits)
        expert_of_row = torch.repeat_interleave(
            torch.arange(n_local, device=rows.device).repeat(world), recv_counts.reshape(-1).to(rows.device),
            output_size=sum(recv_splits))
        local_expert, by_expert = torch.sort(expert_of_row, stable=True)
        local_plan = Dispatch(order=None, token=None, expert=local_expert, counts=recv_counts.sum(0).to(rows.device),
                              counts_host=local_counts_host, num_rows=sum(recv_splits),
                              num_copies=sum(recv_splits), padded=False)
        out = experts(received.index_select(0, by_expert), local_plan, use_grouped_mm)
        # 3. results: back to the arrival order, then to the ranks the rows came from; zeros for padding rows.
        arrival = torch.empty_like(by_expert)
        arrival[by_expert] = torch.arange(by_expert.numel(), device=by_expert.device)
        returned = AllToAll.apply(out.index_select(0, arrival), recv_splits, send_splits)
        return F.pad(returned, (0, 0, 0, rows.shape[0] - kept))


def fail(prog, message, code=3):
    """One line on stderr and an immediate exit: a broken process group cannot be shut down cleanly."""
    print(f'{prog}: error: {message}', file=sys.stderr, flush=True)
    leave_now(code)


def leave_now(code):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_process(code):
    """A script's exit. One process of a torchrun launch leaves without the interpreter's finalization: there,
    after a run that finished well, gloo's worker threads sometimes abort the process (SIGABRT, "terminate called
    without an active exception", no Python frame left; more often on a loaded machine),
    and torchrun then reports a failed run. The script has written and closed its files by then."""
    if launched_with_several_processes():
        leave_now(code)
    sys.exit(code)
