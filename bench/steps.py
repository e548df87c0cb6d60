"""The training step the benchmarks time (bench_train.py, bench_eval.py, bench_memory.py, run_all.py): their
model configurations, train.py's own Trainer stepping one of them, and the options of the training-step
benchmark."""
import contextlib
import time

import torch

import timing  # noqa: F401  (puts the repository on sys.path)
import mem_transformer as mt
from tests.reference_attention import original_layout
from run.options import parse
from run.trainer import Trainer

DTYPES = {'fp32': None, 'bf16': torch.bfloat16}
CPU_SIZED = dict(n_token=204, n_layer=4, n_head=4, d_model=256, d_head=64, d_inner=1024,
                 tgt_len=128, mem_len=128, bsz=8)
CONFIGS = {
    'cpu-dense': CPU_SIZED,
    'cpu-moe16': dict(CPU_SIZED, d_inner=512, moe=True, moe_num_expert=16, moe_top_k=2),
    'cpu-moe64': dict(CPU_SIZED, d_inner=512, moe=True, moe_num_expert=64, moe_top_k=2),
    # The enwik8 base model (run_enwik8_base.sh) at tgt_len = mem_len = 128 and batch 8.
    'enwik8-base': dict(CPU_SIZED, n_layer=12, n_head=8, d_model=512, d_head=64, d_inner=2048),
}
DROPOUT, DROPATT, LR, CLIP = 0.1, 0.0, 2.5e-4, 0.25  # run_enwik8_base.sh's


@contextlib.contextmanager
def fast_paths(model, enabled):
    """For the duration of a step, the model's fast paths on, or off: the original's seq-first attention
    arithmetic (tests/reference_attention.py), nn.Dropout's masks, no SDPA."""
    model.set_fast_paths(sdpa=enabled, dropout=enabled)
    with contextlib.nullcontext() if enabled else original_layout():
        yield


def build_model(config, seed=0, dropout=DROPOUT):
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in config.items() if k != 'bsz'}
    model = mt.MemTransformerLM(dropout=dropout, dropatt=DROPATT, ext_len=0, **kwargs)
    return mt.init_weights(model)


def random_batch(config, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config['n_token'], (config['tgt_len'] + 1, config['bsz']), generator=gen)


def trainer_args(dtype, batch_chunk=1, compiled=False, optim='adam'):
    """train.py's run configuration for a benchmark step: run_enwik8_base.sh's clip, a constant learning rate."""
    flags = ['--optim', optim, '--lr', str(LR), '--clip', str(CLIP), '--scheduler', 'constant',
             '--batch_chunk', str(batch_chunk), '--amp', 'none' if DTYPES[dtype] is None else dtype]
    return parse(flags + ['--compile'] * compiled)


class OptimizerClock:
    """Seconds of each optimizer.step(), from the optimizer's own step hooks."""

    def __init__(self, optimizer):
        self.seconds, self.start = [], None
        optimizer.register_step_pre_hook(self.started)
        optimizer.register_step_post_hook(self.stopped)

    def started(self, *unused):
        self.start = time.perf_counter()

    def stopped(self, *unused):
        self.seconds.append(time.perf_counter() - self.start)


class TrainStep:
    """train.py's own Trainer (its optimizer, gradient scaler, clipping, MoE statistics) on a model of
    `config`, with a full memory; each call is one Trainer.train_step on a fixed batch.
    paths: 'fast' (the default), 'plain' (fast paths off) or 'compiled' (fast, under torch.compile as
    train.py --compile; the first two calls compile). optimizer: 'train.py' (build_optimizer's) or
    'per-parameter loop' (torch.optim.Adam(foreach=False), what train.py ran before it chose)."""

    def __init__(self, config, dtype='fp32', paths='fast', batch_chunk=1, seed=0, optimizer='train.py'):
        model = build_model(config, seed).train()
        run_config = trainer_args(dtype, batch_chunk, paths == 'compiled')
        self.trainer = Trainer(run_config, model, torch.device('cpu'), log=None, metrics=None)
        if optimizer == 'per-parameter loop':
            self.trainer.optimizer = torch.optim.Adam(model.parameters(), lr=LR, foreach=False)
        self.model, self.fast = self.trainer.model, paths != 'plain'
        self.clock = OptimizerClock(self.trainer.optimizer)
        self.batch = random_batch(config, seed)

    def __call__(self, batch=None):
        """One step on `batch` [tgt_len + 1, bsz] (inputs then shifted targets); returns the mean loss, a
        0-dim tensor as Trainer.train_step returns it (reading it is the caller's choice)."""
        batch = self.batch if batch is None else batch
        with fast_paths(self.trainer.model, self.fast):
            return self.trainer.train_step(batch[:-1], batch[1:])


# Equal active FLOPs: two experts of 512 per token against one feed-forward of 1024 (the MoE step's gate
# adds 1.5% to its FLOPs, not counted in the ratio).
MOE_VS_DENSE = ('cpu-moe64', 'cpu-dense')


def add_train_args(p):
    """The options of the training-step benchmark that run_all.py takes too."""
    p.add_argument('--loss-steps', type=int, default=200, help='steps of the bf16 loss check (0 skips it)')
    p.add_argument('--compile', action='store_true',
                   help='add torch.compile rows (train.py --compile) for cpu-dense; compiling takes minutes')


def check_train_args(p, args):
    if args.loss_steps < 0:
        p.error(f'--loss-steps must be >= 0, got {args.loss_steps}')
    if args.quick:
        args.loss_steps = min(args.loss_steps, 40)
    args.compiled = ('cpu-dense',) if args.compile else ()   # the configurations with compiled rows
