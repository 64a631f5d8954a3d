"""Peak memory of `selfcog merge` against the size of the model it writes.

Builds a LoRA adapter for the base model (r=16 on every linear layer, random B so the merge changes
every weight), then runs `python -m selfcog merge` in a subprocess and polls its peak resident set
(VmHWM in /proc/PID/status) until it exits. The merge is measured alone: the adapter is made in this
process, before the child starts.

Seconds are the child's wall time from start to exit: Python start-up, imports, loading the base model and
the adapter, the merge and writing the files. The same is measured for a bare interpreter that only imports
torch, transformers, peft and safetensors (the floor under any merge, in memory and in seconds), so
`seconds_minus_import_floor` is roughly load + merge + write. Several `--dtype`s (comma-separated) share one
adapter and run one after another.

    SELFCOG_HOME=/tmp/selfcog-home python bench/merge_memory.py [--base smollm2-135m] [--dtype fp32[,bf16,fp16]]

Prints each result as JSON, then a markdown table; writes bench/results/merge.json (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_adapter(base: str, target: Path, rank: int = 16) -> int:
    """Save a random LoRA adapter for `base` into `target`; returns the base model's fp32 size in bytes."""
    import torch
    from peft import LoraConfig, get_peft_model

    from selfcog.models import load_model

    model, _ = load_model(base, dtype=torch.float32, device="cpu")
    size = sum(p.numel() * 4 for p in model.parameters())  # parameters() yields a tied weight once
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    torch.manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would make the merge a no-op
            torch.nn.init.normal_(param, std=0.02)
    peft_model.save_pretrained(target)
    return size


def peak_rss(cmd: list[str], interval: float = 0.05) -> tuple[int, int, float]:
    """Run `cmd`; return (exit status, peak RSS in bytes, seconds). VmHWM is the kernel's own high-water mark."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(interval)
    return proc.wait(), peak, time.perf_counter() - start


def markdown(report: dict) -> str:
    lines = [f"Merge: `{report['base']}` (fp32 weights {report['model_fp32_mib']} MiB), LoRA r=16 on every linear "
             f"layer; import floor {report['import_floor_mib']} MiB, {report['import_floor_seconds']} s", "",
             "| dtype | written MiB | peak RSS MiB | peak / model | (peak - floor) / model | seconds | "
             "seconds - import floor |", "|---|---|---|---|---|---|---|"]
    for dtype, r in report["results"].items():
        lines.append(f"| {dtype} | {r['written_mib']} | {r['peak_rss_mib']} | {r['peak_over_model']} | "
                     f"{r['peak_minus_floor_over_model']} | {r['seconds']} | {r['seconds_minus_import_floor']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--dtype", default="fp32", help="fp32, fp16 or bf16; several comma-separated")
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "merge.json"))
    args = parser.parse_args()
    dtypes = args.dtype.split(",")
    if not dtypes or any(d not in ("fp32", "fp16", "bf16") for d in dtypes):
        parser.error(f"--dtype {args.dtype}: choose from fp32, fp16, bf16 (comma-separated)")

    mib = 1 / 2**20
    results = {}
    with tempfile.TemporaryDirectory(prefix="selfcog-merge-bench-") as tmp:
        adapter = Path(tmp) / "adapter"
        model_bytes = make_adapter(args.base, adapter)
        # A bare interpreter with torch+transformers imported: the floor under any merge.
        _, floor, floor_seconds = peak_rss([sys.executable, "-c", "import torch, transformers, peft, safetensors"])
        for dtype in dtypes:
            out = Path(tmp) / f"merged-{dtype}"
            cmd = [sys.executable, "-m", "selfcog", "merge", args.base, str(adapter), str(out),
                   "--dtype", dtype, "--max-shard-size", args.max_shard_size]
            code, peak, seconds = peak_rss(cmd)
            if code != 0:
                print(f"merge failed with exit status {code}", file=sys.stderr)
                return 1
            written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            result = {"base": args.base, "dtype": dtype, "model_fp32_mib": round(model_bytes * mib),
                      "written_mib": round(written * mib), "peak_rss_mib": round(peak * mib),
                      "import_floor_mib": round(floor * mib), "peak_over_model": round(peak / model_bytes, 2),
                      "peak_minus_floor_over_model": round((peak - floor) / model_bytes, 2),
                      "seconds": round(seconds, 1), "import_floor_seconds": round(floor_seconds, 1),
                      "seconds_minus_import_floor": round(seconds - floor_seconds, 1)}
            print(json.dumps(result, indent=2))
            results[dtype] = result
    report = {"base": args.base, "max_shard_size": args.max_shard_size, "model_fp32_mib": round(model_bytes * mib),
              "import_floor_mib": round(floor * mib), "import_floor_seconds": round(floor_seconds, 1),
              "cpu_count": os.cpu_count(), "python": platform.python_version(),
              "loadavg_1min": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "results": results}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"\n(JSON: {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
