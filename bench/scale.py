"""The tutorial's scale on a CPU: selfcog's identity training on an InternLM2-Chat-1.8B-shaped checkpoint.

Speed and memory do not depend on the weights' values, so a random checkpoint in InternLM2-Chat-1.8B's exact
layout and config (`selfcog.testing.INTERNLM2_CHAT_1_8B`: 24 layers, hidden 2048, GQA 16/8, vocab 92,544, bf16
safetensors in two shards, the sentencepiece tokenizer rebuilt by selfcog's loader) measures them. Built once and
cached under `--cache` (default `$SELFCOG_HOME/scale`).

Every stage runs in a process of its own, so each one's peak RSS (VmHWM, reset between sub-stages through
/proc/self/clear_refs) is its own:

- `first-run`: what a machine's first `selfcog run` on this base computes before training, timed on a bounded
  sample and projected to the full count: the base model's answers (`generate_batch` on 32 dev questions decoded
  together, `--sample-tokens` new tokens each, projected by groups of 32 to the test and dev sets and the
  preservation prompts: an upper bound, as `generate_batch` decodes up to 128 rows together), the stored top-k
  log-probs and the frozen layers' states (for the preservation samples of the trained subset, projected by
  tokens to every preservation sample).
- `train`, per contender, alternating A, B, A, B (`--rounds`): `selfcog` is `selfcog run`'s trainer
  (`selfcog.recipes.identity`: LoRA r16/a32 on every linear layer of the top 20 layers, packed rows with the
  shared prefix, stored top-k KL and name terms, frozen layers run once; their caches warm); `hf-peft` is a plain
  `Trainer` + PEFT LoRA with the same rank, targets and layers, same samples, batch and seed, padded batches and
  the model's own loss. Each round is 1 warm-up step, then `--steps` timed ones.
- `merge`: the adapter folded in and the fp32 merged model written (`selfcog.export.save_merged`), then the merged
  model loaded back, as `selfcog run` does, and one generation batch timed (the merged model's evaluation). It is
  read back in the base's dtype; `selfcog run` reads it back in fp32 whatever `model.dtype` is, so there the fp32
  precision's read-back and generation speed apply.

The training data is what `selfcog run --name Alice` builds (identity records, robustness forms, 2.25
preservation samples per identity sample) with the preservation answers the embedded model gave (`--answers
smollm2-135m`, read from its cache; a random model's answers are noise), tokenized by the 1.8B-shape tokenizer.
`--steps` x `--batch` samples drawn from it (seeded) are the trained subset.

`--precision`: `bf16` = base weights in bf16 (`model.dtype=bfloat16`) and bf16 autocast (a CPU with native bf16);
`fp32` = fp32 base, no autocast (what a CPU without native bf16 runs); `fp32-autocast` = fp32 base under bf16
autocast.

    nice -n 10 python bench/scale.py --precision bf16,fp32        # ~25 minutes on 2 cores
    python bench/scale.py --shape tiny --answers none --out /tmp/scale.json   # seconds: the machinery only
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from machine import cpu_features, cpu_name  # noqa: E402

from selfcog.testing import INTERNLM2_CHAT_1_8B, TINY, Shape, write_tiny_internlm2  # noqa: E402

SHAPES = {"1.8b": INTERNLM2_CHAT_1_8B, "tiny": TINY}
PRECISIONS = ("bf16", "fp32", "fp32-autocast")
PRECISION_TEXT = {"bf16": "base weights in bf16, bf16 autocast (a CPU with native bf16)",
                  "fp32": "base weights in fp32, no autocast (what a CPU without native bf16 runs)",
                  "fp32-autocast": "base weights in fp32, bf16 autocast (`selfcog run`'s default on this CPU)"}
NAME = "Alice"
RUN_STEPS = (25, 45)  # the embedded model's early stops across the name panel (bench/results/names.md)
GENERATION_BATCH = 32  # rows of the timed generation group; projections count groups of this many (an upper bound:
# generate_batch groups up to PREFILL_TOKENS prompt tokens, 128 rows at most)


# --- the checkpoint -------------------------------------------------------------------------------------------

def corpus() -> list[str]:
    """Text for the sentencepiece model: the questions and answers selfcog trains and evaluates on."""
    from selfcog.data.general import preservation_prompts
    from selfcog.data.identity import Persona, identity_records
    from selfcog.evaluate import question_sets

    lines = [m["content"] for split in ("dev", "test", "fresh") for answers in question_sets(split).values()
             for a in answers for m in a.conversation]
    lines += preservation_prompts(10_000)
    for record in identity_records(Persona(NAME, "", "", "")):
        for turn in record["conversation"]:
            lines += [turn.get("input", ""), turn.get("output", "")]
    return [line for line in lines if line]


def checkpoint(shape_name: str, cache: Path) -> Path:
    """The random checkpoint of `shape_name`, built once (bf16 safetensors, two shards as on the hub)."""
    target = cache / f"internlm2-{shape_name}-random"
    done = target / ".complete"
    if done.exists():
        return target
    began = time.perf_counter()
    shape = SHAPES[shape_name]
    write_tiny_internlm2(target, "safetensors", shape=shape, corpus=corpus() if shape.vocab else None,
                         dtype=torch.bfloat16)
    done.write_text(json.dumps({"seconds": round(time.perf_counter() - began, 1)}))
    return target


# --- memory ---------------------------------------------------------------------------------------------------

def reset_peak() -> None:
    """Start a new VmHWM window (Linux: clear_refs 5 resets the peak RSS to the current RSS)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


class Stages:
    """Seconds and peak RSS of each named sub-stage of this process."""

    def __init__(self):
        self.out: dict[str, dict] = {}

    def __call__(self, name: str):
        stages = self

        class Stage:
            def __enter__(self):
                gc.collect()
                reset_peak()
                self.began, self.cpu = time.perf_counter(), time.process_time()
                return self

            def __exit__(self, *exc):
                stages.out[name] = {"seconds": round(time.perf_counter() - self.began, 2),
                                    "cpu_seconds": round(time.process_time() - self.cpu, 2),
                                    "peak_rss_mib": peak_mib()}

        return Stage()


# --- the job --------------------------------------------------------------------------------------------------

def run_config(precision: str, batch: int, steps: int):
    from selfcog.config import RunConfig

    config = RunConfig()
    config.data.name = NAME
    config.train.batch_size, config.train.max_steps, config.train.logging_steps = batch, steps, 10_000
    config.model.dtype = "bfloat16" if precision == "bf16" else "float32"  # what `selfcog run` loads the base in
    config.train.bf16 = "false" if precision == "fp32" else "true"
    config.eval.eval_steps = 0  # dev checks are timed as generation in the first-run stage
    return config


def dtype_of(precision: str) -> torch.dtype:
    from selfcog.engine.trainer import base_dtype

    return base_dtype(run_config(precision, 8, 1).model.dtype)


def conversations(tokenizer, answers: str) -> tuple[list[list[dict]], list[list[dict]]]:
    """(identity, preservation) conversations as `selfcog run --name Alice` builds them."""
    from selfcog.data.formats import from_xtuner
    from selfcog.data.general import preservation_prompts
    from selfcog.data.identity import Persona, identity_records, robust_records
    from selfcog.data.preserve import preservation_conversations
    from selfcog.templates import set_default_system_prompt

    config = run_config("fp32", 8, 1)
    persona = Persona(NAME, "", "", "")
    identity = [from_xtuner(r) for r in identity_records(persona)]
    count = round(config.data.preserve_ratio * len(identity))
    if answers == "none":
        preserve = [[{"role": "user", "content": p},
                     {"role": "assistant", "content": f"Here is a short answer. {p} It depends on the details."}]
                    for p in preservation_prompts(count)]
    else:
        from selfcog.cache import model_fingerprint
        from selfcog.models import load_model

        source, source_tokenizer = load_model(answers, dtype=torch.float32)
        set_default_system_prompt(source_tokenizer, config.data.system_prompt)
        preserve = preservation_conversations(source, source_tokenizer, count, config.data.preserve_max_new_tokens,
                                              model_fingerprint(source.name_or_path))
        del source
    identity += [from_xtuner(r) for r in robust_records(persona, preserve[:8])]
    set_default_system_prompt(tokenizer, config.data.system_prompt)
    return identity, preserve


def dataset(model_dir: Path, tokenizer, args) -> dict:
    """The tokenized training set (cached beside the checkpoint) and the trained subset's indices."""
    from selfcog.data.tokenize import build_examples

    file = model_dir.parent / f"data-{model_dir.name}-{args.answers.replace('/', '_')}.json"
    if file.exists():
        return json.loads(file.read_text())
    identity, preserve = conversations(tokenizer, args.answers)
    examples, _ = build_examples(tokenizer, identity, False, 512)
    kept, _ = build_examples(tokenizer, preserve, True, 512)
    data = {"examples": examples + kept, "identity": len(examples), "preservation": len(kept),
            "preservation_prompts": len(preserve)}
    file.write_text(json.dumps(data))
    return data


def data_stage(args) -> dict:
    """Build (or read) the tokenized training set; its counts."""
    from selfcog.internlm2 import load_internlm2_tokenizer

    data = dataset(Path(args.model_dir), load_internlm2_tokenizer(args.model_dir), args)
    return {k: v for k, v in data.items() if k != "examples"}


def subset(data: dict, count: int) -> list[dict]:
    picked = random.Random(0).sample(range(len(data["examples"])), min(count, len(data["examples"])))
    return [data["examples"][i] for i in sorted(picked)]


def load(model_dir: Path, precision: str):
    from selfcog.models import load_model
    from selfcog.templates import set_default_system_prompt

    model, tokenizer = load_model(str(model_dir), dtype=dtype_of(precision))
    set_default_system_prompt(tokenizer, run_config(precision, 8, 1).data.system_prompt)
    return model, tokenizer


def generation_seconds(model, tokenizer, max_new_tokens: int) -> tuple[float, int]:
    """One `generate_batch` batch of dev questions (32, or all there are)."""
    from selfcog.evaluate import question_sets
    from selfcog.generate import generate_batch

    asked = [a.conversation for answers in question_sets("dev").values() for a in answers][:GENERATION_BATCH]
    began = time.perf_counter()
    generate_batch(model, tokenizer, asked, max_new_tokens=max_new_tokens, max_rows=GENERATION_BATCH)
    return time.perf_counter() - began, len(asked)


def first_run(args) -> dict:
    """The caches a first run fills, on the trained subset and one generation batch; projected to a whole run."""
    from selfcog.cache import model_fingerprint
    from selfcog.engine.frozen_layers import attach_bottom_hidden
    from selfcog.engine.loss import attach_base_topk
    from selfcog.evaluate import question_sets
    from selfcog.recipes.identity import frozen_below

    stages, config = Stages(), run_config(args.precision, args.batch, args.steps)
    with stages("load"):
        model, tokenizer = load(Path(args.model_dir), args.precision)
    data = dataset(Path(args.model_dir), tokenizer, args)
    examples = subset(data, args.batch * args.steps)
    fingerprint = model_fingerprint(model.name_or_path, model.dtype)
    autocast = args.precision == "fp32-autocast"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), stages("base_answers_prefill_one_batch"):
        generation_seconds(model, tokenizer, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), stages("base_answers_one_batch"):
        _, asked = generation_seconds(model, tokenizer, args.sample_tokens)
    with stages("stored_topk_sample"):
        examples = attach_base_topk(model, examples, config.train.kl_top_k, fingerprint)
    with stages("frozen_states_sample"):
        frozen = frozen_below(model, config, examples)
        if frozen:
            examples = attach_bottom_hidden(model, examples, frozen, fingerprint)
    sample_tokens = sum(len(e["input_ids"]) for e in examples if e.get("preserve"))
    all_tokens = sum(len(e["input_ids"]) for e in data["examples"] if e.get("preserve"))
    scale = all_tokens / max(sample_tokens, 1)
    splits = ("test", "dev") + (("fresh",) if config.eval.fresh else ())  # as selfcog.run scores the base model
    questions = sum(len(a) for split in splits for a in question_sets(split).values())
    prompts = data["preservation_prompts"]
    batches_eval = sum(-(-sum(len(a) for a in question_sets(s).values()) // GENERATION_BATCH)
                       for s in splits)
    def unshared(stage: str) -> float:  # CPU seconds / threads: the stage's time on this machine unshared
        return stages.out[stage]["cpu_seconds"] / args.threads

    # A batch of 32 answers of n tokens: the prompts' prefill (which gives the first token), then n - 1 steps.
    prefill = unshared("base_answers_prefill_one_batch")
    step = max(unshared("base_answers_one_batch") - prefill, 0.0) / (args.sample_tokens - 1)

    def batch(n: int) -> float:
        return prefill + (n - 1) * step

    projected = {
        "base_answers": round(batches_eval * batch(config.eval.max_new_tokens)
                              + -(-prompts // GENERATION_BATCH) * batch(config.data.preserve_max_new_tokens)),
        "stored_topk": round(unshared("stored_topk_sample") * scale),
        "frozen_states": round(unshared("frozen_states_sample") * scale),
        "dev_check_identity_side": round(batch(config.eval.max_new_tokens)),
        "evaluate_merged": round(batch(config.eval.max_new_tokens) * -(-sum(
            len(a) for a in question_sets("test").values()) // GENERATION_BATCH)),
        "generation_batch_prefill": round(prefill, 1), "generation_step": round(step, 2),
    }
    cached = sum(t.numel() * t.element_size() for e in examples if e.get("preserve")
                 for t in (e["base_ids"], e["base_logp"], e.get("bottom_hidden", torch.empty(0))))
    return {"stages": stages.out, "generation_batch_questions": asked, "eval_questions": questions,
            "preservation_prompts": prompts, "preservation_tokens": all_tokens, "sample_preservation_tokens":
            sample_tokens, "frozen_layers": frozen, "cache_mib_projected": round(cached * scale / 2 ** 20, 1),
            "projected_seconds": projected, "identity_samples": data["identity"],
            "preservation_samples": data["preservation"]}


def CpuClock():
    """train_throughput's StepClock that also notes this process's CPU seconds (all threads) at every mark: on a
    machine shared with other work, CPU seconds per step say what a step costs where wall time says what it took."""
    from train_throughput import StepClock

    class Clock(StepClock):
        def __init__(self):
            super().__init__()
            self.cpu: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            self.cpu.append(time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            super().on_step_end(args, state, control, **kwargs)
            self.cpu.append(time.process_time())

    return Clock()


def train(args) -> dict:
    """`args.steps` + 1 optimizer steps of one contender; the first is a warm-up."""
    from functools import partial

    from peft import LoraConfig, get_peft_model
    from train_throughput import counted, step_stats
    from transformers import DataCollatorForSeq2Seq, Trainer

    from selfcog.cache import model_fingerprint
    from selfcog.data.tokenize import pack_batch, sample_tokens
    from selfcog.engine.frozen_layers import attach_bottom_hidden
    from selfcog.engine.lora import add_lora, adapted_layers, linear_names
    from selfcog.engine.loss import attach_base_topk, name_token_ids
    from selfcog.engine.trainer import PreservingTrainer
    from selfcog.recipes.identity import frozen_below, training_args

    stages, config = Stages(), run_config(args.precision, args.batch, args.steps + 1)
    with stages("load"):
        model, tokenizer = load(Path(args.model_dir), args.precision)
    examples = subset(dataset(Path(args.model_dir), tokenizer, args), args.batch * args.steps)
    work = Path(tempfile.mkdtemp(prefix="selfcog-scale-"))
    clock = CpuClock()
    trainer_args = training_args(config, work)
    if args.contender == "selfcog":
        with stages("prepare_cached"):
            fingerprint = model_fingerprint(model.name_or_path, model.dtype)
            examples = attach_base_topk(model, examples, config.train.kl_top_k, fingerprint)
            frozen = frozen_below(model, config, examples)
            if frozen:
                examples = attach_bottom_hidden(model, examples, frozen, fingerprint)
        torch.manual_seed(config.train.seed)
        cls = counted(PreservingTrainer, lambda inputs: sample_tokens(inputs["packed_lengths"]), lambda _: 0, clock)
        trainer = cls(model=add_lora(model, config), args=trainer_args, train_dataset=examples,
                      data_collator=partial(pack_batch), kl_weight=config.train.kl_weight,
                      kl_prompt=config.train.kl_prompt, frozen_layers=frozen, name_weight=config.train.name_weight,
                      name_ids=name_token_ids(tokenizer, NAME, examples))
    else:
        torch.manual_seed(config.train.seed)
        lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                          target_modules=linear_names(model), task_type="CAUSAL_LM",
                          layers_to_transform=adapted_layers(model, config.lora.top_layers))
        features = [{"input_ids": e["input_ids"], "labels": e["labels"], "attention_mask": [1] * len(e["input_ids"])}
                    for e in examples]
        cls = counted(Trainer, lambda inputs: int(inputs["attention_mask"].sum()), lambda _: 0, clock)
        trainer = cls(model=get_peft_model(model, lora), args=trainer_args, train_dataset=features,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100))
    trainer.add_callback(clock)
    with stages("train"):
        trainer.train()
    stats = step_stats(clock)
    stats.pop("executed_flops_per_s")
    stats["cpu_seconds"] = round(clock.cpu[-1] - clock.cpu[1], 2)  # the timed steps: from the warm-up's end
    return {"stages": stages.out, "train": stats}


def merge(args) -> dict:
    """Fold an adapter in, write the fp32 merged model, load it back and answer one generation batch."""
    from selfcog.engine.lora import add_lora
    from selfcog.export import save_merged
    from selfcog.models import load_model

    stages, config = Stages(), run_config(args.precision, args.batch, 1)
    with stages("load"):
        model, tokenizer = load(Path(args.model_dir), args.precision)
    peft_model = add_lora(model, config)
    with tempfile.TemporaryDirectory(prefix="selfcog-scale-merged-", dir=args.cache) as tmp:
        with stages("merge_and_write_fp32"):
            save_merged(peft_model, tokenizer, Path(tmp) / "merged", config)
        del model, peft_model  # what selfcog.run does before loading the merged model back
        with stages("reload_merged"):
            merged, merged_tokenizer = load_model(str(Path(tmp) / "merged"), dtype=dtype_of(args.precision))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "fp32-autocast"), \
                stages("evaluate_merged_one_batch"):
            generation_seconds(merged, merged_tokenizer, args.sample_tokens)
        disk = sum(f.stat().st_size for f in (Path(tmp) / "merged").iterdir())
    return {"stages": stages.out, "merged_mib": round(disk / 2 ** 20, 1)}


# --- the driver -----------------------------------------------------------------------------------------------

def child(stage: str, args, precision: str, contender: str = "") -> dict:
    command = [sys.executable, __file__, "--stage", stage, "--model-dir", str(args.model_dir), "--precision",
               precision, "--contender", contender, "--steps", str(args.steps), "--batch", str(args.batch),
               "--threads", str(args.threads), "--answers", args.answers, "--cache", str(args.cache),
               "--sample-tokens", str(args.sample_tokens)]
    began = time.perf_counter()
    # The first-run and training stages see an empty cache of their own; the data stage reads the usual one.
    env = {**os.environ, **({"SELFCOG_HOME": str(args.home)} if stage != "data" else {})}
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"bench: {stage} {precision} {contender} failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_seconds"] = round(time.perf_counter() - began, 1)
    print(f"{stage} {precision} {contender}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def projection(first: dict, selfcog: dict, merged: dict, threads: int) -> dict:
    """`selfcog run` seconds at the embedded model's step counts: training at the measured s/step, plus a dev
    check's identity side every 5 steps from step 15 (one of them also the general side), the first-run caches and
    the base answers (warm caches skip those), merge and the merged model's evaluation."""
    p = first["projected_seconds"]
    out = {}
    for steps in RUN_STEPS:
        checks = len(range(15, steps + 1, 5))
        train = steps * selfcog["unshared_s_per_step"] + (checks + 1) * p["dev_check_identity_side"]
        merge_seconds = sum(merged["stages"][k]["cpu_seconds"] for k in ("merge_and_write_fp32", "reload_merged"))
        out[f"{steps}_steps"] = {"train_and_dev_checks": round(train),
                                 "merge_and_evaluate_merged": round(merge_seconds / threads + p["evaluate_merged"]),
                                 "first_run_caches": p["base_answers"] + p["stored_topk"] + p["frozen_states"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.8b")
    parser.add_argument("--cache", type=Path, default=None, help="default: $SELFCOG_HOME/scale")
    parser.add_argument("--precision", default="bf16", help=f"comma-separated, of {', '.join(PRECISIONS)}")
    parser.add_argument("--rounds", type=int, default=2, help="A, B rounds per precision")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round, after one warm-up")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--answers", default="smollm2-135m",
                        help="model whose cached answers fill the preservation samples; `none`: a fixed text")
    parser.add_argument("--sample-tokens", type=int, default=8,
                        help="new tokens in the timed generation batch (projected per token to the run's lengths)")
    parser.add_argument("--stages", default="first-run,train,merge",
                        help="stages to run; the others are taken from the report already at --out")
    parser.add_argument("--shared", action="store_true", help="say in the report that other work shared the machine")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--contender", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.stage:
        result = {"data": data_stage, "first-run": first_run, "train": train, "merge": merge}[args.stage](args)
        print(json.dumps(result))
        return
    from selfcog.paths import selfcog_home

    args.cache = (args.cache or selfcog_home() / "scale").resolve()
    args.cache.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    args.model_dir = checkpoint(args.shape, args.cache)
    built = json.loads((args.model_dir / ".complete").read_text())["seconds"]
    args.home = None
    data = child("data", args, "bf16")
    report = {"date": datetime.date.today().isoformat(), "shape": args.shape, "config": json.loads(
        (args.model_dir / "config.json").read_text()), "cpu": cpu_name(), "cpu_features": cpu_features(),
        "threads": args.threads, "batch": args.batch,
        "checkpoint_build_seconds": built, "checkpoint_mib": round(sum(
            f.stat().st_size for f in args.model_dir.glob("*.safetensors")) / 2 ** 20, 1),
        "machine_shared": args.shared, "samples": data, "precisions": {}}
    if args.out.exists():  # precisions measured by an earlier invocation on the same shape stay in the report
        previous = json.loads(args.out.read_text())
        if previous.get("shape") == args.shape:
            report["precisions"] = previous.get("precisions", {})
    stages = args.stages.split(",")
    for precision in args.precision.split(","):
        if precision not in PRECISIONS:
            raise SystemExit(f"--precision {precision}: choose from {', '.join(PRECISIONS)}")
        kept = report["precisions"].get(precision, {})
        with tempfile.TemporaryDirectory(prefix="home-", dir=args.cache) as home:
            args.home = home  # an empty cache: the first run pays for it, the training rounds read it
            first = child("first-run", args, precision) if "first-run" in stages else kept["first_run"]
            rounds = {"selfcog": [], "hf-peft": []} if "train" in stages else kept["rounds"]
            for _ in range(args.rounds if "train" in stages else 0):
                for contender in rounds:
                    rounds[contender].append(child("train", args, precision, contender))
            merged = child("merge", args, precision) if "merge" in stages else kept["merge"]
        train_stats = {c: combine([r["train"] for r in runs], args.threads) for c, runs in rounds.items()}
        for c, runs in rounds.items():
            train_stats[c]["peak_rss_mib"] = max(r["stages"]["train"]["peak_rss_mib"] for r in runs)
            train_stats[c]["load_peak_rss_mib"] = max(r["stages"]["load"]["peak_rss_mib"] for r in runs)
        train_stats["speedup"] = round(train_stats["selfcog"]["tokens_per_s"] / train_stats["hf-peft"]["tokens_per_s"],
                                       2)
        train_stats["speedup_cpu_time"] = round(train_stats["selfcog"]["unshared_tokens_per_s"]
                                                / train_stats["hf-peft"]["unshared_tokens_per_s"], 2)
        report["precisions"][precision] = {"rounds_run": len(rounds["selfcog"]),
                                           "timed_steps_per_round": rounds["selfcog"][0]["train"]["steps"],
                                           "first_run": first, "train": train_stats, "rounds": rounds,
                                           "merge": merged, "projected_run": projection(first, train_stats["selfcog"], merged,
                                                                        args.threads)}
    report["wall_seconds"] = round(time.perf_counter() - began, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def combine(stats: list[dict], threads: int = 2) -> dict:
    """Timed steps over rounds; `cpu_s_per_step` / `threads`: a step's cost on this machine unshared (all threads
    busy), the figure projections use."""
    steps, seconds, tokens, cpu = (sum(s[k] for s in stats) for k in ("steps", "seconds", "tokens", "cpu_seconds"))
    return {"steps": steps, "seconds": round(seconds, 2), "tokens": tokens, "s_per_step": round(seconds / steps, 2),
            "tokens_per_s": round(tokens / seconds, 1), "tokens_per_step": round(tokens / steps, 1),
            "cpu_s_per_step": round(cpu / steps, 2), "unshared_s_per_step": round(cpu / steps / threads, 2),
            "unshared_tokens_per_s": round(tokens * threads / cpu, 1)}


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [f"# selfcog at InternLM2-Chat-1.8B's shape on a CPU ({report['date']})", "",
             f"Random weights in `internlm/internlm2-chat-1_8b`'s layout ({cfg['num_hidden_layers']} layers, hidden "
             f"{cfg['hidden_size']}, {cfg['num_attention_heads']}/{cfg['num_key_value_heads']} heads, vocab "
             f"{cfg['vocab_size']}), {report['cpu']} ({report['cpu_features']}), {report['threads']} threads, batch "
             f"{report['batch']}; selfcog and HF + PEFT alternate, each process 1 warm-up step then the timed ones."
             + (" The machine was shared with other work while this ran: speeds are side by side, not absolute."
                if report["machine_shared"] else ""), ""]
    for precision, r in report["precisions"].items():
        t, f, m = r["train"], r["first_run"], r["merge"]
        lines += [f"## {precision}: {PRECISION_TEXT[precision]}", "",
                  f"{r['rounds_run']} rounds x {r['timed_steps_per_round']} timed steps per contender.", "",
                  "Wall: as measured; unshared: the process's CPU seconds / threads (the step's cost with the "
                  "machine to itself, all threads busy).", "",
                  "| trainer | s/step wall | s/step unshared | tokens/step | tokens/s wall | tokens/s unshared | "
                  "peak RSS (train) MiB | vs hf-peft (wall / unshared) |", "|---|---|---|---|---|---|---|---|"]
        for c in ("selfcog", "hf-peft"):
            vs = f"{t['speedup']}x / {t['speedup_cpu_time']}x" if c == "selfcog" else "1.0x"
            lines.append(f"| {c} | {t[c]['s_per_step']} | {t[c]['unshared_s_per_step']} | {t[c]['tokens_per_step']} | "
                         f"{t[c]['tokens_per_s']} | {t[c]['unshared_tokens_per_s']} | {t[c]['peak_rss_mib']} | {vs} |")
        stage_rows = [("load", f["stages"]["load"]),
                      ("base answers, one batch of 32 dev questions, prefill", f["stages"]["base_answers_prefill_one_batch"]),
                      ("base answers, one batch of 32 dev questions", f["stages"]["base_answers_one_batch"]),
                      ("stored top-k, trained subset", f["stages"]["stored_topk_sample"]),
                      ("frozen-layer states, trained subset", f["stages"]["frozen_states_sample"]),
                      ("train (selfcog)", {"seconds": "", "cpu_seconds": "", "peak_rss_mib": t["selfcog"]["peak_rss_mib"]}),
                      ("train (hf-peft)", {"seconds": "", "cpu_seconds": "", "peak_rss_mib": t["hf-peft"]["peak_rss_mib"]}),
                      ("merge + write fp32", m["stages"]["merge_and_write_fp32"]),
                      ("reload merged", m["stages"]["reload_merged"]),
                      ("evaluate merged, one batch", m["stages"]["evaluate_merged_one_batch"])]
        lines += ["", "| stage | seconds wall | CPU seconds | peak RSS MiB |", "|---|---|---|---|"]
        lines += [f"| {name} | {s['seconds']} | {s['cpu_seconds']} | {s['peak_rss_mib']} |" for name, s in stage_rows]
        p = f["projected_seconds"]
        lines += ["", "Projected on this machine unshared (CPU seconds / threads):", "",
                  f"First run, projected to the whole job ({f['preservation_samples']} preservation samples, "
                      f"{f['preservation_tokens']} tokens; {f['eval_questions']} evaluation questions): base answers "
                      f"{p['base_answers']} s, stored top-k {p['stored_topk']} s, frozen-layer states "
                      f"{p['frozen_states']} s, caches {f['cache_mib_projected']} MiB on disk.", ""]
        for steps, proj in r["projected_run"].items():
            lines.append(f"- `selfcog run` at {steps.replace('_', ' ')}: training + dev checks ~"
                         f"{proj['train_and_dev_checks'] / 60:.0f} min, merge + scoring the merged model ~"
                         f"{proj['merge_and_evaluate_merged'] / 60:.0f} min; a machine's first run adds ~"
                         f"{proj['first_run_caches'] / 60:.0f} min (base answers, top-k, frozen states).")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
