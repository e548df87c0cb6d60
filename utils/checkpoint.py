"""Checkpoints as plain data: atomic writes, safe loads, configuration checks, RNG states.

Everything saved here is tensors, numbers, strings, lists, tuples and dicts, so files load with
torch.load(..., weights_only=True): opening a checkpoint never runs code. A file is written under a temporary
name, fsynced and renamed over the old one (utils.files.atomic_write), so a run killed mid-save leaves the previous
checkpoint intact.
"""
import os
import random

import numpy as np
import torch

from utils.files import atomic_write
from utils.errors import CheckpointError

FORMAT = 'txl-moe-checkpoint-1'
# train.py's newest state until the step after it shows it is good; then it is renamed to checkpoint.pt.
PENDING = 'checkpoint.pt.next'
# What train.py writes atomically into a run directory (each through NAME.tmpPID).
RUN_FILES = ('checkpoint.pt', PENDING, 'model.pt', 'optimizer.pt', 'metrics.jsonl')




def atomic_save(obj, path):
    """torch.save to `path` atomically (utils.files.atomic_write): a run killed mid-save keeps the previous file;
    a failed write (a full disk: torch says `unexpected pos`) raises files.WriteError with one line."""
    with atomic_write(path, 'wb') as f:
        torch.save(obj, f)


def weights_only_failure(e):
    """What an exception of torch.load(weights_only=True) says of the file: (True, None) when the file names Python
    classes that the weights-only unpickler refuses (a pickled model, or other objects: opening it would run code);
    else (False, a short reason: the exception's type and first line, without torch's advice to unpickle)."""
    text = str(e)
    if 'GLOBAL' in text:   # 'Unsupported global: GLOBAL m.C', 'unsupported GLOBAL m.f whose module m is blocked'
        return True, None
    detail = text.split('WeightsUnpickler error:', 1)[-1]
    first = next((line.strip() for line in detail.splitlines() if line.strip()), '')
    first = first.split('. ')[0]   # torch's longer messages go on with advice
    return False, f'{type(e).__name__}: {first}' if first else type(e).__name__


def load(path, what='checkpoint'):
    """Load a plain-data checkpoint onto the CPU, or raise CheckpointError naming the file and the fix."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'{what} {path} does not exist')
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        holds_objects, reason = weights_only_failure(e)
        if holds_objects:
            raise CheckpointError(
                f'{what} {path} holds pickled Python objects, not plain data (a checkpoint of the original '
                f'Transformer-XL?); it is not opened because unpickling runs code: convert it first') from None
        raise CheckpointError(f'{what} {path} is unreadable ({reason}): it is truncated or not a checkpoint; '
                              'use an intact copy (or start again without it)') from None
    if not isinstance(obj, dict) or obj.get('format') != FORMAT:
        raise CheckpointError(f'{what} {path} is not a checkpoint written by this project '
                              f'(expected format {FORMAT!r})')
    return obj


def load_run_file(path, what):
    """load() of one of train.py's files, what = 'model' (model.pt), 'optimizer' (optimizer.pt) or 'checkpoint'
    (checkpoint.pt), checked to hold what each needs: a hand-made file with the format tag is one line too."""
    obj = load(path, what)
    for key in REQUIRED[what] + ('args',):
        if not isinstance(obj.get(key, {} if key == 'args' else None), dict):  # 'args' may be absent
            found = 'nothing' if key not in obj else f'a {type(obj[key]).__name__}'
            raise CheckpointError(f'{what} {path} has the format tag but {found} under {key!r} (a dict is '
                                  'expected): it was not written by this project; use a file train.py wrote')
    missing = [key for key in PRESENT.get(what, ()) if key not in obj]
    if missing:
        raise CheckpointError(f'{what} {path} has the format tag but no {", ".join(missing)}: it was not written '
                              'by this project; use a file train.py wrote')
    return obj


# The dicts each kind of file must hold (the rest is checked where it is used).
REQUIRED = {'model': ('config', 'model_state'), 'optimizer': ('optimizer_state',),
            'checkpoint': ('config', 'model_state', 'optimizer_state', 'scaler_state', 'window')}
PRESENT = {'checkpoint': ('args', 'plateau', 'step', 'epoch', 'batch', 'best_val_loss',
                          'last_eval_step', 'nonfinite_run', 'mems', 'rng')}


def config_diff(saved, current, keys=None):
    """Human-readable differences 'key: X in the checkpoint, Y now' between two flat dicts."""
    keys = sorted(set(saved) | set(current)) if keys is None else keys
    diffs = []
    for key in keys:
        old, new = saved.get(key, _ABSENT), current.get(key, _ABSENT)
        if _normalise(old) != _normalise(new):
            diffs.append(f'{key}: {_show(old)} in the checkpoint, {_show(new)} now')
    return diffs


_ABSENT = object()


def _show(value):
    return 'absent' if value is _ABSENT else repr(value)


def _normalise(value):
    # Tuples come back from a checkpoint as they went in, but lists and tuples mean the same in a config.
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def check_config(saved, current, path, keys=None, hint=''):
    diffs = config_diff(saved, current, keys)
    if diffs:
        shown = '; '.join(diffs[:4]) + ('; ...' if len(diffs) > 4 else '')
        raise CheckpointError(f'{path} does not match this run: {shown}{hint}')


def check_vocab(saved, symbols, path, data):
    """CheckpointError (one line, naming the first symbols that differ) if the checkpoint was trained on another
    vocabulary than `symbols`: a corpus with as many symbols but other ids would be read silently wrong. Older
    checkpoints hold no vocabulary and are not checked."""
    known = saved.get('vocab_symbols')
    if known is None or list(known) == list(symbols):
        return
    i = next((i for i, (a, b) in enumerate(zip(known, symbols)) if a != b), min(len(known), len(symbols)))

    def show(seq):
        return repr(seq[i]) if i < len(seq) else 'absent'
    raise CheckpointError(f'{data} has another vocabulary than the one {path} was trained on: symbol {i} is '
                          f'{show(symbols)} there, {show(known)} in the checkpoint ({len(symbols)} and {len(known)} '
                          'symbols): pass the --data it was trained on')


def rng_state():
    """RNG states of python, numpy and torch (the CPU's and the current CUDA device's), as plain data.

    Only the current device's: each torchrun rank drives one GPU (and sees them all), and a resume may
    see fewer GPUs than the run that saved (set_rng_state_all would raise)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': {'kind': kind, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                  'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)},
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(_as_tuples(state['python']))
    np_state = state['numpy']
    np.random.set_state((np_state['kind'], np_state['keys'].numpy().astype(np.uint32), np_state['pos'],
                         np_state['has_gauss'], np_state['cached_gaussian']))
    torch.set_rng_state(state['torch'])
    cuda = state.get('cuda')
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every device's state
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def _as_tuples(value):
    # random.setstate needs tuples all the way down.
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


def load_weights(model, state_dict, path):
    """load_state_dict(strict=True), with a one-line CheckpointError saying which keys or shapes differ."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        detail = ' '.join(lines)
        detail = detail if len(detail) < 300 else detail[:300] + '...'
        raise CheckpointError(f'the weights in {path} do not fit the model: {detail}') from None
