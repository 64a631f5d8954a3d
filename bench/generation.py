"""Generation speed: selfcog's streaming generator against bare `model.generate`, interleaved.

Both answer the same prompts with the same model (the embedded SmolLM2-135M-Instruct by default), greedy,
batch 1, KV cache on, from the same prompt token ids (the chat template's rendering, `encode_prompt`):

- `streaming`: `selfcog.generate.stream_chat(model, tokenizer, messages, SamplingArgs(max_new_tokens=N,
  temperature=0), info=info)`, exactly as `selfcog chat`, the web demo and the API call it: prompt planning
  (template rendering, tokenization, history fitting), the step-by-step decoding loop (the model's forward
  with its KV cache and transformers' logits processors, in the caller's thread), the stop-event check and
  incremental detokenization into whole-character text pieces. Timed from the call to the first text piece
  the consumer receives (TTFT) and to the generator's end (total). Tokens: `info["completion_tokens"]`.
- `bare`: `model.generate(input_ids, attention_mask, max_new_tokens=N, do_sample=False, use_cache=True,
  eos_token_id=<same stop ids>, pad_token_id, streamer=clock)` on pre-tokenized ids, in the calling thread.
  `clock` is a minimal `BaseStreamer` that only records the time of the first `put` after the prompt
  (transformers passes the prompt ids to the first `put`; that one is skipped). Timed from the call to that
  first generated token (TTFT) and to `generate`'s return (total).

Token counts. `stream_chat` stops at EOS or the template's end of turn and has no minimum-length option. With
`--stop length` (the default) both are forced to generate exactly N tokens: bare generate gets
`min_new_tokens=N`, and `stream_chat` picks up the same value from `model.generation_config.min_new_tokens`
(as `generate` does for every option it is not passed); both then run transformers' min-length logits
processor. With `--stop eos` nothing is forced: both stop at the same stop tokens and, being greedy on the same
ids, produce the same tokens (checked: `outputs_match`). Token counts are reported either way.

Rates. decode tokens/s = (tokens - 1) / (total - TTFT): the first token is inside TTFT, the other tokens - 1
are generated after it. overall tokens/s = tokens / total. Both are summed over all counted runs of a
contender (sum of tokens / sum of seconds). TTFT is reported as the median over runs and as the median of
the paired differences (streaming - bare, same prompt and round).

Interleaving. One process, one model. For each of `--repeats` rounds and each prompt, both contenders run
back to back, the order flipping every round (A B, then B A, ...), so machine noise and warm caches hit
both alike. One warm-up round over all prompts comes first and is not counted.

    python bench/generation.py [--model smollm2-135m] [--max-new-tokens 128] [--repeats 5] [--threads 2]
    python bench/generation.py --tiny --max-new-tokens 4 --repeats 1      # tiny random model, seconds

Writes JSON to bench/results/generation.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from machine import cpu_features, cpu_name
from transformers.generation.streamers import BaseStreamer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from selfcog.generate import SamplingArgs, plan_prompt, stream_chat  # noqa: E402
from selfcog.streaming import end_of_turn_ids  # noqa: E402

CONTENDERS = ("streaming", "bare")
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold, step by step.",
    "请详细介绍一下长城的历史。",
    "Give me ten tips for learning a new programming language, with one sentence on each.",
]


class FirstTokenClock(BaseStreamer):
    """Records the time of the first generated token; does nothing else."""

    def __init__(self):
        self.prompt_seen = False
        self.first: float | None = None

    def put(self, value):
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        if self.first is None:
            if value.is_cuda:
                torch.cuda.synchronize()
            self.first = time.perf_counter()

    def end(self):
        pass


def run_bare(model, tokenizer, ids: list[int], max_new_tokens: int, force_length: bool) -> dict:
    input_ids = torch.tensor([ids], device=model.device)
    clock = FirstTokenClock()
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                  eos_token_id=end_of_turn_ids(tokenizer), pad_token_id=tokenizer.pad_token_id, streamer=clock)
    if force_length:
        kwargs["min_new_tokens"] = max_new_tokens
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    end = time.perf_counter()
    new = out[0, len(ids):].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return {"ttft_s": (clock.first or end) - start, "total_s": end - start, "tokens": len(new), "text": text}


def run_streaming(model, tokenizer, messages: list[dict], max_new_tokens: int) -> dict:
    info: dict = {}
    first = None
    pieces = []
    start = time.perf_counter()
    for piece in stream_chat(model, tokenizer, messages, SamplingArgs(max_new_tokens=max_new_tokens, temperature=0),
                             info=info):
        if first is None:
            first = time.perf_counter()
        pieces.append(piece)
    end = time.perf_counter()
    return {"ttft_s": (first or end) - start, "total_s": end - start, "tokens": info["completion_tokens"],
            "finish_reason": info["finish_reason"], "text": "".join(pieces)}


def summarize(runs: list[dict]) -> dict:
    tokens = sum(r["tokens"] for r in runs)
    total = sum(r["total_s"] for r in runs)
    decode_s = sum(r["total_s"] - r["ttft_s"] for r in runs)
    decode_tokens = sum(max(r["tokens"] - 1, 0) for r in runs)
    ttfts = [r["ttft_s"] for r in runs]
    return {"runs": len(runs), "tokens": tokens, "tokens_per_run_min_max": [min(r["tokens"] for r in runs),
                                                                            max(r["tokens"] for r in runs)],
            "seconds": round(total, 3), "ttft_median_ms": round(1000 * statistics.median(ttfts), 1),
            "ttft_mean_ms": round(1000 * statistics.fmean(ttfts), 1),
            "decode_tokens_per_s": round(decode_tokens / decode_s, 2) if decode_s > 0 else None,
            "overall_tokens_per_s": round(tokens / total, 2) if total > 0 else None}


def thread_torch_threads() -> int:
    """torch's intra-op threads as seen from a fresh Python thread (the API server's worker thread)."""
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def tiny_model():
    """The test suite's tiny random chat model (tests/conftest.py), in memory."""
    from transformers import GenerationConfig

    spec = importlib.util.spec_from_file_location("selfcog_test_conftest", ROOT / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    tokenizer = conftest.build_tokenizer()
    model = conftest.build_tiny_model(len(tokenizer))
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return model, tokenizer


def markdown(report: dict) -> str:
    c, res, cmp = report["config"], report["results"], report["comparison"]
    lines = [f"Generation: `{c['model']}`, greedy, batch 1, max_new_tokens={c['max_new_tokens']} "
             f"(stop={c['stop']}), {c['prompts']} prompts x {c['repeats']} rounds, torch threads={c['threads']}, "
             f"device={c['device']}", "",
             "| generator | runs | tokens/run | TTFT median | decode tok/s | overall tok/s |",
             "|---|---|---|---|---|---|"]
    for name in CONTENDERS:
        r = res[name]
        low, high = r["tokens_per_run_min_max"]
        lines.append(f"| {name} | {r['runs']} | {low if low == high else f'{low}-{high}'} | {r['ttft_median_ms']} ms "
                     f"| {r['decode_tokens_per_s']} | {r['overall_tokens_per_s']} |")
    lines += ["", f"streaming / bare: decode {cmp['decode_ratio']}x (per round {cmp['decode_ratio_per_round_min_max'][0]}"
                  f"-{cmp['decode_ratio_per_round_min_max'][1]}x), overall {cmp['overall_ratio']}x; "
                  f"TTFT streaming - bare: median {cmp['ttft_diff_median_ms']:+} ms over paired runs; "
                  f"same output text in {cmp['outputs_match']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model spec (default: smollm2-135m)")
    parser.add_argument("--tiny", action="store_true", help="use the test suite's tiny random model instead")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="counted rounds over all prompts")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"use the first K of {len(PROMPTS)} prompts")
    parser.add_argument("--stop", choices=["length", "eos"], default="length",
                        help="length: force exactly --max-new-tokens in both; eos: both stop at end of turn")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "generation.json"))
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or args.repeats < 1 or not 1 <= args.prompts <= len(PROMPTS) or args.threads < 1:
        parser.error("--max-new-tokens, --repeats and --threads must be >= 1, --prompts within 1..%d" % len(PROMPTS))

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    if args.tiny:
        model, tokenizer = tiny_model()
    else:
        from selfcog.models import load_model

        model, tokenizer = load_model(args.model)  # as `selfcog chat` / `serve` load it
    force = args.stop == "length"
    if force:  # stream_chat passes no min_new_tokens, so generate takes it from here
        model.generation_config.min_new_tokens = args.max_new_tokens
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS[:args.prompts]]
    sampling = SamplingArgs(max_new_tokens=args.max_new_tokens, temperature=0)
    prompt_ids = []
    for messages in conversations:
        ids, budget = plan_prompt(model, tokenizer, messages, sampling)  # the ids stream_chat will use
        if budget != args.max_new_tokens:
            parser.error(f"prompt of {len(ids)} tokens leaves room for only {budget} new tokens")
        prompt_ids.append(ids)

    def one(contender: str, p: int) -> dict:
        if contender == "streaming":
            return run_streaming(model, tokenizer, conversations[p], args.max_new_tokens)
        return run_bare(model, tokenizer, prompt_ids[p], args.max_new_tokens, force)

    for p in range(len(conversations)):  # warm-up, not counted
        for contender in CONTENDERS:
            one(contender, p)
    runs: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
    load_before = os.getloadavg()[0]
    for r in range(args.repeats):
        order = CONTENDERS if r % 2 == 0 else CONTENDERS[::-1]
        for p in range(len(conversations)):
            for contender in order:
                result = one(contender, p)
                result.update(round=r, prompt=p)
                runs[contender].append(result)
        s, b = summarize(runs["streaming"][-len(conversations):]), summarize(runs["bare"][-len(conversations):])
        print(f"round {r + 1}/{args.repeats}: streaming {s['decode_tokens_per_s']} tok/s, "
              f"bare {b['decode_tokens_per_s']} tok/s", file=sys.stderr)
    load_after = os.getloadavg()[0]

    results = {c: summarize(runs[c]) for c in CONTENDERS}
    pairs = list(zip(runs["streaming"], runs["bare"]))  # same (round, prompt) at the same index
    assert all((a["round"], a["prompt"]) == (b["round"], b["prompt"]) for a, b in pairs)
    per_round = []
    for r in range(args.repeats):
        s = summarize([x for x in runs["streaming"] if x["round"] == r])["decode_tokens_per_s"]
        b = summarize([x for x in runs["bare"] if x["round"] == r])["decode_tokens_per_s"]
        if s and b:
            per_round.append(s / b)
    ratio = lambda key: (round(results["streaming"][key] / results["bare"][key], 3)  # noqa: E731
                         if results["streaming"][key] and results["bare"][key] else None)
    comparison = {
        "decode_ratio": ratio("decode_tokens_per_s"), "overall_ratio": ratio("overall_tokens_per_s"),
        "decode_ratio_per_round_min_max": [round(min(per_round), 3), round(max(per_round), 3)] if per_round
        else [None, None],
        "ttft_diff_median_ms": round(1000 * statistics.median(a["ttft_s"] - b["ttft_s"] for a, b in pairs), 1),
        "same_token_counts": f"{sum(a['tokens'] == b['tokens'] for a, b in pairs)}/{len(pairs)}",
        "outputs_match": f"{sum(a['text'] == b['text'] for a, b in pairs)}/{len(pairs)}",
        "streaming_finish_reasons": sorted({a["finish_reason"] for a, _ in pairs}),
    }
    config = {"model": "tiny (random, tests/conftest.py)" if args.tiny else args.model,
              "max_new_tokens": args.max_new_tokens, "stop": args.stop, "repeats": args.repeats,
              "prompts": len(conversations), "prompt_tokens": [len(i) for i in prompt_ids], "threads": args.threads,
              "threads_in_worker_thread": thread_torch_threads(), "cpu_count": os.cpu_count(), "cpu": cpu_name(),
              "cpu_features": cpu_features(),
              "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
              "python": platform.python_version(), "torch": torch.__version__,
              "transformers": __import__("transformers").__version__,
              "loadavg_1min_before_after": [round(load_before, 2), round(load_after, 2)],
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for contender in CONTENDERS:
        for run in runs[contender]:
            run["text"] = run["text"][:200]
    report = {"config": config, "results": results, "comparison": comparison, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(markdown(report))
    print(f"\n(1-min load average before/after: {load_before:.2f} / {load_after:.2f}; JSON: {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
