"""What the benchmarks ran on: the CPU's name and its measured fp32 matmul peak."""

from __future__ import annotations

import time
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def matmul_peak(threads: int, n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of an n x n x n fp32 matmul with `threads` torch threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9
