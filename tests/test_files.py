"""utils/files.py: atomic writes keep the old file on failure and leave nothing behind; progress bars only on a
terminal."""
import io
import os
import sys

import pytest

from utils.files import atomic_write, current_umask, progress_bar


def test_atomic_write_replaces_only_when_complete(tmp_path):
    path = tmp_path / 'out.txt'
    path.write_text('old')
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write('half')
            raise RuntimeError('killed mid-write')
    assert path.read_text() == 'old' and os.listdir(tmp_path) == ['out.txt']
    with atomic_write(path) as f:
        f.write('new é')
    assert path.read_text(encoding='utf-8') == 'new é' and os.listdir(tmp_path) == ['out.txt']
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # an ordinary file, not mkstemp's private one
    with atomic_write(tmp_path / 'b.bin', 'wb') as f:
        f.write(b'\x00\x01')
    assert (tmp_path / 'b.bin').read_bytes() == b'\x00\x01'


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, 'stderr', io.StringIO())
    assert progress_bar(10, 'step') is None
    monkeypatch.setattr(sys, 'stderr', Terminal())
    bar = progress_bar(10, 'step', initial=3)
    assert bar is not None and bar.n == 3
    bar.close()
