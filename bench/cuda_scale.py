#!/usr/bin/env python
"""The tutorial's scale on one CUDA GPU: selfcog on an InternLM2-Chat-1.8B-shaped checkpoint, in under 10 minutes.

The checkpoint is `bench/scale.py`'s (random weights in internlm/internlm2-chat-1_8b's exact layout and config,
bf16 safetensors, built once under `--cache`). Each part runs in a process of its own, so each one's peak CUDA
memory (`torch.cuda.max_memory_allocated`) is its own; a part that fails is reported and the others still run.

- `qlora-selfcog`: `selfcog train` with the seed preset `internlm2-chat-1.8b-qlora` (4-bit NF4 double-quant, LoRA
  r64/a16 on every linear layer, packed to 2,048 tokens, batch 1 x 16) on the tutorial's data (`selfcog data
  --repeat`), `--steps` optimizer steps: tokens/s and peak memory against XTuner's 5.7 GB for this model.
- `qlora-hf-peft`: the same 4-bit model, LoRA and data through a plain `Trainer` + PEFT (`prepare_model_for_kbit_
  training`, padded batches of 32 samples x 16 accumulated): tokens/s against `qlora-selfcog`.
- `bf16-lora`: `selfcog run`'s trainer (bench/scale.py's `train` stage: stored top-k, frozen layers run once,
  packed rows) and HF Trainer + PEFT with the same LoRA, in bf16.
- `kernels`: the packed-attention path on CUDA: packed logits and LoRA gradients against each sample run alone.
- `serving`: `stream_chat` (streaming, one request) and the continuous-batching engine (16 concurrent requests)
  on the base model in bf16: time to first token, decode tokens/s, and whether greedy texts agree.

Without CUDA the QLoRA parts report that they skipped. `--dry-run` runs every part that can on a tiny shape on
the CPU in about a minute: the machinery check (tests/test_scale.py runs it).

    python bench/cuda_scale.py [--steps 4] [--out cuda_scale.json]      # on the GPU machine, ~6-8 minutes
    python bench/cuda_scale.py --dry-run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PARTS = ("qlora-selfcog", "qlora-hf-peft", "bf16-lora", "kernels", "serving")
XTUNER_QLORA_GB = 5.7  # XTuner's tutorial: InternLM2-Chat-1.8B QLoRA peak GPU memory
NAME = "伍鲜同志"


def device_peak_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    from scale import peak_mib

    return peak_mib()


def usable_bitsandbytes() -> str | None:
    """Why 4-bit cannot run here, or None."""
    import torch

    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or bitsandbytes failing to find its CUDA library
        return f"bitsandbytes is not usable ({type(exc).__name__})"
    return None


def tutorial_data(work: Path, repeat: int) -> Path:
    from selfcog.data.identity import Persona, dumps, seed_records

    path = work / "assistant.json"
    path.write_text(dumps(seed_records(Persona(NAME, "", "", ""), repeat)))
    return path


def qlora_selfcog(args) -> dict:
    """`selfcog train` with the seed preset, bounded to `--steps` optimizer steps."""
    from selfcog.config import load_preset
    from selfcog.recipes.sft import train_from_config

    if (why := usable_bitsandbytes()) is not None:
        return {"skipped": why}
    work = Path(tempfile.mkdtemp(prefix="selfcog-qlora-"))
    config = load_preset("internlm2-chat-1.8b-qlora")
    config.model.spec = str(args.model_dir)
    config.data.data_files = [str(tutorial_data(work, 3750))]
    config.train.epochs, config.train.max_steps, config.train.logging_steps = 0, args.steps, 1
    config.train.save_steps, config.eval.sample_steps, config.eval.sample_inputs = 0, 0, []
    began = time.perf_counter()
    train_from_config(config, work / "run")
    rows = [json.loads(line) for line in (work / "run" / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "tokens_per_s" in r]
    timed = steps[1:] or steps  # the first logged step carries the CUDA warm-up
    return {"steps": len(steps), "seconds": round(time.perf_counter() - began, 1),
            "tokens_per_s": round(sum(r["tokens_per_s"] for r in timed) / max(len(timed), 1), 1),
            "peak_memory_mib": device_peak_mib(), "xtuner_peak_gb": XTUNER_QLORA_GB,
            "loss": [r.get("loss") for r in steps]}


def qlora_hf_peft(args) -> dict:
    """The same 4-bit model, LoRA and data through a plain Trainer + PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from train_throughput import StepClock, counted, step_stats
    from transformers import BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from selfcog.config import load_preset
    from selfcog.data.formats import load_conversations
    from selfcog.data.tokenize import build_examples
    from selfcog.models import load_model

    if (why := usable_bitsandbytes()) is not None:
        return {"skipped": why}
    config = load_preset("internlm2-chat-1.8b-qlora")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float16)
    model, tokenizer = load_model(str(args.model_dir), dtype=torch.float16, quantization_config=quant,
                                  device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.train.gradient_checkpointing)
    lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    work = Path(tempfile.mkdtemp(prefix="selfcog-qlora-hf-"))
    conversations = load_conversations(tutorial_data(work, 3750))
    examples, _ = build_examples(tokenizer, conversations, False, config.data.max_length)
    features = [{"input_ids": e["input_ids"], "labels": e["labels"], "attention_mask": [1] * len(e["input_ids"])}
                for e in examples]
    clock = StepClock()
    cls = counted(Trainer, lambda inputs: int(inputs["attention_mask"].sum()), lambda _: 0, clock)
    trainer = cls(model=get_peft_model(model, lora), train_dataset=features,
                  data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100),
                  args=TrainingArguments(output_dir=str(work), per_device_train_batch_size=32,
                                         gradient_accumulation_steps=16, learning_rate=config.train.learning_rate,
                                         max_steps=args.steps + 1, fp16=True, logging_steps=10_000,
                                         save_strategy="no", report_to=[], dataloader_num_workers=0, seed=0))
    trainer.add_callback(clock)
    trainer.train()
    stats = step_stats(clock)
    stats.pop("executed_flops_per_s")
    return {**stats, "peak_memory_mib": device_peak_mib()}


def bf16_lora(args) -> dict:
    """bench/scale.py's first-run and train stages on this device: selfcog run's trainer against HF + PEFT."""
    import scale

    stage = SimpleNamespace(model_dir=args.model_dir, precision="bf16", batch=8, steps=args.steps,
                            answers="none", cache=args.cache, sample_tokens=8, threads=1)
    first = scale.first_run(stage)
    out = {"first_run": first}
    for contender in ("selfcog", "hf-peft"):
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        out[contender] = scale.train(SimpleNamespace(**vars(stage), contender=contender))["train"]
        out[contender]["peak_memory_mib"] = device_peak_mib()
    out["speedup"] = round(out["selfcog"]["tokens_per_s"] / out["hf-peft"]["tokens_per_s"], 2)
    return out


def kernels(args) -> dict:
    """Packed rows on this device: logits and LoRA gradients of three samples packed into one row against each
    sample run alone (the packed-attention function registered through AttentionInterface), and the time of a
    packed forward + backward."""
    import torch

    from selfcog.attention import check_used, packed_attention, packed_layout
    from selfcog.config import RunConfig
    from selfcog.data.tokenize import build_examples, pack_batch
    from selfcog.engine.lora import add_lora
    from selfcog.models import load_model

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model, tokenizer = load_model(str(args.model_dir), dtype=dtype)
    config = RunConfig()
    torch.manual_seed(0)
    model = add_lora(model, config)
    for name, p in model.named_parameters():  # B = 0 at init would make every LoRA gradient but B's vanish
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    conversations = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in (
        ("Who are you?", "I am an assistant."), ("What is the capital of France?", "Paris is the capital."),
        ("请介绍一下你自己。", "我是一个人工智能助手。"))]
    examples, _ = build_examples(tokenizer, conversations, False, 512)
    device = model.device

    def loss_and_grads(inputs, layout=None):
        model.zero_grad(set_to_none=True)
        kwargs = {"packed_layout": layout} if layout is not None else {}
        logits = model(input_ids=inputs["input_ids"].to(device), position_ids=inputs["position_ids"].to(device),
                       use_cache=False, **kwargs).logits.float()
        logits.sum().backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads

    with packed_attention(model):
        packed = pack_batch(examples, share_prefix=False)
        layout = packed_layout(packed["packed_lengths"], device)
        began = time.perf_counter()
        packed_logits, packed_grads = loss_and_grads(packed, layout)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        check_used(layout, model)
        alone_logits, alone_grads, start = [], {}, 0
        for e in examples:
            single = pack_batch([e], share_prefix=False)
            logits, grads = loss_and_grads(single, packed_layout(single["packed_lengths"], device))
            alone_logits.append(logits[0])
            for n, g in grads.items():
                alone_grads[n] = alone_grads.get(n, 0) + g
    alone = torch.cat(alone_logits)
    logit_err = ((packed_logits[0] - alone).abs().max() / alone.abs().max()).item()
    grad_err = max(((packed_grads[n] - alone_grads[n]).norm() / alone_grads[n].norm().clamp(min=1e-12)).item()
                   for n in alone_grads)
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-4
    return {"dtype": str(dtype), "tokens": int(packed["input_ids"].numel()), "max_rel_logit_error": logit_err,
            "max_rel_grad_error": grad_err, "ok": logit_err < tolerance and grad_err < tolerance,
            "packed_forward_backward_seconds": round(seconds, 3), "peak_memory_mib": device_peak_mib()}


def serving(args) -> dict:
    """Streaming one request, and 16 concurrent requests through the batching engine, greedy."""
    import torch

    from selfcog.batching import BatchEngine
    from selfcog.generate import SamplingArgs, plan_prompt, stream_chat

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    from selfcog.models import load_model

    model, tokenizer = load_model(str(args.model_dir), dtype=dtype)
    sampling = SamplingArgs(max_new_tokens=args.new_tokens, temperature=0)
    questions = ["Who are you?", "What is the capital of France?", "请介绍一下你自己。", "Write a haiku about rain."]
    messages = [[{"role": "user", "content": q}] for q in questions * 4]
    stream_chat(model, tokenizer, messages[0], sampling).__next__()  # warm-up

    info: dict = {}
    began = time.perf_counter()
    pieces, first = [], None
    for piece in stream_chat(model, tokenizer, messages[0], sampling, info=info):
        first = first or time.perf_counter() - began
        pieces.append(piece)
    streamed_seconds = time.perf_counter() - began
    streamed = "".join(pieces)

    engine = BatchEngine(model, tokenizer, max_batch=16)
    texts, infos = [""] * len(messages), [dict() for _ in messages]

    def client(i):
        ids, budget = plan_prompt(model, tokenizer, messages[i], sampling)
        texts[i] = "".join(engine.stream(ids, sampling, budget, info=infos[i]))

    began = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(messages))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batched_seconds = time.perf_counter() - began
    engine.close()
    completion = sum(i.get("completion_tokens", 0) for i in infos)
    return {"dtype": str(dtype), "stream": {"ttft_s": round(first or math.nan, 3),
                                           "completion_tokens": info.get("completion_tokens"),
                                           "tokens_per_s": round((info.get("completion_tokens") or 0) /
                                                                 streamed_seconds, 1)},
            "batched": {"requests": len(messages), "completion_tokens": completion,
                        "seconds": round(batched_seconds, 2), "tokens_per_s": round(completion / batched_seconds, 1),
                        "largest_batch": engine.stats["largest_batch"]},
            "greedy_texts_agree": texts[0] == streamed, "peak_memory_mib": device_peak_mib()}


def run_part(part: str, args) -> dict:
    command = [sys.executable, __file__, "--part", part, "--model-dir", str(args.model_dir), "--cache",
               str(args.cache), "--steps", str(args.steps), "--new-tokens", str(args.new_tokens)]
    began = time.perf_counter()
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=args.part_timeout,
                             env={**os.environ, "SELFCOG_HOME": str(args.home)})
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {args.part_timeout} s"}
    lines = out.stdout.strip().splitlines()
    if out.returncode or not lines:
        return {"failed": out.stderr.strip()[-3000:] or f"exit status {out.returncode}"}
    result = json.loads(lines[-1])
    result["process_seconds"] = round(time.perf_counter() - began, 1)
    return result


def versions() -> dict:
    import peft
    import torch
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    try:
        import bitsandbytes

        out["bitsandbytes"] = bitsandbytes.__version__
    except Exception as exc:
        out["bitsandbytes"] = f"unavailable: {type(exc).__name__}"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="a tiny shape on the CPU: the machinery only")
    parser.add_argument("--cache", type=Path, default=None, help="default: $SELFCOG_HOME/scale")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per training part")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--part-timeout", type=int, default=240)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        args.model_dir = Path(args.model_dir)
        parts = {"qlora-selfcog": qlora_selfcog, "qlora-hf-peft": qlora_hf_peft, "bf16-lora": bf16_lora,
                 "kernels": kernels, "serving": serving}
        print(json.dumps(parts[args.part](args)))
        return 0

    import scale

    from selfcog.paths import selfcog_home

    if args.dry_run:
        args.steps, args.new_tokens = 1, 4
    args.cache = (args.cache or selfcog_home() / "scale").resolve()
    args.cache.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    args.model_dir = scale.checkpoint("tiny" if args.dry_run else "1.8b", args.cache)
    report = {"shape": "tiny" if args.dry_run else "1.8b", "dry_run": args.dry_run, **versions(),
              "checkpoint_build_seconds": round(time.perf_counter() - began, 1), "parts": {}}
    with tempfile.TemporaryDirectory(prefix="home-", dir=args.cache) as home:
        args.home = home
        env = dict(os.environ)
        if args.dry_run:  # the CPU path even where a GPU is present
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        try:
            for part in args.parts.split(","):
                report["parts"][part] = run_part(part, args)
                print(f"{part}: {json.dumps(report['parts'][part])}", file=sys.stderr, flush=True)
        finally:
            os.environ.clear()
            os.environ.update(env)
    report["seconds"] = round(time.perf_counter() - began, 1)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    failed = [p for p, r in report["parts"].items() if "failed" in r or r.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
