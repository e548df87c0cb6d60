"""utils/malloc.py: glibc's thresholds raised through mallopt once at start-up, skipped on opt-out, when the
environment sets them, and outside glibc; and the effect it is for (a freed large block stays resident)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from utils import malloc

ROOT = Path(__file__).resolve().parents[1]


class FakeLibc:
    def __init__(self, accepts=True):
        self.calls, self.accepts = [], accepts

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return int(self.accepts)


def test_tune_raises_the_mmap_and_trim_thresholds():
    libc = FakeLibc()
    line = malloc.tune({}, libc)
    # <malloc.h>: M_MMAP_THRESHOLD -3, M_TRIM_THRESHOLD -1
    assert libc.calls == [(-3, 2 ** 30), (-1, 2 ** 31 - 1)]
    assert line.startswith('malloc: ') and malloc.OPT_OUT in line


@pytest.mark.parametrize('environ', [{'TXL_MALLOC_DEFAULTS': '1'}, {'MALLOC_MMAP_THRESHOLD_': '65536'},
                                     {'MALLOC_TRIM_THRESHOLD_': '0'},
                                     {'GLIBC_TUNABLES': 'glibc.malloc.mmap_threshold=65536'}])
def test_tune_leaves_malloc_alone_on_opt_out_or_when_the_environment_sets_it(environ):
    libc = FakeLibc()
    line = malloc.tune(environ, libc)
    assert libc.calls == [] and line.startswith('malloc: ')


def test_unrelated_settings_do_not_stop_the_tuning():
    libc = FakeLibc()
    malloc.tune({'GLIBC_TUNABLES': 'glibc.cpu.hwcaps=-AVX512F', 'TXL_MALLOC_DEFAULTS': '0'}, libc)
    assert len(libc.calls) == 2


def test_a_refusal_is_said():
    assert 'refused' in malloc.tune({}, FakeLibc(accepts=False))


def test_nothing_happens_outside_glibc(monkeypatch):
    monkeypatch.setattr(malloc.platform, 'libc_ver', lambda: ('', ''))
    assert malloc.glibc() is None
    assert malloc.tune({}) is None


# A 48 MiB block (above glibc's 32 MiB mmap ceiling) is written, freed, and the resident set measured.
FREED_BLOCK = '''
import ctypes, os, sys
sys.path.insert(0, sys.argv[1])
from utils import malloc
print(malloc.tune())
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def rss_mib():
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmRSS')) // 1024
block = libc.malloc(48 << 20)
ctypes.memset(block, 1, 48 << 20)
before = rss_mib()
libc.free(block)
print(before - rss_mib())
'''


@pytest.mark.skipif(malloc.glibc() is None, reason='glibc only')
@pytest.mark.parametrize('opt_out', [False, True])
def test_a_freed_large_block_stays_resident_when_tuned(opt_out):
    env = {k: v for k, v in os.environ.items() if k not in malloc.USER_SETTINGS + ('GLIBC_TUNABLES', malloc.OPT_OUT)}
    if opt_out:
        env[malloc.OPT_OUT] = '1'
    out = subprocess.run([sys.executable, '-c', FREED_BLOCK, str(ROOT)], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    released = int(out[-1])
    assert ('stay in the heap' in out[0]) != opt_out
    assert released > 40 if opt_out else released < 8   # glibc unmaps it; tuned, the heap keeps it
