"""GGUF in llama.cpp: size, load time, speed and identity per --type, against the merged HF model in transformers.

For each type, `selfcog export-gguf MODEL model-TYPE.gguf --type TYPE` runs as a user runs it (the Python API,
same code): transformers' round-trip check, llama.cpp's quantizer for the k-quants, and the identity check in
llama.cpp, whose report gives the identity pass rate on the 24 held-out test questions and the agreement with the
merged model's own greedy answers (same questions, same answer length). Then, in one process:

- load time: median of `--repeats` loads of each file in llama.cpp (`Llama(model_path)`), and of the merged model
  with `AutoModelForCausalLM.from_pretrained(dtype=float32)` (+ tokenizer), the page cache warm for both;
- tokens/s: the same prompts (the chat template's rendering of 4 ordinary questions), exactly `--max-new-tokens`
  greedy tokens each (no stop on end of turn), batch 1, KV cache on; tokens / wall seconds from the prompt ids to
  the last token, summed over all counted runs. For each round and prompt every contender runs back to back, the
  order rotating by one each round; one warm-up round is not counted. transformers runs fp32 (`generate` with
  `min_new_tokens`), llama.cpp runs the file as stored. Both get `--threads` threads.

    python bench/gguf.py --model /tmp/gguf_run/merged [--types f16,q8_0,q4_k_m,q5_k_m] [--threads 1]
    python bench/gguf.py --tiny --max-new-tokens 8 --repeats 1      # a tiny random model, seconds

Writes bench/results/gguf.json and bench/results/gguf.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# This file is named gguf.py: gguf-py (`import gguf`) must come first, bench/'s modules after site-packages.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

from generation import PROMPTS  # noqa: E402
from machine import cpu_features, cpu_name  # noqa: E402

from selfcog import gguf_llama  # noqa: E402
from selfcog.gguf_export import TYPES, export_gguf  # noqa: E402
from selfcog.templates import render, token_ids  # noqa: E402

HF = "transformers fp32"


def tiny_model(directory: Path) -> Path:
    """A tiny random Llama chat model (rows 256 wide, so the k-quants apply), saved to `directory`."""
    sys.path.append(str(ROOT / "tests"))
    from conftest import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=2, pad_token_id=0,
        bos_token_id=None))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_hf(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer, time.perf_counter() - start


def hf_generate(model, tokenizer, ids: list[int], n: int) -> tuple[int, float]:
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id)
    return out.shape[1] - len(ids), time.perf_counter() - start


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.suffix == ".safetensors")


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [f"# GGUF in llama.cpp against the merged model in transformers ({result['date']})", "",
             f"`{result['command']}`", "",
             f"Model: `{result['model']}` (identity {result['name']!r}); {result['machine']['cpu']} "
             f"({result['machine']['cpu_features']}), {result['threads']} thread(s) each, "
             f"{result['machine']['note']}; llama-cpp-python {result['versions']['llama_cpp_python']}, "
             f"torch {result['versions']['torch']}. {result['prompts']} prompts x {result['repeats']} rounds x "
             f"{result['max_new_tokens']} tokens, interleaved.", "",
             "| type | file MiB | load s | tokens/s | identity (24 test questions) | answers equal to the merged "
             "model's | tensor types | export s |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(value, fmt):
        return "–" if value is None else format(value, fmt)
    for label, row in rows.items():
        types = ", ".join(f"{k} {v}" for k, v in row.get("tensor_types", {}).items()) or "–"
        lines.append(f"| {label} | {cell(row['mib'], '.1f')} | {cell(row['load_seconds'], '.2f')} | "
                     f"{cell(row['tokens_per_second'], '.1f')} | {cell(row['identity'], '.2f')} | "
                     f"{cell(row.get('agreement'), '.2f')} | {types} | {cell(row.get('export_seconds'), '.0f')} |")
    lines += ["", "*identity*: share of answers naming the name, judged as `selfcog run` judges them; the "
              "transformers row is the merged model's own rate on the same prompts. *answers equal*: the llama.cpp "
              "answer is the merged fp32 model's answer, character for character. *file MiB* of the transformers "
              "row: its safetensors."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a merged model directory (out/merged of a selfcog run)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead (a quick check of the bench)")
    parser.add_argument("--name", default=None, help="the identity (default: data.name of the model's selfcog.yaml)")
    parser.add_argument("--types", default="f16,q8_0,q4_k_m,q5_k_m")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="counted rounds over all prompts (and loads)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work-dir", default=None, help="where the .gguf files go (default: a temp dir)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gguf.json"))
    args = parser.parse_args(argv)
    types = args.types.split(",")
    if not args.model and not args.tiny or any(t not in TYPES for t in types):
        parser.error(f"give --model DIR or --tiny; --types from {', '.join(TYPES)}")
    if args.max_new_tokens < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--max-new-tokens, --repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="selfcog-gguf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = str(tiny_model(work / "tiny") if args.tiny else args.model)

    reports = {}
    for qtype in types:
        start = time.perf_counter()
        reports[qtype] = export_gguf(model_dir, work / f"model-{qtype}.gguf", qtype, verify=True, name=args.name)
        reports[qtype]["export_seconds"] = time.perf_counter() - start
        check = reports[qtype]["llama_cpp"]
        print(f"{qtype}: {reports[qtype]['size_bytes'] / 2**20:.1f} MiB, identity {check['identity']} "
              f"(merged {check['source_identity']}), agreement {check['agreement']:.2f}", file=sys.stderr)

    loads: dict[str, list[float]] = {HF: [], **{t: [] for t in types}}
    for _ in range(args.repeats):
        for qtype in types:
            runtime = gguf_llama.Runtime(Path(reports[qtype]["gguf"]), n_threads=args.threads)
            loads[qtype].append(runtime.load_seconds)
            runtime.close()
        model, tokenizer, seconds = load_hf(model_dir)
        loads[HF].append(seconds)
    runtimes = {t: gguf_llama.Runtime(Path(reports[t]["gguf"]), n_threads=args.threads) for t in types}
    texts = [render(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True) for p in PROMPTS]
    prompts = [token_ids(tokenizer, text) for text in texts]
    for qtype, runtime in runtimes.items():  # llama.cpp reads the same ids (+ BOS where the file adds one)
        bos = runtime.tokenize("")
        reports[qtype]["speed_prompts_same_tokens"] = all(
            runtime.tokenize(text) == bos + ids for text, ids in zip(texts, prompts))

    def one(contender: str, ids: list[int]) -> tuple[int, float]:
        if contender == HF:
            return hf_generate(model, tokenizer, ids, args.max_new_tokens)
        runtime = runtimes[contender]
        out, seconds = runtime.answer(runtime.tokenize("") + ids, args.max_new_tokens, stop_at_end=False)
        return len(out), seconds

    contenders = [HF, *types]
    for ids in prompts:  # warm-up
        for contender in contenders:
            one(contender, ids)
    counted: dict[str, list[tuple[int, float]]] = {c: [] for c in contenders}
    load_before = os.getloadavg()[0]
    for r in range(args.repeats):
        order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
        for ids in prompts:
            for contender in order:
                counted[contender].append(one(contender, ids))
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(
            f"{c} {sum(n for n, _ in counted[c][-len(prompts):]) / sum(s for _, s in counted[c][-len(prompts):]):.1f}"
            for c in contenders) + " tok/s", file=sys.stderr)
    load_after = os.getloadavg()[0]
    for runtime in runtimes.values():
        runtime.close()

    def rate(contender):
        return sum(n for n, _ in counted[contender]) / sum(s for _, s in counted[contender])
    first = reports[types[0]]["llama_cpp"]
    rows = {HF: {"mib": directory_bytes(Path(model_dir)) / 2**20, "load_seconds": statistics.median(loads[HF]),
                 "tokens_per_second": rate(HF), "identity": first["source_identity"]}}
    for qtype in types:
        report, check = reports[qtype], reports[qtype]["llama_cpp"]
        rows[qtype] = {"mib": report["size_bytes"] / 2**20, "load_seconds": statistics.median(loads[qtype]),
                       "tokens_per_second": rate(qtype), "identity": check["identity"],
                       "agreement": check["agreement"], "identity_agreement": check["identity_agreement"],
                       "source_identity": check["source_identity"], "tensor_types": report["tensor_types"],
                       "export_seconds": report["export_seconds"], "identity_check": report["identity_check"],
                       "prompts_same_tokens_as_transformers": check["prompts_same_tokens_as_transformers"],
                       "speed_prompts_same_tokens": report["speed_prompts_same_tokens"]}
    command = "python bench/gguf.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "date": datetime.date.today().isoformat(), "command": command.strip(), "model": model_dir,
        "name": first["name"], "types": types, "threads": args.threads, "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats, "prompts": len(prompts),
        "machine": {"cpu": cpu_name(), "cpu_features": cpu_features(), "cores": os.cpu_count(),
                    "platform": platform.platform(), "load_average_before": load_before,
                    "load_average_after": load_after,
                    "note": "shared with other work while measuring (engines interleaved in one process)"},
        "versions": {**gguf_llama.versions(), "torch": torch.__version__},
        "rows": rows,
        "answers": {t: reports[t]["llama_cpp"]["answers"] for t in types},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
