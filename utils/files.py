"""Writing files a user keeps, and showing progress: one implementation each for every script.

A file is written under a temporary name next to its destination, fsynced and renamed over it, so an
interrupted write never leaves a partial file where a complete one was (or is expected). Output paths are checked
before any work (directories that can be written, files that can be replaced), one run holds a run directory (a
lock), the temporary files of a killed write are found again, and a full disk is said in one line: every driver
uses these, so a bad path is a one-line error (exit code 2) before anything is computed or written.
"""
import errno
import fcntl
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager

from utils.errors import ConfigError


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path, mode='w'):
    """`with atomic_write(path, 'wb') as f:` a file object whose content replaces `path` only once the block
    completes; on an error `path` is untouched and the temporary file removed. Text is UTF-8. A failed write (a
    full disk...) raises WriteError with one line."""
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
    except OSError as e:
        raise WriteError(write_error(e, path)) from None
    except RuntimeError as e:  # torch's zip writer reports a failed write (a full disk) as `unexpected pos ...`
        if 'unexpected pos' in str(e) or 'PytorchStreamWriter' in str(e) or disk_full(directory):
            raise WriteError(write_error(e, path)) from None
        raise
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


def nearest_existing(path):
    """`path` itself or the closest of its parents that exists (the directory a mkdir -p would start in)."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def check_writable_dir(path, what):
    """ValueError (one line) unless `path` is a directory, or can be made one, in which this process can create
    files. Tried with a real file (created and removed at once), since permissions alone do not show a read-only
    mount or /proc to root."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f'{what} {path} is a file, not a directory: choose a directory')
    existing = nearest_existing(path)
    if not os.path.isdir(existing):
        raise ConfigError(f'{what} {path} cannot be created: {existing} is a file, not a directory')
    try:
        fd, probe = tempfile.mkstemp(prefix='.write-test-', dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f'{what} {path} is not writable ({e.strerror} in {existing}): choose another '
                         'directory') from None


def check_output_file(path, what):
    """ValueError (one line) unless `path` can be written as a file: not a directory, in a writable directory."""
    if os.path.isdir(path):
        raise ConfigError(f'{what} {path} is a directory: give a file name')
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f'{what} {path}: its directory {parent} does not exist')
    check_writable_dir(parent, f'{what} {path}: its directory')


def write_error(e, path):
    """One line for an OSError met while writing `path`: a full disk is named as such (torch's zip writer
    reports it as `unexpected pos ...`, so the free space is looked at too)."""
    directory = os.path.dirname(os.path.abspath(path))
    if getattr(e, 'errno', None) in (errno.ENOSPC, errno.EDQUOT) or disk_full(directory):
        return f'no space left on device writing {path}: the previous file is kept; free some space and run again'
    reason = getattr(e, 'strerror', None) or str(e).strip().splitlines()[0]
    return f'could not write {path} ({reason}): the previous file is kept'


def disk_full(directory):
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20  # under 1 MiB left to us


class WriteError(OSError):
    """A failed write, already described in one line (see write_error)."""


def lock_directory(path, what):
    """An exclusive lock on the directory itself (flock on its descriptor: nothing is written, and the kernel
    releases it when the process ends, even by SIGKILL). Keep the returned object as long as the lock is needed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ConfigError(f'{what} {path} is in use by another process (it holds the lock on it): wait for it '
                             'to end or choose another directory') from None
        raise
    return DirectoryLock(fd)


class DirectoryLock:
    def __init__(self, fd):
        self.fd = fd

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None

    def __del__(self):
        self.release()


def remove_orphans(directory, names, extra=()):
    """Delete the temporary files of atomic writes of `names` (`.NAME.XXXXXXXX.tmp`, or `NAME.tmp[PID]` from
    older versions) left in `directory` by writers killed mid-write, and the `extra` file names; only call this
    while holding the directory's lock. Returns the names removed."""
    alternatives = '|'.join(re.escape(n) for n in names)
    pattern = re.compile(rf'(\.({alternatives})\..+\.tmp|({alternatives})\.tmp\d*)$')
    removed = []
    for name in sorted(os.listdir(directory)):
        if pattern.match(name) or name in extra:
            try:
                os.remove(os.path.join(directory, name))
            except FileNotFoundError:
                continue
            removed.append(name)
    return removed


def progress_bar(total, unit, initial=0, desc=None):
    """A tqdm bar on an interactive terminal; None in logs, CI and pipes (plain lines only). unit 'B' counts
    bytes with SI prefixes."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    # A terminal that reports no size (the pseudo-terminal of `script` or of an IDE: 0 x 0) gets 80 x 24: tqdm
    # hides a bar that does not fit the screen's height.
    try:
        unsized = not os.get_terminal_size(sys.stderr.fileno()).lines
    except (OSError, ValueError, AttributeError):  # a stand-in stream that says it is a terminal
        unsized = False
    size = dict(zip(('ncols', 'nrows'), shutil.get_terminal_size())) if unsized else dict(dynamic_ncols=True)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit == 'B', leave=False, **size)
