"""Keep freed heap memory in the process (glibc ``mallopt``), so big temporaries are not page-faulted anew.

glibc's malloc serves a request of at least ``M_MMAP_THRESHOLD`` bytes (128 KiB at start,
raised dynamically up to 32 MiB as such blocks are freed) with a fresh ``mmap``, and gives the
top of the heap back to the kernel when more than ``M_TRIM_THRESHOLD`` bytes are free there.
Either way the next step's multi-MB tensors (the (B K, N) scores of the exact softmax, ...)
land on pages the kernel has to fault in and zero again.  :func:`keep_freed_memory` sets

    M_MMAP_THRESHOLD = 32 MiB   (the largest glibc accepts: every smaller block comes from the heap)
    M_TRIM_THRESHOLD = -1       (never trim the heap top)

the same as the environment ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=-1``.

Trade-off: memory a step frees stays in the process, so its resident size stays at its peak
(the largest heap it ever used) instead of shrinking between steps; nothing is leaked, later
allocations reuse it.  A training step reaches that peak every step anyway, so a training
process pays nothing more; a notebook that trains and then does other work keeps the peak.
Measured with ``bench/bench_train.py --sections levers`` (alternated processes, ML-100k max_len
50; glibc's dynamic threshold already spares most faults once warm): 0.96x to 1.05x per step on
a quiet machine, 1.42x once under load.  Not a steady win, so ``TrainConfig.keep_freed_memory``
is off by default (``python -m mind train --keep-freed-memory`` turns it on).

Only glibc on Linux has these knobs; elsewhere (macOS, Windows, musl) this is a no-op that
returns False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 = 32 MiB on 64-bit systems.
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def _glibc():
    """The loaded C library if it is glibc on Linux, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Apply the two ``mallopt`` settings above to this process; True if glibc accepted both.

    Process-wide and one-way (glibc cannot go back to its dynamic threshold); calling it again
    is harmless.
    """
    libc = _glibc()
    if libc is None:
        return False
    ok_mmap = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
    ok_trim = libc.mallopt(M_TRIM_THRESHOLD, -1) == 1
    return ok_mmap and ok_trim
