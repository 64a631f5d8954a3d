"""bench/plot.py draws whatever benchmark results exist and says what it skipped (no benchmark runs here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

PLOT = Path(__file__).resolve().parent.parent / "bench" / "plot.py"


@pytest.fixture(scope="module")
def plot():
    spec = importlib.util.spec_from_file_location("bench_plot", PLOT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def throughput(precision: str) -> dict:
    row = {"tokens_per_s": 100.0, "s_per_step": 5.0, "mfu": 0.4, "mfu_executed": 0.6, "peak_rss_mib": 3000}
    return {"model": "m", "precision": precision, "batch": 8, "threads": 2, "cpu": "AMD EPYC",
            "cpu_features": "avx2, avx512f", "results": {"hf-peft": {**row, "speedup": 1.0},
                                                         "selfcog": {**row, "tokens_per_s": 250.0, "speedup": 2.5}}}


def test_plot_draws_the_panels_it_has_and_skips_the_rest(plot, tmp_path, capsys):
    (tmp_path / "train_throughput.json").write_text(json.dumps(throughput("fp32")))
    (tmp_path / "train_throughput_bf16.json").write_text(json.dumps(throughput("bf16 autocast")))
    (tmp_path / "time_to_identity.json").write_text(json.dumps({"goal_seconds": 60, "results": {
        "selfcog": {"steps": 20, "tokens": 12000, "train_seconds": 40.0, "identity": 0.96, "retention": 0.94},
        "seed-recipe": {"steps": 1, "recipe_steps": 69, "tokens": 32592, "train_seconds": 200.0,
                        "tokens_per_s": 160.0, "budget_tokens": 2182500, "identity": 0.0, "retention": 1.0}}}))
    (tmp_path / "generation.json").write_text("{not json")
    out = tmp_path / "figure.png"
    assert plot.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    said = capsys.readouterr()
    assert "panels: training, training bf16, time to identity" in said.out
    assert "generation.json" in said.err and "train_step.json not found" in said.err


def test_plot_with_no_results_says_so(plot, tmp_path, capsys):
    assert plot.main(["--results", str(tmp_path)]) == 1
    assert "nothing to plot" in capsys.readouterr().err
    assert not (tmp_path / "performance.png").exists()


@pytest.mark.parametrize("folder", ["", "avx2"])
def test_plot_reads_the_stored_results(plot, tmp_path, capsys, folder):
    """The committed results (bench/results/, bench/results/avx2/) carry every key the panels read."""
    results = PLOT.parent / "results" / folder
    assert plot.main(["--results", str(results), "--out", str(tmp_path / "figure.png")]) == 0
    said = capsys.readouterr()
    assert "skip panel" not in said.err
    assert "training step" in said.out and "time to identity" in said.out
