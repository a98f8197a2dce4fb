"""Keep freed host memory in the process instead of handing it back to the kernel.

A training step allocates and frees the same large tensors every step (activations, their
gradients, the box head's 1024 x 12544 RoI features). glibc serves blocks over its mmap
threshold (at most 32 MB) with fresh `mmap`s and returns freed heap tops to the kernel, so
every step faults those pages in again: 37-133 thousand minor faults and 0.14-1.0 s of
system time per steady mit_b2 step on the 2-core VM (docs/performance.md, "Host memory").
Serving every block from the heap and trimming it only past 2 GiB of free top leaves steady
steps (nearly) fault-free; the process keeps the memory of its largest step, which a
training process needs again at the next step anyway.

The setting is process-wide, so it is applied only where a process exists to train (a trial,
a data-parallel worker, a benchmark's engine side), never on import.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
LARGEST_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: trim only past 2 GiB of free top


def retain_freed_host_memory() -> bool:
    """Make glibc's malloc serve every block from the heap and keep what is freed.

    Returns whether it took effect; on other C libraries (macOS, musl) it does nothing and
    returns False. Numerics are untouched: only where the bytes come from changes.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = (bool(mallopt(M_MMAP_MAX, 0))
               and bool(mallopt(M_TRIM_THRESHOLD, LARGEST_TRIM_THRESHOLD)))
    if not applied:
        logger.debug("mallopt refused; freed host memory goes back to the kernel as before")
    return applied
