"""Process memory while training: glibc's freed memory kept for the next step, and the peak in use."""

from __future__ import annotations

import ctypes
import os
import resource
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def freed_memory_kept():
    """While training on a CPU, keep freed memory in the process for the next step to reuse (glibc malloc).

    glibc serves each allocation above its mmap threshold (32 MiB at most) with a fresh mmap and unmaps it on
    free, so every step's [rows, vocab] logits, their gradient and the larger activations are page-faulted in
    anew (docs/benchmarks.md, "Freed memory kept", has the cost per step). With mmap off
    and heap trimming deferred, freed blocks are simply reused. Afterwards glibc's defaults come back and the
    heap is trimmed, so the memory is returned once training ends. A no-op where the C library has no `mallopt`
    (not glibc), and where the environment already tunes malloc (MALLOC_* or GLIBC_TUNABLES): that choice stands.
    """
    libc = ctypes.CDLL(None)
    mallopt, trim = getattr(libc, "mallopt", None), getattr(libc, "malloc_trim", None)
    tuned = any(key.startswith("MALLOC_") for key in os.environ) or "malloc" in os.environ.get("GLIBC_TUNABLES", "")
    if mallopt is None or trim is None or tuned:
        yield
        return
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 2 ** 31 - 1)
    try:
        yield
    finally:
        mallopt(m_mmap_max, 65536)  # glibc's defaults
        mallopt(m_trim_threshold, 128 * 1024)
        trim(0)


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    try:  # VmHWM: this process's peak resident set
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
        return round(int(line.split()[1]) / 1024, 1)
    except (OSError, StopIteration):
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
