"""Data and expert parallelism on two CPU processes (gloo): the all_to_all exchange against one process holding
every expert, train.py under torchrun against one process step for step, resume across world sizes, eval.py
under torchrun, a rank that dies, and two machines (two torchrun launches) of which one dies, then resumed.

Processes listen on 127.0.0.1 on free ports, every launch has a timeout and is killed in a finally. This file is
also the worker script of the exchange tests: `python tests/test_distributed.py exchange ...` under torchrun's
environment variables.
"""
import json
import os
import shutil
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

from conftest import MOE, TINY, write_corpus  # noqa: E402
from run.distributed import Dist, column_range  # noqa: E402
from moe import grouped_mm_available  # noqa: E402

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


def outcomes(procs, timeout):
    """[(returncode, stdout, stderr)] of each process, all of them within timeout seconds."""
    deadline = time.time() + timeout
    results = []
    for p in procs:
        out, err = p.communicate(timeout=max(deadline - time.time(), 1))
        results.append((p.returncode, out, err))
    return results


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
        return outcomes(procs, timeout)
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


def test_ranks_agree_on_a_stop_every_few_steps():
    """The agreement is an all-reduce the host waits for: under torchrun every STOP_CHECK_STEPS steps (10),
    in one process (where it costs nothing) every step."""
    assert all(Dist().stop_check_due(step) for step in range(1, 25))
    assert [step for step in range(1, 25) if Dist(rank=1, world_size=2).stop_check_due(step)] == [10, 20]


class RecordedDDP(torch.nn.Module):
    def __init__(self, module, **options):
        super().__init__()
        self.module, self.options = module, options

    def forward(self, *args):
        return self.module(*args)


def test_ddp_gradients_are_views_into_its_buckets_and_compile_wraps_ddp(monkeypatch, tmp_path):
    """DDP with gradient_as_bucket_view (no copy of every gradient after the backward), and train.py compiles
    the DDP module, not the model inside it, so the compiled graph lets the all-reduce overlap the backward."""
    import mem_transformer
    from run.options import build_model, parse
    from run.trainer import Trainer
    monkeypatch.setattr(torch.nn.parallel, 'DistributedDataParallel', RecordedDDP)
    two_ranks = Dist(rank=0, world_size=2)
    wrapped = two_ranks.wrap(torch.nn.Linear(2, 2))
    assert isinstance(wrapped, RecordedDDP) and wrapped.options['gradient_as_bucket_view']

    compiled = []
    monkeypatch.setattr(mem_transformer, 'maybe_compile', compiled.append)
    config = parse(['--n_layer', '1', '--d_model', '8', '--n_head', '1', '--d_head', '8', '--d_inner', '8',
                    '--compile', '--work_dir', str(tmp_path)])
    trainer = Trainer(config, build_model(config.flags, 10), torch.device('cpu'), None, None, two_ranks)
    assert compiled == [trainer.forward_model] and isinstance(trainer.forward_model, RecordedDDP)


# ----------------------------------------------------------------------------- the exchange, two processes

def exchange_worker(backend, top_k, empty_rank):
    """Rank r holds experts [2r, 2r+2) of 4 and its share of 24 tokens. Outputs, input gradients, expert and
    gate gradients must equal those of one layer holding all four experts on all 24 tokens."""
    import copy
    import torch.distributed as tdist
    from moe import FMoETransformerMLP
    d = Dist.from_env(cuda=False, expert_parallel=True, timeout_s=60)
    torch.manual_seed(0)
    full = FMoETransformerMLP(4, 8, 16, top_k=top_k, expert_backend=backend).double()
    if empty_rank >= 0:  # no token may choose the experts of that rank
        with torch.no_grad():
            full.gate.gate.bias[2 * empty_rank:2 * empty_rank + 2] = -1e4
    layer = copy.deepcopy(full)
    d.shard_experts(layer)
    x = torch.randn(24, 8, dtype=torch.double, requires_grad=True)
    weight = torch.randn(24, 8, dtype=torch.double)
    full_out, full_stats = full(x)
    (full_out * weight).sum().backward()

    start, stop = column_range(24, d.rank, d.world_size)
    x_local = x.detach()[start:stop].clone().requires_grad_()
    out, stats = layer(x_local)
    (out * weight[start:stop]).sum().backward()

    with torch.no_grad():
        assert torch.allclose(out, full(x.detach())[0][start:stop], atol=1e-12)
    assert torch.allclose(x_local.grad, x.grad[start:stop], atol=1e-12)
    lo, hi = layer.exchange.local_range
    for name in ('htoh4', 'h4toh'):
        for p in ('weight', 'bias'):
            mine, ref = getattr(getattr(layer.experts, name), p), getattr(getattr(full.experts, name), p)
            assert mine.shape[0] == 2 and torch.allclose(mine.grad, ref.grad[lo:hi], atol=1e-12), (name, p)
    gate_grad = layer.gate.gate.weight.grad.clone()
    tdist.all_reduce(gate_grad)   # each rank's gate saw its own tokens; DDP would sum (and average) these
    assert torch.allclose(gate_grad, full.gate.gate.weight.grad, atol=1e-12)
    assert torch.equal(d.sum(stats.load), full_stats.load)
    print('exchange ok', d.rank)
    d.leave(0)


@pytest.mark.parametrize('backend,top_k,empty_rank', [('slices', 2, 1), ('auto', 2, 0), ('auto', 1, -1)])
def test_all_to_all_exchange_equals_one_process(backend, top_k, empty_rank):
    results = launch([__file__, 'exchange', backend, top_k, empty_rank], timeout=90)
    assert_all_ok(results)
    assert all('exchange ok' in out for _, out, _ in results)


def exchange_drops_worker(backend):
    """A gshard gate whose capacity drops copies (the capacity holds per process, as in FastMoE): rank r's
    output and input gradient equal those of one layer with all four experts on rank r's 12 tokens, and each
    expert's gradient is the sum over the ranks of that layer's. With grouped_mm the dropped copies are padding
    rows that the exchange does not send."""
    import copy
    import torch.distributed as tdist
    from moe import FMoETransformerMLP
    d = Dist.from_env(cuda=False, expert_parallel=True, timeout_s=60)
    torch.manual_seed(0)
    full = FMoETransformerMLP(4, 8, 16, top_k=2, gate='gshard', capacity_factor=(0.5, 0.5), random_routing=False,
                              expert_backend=backend)
    layer = copy.deepcopy(full)
    d.shard_experts(layer)
    x, weight = torch.randn(24, 8), torch.randn(24, 8)
    start, stop = column_range(24, d.rank, d.world_size)
    outs = {}
    for name, module in (('full', full), ('shard', layer)):
        x_local = x[start:stop].clone().requires_grad_()
        out, stats = module(x_local)
        (out * weight[start:stop]).sum().backward()
        outs[name] = out, x_local.grad, stats
    (out, x_grad, stats), (want, want_grad, want_stats) = outs['shard'], outs['full']
    assert want_stats.dropped > 0 and torch.equal(stats.dropped, want_stats.dropped)
    assert torch.allclose(out, want, atol=1e-5) and torch.allclose(x_grad, want_grad, atol=1e-5)
    lo, hi = layer.exchange.local_range
    for name in ('htoh4', 'h4toh'):
        for p in ('weight', 'bias'):
            ref = getattr(getattr(full.experts, name), p).grad.clone()
            tdist.all_reduce(ref)
            mine = getattr(getattr(layer.experts, name), p).grad
            assert torch.allclose(mine, ref[lo:hi], atol=1e-5), (name, p)
    print('exchange ok', d.rank)
    d.leave(0)


@pytest.mark.parametrize('backend', ['slices', 'grouped_mm'])
def test_all_to_all_exchange_with_capacity_drops(backend):
    if backend == 'grouped_mm' and not grouped_mm_available('cpu', torch.float32):
        pytest.skip('grouped_mm does not run here')
    results = launch([__file__, 'exchange_drops', backend], timeout=90)
    assert_all_ok(results)
    assert all('exchange ok' in out for _, out, _ in results)



# ----------------------------------------------------------------------------- train.py and eval.py

# conftest's tiny run, evaluated often, without dropout or a schedule, and MOE's naive gate (no balance loss):
# nothing that could differ by rank.
TINY = [*TINY, '--eval-interval', '3', '--max_eval_steps', '3', '--scheduler', 'constant', '--dropout', '0',
        '--dropatt', '0']


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp('enwik8'), sizes=(20000, 3000, 3000))


def train_one_process(corpus, work_dir, *flags):
    """train.py in a subprocess of its own (one thread), as the reference."""
    done = subprocess.run([sys.executable, 'train.py', '--data', corpus, '--work_dir', work_dir, *TINY, *flags],
                          env=worker_env(), cwd=ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def metrics(work_dir, split):
    lines = (Path(work_dir) / 'metrics.jsonl').read_text().splitlines()
    return {r['step']: r for r in map(json.loads, lines) if r['split'] == split}


def assert_same_losses(got, want, steps):
    for step in steps:
        assert got[step]['loss'] == pytest.approx(want[step]['loss'], rel=1e-5, abs=1e-6), step


def test_ddp_under_torchrun_equals_one_process(tmp_path, corpus):
    """A global batch of 5 split 3 + 2 over two ranks against one process with the whole batch."""
    one, two = tmp_path / 'one', tmp_path / 'two'
    train_one_process(corpus, one, '--max_step', '4', '--batch_size', '5')
    code, out, err = torchrun(['train.py', '--data', corpus, '--work_dir', two, *TINY, '--max_step', '4',
                               '--batch_size', '5'])
    assert code == 0, err[-3000:]
    assert_same_losses(metrics(two, 'train'), metrics(one, 'train'), range(1, 5))
    assert_same_losses(metrics(two, 'valid'), metrics(one, 'valid'), (3,))
    assert_same_losses(metrics(two, 'test'), metrics(one, 'test'), (4,))
    assert out.count('| End of training |') == 1   # rank 0 alone prints
    checkpoint = torch.load(two / 'checkpoint.pt', weights_only=True)
    assert [m.shape[1] for m in checkpoint['mems'][0]] == [5] * 3   # memories of both ranks, gathered
    assert len(checkpoint['rng_per_rank']) == 2


def test_expert_parallel_equals_one_process_and_resumes_on_any_world_size(tmp_path, corpus):
    """Steps 1-3 on 2 expert-parallel ranks, then steps 4-6 on 1 process and, separately, on 2 ranks again:
    every loss equals the uninterrupted one-process run; the checkpoint holds all experts, fused. The batch of 4
    runs in 2 chunks (of 1 column per rank, of 2 in one process), so the saved memories change layout."""
    ref = tmp_path / 'ref'
    train_one_process(corpus, ref, *MOE, '--max_step', '6')
    first = tmp_path / 'first'
    assert_all_ok(launch(['train.py', '--data', corpus, '--work_dir', first, *TINY, *MOE, '--expert-parallel',
                          '--max_step', '3', '--batch_chunk', '2']))
    want = metrics(ref, 'train')
    assert_same_losses(metrics(first, 'train'), want, (1, 2, 3))
    assert metrics(first, 'train')[1]['moe_load'] == want[1]['moe_load']   # summed over ranks
    state = torch.load(first / 'checkpoint.pt', weights_only=True)
    assert state['model_state']['layers.0.pos_ff.experts.htoh4.weight'].shape == (4, 64, 32)
    moments = [tuple(s['exp_avg'].shape) for s in state['optimizer_state']['state'].values()]
    assert moments.count((4, 64, 32)) == 2   # htoh4 of both layers: Adam's moments gathered like the weights

    again = tmp_path / 'again'
    shutil.copytree(first, again)
    train_one_process(corpus, first, *MOE, '--max_step', '6', '--restart', '--batch_chunk', '2')  # 2 -> 1
    assert_same_losses(metrics(first, 'train'), want, range(4, 7))
    assert_all_ok(launch(['train.py', '--data', corpus, '--work_dir', again, *TINY, *MOE, '--expert-parallel',
                          '--max_step', '6', '--restart', '--batch_chunk', '2']))  # 2 ranks -> 2 ranks
    assert_same_losses(metrics(again, 'train'), want, range(4, 7))
    assert_same_losses(metrics(again, 'test'), metrics(ref, 'test'), (6,))


def test_auxfree_bias_under_expert_parallelism_follows_the_global_load(tmp_path, corpus):
    """The aux-loss-free gate's bias is global state: each rank routes its own columns, so the bias update
    must use the load summed over ranks. Two expert-parallel ranks give the one-process losses and biases."""
    flags = [*MOE, '--moe-gate', 'auxfree', '--moe-bias-update-rate', '0.05', '--max_step', '4']
    ref, two = tmp_path / 'ref', tmp_path / 'two'
    train_one_process(corpus, ref, *flags)
    assert_all_ok(launch(['train.py', '--data', corpus, '--work_dir', two, *TINY, *flags, '--expert-parallel']))
    assert_same_losses(metrics(two, 'train'), metrics(ref, 'train'), range(1, 5))
    got, want = (torch.load(d / 'checkpoint.pt', weights_only=True)['model_state'] for d in (two, ref))
    for i in range(2):
        key = f'layers.{i}.pos_ff.gate.expert_bias'
        assert want[key].abs().max() > 0
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def test_eval_under_torchrun_reads_the_split_once_with_the_same_result(tmp_path, corpus):
    run_dir = tmp_path / 'run'
    train_one_process(corpus, run_dir, *MOE, '--max_step', '2')
    flags = ['eval.py', '--work_dir', run_dir, '--tgt_len', '8', '--mem_len', '16', '--split', 'valid']
    done = subprocess.run([sys.executable, *map(str, flags)], env=worker_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    one = json.loads((run_dir / 'eval.json').read_text())['valid']['loss']
    (run_dir / 'eval.json').unlink()
    results = launch(flags)
    assert_all_ok(results)
    two = json.loads((run_dir / 'eval.json').read_text())['valid']['loss']
    assert two == pytest.approx(one, rel=1e-6)
    assert 'valid loss' in results[0][1] and 'valid loss' not in results[1][1]   # printed once, by rank 0


def test_bad_distributed_flags_fail_in_one_line_before_writing(tmp_path, corpus):
    work = tmp_path / 'run'
    results = launch(['train.py', '--data', corpus, '--work_dir', work, *TINY, '--moe', '--moe-num-expert', '3',
                      '--moe-top-k', '1', '--expert-parallel', '--max_step', '2'], timeout=60)
    assert [code for code, _, _ in results] == [2, 2]
    errors = ''.join(err for _, _, err in results).strip().splitlines()
    assert errors == ['train.py: error: --expert-parallel: --moe-num-expert 3 must be divisible by the number of '
                      'processes (2), each holding the same number of experts']
    assert not work.exists()


def test_a_rank_that_dies_stops_the_others_and_leaves_a_loadable_checkpoint(tmp_path, corpus):
    work = tmp_path / 'run'
    port = free_port()
    argv = ['train.py', '--data', corpus, '--work_dir', work, *TINY, '--max_step', '100000', '--save-interval', '2',
            '--eval-interval', '100000', '--dist-timeout', '30']
    procs = []
    try:
        for rank in range(2):
            env = worker_env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, MASTER_ADDR='127.0.0.1', MASTER_PORT=port)
            procs.append(subprocess.Popen([sys.executable, *map(str, argv)], env=env, cwd=ROOT, text=True,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          start_new_session=True))
        deadline = time.time() + 90
        while not (work / 'checkpoint.pt').exists():
            assert time.time() < deadline and procs[0].poll() is None, 'no checkpoint written'
            time.sleep(0.2)
        os.killpg(procs[1].pid, signal.SIGKILL)
        killed = time.time()
        _, err = procs[0].communicate(timeout=60)
        assert time.time() - killed < 45
        assert procs[0].returncode == 3, err[-2000:]
        assert 'rank 0 lost contact with the other processes' in err and '--restart' in err
    finally:
        stop(procs)
    state = torch.load(work / 'checkpoint.pt', weights_only=True)
    assert state['step'] >= 2 and state['step'] % 2 == 0


def scaler_worker(work_dir):
    """Three fp16 steps with dynamic loss scaling on two expert-parallel ranks, the first of which overflows in
    rank 1's expert gradient alone (a hook makes it inf). Prints, after each step, every rank's loss scale and the
    largest difference between rank 0's dense weights and each rank's."""
    from moe import FMoETransformerMLP
    from run.options import build_model, parse
    from run.trainer import Trainer
    d = Dist.from_env(cuda=False, expert_parallel=True, timeout_s=60)
    config = parse([*TINY, *MOE, '--amp', 'fp16', '--expert-parallel', '--work_dir', work_dir])
    torch.manual_seed(0)
    trainer = Trainer(config, build_model(config.flags, 50), torch.device('cpu'), print, None, d)
    d.seed_rank(config.seed)
    if d.rank == 1:
        expert = next(m for m in trainer.model.modules() if isinstance(m, FMoETransformerMLP)).experts.htoh4
        expert.weight.register_hook(lambda grad: torch.full_like(grad, float('inf')) if trainer.step == 0 else None)
    torch.manual_seed(1)   # the same batches on both ranks; each trains on its own columns
    batches = torch.randint(0, 50, (3, config.tgt_len + 1, config.batch_size))
    for batch in batches:
        trainer.train_step(batch[:-1], batch[1:])
        dense = torch.cat([p.detach().flatten() for p in trainer.model.parameters() if not hasattr(p, 'dp_comm')])
        scales, weights = zip(*d.gather_objects((trainer.scaler.get_scale(), dense)))
        print(json.dumps(dict(step=trainer.step, scales=scales, skipped=trainer.window.totals()['n_skipped'],
                              dense_diff=[float((w - weights[0]).abs().max()) for w in weights],
                              dense_sum=float(weights[0].double().sum()))), flush=True)
    d.leave(0)


def test_expert_parallel_fp16_ranks_keep_one_loss_scale(tmp_path):
    """An overflow in one rank's expert gradient makes every rank skip the step (the global gradient norm is
    inf); the loss scale must then be halved on every rank, not on that rank alone, or DDP averages dense
    gradients scaled differently and the ranks' dense weights drift apart for good."""
    results = launch([__file__, 'scaler', tmp_path], timeout=90)
    assert_all_ok(results)
    steps = [json.loads(line) for line in results[0][1].splitlines() if line.startswith('{')]
    assert [s['step'] for s in steps] == [1, 2, 3]
    assert [s['skipped'] for s in steps] == [1, 1, 1]   # the window counts: step 1 skipped, 2 and 3 applied
    assert [s['scales'] for s in steps] == [[2. ** 15] * 2] * 3
    assert all(s['dense_diff'] == [0., 0.] for s in steps)
    assert steps[0]['dense_sum'] != steps[2]['dense_sum']   # the later steps did train


# ----------------------------------------------------------------------------- two machines

def two_nodes(argv, timeout=LAUNCH_TIMEOUT_S):
    """`python argv...` as two machines run it (docs/distributed.md: TORCHRUN_ARGS="--nnodes 2 --rdzv-backend c10d
    --rdzv-endpoint HOST0:PORT --rdzv-id ID" on each): two torchrun launches of one process each, their rendezvous
    on 127.0.0.1. Returns [(returncode, stdout, stderr)] by launch."""
    port = free_port()
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--nproc_per_node', '1',
           '--rdzv-backend', 'c10d', '--rdzv-endpoint', f'127.0.0.1:{port}', '--rdzv-id', f'run{port}',
           *map(str, argv)]
    procs = [subprocess.Popen(cmd, env=worker_env(), cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True) for _ in range(2)]
    try:
        return outcomes(procs, timeout)
    finally:
        stop(procs)


def node_killing_worker(kill_at, argv):
    """train.py argv, whose rank 1 takes its machine down as it starts training step kill_at: its torchrun
    agent, then itself, by SIGKILL."""
    from run.distributed import exit_process
    from run.trainer import Trainer
    from run.training import main
    step, calls = Trainer.train_step, [0]

    def train_step(self, *args):
        calls[0] += 1
        if calls[0] == kill_at and os.environ['RANK'] == '1':
            os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, *args)
    Trainer.train_step = train_step
    exit_process(main(argv))


@pytest.mark.parametrize('flags', [[], [*MOE, '--expert-parallel']], ids=['dense', 'moe-expert-parallel'])
def test_two_machines_one_killed_then_both_resumed_equal_one_process(tmp_path, corpus, flags):
    """The several-machine launch for real: rank 1's machine dies at step 4, rank 0 stops in one line, and both
    relaunched with --restart continue from the checkpoint of step 2; every loss equals one process's."""
    steps = ['--max_step', '6', '--save-interval', '2', '--dist-timeout', '20']
    ref, run = tmp_path / 'ref', tmp_path / 'run'
    train_one_process(corpus, ref, *flags, *steps)
    killed = two_nodes(['tests/test_distributed.py', 'kill_node', 4, '--data', corpus, '--work_dir', run, *TINY,
                        *flags, *steps])
    codes = sorted(code for code, _, _ in killed)
    assert codes[0] == -signal.SIGKILL and codes[1] != 0, killed
    assert any('rank 0 lost contact with the other processes at step 3' in err for _, _, err in killed), killed
    assert torch.load(run / 'checkpoint.pt', weights_only=True)['step'] == 2
    assert max(metrics(run, 'train')) == 3

    resumed = two_nodes(['train.py', '--data', corpus, '--work_dir', run, *TINY, *flags, *steps, '--restart'])
    assert [code for code, _, _ in resumed] == [0, 0], resumed
    assert 'Resuming from' in (run / 'log.txt').read_text()
    want = metrics(ref, 'train')
    assert_same_losses(metrics(run, 'train'), want, range(1, 7))
    assert metrics(run, 'train')[6].get('moe_load') == want[6].get('moe_load')
    assert_same_losses(metrics(run, 'test'), metrics(ref, 'test'), (6,))


if __name__ == '__main__':
    if sys.argv[1] == 'exchange':
        exchange_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == 'exchange_drops':
        exchange_drops_worker(sys.argv[2])
    elif sys.argv[1] == 'scaler':
        scaler_worker(sys.argv[2])
    elif sys.argv[1] == 'kill_node':
        node_killing_worker(int(sys.argv[2]), sys.argv[3:])


@pytest.mark.parametrize('world_size,finalized', [('2', False), ('1', True)])
def test_a_torchrun_process_exits_without_finalization(world_size, finalized):
    """exit_process: under torchrun (WORLD_SIZE > 1) the exit skips the interpreter's finalization (where gloo's
    threads can abort a finished run), with the code and the printed output kept; a lone process exits as usual."""
    script = ('import atexit, sys\nfrom run.distributed import exit_process\n'
              'atexit.register(lambda: print("finalized"))\nprint("done", end="")\nexit_process(7)\n')
    done = subprocess.run([sys.executable, '-c', script], env=worker_env(WORLD_SIZE=world_size), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 7
    assert done.stdout == ('donefinalized\n' if finalized else 'done')


def test_a_script_leaves_from_the_frame_that_holds_its_model(monkeypatch):
    """Dist.leave under torchrun: the ranks meet at a barrier, then the process ends at once (leave_now), with the
    process group neither destroyed nor freed: freeing it (DDP's reducer holds it) joins gloo's worker threads
    while holding the GIL, and a worker still freeing the last collective's Python tensors waits for the GIL, a
    deadlock that left a rank hanging after a finished run (2 launches of 17 under load; 0 of 70 after). With one
    process leave returns the code, and close (for a process that goes on) still destroys the group."""
    import run.distributed as rd
    calls = []
    monkeypatch.setattr(rd.dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(rd.dist, 'barrier', lambda: calls.append('barrier'))
    monkeypatch.setattr(rd.dist, 'destroy_process_group', lambda: calls.append('destroy'))

    class Left(Exception):
        pass

    def leave_now(code):
        calls.append(('exit', code))
        raise Left

    monkeypatch.setattr(rd, 'leave_now', leave_now)
    assert Dist().leave(5) == 5 and calls == []
    with pytest.raises(Left):
        Dist(rank=1, world_size=2).leave(3)
    assert calls == ['barrier', ('exit', 3)]
    calls.clear()
    Dist(rank=1, world_size=2).close()
    assert calls == ['barrier', 'destroy']
