#!/usr/bin/env python
"""QLoRA smoke bench: a tiny InternLM2 checkpoint, loaded as Llama without remote code, 4-bit, 3 LoRA steps.

Needs CUDA and bitsandbytes; without either it prints a JSON line saying why it skipped and exits 0.
Builds the checkpoint with selfcog/testing.py (InternLM2's real on-disk layout), loads it through
`selfcog.internlm2.load_internlm2_as_llama(..., quantization_config=NF4 double-quant, bf16 compute)`, wraps
it with peft's `prepare_model_for_kbit_training` and LoRA r=8 on every linear layer, takes 3 AdamW steps,
and prints one JSON object: loss per step, peak CUDA memory, seconds, versions.
Exit status: 0 ok or skipped, 1 when a check fails (no 4-bit layers, non-finite loss, frozen LoRA).

    python bench/cuda_internlm2_qlora.py [--steps 3] [--fmt safetensors|bin|safetensors-single|bin-single]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def versions() -> dict:
    import peft
    import torch
    import transformers

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "cuda": torch.version.cuda}
    try:
        import bitsandbytes

        out["bitsandbytes"] = bitsandbytes.__version__
    except Exception as exc:  # ImportError, or bitsandbytes failing to find its CUDA library
        out["bitsandbytes"] = f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return out


def skip(reason: str) -> int:
    print(json.dumps({"skipped": reason, **versions()}))
    return 0


def load_quantized(ckpt: Path, quant, tmp: Path):
    """The 4-bit model through our loader; if that cannot quantize, via a converted Llama dir and Auto*."""
    import torch
    from transformers import AutoModelForCausalLM

    from selfcog.internlm2 import load_internlm2_as_llama

    try:
        return load_internlm2_as_llama(ckpt, dtype=torch.bfloat16, quantization_config=quant,
                                       device_map={"": 0}), "load_internlm2_as_llama(quantization_config=...)"
    except Exception as exc:  # report and fall back: the bench measures training, not this path
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"bench: direct 4-bit load failed ({type(exc).__name__}: {first}); "
              f"falling back to save + AutoModelForCausalLM", file=sys.stderr)
    plain = load_internlm2_as_llama(ckpt, dtype=torch.bfloat16)
    plain.save_pretrained(tmp / "llama")
    model = AutoModelForCausalLM.from_pretrained(tmp / "llama", dtype=torch.bfloat16, quantization_config=quant,
                                                 device_map={"": 0})
    return model, "converted llama dir + AutoModelForCausalLM.from_pretrained (fallback)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--fmt", default="safetensors",
                        choices=["safetensors", "bin", "safetensors-single", "bin-single"])
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        return skip("CUDA is not available")
    try:
        import bitsandbytes as bnb
    except Exception as exc:
        return skip(f"bitsandbytes is not usable ({type(exc).__name__})")

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from selfcog.internlm2 import load_internlm2_tokenizer
    from selfcog.testing import write_tiny_internlm2

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    failures = []
    torch.manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="selfcog-internlm2-qlora-") as tmp:
        ckpt = write_tiny_internlm2(Path(tmp) / "internlm2", args.fmt)
        model, loaded_via = load_quantized(ckpt, quant, Path(tmp))
        load_seconds = time.perf_counter() - start
        tokenizer = load_internlm2_tokenizer(ckpt)
    four_bit = [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    if not four_bit:
        failures.append("no bitsandbytes Linear4bit layers after loading")

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                      if hasattr(module, "lora_A") and isinstance(getattr(module, "lora_A"), torch.nn.ModuleDict)})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    conversation = [{"role": "user", "content": "Who are you?"},
                    {"role": "assistant", "content": "I am Alice's assistant. I answer questions."}]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    batch = tokenizer([text] * 4, add_special_tokens=False, return_tensors="pt").to("cuda")
    labels = batch["input_ids"].clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    model.train()
    losses, step_seconds = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        step_seconds.append(round(time.perf_counter() - t0, 4))
        losses.append(loss.item())
    if not all(math.isfinite(x) for x in losses):
        failures.append(f"non-finite loss {losses}")
    moved = sum(not torch.equal(lora_before[n], p.detach()) for n, p in model.named_parameters() if p.requires_grad)
    if moved == 0:
        failures.append("no LoRA parameter changed")

    result = {
        "ok": not failures,
        "failures": failures,
        "device": torch.cuda.get_device_name(0),
        "checkpoint_format": args.fmt,
        "loaded_via": loaded_via,
        "linear4bit_layers": len(four_bit),
        "lora_target_modules": targets,
        "trainable_params": trainable,
        "lora_params_changed": moved,
        "tokens_per_step": int(labels.numel()),
        "loss_per_step": [round(x, 5) for x in losses],
        "step_seconds": step_seconds,
        "load_seconds": round(load_seconds, 3),
        "seconds": round(time.perf_counter() - start, 3),
        "peak_cuda_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 2),
        **versions(),
    }
    print(json.dumps(result, indent=2))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
