"""bench/scale.py and bench/cuda_scale.py on a tiny shape (the machinery, in seconds), the InternLM2-Chat-1.8B shape
they build, and `selfcog run` letting go of the trained model before it reads the merged one back."""

from __future__ import annotations

import gc
import importlib
import json
import subprocess
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from selfcog.testing import CORPUS, INTERNLM2_CHAT_1_8B, PLACEHOLDERS, TINY, internlm2_config, train_sentencepiece

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("scale"), importlib.import_module("cuda_scale")
    finally:
        sys.path.remove(str(BENCH))


def test_the_1_8b_shape_is_internlm2_chat_1_8b():
    cfg = internlm2_config(92544, {"type": "dynamic", "factor": 2.0}, shape=INTERNLM2_CHAT_1_8B, dtype=torch.bfloat16)
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (24, 2048, 8192)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (16, 8, 92544)
    assert (cfg["max_position_embeddings"], cfg["rope_theta"], cfg["torch_dtype"]) == (32768, 1000000, "bfloat16")
    assert internlm2_config(390, None)["torch_dtype"] == "float32"  # the tiny checkpoint is unchanged


def test_a_padded_sentencepiece_model_keeps_its_specials_last_and_never_encodes_the_padding(tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    from selfcog.internlm2 import load_internlm2_tokenizer
    from selfcog.testing import write_tiny_internlm2

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(train_sentencepiece(tuple(CORPUS), 384, 1000))
    assert len(proto.pieces) == 1000 and [p.piece for p in proto.pieces[-6:]] == PLACEHOLDERS
    shape = TINY.__class__(vocab=1000)
    tokenizer = load_internlm2_tokenizer(write_tiny_internlm2(tmp_path / "m", shape=shape, dtype=torch.bfloat16))
    assert len(tokenizer) == 1000 and tokenizer.convert_tokens_to_ids("<|im_start|>") == 999
    ids = tokenizer(" ".join(CORPUS[:5]))["input_ids"]
    assert max(ids) < 390  # the unused pieces are never produced


def test_scale_stages_on_a_tiny_shape(bench, tmp_path):
    scale, _ = bench
    model_dir = scale.checkpoint("tiny", tmp_path)
    assert json.loads((model_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    args = SimpleNamespace(model_dir=str(model_dir), precision="bf16", batch=4, steps=1, answers="none",
                           cache=tmp_path, threads=1, sample_tokens=2)
    assert scale.data_stage(args)["preservation"] > 0
    first = scale.first_run(args)
    assert {"base_answers", "stored_topk", "frozen_states"} <= set(first["projected_seconds"])
    assert all(s["peak_rss_mib"] > 0 for s in first["stages"].values())
    stats = {}
    for contender in ("selfcog", "hf-peft"):
        stats[contender] = scale.train(SimpleNamespace(**vars(args), contender=contender))["train"]
        assert stats[contender]["steps"] == 1 and stats[contender]["tokens_per_s"] > 0
    assert stats["selfcog"]["tokens"] == stats["hf-peft"]["tokens"]  # the same samples, counted alike
    merged = scale.merge(args)
    assert set(merged["stages"]) == {"load", "merge_and_write_fp32", "reload_merged", "evaluate_merged_one_batch"}
    combined = scale.combine([stats["selfcog"], stats["selfcog"]])
    report = {"date": "d", "config": json.loads((model_dir / "config.json").read_text()), "cpu": "c",
              "cpu_features": "f", "threads": 1, "batch": 4, "machine_shared": True, "precisions": {"bf16": {
                  "rounds_run": 1, "timed_steps_per_round": 1,
                  "first_run": first, "merge": merged,
                  "train": {"selfcog": {**combined, "peak_rss_mib": 1}, "hf-peft": {**combined, "peak_rss_mib": 1},
                            "speedup": 1.0, "speedup_cpu_time": 1.0},
                  "projected_run": scale.projection(first, combined, merged, 1)}}}
    text = scale.markdown(report)
    assert "| selfcog |" in text and "shared" in text and "25 steps" in text


def test_cuda_scale_parts_run_their_cpu_path_on_a_tiny_shape(bench, tmp_path):
    scale, cuda_scale = bench
    args = SimpleNamespace(model_dir=scale.checkpoint("tiny", tmp_path), cache=tmp_path, steps=1, new_tokens=4)
    if not torch.cuda.is_available():
        assert "skipped" in cuda_scale.qlora_selfcog(args) and "skipped" in cuda_scale.qlora_hf_peft(args)
    kernels = cuda_scale.kernels(args)
    assert kernels["ok"], kernels
    served = cuda_scale.serving(args)
    assert served["batched"]["completion_tokens"] > 0 and served["greedy_texts_agree"]


@pytest.mark.slow
def test_cuda_scale_dry_run_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH / "cuda_scale.py"), "--dry-run", "--cache", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout[out.stdout.index("{"):])
    assert report["dry_run"] and set(report["parts"]) == set(bench_parts())


def bench_parts():
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("cuda_scale").PARTS
    finally:
        sys.path.remove(str(BENCH))


def test_run_lets_go_of_the_trained_model_before_reading_the_merged_one(tiny_model_dir, tmp_path, monkeypatch):
    import selfcog.run as run_module
    from selfcog.cli import main
    from click.testing import CliRunner

    loaded: list[weakref.ref] = []
    alive_at_reload: list[bool] = []
    real = run_module.load_model

    def tracking(spec, **kwargs):
        if loaded:  # the merged model: the trained one must be gone by now
            gc.collect()
            alive_at_reload.append(loaded[0]() is not None)
        model, tokenizer = real(spec, **kwargs)
        loaded.append(weakref.ref(model))
        return model, tokenizer

    monkeypatch.setattr(run_module, "load_model", tracking)
    fast = ["--set", "train.max_steps=2", "--set", "train.batch_size=4", "--set", "eval.eval_steps=0",
            "--set", "eval.max_new_tokens=2", "--set", "eval.ask_max_new_tokens=2", "--set",
            "data.preserve_max_new_tokens=4", "--set", "data.preserve_ratio=0.1", "--set", "eval.fresh=false"]
    result = CliRunner().invoke(main, ["run", "--name", "Alice", "--model", str(tiny_model_dir), "--out",
                                       str(tmp_path / "out"), *fast], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert alive_at_reload == [False]
