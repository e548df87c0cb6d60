"""What the benchmark scripts share: side-by-side timing, the matrix-product peak,
the machine's description, atomic JSON output."""
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / 'samples' / 'enwik8-sample.zip'   # real text, for the bf16 loss check
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class Timings(dict):
    """The median seconds of each step (the values), with every repeat's time kept: a ratio of two medians can
    hide repeats that disagree, which ratio_range shows."""

    def __init__(self, repeats):
        super().__init__({name: statistics.median(ts) for name, ts in repeats.items()})
        self.repeats = repeats

    def scaled(self, factor):
        return Timings({name: [factor * t for t in ts] for name, ts in self.repeats.items()})

    def ratio_range(self, num, den):
        """[min, max] over the repeats of num's time / den's time, each taken in the same repeat."""
        ratios = [a / b for a, b in zip(self.repeats[num], self.repeats[den])]
        return [min(ratios), max(ratios)]


def time_side_by_side(steps, repeats, warmup=2):
    """Median seconds per call of each of `steps` (name -> callable), as Timings.

    The callables take turns within every repeat, so a load burst from another
    process on a shared machine slows them alike and their ratios stay honest.
    """
    times = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return Timings(times)


def matmul_products(n=2048):
    """Callables computing an n x n x n matrix product in fp32 and in bf16, and its FLOPs.

    Benchmarks time them side by side with their own steps, so that the peak a
    step is compared with was measured under the same machine load."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    a16, b16 = a.bfloat16(), b.bfloat16()
    return {'fp32': lambda: a @ b, 'bf16': lambda: a16 @ b16}, 2 * n ** 3


def matmul_peak(repeats=10, n=2048):
    """Measured TFLOP/s of an n x n x n matrix product in fp32 and in bf16."""
    products, flops = matmul_products(n)
    return {dtype: flops / s / 1e12 for dtype, s in time_side_by_side(products, repeats).items()}


def machine():
    """The facts a reader needs to compare these figures with their own."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name') and cpu in ('', 'x86_64', platform.machine()):
                    cpu = line.split(':', 1)[1].strip()
                elif line.startswith('flags'):
                    flags = set(line.split(':', 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile') if f in flags]
    return dict(cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(), isa=isa,
                torch=torch.__version__, python=platform.python_version(),
                cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None)


def describe(m):
    isa = ', '.join(m['isa']) or 'no AVX-512/AMX'
    return (f"{m['cpu']}, {m['cores']} cores ({isa}); torch {m['torch']}, {m['threads']} threads, "
            f"Python {m['python']}")


def add_common_args(parser, repeats):
    """The options every benchmark script takes."""
    parser.add_argument('--repeats', type=int, default=repeats, help='timed repeats (median reported)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed repeats first')
    parser.add_argument('--quick', action='store_true', help='a short run: 3 repeats, 1 warm-up')
    parser.add_argument('--threads', type=int, help='torch intra-op threads (default: all cores)')
    parser.add_argument('--json', metavar='PATH', help='also write the figures as JSON')


def check_common_args(parser, args):
    """Reject bad values with a one-line error before anything runs; apply --quick and --threads."""
    for name in ('repeats', 'threads'):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f'--{name} must be >= 1, got {value}')
    if args.warmup < 0:
        parser.error(f'--warmup must be >= 0, got {args.warmup}')
    if args.json and not Path(args.json).resolve().parent.is_dir():
        parser.error(f'--json {args.json}: directory {Path(args.json).resolve().parent} does not exist')
    if args.quick:
        args.repeats, args.warmup = 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)


def write_json(path, payload):
    """Write JSON through a temporary name, so no half-written file is ever left at `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'w') as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
