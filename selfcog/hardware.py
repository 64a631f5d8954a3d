"""The CPU this runs on, read from /proc/cpuinfo (Linux; elsewhere: unknown, no native bf16). No torch, so
`selfcog serve` and the benchmarks read it without loading the trainer."""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
"""The vector extensions that decide CPU training speed: AVX2 only, AVX-512, and native bf16 (AVX512-BF16, AMX)."""
NATIVE_BF16 = ("avx512_bf16", "amx_bf16")


def cpuinfo() -> str | None:
    try:
        return CPUINFO.read_text()
    except OSError:
        return None


def cpu_name() -> str:
    for line in (cpuinfo() or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def cpu_flags() -> set[str]:
    """Every word of /proc/cpuinfo (the flags among them); empty where it cannot be read."""
    return set((cpuinfo() or "").split())


def cpu_features() -> str:
    """FEATURES this CPU has, comma-separated: "no AVX2" for none, "unknown" without /proc/cpuinfo."""
    text = cpuinfo()
    if text is None:
        return "unknown"
    flags = set(text.split())
    return ", ".join(f for f in FEATURES if f in flags) or "no AVX2"


def cpu_has_native_bf16() -> bool:
    """Whether bf16 matmuls run natively here (AVX512-BF16 or AMX); elsewhere they are emulated, ~10x slower."""
    return not cpu_flags().isdisjoint(NATIVE_BF16)
