"""Peak resident memory of a training step, with and without --batch_chunk 2.

Each row runs in a fresh Python process that builds the model (bench/steps.py's
TrainStep: MemTransformerLM, Adam, a full memory) and takes --steps optimizer
steps; the figure is that process's peak resident set size (resource-based, not
tracemalloc, so it sees every allocator, torch's included): Linux's VmHWM, or
getrusage's ru_maxrss elsewhere (see maxrss_mib). `before steps` is the same high-water mark after imports and model
construction, so the difference is what the steps add: activations, gradients,
Adam's moments, the memory tensors.

    python bench/bench_memory.py [--quick] [--json out.json]
"""
import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

from timing import describe, machine, write_json

CONFIG_NAMES = ('cpu-dense', 'enwik8-base')
CHUNKS = (1, 2)


def maxrss_mib():
    """This process's peak resident set size: VmHWM where Linux has it, else ru_maxrss.

    A child's ru_maxrss starts at its parent's resident size at fork (Linux keeps
    it across exec), so a large parent would hide the child's own peak; VmHWM
    belongs to the address space exec made, and starts afresh.
    """
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 2 ** 10
    except OSError:
        pass
    kib_or_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib_or_bytes / (2 ** 20 if sys.platform == 'darwin' else 2 ** 10)


def child(config_name, dtype, batch_chunk, steps):
    """In the fresh process: build, measure, step, measure; print one JSON line."""
    from steps import CONFIGS, TrainStep
    step = TrainStep(CONFIGS[config_name], dtype, batch_chunk=batch_chunk)
    before = maxrss_mib()
    for _ in range(steps):
        step()
    print(json.dumps(dict(before_mib=before, peak_mib=maxrss_mib())))


def measure(config_name, dtype, batch_chunk, steps, threads=None):
    cmd = [sys.executable, str(Path(__file__).resolve()), '--child', config_name, dtype, str(batch_chunk),
           '--steps', str(steps)] + (['--threads', str(threads)] if threads else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f'memory child {config_name} {dtype} chunk {batch_chunk} failed:\n{res.stderr[-2000:]}')
    figures = json.loads(res.stdout.strip().splitlines()[-1])
    return dict(config=config_name, dtype=dtype, batch_chunk=batch_chunk, steps=steps, **figures,
                step_mib=figures['peak_mib'] - figures['before_mib'])


def run(config_names, dtypes, steps=2, threads=None):
    return [measure(name, dtype, chunk, steps, threads)
            for name in config_names for dtype in dtypes for chunk in CHUNKS]


def print_rows(rows):
    print(f"{'config':>12} {'dtype':>5} {'chunks':>6} {'peak MiB':>9} {'before steps':>12} {'steps add':>9}")
    for r in rows:
        print(f"{r['config']:>12} {r['dtype']:>5} {r['batch_chunk']:>6} {r['peak_mib']:>9.0f} "
              f"{r['before_mib']:>12.0f} {r['step_mib']:>9.0f}")
    print('peak MiB: peak RSS (VmHWM) of a fresh process that built the model and took the steps')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--configs', nargs='+', choices=CONFIG_NAMES, default=list(CONFIG_NAMES))
    p.add_argument('--dtypes', nargs='+', choices=('fp32', 'bf16'), default=['fp32', 'bf16'])
    p.add_argument('--steps', type=int, default=2, help='optimizer steps per process')
    p.add_argument('--quick', action='store_true', help='the CPU-sized model only')
    p.add_argument('--threads', type=int, help='torch intra-op threads (default: all cores)')
    p.add_argument('--json', metavar='PATH', help='also write the figures as JSON')
    p.add_argument('--child', nargs=3, metavar=('CONFIG', 'DTYPE', 'CHUNKS'), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f'--steps must be >= 1, got {args.steps}')
    if args.threads is not None and args.threads < 1:
        p.error(f'--threads must be >= 1, got {args.threads}')
    if args.json and not Path(args.json).resolve().parent.is_dir():
        p.error(f'--json {args.json}: directory {Path(args.json).resolve().parent} does not exist')
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.child:
        config_name, dtype, chunks = args.child
        child(config_name, dtype, int(chunks), args.steps)
        return
    print(describe(machine()))
    rows = run(['cpu-dense'] if args.quick else args.configs, args.dtypes, args.steps, args.threads)
    print_rows(rows)
    if args.json:
        write_json(args.json, dict(machine=machine(), rows=rows))


if __name__ == '__main__':
    main()
