"""Training tokens/s on 1 and 2 CPU processes (gloo): dense DDP, MoE with DDP, MoE with expert parallelism,
and the time an expert-parallel step spends in all_to_all.

    python bench/bench_scaling.py [--steps 20] [--batch_size 8] [--threads 1] [--out bench_scaling.json]

Each process uses --threads threads, so 2 processes use twice the cores of 1: the ratio shows what the exchange
and the gradient all-reduce cost on top of that. Every configuration trains the same model on the same global
batch (random tokens); figures are wall-clock on rank 0 after warm-up steps. On a shared machine compare the
ratios within one run. Writes the table as JSON (--out) too.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from run.distributed import exit_process  # noqa: E402

CONFIGS = [  # (name, processes, moe, expert parallel)
    ('dense', 1, False, False),
    ('dense DDP', 2, False, False),
    ('moe', 1, True, False),
    ('moe DDP', 2, True, False),
    ('moe expert-parallel', 2, True, True),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--steps', type=int, default=20, help='timed steps per configuration')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--batch_size', type=int, default=8, help='global batch (columns)')
    p.add_argument('--tgt_len', type=int, default=64)
    p.add_argument('--n_layer', type=int, default=4)
    p.add_argument('--d_model', type=int, default=128)
    p.add_argument('--d_inner', type=int, default=256)
    p.add_argument('--num_expert', type=int, default=8)
    p.add_argument('--threads', type=int, default=1, help='torch threads per process')
    p.add_argument('--out', default='bench_scaling.json')
    p.add_argument('--worker', nargs=2, metavar=('MOE', 'EXPERT_PARALLEL'), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- one rank

def worker(args, moe, expert_parallel):
    import torch
    import mem_transformer
    import torch.distributed
    from run.distributed import Dist

    # The experts' all_to_all exchanges (forward and backward), timed where run.distributed calls them.
    exchanges = {'seconds': 0., 'calls': 0}
    all_to_all = torch.distributed.all_to_all_single

    def timed_all_to_all(*args_, **kwargs):
        start = time.perf_counter()
        work = all_to_all(*args_, **kwargs)   # a handle with async_op=True: returned as the wrapped call's
        exchanges['seconds'] += time.perf_counter() - start
        exchanges['calls'] += 1
        return work
    torch.distributed.all_to_all_single = timed_all_to_all

    torch.set_num_threads(args.threads)
    d = Dist.from_env(cuda=False, expert_parallel=expert_parallel, timeout_s=300)
    torch.manual_seed(0)
    n_token = 256
    model = mem_transformer.MemTransformerLM(
        n_token, args.n_layer, 4, args.d_model, args.d_model // 4, args.d_inner, 0., 0., tgt_len=args.tgt_len,
        mem_len=args.tgt_len, moe=moe, moe_num_expert=args.num_expert, moe_top_k=2)
    d.shard_experts(model)
    forward = d.wrap(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    data = torch.randint(n_token, (args.tgt_len + 1, args.batch_size), generator=torch.Generator().manual_seed(1))
    inp, target = d.local(data[:-1]), d.local(data[1:])
    weight = d.loss_weight(args.batch_size)
    mems = []

    def step():
        nonlocal mems
        optimizer.zero_grad(set_to_none=True)
        ret, moe_stats = forward(inp, target, *mems, return_moe_stats=True)
        mems = ret[1:]
        (ret[0].float().mean() * weight + model.aux_loss(moe_stats)).backward()
        d.finish_grads(model)
        d.clip_grad_norm_(list(model.parameters()), 0.25)
        optimizer.step()

    for _ in range(args.warmup):
        step()
    d.barrier()
    exchanges.update(seconds=0., calls=0)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    d.barrier()
    elapsed = time.perf_counter() - start
    exchange = float(d.mean(torch.tensor(exchanges['seconds'])))
    if d.is_main:
        print(json.dumps({'tokens_per_s': args.steps * args.tgt_len * args.batch_size / elapsed,
                          'ms_per_step': 1000 * elapsed / args.steps,
                          'all_to_all_ms_per_step': 1000 * exchange / args.steps,
                          'all_to_all_calls_per_step': exchanges['calls'] / args.steps}))
    d.leave(0)   # under torchrun the process ends here, while this frame holds the model (Dist.leave)


# ----------------------------------------------------------------------------- launcher

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_config(args, nproc, moe, expert_parallel):
    argv = [sys.executable, __file__, '--worker', str(int(moe)), str(int(expert_parallel))]
    argv += [f'--{k}={getattr(args, k)}' for k in ('steps', 'warmup', 'batch_size', 'tgt_len', 'n_layer', 'd_model',
                                                   'd_inner', 'num_expert', 'threads')]
    port = free_port()
    procs = []
    try:
        for rank in range(nproc):
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
            if nproc > 1:
                env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), MASTER_ADDR='127.0.0.1',
                           MASTER_PORT=str(port))
            else:
                env.pop('WORLD_SIZE', None)
            procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outputs = [p.communicate(timeout=1800) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outputs):
        if p.returncode:
            raise SystemExit(f'bench_scaling: a worker failed:\n{err[-2000:]}')
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker(args, args.worker[0] == '1', args.worker[1] == '1')
        return
    if args.batch_size < 2 or args.num_expert % 2:
        raise SystemExit('bench_scaling: --batch_size must be at least 2 and --num_expert even (2 processes)')
    rows = []
    base = {}
    print(f'{"configuration":<22} {"procs":>5} {"tokens/s":>10} {"ms/step":>9} {"speed-up":>9} '
          f'{"all_to_all ms/step":>19}')
    for name, nproc, moe, expert_parallel in CONFIGS:
        result = run_config(args, nproc, moe, expert_parallel)
        if nproc == 1:
            base[moe] = result['tokens_per_s']
        result.update(configuration=name, processes=nproc, speedup=result['tokens_per_s'] / base[moe])
        rows.append(result)
        print(f'{name:<22} {nproc:>5} {result["tokens_per_s"]:>10.0f} {result["ms_per_step"]:>9.1f} '
              f'{result["speedup"]:>8.2f}x {result["all_to_all_ms_per_step"]:>19.2f}', flush=True)
    report = {'settings': {k: v for k, v in vars(args).items() if k not in ('worker', 'out')}, 'results': rows}
    tmp = args.out + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, args.out)
    print(f'Wrote {args.out}')


if __name__ == '__main__':
    exit_process(main() or 0)
