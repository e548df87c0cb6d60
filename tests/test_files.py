"""utils/files.py: atomic writes keep the old file on failure and leave nothing behind; progress bars only on a
terminal."""
import io
import os
import pty
import subprocess
import sys
from pathlib import Path

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


def test_the_progress_bar_shows_on_a_terminal_that_reports_no_size():
    """The pseudo-terminal of `script` (or an IDE) reports 0 x 0: tqdm hid the bar there."""
    main_fd, terminal = pty.openpty()  # a new pseudo-terminal has no size
    code = ('import time\nfrom utils.files import progress_bar\nbar = progress_bar(30, "step")\n'
            'for _ in range(3):\n    bar.update(1)\n    time.sleep(0.15)\nbar.close()\n')
    subprocess.run([sys.executable, '-c', code], stderr=terminal, cwd=Path(__file__).resolve().parents[1], timeout=60,
                   check=True)
    os.close(terminal)
    shown = b''
    while True:
        try:
            chunk = os.read(main_fd, 4096)
        except OSError:  # the terminal closed
            break
        if not chunk:
            break
        shown += chunk
    os.close(main_fd)
    assert b'2/30 [' in shown and b'step/s' in shown
