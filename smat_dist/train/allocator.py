"""Keep freed memory in the process on CPU: glibc's malloc settings for a training loop.

Why: a meta-step allocates and frees the same activations and gradients every step, blocks of a few
hundred KB to tens of MB. glibc serves a block above its mmap threshold (adaptive, 128 KB at start) with
fresh pages from the kernel and returns them on free, and trims the top of its heap once enough is free,
so each step faults its working set back in page by page: on ViT-S/16 (10-way 5-shot 10-query, 84 px,
2 threads) ≈ 0.5 M minor page faults per meta-step, about 6 % of its time (docs/performance.md#cpu-allocator).
Fixing the thresholds keeps blocks up to 32 MB (glibc's maximum) in the heap and the heap untrimmed: the
same memory is reused every step, at the cost of not returning it to the OS until the process ends.
Blocks above 32 MB (the (M, G) gate-logit gradient at ViT-S size) are still mapped afresh.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: trim only above 2 GB of free heap top (in practice never)

_applied = False


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds once per process; False where there is no glibc ``mallopt``
    (macOS, musl) or it refused a value. Allocation addresses change, computed values do not."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.debug("mallopt refused the allocator settings; keeping glibc's defaults")
        return False
    _applied = True
    return True
