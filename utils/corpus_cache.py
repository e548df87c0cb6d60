"""The corpus cache on disk: plain arrays and the vocabulary's symbols, keyed on the sources, written atomically.

A cache is a directory `cache-{dataset}-{key}` holding one .npy file per array, vocab.json (the symbols in id
order) and meta.json (format, dataset, key, the arrays' lengths, each .npy file's size and modification time,
vocab.json's sha256). Arrays named '<name>.lengths' hold the lengths of the pieces of array <name> (lm1b's
sentences); every other array holds ids below the number of symbols, stored in the smallest unsigned type.

It is written into a temporary directory that is renamed into place, so a killed build leaves only a `.tmp`
directory, which is never loaded and is removed once its process is gone. It is read with
np.load(allow_pickle=False) and json: a cache cannot run code. Anything that does not check out raises
DamagedCache, and the caller rebuilds it.
"""

import hashlib
import json
import os
import re
import shutil
import tempfile

import numpy as np

from utils.files import current_umask
from utils.vocabulary import ids_dtype

FORMAT = 2  # 2: meta.json holds a fingerprint of each cache file
_KEY_HEX = 16


class DamagedCache(ValueError):
    """A cache directory whose files do not check out (the message says which); it is to be rebuilt."""


def cache_key(dataset, vocab_rules, files, symbols=None):
    """Changes when the dataset, its vocabulary rules (or the given vocabulary `symbols`), the cache format or
    any source file (size or modification time) changes. files: {role: path}."""
    described = {
        'format': FORMAT, 'dataset': dataset, 'vocab': vocab_rules,
        'files': sorted([role, os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns]
                        for role, f in files.items()),
    }
    if symbols is not None:
        described['given_vocab'] = hashlib.sha256('\n'.join(symbols).encode('utf-8')).hexdigest()
    blob = json.dumps(described, sort_keys=True).encode('utf-8')
    return hashlib.sha256(blob).hexdigest()[:_KEY_HEX]


def cache_roots(datadir):
    """Where caches go, in order: inside the corpus directory as the original, else a user cache directory."""
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    absdir = os.path.abspath(datadir)
    tag = hashlib.sha256(absdir.encode('utf-8')).hexdigest()[:12]
    user = os.path.join(base, 'transformer-xl-moe', '{}-{}'.format(
        os.path.basename(absdir.rstrip(os.sep)) or 'data', tag))
    return [datadir, user]


def cache_dir(root, dataset, key):
    return os.path.join(root, 'cache-{}-{}'.format(dataset, key))


def _disk_dtype(vocab_size):
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError('vocabulary of {} symbols is too large for the cache'.format(vocab_size))


def _is_lengths(name):
    return name.endswith('.lengths')


def _write_npy(path, array):
    with open(path, 'wb') as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path, obj):
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(obj, f, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())


def _file_stamp(path):
    # Size and modification time, kept by the rename into place (and by cp -a): an edited array is noticed
    # without reading hundreds of MB at every start.
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _sha256(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def save(root, dataset, key, arrays, symbols):
    """Write `arrays` ({name: 1-D integer array}) and `symbols` (the vocabulary in id order) as the cache of
    (dataset, key) under root; returns its directory. Removes the caches of older sources of the dataset.
    OSError where root cannot be written (the caller tries the next root)."""
    final = cache_dir(root, dataset, key)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='cache-{}-{}.tmp{}-'.format(dataset, key, os.getpid()), dir=root)
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private
        disk = _disk_dtype(len(symbols))
        shapes, stamps = {}, {}
        for name, array in arrays.items():
            if not _is_lengths(name):  # ids are >= 0: same-size types are a view
                array = array.view(disk) if array.itemsize == disk.itemsize else array.astype(disk)
            path = os.path.join(tmp, name + '.npy')
            _write_npy(path, array)
            shapes[name] = len(array)
            stamps[name] = _file_stamp(path)
        _write_json(os.path.join(tmp, 'vocab.json'), list(symbols))
        _write_json(os.path.join(tmp, 'meta.json'), {
            'format': FORMAT, 'dataset': dataset, 'key': key,
            'vocab_size': len(symbols), 'arrays': shapes, 'stamps': stamps,
            'vocab_sha256': _sha256(os.path.join(tmp, 'vocab.json'))})
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):  # else another process just finished the same cache
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _remove_stale(root, dataset, key)
    return final


def _remove_stale(root, dataset, key):
    """Caches of older sources, and temporary directories of dead builds."""
    pattern = re.compile(r'cache-{}-([0-9a-f]{{{}}})(?:\.tmp(\d+)-.*)?$'.format(re.escape(dataset), _KEY_HEX))
    for name in os.listdir(root):
        m = pattern.match(name)
        if not m:
            continue
        stale = m.group(1) != key if m.group(2) is None else not _pid_alive(int(m.group(2)))
        if stale:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def load(root, dataset, key):
    """(arrays, symbols) of the cache of (dataset, key) under root, or None if there is none. Id arrays come
    back in the vocabulary's ids_dtype, memory-mapped copy-on-write (loaded at once, and processes on one
    machine share the pages); lengths arrays as stored. DamagedCache (saying what) if anything does not check
    out."""
    where = cache_dir(root, dataset, key)
    if not os.path.isfile(os.path.join(where, 'meta.json')):
        return None
    try:
        return _read(where, dataset, key)
    except (OSError, EOFError, ValueError, KeyError, TypeError) as err:  # EOFError: an empty .npy
        raise DamagedCache('{} ({})'.format(where, err)) from None


def _read(where, dataset, key):
    with open(os.path.join(where, 'meta.json'), encoding='utf-8') as f:
        meta = json.load(f)
    with open(os.path.join(where, 'vocab.json'), encoding='utf-8') as f:
        symbols = json.load(f)
    if (meta.get('format'), meta.get('dataset'), meta.get('key')) != (FORMAT, dataset, key):
        raise ValueError('written for other sources')
    if not isinstance(symbols, list) or len(symbols) != meta['vocab_size']:
        raise ValueError('vocab.json does not match meta.json')
    if _sha256(os.path.join(where, 'vocab.json')) != meta['vocab_sha256']:
        raise ValueError('vocab.json was changed after the cache was written')
    if len(set(symbols)) != len(symbols):
        raise ValueError('vocab.json has duplicate symbols')
    memory = ids_dtype(len(symbols))
    arrays = {}
    for name, length in meta['arrays'].items():
        path = os.path.join(where, name + '.npy')
        if _file_stamp(path) != meta['stamps'][name]:
            raise ValueError('{}.npy was changed after the cache was written'.format(name))
        array = np.load(path, allow_pickle=False, mmap_mode='c' if length else None)
        if array.shape != (length,):
            raise ValueError('{}.npy has {} ids, meta.json says {}'.format(name, array.size, length))
        if not _is_lengths(name):
            if length and int(array.max()) >= len(symbols):
                raise ValueError('{}.npy has ids beyond the vocabulary'.format(name))
            array = array.view(memory) if array.dtype.itemsize == memory.itemsize else array.astype(memory)
        arrays[name] = array
    for name in arrays:
        if _is_lengths(name) and int(arrays[name].sum()) != len(arrays.get(name[:-len('.lengths')], ())):
            raise ValueError('{}.npy does not add up'.format(name))
    return arrays, symbols
