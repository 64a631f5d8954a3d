"""Training throughput: selfcog's trainer against a plain HF `Trainer` + PEFT LoRA baseline, interleaved.

Both train the same model (the embedded SmolLM2-135M-Instruct by default), LoRA r=16 alpha=32 on every linear
layer, fp32, on the same data (the generated identity set plus the base model's own answers to the
preservation prompts, all as plain SFT), global batch 8, same seed and data order.

- `hf-peft`: `Trainer` + `get_peft_model` + `DataCollatorForSeq2Seq` padding to the longest sample in the
  batch; the model's own loss (LM head and cross-entropy over every position).
- `selfcog`: what `selfcog train` runs — `PreservingTrainer` with the packing collator: one row per batch,
  the shared prefix (the chat template's system turn) stored once, packed attention, LM head only where
  a token carries loss.
- `selfcog-noshare`: the same without sharing the prefix (each sample whole in the row): the ablation.

Contenders alternate in rounds of `--steps` optimizer steps inside one process, so machine noise hits all of
them alike. A step is timed from one `on_step_end` to the next (data loading, collation, forward, backward and
optimizer all included); the first step of each round is a warm-up and not counted. Tokens are real
(non-pad) tokens: every sample's full length, the shared prefix counted once per sample.

Also measured: the fp32 matmul peak of this machine (a 2048^3 matmul), each contender's peak RSS in a subprocess
of its own, and FLOP utilisation against that peak two ways (4 x parameters per token: forward plus the backward
pass to the activations; the LoRA matrices' own few FLOPs left out):
- `mfu` (model FLOP utilisation): the FLOPs a plain implementation spends on the real tokens — every layer and
  the LM head at every real token. Work a contender skips (padding, the repeated system prompt, LM head rows
  without loss) raises it, so it can pass 100%.
- `mfu_executed` (hardware utilisation): the FLOPs the contender's matmuls actually run — the body over every
  position of its rows (pads, and the shared prefix once), the LM head over the rows it computes.

With `--bf16` every contender trains under bf16 autocast (the Trainer's `bf16=True`; both the same) and MFU is
taken against the bf16 matmul peak: worth it only on a CPU with native bf16 (AVX512-BF16 or AMX).

    python bench/train_throughput.py [--model smollm2-135m] [--rounds 3] [--steps 5] [--threads 2] [--bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_features, cpu_name, matmul_peak
from transformers import TrainerCallback

CONTENDERS = ("hf-peft", "selfcog", "selfcog-noshare")


def training_data(model, tokenizer, name: str = "Alice") -> list[list[dict]]:
    """The identity set for NAME plus preservation conversations, as `selfcog run` builds them."""
    from selfcog.cache import model_fingerprint
    from selfcog.data.formats import from_xtuner
    from selfcog.data.identity import Persona, identity_records
    from selfcog.data.preserve import preservation_conversations

    identity = [from_xtuner(record) for record in identity_records(Persona(name, "", "", ""))]
    preserve = preservation_conversations(model, tokenizer, round(1.5 * len(identity)), 48,
                                          model_fingerprint(model.name_or_path))
    return identity + preserve


class StepClock(TrainerCallback):
    """Wall time at every `on_step_end` (and at each round's start) and the real tokens of each step."""

    def __init__(self):
        self.marks: list[float] = []
        self.tokens: list[int] = []
        self.positions: list[tuple[int, int]] = []  # per step: (positions through the body, LM head rows)

    def on_train_begin(self, args, state, control, **kwargs):
        self.marks.append(time.perf_counter())
        self.tokens.append(-1)  # round boundary: the next step is a warm-up
        self.positions.append((0, 0))

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append(time.perf_counter())


def counted(trainer_cls, count_tokens, head_rows, clock: StepClock):
    """A subclass of `trainer_cls` whose `training_step` records each batch's real tokens, its positions and the
    rows its LM head computes."""

    class Counted(trainer_cls):
        def training_step(self, model, inputs, num_items_in_batch=None):
            clock.tokens.append(count_tokens(inputs))
            clock.positions.append((inputs["input_ids"].numel(), head_rows(inputs)))
            return super().training_step(model, inputs, num_items_in_batch)

    return Counted


def build(contender: str, model_spec: str, work: Path, batch: int, clock: StepClock, bf16: bool = False):
    """A ready Trainer for `contender` (a fresh model each) and the list of its samples' lengths."""
    from functools import partial

    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer

    from selfcog.config import RunConfig
    from selfcog.data.tokenize import build_examples, pack_batch, sample_tokens
    from selfcog.models import load_model
    from selfcog.engine.lora import add_lora
    from selfcog.engine.trainer import PreservingTrainer
    from selfcog.recipes.sft import engine_args

    model, tokenizer = load_model(model_spec, dtype=torch.float32)
    conversations = training_data(model, tokenizer)
    examples, _ = build_examples(tokenizer, conversations, False, 512)
    config = RunConfig()
    config.train.batch_size, config.train.max_steps, config.train.kl_weight = batch, 10_000, 0.0
    config.train.bf16 = "true" if bf16 else "false"
    config.train.logging_steps, config.train.warmup_ratio = 10_000, 0.0
    config.lora.top_layers = 0  # every layer, like the baseline's `all-linear`
    args = engine_args(config, work / contender, len(examples))
    torch.manual_seed(0)
    if contender == "hf-peft":
        lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        features = [{"input_ids": e["input_ids"], "labels": e["labels"], "attention_mask": [1] * len(e["input_ids"])}
                    for e in examples]
        cls = counted(Trainer, lambda inputs: int(inputs["attention_mask"].sum()),
                      lambda inputs: inputs["input_ids"].numel(), clock)  # the model's logits: every position
        trainer = cls(model=get_peft_model(model, lora), args=args, train_dataset=features,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100))
    else:
        collate = partial(pack_batch, share_prefix=contender == "selfcog")
        # kl_weight 0: logits only where the next token carries loss (PreservingTrainer.compute_loss)
        cls = counted(PreservingTrainer, lambda inputs: sample_tokens(inputs["packed_lengths"]),
                      lambda inputs: int((inputs["labels"][..., 1:] != -100).sum()), clock)
        trainer = cls(model=add_lora(model, config), args=args, train_dataset=examples, data_collator=collate,
                      kl_weight=0.0)
    trainer.add_callback(clock)
    return trainer, [len(e["input_ids"]) for e in examples]


def train_round(trainer, steps: int) -> None:
    trainer.args.max_steps = steps
    trainer.train()


def step_stats(clock: StepClock, body_params: int = 0, head_params: int = 0) -> dict:
    """Tokens/s over counted steps (each round's first step is a warm-up), and the matmul FLOPs they executed."""
    times, tokens, flops = [], [], 0
    marks, counts = clock.marks, clock.tokens
    # marks: [begin, end1, end2, ..., begin, end1, ...]; tokens: [-1, t1, t2, ..., -1, t1, ...]
    for i in range(1, len(marks)):
        if counts[i] == -1 or counts[i - 1] == -1:
            continue
        times.append(marks[i] - marks[i - 1])
        tokens.append(counts[i])
        positions, head_rows = clock.positions[i]
        flops += 4 * (body_params * positions + head_params * head_rows)
    return {"steps": len(times), "seconds": round(sum(times), 2), "tokens": sum(tokens),
            "tokens_per_s": round(sum(tokens) / sum(times), 1), "s_per_step": round(sum(times) / len(times), 3),
            "executed_flops_per_s": flops / sum(times)}


def matmul_params(model_spec: str) -> tuple[int, int]:
    """Parameters that take part in matmuls per token: the body's linear layers, and the LM head."""
    from selfcog.models import load_model

    model, _ = load_model(model_spec, dtype=torch.float32)
    head = model.get_output_embeddings()
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    return body, head.weight.numel()


def peak_rss_of(contender: str, args) -> float:
    """Peak RSS (MiB) of a subprocess that trains only `contender` for a few steps."""
    out = subprocess.run([sys.executable, __file__, "--only", contender, "--model", args.model, "--threads",
                          str(args.threads), "--batch", str(args.batch)] + (["--bf16"] if args.bf16 else []),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def only(args) -> None:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        clock = StepClock()
        trainer, _ = build(args.only, args.model, Path(work), args.batch, clock, args.bf16)
        train_round(trainer, 4)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (larger) parent process.
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    print(json.dumps({"contender": args.only, "peak_rss_mib": round(int(hwm.split()[1]) / 1024, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per contender per round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for every contender")
    parser.add_argument("--out", default=None,
                        help="default: bench/results/train_throughput.json (train_throughput_bf16.json with --bf16)")
    args = parser.parse_args()
    args.out = args.out or f"bench/results/train_throughput{'_bf16' if args.bf16 else ''}.json"
    if args.only:
        return only(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    contenders = args.contenders.split(",")
    peak = matmul_peak(args.threads, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    body_params, head_params = matmul_params(args.model)
    flops_per_token = 4 * (body_params + head_params)
    results = {}
    with tempfile.TemporaryDirectory() as work:
        clocks = {c: StepClock() for c in contenders}
        trainers = {c: build(c, args.model, Path(work), args.batch, clocks[c], args.bf16)[0] for c in contenders}
        for r in range(args.rounds):
            for c in contenders:
                train_round(trainers[c], args.steps)
                so_far = {k: v for k, v in step_stats(clocks[c]).items() if k != "executed_flops_per_s"}
                print(f"round {r + 1}: {c} {so_far}", file=sys.stderr)
        for c in contenders:
            stats = step_stats(clocks[c], body_params, head_params)
            stats["mfu"] = round(stats["tokens_per_s"] * flops_per_token / (peak * 1e9), 3)
            stats["mfu_executed"] = round(stats.pop("executed_flops_per_s") / (peak * 1e9), 3)
            results[c] = stats
    for c in contenders:
        results[c]["peak_rss_mib"] = peak_rss_of(c, args)
    base = results.get("hf-peft", {}).get("tokens_per_s")
    for c in contenders:
        if base:
            results[c]["speedup"] = round(results[c]["tokens_per_s"] / base, 2)
    report = {"model": args.model, "precision": "bf16 autocast" if args.bf16 else "fp32", "threads": args.threads,
              "batch": args.batch, "rounds": args.rounds,
              "steps_per_round": args.steps, "matmul_peak_gflops": round(peak, 1),
              "model_flops_per_token": flops_per_token, "cpu": cpu_name(), "cpu_features": cpu_features(),
              "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = ["| trainer | tokens/s | s/step | MFU (model) | MFU (executed) | peak RSS MiB | vs hf-peft |",
             "|---|---|---|---|---|---|---|"]
    for c, r in report["results"].items():
        lines.append(f"| {c} | {r['tokens_per_s']} | {r['s_per_step']} | {r['mfu']:.1%} | {r['mfu_executed']:.1%} | "
                     f"{r['peak_rss_mib']} | {r.get('speedup', '-')}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
