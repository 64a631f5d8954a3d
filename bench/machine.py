"""What the benchmarks ran on: the CPU's name and features (selfcog.hardware) and its measured fp32 matmul peak."""

from __future__ import annotations

import time

import torch

from selfcog.hardware import cpu_features, cpu_name  # noqa: F401  (what the benchmarks import from here)


def matmul_peak(threads: int, n: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of an n x n x n matmul in `dtype` with `threads` torch threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9

