"""Time to identity: selfcog's main job against the seed tutorial's recipe, on the same CPU and base model.

- `selfcog`: what `selfcog run --name NAME` trains (generated identity set + preservation samples with the KL
  term, LoRA r=16, early stop on the dev phrasings). Reported: training wall seconds (with and without the
  dev checks that decide the early stop), sample tokens trained, and the held-out test scores (identity,
  retention, leakage) of the trained model.
- `seed-recipe`: the XTuner tutorial's settings — its two fixed pairs x 3,750 repeats, packed to 2,048 tokens,
  LoRA r=64 alpha=16 dropout 0.1, lr 2e-4, batch 1 x accumulation 16, 3 epochs, warmup 0.03 — trained with
  selfcog's engine (`selfcog train`'s code path, plain SFT) for `--seed-steps` optimizer steps only: the whole
  recipe would take hours here. Reported: its measured token rate, the recipe's full token budget and the
  hours that budget takes at that rate, and its held-out scores at the point where it was stopped.

    python bench/time_to_identity.py [--name 伍鲜同志] [--seed-steps 1] [--threads 2]
    python bench/time_to_identity.py --seed-steps 0     # rerun selfcog only; keep the stored seed-recipe result
    python bench/time_to_identity.py --compare-fp32     # and selfcog again without bf16 autocast (train.bf16=false)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_features, cpu_name


def selfcog_run(name: str, out: Path, bf16: str = "auto") -> dict:
    from selfcog.config import RunConfig
    from selfcog.run import run
    from selfcog.engine.trainer import use_bf16

    config = RunConfig()
    config.data.name, config.out, config.train.bf16 = name, str(out), bf16
    began = time.perf_counter()
    run(config)
    wall = time.perf_counter() - began
    metrics = json.loads((out / "metrics.json").read_text())
    training = metrics["training"]
    # Training = the Trainer's run without the dev checks, plus what fit() prepares before it: the preservation
    # samples' stored base top-k and frozen-layer states (read from the cache here; the cache's one-off first
    # computation is reported in the README), and the identity samples' frozen-layer states (computed every run).
    seconds = training["train_seconds"] - training["dev_check_seconds"] + training["prepare_seconds"]
    return {"steps": training["steps"], "tokens": training["tokens_trained"],
            "train_seconds": round(seconds, 1), "prepare_seconds": training["prepare_seconds"],
            "train_seconds_with_dev_checks": round(seconds + training["dev_check_seconds"], 1),
            "tokens_per_s": round(training["tokens_trained"] / seconds, 1),
            "run_seconds": round(wall, 1), "bf16_autocast": use_bf16(bf16), **scores(metrics["tuned"])}


def scores(summary: dict) -> dict:
    return {k: round(summary[k], 3) for k in ("identity", "retention", "leakage")}


def seed_recipe(name: str, steps: int, work: Path) -> dict:
    """The seed's recipe through selfcog's engine, stopped after `steps` optimizer steps; scored on the test split."""
    from peft import PeftModel

    from selfcog.cache import model_fingerprint
    from selfcog.config import RunConfig
    from selfcog.data.identity import Persona, dumps, seed_records
    from selfcog.data.formats import load_conversations
    from selfcog.data.tokenize import build_examples
    from selfcog.evaluate import score, with_retention
    from selfcog.models import load_model
    from selfcog.data.packing import pack_to_max_length
    from selfcog.recipes.sft import train_from_config

    data = work / "assistant.json"
    data.write_text(dumps(seed_records(Persona(name, "", "", ""), 3750)))
    config = RunConfig()
    config.data.data_files, config.data.max_length, config.data.pack_to_max_length = [str(data)], 2048, True
    config.data.deduplicate = False  # the recipe trains on every copy
    config.lora.r, config.lora.alpha, config.lora.dropout, config.lora.top_layers = 64, 16, 0.1, 0
    t = config.train
    t.learning_rate, t.batch_size, t.grad_accum, t.warmup_ratio, t.kl_weight = 2e-4, 1, 16, 0.03, 0.0
    t.epochs, t.max_steps, t.save_steps, t.logging_steps = 0.0, steps, 0, 1
    config.eval.eval_steps = 0

    model, tokenizer = load_model(config.model.spec, dtype=torch.float32)
    examples, _ = build_examples(tokenizer, load_conversations(data), False, 2048)
    tokens_per_epoch = sum(len(e["input_ids"]) for e in examples)
    rows = pack_to_max_length(examples, 2048)
    per_step = [sum(len(e["input_ids"]) for e in row) for row in rows[:16 * steps]]
    recipe_steps = 3 * -(-len(rows) // 16)

    began = time.perf_counter()
    adapter = train_from_config(config, work / "seed")
    seconds = time.perf_counter() - began
    log = [json.loads(line) for line in (work / "seed" / "log.jsonl").read_text().splitlines()]
    runtime = next((e["train_runtime"] for e in log if "train_runtime" in e), seconds)
    base = score(model, tokenizer, name, "test", 32, fingerprint=model_fingerprint(model.name_or_path))
    tuned = PeftModel.from_pretrained(model, str(adapter)).eval()
    result = with_retention(score(tuned, tokenizer, name, "test", 32), base)
    rate = sum(per_step) / runtime
    budget = 3 * tokens_per_epoch
    return {"steps": steps, "recipe_steps": recipe_steps, "tokens": sum(per_step), "train_seconds": round(runtime, 1),
            "tokens_per_s": round(rate, 1), "budget_tokens": budget, "budget_hours": round(budget / rate / 3600, 2),
            **scores(result.summary())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="伍鲜同志")
    parser.add_argument("--seed-steps", type=int, default=1,
                        help="optimizer steps of the seed recipe; 0 keeps the seed-recipe result already in --out")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compare-fp32", action="store_true",
                        help="run selfcog a second time with train.bf16=false (where `auto` turns bf16 on)")
    parser.add_argument("--out", default="bench/results/time_to_identity.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    earlier = None
    if args.seed_steps == 0:  # its one step takes ~5 minutes and does not change with selfcog's defaults
        try:  # read before the run, so a missing row stops the script at once, not after minutes of training
            earlier = json.loads(Path(args.out).read_text())["results"]["seed-recipe"]
        except (OSError, ValueError, KeyError) as err:
            print(f"{args.out}: no seed-recipe row to keep with --seed-steps 0 ({err!r}); run --seed-steps 1 once",
                  file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory() as work:
        results = {"selfcog": selfcog_run(args.name, Path(work) / "run")}
        if args.compare_fp32:
            results["selfcog-fp32"] = selfcog_run(args.name, Path(work) / "run-fp32", bf16="false")
        if earlier is None:
            results["seed-recipe"] = seed_recipe(args.name, args.seed_steps, Path(work))
        else:
            results["seed-recipe"] = {**earlier, "measured": earlier.get("measured", "an earlier run of this script")}
    report = {"name": args.name, "threads": args.threads, "cpu": cpu_name(), "cpu_features": cpu_features(),
              "goal_seconds": 60, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    r = report["results"]["seed-recipe"]
    return "\n".join([
        "| recipe | steps | tokens | train s | tokens/s | identity | retention | leakage |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {k} | {s['steps']} | {s['tokens']} | {s['train_seconds']} | {s['tokens_per_s']} | {s['identity']:.2f} | "
          f"{s['retention']:.2f} | {s['leakage']:.2f} |" for k, s in report["results"].items() if k != "seed-recipe"],
        f"| seed recipe, stopped | {r['steps']} of {r['recipe_steps']} | {r['tokens']} | {r['train_seconds']} | "
        f"{r['tokens_per_s']} | {r['identity']:.2f} | {r['retention']:.2f} | {r['leakage']:.2f} |",
        f"| seed recipe, whole | {r['recipe_steps']} | {r['budget_tokens']} | ~{r['budget_hours']} h at that rate | | | | |",
    ])


if __name__ == "__main__":
    sys.exit(main())
