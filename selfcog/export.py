"""Merge a LoRA adapter into its base model and write a standard HF model directory.

Memory is the constraint: the merge must fit where the model fits. So the adapter is folded into the
base weights in place (`merge_and_unload` adds B·A·alpha/r to each weight and drops the adapter), and
the weights are written by our own streaming safetensors writer, which casts one tensor at a time.
Casting the whole model first (`model.to(bf16)`) would hold both copies at once: the loaded fp32
weights are views of a memory-mapped file, and none of that memory comes back until every one of them
is gone. Peak memory is therefore one fp32 copy of the model plus its largest tensor
(`bench/merge_memory.py` measures it).
"""

from __future__ import annotations

import copy
import json
import os
import re
import struct
from pathlib import Path

import torch

from selfcog.atomic import atomic_dir
from selfcog.config import RunConfig, save_config
from selfcog.errors import SelfcogError
from selfcog.models import load_model, tokenizer_from_source

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# safetensors' names for the dtypes a model state dict can hold.
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
INDEX_FILE = "model.safetensors.index.json"


def parse_size(text: str | int) -> int:
    """`"2GB"` -> 2_000_000_000 (decimal units as transformers reads them; KiB/MiB/GiB are binary)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise SelfcogError(f"--max-shard-size {text}: expected a size such as 500MB, 2GB or 100KB")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])


def share(path: Path) -> Path:
    """Give a finished output the usual permissions: temp files and dirs are created private (0600/0700)."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)
    return path


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise SelfcogError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def save_merged(peft_model, tokenizer, target: Path, config: RunConfig | None = None,
                max_shard_size: str = "2GB", dtype: str = "fp32") -> Path:
    """Fold the adapter into the base weights (W + B·A·alpha/r) and write `target` atomically.

    The result loads with stock `AutoModelForCausalLM` / `AutoTokenizer`; the tokenizer (and its chat
    template) is the one training used. `peft_model` is consumed: its base model holds the merged weights.
    """
    torch_dtype, shard_bytes = check_dtype(dtype), parse_size(max_shard_size)
    merged = peft_model.merge_and_unload()
    with atomic_dir(target) as tmp:
        save_weights(merged, tmp, torch_dtype, shard_bytes)
        tokenizer.save_pretrained(tmp)
        if config is not None:
            save_config(config, tmp)
        share(tmp)
    return target


def save_weights(model, directory: Path, dtype: torch.dtype, shard_bytes: int) -> None:
    """Weights (sharded past `shard_bytes`), config.json and generation_config.json, in `dtype`."""
    if getattr(model, "_weight_conversions", None) != []:
        # transformers changed this model's layout on load (e.g. fused MoE experts) or we can't tell;
        # only its own save_pretrained knows how to undo that. Costs more memory, stays correct.
        for param in model.parameters():
            param.data = param.data.to(dtype) if param.is_floating_point() else param.data
        model.save_pretrained(directory, max_shard_size=shard_bytes)
        return
    tensors = tensors_to_save(model)
    shards = plan_shards(tensors, dtype, shard_bytes)
    names = [INDEX_FILE.replace(".index.json", "")] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        total += write_safetensors(directory / name, {key: tensors[key] for key in shard}, dtype)
        weight_map.update(dict.fromkeys(shard, name))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config = copy.deepcopy(model.config)  # the in-memory model keeps its fp32 config
    config.dtype = dtype
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)


def tensors_to_save(model) -> dict[str, torch.Tensor]:
    """The state dict without tied duplicates: `lm_head.weight` is dropped when it *is* the embedding.

    Only names the model re-ties on load may be dropped; any other shared tensor is written twice,
    which is bigger but always loads back right.
    """
    tied = set(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or ())
    state = model.state_dict()
    seen: set[tuple] = set()
    kept = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen and name in tied:
            continue
        seen.add(key)
        kept[name] = tensor
    return kept


def stored_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    # Only floating-point weights change type; integer/bool buffers are written as they are.
    return dtype if tensor.is_floating_point() else tensor.dtype


def plan_shards(tensors: dict[str, torch.Tensor], dtype: torch.dtype, shard_bytes: int) -> list[list[str]]:
    """Consecutive groups of tensor names, each at most `shard_bytes` (a bigger tensor gets its own shard)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * stored_dtype(tensor, dtype).itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> int:
    """Write one safetensors file, casting and writing one tensor at a time; returns the data bytes.

    Format: 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte range),
    then the tensors' raw bytes back to back.
    """
    header, offset = {}, 0
    for name, tensor in tensors.items():
        kind = stored_dtype(tensor, dtype)
        if kind not in SAFETENSORS_DTYPES:
            raise SelfcogError(f"{name}: cannot write a {kind} tensor to safetensors")
        nbytes = tensor.numel() * kind.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[kind], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}  # transformers refuses files without it
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the tensor data 8-byte aligned, as safetensors itself does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for tensor in tensors.values():
            data = tensor.detach().to(stored_dtype(tensor, dtype)).contiguous().reshape(-1)
            f.write(data.view(torch.uint8).numpy().data)
            del data  # a cast copy lives only while it is written
    return offset


def merge(base: str, adapter: Path, out: Path, max_shard_size: str = "2GB", dtype: str = "fp32") -> Path:
    """`selfcog merge`: load BASE, apply ADAPTER, write the merged model to OUT."""
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise SelfcogError(f"{adapter}: not a LoRA adapter directory (no adapter_config.json)")
    check_dtype(dtype)
    parse_size(max_shard_size)  # fail on a typo before the slow load
    from peft import PeftModel  # ~1 s, for merge only: deploy and export-gguf import this module for share()

    model, tokenizer = load_model(base, dtype=torch.float32, device="cpu")
    if (adapter / "tokenizer_config.json").is_file():
        tokenizer = tokenizer_from_source(str(adapter))  # the tokenizer training used, chat template included
    try:
        peft_model = PeftModel.from_pretrained(model, adapter)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        reason = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]  # "Error(s) in ...:" says nothing alone
        raise SelfcogError(f"{adapter}: adapter does not fit {base}: {reason}") from exc
    return save_merged(peft_model, tokenizer, Path(out), max_shard_size=max_shard_size, dtype=dtype)
