"""Benchmark of the MoE layer alone: forward + backward at 1024 tokens.

Compares, side by side in one run (variants interleaved in every repeat, so machine load
affects them alike):
  moe          moe.FMoETransformerMLP, expert_backend 'auto' (moe.expert_path's rule: grouped_mm on CPUs); its
               weights do not change between steps, so under bf16 autocast it reads the copy weight_in cast once
  moe-stepped  the same, as in training: the expert weights change before every step (their version moves, as an
               optimizer step moves it), so under bf16 each step casts them once again
  moe-slices   the same layer with the per-expert-slice fallback
  moe-tiles    the same layer on the tiles (what 'auto' takes on GPUs for fp32/TF32 and fp16)
  floor        the experts' matrix products alone (the six of one forward+backward, weights already in the
               compute dtype) at the routing counts the layer's gate gives this input: the limit the layer
               can reach, so 'x floor' says how far from it the rest of the layer keeps it
  dense        a dense FFN with the same active FLOPs (d_inner = top_k * d_hidden)
  loop         a straightforward per-expert loop (`for e in range(E): idx = where(...)`)
  moe-no-bias  the MoE layer with its experts' biases removed (another function: what they cost)
  mixtral-*    transformers' Mixtral MoE block at equal FLOPs, its grouped_mm and eager experts
               (when transformers is installed; an optional benchmark-only dependency)
in fp32 and under bf16 autocast. Time: median of --repeats runs after --warmup runs.
Peak memory: resource-based, the growth of the peak resident set size (VmHWM, reset through
/proc/self/clear_refs) over one forward+backward, measured in a fresh subprocess per row.

    python bench/bench_moe.py [--experts 8 16 64] [--json bench_moe.json]
                              [--threads N]

On a shared machine prefer --threads 1: with 2 threads every parallel region waits for a core
another process holds, which punishes the layers with many small ops (moe, loop) most.
glibc's malloc is tuned as train.py tunes it (utils/malloc.py; TXL_MALLOC_DEFAULTS=1 keeps its defaults).
"""
import argparse
import ctypes
import gc
import os
import platform
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from report import mixtral_skipped, moe_target_lines, transformers_version  # noqa: E402
from timing import time_side_by_side, write_json  # noqa: E402
from utils import malloc  # noqa: E402
from moe import FMoETransformerMLP, FusedExpertLinear, grouped_mm, grouped_mm_available, sort_by_expert  # noqa: E402

VARIANTS = ('moe', 'moe-stepped', 'moe-slices', 'moe-tiles', 'dense', 'loop')
# transformers' Mixtral experts, when transformers is installed (an optional, benchmark-only dependency)
MIXTRAL_VARIANTS = ('mixtral-grouped_mm', 'mixtral-eager')
DTYPES = {'fp32': None, 'bf16': torch.bfloat16}
MOE_VARIANTS = ('moe', 'moe-stepped', 'moe-slices', 'moe-tiles')   # the loop's function (check_same_output)


class MixtureOnly(nn.Module):
    """The MoE layer's output without its routing statistics, as the other variants return. `stepped`: the expert
    weights count as changed before every call (their version counter moves, as an optimizer step's in-place update
    moves it, without touching their values), so the layer makes its bf16 copy of them afresh."""

    def __init__(self, moe, stepped=False):
        super().__init__()
        self.moe, self.stepped = moe, stepped

    def forward(self, x):
        if self.stepped:
            for linear in (self.moe.experts.htoh4, self.moe.experts.h4toh):
                torch.autograd.graph.increment_version(linear.weight)
        return self.moe(x)[0]


class LoopMoE(nn.Module):
    """The per-expert loop most MoE code uses, on the MoE layer's own gate and weights."""

    def __init__(self, moe):
        super().__init__()
        self.gate, self.top_k = moe.gate.gate, moe.top_k
        self.experts = nn.ModuleList()
        ex = moe.experts
        for e in range(moe.num_expert):
            first, second = nn.Linear(moe.d_model, moe.d_hidden), nn.Linear(moe.d_hidden, moe.d_model)
            with torch.no_grad():
                first.weight.copy_(ex.htoh4.weight[e]), first.bias.copy_(ex.htoh4.bias[e])
                second.weight.copy_(ex.h4toh.weight[e]), second.bias.copy_(ex.h4toh.bias[e])
            self.experts.append(nn.Sequential(first, nn.ReLU(), second))

    def forward(self, x):
        top_logits, expert = torch.topk(self.gate(x), self.top_k, dim=-1)
        score = F.softmax(top_logits, dim=-1)
        out = torch.zeros_like(x)
        for e, ffn in enumerate(self.experts):
            token, slot = torch.where(expert == e)
            y = ffn(x[token]) * score[token, slot, None]
            out = out.index_add(0, token, y.to(out.dtype))
        return out


class MixtralBlock(nn.Module):
    """transformers' MixtralSparseMoeBlock (its router, then MixtralExperts with the given implementation) on
    [tokens, d_model] rows, at the MoE layer's FLOPs: a SwiGLU expert of width w costs 3 d_model w
    multiply-adds a row, the MoE layer's (two linear maps through d_hidden) 2 d_model d_hidden, so
    w = 2/3 d_hidden, rounded down to a multiple of 16 for grouped_mm's alignment (at most 16 fewer)."""

    def __init__(self, num_expert, args, implementation):
        super().__init__()
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        config = MixtralConfig(hidden_size=args.d_model, intermediate_size=mixtral_width(args.d_hidden),
                               num_local_experts=num_expert, num_experts_per_tok=args.top_k,
                               router_jitter_noise=0.0)
        config._experts_implementation = implementation
        self.block = MixtralSparseMoeBlock(config)
        for p in self.block.parameters():   # its weights are torch.empty until a model initialises them
            nn.init.normal_(p, std=config.initializer_range)

    def forward(self, x):
        return self.block(x.unsqueeze(0)).squeeze(0)


def mixtral_width(d_hidden):
    return 2 * d_hidden // 3 // 16 * 16


def mixtral_available():
    """Whether transformers is installed with Mixtral experts that have a grouped_mm implementation."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        from transformers.models.mixtral import modeling_mixtral
    except ImportError:
        return False
    return 'grouped_mm' in ALL_EXPERTS_FUNCTIONS and hasattr(modeling_mixtral, 'MixtralExperts')


def variants(chosen=None):
    """The variants to time: `chosen` (None: all) of those this machine runs; 'moe' and 'dense' always, as every
    row's ratios read them."""
    available = VARIANTS + ('moe-no-bias',) + (MIXTRAL_VARIANTS if mixtral_available() else ())
    return tuple(v for v in available if chosen is None or v in chosen or v in ('moe', 'dense'))


def build(variant, num_expert, args):
    torch.manual_seed(0)
    if variant in MIXTRAL_VARIANTS:
        return MixtralBlock(num_expert, args, variant.split('-', 1)[1])
    backend = {'moe-slices': 'slices', 'moe-tiles': 'tiles'}.get(variant, 'auto')
    moe = FMoETransformerMLP(num_expert, args.d_model, args.d_hidden, activation=nn.ReLU(), top_k=args.top_k,
                             expert_backend=backend)
    if variant == 'dense':
        d_inner = args.top_k * args.d_hidden
        return nn.Sequential(nn.Linear(args.d_model, d_inner), nn.ReLU(),
                             nn.Linear(d_inner, args.d_model))
    if variant == 'loop':
        return LoopMoE(moe)
    if variant == 'moe-no-bias':   # not the same function: what the experts' biases cost
        moe.experts.htoh4.bias = moe.experts.h4toh.bias = None
    return MixtureOnly(moe, stepped=variant == 'moe-stepped')


def step_data(args):
    """The input rows and the output gradient every variant's step uses."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(args.tokens, args.d_model, generator=gen), torch.randn(args.tokens, args.d_model, generator=gen)


def step_fn(module, dtype, args):
    """One forward+backward of `module` on fixed data, grads cleared first as zero_grad() does."""
    x, grad = step_data(args)
    x.requires_grad_()

    def clear_grads():
        module.zero_grad(set_to_none=True)
        x.grad = None

    def step():
        clear_grads()
        ctx = torch.autocast('cpu', dtype=dtype) if dtype is not None else nullcontext()
        with ctx:
            out = module(x)
        out.backward(grad.to(out.dtype))
    step.clear_grads = clear_grads
    return step


def floor_step(moe, dtype, args):
    """The floor: the six expert products of one forward+backward of `moe` (an FMoETransformerMLP) and nothing
    else, at the expert counts its gate gives step_data's rows, on weights already in the compute dtype:
      forward   rows @ W1[e].T, hidden @ W2[e].T
      backward  grad_hidden = grad_out @ W2[e], grad_W2[e] = grad_out.T @ hidden (and the same for W1)
    with grouped_mm where the layer uses it (one call per product), else one mm per expert."""
    x = step_data(args)[0]
    with torch.no_grad():
        expert = moe.gate(x).expert.reshape(-1)
    counts = sort_by_expert(expert, moe.num_expert)[2][:moe.num_expert]
    offs, m, dt = torch.cumsum(counts, 0).to(torch.int32), int(counts.sum()), dtype or torch.float32
    gen = torch.Generator().manual_seed(2)
    rows, grad_hidden = (torch.randn(m, w, generator=gen).to(dt) for w in (args.d_model, args.d_hidden))
    hidden, grad_out = (torch.randn(m, w, generator=gen).to(dt) for w in (args.d_hidden, args.d_model))
    w1, w2 = (lin.weight.detach().to(dt) for lin in (moe.experts.htoh4, moe.experts.h4toh))
    if grouped_mm is not None and grouped_mm_available('cpu', dt):
        def step():
            grouped_mm(rows, w1.transpose(1, 2), offs=offs), grouped_mm(hidden, w2.transpose(1, 2), offs=offs)
            grouped_mm(grad_out, w2, offs=offs), grouped_mm(grad_out.t(), hidden, offs=offs)
            grouped_mm(grad_hidden, w1, offs=offs), grouped_mm(grad_hidden.t(), rows, offs=offs)
        return step
    split = counts.tolist()
    groups = list(zip(*(t.split(split) for t in (rows, hidden, grad_out, grad_hidden)), w1.unbind(0), w2.unbind(0)))

    def step():
        for r, h, go, gh, a, b in groups:
            r @ a.t(), h @ b.t(), go @ b, go.t() @ h, gh @ a, gh.t() @ r
    return step


def time_variants(steps, repeats, warmup):
    """Milliseconds of each step, timed side by side (timing.time_side_by_side)."""
    return time_side_by_side(steps, repeats, warmup).scaled(1e3)


def peak_memory_child(variant, num_expert, dtype_name, args):
    """In a fresh process: MiB the peak RSS grows by during one forward+backward, plus the copies of the expert
    weights the layer keeps between steps (moe.FusedExpertLinear.weight_in, under bf16): made in the first step,
    they are in the baseline, and a step that makes them afresh reuses their freed memory, so the growth alone
    would never show them."""
    module = build(variant, num_expert, args)
    step = step_fn(module, DTYPES[dtype_name], args)
    step()                       # one-time allocations (thread pools, kernels) are not the layer's
    step.clear_grads()           # the baseline holds parameters and inputs, not last step's grads
    gc.collect()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)   # return freed heap pages, so reuse is not free
    except OSError:
        pass
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')             # reset VmHWM to the current RSS
    base = _status_kib('VmRSS')
    step()
    kept = sum(m.weight_copy_bytes() for m in module.modules() if isinstance(m, FusedExpertLinear))
    return (_status_kib('VmHWM') - base) / 1024 + kept / 2 ** 20


def _status_kib(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise OSError(f'{field} not in /proc/self/status')


def peak_memory(variant, num_expert, dtype_name, args):
    cmd = [sys.executable, str(Path(__file__).resolve()), '--memory-child', variant,
           str(num_expert), dtype_name] + _shape_flags(args)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return None
    return float(res.stdout.strip().splitlines()[-1])


def cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _shape_flags(args):
    return ['--tokens', str(args.tokens), '--d-model', str(args.d_model),
            '--d-hidden', str(args.d_hidden), '--top-k', str(args.top_k)]


def check_same_output(modules, args):
    """The MoE variants compute the same function; a benchmark of a wrong layer is worthless. Against the loop
    (the loop itself where it is not timed)."""
    x = torch.randn(args.tokens, args.d_model)
    with torch.no_grad():
        ref = (modules['loop'] if 'loop' in modules else LoopMoE(modules['moe'].moe))(x)
        return max((modules[v](x) - ref).abs().max().item() for v in MOE_VARIANTS if v in modules)


def run(args):
    memory_ok = not args.no_memory and Path('/proc/self/clear_refs').exists()
    rows, names, shape = [], variants(args.variants), f'{args.tokens}x{args.d_model}x{args.d_hidden}'
    for num_expert in args.experts:
        modules = {v: build(v, num_expert, args) for v in names}
        max_diff = check_same_output(modules, args)
        for dtype_name in args.dtypes:
            steps = {v: step_fn(m, DTYPES[dtype_name], args) for v, m in modules.items()}
            steps['floor'] = floor_step(modules['moe'].moe, DTYPES[dtype_name], args)
            ms = time_variants(steps, args.repeats, args.warmup)
            for v in names + ('floor',):
                rows.append(dict(
                    shape=shape, experts=num_expert, dtype=dtype_name, variant=v, ms=ms[v],
                    vs_dense=ms[v] / ms['dense'], vs_floor=ms[v] / ms['floor'],
                    loop_speedup=ms['loop'] / ms[v] if 'loop' in ms else None,
                    vs_dense_range=ms.ratio_range(v, 'dense'), vs_floor_range=ms.ratio_range(v, 'floor'),
                    loop_speedup_range=ms.ratio_range('loop', v) if 'loop' in ms else None,
                    vs_mixtral_range=ms.ratio_range(v, 'mixtral-grouped_mm') if 'mixtral-grouped_mm' in ms else None,
                    vs_mixtral=ms[v] / ms['mixtral-grouped_mm'] if 'mixtral-grouped_mm' in ms else None,
                    peak_mib=peak_memory(v, num_expert, dtype_name, args) if memory_ok and v != 'floor' else None,
                    max_abs_diff_vs_loop_fp32=max_diff if v in MOE_VARIANTS else None))
    return rows


def print_table(rows, meta):
    print(f"MoE layer fwd+bwd: {meta['tokens']} tokens, d_model {meta['d_model']}, d_hidden "
          f"{meta['d_hidden']}, top-{meta['top_k']}; median of {meta['repeats']} after "
          f"{meta['warmup']} warm-up; torch {meta['torch']}, {meta['threads']} threads, {meta['cpu']}, "
          f"{meta['malloc']}")
    print(f"grouped_mm available: fp32 {meta['grouped_mm']['fp32']}, bf16 {meta['grouped_mm']['bf16']}")
    if not any(r['vs_mixtral'] for r in rows):
        print(f'mixtral rows skipped: {mixtral_skipped(transformers_version())}')
    print(f"{'experts':>7} {'dtype':>5} {'variant':>18} {'ms':>8} {'x dense':>8} {'x floor':>8} {'loop/x':>7} "
          f"{'x mixtral':>9} {'peak MiB':>9}")
    for r in rows:
        mem = f"{r['peak_mib']:.1f}" if r['peak_mib'] is not None else 'n/a'
        mixtral = f"{r['vs_mixtral']:.2f}" if r['vs_mixtral'] is not None else ''
        loop = f"{r['loop_speedup']:.1f}" if r['loop_speedup'] is not None else ''
        print(f"{r['experts']:>7} {r['dtype']:>5} {r['variant']:>18} {r['ms']:>8.2f} "
              f"{r['vs_dense']:>8.2f} {r['vs_floor']:>8.2f} {loop:>7} {mixtral:>9} {mem:>9}")
    print(f"mixtral: transformers' MixtralSparseMoeBlock, SwiGLU experts of width {meta['mixtral_width']} "
          '(equal FLOPs); its grouped_mm runs in its weights\' fp32 under bf16 autocast')
    print('peak MiB: growth of peak RSS over one fwd+bwd in a fresh process (resource-based), plus the bf16 '
          'expert-weight copies kept between steps; '
          f"1-min load average {meta['loadavg_before']:.2f} before, {meta['loadavg_after']:.2f} after")
    diffs = {r['experts']: r['max_abs_diff_vs_loop_fp32'] for r in rows if r['variant'] == 'moe'}
    print('max |moe - loop| output, fp32: ' + ', '.join(f'{e} experts {d:.1e}' for e, d in diffs.items()))
    for line in moe_target_lines(rows):
        print(line)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--experts', type=int, nargs='+', default=[8, 16, 64])
    p.add_argument('--dtypes', nargs='+', choices=list(DTYPES), default=list(DTYPES))
    p.add_argument('--tokens', type=int, default=1024)
    p.add_argument('--d-model', type=int, default=256)
    p.add_argument('--d-hidden', type=int, default=512)
    p.add_argument('--top-k', type=int, default=2)
    p.add_argument('--variants', nargs='+', choices=VARIANTS + ('moe-no-bias',) + MIXTRAL_VARIANTS,
                   help='time only these (and moe, dense and the floor, which the ratios read); default: all')
    p.add_argument('--repeats', type=int, default=20)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--threads', type=int, default=None,
                   help='torch intra-op threads (default: torch default)')
    p.add_argument('--no-memory', action='store_true', help='skip the peak-memory subprocesses')
    p.add_argument('--json', metavar='PATH', help='also write the rows as JSON here')
    p.add_argument('--memory-child', nargs=3, metavar=('VARIANT', 'EXPERTS', 'DTYPE'),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f'--threads must be >= 1, got {args.threads}')
    for name in ('tokens', 'd_model', 'd_hidden', 'top_k', 'repeats'):
        if getattr(args, name) < 1:
            p.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if args.warmup < 0:
        p.error(f'--warmup must be >= 0, got {args.warmup}')
    bad = [e for e in args.experts if not args.top_k <= e]
    if bad:
        p.error(f'--experts {bad} must each be >= --top-k {args.top_k}')
    if args.json and not Path(args.json).resolve().parent.is_dir():
        p.error(f'--json {args.json}: directory {Path(args.json).resolve().parent} does not exist')
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc_line = malloc.tune() or 'malloc: not glibc, left alone'   # as train.py does at start-up
    if args.memory_child:
        variant, experts, dtype_name = args.memory_child
        print(peak_memory_child(variant, int(experts), dtype_name, args))
        return
    meta = dict(tokens=args.tokens, d_model=args.d_model, d_hidden=args.d_hidden, top_k=args.top_k,
                repeats=args.repeats, warmup=args.warmup, torch=torch.__version__,
                threads=torch.get_num_threads(), malloc=malloc_line, cpu=cpu_name(),
                mixtral_width=mixtral_width(args.d_hidden),
                grouped_mm={name: grouped_mm_available('cpu', dt or torch.float32)
                            for name, dt in DTYPES.items()},
                memory='peak RSS growth (VmHWM after /proc/self/clear_refs reset) over one '
                       'fwd+bwd in a fresh process, MiB')
    meta['loadavg_before'] = os.getloadavg()[0]
    rows = run(args)
    meta['loadavg_after'] = os.getloadavg()[0]   # other work on the machine inflates every row
    print_table(rows, meta)
    if args.json:
        write_json(args.json, dict(meta=meta, rows=rows))


if __name__ == '__main__':
    main()
