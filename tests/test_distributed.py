"""Data and expert parallelism on two CPU processes (gloo): the all_to_all exchange against one process holding
every expert, train.py under torchrun against one process step for step, resume across world sizes, eval.py
under torchrun, and a rank that dies.

Processes listen on 127.0.0.1 on free ports, every launch has a timeout and is killed in a finally. This file is
also the worker script of the exchange tests: `python tests/test_distributed.py exchange ...` under torchrun's
environment variables.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.distributed import Dist, column_range  # noqa: E402

LAUNCH_TIMEOUT_S = 150


# ----------------------------------------------------------------------------- launching

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def worker_env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    env.pop('WORLD_SIZE', None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def stop(procs):
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def launch(argv, nproc=2, timeout=LAUNCH_TIMEOUT_S, kill_rank_after=None):
    """Run `python argv...` as nproc ranks with torchrun's environment variables, without the agent.

    Returns [(returncode, stdout, stderr)] by rank. kill_rank_after=(rank, seconds) SIGKILLs that rank.
    """
    port = free_port()
    procs = []
    try:
        for rank in range(nproc):
            env = worker_env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=nproc, LOCAL_WORLD_SIZE=nproc,
                             MASTER_ADDR='127.0.0.1', MASTER_PORT=port)
            procs.append(subprocess.Popen([sys.executable, *map(str, argv)], env=env, cwd=ROOT, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True))
        if kill_rank_after is not None:
            rank, seconds = kill_rank_after
            time.sleep(seconds)
            os.killpg(procs[rank].pid, signal.SIGKILL)
        deadline = time.time() + timeout
        results = []
        for p in procs:
            out, err = p.communicate(timeout=max(deadline - time.time(), 1))
            results.append((p.returncode, out, err))
        return results
    finally:
        stop(procs)


def torchrun(argv, nproc=2, timeout=LAUNCH_TIMEOUT_S):
    """Run `torchrun --nproc_per_node nproc argv...` (rendezvous on 127.0.0.1); returns (code, stdout, stderr)."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--rdzv-backend', 'c10d',
           '--rdzv-endpoint', f'127.0.0.1:{free_port()}', *map(str, argv)]
    proc = subprocess.Popen(cmd, env=worker_env(), cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    finally:
        stop([proc])


def assert_all_ok(results):
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f'rank {rank} exited {code}:\n{out[-3000:]}\n{err[-3000:]}'


# ----------------------------------------------------------------------------- pure helpers

@pytest.mark.parametrize('bsz,world', [(4, 2), (10, 4), (3, 3), (7, 2)])
def test_columns_cover_the_batch_once_in_order(bsz, world):
    ranges = [column_range(bsz, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == bsz
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_one_process_is_the_identity():
    d = Dist()
    batch = torch.arange(12).view(3, 4)
    assert d.local(batch) is batch and not d.active and d.is_main
    mems = [[torch.ones(2, 4, 3)], [torch.zeros(2, 4, 3)]]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(d.full_mems(mems), mems))
    model = torch.nn.Linear(2, 2)
    assert d.wrap(model) is model and d.shard_experts(model) is model


# ----------------------------------------------------------------------------- the exchange, two processes

def exchange_worker(backend, top_k, empty_rank):
    """Rank r holds experts [2r, 2r+2) of 4 and its share of 24 tokens. Outputs, input gradients, expert and
    gate gradients must equal those of one layer holding all four experts on all 24 tokens."""
    import copy
    import torch.distributed as tdist
    from utils.moe import FMoETransformerMLP
    d = Dist.from_env(cuda=False, expert_parallel=True, timeout_s=60)
    torch.manual_seed(0)
    full = FMoETransformerMLP(4, 8, 16, top_k=top_k).double()
    full.expert_backend = backend
    if empty_rank >= 0:  # no token may choose the experts of that rank
        with torch.no_grad():
            full.gate.gate.bias[2 * empty_rank:2 * empty_rank + 2] = -1e4
    layer = copy.deepcopy(full)
    d.shard_experts(layer)
    x = torch.randn(24, 8, dtype=torch.double, requires_grad=True)
    weight = torch.randn(24, 8, dtype=torch.double)
    (full(x) * weight).sum().backward()

    start, stop = column_range(24, d.rank, d.world_size)
    x_local = x.detach()[start:stop].clone().requires_grad_()
    out = layer(x_local)
    (out * weight[start:stop]).sum().backward()

    with torch.no_grad():
        assert torch.allclose(out, full(x.detach())[start:stop], atol=1e-12)
    assert torch.allclose(x_local.grad, x.grad[start:stop], atol=1e-12)
    lo, hi = layer.expert_parallel.local_range
    for name in ('htoh4', 'h4toh'):
        for p in ('weight', 'bias'):
            mine, ref = getattr(getattr(layer.experts, name), p), getattr(getattr(full.experts, name), p)
            assert mine.shape[0] == 2 and torch.allclose(mine.grad, ref.grad[lo:hi], atol=1e-12), (name, p)
    gate_grad = layer.gate.gate.weight.grad.clone()
    tdist.all_reduce(gate_grad)   # each rank's gate saw its own tokens; DDP would sum (and average) these
    assert torch.allclose(gate_grad, full.gate.gate.weight.grad, atol=1e-12)
    assert torch.equal(d.sum(layer.last_load), full.last_load)
    d.close()
    print('exchange ok', d.rank)


@pytest.mark.parametrize('backend,top_k,empty_rank', [('slices', 2, -1), ('auto', 1, -1), ('slices', 2, 1),
                                                       ('auto', 2, 0)])
def test_all_to_all_exchange_equals_one_process(backend, top_k, empty_rank):
    results = launch([__file__, 'exchange', backend, top_k, empty_rank], timeout=90)
    assert_all_ok(results)
    assert all('exchange ok' in out for _, out, _ in results)


if __name__ == '__main__':
    if sys.argv[1] == 'exchange':
        exchange_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
