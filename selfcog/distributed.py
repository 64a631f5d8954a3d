"""`selfcog train` under torchrun: which process writes, how processes wait for each other, DeepSpeed checks.

    torchrun --nproc-per-node N -m selfcog train CONFIG --work-dir DIR

runs N processes of data-parallel training through the Trainer: NCCL between GPUs, gloo between CPU processes.
Every process loads the model and the data and trains on its share of each step's batches; only the main
process (rank 0) writes the work dir: resolved config, `log.jsonl`, sample chats, the checkpoint markers and the
final adapter. Without torchrun everything here is a no-op for one process.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from accelerate import PartialState

from selfcog.errors import SelfcogError


def world_size() -> int:
    """Processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0, or the only process. Read from torchrun's environment, so it holds before any process group."""
    return int(os.environ.get("RANK", "0")) == 0


def ddp_backend() -> str | None:
    """`TrainingArguments.ddp_backend`: gloo between CPU processes under torchrun; None (one process, or accelerate's
    choice of NCCL between GPUs) otherwise."""
    return "gloo" if world_size() > 1 and not torch.cuda.is_available() else None


def join_processes():
    """Join torchrun's process group now, through accelerate's `PartialState` (the state the Trainer then uses;
    DeepSpeed's torch backend reuses an initialized group), so the processes can wait for each other before the
    Trainer exists: the main process fetches the model first."""
    return PartialState(cpu=not torch.cuda.is_available(), backend=ddp_backend())


def wait_for_everyone() -> None:
    """A barrier across torchrun's processes (nothing for one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def liger_args(enabled: bool) -> dict:
    """TrainingArguments for `train.liger_kernel`; one line naming the setting and the reason where it cannot run."""
    if not enabled:
        return {}
    if not torch.cuda.is_available():
        raise SelfcogError("train.liger_kernel: Liger's kernels are Triton kernels for CUDA GPUs and none is visible; "
                           "unset it on this machine")
    if importlib.util.find_spec("liger_kernel") is None:
        raise SelfcogError("train.liger_kernel: liger-kernel is not installed (pip install liger-kernel)")
    # Liger's fused linear cross-entropy replaces the model's forward to compute a loss from `labels`; selfcog
    # computes its own loss from the logits at loss positions, so only the layer kernels are swapped in.
    return {"use_liger_kernel": True, "liger_kernel_config": {"fused_linear_cross_entropy": False}}


def check_deepspeed(path: str) -> None:
    """`train.deepspeed`: one line naming the setting and the reason, before any model is loaded."""
    if not path:
        return
    where = f"train.deepspeed {path}"
    if not torch.cuda.is_available():
        raise SelfcogError(f"{where}: DeepSpeed needs a CUDA GPU and none is visible; "
                           "unset train.deepspeed (torchrun alone trains data-parallel on CPUs)")
    if importlib.util.find_spec("deepspeed") is None:
        raise SelfcogError(f"{where}: DeepSpeed is not installed (pip install deepspeed)")
    file = Path(path)
    if not file.is_file():
        raise SelfcogError(f"{where}: file does not exist")
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SelfcogError(f"{where}: not a JSON file ({exc})") from None
    if not isinstance(settings, dict):
        raise SelfcogError(f"{where}: expected a JSON object of DeepSpeed settings")
