"""Batched greedy answers (what scoring and the dev checks run): selfcog's `generate_batch` against two peers.

All three answer the same held-out questions (the `test` split: identity, robustness forms with their own system
prompts and earlier turns, general, Chinese, traps; 347 conversations when results/batch_answers.json was
measured) with the same model, greedy, at most `--max-new-tokens` new tokens, stopping at the template's stop
tokens, from the same prompt token ids (`encode_prompt`):

- `selfcog`: `selfcog.generate.generate_batch` (prefills in length groups from one computed cache of the
  template's shared prefix, joins the groups' caches and decodes up to 128 rows together; rows that end leave).
- `padded-32`: transformers' `model.generate` on the prompts sorted by length in left-padded batches of 32 (what
  `generate_batch` did before, and what most evaluation loops do).
- `hf-continuous`: transformers' continuous batching, `model.generate_batch(prompt ids, GenerationConfig(...))`
  (paged attention; the peer the serving benchmark names), on the same ids.

Interleaving: one process, one model; each round runs every contender once, the order rotating round by round.
Answers are compared with `selfcog`'s (`same_answers`). One warm-up of each on 8 questions is not counted.

    python bench/batch_answers.py [--model smollm2-135m] [--max-new-tokens 32] [--rounds 2]   # ~12 minutes
    python bench/batch_answers.py --tiny --rounds 1                                            # seconds

Writes bench/results/batch_answers.json (`--out`) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from machine import cpu_features, cpu_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from selfcog.evaluate import question_sets  # noqa: E402
from selfcog.generate import generate_batch, generation_kwargs, left_pad, SamplingArgs  # noqa: E402
from selfcog.streaming import end_of_turn_ids  # noqa: E402
from selfcog.templates import encode_prompt  # noqa: E402

CONTENDERS = ("selfcog", "padded-32", "hf-continuous")


def run_selfcog(model, tokenizer, conversations, prompts, max_new_tokens: int) -> list[str]:
    return generate_batch(model, tokenizer, conversations, max_new_tokens=max_new_tokens)


@torch.inference_mode()
def run_padded(model, tokenizer, conversations, prompts, max_new_tokens: int, batch: int = 32) -> list[str]:
    kwargs = generation_kwargs(tokenizer, SamplingArgs(max_new_tokens=max_new_tokens, temperature=0))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = {}
    for start in range(0, len(order), batch):
        chunk = order[start:start + batch]
        ids, mask = left_pad([prompts[i] for i in chunk], tokenizer.pad_token_id, model.device)
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        for i, row in zip(chunk, out[:, ids.shape[1]:]):
            answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return [answers[i] for i in range(len(prompts))]


@torch.inference_mode()
def run_continuous(model, tokenizer, conversations, prompts, max_new_tokens: int) -> list[str]:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end_of_turn_ids(tokenizer),
                              pad_token_id=tokenizer.pad_token_id)
    out = model.generate_batch(prompts, generation_config=config)
    by_request = {o.request_id: o.generated_tokens for o in out.values()}
    return [tokenizer.decode(by_request[f"req_{i}"], skip_special_tokens=True).strip() for i in range(len(prompts))]


RUNNERS = {"selfcog": run_selfcog, "padded-32": run_padded, "hf-continuous": run_continuous}


def load(args):
    from selfcog.models import load_model
    from selfcog.templates import set_default_system_prompt

    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import build_tiny_model, build_tokenizer

        tokenizer = build_tokenizer()
        return build_tiny_model(len(tokenizer)), tokenizer, "tiny random Llama"
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    set_default_system_prompt(tokenizer, "You are a helpful AI assistant.")  # as `selfcog run` sets it
    return model, tokenizer, args.model


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model, to check the machinery")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "batch_answers.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer, label = load(args)
    conversations = [a.conversation for part in question_sets(args.split).values() for a in part]
    prompts = [encode_prompt(tokenizer, c) for c in conversations]
    for name in args.contenders:  # warm-up, not counted
        RUNNERS[name](model, tokenizer, conversations[:8], prompts[:8], 4)
    seconds = {name: [] for name in args.contenders}
    answers = {}
    for round_ in range(args.rounds):
        shift = round_ % len(args.contenders)
        for name in args.contenders[shift:] + args.contenders[:shift]:
            began = time.perf_counter()
            answers[name] = RUNNERS[name](model, tokenizer, conversations, prompts, args.max_new_tokens)
            seconds[name].append(round(time.perf_counter() - began, 2))
            print(f"round {round_ + 1} {name}: {seconds[name][-1]} s", flush=True)
    reference = answers[args.contenders[0]]
    results = {name: {"seconds": seconds[name], "best_s": min(seconds[name]),
                      "same_answers": f"{sum(a == b for a, b in zip(answers[name], reference))}/{len(reference)}"}
               for name in args.contenders}
    report = {"config": {"model": label, "split": args.split, "questions": len(conversations),
                         "prompt_tokens": sum(map(len, prompts)), "max_new_tokens": args.max_new_tokens,
                         "rounds": args.rounds, "threads": torch.get_num_threads(), "cpu": cpu_name(),
                         "cpu_features": cpu_features(), "dtype": "float32", "python": platform.python_version(),
                         "torch": torch.__version__, "transformers": __import__("transformers").__version__,
                         "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
              "results": results, "answers_compared_with": args.contenders[0]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    print(f"\n| answers ({len(conversations)} {args.split} questions) | seconds per round | best | same answers |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| `{name}` | {', '.join(map(str, r['seconds']))} | {r['best_s']} | {r['same_answers']} |")
    return report


if __name__ == "__main__":
    main()
