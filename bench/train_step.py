"""Where the identity job's training step time goes: `selfcog run`'s own batches and adapter, trained by four
variants interleaved in one process, so machine noise hits all of them alike.

Variants, each training a fresh copy of the same LoRA (same init, same batches: they reach the same losses):

- `per-term-log-softmax`: the loss before the one-log-softmax change (kept below as `per_term_log_softmax_loss`):
  the logits' row picked with `[0]`, rows picked by boolean masks for the cross-entropy and for the KL, a
  log-softmax for each; every such step allocates (and page-faults in) several [rows, vocab] matrices and
  zero-filled gradients; every decoder layer runs in every step;
- `+one-log-softmax`: `PreservingTrainer.compute_loss` as now, i.e. one chunked log-softmax gather
  (`selfcog.engine.loss.gathered_log_probs`) serving both terms, still every layer;
- `+memory-kept`: and `selfcog.engine.memory.freed_memory_kept` around the steps (freed memory reused by the next step);
- `selfcog` (+ frozen layers): and the frozen layers below the adapters run once per preservation sample
  (stored states): what `selfcog run` does now.

Reported per variant: median seconds per step (forward + backward + AdamW step), and the median over the same
(round, batch) pairs of the first variant's time / the variant's time (`speedup`); plus each variant's losses,
which must agree.

    python bench/train_step.py [--name 伍鲜同志] [--rounds 4] [--steps 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from selfcog.attention import check_used, packed_attention, packed_layout
from selfcog.cache import model_fingerprint
from selfcog.config import RunConfig
from selfcog.data.formats import deduplicate, to_messages
from selfcog.data.identity import Persona, identity_records
from selfcog.data.preserve import preservation_conversations
from selfcog.data.tokenize import build_examples, pack_batch, sample_tokens
from selfcog.engine.frozen_layers import attach_bottom_hidden
from selfcog.engine.lora import adapted_layers, add_lora
from selfcog.engine.loss import attach_base_topk, topk_preservation_loss
from selfcog.engine.memory import freed_memory_kept
from selfcog.engine.trainer import PreservingTrainer, use_bf16
from selfcog.models import load_model
from selfcog.recipes.identity import training_args
from selfcog.templates import IGNORE_INDEX

VARIANTS = ("per-term-log-softmax", "+one-log-softmax", "+memory-kept", "selfcog")


def identity_job_examples(name: str):
    """The model and the examples `selfcog run --name NAME` trains on, with the stored base top-k and frozen-layer
    states attached as `fit` attaches them."""
    config = RunConfig()
    config.data.name = name
    d = config.data
    model, tokenizer = load_model(config.model.spec, dtype=torch.float32)
    records = identity_records(Persona(d.name, d.assistant_name, d.model_desc, d.author))
    identity, _ = deduplicate([to_messages(record) for record in records])
    fingerprint = model_fingerprint(model.name_or_path)
    preserve = preservation_conversations(model, tokenizer, round(d.preserve_ratio * len(identity)),
                                          d.preserve_max_new_tokens, fingerprint)
    examples = build_examples(tokenizer, identity, False, d.max_length)[0] + \
        build_examples(tokenizer, preserve, True, d.max_length)[0]
    examples = attach_base_topk(model, examples, config.train.kl_top_k, fingerprint)
    frozen = adapted_layers(model, config.lora.top_layers)[0]
    return config, model, attach_bottom_hidden(model, examples, frozen, fingerprint), frozen


def per_term_log_softmax_loss(trainer, model, inputs):
    """PreservingTrainer.compute_loss before the one-log-softmax change (selfcog no longer has it), stored top-k
    path; for comparison only."""
    labels, preserve, lengths = inputs.pop("labels"), inputs.pop("preserve_mask"), inputs.pop("packed_lengths")
    base_ids, base_logp = inputs.pop("base_ids"), inputs.pop("base_logp")
    inputs.pop("bottom_hidden", None)
    targets = labels[0, 1:] != IGNORE_INDEX
    keep = (targets | preserve[0, :-1] if trainer.kl_prompt else targets).nonzero().squeeze(1)
    layout = packed_layout(lengths, inputs["input_ids"].device)
    outputs = model(**inputs, use_cache=False, logits_to_keep=keep, packed_layout=layout)
    check_used(layout, model)
    logits = outputs.logits[0]
    ce_rows = targets[keep]
    loss = F.cross_entropy(logits[ce_rows].float(), labels[0, keep[ce_rows] + 1])
    kl_rows = preserve[0, keep]
    rows = keep[kl_rows]
    tuned = F.log_softmax(logits[kl_rows].float(), dim=-1).gather(-1, base_ids[0, rows].long())
    return loss + trainer.kl_weight * topk_preservation_loss(tuned, base_logp[0, rows])


def run_variant(variant: str, trainer, peft_model, initial: dict, batches: list[dict], frozen: int,
                bf16: bool = False) -> dict:
    """Train `batches` from the initial adapter; seconds and loss of every step (forward under bf16 autocast where
    `selfcog run` would use it: `train.bf16=auto` on a CPU with native bf16)."""
    peft_model.load_state_dict(initial, strict=False)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=trainer.args.learning_rate, weight_decay=0.0)
    trainer.frozen_layers = frozen if variant == "selfcog" else 0
    loss_of = per_term_log_softmax_loss if variant == VARIANTS[0] else type(trainer).compute_loss
    seconds, losses = [], []
    kept = freed_memory_kept() if variant in ("+memory-kept", "selfcog") else nullcontext()
    with packed_attention(peft_model), kept:
        for batch in batches:
            began = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_of(trainer, peft_model, dict(batch))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds.append(time.perf_counter() - began)
            losses.append(round(loss.item(), 5))
    return {"seconds": seconds, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="伍鲜同志")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant and round (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/train_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from machine import cpu_features, cpu_name  # bench/ is on sys.path only once the script runs

    config, model, examples, frozen = identity_job_examples(args.name)
    torch.manual_seed(config.train.seed)
    peft_model = add_lora(model, config)
    initial = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    trainer = PreservingTrainer(model=peft_model, args=training_args(config, Path("/tmp/selfcog-bench-step")),
                                train_dataset=examples, data_collator=pack_batch, kl_weight=config.train.kl_weight,
                                kl_prompt=config.train.kl_prompt, frozen_layers=frozen)
    rng = random.Random(config.train.seed)
    batches = [pack_batch(rng.sample(examples, config.train.batch_size)) for _ in range(1 + args.steps)]
    tokens = [sample_tokens(b["packed_lengths"]) for b in batches[1:]]
    timed: dict[str, list[float]] = {v: [] for v in VARIANTS}
    losses: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        order = VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            result = run_variant(variant, trainer, peft_model, initial, batches, frozen, use_bf16(config.train.bf16))
            timed[variant] += result["seconds"][1:]  # the first step warms up
            losses[variant] = result["losses"]
            print(f"round {round_ + 1}: {variant}: {statistics.median(result['seconds'][1:]):.3f} s/step, "
                  f"losses {result['losses']}", flush=True)
    reference = timed[VARIANTS[0]]
    report = {"name": args.name, "threads": args.threads, "cpu": cpu_name(), "cpu_features": cpu_features(),
              "bf16_autocast": use_bf16(config.train.bf16), "steps_timed": args.rounds * args.steps,
              "batch_size": config.train.batch_size, "tokens_per_step": round(statistics.mean(tokens), 1),
              "frozen_layers": frozen,
              "results": {v: {"s_per_step": round(statistics.median(timed[v]), 3),
                              "speedup": round(statistics.median(a / b for a, b in zip(reference, timed[v])), 3),
                              "tokens_per_s": round(statistics.mean(tokens) / statistics.median(timed[v]), 1),
                              "losses": losses[v]} for v in VARIANTS}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = ["| variant | s/step (median) | tokens/s | speed vs per-term-log-softmax (paired median) |", "|---|---|---|---|"]
    for variant, r in report["results"].items():
        lines.append(f"| {variant} | {r['s_per_step']} | {r['tokens_per_s']} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
