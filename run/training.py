"""A training run: train.py's flags and their checks, the model and optimizer they describe, the Trainer (it
takes the optimizer steps, validates and writes the checkpoints that resume it exactly), and the run itself
(`main`: data, run directory, resume, training, the test), which train.py runs and study.py calls for each
of its runs. The benchmarks and the tests build their pieces from here.
"""
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch

import data_utils
import mem_transformer
from utils import checkpoint as ckpt
from utils import files
from utils import malloc
from run.distributed import DEFAULT_TIMEOUT_S, Dist, SilentLog, is_peer_failure
from run.distributed import fail as fail_distributed
from run.evaluation import evaluate, validation_lengths
from utils.exp_utils import (Logger, MetricsWriter, OneLineArgumentParser, char_level, format_loss, loss_fields,
                             metric_text, peak_memory_mb, pick_device, set_deterministic, tensorboard_missing,
                             use_tf32)
from utils.files import progress_bar
from moe import GATES
from utils.schedules import SCHEDULERS, PlateauDecay, learning_rate

# The run stops when the loss itself (not just the scaled gradients) is non-finite this many steps in a row.
NONFINITE_LIMIT = 10
# Settings that may differ when starting from another run's weights (--restart_dir): they shape no tensor.
RUNTIME_KEYS = ('dropout', 'dropatt', 'tgt_len', 'ext_len', 'mem_len', 'same_length', 'clamp_len',
                'moe_capacity_factor', 'moe_eval_capacity_factor', 'moe_balance_coef', 'moe_zloss_coef',
                'moe_switch_eps', 'moe_random_routing')



def build_parser():
    p = OneLineArgumentParser(prog='train.py', description='PyTorch Transformer Language Model')
    add = p.add_argument
    # Data and model: the original's flags, names and defaults.
    add('--data', type=str, default='../data/wikitext-103', help='location of the data corpus')
    add('--dataset', type=str, default='wt103', choices=data_utils.DATASETS, help='dataset name')
    add('--n_layer', type=int, default=12, help='number of layers')
    add('--n_head', type=int, default=10, help='number of attention heads')
    add('--d_head', type=int, default=50, help='dimension of each head')
    add('--d_embed', type=int, default=-1, help='embedding dimension (-1: d_model)')
    add('--d_model', type=int, default=500, help='model dimension')
    add('--d_inner', type=int, default=1000, help='inner dimension of the feed-forward (of each expert)')
    add('--dropout', type=float, default=0.0, help='global dropout rate')
    add('--dropatt', type=float, default=0.0, help='attention probability dropout rate')
    add('--init', default='normal', type=str, choices=['normal', 'uniform'], help='parameter initializer')
    add('--emb_init', default='normal', type=str,
        help='kept for compatibility: the original parsed it but initialized embeddings with --init')
    add('--init_range', type=float, default=0.1, help='uniform init: U(-init_range, init_range)')
    add('--emb_init_range', type=float, default=0.01,
        help='kept for compatibility: parsed but unused, as in the original')
    add('--init_std', type=float, default=0.02, help='normal init: N(0, init_std)')
    add('--proj_init_std', type=float, default=0.01, help='projections: N(0, proj_init_std)')
    # Optimization.
    add('--optim', default='adam', type=str, choices=['adam', 'sgd', 'adagrad'], help='optimizer')
    add('--lr', type=float, default=0.00025, help='initial learning rate (0.00025|5 for adam|sgd)')
    add('--mom', type=float, default=0.0, help='momentum for sgd')
    add('--scheduler', default='cosine', type=str, choices=SCHEDULERS, help='learning-rate schedule')
    add('--warmup_step', type=int, default=0, help='steps of linear warmup')
    add('--decay_rate', type=float, default=0.5, help='decay factor of dev_perf (reduce on plateau)')
    add('--lr_min', type=float, default=0.0, help='minimum learning rate of dev_perf')
    add('--clip', type=float, default=0.25, help='gradient clipping (max global norm)')
    add('--clip_nonemb', action='store_true',
        help='clip only the gradient of non-embedding parameters (the original parsed this but ignored it)')
    add('--max_step', type=int, default=100000, help='number of training steps')
    add('--batch_size', type=int, default=60, help='batch size')
    add('--batch_chunk', type=int, default=1, help='split each batch into chunks to save memory')
    add('--tgt_len', type=int, default=70, help='number of tokens to predict')
    add('--eval_tgt_len', type=int, default=50, help='number of tokens to predict for evaluation')
    add('--ext_len', type=int, default=0, help='length of the extended context')
    add('--mem_len', type=int, default=0, help='length of the retained previous heads')
    add('--not_tied', action='store_true', help='do not tie the word embedding and softmax weights')
    add('--seed', type=int, default=1111, help='random seed')
    add('--cuda', action='store_true', help='use CUDA (without a GPU the run stays on the CPU)')
    add('--adaptive', action='store_true', help='use adaptive softmax (wt103, lm1b)')
    add('--div_val', type=int, default=1, help='divident value for adaptive input and softmax')
    add('--pre_lnorm', action='store_true', help='apply LayerNorm to the input instead of the output')
    add('--varlen', action='store_true', help='use variable length')
    add('--multi_gpu', action='store_true', help='multi-device training: launch with torchrun instead')
    add('--log-interval', type=int, default=200, help='report interval')
    add('--eval-interval', type=int, default=4000, help='evaluation interval')
    add('--work_dir', default='LM-TFM', type=str, help='the run directory (created if needed)')
    add('--restart', action='store_true', help='resume exactly from WORK_DIR/checkpoint.pt')
    add('--restart_dir', type=str, default='', help="start from another run's model.pt (and optimizer.pt)")
    add('--debug', action='store_true', help='run in debug mode (write nothing)')
    add('--same_length', action='store_true', help='use the same attn length for all tokens')
    add('--attn_type', type=int, default=0,
        help='attention type. 0 for ours, 1 for Shaw et al, 2 for Vaswani et al, 3 for Al Rfou et al.')
    add('--clamp_len', type=int, default=-1, help='use the same pos embeddings after clamp_len')
    add('--untie_r', action='store_true',
        help='attn_type 0: a pair of r_w_bias/r_r_bias per layer (the TensorFlow and Hugging Face models) instead '
             'of one pair shared by all layers (the original PyTorch code)')
    add('--eta_min', type=float, default=0.0, help='min learning rate for cosine scheduler')
    add('--gpu0_bsz', type=int, default=-1, help='batch size on gpu 0 (multi-device: see --multi_gpu)')
    add('--max_eval_steps', type=int, default=-1, help='max eval steps')
    add('--sample_softmax', type=int, default=-1, help='number of samples in sampled softmax')
    add('--patience', type=int, default=0, help='patience of dev_perf')
    add('--finetune_v2', action='store_true', help='kept for compatibility (unused, as in the original)')
    add('--finetune_v3', action='store_true', help='kept for compatibility (unused, as in the original)')
    add('--fp16', action='store_true', help='mixed precision: same as --amp fp16')
    add('--static-loss-scale', type=float, default=None,
        help='fixed loss scale for fp16 (default 1 with --fp16, as the original; --amp fp16 scales dynamically)')
    add('--dynamic-loss-scale', action='store_true',
        help='dynamic loss scaling for fp16 (supersedes --static-loss-scale)')
    # New in this port.
    add('--amp', default='none', choices=['none', 'fp16', 'bf16'],
        help='autocast precision; bf16 also runs on CPUs, fp16 uses a gradient scaler')
    add('--no-tf32', action='store_true',
        help='full fp32 matrix products on GPUs, as the original (default: TF32 on Ampere and newer)')
    add('--deterministic', action='store_true',
        help="deterministic kernels only (torch.use_deterministic_algorithms, cuBLAS's fixed workspace, no cuDNN "
             'autotuning): on a GPU, runs and resumes repeat bitwise on the same machine, at a cost')
    add('--compile', action='store_true',
        help='torch.compile the model (runs eagerly, with a warning, where it cannot compile); '
             'measured slower than the eager fast paths on CPUs')
    add('--tensorboard', action='store_true',
        help='also write what goes to metrics.jsonl as TensorBoard events into WORK_DIR (needs the tensorboard '
             'package): tensorboard --logdir of the runs\' parent directory compares them')
    add('--save-interval', type=int, default=1000,
        help='write WORK_DIR/checkpoint.pt every N steps (also at each evaluation, at the end, on a signal)')
    # FastMoE's flags and the MoE options of the model.
    add('--moe', action='store_true', help='replace the position-wise FFN with a Mixture of Experts')
    add('--moe-num-expert', type=int, default=64, help='number of experts in MoE')
    add('--moe-top-k', type=int, default=2, help='top_k experts in hard gate of moe')
    add('--moe-gate', default='naive', choices=GATES,
        help="FastMoE's gates (naive, gshard, switch, noisy) or auxfree: DeepSeek-V3's loss-free balancing bias")
    add('--moe-capacity-factor', type=float, default=1.2, help='expert capacity factor in training (gshard/switch)')
    add('--moe-eval-capacity-factor', type=float, default=2.4, help='expert capacity factor in evaluation')
    add('--moe-balance-coef', type=float, default=0.01, help='weight of the load-balance loss')
    add('--moe-zloss-coef', type=float, default=0.0, help='weight of the router z-loss')
    add('--moe-no-gate-bias', action='store_true', help='router logits without a bias (naive/gshard/switch/auxfree)')
    add('--moe-switch-eps', type=float, default=0.1, help="the switch gate's jitter: uniform noise in [1-eps, 1+eps]")
    add('--moe-no-random-routing', action='store_true',
        help="gshard gate: always keep the 2nd expert (no random routing in training)")
    add('--moe-shared-expert', type=int, default=0,
        help='N always-active shared experts beside the routed ones: a dense FFN of N x --d_inner')
    add('--moe-bias-update-rate', type=float, default=0.001,
        help='auxfree gate: each step, expert bias += rate * sign(mean load - load)')
    # Several processes (torchrun).
    add('--expert-parallel', action='store_true',
        help='under torchrun: split the experts of each MoE layer over the processes (all_to_all exchange)')
    add('--dist-timeout', type=int, default=DEFAULT_TIMEOUT_S,
        help='seconds a process waits for the others before giving up (torchrun runs)')
    return p


def flag(parser, dest):
    return next(a.option_strings[0] for a in parser._actions if a.dest == dest)


def check_args(args, parser):
    """Resolve derived settings; raise ValueError (one line) for an impossible or contradictory command line."""
    def fail(message):
        raise ValueError(message)

    for dest in ('n_layer', 'n_head', 'd_head', 'd_model', 'd_inner', 'max_step', 'batch_size', 'batch_chunk',
                 'tgt_len', 'eval_tgt_len', 'log_interval', 'eval_interval', 'moe_num_expert', 'div_val'):
        if getattr(args, dest) < 1:
            fail(f'{flag(parser, dest)} {getattr(args, dest)} must be at least 1')
    for dest in ('ext_len', 'mem_len', 'warmup_step', 'save_interval', 'patience', 'moe_shared_expert',
                 'moe_switch_eps', 'moe_bias_update_rate'):
        if getattr(args, dest) < 0:
            fail(f'{flag(parser, dest)} {getattr(args, dest)} must be non-negative')
    if not args.work_dir:
        fail('--work_dir is empty (an unset shell variable?): name the run directory')
    # Real numbers with their meaningful ranges; `not low < x` also refuses NaN.
    for dest, low, high, low_ok in (('lr', 0, math.inf, False), ('clip', 0, math.inf, False),
                                    ('mom', 0, math.inf, True), ('decay_rate', 0, 1, False),
                                    ('lr_min', 0, math.inf, True), ('eta_min', 0, math.inf, True),
                                    ('init_range', 0, math.inf, False), ('init_std', 0, math.inf, False),
                                    ('proj_init_std', 0, math.inf, False),
                                    ('moe_capacity_factor', 0, math.inf, False),
                                    ('moe_eval_capacity_factor', 0, math.inf, False),
                                    ('moe_balance_coef', 0, math.inf, True), ('moe_zloss_coef', 0, math.inf, True)):
        value = getattr(args, dest)
        if not (math.isfinite(value) and (low <= value if low_ok else low < value) and value <= high):
            bounds = f'{"at least" if low_ok else "above"} {low}' + (f' and at most {high}' if high < math.inf else '')
            fail(f'{flag(parser, dest)} {value} must be a finite number {bounds}')
    if args.batch_size % args.batch_chunk:
        fail(f'--batch_chunk {args.batch_chunk} must divide --batch_size {args.batch_size}')
    if not 1 <= args.moe_top_k <= args.moe_num_expert:
        fail(f'--moe-top-k {args.moe_top_k} must be between 1 and --moe-num-expert {args.moe_num_expert}')
    if args.adaptive and args.dataset not in data_utils.ADAPTIVE_CUTOFFS:
        fail(f'--adaptive is for the large word-level vocabularies ({", ".join(data_utils.ADAPTIVE_CUTOFFS)}), '
             f'not --dataset {args.dataset}')
    if args.same_length and args.mem_len == 0:
        fail('--same_length needs a memory (--mem_len > 0): without one it masks every key and the loss is NaN')
    if args.fp16:
        if args.amp == 'bf16':
            fail('--fp16 means --amp fp16 and contradicts --amp bf16')
        args.amp = 'fp16'
    if args.amp == 'fp16' and args.static_loss_scale is not None and args.static_loss_scale <= 0:
        fail(f'--static-loss-scale {args.static_loss_scale} must be positive')
    if args.amp == 'fp16' and not args.dynamic_loss_scale and args.static_loss_scale is None:
        # --fp16 keeps the original's default (a static scale of 1); the new --amp fp16 scales dynamically.
        if args.fp16:
            args.static_loss_scale = 1.
        else:
            args.dynamic_loss_scale = True
    if args.untie_r and args.attn_type != 0:
        fail(f'--untie_r unties the biases shared by the layers of --attn_type 0, not {args.attn_type}')
    if args.expert_parallel and not args.moe:
        fail('--expert-parallel splits the experts of --moe layers: add --moe')
    if args.dist_timeout < 1:
        fail(f'--dist-timeout {args.dist_timeout} must be at least 1 second')
    if args.restart and not args.restart_dir and args.debug:
        fail('--restart reads WORK_DIR/checkpoint.pt, which --debug runs never write')
    if args.tensorboard and tensorboard_missing():
        fail(f'--tensorboard: {tensorboard_missing()}, or drop --tensorboard')
    if args.d_embed < 0:
        args.d_embed = args.d_model
    args.tied = not args.not_tied
    # The model's own checks (dropout range, attention type...) before the corpus is read or cached; the
    # vocabulary size is not known yet, so the adaptive cutoffs are checked against it later.
    cutoffs = data_utils.ADAPTIVE_CUTOFFS[args.dataset][0] if args.adaptive else [0]
    mem_transformer.check_config(**model_config(args, max(cutoffs) + 1))



def model_config(args, n_token):
    cutoffs, tie_projs = [], [False]
    if args.adaptive:
        cutoffs, tie_tail = data_utils.ADAPTIVE_CUTOFFS[args.dataset]
        tie_projs = [False] + [tie_tail] * len(cutoffs)
    return dict(n_token=n_token, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
                d_head=args.d_head, d_inner=args.d_inner, dropout=args.dropout, dropatt=args.dropatt,
                tie_weight=args.tied, d_embed=args.d_embed, div_val=args.div_val, tie_projs=tie_projs,
                pre_lnorm=args.pre_lnorm, tgt_len=args.tgt_len, ext_len=args.ext_len, mem_len=args.mem_len,
                cutoffs=cutoffs, same_length=args.same_length, attn_type=args.attn_type,
                clamp_len=args.clamp_len, sample_softmax=args.sample_softmax, moe=args.moe,
                moe_num_expert=args.moe_num_expert, moe_top_k=args.moe_top_k, moe_gate=args.moe_gate,
                moe_capacity_factor=args.moe_capacity_factor,
                moe_eval_capacity_factor=args.moe_eval_capacity_factor,
                moe_balance_coef=args.moe_balance_coef, moe_zloss_coef=args.moe_zloss_coef,
                moe_gate_bias=not args.moe_no_gate_bias, moe_switch_eps=args.moe_switch_eps,
                moe_random_routing=not args.moe_no_random_routing, moe_shared_expert=args.moe_shared_expert,
                untie_r=args.untie_r)


def build_model(args, n_token, saved=None):
    """A freshly initialized model (the original's init), or another run's weights with --restart_dir
    (`saved`: its model.pt, when already read)."""
    model = mem_transformer.MemTransformerLM(**model_config(args, n_token))
    mem_transformer.init_weights(model, init=args.init, init_range=args.init_range, init_std=args.init_std,
                                 proj_init_std=args.proj_init_std)
    if args.restart_dir:
        path = os.path.join(args.restart_dir, 'model.pt')
        saved = saved or ckpt.load_run_file(path, 'model')
        arch = [k for k in model.config if k not in RUNTIME_KEYS]
        ckpt.check_config(model.full_config(saved['config']), model.config, path, keys=arch,
                          hint=' (the architecture flags must match the run it comes from)')
        ckpt.load_weights(model, saved['model_state'], path)
    return model



OPTIMIZERS = {'adam': torch.optim.Adam, 'sgd': torch.optim.SGD, 'adagrad': torch.optim.Adagrad}
_FUSED_PROBES = {}


def fused_available(optimizer_class, device):
    """Whether torch has a fused kernel of this optimizer for this device type (probed once: Adagrad's
    fused kernel is CPU-only, and torch only finds that out in the first step)."""
    key = (optimizer_class, torch.device(device).type)
    if key not in _FUSED_PROBES:
        try:
            p = torch.nn.Parameter(torch.zeros(2, device=device))
            p.grad = torch.ones_like(p)
            optimizer_class([p], lr=0.1, fused=True).step()
            _FUSED_PROBES[key] = True
        except (RuntimeError, ValueError, TypeError):
            _FUSED_PROBES[key] = False
    return _FUSED_PROBES[key]


def build_optimizer(args, model):
    """--optim's optimizer in the fastest implementation torch has for the parameters' device: one fused
    kernel over every tensor where it exists (on a CPU 10x faster than the per-parameter loop for Adam),
    else the multi-tensor foreach one. Same update up to rounding, same state_dict."""
    # The original gave the sampled softmax's embedding a sparse optimizer; this model's embedding gradients
    # are dense, so one optimizer covers every parameter.
    params = list(model.parameters())
    optimizer_class = OPTIMIZERS[args.optim]
    kwargs = dict(lr=args.lr, momentum=args.mom) if args.optim == 'sgd' else dict(lr=args.lr)
    fused = fused_available(optimizer_class, params[0].device)
    implementation = dict(fused=True, foreach=False) if fused else dict(fused=False, foreach=True)
    optimizer = optimizer_class(params, **kwargs, **implementation)

    def keep_implementation(optimizer, state_dict):
        # A saved state_dict carries its writer's implementation flags (None in checkpoints written before
        # this choice, fused=True from a device that has the kernel); loading keeps this device's choice.
        return dict(state_dict, param_groups=[dict(group, **implementation) for group in state_dict['param_groups']])
    optimizer.register_load_state_dict_pre_hook(keep_implementation)
    return optimizer


def skips_on_device(optimizer):
    """Whether optimizer.step() skips a non-finite step by itself, given the device flag `found_inf` that
    GradScaler hands to optimizers marked `_step_supports_amp_scaling` (torch's fused kernels): the update and
    the step count stay as they were, and the host never reads whether the step was finite. Not the first step
    of fused SGD with momentum: it allocates its momentum buffers then and leaves them uninitialised when it
    skips (tests/test_train.py shows it)."""
    if not getattr(optimizer, '_step_supports_amp_scaling', False):
        return False
    return all(not group.get('momentum') or
               all('momentum_buffer' in optimizer.state.get(p, {}) for p in group['params'])
               for group in optimizer.param_groups)


def non_embedding_parameters(model):
    embedding = {id(p) for name in ('word_emb', 'crit', 'out_layer') if hasattr(model, name)
                 for p in getattr(model, name).parameters()}
    return [p for p in model.parameters() if id(p) not in embedding]


class NonFiniteLoss(RuntimeError):
    pass


class Window:
    """Sums since the last log line. What a step adds is added where the step computed it, so that on a GPU nothing
    is read back to the host until the log line; checkpoints hold the sums as plain numbers, so that a resumed run
    logs the same averages."""

    counted = ('loss_sum', 'n_losses', 'n_nonfinite', 'n_skipped')  # in `sums`, one float64 tensor
    kept = ('n_steps', 'aux_sum', 'moe_load', 'moe_balance')

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums = None  # float64 on the losses' device: their sum rounds as the Python floats it replaced
        self.aux_sum, self.n_steps = 0., 0
        self.moe_load = self.moe_balance = None
        self.restart_clock()

    def add_step(self, loss, applied):
        """A step's mean loss (a 0-dim tensor) and whether its update was applied (a device bool, or a bool the
        host has read). Returns whether the loss is finite, as a device bool."""
        finite = torch.isfinite(loss)
        skipped = ~applied if torch.is_tensor(applied) else torch.full_like(finite, not applied)  # no host copy
        step = torch.stack([torch.where(finite, loss.double(), 0.), finite.double(), (~finite).double(),
                            skipped.double()])
        self.sums = step if self.sums is None else self.sums + step
        self.n_steps += 1
        return finite

    def totals(self):
        """The sums as plain numbers: the one read of the window from the device."""
        loss_sum, *counts = [0.] * len(self.counted) if self.sums is None else self.sums.tolist()
        return dict(loss_sum=loss_sum, **{k: int(n) for k, n in zip(self.counted[1:], counts)})

    def restart_clock(self):
        # Speed is measured over the steps this process ran, so a resumed window still reports true figures.
        self.start, self.timed_steps, self.timed_tokens = time.time(), 0, 0
        self.eval_s = 0.  # seconds of validation inside this window

    def train_seconds(self):
        return max(time.time() - self.start - self.eval_s, 1e-9)

    def add_moe(self, load, balance, weight):
        if load is None:
            return
        self.moe_load = load.detach().clone() if self.moe_load is None else self.moe_load + load.detach()
        balance = balance.detach().float() * weight
        self.moe_balance = balance if self.moe_balance is None else self.moe_balance + balance

    def state_dict(self):
        kept = {k: (v.cpu() if torch.is_tensor(v) else v) for k in self.kept for v in [getattr(self, k)]}
        return dict(self.totals(), **kept)

    def load_state_dict(self, state, device):
        self.sums = torch.tensor([state[k] for k in self.counted], dtype=torch.float64, device=device)
        for k in self.kept:
            v = state[k]
            setattr(self, k, v.to(device) if torch.is_tensor(v) else v)
        self.restart_clock()


class StopRequest:
    """SIGINT/SIGTERM end the run after the current step with a checkpoint; a second SIGINT interrupts at once."""

    def __init__(self):
        self.signum = None  # the signal this process received
        self.agreed = None  # the signal all processes act on (Dist.agree), the same step everywhere
        self.previous = {}

    def install(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def uninstall(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class Trainer:
    """The model, its optimizer and loss scaler, and every counter a checkpoint needs to continue exactly."""

    def __init__(self, args, model, device, log, metrics, dist=None, vocab=None, tr_iter=None):
        self.args, self.device, self.log, self.metrics = args, device, log, metrics
        self.vocab = vocab  # the symbols of an imported model's own vocabulary, kept in its checkpoints
        self.tr_iter = tr_iter  # its state_dict() is the data position a checkpoint holds
        self.dist = dist or Dist()
        self.model = self.dist.shard_experts(model.to(device))
        self.forward_model = self.dist.wrap(self.model)  # DDP under torchrun, else the model itself
        if args.compile:  # after DDP, so that the compiled graph lets the all-reduce overlap the backward
            mem_transformer.maybe_compile(self.forward_model)   # in place: state-dict keys stay the same
        model = self.model
        self.optimizer = build_optimizer(args, model)
        self.amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(args.amp)
        dynamic = args.dynamic_loss_scale or args.static_loss_scale is None
        self.static_scale = None if dynamic else args.static_loss_scale  # apex's dynamic scale started at 2^16
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2. ** 16 if dynamic else args.static_loss_scale,
                                           enabled=args.amp == 'fp16')
        self.plateau = PlateauDecay(args.decay_rate, args.patience)
        self.base_lr = args.lr  # --restart_dir may change it (constant/dev_perf go on at the saved rate, see main)
        self.clip_params = non_embedding_parameters(model) if args.clip_nonemb else list(model.parameters())
        self.step, self.epoch, self.batch = 0, 1, 0
        self.best_val_loss, self.last_eval_step = None, None
        # Steps in a row with a non-finite loss, and the step at which they reached NONFINITE_LIMIT (0: not yet):
        # device tensors once a step has run, read where the host reads anyway (check_nonfinite).
        self.nonfinite_run = self.limit_step = 0
        self.logged_loss = None  # the last log line's, for the progress bar
        self.eval_start = time.time()  # the eval line's clock, restarted by train() and by each validation
        self.mems = self.fresh_mems()
        self.window = Window()
        self.symbols = None  # the corpus's vocabulary, kept in checkpoints to refuse another one with as many symbols
        self.saved_step = self.pending_step = None  # of checkpoint.pt, and of a state not yet known good

    def fresh_mems(self):
        return [[] for _ in range(self.args.batch_chunk)]

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def lr(self):
        a = self.args
        return learning_rate(self.step, self.base_lr, a.scheduler, a.warmup_step, a.max_step, a.eta_min,
                             self.plateau.scale, a.lr_min)

    # ---------------------------------------------------------------- one optimizer step
    def train_step(self, data, target):
        """Forward and backward over the batch chunks (each with its own memory), then one optimizer step.

        Returns the step's mean loss in nats over every process, a 0-dim tensor on the device. A step whose
        gradients are not finite (fp16 overflow, or a non-finite loss) is skipped and counted; a loss non-finite
        NONFINITE_LIMIT times in a row stops the run (check_nonfinite). Nothing is read back to the host (a GPU
        sync) where the optimizer skips a step itself (torch's fused kernels: skips_on_device); the window's
        sums and the counters stay on the device until a log line, a validation or a checkpoint reads them.
        """
        args, model, window, dist = self.args, self.model, self.window, self.dist
        for group in self.optimizer.param_groups:
            group['lr'] = self.lr()
        self.optimizer.zero_grad(set_to_none=True)
        n_tokens, weight = target.numel(), dist.loss_weight(target.size(1))  # of the global batch
        data, target = dist.local(data), dist.local(target)  # this rank's columns
        n_chunk = args.batch_chunk
        step_loss, step_load = 0., None
        for i, (data_i, target_i) in enumerate(zip(data.chunk(n_chunk, 1), target.chunk(n_chunk, 1))):
            with dist.sync_context(last_chunk=i == n_chunk - 1):
                with self.autocast():
                    ret = self.forward_model(data_i.contiguous(), target_i.contiguous(), *self.mems[i])
                    loss = ret[0].float().mean() * weight
                    aux = model.aux_loss()
                self.mems[i] = ret[1:]
                self.scaler.scale((loss + aux) / n_chunk).backward()
            step_loss = step_loss + loss.detach() / n_chunk
            window.aux_sum = window.aux_sum + aux.detach().float() / n_chunk
            window.add_moe(model.moe_load(), model.moe_balance_loss(), 1. / n_chunk)
            if args.moe_gate == 'auxfree' and args.moe:
                step_load = model.moe_load() + (0 if step_load is None else step_load)

        dist.finish_grads(model)
        self.scaler.unscale_(self.optimizer)
        grad_norm = dist.clip_grad_norm_(self.clip_params, args.clip)
        finite = torch.isfinite(grad_norm)
        if args.clip_nonemb:  # the unclipped embedding gradients must be finite too
            finite = finite & torch.isfinite(dist.grad_norm(list(model.parameters())))
        applied = self.optimizer_step(finite)
        if step_load is not None:  # every rank the same update from the global load; a skipped step's rate is 0
            model.update_expert_bias(dist.sum(step_load), args.moe_bias_update_rate * applied)
        self.scaler.update(self.static_scale)
        self.step += 1

        step_loss = dist.mean(step_loss)  # every rank logs the global mean (an all-reduce; nothing is read)
        window.timed_steps += 1
        window.timed_tokens += n_tokens
        finite_loss = window.add_step(step_loss, applied)
        self.nonfinite_run = torch.where(finite_loss, 0, self.nonfinite_run + 1)
        self.limit_step = torch.where((self.nonfinite_run >= NONFINITE_LIMIT) & (self.limit_step == 0), self.step,
                                      self.limit_step)
        return step_loss

    def optimizer_step(self, finite):
        """The optimizer's update, unless `finite` (a device bool) is False. With the scaler of --amp fp16 the
        gradients are already unscaled, and a step with an overflow has a non-finite norm, so `finite` decides
        as GradScaler.step would. Returns whether the update was applied: the device flag itself where the
        optimizer skips on the device, else the bool read from it (one host sync)."""
        optimizer = self.optimizer
        if skips_on_device(optimizer):
            optimizer.found_inf = (~finite).float()  # GradScaler's contract with torch's fused optimizers
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
            return finite
        if bool(finite):
            optimizer.step()
            return True
        return False

    def check_nonfinite(self):
        """Stop the run once the loss has been non-finite NONFINITE_LIMIT steps in a row. Called where the host
        reads from the device anyway (log lines, checkpoints), on every device alike, so the stop can come up to
        --log-interval steps after the step that reached the limit."""
        limit_step = int(self.limit_step)
        if limit_step:
            later = f'; seen at step {self.step}' if self.step > limit_step else ''
            raise NonFiniteLoss(f'the loss was non-finite for {NONFINITE_LIMIT} steps in a row (up to step '
                                f'{limit_step}{later})')

    # ---------------------------------------------------------------- logging and evaluation
    def log_train(self):
        args, w = self.args, self.window
        # As the original's line: the rate of the next update, and the wall time since the last line (any
        # validation included) per step; tokens_per_s counts training time only.
        self.check_nonfinite()
        lr = self.lr()
        elapsed = time.time() - w.start
        sums = w.totals()
        n_skipped, n_nonfinite = sums['n_skipped'], sums['n_nonfinite']
        loss = sums['loss_sum'] / sums['n_losses'] if sums['n_losses'] else math.nan
        self.logged_loss = loss
        line = (f'| epoch {self.epoch:3d} step {self.step:>8d} | {self.batch:>6d} batches | lr {lr:.3g} '
                f'| ms/batch {elapsed * 1000 / max(w.timed_steps, 1):5.2f} | loss {loss:5.2f}')
        line += ' | ' + metric_text(args.dataset, loss)
        record = dict(step=self.step, split='train', epoch=self.epoch, batch=self.batch, loss=loss,
                      **loss_fields(args.dataset, loss), lr=lr, ms_per_batch=elapsed * 1000 / max(w.timed_steps, 1),
                      tokens_per_s=w.timed_tokens / w.train_seconds(), peak_mem_mb=peak_memory_mb(self.device),
                      skipped_steps=n_skipped, nonfinite_losses=n_nonfinite)
        if n_skipped or n_nonfinite:
            line += f' | skipped {n_skipped} steps ({n_nonfinite} non-finite losses)'
        if self.scaler.is_enabled():
            record['loss_scale'] = self.scaler.get_scale()
        if w.moe_load is not None:  # over all ranks: the load adds up, the losses are averaged
            record['moe_aux_loss'] = float(self.dist.mean(w.aux_sum)) / w.n_steps
            record['moe_balance_loss'] = (self.dist.mean(w.moe_balance) / w.n_steps).tolist()
            load = self.dist.sum(w.moe_load)
            record['moe_load'] = load.tolist()
            # max/mean of the experts' copy counts per layer: 1 is an even load, E all on one expert
            load = load.float()
            record['moe_imbalance'] = (load.max(1).values / load.mean(1).clamp(min=1e-9)).tolist()
            line += (f' | aux loss {record["moe_aux_loss"]:.4f}'
                     f' | imbalance {sum(record["moe_imbalance"]) / len(record["moe_imbalance"]):.2f}')
        self.log(line)
        self.metrics.write(**record)
        w.reset()

    def validation_loss(self, eval_iter):
        """The original's evaluation during training: eval_tgt_len segments, the lost context moved to
        the memory (or to the extended context without memory), then back to the training lengths."""
        args, model = self.args, self.model
        model.reset_length(*validation_lengths(args.tgt_len, args.eval_tgt_len, args.ext_len, args.mem_len))
        try:
            loss, _ = evaluate(model, eval_iter, args.max_eval_steps, self.autocast, self.dist)
        finally:
            model.reset_length(args.tgt_len, args.ext_len, args.mem_len)
            model.train()
        return loss

    def validate(self, va_iter, run_dir):
        start = time.time()
        val_loss = self.validation_loss(va_iter)
        args = self.args
        # time: since the previous validation ended (or training started), as the original's line.
        line = (f'| Eval {self.step // args.eval_interval:3d} at step {self.step:>8d} | time: '
                f'{time.time() - self.eval_start:5.2f}s | valid loss {val_loss:5.2f}')
        # the original's validation line names the split for perplexity only
        line += ' | ' + metric_text(args.dataset, val_loss, None if char_level(args.dataset) else 'valid')
        self.log('-' * 100)
        self.log(line)
        self.log('-' * 100)
        self.metrics.write(step=self.step, split='valid', loss=val_loss, **loss_fields(args.dataset, val_loss),
                           time_s=time.time() - start)
        if math.isfinite(val_loss) and (self.best_val_loss is None or val_loss < self.best_val_loss):
            self.best_val_loss = val_loss
            if run_dir:
                self.save_best(run_dir)
        if args.scheduler == 'dev_perf':
            self.plateau.update(val_loss)
        self.last_eval_step = self.step
        self.window.eval_s += time.time() - start  # evaluation time is not training speed
        self.eval_start = time.time()

    # ---------------------------------------------------------------- checkpoints
    # Under torchrun every rank takes part in gathering the expert shards and memories; rank 0 writes.
    def save_best(self, run_dir):
        dist = self.dist
        model_state = dist.full_model_state(self.model)
        optimizer = {'format': ckpt.FORMAT, 'kind': 'optimizer', 'step': self.step,
                     'optimizer_state': dist.full_optimizer_state(self.optimizer)}
        dist.write(lambda: (ckpt.save_model(os.path.join(run_dir, 'model.pt'), self.model.config, model_state,
                                            vocab=self.vocab, args=vars(self.args), step=self.step,
                                            val_loss=self.best_val_loss, vocab_symbols=self.symbols),
                            ckpt.atomic_save(optimizer, os.path.join(run_dir, 'optimizer.pt'))))

    def state_dict(self):
        dist = self.dist
        state = {'format': ckpt.FORMAT, 'kind': 'checkpoint', 'config': self.model.config, 'args': vars(self.args),
                 'model_state': dist.full_model_state(self.model),
                 'optimizer_state': dist.full_optimizer_state(self.optimizer),
                 'scaler_state': self.scaler.state_dict(), 'plateau': self.plateau.state_dict(),
                 'step': self.step, 'epoch': self.epoch, 'batch': self.batch, 'data': self.tr_iter.state_dict(),
                 'best_val_loss': self.best_val_loss, 'last_eval_step': self.last_eval_step,
                 'nonfinite_run': int(self.nonfinite_run), 'base_lr': self.base_lr, 'window': self.window.state_dict(),
                 'mems': dist.full_mems(self.mems), 'rng': ckpt.rng_state(), 'vocab_symbols': self.symbols}
        if self.vocab is not None:
            state['vocab'] = self.vocab
        if dist.active:  # each rank's own dropout stream, for an exact resume with the same world size
            state['rng_per_rank'] = dist.gather_objects(state['rng'])
        return state

    def load_state_dict(self, state):
        dist = self.dist
        ckpt.load_weights(self.model, dist.local_model_state(state['model_state'], self.model), 'checkpoint.pt')
        self.optimizer.load_state_dict(dist.local_optimizer_state(state['optimizer_state'], self.optimizer))
        self.scaler.load_state_dict(state['scaler_state'])
        self.plateau.load_state_dict(state['plateau'])
        for key in ('step', 'epoch', 'batch', 'best_val_loss', 'last_eval_step', 'nonfinite_run'):
            setattr(self, key, state[key])
        # The saved rate (constant/dev_perf may have taken it from --restart_dir's optimizer), unless --lr was
        # changed for this resume (as the divergence message advises): then the new --lr.
        if state['args'].get('lr') == self.args.lr:
            self.base_lr = float(state.get('base_lr', self.args.lr))  # checkpoints before base_lr: --lr
        self.tr_iter.load_state_dict(data_state(state))
        self.window.load_state_dict(state['window'], self.device)
        self.mems = dist.local_mems(state['mems'], self.device)
        dist.set_rng_state(state, self.args.seed, self.step)
        self.saved_step = self.step

    # A state is known to be good only once the step after it has a finite loss (weights of 1e30 are finite
    # but poison the next forward): it is written to checkpoint.pt.next, which becomes checkpoint.pt then.
    # At the end of training or on a signal there is no next step, and the state is kept at once.
    def save_checkpoint(self, run_dir, confirmed=False):
        """Write the state unless it follows a non-finite step; returns whether it was written."""
        self.check_nonfinite()
        if not run_dir or int(self.nonfinite_run):
            return False
        state = self.state_dict()
        self.dist.write(lambda: ckpt.atomic_save(state, os.path.join(run_dir, ckpt.PENDING)))
        self.pending_step = self.step
        if confirmed:
            self.settle_checkpoint(run_dir, good=True)
        return True

    def settle_checkpoint(self, run_dir, good):
        """After a step: a pending state becomes checkpoint.pt if the step's loss was finite, else it is dropped."""
        if self.pending_step is None:
            return
        pending, path = os.path.join(run_dir, ckpt.PENDING), os.path.join(run_dir, 'checkpoint.pt')
        self.dist.write(lambda: os.replace(pending, path) if good else os.remove(pending))
        if good:
            self.saved_step = self.pending_step
        self.pending_step = None

    # ---------------------------------------------------------------- the loop
    def next_epoch(self):
        self.epoch += 1
        self.batch = 0
        self.mems = self.fresh_mems()

    def train(self, va_iter, run_dir, stop):
        """Train until max_step or a stop signal; checkpoints every save_interval steps and at each eval."""
        args = self.args
        bar = progress_bar(args.max_step, 'step', initial=self.step)
        self.log.bar = bar
        self.eval_start = time.time()
        self.model.train()
        try:
            while self.step < args.max_step and stop.agreed is None:
                # The iterator continues from the position a checkpoint restored, else starts an epoch.
                for data, target, seq_len in self.tr_iter:
                    loss = self.train_step(data, target)
                    if self.dist.stop_check_due(self.step):  # all ranks stop after the same step
                        stop.agreed = self.dist.agree(stop.signum)
                    self.batch += 1
                    if run_dir and self.pending_step is not None:  # the loss is read after a save only
                        self.settle_checkpoint(run_dir, good=bool(torch.isfinite(loss)))
                    self.after_step(va_iter, run_dir, stop, bar)
                    if self.step >= args.max_step or stop.agreed is not None:
                        break
                else:
                    self.next_epoch()
        finally:
            if bar is not None:
                bar.close()
            self.log.bar = None

    def after_step(self, va_iter, run_dir, stop, bar):
        args = self.args
        if bar is not None:
            bar.update(1)
            # the loss of the last log line: reading each step's would make the host wait for the GPU every step
            shown = {} if self.logged_loss is None else {'loss': f'{self.logged_loss:.3f}'}
            bar.set_postfix(**shown, tok_s=f'{self.window.timed_tokens / self.window.train_seconds():.0f}')
        if self.step % args.log_interval == 0:
            self.log_train()
        evaluated = self.step % args.eval_interval == 0
        if evaluated:
            self.validate(va_iter, run_dir)
        last = stop.agreed is not None or self.step == args.max_step
        if last or evaluated or (args.save_interval and self.step % args.save_interval == 0):
            self.save_checkpoint(run_dir, confirmed=last)

    def test(self, te_iter, run_dir):
        """The original's end of training: the best model (model.pt) on the test split."""
        if run_dir and os.path.exists(os.path.join(run_dir, 'model.pt')):
            best = ckpt.load_run_file(os.path.join(run_dir, 'model.pt'), 'model')['model_state']
            ckpt.load_weights(self.model, self.dist.local_model_state(best, self.model), 'model.pt')
        test_loss = self.validation_loss(te_iter)
        self.log('=' * 100)
        self.log('| End of training ' + format_loss(self.args.dataset, 'test', test_loss))
        self.log('=' * 100)
        self.metrics.write(step=self.step, split='test', loss=test_loss, **loss_fields(self.args.dataset, test_loss))
        uniform = math.log(self.model.n_token)  # the loss of knowing nothing
        if not test_loss <= uniform:
            self.log(f'WARNING: the test loss {test_loss:.4g} is worse than a uniform guess over the '
                     f'{self.model.n_token} symbols ({uniform:.2f}): training diverged; try a lower --lr')
        return test_loss


def data_state(state):
    """The training iterator's state in a checkpoint. Checkpoints written before the iterators owned their
    position and RNG hold `position` (a row, or the shuffled iterator's dict) and numpy's global RNG, which
    drew the varlen lengths and shuffles: the same state in the iterator's terms."""
    if 'data' in state:
        return state['data']
    numpy = state['rng']['numpy']
    rng = [numpy['kind'], numpy['keys'].tolist(), numpy['pos'], numpy['has_gauss'], numpy['cached_gaussian']]
    position = state['position']
    if isinstance(position, dict):  # a shuffled corpus
        return dict(position, rng=rng)
    return {'position': position or 0, 'rng': rng}


def seed_everything(seed, device):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == 'cuda':
        torch.cuda.manual_seed_all(seed)


# ----------------------------------------------------------------------------- a run, as train.py runs it
# Flags that must not change on --restart: they fix the data order, the tensor shapes or the optimizer state.
RESUME_KEYS = ('dataset', 'batch_size', 'batch_chunk', 'tgt_len', 'ext_len', 'mem_len', 'varlen', 'optim', 'amp')
# Batch size of the validation and test iterators during training (the original's).
EVAL_BATCH_SIZE = 10


def check_work_dir(args):
    """Refuse to mix a new run into a directory that holds another one; --restart needs a checkpoint."""
    checkpoint_path = os.path.join(args.work_dir, 'checkpoint.pt')
    if not args.debug:
        files.check_writable_dir(args.work_dir, '--work_dir')
    if args.restart_dir:
        if not os.path.isfile(os.path.join(args.restart_dir, 'model.pt')):
            raise ValueError(f'--restart_dir {args.restart_dir} holds no model.pt to start from')
        if os.path.abspath(args.restart_dir) == os.path.abspath(args.work_dir):
            raise ValueError('--restart_dir is another run to start from; to resume this run use --restart')
    elif args.restart:
        if not os.path.isfile(checkpoint_path):
            raise ValueError(f'--restart: {checkpoint_path} does not exist (nothing to resume; drop --restart '
                             'to start a new run)')
        return
    if not args.debug:
        for name in ('checkpoint.pt', 'model.pt'):
            if os.path.exists(os.path.join(args.work_dir, name)):
                raise ValueError(f'--work_dir {args.work_dir} already holds a run ({name}): pass --restart to '
                                 'resume it or choose another --work_dir')


def claim_work_dir(args, dist, notes):
    """Once every check has passed: create the run directory and lock it for this run (torchrun's processes
    are one run: rank 0 holds the lock), then remove the temporary files of a run killed while writing.
    Returns the lock, to be kept for the whole run (None in debug mode)."""
    if args.debug:
        return None
    lock, error = None, None
    if dist.is_main:
        try:
            os.makedirs(args.work_dir, exist_ok=True)
            lock = files.lock_directory(args.work_dir, '--work_dir')
            check_work_dir(args)  # again under the lock: another run may have started here meanwhile
            removed = files.remove_orphans(args.work_dir, ckpt.RUN_FILES, extra=(ckpt.PENDING,))
            if removed:
                notes.append(f'Removed the temporary files of an interrupted run: {", ".join(removed)}')
        except (ValueError, OSError) as e:
            error = str(e)
    error = dist.gather_objects(error)[0]  # every rank stops if rank 0 could not claim the directory
    if error:
        raise ValueError(error)
    return lock

def restart_dir_optimizer_state(restart_dir, saved):
    """The optimizer state in --restart_dir's optimizer.pt (None if there is none), checked to come from the
    same step as its model.pt (`saved`): they are two writes, and a run killed between them leaves a pair from
    two steps."""
    path = os.path.join(restart_dir, 'optimizer.pt')
    if not os.path.exists(path):
        return None
    optimizer = ckpt.load_run_file(path, 'optimizer')
    if optimizer.get('step') != saved.get('step'):
        raise ckpt.CheckpointError(f'{path} is from step {optimizer.get("step")} but {restart_dir}/model.pt from '
                                   f'step {saved.get("step")} (the run stopped between the two writes): delete '
                                   f'{path} to start from the weights with a fresh optimizer')
    return optimizer['optimizer_state']

def prepare(args, parser, notes, dist):
    """Everything that can fail on bad input, before anything is written: flags, data, model, checkpoint."""
    check_args(args, parser)
    check_work_dir(args)
    dist.check_batch(args.batch_size, args.batch_chunk)
    dist.check_eval_batch(EVAL_BATCH_SIZE, 'the evaluation batch of train.py')
    if args.moe:
        dist.check_experts(args.moe_num_expert)
    device = dist.device(pick_device(args.cuda, notes.append))
    if dist.active:
        notes.append(f'{dist.world_size} processes, {args.batch_size // dist.world_size} batch columns each'
                     + (', experts split over the processes' if dist.expert_parallel else ''))
    elif args.multi_gpu:
        notes.append('NOTE: --multi_gpu: one process trains on one device with the whole batch; torchrun '
                     '--nproc_per_node N train.py ... trains on N (the run scripts launch one per visible GPU)')
    if args.gpu0_bsz >= 0:  # nn.DataParallel's uneven split; DDP gives every process an equal share
        notes.append(f'NOTE: --gpu0_bsz {args.gpu0_bsz} is ignored: every process takes an equal share of '
                     '--batch_size')
    if args.expert_parallel and not dist.active:
        notes.append('NOTE: --expert-parallel needs several processes (torchrun); this process holds every expert')
    if args.amp != 'fp16' and (args.dynamic_loss_scale or args.static_loss_scale is not None):
        # The original accepted them and ignored them without --fp16; bf16 and fp32 need no scaling.
        notes.append('NOTE: --static-loss-scale/--dynamic-loss-scale are ignored without --fp16 (or --amp fp16)')
    if args.deterministic:  # before the first product on a GPU: cuBLAS reads its workspace setting then
        set_deterministic(True)
    if use_tf32(device, not args.no_tf32):
        notes.append('NOTE: fp32 matrix products in TF32 on this GPU (--no-tf32 for full fp32, as the original)')
    if args.fp16 and not args.dynamic_loss_scale and args.static_loss_scale == 1:
        notes.append("WARNING: --fp16 keeps the original's static loss scale 1, under which small gradients "
                     'vanish in fp16; --dynamic-loss-scale (or --amp fp16) is safer')
    if args.amp == 'fp16' and device.type == 'cpu':
        notes.append('NOTE: fp16 autocast on the CPU works but is slow; --amp bf16 is the CPU fast path')
    seed_everything(args.seed, device)
    state = start = None
    if args.restart and not args.restart_dir:
        state = ckpt.load_run_file(os.path.join(args.work_dir, 'checkpoint.pt'), 'checkpoint')
    elif args.restart_dir:
        start = ckpt.load_run_file(os.path.join(args.restart_dir, 'model.pt'), 'model')
    # A model imported with its own vocabulary (convert_checkpoint.py) keeps those ids through fine-tuning.
    symbols = (state or start or {}).get('vocab')
    corpus = data_utils.get_lm_corpus(args.data, args.dataset, symbols)
    # Every rank reads the same global batches and trains on its own columns of them.
    iters = [corpus.get_iterator('train', args.batch_size, args.tgt_len, device=device, ext_len=args.ext_len,
                                 varlen=args.varlen, seed=args.seed)]
    iters += [corpus.get_iterator(split, EVAL_BATCH_SIZE, args.eval_tgt_len, device=device, ext_len=args.ext_len)
              for split in ('valid', 'test')]
    for split, it in zip(('train', 'valid', 'test'), iters):
        try:
            corpus.check_batches(split, it, varlen=args.varlen and split == 'train')
        except data_utils.DataError as e:
            what = '--batch_size' if split == 'train' else f'the evaluation batch of train.py ({EVAL_BATCH_SIZE})'
            raise data_utils.DataError(f'--data {args.data}: {e} ({what}); use a smaller batch or more data') \
                from None
    optimizer_state = None
    if start is not None:
        ckpt.check_vocab(start, corpus.vocab.idx2sym, f'{args.restart_dir}/model.pt', f'--data {args.data}')
        optimizer_state = restart_dir_optimizer_state(args.restart_dir, start)
    model = build_model(args, len(corpus.vocab), start)
    dist.seed_rank(args.seed)  # identical weights everywhere, then each rank its own dropout stream
    if state is not None:
        path = os.path.join(args.work_dir, 'checkpoint.pt')
        hint = ' (resume with the flags of that run, or start a new run in another --work_dir)'
        ckpt.check_config(model.full_config(state['config']), model.config, path, hint=hint)
        ckpt.check_vocab(state, corpus.vocab.idx2sym, path, f'--data {args.data}')
        ckpt.check_config(state['args'], vars(args), path, keys=RESUME_KEYS, hint=hint)
        others = [k for k in vars(args) if k not in RESUME_KEYS and k != 'restart']
        changed = ckpt.config_diff(state['args'], vars(args), keys=others)
        if changed:  # allowed (e.g. a longer --max_step), but said
            notes.append('NOTE: flags changed since the checkpoint: ' + '; '.join(changed))
    lock = claim_work_dir(args, dist, notes)
    return device, iters, model, state, (symbols, corpus.vocab.idx2sym), optimizer_state, lock


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    notes = list(filter(None, [malloc.tune()]))   # before the first large tensor; logged with the notes
    dist, lock = Dist(), None
    try:
        check_args(args, parser)
        dist = Dist.from_env(args.cuda, args.expert_parallel, args.dist_timeout)
        device, iters, model, state, vocabs, optimizer_state, lock = prepare(args, parser, notes, dist)
        symbols, corpus_symbols = vocabs  # an imported model's own vocabulary (or None), the corpus's
        n_params = (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.layers.parameters()))
        trainer = Trainer(args, model, device, None, None, dist, vocab=symbols, tr_iter=iters[0])
        trainer.symbols = corpus_symbols
        if state is not None:
            trainer.load_state_dict(state)
        elif optimizer_state is not None:  # --restart_dir's
            trainer.optimizer.load_state_dict(dist.local_optimizer_state(optimizer_state, trainer.optimizer))
            if args.scheduler in ('constant', 'dev_perf'):
                # As the original: loading optimizer.pt restored the rate, and these schedules never reset it.
                trainer.base_lr = float(optimizer_state['param_groups'][0]['lr'])
                notes.append(f'NOTE: --scheduler {args.scheduler} continues at the rate saved in '
                             f'{args.restart_dir}/optimizer.pt: {trainer.base_lr:.3g} (as the original)')
    except (ValueError, OSError) as e:  # DataError and CheckpointError are ValueErrors
        if dist.is_main:  # every rank finds the same fault; one line is enough
            print(f'train.py: error: {e}', file=sys.stderr)
        if lock is not None:
            lock.release()
        dist.close()
        return 2
    try:
        return run(args, trainer, iters, state, notes, n_params)
    except OSError as e:  # a full disk, or the run directory taken away: one line, the checkpoint is kept
        message = str(e) if isinstance(e, files.WriteError) else files.write_error(e, e.filename or args.work_dir)
        print(f'train.py: error: {message}', file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not (dist.active and is_peer_failure(e)):
            raise
        kept = f'; the last complete checkpoint is {args.work_dir}/checkpoint.pt (relaunch with --restart)' \
            if not args.debug else ''
        fail_distributed('train.py', f'rank {dist.rank} lost contact with the other processes at step '
                                     f'{trainer.step} ({str(e).strip().splitlines()[0][:200]}){kept}')
    finally:
        if trainer.metrics is not None:
            trainer.metrics.close()
        if lock is not None:
            lock.release()
        dist.close()


def kept_checkpoint(trainer, run_dir):
    """Which checkpoint a stopped run leaves, for its last message."""
    if run_dir is None:
        return 'debug mode: no checkpoint'
    if trainer.saved_step is None:
        return 'no checkpoint was kept (no state before the failure was known good): start a new run'
    return f'the last good checkpoint is {run_dir}/checkpoint.pt (step {trainer.saved_step}): resume with --restart'


def run(args, trainer, iters, state, notes, n_params):
    """Log the setup, train, evaluate the last and test the best model; returns the exit code."""
    tr_iter, va_iter, te_iter = iters
    main_rank = trainer.dist.is_main
    run_dir = None if args.debug else args.work_dir
    if run_dir and main_rank:
        os.makedirs(run_dir, exist_ok=True)
    writing = run_dir if main_rank else None  # only rank 0 logs and writes metrics
    log = trainer.log = Logger(os.path.join(run_dir, 'log.txt') if writing else None) if main_rank else SilentLog()
    trainer.metrics = MetricsWriter(os.path.join(run_dir, 'metrics.jsonl') if writing else None, args.tensorboard)
    if run_dir:
        log(f'Run directory : {os.path.abspath(run_dir)} (log.txt, metrics.jsonl, model.pt = best model, '
            f'checkpoint.pt = last state every {args.save_interval} steps)')
    else:
        log('Debug mode: nothing is written')
    for note in notes:
        log(note)
    trainer.metrics.truncate_after(trainer.step)  # a fresh run (step 0) does not add to a killed run's lines
    if state is not None:
        log(f'Resuming from {run_dir}/checkpoint.pt at step {trainer.step} (epoch {trainer.epoch}, '
            f'batch {trainer.batch})')
    elif args.restart_dir:
        log(f'Starting from the weights of {args.restart_dir}/model.pt')
    log('=' * 100)
    for k, v in vars(args).items():
        log(f'    - {k} : {v}')
    log('=' * 100)
    log(f'#params = {n_params[0]}')
    log(f'#non emb params = {n_params[1]}')

    stop = StopRequest()
    stop.install()
    try:
        trainer.train(va_iter, run_dir, stop)
    except NonFiniteLoss as e:
        log(f'Stopping: {e}; {kept_checkpoint(trainer, run_dir)}. Lower --lr, use --amp bf16 or a loss scale, '
            'or check the data.')
        return 1
    finally:
        stop.uninstall()
    log('-' * 100)
    if stop.agreed == signal.SIGTERM:
        log(f'Exiting from training early (SIGTERM) at step {trainer.step}: {kept_checkpoint(trainer, run_dir)}')
        return 128 + signal.SIGTERM
    log('Exiting from training early' if stop.agreed is not None else 'End of training')
    if trainer.best_val_loss is None:
        # No validation yet (a run shorter than --eval-interval: the original crashed on the missing model.pt), so
        # validate once to have a best model. Otherwise, as the original, the best periodic validation is tested.
        trainer.validate(va_iter, run_dir)
        trainer.save_checkpoint(run_dir, confirmed=True)  # with this evaluation: a resumed finished run only tests
    trainer.test(te_iter, run_dir)
    return 0
