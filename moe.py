"""Mixture-of-Experts feed-forward with FastMoE's interface, in plain PyTorch.

FastMoE's ``FMoETransformerMLP`` needs a CUDA build; this layer reproduces its
parameters (the fused ``[num_expert, out, in]`` layout), its gates (naive,
GShard, Switch) and their balance losses, and runs on CPU and GPU alike.

One forward is four small steps, kept separate so that expert parallelism
(run/distributed.py) can put an all-to-all exchange between ``dispatch`` and
the expert compute:

    route     gate logits -> top-k experts and scores per token (-1 = dropped)
    dispatch  stable sort of the token copies by expert; gather their rows
    experts   each expert's FFN on its contiguous slice of rows
              (one grouped_mm where it runs fast, else tiles on GPUs, see expert_path)
    combine   put the rows back in token order, weighted sum over the k copies

The forward returns the output and the call's routing statistics (MoEStats: the
balance loss and the router logits, from which the z-loss, in the graph; the load,
the dropped copies); nothing of a forward is kept on the layer (on CPUs, a copy of
the expert weights in the autocast dtype is: FusedExpertLinear.weight_in). Host
synchronisations: none on the grouped_mm and tiles paths, capacity drops included;
the slices path reads the per-expert counts once (it splits the rows by them); an
expert-parallel layer reads its all_to_all split sizes once.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.config import (check_options, finite_at_least_zero, finite_positive, option, positive, probability,
                          at_least_zero)
from utils.errors import ConfigError

GATES = ('naive', 'gshard', 'switch', 'noisy', 'auxfree')
EXPERT_BACKENDS = ('auto', 'grouped_mm', 'tiles', 'slices')


# ----------------------------------------------------------------------------- gates

def at_least_fp32(t):
    """Upcast half precisions for softmax/logsumexp; leave float32/float64 alone."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class Routing(NamedTuple):
    """What a gate returns."""
    expert: torch.Tensor        # [N, k] long, -1 where the copy is dropped
    score: torch.Tensor         # [N, k] weight of each copy in the output
    logits: torch.Tensor        # [N, E] raw gate logits (before any noise), for the z-loss
    balance_loss: torch.Tensor  # 0-d, in the graph: the gate's load-balancing loss (0 for gates without one)
    dropped: torch.Tensor       # 0-d long: copies dropped by the capacity limit
    may_drop: bool              # False when no copy can ever be -1 (dispatch then has no padding rows)


class MoEStats(NamedTuple):
    """What one MoE layer's forward reports beside its output."""
    balance_loss: torch.Tensor  # 0-d, in the graph: the gate's balance loss
    logits: torch.Tensor        # [N, E] the gate's raw logits (before any noise), in the graph
    load: torch.Tensor          # [E] long, detached: token copies each expert computed
    dropped: torch.Tensor       # 0-d long, detached: copies dropped by the capacity limit

    @property
    def z_loss(self):
        """0-d, in the graph: the router z-loss (ST-MoE), mean over tokens of logsumexp(logits)^2, which keeps
        the logits small. Computed when read, so that a caller that does not weigh it pays nothing for it."""
        if self.logits.shape[0] == 0:
            return self.logits.new_zeros((), dtype=torch.float32)
        return (torch.logsumexp(at_least_fp32(self.logits), dim=-1) ** 2).mean()


def sort_by_expert(expert, num_expert):
    """Stable sort of flat expert ids with -1 (dropped) last.
    Returns (sorted ids, order, counts [num_expert + 1]; the last count is the dropped copies).

    The counts are read off the sorted keys (where each expert's run ends) rather than with
    torch.bincount, which on CUDA reads the keys' range back to the host (two syncs per call)."""
    key = torch.where(expert < 0, num_expert, expert)
    sorted_key, order = torch.sort(key, stable=True)
    ends = torch.searchsorted(sorted_key, torch.arange(1, num_expert + 2, device=key.device))
    return sorted_key, order, torch.diff(ends, prepend=ends.new_zeros(1))


def rank_within_expert(expert, num_expert):
    """For each entry of the flat `expert` (-1 = none), how many earlier entries chose the same expert."""
    sorted_key, order, counts = sort_by_expert(expert, num_expert)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - starts[sorted_key]
    return rank


def limit_by_capacity(expert, capacity, num_expert):
    """Drop (set to -1) the copies beyond `capacity` per expert, earlier copies first.

    FastMoE prunes in whatever order its CUDA threads race; here the order is
    fixed: token-major over the flattened [N, k] assignment, so earlier tokens
    (and, within a token, its better expert) win. Returns (expert, n_dropped).
    """
    flat = expert.reshape(-1)
    routed = flat >= 0
    keep = routed & (rank_within_expert(flat, num_expert) < capacity)
    dropped = (routed & ~keep).sum()
    return torch.where(keep, flat, -1).view_as(expert), dropped


class BaseGate(nn.Module):
    """What every gate shares: its sizes (with FastMoE's names). forward(x [N, d_model]) -> Routing."""

    def __init__(self, num_expert, top_k):
        super().__init__()
        self.num_expert = self.tot_expert = num_expert
        self.world_size = 1
        self.top_k = top_k


class NaiveGate(BaseGate):
    """FastMoE's NaiveGate: top-k of a linear layer's logits, softmax over the k selected."""

    def __init__(self, d_model, num_expert, top_k, gate_bias=True):
        super().__init__(num_expert, top_k)
        self.gate = nn.Linear(d_model, num_expert, bias=gate_bias)

    def compute_logits(self, x):
        # The router runs in its weights' precision even under autocast: the logits
        # are tiny to compute and bf16 ties/rounding would flip expert choices.
        with torch.autocast(x.device.type, enabled=False):
            return self.gate(x.to(self.gate.weight.dtype))

    def forward(self, x):
        logits = self.compute_logits(x)
        top_logits, expert = torch.topk(logits, self.top_k, dim=-1)
        return Routing(expert, F.softmax(top_logits, dim=-1), logits, logits.new_zeros(()),
                       expert.new_zeros(()), may_drop=False)


class GShardGate(NaiveGate):
    """FastMoE's GShardGate: top-2, capacity limit, optional random routing of the 2nd expert."""

    def __init__(self, d_model, num_expert, top_k=2, capacity=(1.2, 2.4),
                 random_routing=True, gate_bias=True):
        super().__init__(d_model, num_expert, top_k, gate_bias)
        self.capacity = capacity
        self.random_routing = random_routing

    def forward(self, x):
        naive = super().forward(x)
        n_tok, n_exp = x.shape[0], self.num_expert
        # c_e: fraction of tokens whose first choice is e (no gradient); m_e: mean router probability.
        c_e = sort_by_expert(naive.expert[:, 0], n_exp)[2][:n_exp].to(naive.logits.dtype) / n_tok
        m_e = F.softmax(naive.logits, dim=-1).mean(0)
        balance_loss = (c_e * m_e).mean() * n_exp ** 2

        cap_rate = self.capacity[0 if self.training else 1]
        capacity = math.ceil(cap_rate * n_tok) * self.top_k // n_exp
        expert, dropped = limit_by_capacity(naive.expert, capacity, n_exp)
        if self.random_routing and self.training:
            # keep the 2nd expert with probability 2 * its score (GShard's random routing)
            unlucky = 2 * naive.score[:, 1] < torch.rand(n_tok, device=x.device)
            expert = torch.cat([expert[:, :1], expert[:, 1:].masked_fill(unlucky[:, None], -1)], 1)
        return Routing(expert, naive.score, naive.logits, balance_loss, dropped, may_drop=True)


class SwitchGate(NaiveGate):
    """FastMoE's SwitchGate: top-1 of the softmax (with jitter in training), capacity limit."""

    def __init__(self, d_model, num_expert, top_k=1, switch_eps=0.1, capacity=(1.2, 2.4),
                 gate_bias=True):
        super().__init__(d_model, num_expert, top_k, gate_bias)
        self.switch_eps = switch_eps
        self.capacity = capacity

    def forward(self, x):
        logits = self.compute_logits(x)
        noisy = logits
        if self.training:
            # FastMoE *adds* uniform noise from [1-eps, 1+eps] to the logits; kept as is.
            noise = torch.rand_like(logits) * (2 * self.switch_eps) + (1.0 - self.switch_eps)
            noisy = logits + noise
        prob = F.softmax(at_least_fp32(noisy), dim=-1)   # fp32 softmax for stability, as FastMoE
        top1_prob, expert = torch.topk(prob, 1, dim=-1)

        n_tok, n_exp = x.shape[0], self.num_expert
        capacity = math.ceil(self.capacity[0 if self.training else 1] * n_tok / n_exp)
        expert, dropped = limit_by_capacity(expert, capacity, n_exp)

        kept_per_expert = sort_by_expert(expert.view(-1), n_exp)[2][:n_exp].to(prob.dtype)
        n_kept = kept_per_expert.sum().clamp(min=1)   # a tensor: no host sync
        fraction = kept_per_expert / n_kept
        prob_mass = prob.sum(0) / n_kept
        balance_loss = (fraction * prob_mass).sum() * n_exp
        return Routing(expert, top1_prob.to(logits.dtype), logits, balance_loss, dropped, may_drop=True)



def cv_squared(x):
    """Squared coefficient of variation (unbiased variance / mean^2) of a 1-d tensor; 0 for one element."""
    if x.numel() == 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + 1e-10)


class NoisyGate(BaseGate):
    """FastMoE's NoisyGate (Shazeer et al., 2017): noisy top-k gating with the importance and load losses.

    Clean logits x @ w_gate; in training, Gaussian noise of a learned per-expert scale
    softplus(x @ w_noise) + 0.01 is added before the top-k (the softmax runs over the k noisy
    logits). Balance loss: cv^2(importance) + cv^2(load), importance = each expert's summed
    scores, load = each expert's smooth probability of staying in the top k under fresh noise
    (the only differentiable route from the load back to the router). In evaluation there is no
    noise, and the load is the plain count. Parameters as FastMoE's: w_gate, w_noise [d_model, E].
    """

    noise_epsilon = 1e-2

    def __init__(self, d_model, num_expert, top_k=2):
        super().__init__(num_expert, top_k)
        self.w_gate = nn.Parameter(torch.empty(d_model, num_expert))
        self.w_noise = nn.Parameter(torch.empty(d_model, num_expert))
        for w in (self.w_gate, self.w_noise):   # FastMoE's: nn.Linear's rule on [d_model, E]
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):   # fp32 router, as NaiveGate
            x = x.to(self.w_gate.dtype)
            clean = x @ self.w_gate
            noisy, std = clean, None
            if self.training:
                std = F.softplus(x @ self.w_noise) + self.noise_epsilon
                noisy = clean + torch.randn_like(clean) * std
        n_keep = min(self.top_k + 1, self.num_expert)   # the (k+1)-th value is the threshold for the load
        top_values, top_expert = noisy.topk(n_keep, dim=-1)
        expert = top_expert[:, :self.top_k]
        score = F.softmax(top_values[:, :self.top_k], dim=-1)

        importance = clean.new_zeros(clean.shape).scatter(1, expert, score).sum(0)
        if std is not None and self.top_k < self.num_expert:
            load = self.prob_in_top_k(clean, noisy, std, top_values).sum(0)
        else:
            load = sort_by_expert(expert.reshape(-1), self.num_expert)[2][:self.num_expert].to(clean.dtype)
        return Routing(expert, score, clean, cv_squared(importance) + cv_squared(load), expert.new_zeros(()),
                       may_drop=False)

    def prob_in_top_k(self, clean, noisy, std, top_values):
        """P(expert e is in the top k when only its own noise is drawn again), [N, E].

        An expert now in the top k stays if its noisy logit beats the (k+1)-th value; one outside
        must beat the k-th. With Gaussian noise that is Phi((clean - threshold) / std)."""
        in_threshold = top_values[:, self.top_k:self.top_k + 1]
        out_threshold = top_values[:, self.top_k - 1:self.top_k]
        is_in = noisy > in_threshold
        threshold = torch.where(is_in, in_threshold, out_threshold)
        return torch.special.ndtr((clean - threshold) / std)


class AuxFreeGate(NaiveGate):
    """Auxiliary-loss-free balancing (DeepSeek-V3, Wang et al. 2024) on the naive gate.

    A per-expert bias (a buffer, so checkpoints carry it) is added to the logits for the top-k
    choice only; the scores are the softmax of the k chosen experts' *unbiased* logits. No
    balance loss: after each optimizer step the trainer calls update_bias with the step's global
    load, and bias_e += rate * sign(mean load - load_e) steers tokens toward idle experts.
    """

    def __init__(self, d_model, num_expert, top_k, gate_bias=True):
        super().__init__(d_model, num_expert, top_k, gate_bias)
        self.register_buffer('expert_bias', torch.zeros(num_expert))

    def forward(self, x):
        logits = self.compute_logits(x)
        expert = torch.topk(logits + self.expert_bias.to(logits.dtype), self.top_k, dim=-1)[1]
        return Routing(expert, F.softmax(logits.gather(1, expert), dim=-1), logits, logits.new_zeros(()),
                       expert.new_zeros(()), may_drop=False)

    @torch.no_grad()
    def update_bias(self, load, rate):
        """load: [E] token copies per expert over the step, summed over all processes."""
        load = load.to(self.expert_bias)
        self.expert_bias.add_(rate * torch.sign(load.mean() - load))


# ----------------------------------------------------------------------------- dispatch / combine

class Dispatch(NamedTuple):
    order: torch.Tensor         # [M] flat copy index (token * k + slot) of each row, expert-major
    token: torch.Tensor         # [M] token each row was gathered from
    expert: torch.Tensor        # [M] expert of each row (non-decreasing; num_expert for a padding row)
    counts: torch.Tensor        # [E] rows per expert
    counts_host: Optional[list]  # the same on the host, when some step needs it
    num_rows: int               # M: the copies kept, or all N * k when padded
    num_copies: int             # N * k
    padded: bool                # rows past counts.sum() are dropped copies, whose expert output must be 0


def dispatch(routing, num_expert, need_host_counts):
    """Stable-sort the token copies by expert, dropped ones last.

    With the counts on the host (the slices backend's one host sync: it splits the rows by them) the
    dropped copies are cut off. Without, the number of rows stays N * k whatever the capacity limit
    dropped, so nothing is read back to the host: the dropped copies stay as padding rows after the
    last expert's, and the expert compute gives them exactly zero output and gradient (GroupedLinear)."""
    n_tok, top_k = routing.expert.shape
    flat = routing.expert.reshape(-1)
    sorted_key, order, counts = sort_by_expert(flat, num_expert)
    counts = counts[:num_expert]
    counts_host = counts.tolist() if need_host_counts else None
    num_rows = flat.numel() if counts_host is None else sum(counts_host)
    order = order[:num_rows]
    return Dispatch(order, torch.div(order, top_k, rounding_mode='floor'), sorted_key[:num_rows],
                    counts, counts_host, num_rows, flat.numel(),
                    padded=counts_host is None and routing.may_drop)


def combine(rows_out, score, plan):
    """Rows back to token order; output[n] = sum_j score[n, j] * copy (n, j), in the wider of the rows' and the
    scores' dtypes (fp32 for bf16 rows: the sum and the scores keep their precision). Dropped copies give 0 (cut
    off: they read a zero row; padding rows: the expert compute left them 0)."""
    return Combine.apply(rows_out, score, plan.order, plan.token)


class Combine(torch.autograd.Function):
    """combine's weighted sum of each token's k rows, written out: autograd's backward of the gather is a
    scatter-add into zeros, where a gather does (each row is one copy's: plan.order), and its backward of the
    batched product computes the scores' gradient as N products of a [k, d] matrix by a vector, many times
    slower on CPUs than the elementwise product and sum here."""

    @staticmethod
    def forward(ctx, rows_out, score, order, token):
        n_tok, top_k = score.shape
        num_rows, d_out = rows_out.shape
        if num_rows < n_tok * top_k:
            rows_out = F.pad(rows_out, (0, 0, 0, 1))   # a zero row for every cut-off copy to point at
        row_of_copy = torch.full((n_tok * top_k,), num_rows, dtype=torch.long, device=score.device)
        row_of_copy[order] = torch.arange(num_rows, device=score.device)
        copies = rows_out.index_select(0, row_of_copy).view(n_tok, top_k, d_out)
        dtype = torch.promote_types(rows_out.dtype, score.dtype)
        ctx.save_for_backward(copies, score, order, token)
        ctx.rows_dtype = rows_out.dtype
        return torch.bmm(score.to(dtype).unsqueeze(1), copies.to(dtype)).squeeze(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        copies, score, order, token = ctx.saved_tensors
        grad_rows = grad_score = None
        if ctx.needs_input_grad[0]:   # row r is copy order[r] of token token[r]: score * grad of that token
            row_score = score.reshape(-1).index_select(0, order).to(grad.dtype)
            grad_rows = grad.index_select(0, token).mul_(row_score.unsqueeze(1)).to(ctx.rows_dtype)
        if ctx.needs_input_grad[1]:
            grad_score = (copies.to(grad.dtype) * grad.unsqueeze(1)).sum(-1).to(score.dtype)
        return grad_rows, grad_score, None, None


# ----------------------------------------------------------------------------- expert compute

# The grouped product: torch.nn.functional.grouped_mm where torch has it, else the older private name.
grouped_mm = getattr(F, 'grouped_mm', None) or getattr(torch, '_grouped_mm', None)
_GROUPED_MM_PROBES = {}


def grouped_mm_fast_on_cuda(capability, dtype):
    """Whether CUDA runs grouped_mm as one kernel: bf16 on compute capability 9.x/10.x (H100/H200, B200).
    Elsewhere (A100; fp32/fp16 on any GPU) it copies the group ends to the host and loops over the
    groups, a host sync per call: the tiles are the better path there."""
    return dtype == torch.bfloat16 and capability[0] in (9, 10)


def grouped_mm_zeroes_empty_groups(device):
    """Whether grouped_mm gives an expert without rows an exact zero slot in the weight-gradient product
    (groups along the summed dimension). On CPUs it is a loop of mm over the groups, and mm over an empty
    inner dimension writes zeros; CUDA's kernels leave that slot undefined (garbage seen on sm100), so there
    the experts without rows are masked to zero."""
    return torch.device(device).type == 'cpu'


def grouped_mm_available(device, dtype):
    """Whether the experts should run through grouped_mm on this device and dtype: on CUDA only where its
    fast kernel runs, and anywhere only where it runs forward and backward (probed once per device)."""
    device = torch.device(device)
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', torch.cuda.current_device())
    key = (device, dtype)
    if key not in _GROUPED_MM_PROBES:
        ok = grouped_mm is not None
        if ok and device.type == 'cuda':
            ok = grouped_mm_fast_on_cuda(torch.cuda.get_device_capability(device), dtype)
        if ok:
            try:
                # Gradients on, whatever the caller's mode: a first call from evaluation (no_grad) must
                # not cache "unavailable" for the rest of the process.
                with torch.enable_grad():
                    x = torch.ones(3, 8, device=device, dtype=dtype, requires_grad=True)
                    w = torch.ones(2, 8, 8, device=device, dtype=dtype, requires_grad=True)
                    offs = torch.tensor([0, 3], device=device, dtype=torch.int32)  # includes an empty group
                    y = grouped_mm(x, w.transpose(1, 2), offs=offs)
                    torch.autograd.grad(y, (x, w), torch.ones_like(y))
            except Exception:   # any failure means "not here"; the slices path always works
                ok = False
        _GROUPED_MM_PROBES[key] = ok
    return _GROUPED_MM_PROBES[key]


def grouped_mm_fits(device, dtype, widths):
    """Whether grouped_mm can run the experts: it must exist for this device/dtype (and, inside
    torch.compile, be bf16) and every feature width must give rows whose stride is a multiple of 16 bytes."""
    if torch.compiler.is_compiling() and dtype != torch.bfloat16:
        return False   # torch.compile's shape rules for _grouped_mm take bf16 only (eager CPUs also fp32)
    align = 16 // dtype.itemsize
    return all(w % align == 0 for w in widths) and grouped_mm_available(device, dtype)


def probe_before_compile(device):
    """Run now the one probe a compiled forward can meet on this device (inside torch.compile only bf16 may
    take grouped_mm: grouped_mm_fits), so that it is cached before compiling: the probe's backward cannot be
    traced and would break the first compiled graph."""
    grouped_mm_available(device, torch.bfloat16)


def expert_path(backend, device, dtype, widths):
    """The expert compute that `backend` ('auto', 'grouped_mm', 'tiles', 'slices') runs on this device and
    dtype. The rule for 'auto', none of whose choices reads a value back to the host:

      grouped_mm  where it runs as one call (grouped_mm_fits): CPUs in any dtype (torch >= 2.8; a loop of
                  mm in C++, the per-expert products and nothing else), CUDA bf16 on compute capability 9.x/10.x
      tiles       other accelerators and dtypes (CUDA fp32/TF32, fp16, bf16 before sm90): batched products on
                  each expert's rows cut into tiles (tile_rows: the tile size follows the rows per expert)
      slices      a CPU without grouped_mm: there a host read costs nothing, and the tiles' padding rows
                  would only add products
    """
    if backend in ('tiles', 'slices'):
        return backend
    fits = grouped_mm_fits(device, dtype, widths)
    if backend == 'grouped_mm' and not fits:
        raise ValueError(f'expert_backend grouped_mm does not run for {dtype} on {device.type} '
                         f'with widths {tuple(widths)}; use "auto", "tiles" or "slices"')
    if fits:
        return 'grouped_mm'
    return 'slices' if device.type == 'cpu' else 'tiles'


class GroupedLinear(torch.autograd.Function):
    """rows of expert e (contiguous, group ends `offs`) -> rows @ weight[e].T + bias[e].

    Written out rather than left to autograd because _grouped_mm's own backward rejects
    incoming gradients with zero strides (e.g. from out.sum()); here the gradient is made
    contiguous, the bias is added in place and its gradient is a scatter-add per expert.
    `weight` is the parameter, whose gradient this returns in its dtype; `w` is the weight the products read: the
    parameter itself or the copy in the rows' dtype that FusedExpertLinear.weight_in keeps, both saved for the
    backward as they are; None where no copy is kept (keeps_weight_copies), and then the weight is cast in the forward
    and again in the backward, so that no cast copy stays alive from one to the other.
    The weight stays [E, out, in]: its transposed view is the column-major operand CUDA's kernel takes,
    and on CPUs the products read it through BLAS's transpose flag (no copy either way).

    With `padded`, rows past offs[-1] (dropped copies, see dispatch) belong to no expert: grouped_mm
    leaves their output rows undefined (uninitialised memory, possibly NaN), so they are replaced by
    zeros with torch.where (a product with 0 would keep a NaN), and so are their gradients.
    """

    @staticmethod
    def forward(ctx, rows, weight, w, bias, offs, expert, padded):
        rows = rows.contiguous()
        ctx.recast = w is None
        saved_weight, w = (weight, weight.to(rows.dtype)) if ctx.recast else (w, w)
        out = grouped_mm(rows, w.transpose(1, 2), offs=offs)
        if bias is not None:
            expert = expert.clamp(max=w.shape[0] - 1)   # a padding row's id is num_expert: index anything
            out += bias.to(out.dtype).index_select(0, expert)
        in_group = torch.arange(out.shape[0], device=out.device) < offs[-1] if padded else None
        out = kept_rows(out, in_group)
        ctx.save_for_backward(rows, saved_weight, offs, expert if bias is not None else None, in_group)
        ctx.weight_dtype, ctx.has_bias = weight.dtype, bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        rows, w, offs, expert, in_group = ctx.saved_tensors
        w = w.to(grad.dtype) if ctx.recast else w
        grad = kept_rows(grad.contiguous(), in_group)
        grad_rows = grad_weight = grad_bias = None
        # Experts that received no rows must get a zero gradient; a mask, not a branch (no host sync), and only
        # where the kernel does not already write zeros: on CPUs it would be a weight-sized pass for nothing.
        empty = (None if grouped_mm_zeroes_empty_groups(grad.device)
                 else torch.diff(offs, prepend=offs.new_zeros(1)) == 0)
        if ctx.needs_input_grad[0]:
            grad_rows = kept_rows(grouped_mm(grad, w, offs=offs), in_group)
        if ctx.needs_input_grad[1]:
            grad_weight = zero_experts(grouped_mm(grad.t(), rows, offs=offs), empty).to(ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = zero_experts(per_expert_column_sums(grad, expert, offs), empty).to(ctx.weight_dtype)
        return grad_rows, grad_weight, None, grad_bias, None, None, None


def kept_rows(t, in_group):
    """t with the rows outside every group (in_group False) set to exactly 0; t itself without a mask."""
    return t if in_group is None else torch.where(in_group[:, None], t, t.new_zeros(()))


def zero_experts(t, empty):
    """t [E, ...], a fresh product, with the slots of the experts in `empty` [E] zeroed in place (none if None)."""
    return t if empty is None else t.masked_fill_(empty.view(-1, *[1] * (t.dim() - 1)), 0)


def per_expert_column_sums(grad, expert, offs):
    """[E, out]: the sum of the rows of grad [M, out] that belong to each expert (group ends offs)."""
    if grad.device.type == 'cpu':
        # A scatter-add in fp32: on CPUs far faster than the grouped product below, in bf16 most of all
        # (bench/README.md, "The MoE layer"), and deterministic there.
        return grad.new_zeros(offs.numel(), grad.shape[1], dtype=torch.float32).index_add_(
            0, expert, grad.float())
    # On GPUs one more grouped product, against ones (8 columns keep grouped_mm's 16-byte
    # alignment): deterministic, unlike an atomic scatter-add, with no full-size cast of grad.
    ones = grad.new_ones(grad.shape[0], 8)
    return grouped_mm(grad.t(), ones, offs=offs)[:, :, 0]


# ----------------------------------------------------------------------------- tiles

class Tiling(NamedTuple):
    """Where each row of a dispatch goes in the tiled layout: every expert's rows cut into tiles of `tile` rows,
    the tiles of expert 0 first, the last tile of each expert padded with zero rows."""
    slot: torch.Tensor      # [M] row of the tiled layout [n_tiles * tile + 1] (the last, a spare, for padding rows)
    expert: torch.Tensor    # [n_tiles] the expert of each tile (the unused tiles past the last: any expert)
    tile: int


def tile_rows(num_rows, num_expert):
    """Rows per tile: the power of two <= num_rows / (2 E) (the mean rows per expert halved), in [16, 128].

    The tiles hold num_rows + E * tile rows (the static bound on the tiles an expert's rows fill, see tiling), so
    tile <= num_rows / (2E) bounds the product at 1.5x the rows' FLOPs; the tiles gather their experts' weights,
    num_rows / tile + E of them, so the tile is as large as that bound allows. 16 rows is the smallest
    tensor-core tile; past 128 the padding grows and the weight copies no longer matter."""
    target = max(num_rows // (2 * num_expert), 1)
    return min(128, max(16, 1 << (target.bit_length() - 1)))


def tiling(plan, num_expert, tile):
    """The tiled layout of `plan` (rows sorted by expert) on the device, with no host read: its number of
    tiles is the static bound sum_e ceil(c_e / tile) <= M // tile + E (each expert leaves one tile part-empty)."""
    num_rows = plan.expert.numel()
    n_tiles = num_rows // tile + num_expert
    tiles = torch.div(plan.counts + tile - 1, tile, rounding_mode='floor')   # ceil(c_e / tile)
    tile_end = torch.cumsum(tiles, 0)
    row_start = torch.cumsum(plan.counts, 0) - plan.counts
    expert = plan.expert.clamp(max=num_expert - 1)
    # row r of expert e: tile (first tile of e) + its rank within e
    slot = (tile_end - tiles)[expert] * tile + torch.arange(num_rows, device=expert.device) - row_start[expert]
    if plan.padded:   # padding rows (expert id num_expert) all go to the spare row, which stays zero
        slot = torch.where(plan.expert < num_expert, slot, n_tiles * tile)
    tile_expert = torch.searchsorted(tile_end, torch.arange(n_tiles, device=expert.device), right=True)
    return Tiling(slot, tile_expert.clamp(max=num_expert - 1), tile)


class TileCopies(torch.autograd.Function):
    """param [E, ...] -> [n_tiles, ...] in `dtype`: each tile's copy of its expert's slice, read from `source` (the
    copy FusedExpertLinear.weight_in keeps; param itself when None), source[tile_expert].

    The gradient of the copies that share an expert is summed in the parameter's dtype by one index_add_ over a
    contiguous gradient (autograd's own backward of index_select scatters a strided one, 6x slower on CPUs).
    On CUDA index_add_ adds with atomics; under torch.use_deterministic_algorithms torch takes its deterministic
    kernel instead."""

    @staticmethod
    def forward(ctx, param, source, tile_expert, dtype):
        ctx.save_for_backward(tile_expert)
        ctx.param_shape, ctx.param_dtype = param.shape, param.dtype
        return (param if source is None else source).index_select(0, tile_expert).to(dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        tile_expert, = ctx.saved_tensors
        summed = grad.new_zeros(ctx.param_shape, dtype=ctx.param_dtype)
        return summed.index_add_(0, tile_expert, grad.contiguous().to(ctx.param_dtype)), None, None, None


# ----------------------------------------------------------------------------- the experts' FFN

def keeps_weight_copies(device):
    """Whether the experts keep a copy of their weights in the compute dtype from one use to the next
    (FusedExpertLinear.weight_in). On CPUs a cast of a 64-expert layer's weights takes about a tenth of the time of
    their products and memory is plentiful: the copy is kept. On accelerators a cast is a few hundredths of a
    percent of a step and memory is what runs out (run_enwik8_base_moe.sh's model would keep 1.6 GB of bf16 copies):
    each use casts afresh, and no cast copy lives from the forward to the backward."""
    return torch.device(device).type == 'cpu'


class FusedExpertLinear(nn.Module):
    """num_expert linear maps in one tensor, as FastMoE's FMoELinear: weight [E, out, in], bias [E, out]."""

    def __init__(self, num_expert, in_feat, out_feat, bias=True):
        super().__init__()
        self.num_expert, self.in_feat, self.out_feat = num_expert, in_feat, out_feat
        self.weight = nn.Parameter(torch.empty(num_expert, out_feat, in_feat))
        self.bias = nn.Parameter(torch.zeros(num_expert, out_feat)) if bias else None
        # As FMoELinear: kaiming_uniform_ on the 3-D tensor (so its fan-in is out*in), bias zero.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self._weight_copy = None   # (key, copy): weight_in's copy of the weight in another dtype

    def weight_in(self, dtype):
        """The weight for products in `dtype`, outside autograd: the parameter itself; or where copies are kept
        (keeps_weight_copies: CPUs), its copy in `dtype`, cast once and reused until the parameter changes; else
        None (the products cast it at each use). Under autocast the experts' weights are the largest tensors the
        layer reads; with the copy, one cast per optimizer step (and none per gradient-accumulation chunk or
        evaluation batch) replaces a cast in every forward and another in every backward. The copy (half the fp32
        weight's size) stays with the module between steps and is never saved.

        "Changes" as autograd sees a saved tensor change: a new version (any in-place write: an optimizer step,
        load_state_dict, copy_ under no_grad) or new storage (to(), `.data = `). Like autograd, it cannot see a
        write through `.data`, which bypasses the version counter; call drop_weight_copy() after one."""
        weight = self.weight
        if weight.dtype == dtype:
            return weight.detach()
        if torch.compiler.is_compiling() or not keeps_weight_copies(weight.device):
            return None
        key = (dtype, weight.device, weight._version, weight.data_ptr(), torch.is_inference_mode_enabled())
        if self._weight_copy is None or self._weight_copy[0] != key:
            self._weight_copy = None   # free the old copy before making the new one
            with torch.no_grad():
                self._weight_copy = (key, weight.to(dtype))
        return self._weight_copy[1]

    def drop_weight_copy(self):
        """Forget weight_in's copy (after a write through `.data`, or to free its memory)."""
        self._weight_copy = None

    def weight_copy_bytes(self):
        """The memory weight_in's kept copy takes (0 when none is kept)."""
        return 0 if self._weight_copy is None else self._weight_copy[1].nbytes

    def forward(self, rows, plan, path):
        """rows [M, in] sorted by expert -> [M, out]; path 'grouped_mm' or 'slices' (see expert_path)."""
        if path == 'grouped_mm':
            offs = torch.cumsum(plan.counts, 0).to(torch.int32)
            return GroupedLinear.apply(rows, self.weight, self.weight_in(rows.dtype), self.bias, offs, plan.expert,
                                       plan.padded)
        weight = self.weight.to(rows.dtype)
        bias = None if self.bias is None else self.bias.to(rows.dtype)
        # unbind/split have cheap backwards (stack/cat), unlike indexing weight[e] per expert
        biases = [None] * self.num_expert if bias is None else bias.unbind(0)
        outs = [F.linear(x_e, w_e, b_e)
                for x_e, w_e, b_e in zip(rows.split(plan.counts_host), weight.unbind(0), biases)]
        return torch.cat(outs)

    def tiled(self, x, tile_expert):
        """x [n_tiles, tile, in] -> [n_tiles, tile, out], tile t through expert tile_expert[t]'s map: one batched
        product on each tile's copy of its expert's weight (TileCopies)."""
        w = TileCopies.apply(self.weight, self.weight_in(x.dtype), tile_expert, x.dtype).transpose(1, 2)
        if self.bias is None:
            return torch.bmm(x, w)
        return torch.baddbmm(TileCopies.apply(self.bias, None, tile_expert, x.dtype).unsqueeze(1), x, w)

    def keep_experts(self, start, stop):
        """Keep experts [start, stop) only (new parameters holding their weights): an expert-parallel shard."""
        self.num_expert = stop - start
        self.weight = nn.Parameter(self.weight.detach()[start:stop].clone())
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias.detach()[start:stop].clone())

    def extra_repr(self):
        return (f'num_expert={self.num_expert}, in_features={self.in_feat}, '
                f'out_features={self.out_feat}, bias={self.bias is not None}')


class ExpertFFN(nn.Module):
    """The experts' two-layer FFN, htoh4 -> activation -> h4toh, on rows grouped by expert."""

    def __init__(self, num_expert, d_model, d_hidden, activation):
        super().__init__()
        self.htoh4 = FusedExpertLinear(num_expert, d_model, d_hidden)
        self.h4toh = FusedExpertLinear(num_expert, d_hidden, d_model)
        self.activation = activation

    def forward(self, rows, plan, path):
        """rows [M, d_model] sorted by expert (dispatch's plan) -> [M, d_model]; path from expert_path."""
        if path == 'tiles':
            return self.tiled(rows, plan)
        hidden = self.activation(self.htoh4(rows, plan, path))
        return self.h4toh(hidden, plan, path)

    def tiled(self, rows, plan):
        """The FFN on the tiled layout: the rows are scattered into their tiles once, go through both maps there
        (a padding row computes activation(bias) and is never read back, so it gets no gradient), and are
        gathered back; rows with no expert (padded dispatch) read the spare zero row."""
        t = tiling(plan, self.htoh4.num_expert, tile_rows(rows.shape[0], self.htoh4.num_expert))
        n_tiles = t.expert.numel()
        x = rows.new_zeros(n_tiles * t.tile + 1, rows.shape[1]).index_copy(0, t.slot, rows)
        hidden = self.activation(self.htoh4.tiled(x[:-1].view(n_tiles, t.tile, -1), t.expert))
        out = self.h4toh.tiled(hidden, t.expert).reshape(n_tiles * t.tile, -1)
        return F.pad(out, (0, 0, 0, 1)).index_select(0, t.slot)


# ----------------------------------------------------------------------------- the layer

def check_expert_backend(expert_backend):
    if expert_backend not in EXPERT_BACKENDS:
        raise ValueError(f'expert_backend must be one of {", ".join(EXPERT_BACKENDS)}, got {expert_backend!r}')


def _top_k_fits(top_k, config):
    if not 1 <= top_k <= config.num_expert:
        return 'must be between 1 and {num_expert}'
    routes = {'gshard': 2, 'switch': 1}.get(config.gate)
    if routes is not None and top_k != routes:
        return f'{{gate}} routes to exactly {routes} expert{"s" if routes > 1 else ""}'
    return None


@dataclass(frozen=True)
class MoEConfig:
    """A Mixture-of-Experts feed-forward's options (FastMoE's, and the newer gates'), checked when made.
    The model keeps them as ModelConfig.moe_options (its keywords and checkpoints spell them moe_top_k, ...)."""
    num_expert: int = option(64, 'number of experts in MoE', '--moe-num-expert', positive)
    top_k: int = option(2, 'top_k experts in hard gate of moe', '--moe-top-k', _top_k_fits)
    gate: str = option('naive', "FastMoE's gates (naive, gshard, switch, noisy) or auxfree: DeepSeek-V3's "
                       'loss-free balancing bias', '--moe-gate',
                       lambda v, c: None if v in GATES else 'unknown gate; known: ' + ', '.join(GATES),
                       choices=GATES)
    capacity_factor: float = option(1.2, 'expert capacity factor in training (gshard/switch)',
                                    '--moe-capacity-factor', finite_positive)
    eval_capacity_factor: float = option(2.4, 'expert capacity factor in evaluation',
                                         '--moe-eval-capacity-factor', finite_positive)
    balance_coef: float = option(0.01, 'weight of the load-balance loss', '--moe-balance-coef',
                                 finite_at_least_zero)
    zloss_coef: float = option(0.0, 'weight of the router z-loss', '--moe-zloss-coef', finite_at_least_zero)
    gate_bias: bool = option(True, 'router logits without a bias (naive/gshard/switch/auxfree)',
                             '--moe-no-gate-bias', negated=True)
    switch_eps: float = option(0.1, "the switch gate's jitter: uniform noise in [1-eps, 1+eps], eps in [0, 1)",
                               '--moe-switch-eps', probability)
    random_routing: bool = option(True, 'gshard gate: always keep the 2nd expert (no random routing in '
                                  'training)', '--moe-no-random-routing', negated=True)
    shared_expert: int = option(0, 'N always-active shared experts beside the routed ones: a dense FFN of N x '
                                '--d_inner', '--moe-shared-expert', at_least_zero)
    every: int = option(1, 'a Mixture of Experts in every N-th layer (layers N-1, 2N-1, ...), dense feed-forwards '
                        'in the others (GShard and the Switch Transformer use 2)', '--moe-every', positive)

    def __post_init__(self):
        check_options(self)

    @property
    def capacity(self):
        """(training, evaluation) capacity factors, as the gates take them."""
        return (self.capacity_factor, self.eval_capacity_factor)


def _make_gate(d_model, config):
    if config.gate == 'gshard':
        return GShardGate(d_model, config.num_expert, config.top_k, config.capacity, config.random_routing,
                          config.gate_bias)
    if config.gate == 'switch':
        return SwitchGate(d_model, config.num_expert, config.top_k, config.switch_eps, config.capacity,
                          config.gate_bias)
    if config.gate == 'noisy':
        return NoisyGate(d_model, config.num_expert, config.top_k)   # FastMoE's has no bias
    if config.gate == 'auxfree':
        return AuxFreeGate(d_model, config.num_expert, config.top_k, config.gate_bias)
    return NaiveGate(d_model, config.num_expert, config.top_k, config.gate_bias)


def _capacity_pair(capacity_factor):
    """FastMoE's capacity_factor argument, a (training, evaluation) pair, as two numbers (or a ConfigError)."""
    try:
        train, evaluation = (float(c) for c in capacity_factor)
    except (TypeError, ValueError):
        raise ConfigError('capacity_factor must be two positive numbers (training, eval), '
                          f'got {capacity_factor!r}') from None
    return train, evaluation


class SharedExpert(nn.Module):
    """Always-active experts (DeepSeekMoE, Qwen-MoE): a dense FFN of n_shared x the expert width,
    beside the routed experts; every token goes through it with weight 1."""

    def __init__(self, d_model, d_hidden, activation):
        super().__init__()
        self.htoh4 = nn.Linear(d_model, d_hidden)
        self.h4toh = nn.Linear(d_hidden, d_model)
        self.activation = activation

    def forward(self, x):
        return self.h4toh(self.activation(self.htoh4(x)))


class FMoETransformerMLP(nn.Module):
    """MoE branch of a Transformer FFN block: [..., d_model] -> ([..., d_model], MoEStats).

    The mixture alone (no residual, no norm), and the routing statistics of this call: the balance and
    z-losses (in the graph, for the training loss) and each expert's load and the dropped copies.
    ``expert_backend`` picks the expert compute: 'auto' (expert_path's rule), 'grouped_mm', 'tiles' or
    'slices'. ``shared_expert`` N > 0 adds ``shared_expert``, a dense FFN of N * d_hidden that every token
    goes through beside its routed experts. ``shard(exchange)`` makes the layer one process's part of an
    expert-parallel layer (run.distributed). The options are FastMoE's keywords (num_expert, top_k, gate,
    capacity_factor as a (training, evaluation) pair, ...) or one MoEConfig, `config`; either way they are
    checked once, by MoEConfig.
    """

    def __init__(self, num_expert=None, d_model=None, d_hidden=None, activation=None, top_k=MoEConfig.top_k,
                 gate=MoEConfig.gate, capacity_factor=MoEConfig().capacity, gate_bias=MoEConfig.gate_bias,
                 switch_eps=MoEConfig.switch_eps, random_routing=MoEConfig.random_routing,
                 shared_expert=MoEConfig.shared_expert, expert_backend='auto', config=None):
        super().__init__()
        if config is None:   # FastMoE's keywords; a MoEConfig given as config stands for all of them
            train_capacity, eval_capacity = _capacity_pair(capacity_factor)
            config = MoEConfig(num_expert=num_expert, top_k=top_k, gate=gate, capacity_factor=train_capacity,
                               eval_capacity_factor=eval_capacity, gate_bias=gate_bias, switch_eps=switch_eps,
                               random_routing=random_routing, shared_expert=shared_expert)
        check_expert_backend(expert_backend)
        for name, value in (('d_model', d_model), ('d_hidden', d_hidden)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f'{name} must be an integer >= 1, got {value!r}')
        self.num_expert, self.d_model, self.d_hidden, self.top_k = config.num_expert, d_model, d_hidden, config.top_k
        self.gate_type = config.gate
        self.gate = _make_gate(d_model, config)
        # FastMoE's default activation, a module of this layer's own (a default instance would be shared)
        activation = nn.GELU() if activation is None else activation
        self.experts = ExpertFFN(config.num_expert, d_model, d_hidden, activation)
        self.shared_expert = (SharedExpert(d_model, config.shared_expert * d_hidden, activation)
                              if config.shared_expert else None)
        self.expert_backend = expert_backend
        self.exchange = None   # see shard
        self.register_load_state_dict_pre_hook(_fuse_per_expert_layout)

    def shard(self, exchange):
        """Keep only experts [start, stop) = exchange.local_range (run.distributed.ExpertParallel): the
        forward then sends each row to its expert's process with exchange.run, between dispatch and combine.
        The gate still routes over all num_expert experts."""
        start, stop = exchange.local_range
        self.experts.htoh4.keep_experts(start, stop)
        self.experts.h4toh.keep_experts(start, stop)
        self.exchange = exchange
        return self

    def forward(self, inp):
        if inp.shape[-1] != self.d_model:
            raise ValueError(f'MoE input must end in d_model={self.d_model}, got shape {tuple(inp.shape)}')
        x = inp.reshape(-1, self.d_model)
        if x.shape[0] == 0:
            return torch.zeros_like(inp), self._empty_stats(inp.device)
        compute_dtype = (torch.get_autocast_dtype(x.device.type)
                         if torch.is_autocast_enabled(x.device.type) else x.dtype)

        routing = self.gate(x)
        path = self._expert_path(x.device, compute_dtype)
        # The exchange reads the counts it needs in its own host sync.
        plan = dispatch(routing, self.num_expert, need_host_counts=path == 'slices' and self.exchange is None)
        rows = x.to(compute_dtype).index_select(0, plan.token)   # cast the N rows, not the N*k
        if self.exchange is None:
            rows_out = self.experts(rows, plan, path)
        else:
            rows_out = self.exchange.run(self.experts, rows, plan, path)
        out = combine(rows_out, routing.score, plan)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        return out.to(inp.dtype).reshape(inp.shape), self._stats(routing, plan)

    def _expert_path(self, device, dtype):
        """'grouped_mm', 'tiles' or 'slices': expert_path's rule for this layer's backend and widths."""
        return expert_path(self.expert_backend, device, dtype, (self.d_model, self.d_hidden))

    @staticmethod
    def _stats(routing, plan):
        return MoEStats(routing.balance_loss, routing.logits, plan.counts.detach(), routing.dropped.detach())

    def _empty_stats(self, device):
        return MoEStats(torch.zeros((), device=device), torch.zeros(0, self.num_expert, device=device),
                        torch.zeros(self.num_expert, dtype=torch.long, device=device),
                        torch.zeros((), dtype=torch.long, device=device))


def _fuse_per_expert_layout(module, state_dict, prefix, local_metadata, strict, missing_keys,
                            unexpected_keys, error_msgs):
    """Load-state-dict pre-hook: FastMoE >= 1.0.1 saves `experts.{i}.htoh4.weight` [1, out, in]
    per expert; stack those into this layer's fused `experts.htoh4.weight` [E, out, in]."""
    for lin_name in ('htoh4', 'h4toh'):
        lin = getattr(module.experts, lin_name)
        for param_name in ('weight', 'bias'):
            param = getattr(lin, param_name)
            per_expert = [f'{prefix}experts.{i}.{lin_name}.{param_name}' for i in range(module.num_expert)]
            present = [k for k in per_expert if k in state_dict]
            if not present:
                continue
            fused = f'{prefix}experts.{lin_name}.{param_name}'
            if len(present) != len(per_expert) or fused in state_dict or param is None:
                error_msgs.append(
                    f'{fused}: per-expert layout has {len(present)} of {len(per_expert)} experts'
                    + (' and the fused key too' if fused in state_dict else '')
                    + ('; this layer has no such parameter' if param is None else '')
                    + '; save the state dict from a layer with the same num_expert')
                continue
            slices = [state_dict.pop(k) for k in per_expert]
            if any(s.numel() != param[0].numel() for s in slices):
                error_msgs.append(f'{fused}: per-expert tensors of shape {tuple(slices[0].shape)} '
                                  f'do not match this layer\'s {tuple(param.shape[1:])} per expert')
                continue
            state_dict[fused] = torch.stack([s.reshape(param.shape[1:]) for s in slices])
