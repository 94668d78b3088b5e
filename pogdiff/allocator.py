"""Keep the memory a CPU training step frees in the process's heap (glibc's malloc only).

glibc hands memory freed at the top of its heap back to the system once it exceeds the trim
threshold, and serves allocations above the mmap threshold with fresh mappings; by default both
thresholds adapt to what the process freed before. A training step on the CPU allocates and frees
its activations every step, so they went back to the system and were faulted in again the next
step: about 17 000 page faults per step for the embedded default at batch 32 in a fresh process
(0.04 to 0.09 s of system time per step of about 0.5 s on 2 cores), and a count that depended on
what the process had run before (about 1 200 after a run with other batch shapes). With both
thresholds fixed, steps after the first few take almost none.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest; allocations above it still get their own mapping
TRIM_THRESHOLD = 256 << 20  # free memory kept at the heap's top before any goes back


def keep_freed_memory() -> bool:
    """Fix this process's malloc thresholds (``MMAP_THRESHOLD``, ``TRIM_THRESHOLD``); idempotent.

    False, changing nothing, where the C library has no ``mallopt`` (not glibc).
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
