"""The training loss curve as a PNG."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure  # the object API: no pyplot, so no GUI backend is chosen or needed


def plot_loss(log_file: Path, target: Path) -> Path | None:
    """Loss against step from `log.jsonl` as a PNG (written to a temp file, then renamed)."""
    rows = [json.loads(line) for line in Path(log_file).read_text().splitlines() if line.strip()]
    points = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
    if not points:
        return None
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(*zip(*points), marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = target.with_name(f".{target.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(target)
    return target
