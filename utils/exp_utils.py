"""Run-directory helpers shared by train.py and eval.py: the human log, metrics.jsonl, a progress bar."""
import argparse
import json
import math
import os
import resource
import sys

import torch


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
    """metrics.jsonl: one JSON object per line, flushed at once so a killed run keeps what it logged."""

    def __init__(self, path=None):
        self.path = path

    def write(self, **record):
        if self.path is None:
            return
        with open(self.path, 'a') as f:
            f.write(json.dumps(_jsonable(record)) + '\n')
            f.flush()

    def truncate_after(self, step):
        """Drop records of steps after `step` (a resumed run logs them again), atomically."""
        if self.path is None or not os.path.exists(self.path):
            return
        kept = [line for line in read_lines(self.path) if json.loads(line).get('step', 0) <= step]
        tmp = self.path + '.tmp'
        with open(tmp, 'w') as f:
            f.writelines(line + '\n' for line in kept)
        os.replace(tmp, self.path)


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


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan; keep the line parseable
    return value


def char_level(dataset):
    return dataset in ('enwik8', 'text8')


def loss_fields(dataset, loss):
    """bpc for character-level datasets, perplexity otherwise, as the original reports them."""
    if char_level(dataset):
        return {'bpc': loss / math.log(2)}
    return {'ppl': math.exp(loss) if loss < 700 else math.inf}


def format_loss(dataset, split, loss):
    """'| test loss 0.73 | test bpc   1.05123' as the original eval.py prints it."""
    if char_level(dataset):
        return f'| {split} loss {loss:5.2f} | {split} bpc {loss / math.log(2):9.5f}'
    return f'| {split} loss {loss:5.2f} | {split} ppl {loss_fields(dataset, loss)["ppl"]:9.3f}'


def peak_memory_mb(device):
    """Peak memory so far: allocated CUDA memory on a GPU, the process's peak resident set on the CPU."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == 'darwin' else peak / 2 ** 10  # bytes on macOS, KiB on Linux


def progress_bar(total, initial):
    """A tqdm bar on an interactive terminal, None in logs and CI (plain lines only)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True, leave=False)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (and exit code 2), not usage + error."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def pick_device(cuda, log=print):
    """--cuda as in the original; without a GPU everything runs on the CPU (with a warning if --cuda)."""
    if cuda and not torch.cuda.is_available():
        log('WARNING: --cuda given but no CUDA device is available; running on the CPU')
        return torch.device('cpu')
    if not cuda and torch.cuda.is_available():
        log('WARNING: You have a CUDA device, so you should probably run with --cuda')
    return torch.device('cuda' if cuda else 'cpu')
