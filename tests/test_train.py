"""train.py end to end on tiny configurations: flags, run directory, resume after SIGKILL, batch_chunk,
mixed precision on the CPU, non-finite steps and every bad-input case."""
import contextlib
import errno
import importlib.util
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import types
import warnings

import pytest
import torch

import data_utils
import eval as evaluation
import generate
import mem_transformer
import train
from conftest import MOE, ROOT, SYNCS, TINY, WORDS, OpLog, launch, sigint_at_training_forward, write_corpus
from utils import checkpoint as ckpt
from utils import malloc
from run.options import build_model, build_parser, model_config, parse
from run.trainer import (OPTIMIZERS, Trainer, build_optimizer, fused_available, non_embedding_parameters,
                         record_skip, skips_on_device)
from utils.exp_utils import set_deterministic
from utils.schedules import learning_rate


def run(work_dir, corpus_dir, *flags):
    """train.main in this process; returns the exit code (argparse's SystemExit included)."""
    try:
        return train.main(['--data', str(corpus_dir), '--work_dir', str(work_dir), *TINY, *flags])
    except SystemExit as e:
        return e.code


def corpus_symbols(corpus_dir):
    return [tok for split in ('train', 'valid', 'test') for tok in (corpus_dir / f'{split}.txt').read_text().split()]


def records(work_dir, split=None):
    lines = (work_dir / 'metrics.jsonl').read_text().splitlines()
    return [r for r in map(json.loads, lines) if split is None or r['split'] == split]


def train_losses(work_dir):
    return [(r['step'], r['loss']) for r in records(work_dir, 'train')]


# ----------------------------------------------------------------------------- flags

ORIGINAL_DEFAULTS = {  # transcribed from the original train.py and FastMoE's additions
    'data': '../data/wikitext-103', 'dataset': 'wt103', 'n_layer': 12, 'n_head': 10, 'd_head': 50,
    'd_embed': -1, 'd_model': 500, 'd_inner': 1000, 'dropout': 0.0, 'dropatt': 0.0, 'init': 'normal',
    'emb_init': 'normal', 'init_range': 0.1, 'emb_init_range': 0.01, 'init_std': 0.02, 'proj_init_std': 0.01,
    'optim': 'adam', 'lr': 0.00025, 'mom': 0.0, 'scheduler': 'cosine', 'warmup_step': 0, 'decay_rate': 0.5,
    'lr_min': 0.0, 'clip': 0.25, 'clip_nonemb': False, 'max_step': 100000, 'batch_size': 60, 'batch_chunk': 1,
    'tgt_len': 70, 'eval_tgt_len': 50, 'ext_len': 0, 'mem_len': 0, 'not_tied': False, 'seed': 1111,
    'cuda': False, 'adaptive': False, 'div_val': 1, 'pre_lnorm': False, 'varlen': False, 'multi_gpu': False,
    'log_interval': 200, 'eval_interval': 4000, 'work_dir': 'LM-TFM', 'restart': False, 'restart_dir': '',
    'debug': False, 'same_length': False, 'attn_type': 0, 'clamp_len': -1, 'eta_min': 0.0, 'gpu0_bsz': -1,
    'max_eval_steps': -1, 'sample_softmax': -1, 'patience': 0, 'finetune_v2': False, 'finetune_v3': False,
    'fp16': False, 'dynamic_loss_scale': False, 'moe': False, 'moe_num_expert': 64, 'moe_top_k': 2,
}


def test_every_original_flag_parses_with_its_default():
    args = build_parser().parse_args([])
    for dest, default in ORIGINAL_DEFAULTS.items():
        assert getattr(args, dest) == default, dest
    # The original's static scale defaulted to 1; here None stands for "1 with --fp16, dynamic with --amp fp16".
    assert args.static_loss_scale is None


def test_every_original_flag_parses_when_given():
    argv = ('--data d --dataset text8 --n_layer 3 --n_head 4 --d_head 5 --d_embed 6 --d_model 7 --d_inner 8 '
            '--dropout 0.1 --dropatt 0.2 --init uniform --emb_init uniform --init_range 0.3 --emb_init_range 0.4 '
            '--init_std 0.5 --proj_init_std 0.6 --optim sgd --lr 0.7 --mom 0.8 --scheduler dev_perf '
            '--warmup_step 9 --decay_rate 0.11 --lr_min 0.12 --clip 0.13 --clip_nonemb --max_step 14 '
            '--batch_size 15 --batch_chunk 16 --tgt_len 17 --eval_tgt_len 18 --ext_len 19 --mem_len 20 --not_tied '
            '--seed 21 --cuda --adaptive --div_val 22 --pre_lnorm --varlen --multi_gpu --log-interval 23 '
            '--eval-interval 24 --work_dir w --restart --restart_dir r --debug --same_length --attn_type 2 '
            '--clamp_len 25 --eta_min 0.26 --gpu0_bsz 27 --max_eval_steps 28 --sample_softmax 29 --patience 30 '
            '--finetune_v2 --finetune_v3 --fp16 --static-loss-scale 31 --dynamic-loss-scale --moe '
            '--moe-num-expert 32 --moe-top-k 33 --moe-gate gshard --moe-capacity-factor 1.5 '
            '--moe-eval-capacity-factor 3.5 --moe-balance-coef 0.34 --moe-zloss-coef 0.35 --amp fp16 '
            '--save-interval 36').split()
    args = build_parser().parse_args(argv)
    given = {a.lstrip('-').replace('-', '_') for a in argv if a.startswith('--')}
    assert set(ORIGINAL_DEFAULTS) <= given  # the command line above names every original flag
    assert (args.dataset, args.n_layer, args.d_embed, args.init, args.optim, args.scheduler) == \
        ('text8', 3, 6, 'uniform', 'sgd', 'dev_perf')
    assert (args.warmup_step, args.lr_min, args.clip_nonemb, args.batch_chunk, args.not_tied) == \
        (9, 0.12, True, 16, True)
    assert (args.log_interval, args.eval_interval, args.restart_dir, args.attn_type, args.gpu0_bsz) == \
        (23, 24, 'r', 2, 27)
    assert (args.static_loss_scale, args.dynamic_loss_scale, args.moe_num_expert, args.moe_top_k) == \
        (31., True, 32, 33)
    assert (args.moe_gate, args.moe_capacity_factor, args.moe_balance_coef, args.save_interval) == \
        ('gshard', 1.5, 0.34, 36)


def test_non_embedding_parameters_leave_out_embeddings_and_softmax():
    model = mem_transformer.MemTransformerLM(50, 2, 2, 8, 4, 16, 0., 0., d_embed=6, mem_len=4, tgt_len=4)
    chosen = {id(p) for p in non_embedding_parameters(model)}
    embedding = {id(p) for m in (model.word_emb, model.crit) for p in m.parameters()}
    assert chosen and not chosen & embedding
    assert chosen | embedding == {id(p) for p in model.parameters()}
    assert id(model.r_w_bias) in chosen



# ----------------------------------------------------------------------------- optimizers

def optimizer_pair(optim, lr=0.01):
    """The same small parameters under build_optimizer and under torch's per-parameter loop (the
    implementation train.py used before build_optimizer picked one), with the same gradients each step."""
    args = build_parser().parse_args(['--optim', optim, '--lr', str(lr), '--mom', '0.9'])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    twin = torch.nn.Sequential(*(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)))
    twin.load_state_dict(model.state_dict())
    kwargs = dict(lr=lr, momentum=0.9) if optim == 'sgd' else dict(lr=lr)
    plain = OPTIMIZERS[optim](twin.parameters(), foreach=False, **kwargs)
    return build_optimizer(args, model), plain


def take_steps(optimizers, n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        grads = None
        for optimizer in optimizers:
            params = [p for group in optimizer.param_groups for p in group['params']]
            grads = grads or [torch.randn(p.shape, generator=gen) for p in params]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()


def assert_same_parameters(a, b):
    for p, q in zip(*([p for group in o.param_groups for p in group['params']] for o in (a, b))):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('optim', list(OPTIMIZERS))
def test_build_optimizer_picks_the_fused_kernel_and_steps_like_the_loop(optim):
    fast, plain = optimizer_pair(optim)
    group = fast.param_groups[0]
    if fused_available(OPTIMIZERS[optim], 'cpu'):   # torch >= 2.5 on CPUs
        assert group['fused'] and not group['foreach']
    else:
        assert group['foreach'] and not group['fused']
    before = [p.detach().clone() for p in fast.param_groups[0]['params']]
    take_steps([fast, plain], 3)
    assert any(not torch.equal(p, q) for p, q in zip(before, fast.param_groups[0]['params']))
    assert_same_parameters(fast, plain)


@pytest.mark.parametrize('optim', list(OPTIMIZERS))
def test_optimizer_state_written_by_the_loop_resumes_in_the_fast_implementation(optim, tmp_path):
    fast, plain = optimizer_pair(optim)
    take_steps([fast, plain], 2)
    # A checkpoint of the per-parameter loop (as written before build_optimizer chose an implementation)
    # holds the same state as the fast one's, and loading it keeps the fast implementation.
    saved, own = plain.state_dict(), fast.state_dict()
    assert [sorted(s) for s in saved['state'].values()] == [sorted(s) for s in own['state'].values()]
    for s, o in zip(saved['state'].values(), own['state'].values()):
        for key in s:
            torch.testing.assert_close(s[key], o[key], rtol=1e-5, atol=1e-6)
    torch.save(saved, tmp_path / 'optimizer.pt')
    fast.load_state_dict(torch.load(tmp_path / 'optimizer.pt', weights_only=True))
    assert fast.param_groups[0]['fused'] == own['param_groups'][0]['fused']
    assert fast.param_groups[0]['foreach'] == own['param_groups'][0]['foreach']
    for p, q in zip(fast.param_groups[0]['params'], plain.param_groups[0]['params']):
        p.data.copy_(q)   # the model's weights come from the same checkpoint
    take_steps([fast, plain], 2, seed=2)
    assert_same_parameters(fast, plain)


# ----------------------------------------------------------------------------- a run end to end

def test_train_writes_the_run_directory(tmp_path, corpus, capsys):
    work = tmp_path / 'run'
    assert run(work, corpus, *MOE, '--max_step', '30', '--save-interval', '7', '--warmup_step', '5') == 0
    out = capsys.readouterr().out
    assert f'Run directory : {work}' in out
    assert sorted(os.listdir(work)) == ['checkpoint.pt', 'log.txt', 'metrics.jsonl', 'model.pt', 'optimizer.pt']

    log = (work / 'log.txt').read_text()
    # the naive gate has no balance loss: no column of zeros (gates that have one: test_moe_gates_log_...)
    assert re.search(r'\| epoch +1 step +30 \| +30 batches \| lr \S+ \| ms/batch +[\d.]+ \| loss +[\d.]+ '
                     r'\| bpc +[\d.]+ \| imbalance [\d.]+$', log, re.M)
    assert re.search(r'\| Eval +3 at step +30 \| time: +[\d.]+s \| valid loss +[\d.]+ \| valid bpc +[\d.]+', log)
    assert 'checkpoint.pt = last state: every 7 steps, at each validation and at the end)' in log
    assert re.search(r'\| End of training \| test loss +[\d.]+ \| test bpc +[\d.]+', log)
    assert log.count('malloc: ') == (malloc.glibc() is not None or bool(os.environ.get(malloc.OPT_OUT)))

    train_records = records(work, 'train')
    assert [r['step'] for r in train_records] == list(range(1, 31))
    first, last = train_records[0], train_records[-1]
    assert first['loss'] == pytest.approx(math.log(len(set(corpus_symbols(corpus)))), abs=0.05)  # uniform at first
    assert last['loss'] < first['loss'] - 0.3  # and it learns
    assert last['bpc'] == pytest.approx(last['loss'] / math.log(2))
    for r in train_records:  # the next update's rate (as the original's line), the closed-form schedule's
        assert r['lr'] == pytest.approx(learning_rate(r['step'], 0.002, 'cosine', 5, 30))
    assert last['tokens_per_s'] > 0 and last['peak_mem_mb'] > 0 and last['skipped_steps'] == 0
    load = torch.tensor(last['moe_load'])
    assert load.shape == (2, 4) and (load.sum(1) == 16 * 4 * 2).all()  # every token goes to top_k=2 experts
    assert len(last['moe_balance_loss']) == 2
    assert [r['step'] for r in records(work, 'valid')] == [10, 20, 30]
    test = records(work, 'test')
    assert len(test) == 1 and test[0]['step'] == 30

    best = ckpt.load(work / 'model.pt', 'model')
    valid = records(work, 'valid')
    assert best['val_loss'] == min(r['loss'] for r in valid)
    assert best['step'] == min(valid, key=lambda r: r['loss'])['step']
    rebuilt = mem_transformer.MemTransformerLM(**best['config'])
    rebuilt.load_state_dict(best['model_state'])

    state = ckpt.load(work / 'checkpoint.pt')
    for key in ('model_state', 'optimizer_state', 'scaler_state', 'plateau', 'step', 'epoch', 'best_val_loss',
                'rng', 'data', 'mems', 'config', 'args'):
        assert key in state, key
    assert state['step'] == 30 and state['data']['position'] == 30 * 16
    assert len(state['mems']) == 1 and len(state['mems'][0]) == 3  # one memory per hidden state
    assert state['mems'][0][0].shape == (16, 4, 32)


def test_tensorboard_gets_the_records_of_metrics_jsonl(tmp_path, corpus):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    work = tmp_path / 'run'
    assert run(work, corpus, *MOE, '--max_step', '10', '--tensorboard') == 0
    board = EventAccumulator(str(work), size_guidance={'scalars': 0, 'histograms': 0})
    board.Reload()

    def scalars(tag):
        return [(e.step, pytest.approx(e.value, rel=1e-6)) for e in board.Scalars(tag)]
    for split, keys in (('train', ('loss', 'bpc', 'lr', 'tokens_per_s', 'moe_aux_loss')),
                        ('valid', ('loss', 'bpc')), ('test', ('loss', 'bpc'))):
        for key in keys:
            assert scalars(f'{split}/{key}') == [(r['step'], r[key]) for r in records(work, split)], key
    for layer in (0, 1):
        assert scalars(f'train/moe_balance_loss/layer_{layer}') == [
            (r['step'], r['moe_balance_loss'][layer]) for r in records(work, 'train')]
        histograms = board.Histograms(f'train/moe_load/layer_{layer}')
        assert [h.step for h in histograms] == list(range(1, 11))
        for h, r in zip(histograms, records(work, 'train')):   # one bucket per expert, its token count
            assert list(h.histogram_value.bucket_limit) == [0.5, 1.5, 2.5, 3.5]
            assert list(h.histogram_value.bucket) == r['moe_load'][layer]


def test_tensorboard_without_the_package_is_refused_before_anything_is_written(tmp_path, corpus, monkeypatch,
                                                                               capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *args: None if name == 'tensorboard' else real_find_spec(name, *args))
    assert run(tmp_path / 'run', corpus, '--max_step', '2', '--tensorboard') == 2
    assert capsys.readouterr().err == ('train.py: error: --tensorboard: the tensorboard package is not installed '
                                       '(pip install tensorboard), or drop --tensorboard\n')
    assert not (tmp_path / 'run').exists()


def test_tensorboard_that_fails_to_import_is_refused_before_anything_is_written(tmp_path, corpus, monkeypatch,
                                                                                capsys):
    """A tensorboard that is installed (found) but breaks on import, as one built against other protobuf
    versions does: one line naming the failure, exit 2, no run directory (it used to train, then die at the
    first log line without a checkpoint)."""
    broken = tmp_path / 'site' / 'tensorboard'
    broken.mkdir(parents=True)
    (broken / '__init__.py').write_text('raise TypeError("Descriptors cannot be created directly")\n')
    monkeypatch.syspath_prepend(str(tmp_path / 'site'))
    for name in [m for m in sys.modules if m.split('.')[0] == 'tensorboard' or m.startswith('torch.utils.tensorboard')]:
        monkeypatch.delitem(sys.modules, name)
    assert run(tmp_path / 'run', corpus, '--max_step', '2', '--tensorboard') == 2
    assert capsys.readouterr().err == (
        'train.py: error: --tensorboard: the tensorboard package is installed but does not import (TypeError: '
        'Descriptors cannot be created directly); reinstall it (pip install --force-reinstall tensorboard), or '
        'drop --tensorboard\n')
    assert not (tmp_path / 'run').exists()


def test_debug_writes_nothing(tmp_path, corpus):
    assert run(tmp_path / 'run', corpus, '--max_step', '3', '--debug') == 0
    assert not (tmp_path / 'run').exists()


def test_multi_gpu_flags_explain_torchrun_and_train(tmp_path, corpus, capsys):
    assert run(tmp_path / 'run', corpus, '--max_step', '2', '--multi_gpu', '--gpu0_bsz', '4') == 0
    out = capsys.readouterr().out
    assert ('NOTE: --multi_gpu: one process trains on one device with the whole batch; torchrun --nproc_per_node N '
            'train.py ... trains on N') in out
    assert 'NOTE: --gpu0_bsz 4 is ignored: every process takes an equal share of --batch_size' in out
    assert [r['step'] for r in records(tmp_path / 'run', 'train')] == [1, 2]


def test_moe_flags_without_moe_are_noted_as_ignored(tmp_path, corpus, capsys):
    """A run given MoE flags but not --moe trains a dense model, as the original does; the log says so, naming
    the flags that differ from their defaults (and none with --moe, or without MoE flags)."""
    assert run(tmp_path / 'dense', corpus, '--max_step', '1', '--moe-num-expert', '16', '--moe-top-k', '2',
               '--moe-no-gate-bias', '--moe-bias-update-rate', '0.01', '--debug') == 0
    out = capsys.readouterr().out
    assert ('NOTE: --moe-num-expert 16, --moe-no-gate-bias, --moe-bias-update-rate 0.01: MoE options, ignored '
            'without --moe (this model is dense)') in out
    assert run(tmp_path / 'moe', corpus, '--max_step', '1', '--moe', '--moe-num-expert', '4', '--debug') == 0
    assert run(tmp_path / 'plain', corpus, '--max_step', '1', '--debug') == 0
    assert 'ignored without --moe' not in capsys.readouterr().out


def test_epochs_wrap_around_with_fresh_memory(tmp_path, tmp_path_factory):
    small = write_corpus(tmp_path_factory.mktemp('small'), sizes=(700, 400, 400))
    work = tmp_path / 'run'
    # 700 tokens / batch 4 = 175 rows -> 174 targets -> 11 segments of 16 per epoch.
    assert run(work, small, '--max_step', '25', '--eval-interval', '100') == 0
    steps = records(work, 'train')
    assert [r['epoch'] for r in steps] == [1] * 11 + [2] * 11 + [3] * 3
    assert [r['batch'] for r in steps][9:13] == [10, 11, 1, 2]


# ----------------------------------------------------------------------------- exact resume

def train_subprocess(work_dir, corpus_dir, *flags):
    cmd = [sys.executable, str(ROOT / 'train.py'), '--data', str(corpus_dir), '--work_dir', str(work_dir),
           *TINY, *flags]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))  # as the in-process reference runs


def wait_for_train_lines(work_dir, n, proc, timeout=60):
    deadline = time.time() + timeout
    path = work_dir / 'metrics.jsonl'
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and path.read_text().count('"split": "train"') >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f'the run did not reach {n} logged steps: {proc.stderr.read() if proc.stderr else ""}')


@contextlib.contextmanager
def running_train(work_dir, corpus_dir, *flags, lines):
    """train.py in a subprocess, entered once it has logged `lines` training steps; SIGKILLed on leaving if it
    still runs."""
    proc = train_subprocess(work_dir, corpus_dir, *flags)
    try:
        wait_for_train_lines(work_dir, lines, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stderr.close()


RESUME_FLAGS = [*MOE, '--max_step', '24', '--save-interval', '5', '--dropout', '0.1', '--varlen',
                '--moe-gate', 'switch', '--moe-top-k', '1', '--eval-interval', '8']


def test_sigkill_then_restart_reproduces_every_loss(tmp_path, corpus):
    """Dropout, switch-gate jitter and varlen lengths all draw random numbers: the resumed run must draw the same."""
    reference = tmp_path / 'reference'
    assert run(reference, corpus, *RESUME_FLAGS) == 0

    work = tmp_path / 'killed'
    with running_train(work, corpus, *RESUME_FLAGS, lines=13):
        pass   # SIGKILLed
    killed_at = len(records(work, 'train'))
    saved_at = ckpt.load(work / 'checkpoint.pt')['step']
    assert saved_at < killed_at < 24  # killed mid-run, some steps after the last checkpoint

    assert run(work, corpus, *RESUME_FLAGS, '--restart') == 0

    def figures(work_dir):  # everything but timings, compared exactly
        return [(r['step'], r['split'], r['loss'], r.get('lr'), r.get('moe_load')) for r in records(work_dir)]
    assert figures(work) == figures(reference)
    assert 'Resuming from' in (work / 'log.txt').read_text()


def test_a_checkpoint_written_before_the_iterators_kept_their_state_resumes_exactly(tmp_path, corpus):
    """Older checkpoints hold the data position as `position` and the varlen lengths' RNG as numpy's global
    one: they resume with the same batches."""
    flags = ['--max_step', '12', '--varlen', '--scheduler', 'constant', '--eval-interval', '100', '--save-interval', '6']
    assert run(tmp_path / 'reference', corpus, *flags) == 0
    work = tmp_path / 'old'
    assert run(work, corpus, *flags[:-1], '6', '--max_step', '6') == 0
    state = ckpt.load(work / 'checkpoint.pt')
    data = state.pop('data')
    state['position'] = data['position']
    kind, keys, pos, has_gauss, cached = data['rng']
    state['rng']['numpy'] = {'kind': kind, 'keys': torch.tensor(keys), 'pos': pos, 'has_gauss': has_gauss,
                             'cached_gaussian': cached}
    ckpt.atomic_save(state, work / 'checkpoint.pt')
    assert run(work, corpus, *flags, '--restart') == 0
    assert train_losses(work) == train_losses(tmp_path / 'reference')


def test_a_checkpoint_from_before_the_newer_model_options_resumes_exactly(tmp_path, corpus):
    """A checkpoint (and a --restart_dir model.pt) written before untie_r, moe_shared_expert and the gate flags
    existed has no such keys in its config: they mean the constructor's defaults, so it resumes."""
    flags = ['--max_step', '12', '--scheduler', 'constant', '--eval-interval', '6', '--save-interval', '6']
    assert run(tmp_path / 'reference', corpus, *flags) == 0
    work = tmp_path / 'old'
    assert run(work, corpus, *flags[:-1], '6', '--max_step', '6') == 0
    newer = ('untie_r', 'moe_shared_expert', 'moe_gate_bias', 'moe_switch_eps', 'moe_random_routing')
    for name in ('checkpoint.pt', 'model.pt'):
        state = ckpt.load(work / name)
        assert all(key in state['config'] for key in newer)
        for key in newer:
            del state['config'][key]
        ckpt.atomic_save(state, work / name)
    assert run(tmp_path / 'finetune', corpus, *flags, '--restart_dir', str(work)) == 0
    assert run(work, corpus, *flags, '--restart') == 0
    assert train_losses(work) == train_losses(tmp_path / 'reference')


def test_a_lower_lr_given_at_resume_is_used(tmp_path, corpus):
    """The divergence message advises resuming with a lower --lr: the resumed run trains at it (with the same
    --lr, the saved rate is kept: the resume tests above)."""
    flags = ['--scheduler', 'constant', '--eval-interval', '100', '--save-interval', '4']
    assert run(tmp_path / 'run', corpus, *flags, '--max_step', '4') == 0
    assert run(tmp_path / 'run', corpus, *flags, '--max_step', '8', '--restart', '--lr', '1e-5') == 0
    resumed = [r['lr'] for r in records(tmp_path / 'run', 'train') if r['step'] > 4]
    assert resumed and all(lr == pytest.approx(1e-5) for lr in resumed)


def test_sigterm_saves_a_checkpoint_and_resume_finishes_the_same(tmp_path, corpus):
    flags = [*MOE, '--max_step', '16', '--save-interval', '1000', '--dropout', '0.1', '--batch_chunk', '2']
    reference = tmp_path / 'reference'
    assert run(reference, corpus, *flags) == 0

    work = tmp_path / 'stopped'
    with running_train(work, corpus, *flags, lines=5) as proc:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    state = ckpt.load(work / 'checkpoint.pt')
    assert state['step'] == len(records(work, 'train')) < 16  # saved at the step it stopped, not at an interval
    assert 'SIGTERM' in (work / 'log.txt').read_text()
    assert run(work, corpus, *flags, '--restart') == 0
    assert train_losses(work) == train_losses(reference)


def test_the_end_of_a_run_validates_the_final_model_and_tests_the_best(tmp_path, corpus, capsys):
    """A run that reaches --max_step validates its final model too (the original stopped after the last periodic
    validation); model.pt is the best by validation, as the original's, and the log says which model the test
    scores. A run shorter than --log-interval and --eval-interval still logs a training line and an Eval 1."""
    work = tmp_path / 'run'
    assert run(work, corpus, '--max_step', '15') == 0
    evals = [r for r in records(work) if r['split'] != 'train']
    assert [(r['step'], r['split']) for r in evals] == [(10, 'valid'), (15, 'valid'), (15, 'test')]
    best = min(evals[:2], key=lambda r: r['loss'])['step']
    assert ckpt.load(work / 'model.pt', 'model')['step'] == best == evals[2]['model_step']
    assert re.search(rf'^Testing {work}/model.pt, the best model by validation: step {best}, valid bpc [\d.]+$',
                     (work / 'log.txt').read_text(), re.M)
    assert re.search(r'^\| Eval +2 at step +15 \|', (work / 'log.txt').read_text(), re.M)
    capsys.readouterr()
    short = tmp_path / 'short'
    assert run(short, corpus, '--max_step', '4', '--log-interval', '200', '--eval-interval', '4000') == 0
    assert [(r['step'], r['split']) for r in records(short)] == [(4, 'train'), (4, 'valid'), (4, 'test')]
    out = capsys.readouterr().out
    assert re.search(r'^\| epoch +1 step +4 \| +4 batches \|', out, re.M)
    assert re.search(r'^\| Eval +1 at step +4 \|', out, re.M)
    assert 'checkpoint.pt = last state: at each validation and at the end)' in out


def test_sigint_stops_after_the_step_then_tests_the_best_model(tmp_path, corpus, monkeypatch):
    """Ctrl-C as in the original: training stops early, then the best model is evaluated on test."""
    sigint_at_training_forward(monkeypatch, 3)
    handler_before = signal.getsignal(signal.SIGINT)   # SIG_IGN when the suite runs under nohup ... &
    work = tmp_path / 'run'
    assert run(work, corpus, '--max_step', '20') == 0
    assert ckpt.load(work / 'checkpoint.pt')['step'] == 3
    assert 'Exiting from training early' in (work / 'log.txt').read_text()
    assert [(r['step'], r['split']) for r in records(work) if r['split'] != 'train'] == [(3, 'valid'), (3, 'test')]
    assert signal.getsignal(signal.SIGINT) is handler_before  # the handler is put back


def test_a_resume_with_another_max_step_stretches_the_cosine(tmp_path, corpus, monkeypatch, capsys):
    """Stopped at step 6 of 20, resumed with --max_step 30: the rate goes on down from where it was to 0 at step 30
    (the closed form of a 30-step cosine would jump back up), said in the log. A finished run resumed with a longer
    --max_step would train at rate 0: refused in one line."""
    work = tmp_path / 'run'
    with monkeypatch.context() as patch:
        sigint_at_training_forward(patch, 6)
        assert run(work, corpus, '--max_step', '20') == 0
    assert run(work, corpus, '--max_step', '30', '--restart') == 0
    assert 'NOTE: --max_step 20 -> 30: the cosine schedule goes on from the rate reached at step 6' in \
        (work / 'log.txt').read_text()
    rates = {r['step']: r['lr'] for r in records(work, 'train')}
    assert rates[6] == pytest.approx(learning_rate(6, 0.002, 'cosine', 0, 20))
    assert all(rates[s + 1] < rates[s] for s in range(6, 30)) and rates[30] == 0
    assert rates[7] < learning_rate(7, 0.002, 'cosine', 0, 30)
    assert [(r['step'], r['split']) for r in records(work) if r['split'] != 'train'][-2:] == [(30, 'valid'), (30, 'test')]
    capsys.readouterr()
    assert run(work, corpus, '--max_step', '40', '--restart') == 2
    err = capsys.readouterr().err
    assert err.startswith('train.py: error: --max_step 40: ') and err.count('\n') == 1
    assert 'finished its cosine schedule at step 30' in err and f'--restart_dir {work}' in err


def test_only_gates_with_a_balance_loss_log_it(tmp_path, corpus):
    assert run(tmp_path / 'gshard', corpus, *MOE, '--moe-gate', 'gshard', '--max_step', '2') == 0
    assert re.search(r'\| bpc +[\d.]+ \| aux loss [\d.]+ \| imbalance', (tmp_path / 'gshard' / 'log.txt').read_text())
    assert run(tmp_path / 'naive', corpus, *MOE, '--max_step', '2') == 0
    assert 'aux loss' not in (tmp_path / 'naive' / 'log.txt').read_text()


AUXFREE = [*MOE, '--moe-gate', 'auxfree', '--moe-bias-update-rate', '0.01', '--scheduler', 'constant']


def expert_bias(work_dir):
    state = ckpt.load(work_dir / 'checkpoint.pt')['model_state']
    return torch.stack([state[f'layers.{i}.pos_ff.gate.expert_bias'] for i in range(2)])


def test_auxfree_bias_follows_the_load_and_resumes_exactly(tmp_path, corpus):
    """The bias moves by +-rate per step against each step's load, lives in the checkpoint, and a run
    resumed half-way gives the uninterrupted run's losses, loads and biases."""
    reference, work = tmp_path / 'reference', tmp_path / 'resumed'
    assert run(reference, corpus, *AUXFREE, '--max_step', '8') == 0
    bias = expert_bias(reference)
    steps = [r['step'] for r in records(reference, 'train')]
    assert steps == list(range(1, 9)) and bias.abs().max() > 0
    # every step adds +-0.01 (or 0 for an expert exactly at the mean): 8 steps stay within 0.08
    assert bias.abs().max() <= 0.08 + 1e-6
    first = records(reference, 'train')[0]['moe_load']
    layer0 = torch.tensor(first[0], dtype=torch.float)
    # after step 1 alone the bias is the sign of (mean - load): check with a one-step run
    one = tmp_path / 'one'
    assert run(one, corpus, *AUXFREE, '--max_step', '1') == 0
    assert torch.equal(expert_bias(one)[0], 0.01 * torch.sign(layer0.mean() - layer0))

    assert run(work, corpus, *AUXFREE, '--max_step', '4') == 0
    assert run(work, corpus, *AUXFREE, '--max_step', '8', '--restart') == 0
    want = [(r['step'], r['loss'], r['moe_load']) for r in records(reference, 'train')]
    assert [(r['step'], r['loss'], r['moe_load']) for r in records(work, 'train')] == want
    assert torch.equal(expert_bias(work), bias)


def test_sampled_softmax_trains(tmp_path, corpus):
    """Trained on 8 sampled negatives, evaluated with the full softmax: the validation loss falls below the
    uniform distribution's log(n_token) and the training loss falls."""
    work = tmp_path / 'run'
    assert run(work, corpus, '--max_step', '40', '--sample_softmax', '8', '--eval-interval', '40',
               '--lr', '0.005') == 0
    losses = [l for _, l in train_losses(work)]
    n_token = ckpt.load(work / 'model.pt', 'model')['config']['n_token']
    assert sum(losses[-5:]) < sum(losses[:5]) - 1
    assert records(work, 'valid')[-1]['loss'] < math.log(n_token) - 0.5


def test_resume_with_extended_context_dev_perf_and_shorter_evaluation(tmp_path, corpus):
    """ext_len > 0, the dev_perf schedule (its plateau state) and validation segments shorter than training's:
    a run stopped and resumed gives every figure of a run that never stopped, and dev_perf did decay."""
    flags = ['--ext_len', '4', '--scheduler', 'dev_perf', '--patience', '0', '--decay_rate', '0.5',
             '--eval-interval', '3', '--eval_tgt_len', '8', '--lr', '0.02']
    assert run(tmp_path / 'reference', corpus, *flags, '--max_step', '15') == 0
    assert run(tmp_path / 'resumed', corpus, *flags, '--max_step', '7') == 0
    assert run(tmp_path / 'resumed', corpus, *flags, '--max_step', '15', '--restart') == 0

    def figures(work_dir):
        return [(r['step'], r['split'], r['loss'], r.get('lr')) for r in records(work_dir)
                if not (r['step'] == 7 and r['split'] != 'train')]  # the stopped run's final evaluations
    assert figures(tmp_path / 'resumed') == figures(tmp_path / 'reference')
    rates = [r['lr'] for r in records(tmp_path / 'reference', 'train')]
    assert rates[0] == 0.02 and min(rates) < 0.02


def clip_step(corpus, *flags):
    """One SGD step (lr 1) of a trainer: the parameters before, their unclipped gradients, and after."""
    config = parse(['--data', str(corpus), *TINY, '--optim', 'sgd', '--lr', '1', '--scheduler', 'constant',
                    '--clip', '0.01', *flags])
    model = build_model(config.flags, 256)
    trainer = Trainer(config, model, torch.device('cpu'), None, None)
    data = torch.randint(0, 256, (17, 4), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(1)
    trainer.model.zero_grad()
    out, moe_stats = model(data[:16], data[1:], return_moe_stats=True)
    (out[0].float().mean() + model.aux_loss(moe_stats)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.manual_seed(1)
    trainer.train_step(data[:16], data[1:])
    return model, before, grads


@pytest.mark.parametrize('clip_nonemb', [False, True])
def test_clip_nonemb_clips_only_the_non_embedding_gradients(corpus, clip_nonemb):
    model, before, grads = clip_step(corpus, *(['--clip_nonemb'] if clip_nonemb else []))
    embedding = {n for n, _ in model.named_parameters() if n.startswith(('word_emb.', 'crit.'))}
    assert embedding and len(embedding) < len(before)
    clipped = set(before) - embedding if clip_nonemb else set(before)
    update = {n: before[n] - p.detach() for n, p in model.named_parameters()}  # SGD with lr 1: the gradient used
    norm = torch.cat([update[n].flatten() for n in clipped]).norm()
    assert norm.item() == pytest.approx(0.01, rel=1e-4)  # clipped to --clip
    scale = 0.01 / torch.cat([grads[n].flatten() for n in clipped]).norm()
    for name in before:
        expected = grads[name] * (scale if name in clipped else 1)
        torch.testing.assert_close(update[name], expected, atol=1e-6, rtol=1e-4, msg=name)


def test_adaptive_softmax_takes_the_original_clusters(tmp_path, corpus, capsys):
    flags = parse(['--dataset', 'wt103', '--adaptive', '--div_val', '4']).flags
    config = model_config(flags, 267735)
    assert (config['cutoffs'], config['tie_projs']) == ([20000, 40000, 200000], [False, True, True, True])
    config = model_config(parse(['--dataset', 'lm1b', '--adaptive', '--div_val', '4']).flags, 793471)
    assert (config['cutoffs'], config['tie_projs']) == ([60000, 100000, 640000], [False, False, False, False])
    # A corpus smaller than the first cluster: one line naming the clusters, nothing written.
    lm1b = write_lm1b(tmp_path / 'lm1b')
    assert run(tmp_path / 'run', lm1b, '--dataset', 'lm1b', '--adaptive', '--max_step', '2') == 2
    assert 'cutoffs=[60000, 100000, 640000]' in capsys.readouterr().err
    assert not (tmp_path / 'run').exists()


def test_restart_dir_starts_from_another_runs_weights(tmp_path, corpus, capsys):
    first = tmp_path / 'first'
    assert run(first, corpus, '--max_step', '10') == 0
    second = tmp_path / 'second'
    assert run(second, corpus, '--max_step', '10', '--restart_dir', str(first), '--dropout', '0.2') == 0
    assert 'Starting from the weights of' in capsys.readouterr().out
    # Starting from trained weights (and their optimizer state), the first loss is the first run's latest level.
    first_losses = [l for _, l in train_losses(first)]
    assert records(second, 'train')[0]['loss'] < first_losses[0] - 0.1
    assert records(second, 'train')[0]['loss'] == pytest.approx(first_losses[-1], abs=0.05)
    code = run(tmp_path / 'third', corpus, '--max_step', '10', '--restart_dir', str(first), '--n_layer', '3')
    assert code == 2
    assert 'n_layer: 2 in the checkpoint, 3 now' in capsys.readouterr().err


def test_restart_dir_constant_and_dev_perf_go_on_at_the_saved_rate(tmp_path, corpus):
    """As the original: optimizer.pt's rate is restored, and constant/dev_perf never reset it (other schedules do);
    an exact --restart of such a run keeps that rate."""
    first = tmp_path / 'first'
    assert run(first, corpus, '--max_step', '10') == 0  # cosine: the saved rate is a decayed one
    saved = ckpt.load(first / 'optimizer.pt', 'optimizer')['optimizer_state']['param_groups'][0]['lr']
    assert 0 < saved < 0.001
    for scheduler in ('constant', 'dev_perf'):
        work = tmp_path / scheduler
        flags = ['--scheduler', scheduler, '--lr', '0.01', '--save-interval', '2']
        assert run(work, corpus, '--max_step', '4', '--restart_dir', str(first), *flags) == 0
        assert run(work, corpus, '--max_step', '6', '--restart', *flags) == 0
        assert [r['lr'] for r in records(work, 'train')] == [pytest.approx(saved)] * 6
        assert 'continues at the rate saved in' in (work / 'log.txt').read_text()
    assert run(tmp_path / 'cosine', corpus, '--max_step', '2', '--restart_dir', str(first), '--lr', '0.01') == 0
    assert [r['lr'] for r in records(tmp_path / 'cosine', 'train')] == \
        [pytest.approx(learning_rate(s, 0.01, 'cosine', 0, 2)) for s in (1, 2)]


def test_untie_r_trains_resumes_evaluates_and_generates(tmp_path, corpus, capsys):
    """--untie_r (a bias pair per layer, the Hugging Face checkpoints' layout) through the whole life of a run."""
    import eval as evaluation
    import generate
    flags = ['--untie_r', '--scheduler', 'constant', '--eval-interval', '5', '--dropout', '0.1']
    reference = tmp_path / 'reference'
    assert run(reference, corpus, *flags, '--max_step', '10') == 0
    work = tmp_path / 'resumed'
    assert run(work, corpus, *flags, '--max_step', '5') == 0
    assert run(work, corpus, *flags, '--max_step', '10', '--restart') == 0
    assert train_losses(work) == train_losses(reference)
    state = ckpt.load(work / 'model.pt', 'model')['model_state']
    assert 'r_w_bias' not in state and 'layers.1.dec_attn.r_r_bias' in state
    assert not torch.equal(state['layers.0.dec_attn.r_w_bias'], state['layers.1.dec_attn.r_w_bias'])
    capsys.readouterr()
    assert evaluation.main(['--work_dir', str(work), '--split', 'test']) == 0
    assert 'test bpc' in capsys.readouterr().out
    assert generate.main(['--work_dir', str(work), '--prompt', 'the', '--max_tokens', '8', '--seed', '1']) == 0
    assert capsys.readouterr().out.startswith('the')
    assert run(tmp_path / 'bad', corpus, '--untie_r', '--attn_type', '2') == 2
    assert '--untie_r: only attn_type 0 shares r_w_bias/r_r_bias across layers (--attn_type 2)' in capsys.readouterr().err


def write_lm1b(directory, seed=0):
    """One Billion Word's layout in miniature: shuffled training shards, held-out valid/test, a vocab file."""
    rng = random.Random(seed)

    def sentences(n):
        return ''.join(' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + ' .\n' for _ in range(n))
    shards = directory / '1-billion-word-language-modeling-benchmark-r13output' / \
        'training-monolingual.tokenized.shuffled'
    shards.mkdir(parents=True)
    for k in (1, 2):
        (shards / f'news.en-0000{k}-of-00100').write_text(sentences(40))
    (directory / 'valid.txt').write_text(sentences(30))
    (directory / 'test.txt').write_text(sentences(30))
    (directory / '1b_word_vocab.txt').write_text(''.join(f'{w} 1\n' for w in ['<S>', '<UNK>', '.', *WORDS]))
    return directory


def test_shuffled_multi_file_corpus_resumes_exactly(tmp_path):
    """lm1b's iterator shuffles files and sentences every epoch: a stopped run that is extended with --restart
    continues mid-epoch (and across epochs) with the same batches as a run that never stopped."""
    lm1b = write_lm1b(tmp_path / 'lm1b')
    flags = ['--dataset', 'lm1b', '--scheduler', 'constant', '--tgt_len', '8', '--mem_len', '8',
             '--eval_tgt_len', '8', '--eval-interval', '7']
    assert run(tmp_path / 'reference', lm1b, *flags, '--max_step', '40') == 0
    assert run(tmp_path / 'resumed', lm1b, *flags, '--max_step', '13') == 0
    assert run(tmp_path / 'resumed', lm1b, *flags, '--max_step', '40', '--restart') == 0
    assert 'flags changed since the checkpoint: max_step: 13 in the checkpoint, 40 now' in \
        (tmp_path / 'resumed' / 'log.txt').read_text()
    reference = records(tmp_path / 'reference', 'train')
    assert reference[-1]['epoch'] >= 2  # the run crossed an epoch boundary
    assert train_losses(tmp_path / 'resumed') == train_losses(tmp_path / 'reference')


def test_log_lines_count_time_and_rate_as_the_original(tmp_path, corpus, monkeypatch):
    """On a fake clock (1 s a step, 100 s a validation): ms/batch is the wall time since the last line per step,
    a validation inside the window included; the eval line's time runs since the previous validation ended;
    tokens_per_s counts training time only; lr is the rate of the next update."""
    clock = [0.]
    monkeypatch.setattr('run.trainer.time', types.SimpleNamespace(time=lambda: clock[0]))
    for name, seconds in (('train_step', 1.), ('validation_loss', 100.)):
        def timed(self, *args, _run=getattr(Trainer, name), _s=seconds, **kwargs):
            clock[0] += _s
            return _run(self, *args, **kwargs)
        monkeypatch.setattr(Trainer, name, timed)
    work = tmp_path / 'run'
    assert run(work, corpus, '--max_step', '20', '--log-interval', '5', '--warmup_step', '5') == 0
    lines = [line for line in (work / 'log.txt').read_text().splitlines() if line.startswith('| ')]
    train_lines = [line for line in lines if line.startswith('| epoch')]
    assert ['ms/batch 1000.00' in line for line in train_lines] == [True, True, False, True]
    assert 'ms/batch 21000.00' in train_lines[2]
    assert [line.split('| time:')[1].split('|')[0].strip() for line in lines if '| Eval' in line] == ['110.00s'] * 2
    by_step = {r['step']: r for r in records(work, 'train')}
    assert by_step[15]['tokens_per_s'] == pytest.approx(5 * 4 * 16 / 5)
    for step, line in zip((5, 10, 15, 20), train_lines):
        assert f'lr {learning_rate(step, 0.002, "cosine", 5, 20):.3g} ' in line


def test_loss_scale_flags_without_fp16_are_ignored_as_in_the_original(tmp_path, corpus):
    work = tmp_path / 'run'
    assert run(work, corpus, '--max_step', '2', '--static-loss-scale', '8', '--dynamic-loss-scale') == 0
    assert 'are ignored without --fp16' in (work / 'log.txt').read_text()
    assert 'loss_scale' not in records(work, 'train')[-1]


# ----------------------------------------------------------------------------- batch_chunk and precision

def test_batch_chunk_equals_the_unchunked_step(tmp_path, corpus):
    """Each chunk carries its own memory; gradients accumulate to the full batch's mean gradient."""
    flags = [*MOE, '--max_step', '12', '--save-interval', '12']
    assert run(tmp_path / 'whole', corpus, *flags) == 0
    assert run(tmp_path / 'chunked', corpus, *flags, '--batch_chunk', '2') == 0
    whole, chunked = train_losses(tmp_path / 'whole'), train_losses(tmp_path / 'chunked')
    assert [s for s, _ in whole] == [s for s, _ in chunked]
    assert [l for _, l in chunked] == pytest.approx([l for _, l in whole], abs=2e-5)
    a = ckpt.load(tmp_path / 'whole' / 'checkpoint.pt')['model_state']
    b = ckpt.load(tmp_path / 'chunked' / 'checkpoint.pt')['model_state']
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=2e-5, rtol=1e-4, msg=key)
    # Four chunks: memories of 4 chunks x (n_layer + 1) states of batch 1.
    assert run(tmp_path / 'four', corpus, *flags, '--batch_chunk', '4') == 0
    mems = ckpt.load(tmp_path / 'four' / 'checkpoint.pt')['mems']
    assert len(mems) == 4 and mems[3][0].shape == (16, 1, 32)


def test_bf16_autocast_trains_like_fp32(tmp_path, corpus):
    flags = [*MOE, '--max_step', '20']
    assert run(tmp_path / 'fp32', corpus, *flags) == 0
    assert run(tmp_path / 'bf16', corpus, *flags, '--amp', 'bf16') == 0
    fp32, bf16 = train_losses(tmp_path / 'fp32'), train_losses(tmp_path / 'bf16')
    assert bf16 != fp32  # really ran in another precision
    assert [l for _, l in bf16] == pytest.approx([l for _, l in fp32], rel=0.02)
    assert 'loss_scale' not in records(tmp_path / 'bf16', 'train')[-1]


def test_fp16_loss_scaling_on_the_cpu(tmp_path, corpus, capsys):
    assert run(tmp_path / 'dynamic', corpus, '--max_step', '6', '--fp16', '--dynamic-loss-scale') == 0
    assert 'static loss scale 1' not in capsys.readouterr().out
    dynamic = records(tmp_path / 'dynamic', 'train')
    assert all(math.isfinite(r['loss']) for r in dynamic)
    # apex's start, 2^16, halved at each overflow (a skipped step); it grows only after 2000 steps in a row
    overflows = itertools.accumulate(r['skipped_steps'] for r in dynamic)
    assert [r['loss_scale'] for r in dynamic] == [2. ** 16 * 0.5 ** n for n in overflows]
    assert run(tmp_path / 'static', corpus, '--max_step', '6', '--fp16', '--static-loss-scale', '128') == 0
    assert {r['loss_scale'] for r in records(tmp_path / 'static', 'train')} == {128.}
    assert run(tmp_path / 'default', corpus, '--max_step', '2', '--fp16') == 0  # the original's static scale 1
    assert "WARNING: --fp16 keeps the original's static loss scale 1" in capsys.readouterr().out
    assert {r['loss_scale'] for r in records(tmp_path / 'default', 'train')} == {1.}
    fp32 = tmp_path / 'fp32'
    assert run(fp32, corpus, '--max_step', '6') == 0
    assert [r['loss'] for r in dynamic] == pytest.approx([l for _, l in train_losses(fp32)], rel=0.01)


def test_deterministic_switches_torch_to_its_deterministic_kernels_and_keeps_the_cpu_losses(tmp_path, corpus,
                                                                                             monkeypatch):
    """--deterministic (train.py and eval.py): torch raises for an op without a deterministic kernel, so every op
    of a MoE training step, its validation and eval.py has one on the CPU; the CPU's results stay the same."""
    monkeypatch.delenv('CUBLAS_WORKSPACE_CONFIG', raising=False)
    flags = [*MOE, '--max_step', '4', '--eval-interval', '2']
    try:
        assert run(tmp_path / 'deterministic', corpus, *flags, '--deterministic') == 0
        assert torch.are_deterministic_algorithms_enabled() and os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':4096:8'
        set_deterministic(False)
        assert evaluation.main(['--work_dir', str(tmp_path / 'deterministic'), '--split', 'test', '--no_log',
                                '--deterministic']) == 0
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        set_deterministic(False)
    assert run(tmp_path / 'default', corpus, *flags) == 0
    assert train_losses(tmp_path / 'deterministic') == train_losses(tmp_path / 'default')

def test_compile_trains_like_eager(tmp_path, corpus, monkeypatch):
    # The aot_eager backend traces forward and backward as inductor does, without needing a C++
    # compiler: the training step must compile (a failure would fall back to eager, with a warning)
    # and give eager's losses.
    compiled = []
    real_compile = torch.compile

    def aot_eager_compile(fn, **options):
        compiled.append(fn)
        return real_compile(fn, backend='aot_eager', **options)

    monkeypatch.setattr(torch, 'compile', aot_eager_compile)
    flags = [*MOE, '--max_step', '4', '--eval-interval', '4', '--max_eval_steps', '2']
    assert run(tmp_path / 'eager', corpus, *flags) == 0
    assert not compiled
    with warnings.catch_warnings():
        warnings.filterwarnings('error', message='.*running eagerly')
        assert run(tmp_path / 'compiled', corpus, *flags, '--compile') == 0
    assert len(compiled) == 1
    eager, fast = records(tmp_path / 'eager'), records(tmp_path / 'compiled')
    assert [r['split'] for r in fast] == [r['split'] for r in eager]
    assert [r['loss'] for r in fast] == pytest.approx([r['loss'] for r in eager], rel=1e-5)


# ----------------------------------------------------------------------------- non-finite steps

@pytest.fixture
def poisoned_steps(monkeypatch):
    """Make the model's loss NaN on the forward passes whose (1-based) numbers are in the returned set."""
    bad, calls = set(), [0]
    forward = mem_transformer.MemTransformerLM.forward

    def poisoned(self, data, target, *mems, return_moe_stats=False):
        ret, moe_stats = forward(self, data, target, *mems, return_moe_stats=True)
        if self.training:
            calls[0] += 1
            if calls[0] in bad:
                ret[0] = ret[0] * float('nan')
        return (ret, moe_stats) if return_moe_stats else ret
    monkeypatch.setattr(mem_transformer.MemTransformerLM, 'forward', poisoned)
    return bad


def test_a_nonfinite_step_is_skipped_and_counted(tmp_path, corpus, poisoned_steps):
    poisoned_steps.add(3)
    work = tmp_path / 'run'
    assert run(work, corpus, '--max_step', '6', '--log-interval', '3') == 0
    first, second = records(work, 'train')
    assert (first['skipped_steps'], first['nonfinite_losses'], second['skipped_steps']) == (1, 1, 0)
    assert math.isfinite(first['loss'])  # the mean of the finite steps
    assert 'skipped 1 steps (1 non-finite losses)' in (work / 'log.txt').read_text()
    weights = ckpt.load(work / 'checkpoint.pt')['model_state']
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_loss_that_stays_nonfinite_stops_the_run(tmp_path, corpus, poisoned_steps, monkeypatch):
    monkeypatch.setattr('run.trainer.NONFINITE_LIMIT', 4)
    poisoned_steps.update(range(7, 100))
    work = tmp_path / 'run'
    assert run(work, corpus, '--max_step', '30', '--save-interval', '5') == 1
    log = (work / 'log.txt').read_text()
    assert 'non-finite for 4 steps in a row (up to step 10)' in log and 'checkpoint.pt' in log
    state = ckpt.load(work / 'checkpoint.pt')
    assert state['step'] == 10 - 5  # the last checkpoint before the bad steps is kept
    assert all(torch.isfinite(w).all() for w in state['model_state'].values())


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, corpus, monkeypatch):
    """Step 7 blows the weights up to ~1e30 (as a huge learning rate does): finite, but every later loss is NaN. No
    state after step 6 may be kept, and the message must name a checkpoint that resumes."""
    train_step = Trainer.train_step

    def blow_up_at_step_7(self, data, target):
        loss = train_step(self, data, target)
        if self.step == 7:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.mul_(1e30)
        return loss
    monkeypatch.setattr(Trainer, 'train_step', blow_up_at_step_7)
    work = tmp_path / 'run'
    assert run(work, corpus, '--max_step', '30', '--save-interval', '1') == 1
    log = (work / 'log.txt').read_text()
    assert f'the last good checkpoint is {work}/checkpoint.pt (step 6): resume with --restart' in log
    state = ckpt.load(work / 'checkpoint.pt')
    assert (state['step'], state['nonfinite_run']) == (6, 0)
    assert all(torch.isfinite(m).all() for chunk in state['mems'] for m in chunk)
    # torch's max, not Python's: a NaN weight must fail (Python's max skips a NaN that comes after a number)
    assert torch.stack([w.abs().max() for w in state['model_state'].values() if w.is_floating_point()]).max() < 100
    assert sorted(os.listdir(work)) == ['checkpoint.pt', 'log.txt', 'metrics.jsonl']
    monkeypatch.setattr(Trainer, 'train_step', train_step)
    assert run(work, corpus, '--restart', '--max_step', '10') == 0  # as the message says

    fresh = tmp_path / 'fresh'  # diverges from the first step: nothing good to keep, and the message says so
    assert run(fresh, corpus, '--lr', '1e30', '--max_step', '30', '--save-interval', '1') == 1
    assert 'no checkpoint was kept' in (fresh / 'log.txt').read_text()
    assert not (fresh / 'checkpoint.pt').exists() and not (fresh / 'model.pt').exists()


# ----------------------------------------------------------------------------- bad input

BAD_INPUT = {
    'top_k above num_expert': (['--moe', '--moe-num-expert', '4', '--moe-top-k', '5'],
                               '--moe-top-k 5: must be between 1 and --moe-num-expert 4'),
    'adaptive on characters': (['--adaptive'], '--adaptive is for the large word-level vocabularies'),
    'batch_chunk not dividing': (['--batch_chunk', '3'], '--batch_chunk 3 must divide --batch_size 4'),
    'fp16 and bf16': (['--fp16', '--amp', 'bf16'], '--fp16 means --amp fp16 and contradicts --amp bf16'),
    'negative loss scale': (['--fp16', '--static-loss-scale', '-2'], '--static-loss-scale -2.0 must be positive'),
    'negative mem_len': (['--mem_len', '-1'], '--mem_len -1: must be >= 0'),
    'same_length without memory': (['--same_length', '--mem_len', '0'], '--same_length needs a memory'),
    'unknown flag': (['--n_layers', '3'], 'unrecognized arguments: --n_layers 3'),
    'unknown gate': (['--moe-gate', 'hash'], "invalid choice: 'hash'"),
    'negative bias update rate': (['--moe-bias-update-rate', '-1'],
                                  '--moe-bias-update-rate -1.0 must be a finite number at least 0 and at most 1'),
    # NaN or inf made the auxfree biases NaN: the routing froze with a finite loss, so no guard stopped the run
    'nan bias update rate': (['--moe', '--moe-num-expert', '4', '--moe-gate', 'auxfree', '--moe-bias-update-rate',
                              'nan'], '--moe-bias-update-rate nan must be a finite number at least 0 and at most 1'),
    'huge bias update rate': (['--moe-bias-update-rate', '1e30'],
                              '--moe-bias-update-rate 1e+30 must be a finite number at least 0 and at most 1'),
    # it trained 10 NaN steps, then stopped advising a lower --lr
    'huge switch jitter': (['--moe', '--moe-num-expert', '4', '--moe-top-k', '1', '--moe-gate', 'switch',
                            '--moe-switch-eps', '1e30'], '--moe-switch-eps 1e+30: must be in [0, 1)'),
    'switch gate with top-2': (['--moe', '--moe-num-expert', '4', '--moe-gate', 'switch'], '--moe-top-k 2: --moe-gate switch routes to exactly 1 expert'),
    'model rejects': (['--attn_type', '7'], '--attn_type 7: unknown attention type'),
    'restart without checkpoint': (['--restart'], 'checkpoint.pt does not exist'),
    'empty work_dir': (['--work_dir', ''], '--work_dir is empty (an unset shell variable?)'),
    'negative clip': (['--clip', '-1'], '--clip -1.0 must be a finite number above 0'),
    'infinite lr': (['--lr', 'inf'], '--lr inf must be a finite number above 0'),
    'nan decay rate': (['--decay_rate', 'nan'], '--decay_rate nan must be a finite number'),
    'negative momentum': (['--mom', '-0.5'], '--mom -0.5 must be a finite number at least 0'),
    'zero capacity': (['--moe-capacity-factor', '0'], '--moe-capacity-factor 0.0: must be a finite number above 0'),
    'missing restart_dir model': (['--restart_dir', '/nonexistent/run'], 'holds no model.pt'),
    # 8e12 parameters: more than any machine's memory (an allocation traceback, or the kernel's OOM killer)
    'shared experts beyond memory': (['--moe', '--moe-num-expert', '4', '--moe-shared-expert', '1000000000'],
                                     'GiB of memory of this machine; 100% of them come from --moe-shared-expert '
                                     '1000000000: use a smaller model'),
}


@pytest.mark.parametrize('case', sorted(BAD_INPUT))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path, corpus, capsys):
    flags, message = BAD_INPUT[case]
    work = tmp_path / 'run'
    assert run(work, corpus, '--max_step', '2', *flags) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('train.py: error: ') and message in err, err
    assert not work.exists()


def test_model_flags_are_checked_before_the_corpus_is_read(tmp_path, capsys):
    data = write_corpus(tmp_path / 'data')
    before = sorted(os.listdir(data))
    assert run(tmp_path / 'run', data, '--dropout', '1.5') == 2
    assert '--dropout 1.5: must be in [0, 1)' in capsys.readouterr().err
    assert sorted(os.listdir(data)) == before  # no cache built into --data


@pytest.mark.parametrize('sizes, flags, message', [
    ((100, 4000, 4000), ['--batch_size', '60'], 'the train split has 98 tokens, too few for a batch of 60: '
                                                'it needs at least 120 (2 rows of the batch) (--batch_size)'),
    ((150, 4000, 4000), ['--batch_size', '60', '--varlen'], 'needs at least 180 (3 rows of the batch)'),
    ((40000, 15, 4000), [], 'the valid split has 15 tokens, too few for a batch of 10: it needs at least 20'),
    ((40000, 4000, 19), [], 'the test split has 19 tokens'),
])  # (the corpus's newlines are no tokens)
def test_splits_too_small_for_their_batch_are_refused_at_start_up(sizes, flags, message, tmp_path):
    """A training split without one batch looped forever; a small evaluation split crashed at the first
    evaluation. In a subprocess: before the check, the first case never ended."""
    data = write_corpus(tmp_path / 'data', sizes=sizes)
    proc = subprocess.run([sys.executable, str(ROOT / 'train.py'), '--data', str(data), '--work_dir',
                           str(tmp_path / 'run'), *TINY, *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 2 and proc.stderr.count('\n') == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / 'run').exists()


def test_a_diverged_run_says_so(tmp_path, corpus):
    work = tmp_path / 'run'
    assert run(work, corpus, '--lr', '1000', '--max_step', '10') == 0
    assert re.search(r'WARNING: the test loss [\d.e+]+ is worse than a uniform guess over the 3\d symbols',
                     (work / 'log.txt').read_text())


def test_missing_data_directory(tmp_path, capsys):
    assert run(tmp_path / 'run', tmp_path / 'no-such-corpus', '--max_step', '2') == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'no-such-corpus' in err
    assert not (tmp_path / 'run').exists()


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory, corpus):
    work = tmp_path_factory.mktemp('finished') / 'run'
    assert run(work, corpus, '--max_step', '4') == 0
    return work


def unchanged_after(work, corpus, capsys, *flags):
    before = {name: (work / name).read_bytes() for name in os.listdir(work)}
    code = run(work, corpus, '--max_step', '4', *flags)
    after = {name: (work / name).read_bytes() for name in os.listdir(work)}
    assert after == before
    err = capsys.readouterr().err
    assert err.count('\n') == 1, err
    return code, err


def test_a_second_run_in_the_same_directory_is_refused(finished_run, corpus, capsys):
    code, err = unchanged_after(finished_run, corpus, capsys)
    assert code == 2 and 'already holds a run (checkpoint.pt): pass --restart' in err


def test_restart_with_other_model_flags_says_what_differs(finished_run, corpus, capsys):
    code, err = unchanged_after(finished_run, corpus, capsys, '--restart', '--d_inner', '128')
    assert code == 2 and 'd_inner: 64 in the checkpoint, 128 now' in err
    code, err = unchanged_after(finished_run, corpus, capsys, '--restart', '--batch_size', '8')
    assert code == 2 and 'batch_size: 4 in the checkpoint, 8 now' in err


def test_restart_from_a_corrupt_checkpoint(tmp_path, finished_run, corpus, capsys):
    work = tmp_path / 'copy'
    work.mkdir()
    for name in os.listdir(finished_run):
        (work / name).write_bytes((finished_run / name).read_bytes())
    (work / 'checkpoint.pt').write_bytes((finished_run / 'checkpoint.pt').read_bytes()[:1000])
    code, err = unchanged_after(work, corpus, capsys, '--restart')
    assert code == 2 and 'checkpoint.pt is unreadable' in err and 'use an intact copy (or start again without it)' in err
    torch.save({'model': torch.nn.Linear(1, 1)}, work / 'checkpoint.pt')
    code, err = unchanged_after(work, corpus, capsys, '--restart')
    assert code == 2 and 'pickled Python objects' in err


# ----------------------------------------------------------------------------- one run per directory, its files

def test_a_second_process_on_a_work_dir_is_refused_until_the_first_is_killed(tmp_path, corpus, capsys):
    """Two runs started together (no checkpoint yet) both trained into one directory, as did a second --restart:
    the directory is locked, and the kernel drops the lock with a SIGKILLed holder."""
    never = ['--max_step', '100000', '--save-interval', '0', '--eval-interval', '100000']
    work = tmp_path / 'run'
    with running_train(work, corpus, *never, lines=1):
        assert run(work, corpus, '--max_step', '3') == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and f'--work_dir {work} is in use by another process' in err, err
    assert run(work, corpus, '--max_step', '3') == 0
    assert [r['step'] for r in records(work, 'train')] == [1, 2, 3]  # the killed run's lines are not mixed in

    # a finished cosine goes on at --eta_min, which must not be 0 for more steps to be taken
    with running_train(work, corpus, '--restart', *never, '--eta_min', '1e-4', lines=4):
        assert run(work, corpus, '--restart', '--max_step', '6', '--eta_min', '1e-4') == 2
        assert 'is in use by another process' in capsys.readouterr().err
    assert run(work, corpus, '--restart', '--max_step', '5', '--eta_min', '1e-4') == 0


def test_temporary_files_of_a_killed_save_are_removed_at_start_up(tmp_path, finished_run, corpus):
    work = tmp_path / 'copy'
    shutil.copytree(finished_run, work)
    orphans = ['checkpoint.pt.tmp4242', 'model.pt.tmp17', 'optimizer.pt.tmp99', 'metrics.jsonl.tmp',
               'checkpoint.pt.next', 'checkpoint.pt.next.tmp5', '.checkpoint.pt.next.k3j_x1.tmp', '.model.pt.a8c.tmp']
    for name in orphans + ['notes.txt', 'eval.json.tmp5']:  # not train.py's: left alone
        (work / name).write_bytes(b'x' * 1000)
    assert run(work, corpus, '--restart', '--max_step', '5', '--eta_min', '1e-4') == 0
    assert sorted(os.listdir(work)) == ['checkpoint.pt', 'eval.json.tmp5', 'log.txt', 'metrics.jsonl', 'model.pt',
                                        'notes.txt', 'optimizer.pt']
    assert 'Removed the temporary files of an interrupted run: ' + ', '.join(sorted(orphans)) in \
        (work / 'log.txt').read_text()


def test_resuming_a_finished_run_does_not_repeat_its_test_line(tmp_path, finished_run, corpus):
    work = tmp_path / 'copy'
    shutil.copytree(finished_run, work)
    expected = [(r['step'], r['split'], r['loss']) for r in records(work)]
    for _ in range(2):
        assert run(work, corpus, '--restart', '--max_step', '4') == 0
        assert [(r['step'], r['split'], r['loss']) for r in records(work)] == expected


def test_another_vocabulary_of_the_same_size_is_refused_everywhere(tmp_path, finished_run, corpus, capsys):
    """A corpus with the same symbols in another order (e and t swapped: other counts, other ids) has as many
    symbols: sizes alone let every driver read it with the wrong ids."""
    swapped = tmp_path / 'swapped'
    swapped.mkdir()
    for split in ('train', 'valid', 'test'):
        swap = {'101': '116', '116': '101'}
        lines = (corpus / f'{split}.txt').read_text().split('\n')
        (swapped / f'{split}.txt').write_text('\n'.join(' '.join(swap.get(t, t) for t in line.split(' '))
                                                        for line in lines))
    work = tmp_path / 'copy'
    shutil.copytree(finished_run, work)
    message = "has another vocabulary than the one"

    def refused(main, *argv):
        capsys.readouterr()
        assert main(list(argv)) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert message in last and re.search(r"symbol \d+ is '(101|116)' there, '(116|101)' in the checkpoint", last)
    refused(train.main, '--data', str(swapped), '--work_dir', str(work), *TINY, '--max_step', '6', '--restart')
    refused(train.main, '--data', str(swapped), '--work_dir', str(tmp_path / 'new'), *TINY, '--restart_dir',
            str(finished_run))
    refused(evaluation.main, '--work_dir', str(work), '--data', str(swapped))
    refused(generate.main, '--work_dir', str(work), '--data', str(swapped), '--prompt', 'the')
    assert ckpt.load(work / 'model.pt', 'model')['vocab_symbols'] == \
        data_utils.get_lm_corpus(str(corpus), 'enwik8').vocab.idx2sym


def test_restart_dir_refuses_weights_and_optimizer_of_different_steps(tmp_path, finished_run, corpus, capsys):
    """model.pt and optimizer.pt are two writes: a kill between them pairs weights with another step's moments."""
    other = tmp_path / 'other'
    shutil.copytree(finished_run, other)
    optimizer = ckpt.load(other / 'optimizer.pt', 'optimizer')
    optimizer['step'] = 2
    ckpt.atomic_save(optimizer, other / 'optimizer.pt')
    assert run(tmp_path / 'run', corpus, '--restart_dir', str(other), '--max_step', '6') == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and f'optimizer.pt is from step 2 but {other}/model.pt from step 4' in err, err
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('where, message', [
    ('file', 'is a file, not a directory'),
    ('/proc/txl-run', 'is not writable'),
    ('file/run', 'cannot be created: '),
])
def test_an_unwritable_work_dir_is_refused_before_any_work(where, message, tmp_path, corpus, capsys):
    (tmp_path / 'file').write_text('a file')
    work = where if where.startswith('/') else tmp_path / where
    assert run(work, corpus, '--max_step', '2') == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and message in err, err


def test_a_full_disk_stops_with_one_line_and_keeps_the_checkpoint(tmp_path, finished_run, corpus, capsys,
                                                                 monkeypatch):
    work = tmp_path / 'copy'
    shutil.copytree(finished_run, work)
    before = {name: (work / name).read_bytes() for name in ('checkpoint.pt', 'metrics.jsonl', 'model.pt')}

    def no_space(fd):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(os, 'fsync', no_space)
    assert run(work, corpus, '--restart', '--max_step', '8', '--eta_min', '1e-4', '--save-interval', '1') == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'no space left on device writing' in err, err
    assert {name: (work / name).read_bytes() for name in before} == before
    assert not [name for name in os.listdir(work) if '.tmp' in name or name.endswith('.next')]


# ----------------------------------------------------------------------------- run scripts

# (script, mode) -> flags the original run script sets, transcribed from kimiyoung/transformer-xl (and FastMoE).
SCRIPT_FLAGS = {
    ('run_enwik8_base.sh', 'train'): dict(dataset='enwik8', n_layer=12, d_model=512, d_inner=2048, dropout=0.1,
                                          tgt_len=512, mem_len=512, batch_size=22, max_step=400000, gpu0_bsz=4),
    ('run_enwik8_base.sh', 'eval'): dict(tgt_len=80, mem_len=2100, clamp_len=820, same_length=True, split='test'),
    ('run_enwik8_large.sh', 'train'): dict(n_layer=24, d_model=1024, d_head=128, d_inner=3072, dropatt=0.15,
                                           warmup_step=4000, tgt_len=768, batch_size=64),
    ('run_enwik8_large.sh', 'eval'): dict(tgt_len=128, mem_len=3800, clamp_len=1000),
    ('run_enwik8_base_moe.sh', 'train'): dict(d_inner=1024, moe=True, moe_num_expert=64, moe_top_k=2,
                                              n_layer=12, d_model=512, batch_size=22),
    ('run_enwik8_base_moe.sh', 'eval'): dict(tgt_len=80, mem_len=2100, clamp_len=820),
    ('run_text8_base.sh', 'train'): dict(dataset='text8', n_layer=12, d_inner=2048, batch_size=22),
    ('run_text8_base.sh', 'eval'): dict(dataset='text8', tgt_len=80, mem_len=2100),
    ('run_text8_large.sh', 'train'): dict(dataset='text8', n_layer=24, dropout=0.15, max_step=400000,
                                          multi_gpu=False, warmup_step=0),
    ('run_text8_large.sh', 'eval'): dict(tgt_len=128, mem_len=3800, clamp_len=1000),
    ('run_wt103_base.sh', 'train'): dict(dataset='wt103', adaptive=True, n_layer=16, d_model=410, n_head=10,
                                         d_head=41, d_inner=2100, tgt_len=150, mem_len=150, eval_tgt_len=150,
                                         max_step=200000, batch_size=60),
    ('run_wt103_base.sh', 'eval'): dict(dataset='wt103', tgt_len=64, mem_len=640, clamp_len=400),
    ('run_wt103_large.sh', 'train'): dict(div_val=4, n_layer=18, d_model=1024, n_head=16, d_inner=4096,
                                          dropout=0.2, warmup_step=16000, max_step=4000000, tgt_len=384,
                                          batch_size=128),
    ('run_wt103_large.sh', 'eval'): dict(tgt_len=128, mem_len=1600, clamp_len=1000),
    ('run_lm1b_base.sh', 'train'): dict(dataset='lm1b', adaptive=True, div_val=4, n_layer=18, d_inner=4096,
                                        warmup_step=20000, max_step=500000, tgt_len=32, batch_size=224,
                                        gpu0_bsz=32),
    ('run_lm1b_base.sh', 'eval'): dict(batch_size=64, tgt_len=32, mem_len=128, same_length=True),
    ('run_lm1b_large.sh', 'train'): dict(n_layer=24, d_model=1280, n_head=16, d_head=80, d_inner=8192,
                                         dropout=0.05, max_step=1200000, batch_size=512),
    ('run_lm1b_large.sh', 'eval'): dict(batch_size=8, mem_len=128),
}
DATA_DIRS = {'enwik8': 'enwik8', 'text8': 'text8', 'wt103': 'wikitext-103', 'lm1b': 'one-billion-words'}


@pytest.mark.parametrize('script,mode', sorted(SCRIPT_FLAGS))
def test_run_scripts_pass_the_original_flags(script, mode, tmp_path):
    out = launch(tmp_path, script, mode, '--work_dir', 'W', DATA_ROOT=str(tmp_path / 'data'),
                             NPROC='1')  # prints the command line instead of running it
    assert out[0] == ('Run training...' if mode == 'train' else 'Run evaluation...')
    parser = build_parser() if mode == 'train' else evaluation.build_parser()
    args = parser.parse_args(out[2:])
    for dest, value in SCRIPT_FLAGS[script, mode].items():
        assert getattr(args, dest) == value, dest
    assert args.cuda and args.work_dir == 'W'
    assert args.data == f'{tmp_path}/data/{DATA_DIRS[args.dataset]}/'


def test_run_script_trains_and_evaluates_a_tiny_moe(tmp_path, corpus):
    """run_enwik8_base_moe.sh end to end on the CPU, its sizes overridden by flags given after the mode."""
    (tmp_path / 'data').mkdir()
    (tmp_path / 'data' / 'enwik8').symlink_to(corpus)
    env = dict(os.environ, DATA_ROOT=str(tmp_path / 'data'), OMP_NUM_THREADS='1', PYTHON=sys.executable)
    work = tmp_path / 'run'
    tiny = ['--n_layer', '2', '--d_model', '32', '--n_head', '2', '--d_head', '16', '--d_inner', '32',
            '--tgt_len', '16', '--mem_len', '16', '--eval_tgt_len', '16', '--batch_size', '4',
            '--moe-num-expert', '4', '--max_step', '4', '--eval-interval', '2', '--max_eval_steps', '2']
    done = subprocess.run(['bash', str(ROOT / 'run_enwik8_base_moe.sh'), 'train', '--work_dir', str(work), *tiny],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # the launcher's choice for the scripts' --multi_gpu, then train.py's run to its end
    assert re.search(r'^--multi_gpu: (\d+ GPU visible: one process|torchrun with \d+ processes)', done.stdout, re.M)
    assert 'End of training' in done.stdout
    done = subprocess.run(['bash', str(ROOT / 'run_enwik8_base_moe.sh'), 'eval', '--work_dir', str(work)],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert re.search(r'\| test loss +[\d.]+ \| test bpc +[\d.]+', done.stdout)
    result = json.loads((work / 'eval.json').read_text())
    assert result['settings'] == dict(batch_size=10, tgt_len=80, ext_len=0, mem_len=2100, clamp_len=820,
                                      same_length=True)
    bad = subprocess.run(['bash', str(ROOT / 'run_enwik8_base_moe.sh'), 'tran'], env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and 'usage: [SIZE=tiny] bash run_enwik8_base_moe.sh train|eval' in bad.stderr


# ----------------------------------------------------------------------------- progress

def test_progress_bar_on_a_terminal_only(tmp_path, corpus, capfd):
    """On a terminal (a pseudo-terminal here) tqdm shows loss and tokens/s; logs stay plain lines."""
    import fcntl
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 40, 140, 0, 0))
    cmd = [sys.executable, str(ROOT / 'train.py'), '--data', str(corpus), '--work_dir', str(tmp_path / 'tty'),
           *TINY, '--max_step', '40', '--log-interval', '20']
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=slave, stderr=slave, env=dict(os.environ, OMP_NUM_THREADS='1'))
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=60) == 0
    os.close(master)
    screen = b''.join(chunks).decode(errors='replace')
    assert re.search(r'\d+/40 \[.*step/s, loss=[\d.]+, tok_s=\d+\]', screen)
    assert re.search(r'\| epoch +1 step +40 ', screen)  # log lines still reach the terminal
    log = (tmp_path / 'tty' / 'log.txt').read_text()
    assert 'tok_s' not in log and '\r' not in log

    assert run(tmp_path / 'plain', corpus, '--max_step', '3') == 0  # stdout/stderr are not terminals here
    out, err = capfd.readouterr()
    assert '| epoch   1 step        3 ' in out and 'tok_s' not in out + err


def step_trainer(*flags, n_token=40):
    """A Trainer of the tiny model (no dropout, no memory: two trainers given the same batches take the same steps)
    and one batch of it."""
    config = parse([*TINY, '--mem_len', '0', *flags])
    torch.manual_seed(0)
    trainer = Trainer(config, build_model(config.flags, n_token), torch.device('cpu'), print, None)
    data = torch.randint(0, n_token, (config.tgt_len + 1, config.batch_size))
    return trainer, data[:-1], data[1:]


def nan_loss_step(trainer, data, target):
    """One training step whose loss is NaN (so are its gradients)."""
    forward = trainer.forward_model
    def nan_loss(*inputs, return_moe_stats):
        ret, moe_stats = forward(*inputs, return_moe_stats=True)
        return [ret[0] * float('nan'), *ret[1:]], moe_stats
    trainer.forward_model = nan_loss
    try:
        return trainer.train_step(data, target)
    finally:
        trainer.forward_model = forward


def trainer_tensors(trainer):
    state = trainer.optimizer.state_dict()['state']
    return [p.detach().clone() for p in trainer.model.parameters()] + \
        [v.clone() for s in state.values() for v in s.values() if torch.is_tensor(v)]


@pytest.mark.parametrize('optim', ['adam', 'sgd', 'adagrad'])
def test_the_fused_optimizer_skips_a_nonfinite_step_on_the_device(optim):
    """torch's fused kernels take the non-finite flag as a device tensor (GradScaler's found_inf) and leave the
    weights, the moments and the step count as they were, with no host read (the test of test_fast_paths)."""
    trainer, data, target = step_trainer('--optim', optim, '--mom', '0.9', '--lr', '0.01')
    trainer.train_step(data, target)
    before = trainer_tensors(trainer)
    assert skips_on_device(trainer.optimizer)
    log = OpLog()
    with log:
        loss = nan_loss_step(trainer, data, target)
    assert not SYNCS & set(log.ops) and not torch.isfinite(loss)
    after = trainer_tensors(trainer)
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))
    assert trainer.window.totals()['n_skipped'] == trainer.window.totals()['n_nonfinite'] == 1
    assert (int(trainer.nonfinite_run), trainer.step) == (1, 2)


def test_fused_sgd_with_momentum_reads_the_flag_on_its_first_step():
    """Fused SGD allocates its momentum buffers in its first step and leaves them uninitialised when it skips
    that step on the device; so that first step reads the flag on the host and does not call the optimizer."""
    trainer, data, target = step_trainer('--optim', 'sgd', '--mom', '0.9', '--lr', '0.1')
    assert not skips_on_device(trainer.optimizer)
    nan_loss_step(trainer, data, target)
    trainer.train_step(data, target)
    assert skips_on_device(trainer.optimizer)
    fresh, _, _ = step_trainer('--optim', 'sgd', '--mom', '0.9', '--lr', '0.1')
    fresh.train_step(data, target)  # the same good step, without the skipped one before it
    after_skip, fresh_only = trainer_tensors(trainer), trainer_tensors(fresh)
    assert len(after_skip) == len(fresh_only) and all(torch.equal(a, b) for a, b in zip(after_skip, fresh_only))
    # torch's behaviour that the rule works around: a skipped first step leaves the buffers uninitialised
    p = torch.nn.Parameter(torch.zeros(1000))
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True)
    p.grad, sgd.found_inf = torch.ones(1000), torch.ones(())
    sgd.step()
    assert 'momentum_buffer' in sgd.state[p]  # allocated by a step that did not run


@pytest.mark.parametrize('own_overflow', [False, True])
def test_the_loss_scale_follows_the_step_skip_decision(own_overflow):
    """torch's GradScaler.update reads the overflow record that record_skip rewrites: the scale halves when the
    step is skipped and grows when it is applied, whatever this process's own gradients showed (under expert
    parallelism another process's expert may have overflowed). Left to itself, the scaler follows its own record."""
    def scale_after(skip, record):
        p = torch.nn.Parameter(torch.zeros(3))
        p.grad = torch.full((3,), math.inf if own_overflow else 1.)
        optimizer = torch.optim.SGD([p], lr=0.1)
        scaler = torch.amp.GradScaler('cpu', init_scale=1024., growth_interval=1)
        scaler.scale(torch.ones(()))   # the scale tensor is made at the first call
        scaler.unscale_(optimizer)
        if record:
            record_skip(scaler, optimizer, torch.tensor(not skip))
        scaler.update()
        return scaler.get_scale()
    own = 512. if own_overflow else 2048.
    assert scale_after(skip=not own_overflow, record=False) == own   # torch's scaler: its own record
    assert scale_after(skip=not own_overflow, record=True) == (2048. if own_overflow else 512.)
    assert scale_after(skip=own_overflow, record=True) == own


@pytest.mark.parametrize('optim', ['adam', 'sgd'], ids=['skipped-on-the-device', 'read-on-the-host'])
def test_a_skipped_step_leaves_the_auxfree_bias_alone(optim):
    """The aux-loss-free gates' biases move after applied steps only: a skipped step's update has rate 0 (fused
    Adam skips on the device; fused SGD's first step reads the flag on the host). The next good step moves them by
    rate * sign(mean load - load), from that step's load."""
    trainer, data, target = step_trainer(*MOE, '--moe-gate', 'auxfree', '--optim', optim, '--mom', '0.9')
    gates = [ff.gate for ff in trainer.model.moe_layers()]
    assert skips_on_device(trainer.optimizer) == (optim == 'adam')
    nan_loss_step(trainer, data, target)
    assert trainer.window.totals()['n_skipped'] == 1
    assert all(torch.equal(gate.expert_bias, torch.zeros(4)) for gate in gates)
    before = trainer.window.moe_load.clone()   # the skipped step's
    trainer.train_step(data, target)
    load = (trainer.window.moe_load - before).float()   # this step's
    rate = trainer.config.flags.moe_bias_update_rate
    for gate, layer_load in zip(gates, load):
        assert torch.equal(gate.expert_bias, rate * torch.sign(layer_load.mean() - layer_load))
    assert any(gate.expert_bias.abs().sum() > 0 for gate in gates)


def test_the_nonfinite_stop_comes_at_the_next_log_line(tmp_path, corpus, poisoned_steps, monkeypatch):
    """The limit is checked where the host reads anyway: at log lines and checkpoints (on a GPU a read is a sync)."""
    monkeypatch.setattr('run.trainer.NONFINITE_LIMIT', 4)
    poisoned_steps.update(range(7, 100))
    work = tmp_path / 'run'
    assert run(work, corpus, '--max_step', '30', '--log-interval', '6', '--save-interval', '20',
               '--eval-interval', '100') == 1
    log = (work / 'log.txt').read_text()
    assert 'non-finite for 4 steps in a row (up to step 10; seen at step 12)' in log
    assert [r['step'] for r in records(work, 'train')] == [6]


def test_a_bug_keeps_its_traceback_while_bad_input_is_one_line(tmp_path, corpus):
    """Only the UserError family (and the file system's OSError) is bad input: a ValueError from a bug is not turned
    into a one-line error and exit code 2 but ends the run with its traceback."""
    bug = ('import sys\nimport run.training\n'
           'def build_model(*args, **kwargs):\n    raise ValueError("a bug, not bad input")\n'
           'run.training.build_model = build_model\nsys.exit(run.training.main(sys.argv[1:]))\n')
    flags = ['--data', str(corpus), *TINY, '--max_step', '1']
    done = subprocess.run([sys.executable, '-c', bug, *flags, '--work_dir', str(tmp_path / 'bug')], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 1 and 'Traceback (most recent call last)' in done.stderr
    assert done.stderr.rstrip().endswith('ValueError: a bug, not bad input')
    done = subprocess.run([sys.executable, 'train.py', *flags, '--batch_chunk', '3', '--work_dir', str(tmp_path / 'bad')],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and 'Traceback' not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == 'train.py: error: --batch_chunk 3 must divide --batch_size 4'
    assert not (tmp_path / 'bad').exists()
