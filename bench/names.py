"""Name panel: `selfcog run` on many names, one table of every held-out score, tuned-on and held-apart names apart.

Each name runs as a user would run it (`selfcog run --name NAME`, a fresh process, the embedded model, caches
warm after the first name), with `eval.fresh` on: the `fresh` held-out part, kept out of every choice of method
and settings, is scored too and reported in its own table. The names span the kinds the product must handle:
Chinese names of 2-4 characters, an English first+last name, a name with diacritics, a single common word, a
multi-word organisation and a name holding a common English word. HELD_APART names were never run while the
method and defaults were chosen.

    python bench/names.py                       # every name -> bench/results/names.json + names.md
    python bench/names.py --names Alice 李明     # a subset (results merged into the same JSON)
    python bench/names.py --fresh               # also score the fresh part (once, after the defaults are chosen)
    python bench/names.py --keep /tmp/panel     # keep every run's folder, to read the answers

Without --fresh a name keeps the fresh scores it has in the JSON. `seconds` is what a plain `selfcog run` costs:
the run's total without the fresh part's scoring.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from machine import cpu_features, cpu_name

# A held-apart name joins TUNED_ON once its results have informed a choice of method or settings.
TUNED_ON = ["Alice", "伍鲜同志", "John Carter", "the Acme Robotics team", "李明", "José Núñez", "Summer Brooks", "欧阳晓雪",
            "张伟", "François Dubois", "Grace Miller", "诸葛明月", "陈思远", "Björn Lund", "Nora Quinn"]
HELD_APART = ["王雨桐", "Zoë Fontaine", "Hannah Lee"]

ROOT = Path(__file__).resolve().parent.parent
SELFCOG = [sys.executable, "-m", "selfcog"]

COLUMNS = [("identity", "identity"), ("robust", "robustness"), ("ret. en", "retention"), ("ret. zh", "retention_zh"),
           ("ret. traps", "retention_traps"), ("leak", "leakage"), ("leak traps", "leakage_traps"),
           ("repeats id", "repetition_identity"), ("repeats gen", "repetition_general")]


def run_name(name: str, out: Path, extra: list[str], fresh: bool) -> dict:
    began = time.perf_counter()
    done = subprocess.run([*SELFCOG, "run", "--name", name, "--out", str(out), "--set", f"eval.fresh={fresh}",
                           *extra], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"selfcog run --name {name}: exit {done.returncode}\n{done.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    history = metrics["training"]["dev_history"]
    seconds = metrics["seconds"]
    plain = seconds["total"] - seconds.get("evaluate_merged_fresh", 0)
    return {"wall_seconds": round(wall, 1), "run_seconds": round(plain, 1),
            "seconds": metrics["seconds"], "steps": metrics["training"]["steps"],
            "stopped_early": metrics["training"]["steps"] < metrics["training"].get("max_steps", 10 ** 9),
            "dev_history": history, "base": metrics["base"], "tuned": metrics["tuned"],
            "failures": metrics["failures"], "fresh": metrics.get("fresh")}


def cell(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def table(results: dict, names: list[str], part: str) -> list[str]:
    head = "| name | " + " | ".join(c for c, _ in COLUMNS) + " | steps | seconds |"
    lines = [head, "|---" * (len(COLUMNS) + 3) + "|"]
    for name in names:
        r = results.get(name)
        if r is None:
            continue
        scores = r["tuned"] if part == "test" else (r["fresh"] or {}).get("tuned", {})
        base = r["base"] if part == "test" else (r["fresh"] or {}).get("base", {})
        cells = []
        for _, key in COLUMNS:
            value = cell(scores.get(key))
            if key.startswith("repetition"):
                value += f" (base {cell(base.get(key))})"
            cells.append(value)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['steps']} | {r['run_seconds']} |")
    return lines


def markdown(report: dict) -> str:
    results = report["results"]
    out = [f"Name panel, {report['date']}, {report['cpu']} ({report['cpu_features']}), embedded model, caches warm.",
           ""]
    for title, names in (("Names the method was tuned on", TUNED_ON), ("Held-apart names", HELD_APART)):
        for part in ("test", "fresh"):
            if part == "fresh" and not any((results.get(name) or {}).get("fresh") for name in names):
                continue  # no fresh part scored in this panel
            out += [f"### {title}: {part} questions", "", *table(results, names, part), ""]
            if part == "fresh":
                out += ["Fresh scores come from the run that scored the fresh part (`--fresh`, once); steps and "
                        "seconds from the latest run.", ""]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", nargs="*", default=TUNED_ON + HELD_APART)
    parser.add_argument("--out", default="bench/results/names.json")
    parser.add_argument("--fresh", action="store_true", help="also score the fresh held-out part")
    parser.add_argument("--keep", help="keep each name's run folder (report.md with every answer) under this folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="section.key=value passed to every run (results then go to --out only)")
    args = parser.parse_args()
    path = Path(args.out)
    report = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"results": {}}
    extra = [x for item in args.overrides for x in ("--set", item)]
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.keep or scratch)
        for i, name in enumerate(args.names):
            r = run_name(name, work / f"run{i}", extra, args.fresh)
            if not args.fresh and report["results"].get(name, {}).get("fresh"):
                r["fresh"] = report["results"][name]["fresh"]
            report["results"][name] = r
            t = r["tuned"]
            print(f"{name}: identity {cell(t['identity'])} robust {cell(t['robustness'])} retention "
                  f"{cell(t['retention'])}/{cell(t['retention_zh'])}/{cell(t['retention_traps'])} leakage "
                  f"{cell(t['leakage'])}/{cell(t['leakage_traps'])} repeats {cell(t['repetition_identity'])} "
                  f"steps {r['steps']} {r['run_seconds']} s", flush=True)
    report.update(date=date.today().isoformat(), cpu=cpu_name(), cpu_features=cpu_features(),
                  overrides=args.overrides, tuned_on=TUNED_ON, held_apart=HELD_APART)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    path.with_suffix(".md").write_text(markdown(report) + "\n", encoding="utf-8")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
