"""One figure of the benchmark results: training throughput, generation speed, time to identity.

Reads from `--results` (default bench/results/), skipping any panel whose file is missing or unreadable:

- `train_throughput.json` and `train_throughput_bf16.json` (bench/train_throughput.py, fp32 and `--bf16`):
  training tokens/s per trainer, each bar annotated with its speed-up over the plain HF `Trainer` + PEFT
  baseline ("N.Nx");
- `generation.json` (bench/generation.py): decode and overall tokens/s of selfcog's streaming generator
  against bare `model.generate`, and their time to first token;
- `train_step.json` (bench/train_step.py): seconds per step of `selfcog run`'s training, the step before the
  one-log-softmax change against each speed change added in turn, with the paired speed-up;
- `time_to_identity.json` (bench/time_to_identity.py): training seconds, selfcog against the seed recipe,
  annotated with the identity and retention scores reached; where the seed recipe was stopped early and its
  `budget_tokens` is given, its whole budget at its measured token rate is drawn hatched (projected), on a
  log scale when the bars differ more than 20x, and the goal as a dashed line where `goal_seconds` is given.

    python bench/plot.py [--results bench/results] [--out bench/results/performance.png]

Writes a PNG (matplotlib, Agg backend: no display needed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COLORS = {"selfcog": "#2a7ab9", "streaming": "#2a7ab9", "bare": "#9a9a9a", "hf-peft": "#9a9a9a",
          "seed-recipe": "#9a9a9a", "selfcog-noshare": "#8fbde0"}


def load(path: Path) -> dict | None:
    if not path.is_file():
        print(f"skip: {path} not found", file=sys.stderr)
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data.get("results"), dict) or not data["results"]:
            raise ValueError("no 'results' object")
        return data
    except (OSError, ValueError, AttributeError) as exc:
        print(f"skip: {path}: {exc}", file=sys.stderr)
        return None


def color(name: str) -> str:
    return COLORS.get(name, "#5a9e6f")


def label_bars(ax, bars, labels: list[str]) -> None:
    for bar, text in zip(bars, labels):
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=9)


def headroom(ax, values: list[float], factor: float = 1.22) -> None:
    top = max([v for v in values if v] or [1])
    ax.set_ylim(0, top * factor)


def train_panel(ax, data: dict) -> None:
    results = data["results"]
    names = list(results)
    values = [results[n]["tokens_per_s"] for n in names]
    bars = ax.bar(names, values, color=[color(n) for n in names])
    labels = []
    for n in names:
        speedup = results[n].get("speedup")
        labels.append(f"{speedup:.1f}x" if isinstance(speedup, (int, float)) else f"{results[n]['tokens_per_s']:.0f}")
    label_bars(ax, bars, labels)
    headroom(ax, values)
    ax.set_ylabel("training tokens/s")
    detail = f"{data.get('model', '')}, {data.get('precision', 'fp32')}, batch {data.get('batch', '?')}, " \
             f"{data.get('threads', '?')} threads"
    ax.set_title(f"Training throughput\n{detail}", fontsize=10)
    ax.tick_params(axis="x", labelsize=8)


def step_panel(ax, data: dict) -> None:
    """The identity job's training step, the first variant against each speed change added (bench/train_step.py)."""
    results = data["results"]
    names = list(results)
    values = [results[n]["s_per_step"] for n in names]
    bars = ax.bar(range(len(names)), values, color=[color(n) if n == "selfcog" else "#8fbde0" for n in names])
    bars[0].set_color("#9a9a9a")
    label_bars(ax, bars, [f"{v:.2f} s\n{results[n]['speedup']:.2f}x" for n, v in zip(names, values)])
    ax.set_xticks(range(len(names)), names, fontsize=8, rotation=15)
    headroom(ax, values, 1.3)
    ax.set_ylabel("seconds per training step (median)")
    ax.set_title(f"`selfcog run` training step\n{data.get('tokens_per_step', '?'):.0f} tokens/step, "
                 f"{data.get('threads', '?')} threads, interleaved", fontsize=10)


def generation_tokens_panel(ax, data: dict) -> None:
    results = data["results"]
    names = [n for n in ("streaming", "bare") if n in results] or list(results)
    metrics = [("decode_tokens_per_s", "decode"), ("overall_tokens_per_s", "overall")]
    width = 0.8 / len(names)
    values = []
    for i, name in enumerate(names):
        xs = [m + (i - (len(names) - 1) / 2) * width for m in range(len(metrics))]
        ys = [results[name].get(key) or 0 for key, _ in metrics]
        values += ys
        bars = ax.bar(xs, ys, width, label=name, color=color(name))
        label_bars(ax, bars, [f"{y:.1f}" for y in ys])
    ax.set_xticks(range(len(metrics)), [label for _, label in metrics])
    headroom(ax, values, 1.4)
    ax.set_ylabel("generated tokens/s")
    ax.legend(fontsize=8, loc="upper center", ncol=len(names), frameon=False)
    config, comparison = data.get("config", {}), data.get("comparison", {})
    ratio = comparison.get("decode_ratio")
    ratio_text = f"; streaming/bare {ratio:.2f}x" if isinstance(ratio, (int, float)) else ""
    ax.set_title(f"Generation speed{ratio_text}\n{config.get('model', '')}, greedy, "
                 f"{config.get('max_new_tokens', '?')} new tokens", fontsize=10)


def generation_ttft_panel(ax, data: dict) -> None:
    results = data["results"]
    names = [n for n in ("streaming", "bare") if n in results] or list(results)
    values = [results[n].get("ttft_median_ms") or 0 for n in names]
    bars = ax.bar(names, values, color=[color(n) for n in names])
    label_bars(ax, bars, [f"{v:.0f} ms" for v in values])
    headroom(ax, values)
    ax.set_ylabel("time to first token, median (ms)")
    diff = data.get("comparison", {}).get("ttft_diff_median_ms")
    diff_text = f"\nstreaming - bare: {diff:+.0f} ms (paired median)" if isinstance(diff, (int, float)) else ""
    ax.set_title(f"Time to first token{diff_text}", fontsize=10)


def duration(seconds: float) -> str:
    if seconds < 600:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def identity_panel(ax, data: dict) -> None:
    """Measured training seconds per recipe; for the seed recipe (stopped early: the whole of it takes hours
    on a CPU) also its whole token budget at its measured token rate, drawn hatched as a projection."""
    results = data["results"]
    names = sorted(results, key=lambda n: (n != "selfcog", n == "seed-recipe"))  # selfcog, its variants, seed
    labels, values, texts, projected = [], [], [], []
    for n in names:
        r = results[n]
        steps = f"\n({r['steps']} of {r['recipe_steps']} steps)" if "recipe_steps" in r and "steps" in r else ""
        precision = "\n(bf16 autocast)" if r.get("bf16_autocast") else ""
        labels.append(n + steps + precision)
        values.append(r["train_seconds"])
        parts = [duration(r["train_seconds"])]
        for key in ("identity", "retention"):
            if isinstance(r.get(key), (int, float)):
                parts.append(f"{key} {r[key]:.2f}")
        texts.append("\n".join(parts))
        projected.append(False)
        budget = r.get("budget_tokens")
        rate = r.get("tokens_per_s") or (r["tokens"] / r["train_seconds"] if r.get("tokens") and r["train_seconds"]
                                         else None)
        if isinstance(budget, (int, float)) and rate:
            labels.append(f"{n}\nwhole ({budget:,} tokens)")
            values.append(budget / rate)
            texts.append(f"~{duration(budget / rate)}\nprojected")
            projected.append(True)
    bars = ax.bar(range(len(values)), values, color=[color(label.split("\n")[0]) for label in labels])
    for bar, hatch in zip(bars, projected):
        if hatch:
            bar.set_hatch("//")
            bar.set_alpha(0.6)
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    label_bars(ax, bars, texts)
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
        ax.set_ylim(min(positive) / 2, max(positive) * 30)
        ax.set_ylabel("training seconds (log scale)")
    else:
        ax.set_ylim(0, max(values + [1]) * 1.45)
        ax.set_ylabel("training seconds")
    title = "Time to identity"
    mine = results.get("selfcog", {}).get("train_seconds")
    if mine and any(projected):
        title += f"\nwhole seed recipe ~{max(v for v, p in zip(values, projected) if p) / mine:.0f}x selfcog's time"
    elif mine and "seed-recipe" in results:
        title += f"\nseed recipe {results['seed-recipe']['train_seconds'] / mine:.1f}x selfcog's time"
    goal = data.get("goal_seconds")
    if isinstance(goal, (int, float)):
        ax.axhline(goal, color="#c0392b", linestyle="--", linewidth=1, label=f"goal: {goal:.0f} s of training")
        ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(RESULTS), help="folder with the benchmarks' JSON files")
    parser.add_argument("--out", default=None, help="PNG to write (default: RESULTS/performance.png)")
    args = parser.parse_args(argv)
    folder = Path(args.results)
    out = Path(args.out) if args.out else folder / "performance.png"

    panels = []
    train = load(folder / "train_throughput.json")
    if train:
        panels.append(("training", train_panel, train))
    train_bf16 = load(folder / "train_throughput_bf16.json")
    if train_bf16:
        panels.append(("training bf16", train_panel, train_bf16))
    step = load(folder / "train_step.json")
    if step:
        panels.append(("training step", step_panel, step))
    generation = load(folder / "generation.json")
    if generation:
        panels += [("generation tokens/s", generation_tokens_panel, generation),
                   ("generation TTFT", generation_ttft_panel, generation)]
    identity = load(folder / "time_to_identity.json")
    if identity:
        panels.append(("time to identity", identity_panel, identity))
    if not panels:
        print(f"nothing to plot: no results in {folder}", file=sys.stderr)
        return 1

    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    drawn = []
    for ax, (name, draw, data) in zip(axes.flat, panels):
        try:
            draw(ax, data)
            drawn.append(name)
        except (KeyError, TypeError, ValueError) as exc:  # a file of the wrong shape: say so, keep the rest
            print(f"skip panel {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            ax.set_axis_off()
            ax.text(0.5, 0.5, f"{name}:\nunreadable results", ha="center", va="center", transform=ax.transAxes)
        ax.spines[["top", "right"]].set_visible(False)
    machine = next((p[2] for p in panels if p[2].get("cpu_features")), {})
    where = f" — {machine['cpu']} ({machine['cpu_features']})" if machine.get("cpu") else ""
    fig.suptitle(f"selfcog performance{where}", fontsize=12)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out} (panels: {', '.join(drawn) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
