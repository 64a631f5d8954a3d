"""Whole samples grouped into bins of up to max_length tokens (`data.pack_to_max_length`) and collated."""

from __future__ import annotations

import torch

from selfcog.data.tokenize import pack_batch


def pack_to_max_length(examples: list[dict], max_length: int) -> list[list[dict]]:
    """Whole samples grouped greedily, in order, into bins of at most max_length tokens (never split)."""
    bins: list[list[dict]] = []
    size = max_length + 1
    for example in examples:
        n = len(example["input_ids"])
        if size + n > max_length:
            bins.append([])
            size = 0
        bins[-1].append(example)
        size += n
    return bins


def pack_bins(features: list) -> dict[str, torch.Tensor]:
    """pack_batch over samples or over bins of samples (data.pack_to_max_length)."""
    flat = [e for f in features for e in (f if isinstance(f, list) else [f])]
    return pack_batch(flat)
