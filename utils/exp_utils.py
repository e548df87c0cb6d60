"""Run-directory helpers shared by train.py and eval.py: the human log, metrics.jsonl, a progress bar."""
import argparse
import copy
import json
import math
import os
import resource
import sys

import torch

from utils.datasets import CHAR_LEVEL
from utils.files import atomic_write


class Logger:
    """Prints a line and appends it to log.txt (the original's `logging`), staying out of a progress bar's way."""

    def __init__(self, log_path=None):
        self.log_path = log_path
        self.bar = None

    def __call__(self, line=''):
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)
        if self.log_path is not None:
            with open(self.log_path, 'a') as f:
                f.write(line + '\n')


class MetricsWriter:
    """metrics.jsonl: one JSON object per line, flushed at once so a killed run keeps what it logged.

    With tensorboard=True every record also goes to TensorBoard event files beside metrics.jsonl (so
    `tensorboard --logdir runs` compares the runs under runs/ by their directory names), at the record's step: numbers
    as scalars `split/key`, per-layer lists (the MoE balance loss) as scalars `split/key/layer_i`, and
    per-layer lists of per-expert counts (the MoE load) as histograms over the expert index `split/key/layer_i`.
    """

    def __init__(self, path=None, tensorboard=False):
        self.path = path
        self.tensorboard = tensorboard and path is not None
        self.board = None        # the SummaryWriter, opened at the first record
        self.purge_step = None   # set by truncate_after: TensorBoard hides the older events from this step on

    def write(self, **record):
        if self.path is None:
            return
        with open(self.path, 'a') as f:
            f.write(json.dumps(_jsonable(record)) + '\n')
            f.flush()
        if self.tensorboard:
            self._write_board(_jsonable(record, json_only=False))  # TensorBoard takes inf and nan

    def _write_board(self, record):
        if self.board is None:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency: train.py checks it is there
            self.board = SummaryWriter(os.path.dirname(self.path) or '.', purge_step=self.purge_step)
        step, split = record['step'], record.get('split', 'train')
        for key, value in record.items():
            if key in ('step', 'split', 'epoch', 'batch'):
                continue
            tag = f'{split}/{key}'
            if _is_number(value):
                self.board.add_scalar(tag, value, step)
            elif isinstance(value, list) and all(map(_is_number, value)):
                for layer, v in enumerate(value):
                    self.board.add_scalar(f'{tag}/layer_{layer}', v, step)
            elif isinstance(value, list):
                for layer, counts in enumerate(value):
                    self._add_counts_histogram(f'{tag}/layer_{layer}', counts, step)
        self.board.flush()  # as metrics.jsonl: a killed run keeps what it logged

    def _add_counts_histogram(self, tag, counts, step):
        """counts[i] observations of the value i (tokens sent to expert i): one bucket per expert."""
        index = torch.arange(len(counts), dtype=torch.float64)
        counts = torch.tensor(counts, dtype=torch.float64)
        self.board.add_histogram_raw(tag, min=0, max=len(counts) - 1, num=counts.sum().item(),
                                     sum=(index * counts).sum().item(), sum_squares=(index ** 2 * counts).sum().item(),
                                     bucket_limits=(index + 0.5).tolist(), bucket_counts=counts.tolist(),
                                     global_step=step)

    def close(self):
        if self.board is not None:
            self.board.close()
            self.board = None

    def truncate_after(self, step):
        """Drop records of steps after `step` and the test at `step` (a resumed run logs them again; a fresh run,
        step 0, starts an empty file), atomically."""
        self.purge_step = step + 1
        if self.path is None or not os.path.exists(self.path):
            return
        kept = [line for line in read_lines(self.path) for r in [json.loads(line)]
                if r.get('step', 0) < step or (r.get('step', 0) == step and r.get('split') != 'test')]
        with atomic_write(self.path) as f:
            f.writelines(line + '\n' for line in kept)


def tensorboard_missing():
    """Why TensorBoard logging cannot work here, or None: it needs the tensorboard package, which is optional,
    and torch's writer must import (a tensorboard built against other protobuf or numpy versions is found but
    fails there, which would otherwise surface at the first log line, after training started)."""
    import importlib.util
    if importlib.util.find_spec('tensorboard') is None:
        return 'the tensorboard package is not installed (pip install tensorboard)'
    try:
        import torch.utils.tensorboard  # noqa: F401  (what MetricsWriter opens)
    except Exception as err:  # any failure of a third-party import: ImportError, protobuf's TypeError...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ''
        return (f'the tensorboard package is installed but does not import ({type(err).__name__}: {reason}); '
                'reinstall it (pip install --force-reinstall tensorboard)')
    return None


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_lines(path):
    """Complete lines of a JSONL file; a last line cut by a kill is ignored."""
    with open(path) as f:
        lines = [line.rstrip('\n') for line in f]
    good = []
    for line in lines:
        try:
            json.loads(line)
        except json.JSONDecodeError:
            continue
        good.append(line)
    return good


def read_metrics(path):
    return [json.loads(line) for line in read_lines(path)]


def _jsonable(value, json_only=True):
    """Tensors as (nested) lists; with json_only, non-finite floats as strings."""
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist(), json_only)
    if isinstance(value, dict):
        return {k: _jsonable(v, json_only) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, json_only) for v in value]
    if json_only and isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan; keep the line parseable
    return value


def char_level(dataset):
    return dataset in CHAR_LEVEL


def loss_fields(dataset, loss):
    """bpc for character-level datasets, perplexity otherwise, as the original reports them."""
    if char_level(dataset):
        return {'bpc': loss / math.log(2)}
    return {'ppl': math.exp(loss) if loss < 700 else math.inf}


def metric_text(dataset, loss, split=None):
    """'bpc   1.05123' (character-level datasets) or 'ppl    23.456', the name prefixed by split if given."""
    (name, value), = loss_fields(dataset, loss).items()
    return f'{split + " " if split else ""}{name} {value:9.{5 if name == "bpc" else 3}f}'


def format_loss(dataset, split, loss):
    """'| test loss 0.73 | test bpc   1.05123' as the original eval.py prints it."""
    return f'| {split} loss {loss:5.2f} | {metric_text(dataset, loss, split)}'


def physical_memory():
    """This machine's memory in bytes."""
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def peak_memory_mb(device):
    """Peak memory so far: allocated CUDA memory on a GPU, the process's peak resident set on the CPU."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == 'darwin' else peak / 2 ** 10  # bytes on macOS, KiB on Linux


class OneLineArgumentParser(argparse.ArgumentParser):
    """The scripts' argparse: a bad command line is one line (and exit code 2), not usage + error; and a flag
    takes either spelling of its name, '-' or '_' between words (--eval-interval or --eval_interval: the original
    mixes them), the one it is declared with shown in --help, the other a hidden alias of the same option."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _accept_both_spellings(self)

    def add_argument_group(self, *args, **kwargs):
        return _accept_both_spellings(super().add_argument_group(*args, **kwargs))

    def add_mutually_exclusive_group(self, **kwargs):
        return _accept_both_spellings(super().add_mutually_exclusive_group(**kwargs))

    def _get_option_tuples(self, option_string):
        """An abbreviation matching both spellings of a flag matches one option, not two (ambiguous)."""
        matches = {}
        for match in super()._get_option_tuples(option_string):
            matches.setdefault(match[0], match)
        return list(matches.values())

    def _get_formatter(self):
        return _declared_names_only(self.formatter_class)(prog=self.prog)

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def _accept_both_spellings(container):
    """container.add_argument('--eval-interval', ...) also registers --eval_interval for the same option."""
    declare = container.add_argument

    def add_argument(*names, **kwargs):
        aliases = [alias for name in names if name.startswith('--')
                   for alias in dict.fromkeys(('--' + name[2:].replace('_', '-'), '--' + name[2:].replace('-', '_')))
                   if alias not in names and alias not in container._option_string_actions]
        action = declare(*names, *aliases, **kwargs)
        action.aliases = aliases
        return action
    container.add_argument = add_argument
    return container


def _declared_names_only(formatter_class):
    """formatter_class listing each option under the names it was declared with, its aliases left out."""
    class Formatter(formatter_class):
        def _format_action_invocation(self, action):
            aliases = getattr(action, 'aliases', ())
            if aliases:
                action = copy.copy(action)
                action.option_strings = [name for name in action.option_strings if name not in aliases]
            return super()._format_action_invocation(action)
    return Formatter


def use_tf32(device, allowed=True):
    """TF32 matrix products (fp32 range, 10-bit mantissa in the products, fp32 sums) on Ampere and newer
    GPUs, where they run several times faster than full fp32; full fp32 elsewhere or when not allowed.
    Sets torch's global switches for matmul and cuDNN; returns whether TF32 is on."""
    on = allowed and device.type == 'cuda' and torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on
    return on


# cuBLAS's documented setting for reproducible products: 8 fixed workspaces of 4 MiB (':16:8' also qualifies).
CUBLAS_DETERMINISTIC = (':4096:8', ':16:8')


def set_deterministic(on):
    """--deterministic: every op picks its deterministic kernel (torch raises for an op that has none on this
    device), cuDNN neither autotunes nor picks non-deterministic algorithms, and cuBLAS gets a fixed workspace.
    cuBLAS reads CUBLAS_WORKSPACE_CONFIG when a process makes its first matrix product on a GPU, so this runs
    before that (a setting the user exported is kept when it is one of the deterministic ones). Off restores
    torch's defaults."""
    if on and os.environ.get('CUBLAS_WORKSPACE_CONFIG') not in CUBLAS_DETERMINISTIC:
        os.environ['CUBLAS_WORKSPACE_CONFIG'] = CUBLAS_DETERMINISTIC[0]
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False
    return on


def demo_device_flags():
    """demo.sh's train.py flags for this machine: the GPU with bf16 autocast where it has bf16 units (compute
    capability 8.0+; is_bf16_supported() is also true on V100/T4, which emulate it slowly), else fp16 with
    dynamic loss scaling; bf16 on CPUs with AMX matrix units; fp32 on other CPUs, where bf16 made the demo's
    small MoE step slower (AVX512-BF16 without AMX: bench/README.md, "The MoE layer")."""
    if torch.cuda.is_available():
        return ['--cuda', '--amp', 'bf16' if torch.cuda.get_device_capability() >= (8, 0) else 'fp16']
    try:
        with open('/proc/cpuinfo') as f:
            amx = 'amx_bf16' in f.read().split()
    except OSError:
        amx = False
    return ['--amp', 'bf16'] if amx else []


def pick_device(cuda, log):
    """--cuda as in the original; without a GPU everything runs on the CPU (with a warning through `log`, a
    function taking a line, if --cuda)."""
    if cuda and not torch.cuda.is_available():
        log('WARNING: --cuda given but no CUDA device is available; running on the CPU')
        return torch.device('cpu')
    if not cuda and torch.cuda.is_available():
        log('WARNING: You have a CUDA device, so you should probably run with --cuda')
    return torch.device('cuda' if cuda else 'cpu')
