"""Writing files a user keeps, and showing progress: one implementation each for every script.

A file is written under a temporary name next to its destination, fsynced and renamed over it, so an
interrupted write never leaves a partial file where a complete one was (or is expected).
"""
import os
import sys
import tempfile
from contextlib import contextmanager


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path, mode='w'):
    """`with atomic_write(path, 'wb') as f:` a file object whose content replaces `path` only once the block
    completes; on an error `path` is untouched and the temporary file removed. Text is UTF-8."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private; the result is an ordinary file
        with (open(fd, 'wb') if 'b' in mode else open(fd, 'w', encoding='utf-8')) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(directory)


def _fsync_dir(dirname):
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(dirname, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def progress_bar(total, unit, initial=0, desc=None):
    """A tqdm bar on an interactive terminal; None in logs, CI and pipes (plain lines only). unit 'B' counts
    bytes with SI prefixes."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit == 'B', dynamic_ncols=True,
                leave=False)
