"""Keep large freed blocks in glibc's heap, so that a training step does not fault its tensors in again.

glibc serves every block of 32 MiB or more with its own mmap and unmaps it when it is freed. A 64-expert
layer's weight gradients are such blocks (64 x 512 x 256 fp32 = 32 MiB each), so every step mapped them
afresh and the kernel zero-filled their pages again (the cost is measured in bench/README.md, "The MoE
layer"). Raising the mmap threshold puts those blocks in the heap; raising the trim threshold keeps the freed
heap for the next step instead of returning it to the kernel. The process then holds on to its peak heap,
which it needs again at the next step anyway.

train.py calls tune() once at start-up (before any tensor exists) and logs its line. Opt out with
TXL_MALLOC_DEFAULTS=1. Elsewhere than glibc (macOS, musl) nothing happens.
"""
import ctypes
import os
import platform

OPT_OUT = 'TXL_MALLOC_DEFAULTS'
# glibc reads these at start-up; a user who set them chose their own values, which mallopt would override.
USER_SETTINGS = ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_')
USER_TUNABLES = ('glibc.malloc.mmap_threshold', 'glibc.malloc.trim_threshold')
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # from <malloc.h>
MMAP_THRESHOLD = 2 ** 30                      # blocks below 1 GiB come from the heap
TRIM_THRESHOLD = 2 ** 31 - 1                  # the largest value mallopt's int takes: never trim


def glibc():
    """The C library's handle when it is glibc, else None."""
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return None
    try:
        return ctypes.CDLL('libc.so.6')
    except OSError:
        return None


def tune(environ=os.environ, libc=None):
    """Raise glibc's mmap and trim thresholds; returns the line to log, or None where there is nothing to say
    (not glibc)."""
    if environ.get(OPT_OUT, '') not in ('', '0'):
        return f'malloc: glibc defaults ({OPT_OUT} is set)'
    libc = libc or glibc()
    if libc is None:
        return None
    chosen = [name for name in USER_SETTINGS if name in environ]
    chosen += [name for name in USER_TUNABLES if name in environ.get('GLIBC_TUNABLES', '')]
    if chosen:
        return f'malloc: {", ".join(chosen)} as the environment sets them'
    if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD):
        return (f'malloc: freed blocks up to {MMAP_THRESHOLD >> 20} MiB stay in the heap for the next step '
                f'(glibc mallopt; {OPT_OUT}=1 keeps the defaults)')
    return 'malloc: glibc refused the mmap/trim thresholds; its defaults stay'
