"""train.py's flags, their checks, and the model they describe."""
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Optional

import torch

import data_utils
import mem_transformer
from mem_transformer import ModelConfig
from moe import MoEConfig
from run.distributed import DEFAULT_TIMEOUT_S
from run.model_file import read_model_file, weights_beyond_memory
from utils import checkpoint as ckpt
from utils.config import OptionError, add_flags, flag_fields, flag_or_keyword, flag_values
from utils.errors import ConfigError
from utils.exp_utils import OneLineArgumentParser, tensorboard_missing
from utils.schedules import SCHEDULERS

# Settings that may differ when starting from another run's weights (--restart_dir): they shape no tensor.
RUNTIME_KEYS = ('dropout', 'dropatt', 'tgt_len', 'ext_len', 'mem_len', 'same_length', 'clamp_len',
                'moe_capacity_factor', 'moe_eval_capacity_factor', 'moe_balance_coef', 'moe_zloss_coef',
                'moe_switch_eps', 'moe_random_routing')
MOE_BIAS_UPDATE_RATE = 0.001   # --moe-bias-update-rate's default: DeepSeek-V3's


def build_parser():
    """train.py's flags in the original's order; the model's are ModelConfig's (utils.config.add_flags)."""
    p = OneLineArgumentParser(prog='train.py', description='PyTorch Transformer Language Model')
    add = p.add_argument

    def model(*names):
        add_flags(p, ModelConfig, *names)
    # Data and model: the original's flags, names and defaults.
    add('--data', type=str, default='../data/wikitext-103', help='location of the data corpus')
    add('--dataset', type=str, default='wt103', choices=data_utils.DATASETS, help='dataset name')
    model('n_layer', 'n_head', 'd_head', 'd_embed', 'd_model', 'd_inner', 'dropout', 'dropatt')
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
    model('tgt_len')
    add('--eval_tgt_len', type=int, default=50, help='number of tokens to predict for evaluation')
    model('ext_len', 'mem_len', 'tie_weight')
    add('--seed', type=int, default=1111, help='random seed')
    add('--cuda', action='store_true', help='use CUDA (without a GPU the run stays on the CPU)')
    add('--adaptive', action='store_true', help='use adaptive softmax (wt103, lm1b)')
    model('div_val', 'pre_lnorm')
    add('--varlen', action='store_true', help='use variable length')
    add('--multi_gpu', action='store_true', help='multi-device training: launch with torchrun instead')
    add('--log-interval', type=int, default=200, help='report interval')
    add('--eval-interval', type=int, default=4000, help='evaluation interval')
    add('--work_dir', default='LM-TFM', type=str, help='the run directory (created if needed)')
    add('--restart', action='store_true', help='resume exactly from WORK_DIR/checkpoint.pt')
    add('--restart_dir', type=str, default='', help="start from another run's model.pt (and optimizer.pt)")
    add('--debug', action='store_true', help='run in debug mode (write nothing)')
    model('same_length', 'attn_type', 'clamp_len', 'untie_r')
    add('--eta_min', type=float, default=0.0, help='min learning rate for cosine scheduler')
    add('--gpu0_bsz', type=int, default=-1, help='batch size on gpu 0 (multi-device: see --multi_gpu)')
    add('--max_eval_steps', type=int, default=-1, help='max eval steps')
    model('sample_softmax')
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
    model('moe', *(f'moe_options.{f.name}' for f in fields(MoEConfig)))
    add('--moe-bias-update-rate', type=float, default=MOE_BIAS_UPDATE_RATE,
        help='auxfree gate: each step, expert bias += rate * sign(mean load - load); rate in [0, 1]')
    # Several processes (torchrun).
    add('--expert-parallel', action='store_true',
        help='under torchrun: split the experts of each MoE layer over the processes (all_to_all exchange)')
    add('--dist-timeout', type=int, default=DEFAULT_TIMEOUT_S,
        help='seconds a process waits for the others before giving up (torchrun runs)')
    return p


def flag(parser, dest):
    return next(a.option_strings[0] for a in parser._actions if a.dest == dest)


def check_args(args, parser):
    """Raise a one-line ConfigError for an impossible or contradictory command line; changes nothing."""
    def fail(message):
        raise ConfigError(message)

    for dest in ('max_step', 'batch_size', 'batch_chunk', 'eval_tgt_len', 'log_interval', 'eval_interval'):
        if getattr(args, dest) < 1:
            fail(f'{flag(parser, dest)} {getattr(args, dest)} must be at least 1')
    for dest in ('warmup_step', 'save_interval', 'patience'):
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
                                    # the auxfree biases move by this many logits a step (DeepSeek-V3: 0.001);
                                    # above 1 they swing the routing wholesale every step
                                    ('moe_bias_update_rate', 0, 1, True)):
        value = getattr(args, dest)
        if not (math.isfinite(value) and (low <= value if low_ok else low < value) and value <= high):
            bounds = f'{"at least" if low_ok else "above"} {low}' + (f' and at most {high}' if high < math.inf else '')
            fail(f'{flag(parser, dest)} {value} must be a finite number {bounds}')
    if args.batch_size % args.batch_chunk:
        fail(f'--batch_chunk {args.batch_chunk} must divide --batch_size {args.batch_size}')
    if args.adaptive and args.dataset not in data_utils.ADAPTIVE_CUTOFFS:
        fail(f'--adaptive is for the large word-level vocabularies ({", ".join(data_utils.ADAPTIVE_CUTOFFS)}), '
             f'not --dataset {args.dataset}')
    if args.same_length and args.mem_len == 0:
        fail('--same_length needs a memory (--mem_len > 0): without one it masks every key and the loss is NaN')
    if args.fp16 and args.amp == 'bf16':
        fail('--fp16 means --amp fp16 and contradicts --amp bf16')
    if (args.fp16 or args.amp == 'fp16') and args.static_loss_scale is not None and args.static_loss_scale <= 0:
        fail(f'--static-loss-scale {args.static_loss_scale} must be positive')
    if args.expert_parallel and not args.moe:
        fail('--expert-parallel splits the experts of --moe layers: add --moe')
    if args.dist_timeout < 1:
        fail(f'--dist-timeout {args.dist_timeout} must be at least 1 second')
    if args.restart and not args.restart_dir and args.debug:
        fail('--restart reads WORK_DIR/checkpoint.pt, which --debug runs never write')
    missing = args.tensorboard and tensorboard_missing()
    if missing:
        fail(f'--tensorboard: {missing}, or drop --tensorboard')


def moe_flags_without_moe(flags):
    """The MoE flags given other values than their defaults in a run without --moe, where they shape nothing
    (the original accepts and ignores them too): ['--moe-num-expert 16', ...]."""
    if flags.moe:
        return []
    defaults, fields_ = MoEConfig(), flag_fields(MoEConfig)
    changed = [flag_or_keyword(path[0], value, fields_[path].metadata)
               for path, value in flag_values(MoEConfig, flags).items() if value != getattr(defaults, path[0])]
    if flags.moe_bias_update_rate != MOE_BIAS_UPDATE_RATE:
        changed.append(f'--moe-bias-update-rate {flags.moe_bias_update_rate}')
    return changed


def check_model(flags, n_token=None):
    """The model's own checks (dropout range, attention type...): before the corpus is read or cached, when the
    vocabulary size is not known yet (n_token None), then against the corpus's vocabulary (the adaptive cutoffs)."""
    if n_token is None:
        n_token = max(data_utils.ADAPTIVE_CUTOFFS[flags.dataset][0] if flags.adaptive else [0]) + 1
    config = model_config(flags, n_token)   # ModelConfig checks every option when it is made
    with torch.device('meta'):   # allocates nothing
        check_fits(mem_transformer.MemTransformerLM(config), flags)


# The flags that size each part of a model, by parameter name (the first part whose pattern the name contains).
SIZE_PARTS = (('.shared_expert.', lambda f: f'--moe-shared-expert {f.moe_shared_expert}'),
              ('.experts.', lambda f: f'--moe-num-expert {f.moe_num_expert} and --d_inner {f.d_inner}'),
              ('layers.', lambda f: f'--n_layer {f.n_layer}, --d_model {f.d_model} and --d_inner {f.d_inner}'),
              ('', lambda f: f'the vocabulary and --d_embed {f.d_embed}'))


def check_fits(model, flags):
    """Refuse a model (on the meta device) whose fp32 weights alone need more than this machine's memory, where
    train.py builds them: one line naming the flags behind most of them, not an allocation error."""
    beyond = weights_beyond_memory(model)
    if beyond is None:
        return
    total, need, have = beyond
    parts = {}
    for name, p in model.named_parameters():  # a shared tensor under its first name only
        part = next(describe for pattern, describe in SIZE_PARTS if pattern in name)
        parts[part] = parts.get(part, 0) + p.numel()
    largest = max(parts, key=parts.get)
    raise ConfigError(f'the model has {total:.3g} parameters, {need / 2 ** 30:,.0f} GiB of weights, more than the '
                      f'{have / 2 ** 30:,.0f} GiB of memory of this machine; {parts[largest] / total:.0%} of them '
                      f'come from {largest(flags)}: use a smaller model')


def resolved_flags(args):
    """The parsed flags with the settings they imply filled in (what the log lists and checkpoints keep as
    'args'): --fp16 is --amp fp16, its loss scale static (1, the original's default) unless dynamic; the new
    --amp fp16 scales dynamically; d_embed -1 is d_model; tied is not --not_tied."""
    values = dict(vars(args))
    if args.fp16:
        values['amp'] = 'fp16'
    if values['amp'] == 'fp16' and not args.dynamic_loss_scale and args.static_loss_scale is None:
        if args.fp16:
            values['static_loss_scale'] = 1.
        else:
            values['dynamic_loss_scale'] = True
    if args.d_embed < 0:
        values['d_embed'] = args.d_model
    values['tied'] = not args.not_tied
    return Flags(values)


class Flags(Mapping):
    """A resolved command line, read-only: flags.lr or flags['lr']; dict(flags) is plain data."""

    def __init__(self, values):
        object.__setattr__(self, '_values', dict(values))

    def __getattr__(self, name):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        raise AttributeError(f'the flags are resolved once and read-only (setting {name})')

    def __getitem__(self, name):
        return self._values[name]

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)

    def __repr__(self):
        return f'Flags({self._values!r})'


@dataclass(frozen=True)
class RunConfig:
    """A training run's settings, resolved once from the command line (run_config) and read-only after.

    The fields are the run's own options: data, optimizer and schedule, precision, the run directory and its
    intervals, several processes. `flags` is the whole resolved command line: build_model reads the model's
    options from it, the log lists it and checkpoints keep it as 'args'."""
    flags: Flags
    # data
    data: str
    dataset: str
    batch_size: int
    batch_chunk: int
    tgt_len: int
    eval_tgt_len: int
    ext_len: int
    mem_len: int
    varlen: bool
    seed: int
    # optimizer and learning-rate schedule
    optim: str
    lr: float
    mom: float
    clip: float
    clip_nonemb: bool
    scheduler: str
    warmup_step: int
    max_step: int
    eta_min: float
    decay_rate: float
    lr_min: float
    patience: int
    # precision and devices
    cuda: bool
    amp: str
    fp16: bool
    static_loss_scale: Optional[float]
    dynamic_loss_scale: bool
    no_tf32: bool
    deterministic: bool
    compile: bool
    # the run directory and its intervals
    work_dir: str
    restart: bool
    restart_dir: str
    debug: bool
    log_interval: int
    eval_interval: int
    save_interval: int
    max_eval_steps: int
    tensorboard: bool
    # several processes
    multi_gpu: bool
    gpu0_bsz: int
    expert_parallel: bool
    dist_timeout: int

    @classmethod
    def from_flags(cls, flags):
        return cls(flags=flags, **{f.name: flags[f.name] for f in fields(cls) if f.name != 'flags'})


def run_config(args, parser):
    """The run configuration of parsed flags: checked (a one-line ConfigError for an impossible or
    contradictory command line) and resolved, once."""
    check_args(args, parser)
    flags = resolved_flags(args)
    check_model(flags)
    return RunConfig.from_flags(flags)


def parse(argv):
    """train.py's command line (a list of strings) as a run configuration."""
    parser = build_parser()
    return run_config(parser.parse_args(argv), parser)



def model_config(flags, n_token):
    """The ModelConfig of the model flags, for a vocabulary of n_token (--adaptive: the dataset's clusters); a
    bad value is a one-line ConfigError naming its flag."""
    cutoffs, tie_projs = (), (False,)
    if flags.adaptive:
        cutoffs, tie_tail = data_utils.ADAPTIVE_CUTOFFS[flags.dataset]
        tie_projs = (False,) + (tie_tail,) * len(cutoffs)
    values = flag_values(ModelConfig, flags)
    try:
        moe_options = MoEConfig(**{path[1]: v for path, v in values.items() if path[0] == 'moe_options'})
        return ModelConfig(n_token=n_token, cutoffs=cutoffs, tie_projs=tie_projs, moe_options=moe_options,
                           **{path[0]: v for path, v in values.items() if len(path) == 1})
    except OptionError as e:
        raise e.with_flags() from None


def build_model(flags, n_token, start=None):
    """A freshly initialized model (the original's init), or with --restart_dir another run's weights
    (`start`: its model.pt as read_model_file gives it, when already read)."""
    model = mem_transformer.MemTransformerLM(model_config(flags, n_token))
    mem_transformer.init_weights(model, init=flags.init, init_range=flags.init_range, init_std=flags.init_std,
                                 proj_init_std=flags.proj_init_std)
    if flags.restart_dir:
        path = os.path.join(flags.restart_dir, 'model.pt')
        config, saved = start or read_model_file(path)
        arch = [k for k in model.config if k not in RUNTIME_KEYS]
        ckpt.check_config(config, model.config, path, keys=arch,
                          hint=' (the architecture flags must match the run it comes from)')
        ckpt.load_weights(model, saved['model_state'], path)
    return model
