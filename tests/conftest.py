"""What the test modules share: one CPU thread, tiny models, tiny corpora and the train.py flags of a tiny run.

Test modules import the plain helpers (`from conftest import tiny_model, TINY`) and use the fixtures by name.
"""
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from mem_transformer import MemTransformerLM, init_weights

ROOT = Path(__file__).resolve().parents[1]

WORDS = ('the of and in to a was is for as on by with he that at from his it an were are which this be or '
         'first new also after has had not two their its been one who but they her all she other time').split()
# train.py on 2 layers of d_model 32, one or two MoE experts per token: each step takes milliseconds on a CPU.
TINY = ['--dataset', 'enwik8', '--n_layer', '2', '--d_model', '32', '--n_head', '2', '--d_head', '16',
        '--d_inner', '64', '--tgt_len', '16', '--mem_len', '16', '--eval_tgt_len', '16', '--batch_size', '4',
        '--log-interval', '1', '--eval-interval', '10', '--max_eval_steps', '5', '--lr', '0.002']
MOE = ['--moe', '--moe-num-expert', '4', '--moe-top-k', '2']


class OpLog(TorchDispatchMode):
    """Records the name of every aten op run inside it: a host read shows up as one of SYNCS."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__.split('.')[0])
        return func(*args, **(kwargs or {}))


# Ops that read a value back to the host, or (bincount: the range of its input) do so inside their CUDA kernel.
SYNCS = {'_local_scalar_dense', 'is_nonzero', 'nonzero', 'masked_select', 'unique', 'item', 'bincount'}


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')


@pytest.fixture(params=['cpu', pytest.param('cuda', marks=CUDA)])
def device(request):
    """Every device the fast paths run on: a test taking `device` runs on the CPU, and again on the GPU where
    there is one (the CUDA tier: `python -m pytest -k cuda`). TF32 stays off: the comparisons are fp32's."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield torch.device(request.param)
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(autouse=True, scope='session')
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine two threads spin-wait each other.
    Session-wide, so module fixtures that train run on one thread too."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


@pytest.fixture(autouse=True)
def back_to_one_thread():
    yield
    torch.set_num_threads(1)  # a test that ran a script with --threads leaves no trace


def tiny_model(n_token=40, seed=0, init_std=0.2, router_bias_std=None, **config):
    """A 2-layer model of d_model 16 in evaluation mode, initialized as train.py does (with larger
    standard deviations, so that tokens differ visibly). router_bias_std: MoE gate biases drawn from
    N(0, std), so that routing varies from token to token."""
    torch.manual_seed(seed)
    config = dict(dict(n_layer=2, n_head=2, d_model=16, d_head=8, d_inner=24, dropout=0.0, dropatt=0.0,
                       tgt_len=6, ext_len=0, mem_len=6), **config)
    model = MemTransformerLM(n_token, **config)
    init_weights(model, init_std=init_std, proj_init_std=init_std)
    if router_bias_std is not None:
        for ff in model.moe_layers():
            if getattr(ff.gate, 'gate', None) is not None:  # the noisy gate has no linear router
                nn.init.normal_(ff.gate.gate.bias, 0.0, router_bias_std)
    return model.eval()


def segments_and_grads(model, data, tgt_len=5, train=True):
    """Per-token losses of three consecutive segments (memory carried) and the parameter gradients."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    mems, losses = (), []
    with torch.set_grad_enabled(train):
        for i in range(0, 3 * tgt_len, tgt_len):
            out = model(data[i:i + tgt_len], data[i + 1:i + 1 + tgt_len], *mems)
            losses.append(out[0])
            mems = out[1:]
        total = torch.stack(losses)
        if train:
            total.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total.detach(), grads


def write_corpus(directory, sizes=(40000, 4000, 4000), seed=0):
    """A character corpus in the prepared enwik8 format: byte ids separated by spaces, one text line a line."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, size in zip(('train', 'valid', 'test'), sizes):
        text = ''
        while len(text) < size:
            text += ' '.join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + '.\n'
        lines = text[:size].encode().split(b'\n')
        (directory / f'{split}.txt').write_text('\n'.join(' '.join(map(str, line)) for line in lines))
    return directory


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp('enwik8'))


WIKI_TEXT = ("<page>\n  <title>Anarchism</title>\n  <text>'''Anarchism''' is a [[political philosophy]] "
             "&amp; movement of 1840.</text>\n</page>\n")


def make_enwik8_dir(path, text=WIKI_TEXT):
    """A corpus in prep_enwik8's format: every byte as its decimal id, lines kept."""
    os.makedirs(path, exist_ok=True)
    for split, copies in (('train', 8), ('valid', 3), ('test', 2)):
        with open(os.path.join(path, f'{split}.txt'), 'w') as f:
            for line in (text * copies).splitlines():
                f.write(' '.join(str(b) for b in line.encode()) + '\n')
    return str(path)


def make_run(tmp_path, prepare=None, **config):
    """A run directory whose model.pt (untrained weights, changed by `prepare`) points at a tiny
    enwik8-format corpus: what generate.py, eval.py and moe_report.py read. Returns (run, data, model)."""
    import data_utils
    from run.model_file import save_model
    data = make_enwik8_dir(tmp_path / 'data')
    n_token = len(data_utils.get_lm_corpus(data, 'enwik8').vocab)
    config = dict(dict(init_std=0.3, router_bias_std=1.0, tgt_len=8, mem_len=32), **config)
    model = tiny_model(n_token=n_token, **config)
    if prepare is not None:
        with torch.no_grad():
            prepare(model)
    run = tmp_path / 'run'
    run.mkdir()
    save_model(run / 'model.pt', model, args={'dataset': 'enwik8', 'data': data})
    return str(run), data, model


def fake_python(folder):
    """An interpreter that prints its command line; asked for the GPU count (-c) it answers FAKE_GPUS."""
    path = folder / 'python'
    path.write_text('#!/bin/sh\n'
                    'if [ "$1" = -c ]; then echo "${FAKE_GPUS:-0}"; exit; fi\n'
                    'for a in "$@"; do echo "$a"; done\n')
    path.chmod(0o755)
    return path


def launch(tmp_path, script, mode, *flags, **env):
    """The command lines a run script (`bash run_x.sh train|eval flags`) launches, as lines."""
    env = dict(dict(os.environ, PYTHON=str(fake_python(tmp_path)), DATA_ROOT='data', NPROC='', TORCHRUN_ARGS='', AMP=''),
               **env)
    done = subprocess.run(['bash', str(ROOT / script), mode, *flags], env=env, capture_output=True, text=True,
                          check=True)
    return done.stdout.splitlines()


LIMITED_MAIN = '''
import json, resource, sys
import convert_checkpoint
status = open('/proc/self/status').read()
size = int(status.split('VmSize:')[1].split()[0]) * 1024
limit = size + int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for argv in json.loads(sys.argv[1]):
    print(convert_checkpoint.main(argv), flush=True)
'''


def convert_with_memory_limit(argvs, limit=1 << 30, timeout=120):
    """convert_checkpoint.main(argv) for each argv, in a child process whose address space may grow by only
    `limit` bytes once imported (a command that would take more fails there, not on this machine). Returns
    (exit codes, stderr lines)."""
    import json
    import sys
    done = subprocess.run([sys.executable, '-c', LIMITED_MAIN, json.dumps([[str(a) for a in argv] for argv in argvs]),
                           str(limit)], capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    return [int(line) for line in done.stdout.split()], done.stderr.splitlines()


def sigint_at_training_forward(patch, n, when=lambda model: True):
    """Ctrl-C in the middle of a run: the n-th training forward (counting only models for which `when` holds)
    sends this process SIGINT, then runs as usual. `patch` is a monkeypatch (or its context)."""
    forward, calls = MemTransformerLM.forward, [0]

    def interrupting_forward(self, *args, **kwargs):
        if self.training and when(self):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGINT)
        return forward(self, *args, **kwargs)
    patch.setattr(MemTransformerLM, 'forward', interrupting_forward)
