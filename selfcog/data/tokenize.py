"""Tokenized training examples and the padding-free packing collator.

A batch becomes ONE row: samples laid end to end, `position_ids` restarting at 0 for each sample and no
attention mask. transformers then builds a block-diagonal causal mask from the position ids, so samples
never attend to each other (tests/test_train.py proves packed logits == separate logits), and no compute
is spent on padding. Samples are never split: each one is whole inside its batch.
"""

from __future__ import annotations

import torch

from selfcog.templates import IGNORE_INDEX, encode_example


def build_examples(tokenizer, conversations: list[list[dict]], preserve: bool, max_length: int) -> tuple[list[dict], int]:
    """Tokenize conversations into `{input_ids, labels, preserve}`; returns (examples, number dropped as too long)."""
    examples, dropped = [], 0
    for messages in conversations:
        input_ids, labels = encode_example(tokenizer, messages)
        if len(input_ids) > max_length:
            dropped += 1
            continue
        examples.append({"input_ids": input_ids, "labels": labels, "preserve": int(preserve)})
    return examples, dropped


def pack_batch(features: list[dict]) -> dict[str, torch.Tensor]:
    """Collate samples into one packed row: input_ids, labels, position_ids and a per-token preserve mask."""
    input_ids, labels, positions, preserve = [], [], [], []
    # Preservation samples go last: the KL term re-runs only that suffix through the base model.
    for feature in sorted(features, key=lambda f: f.get("preserve", 0)):
        n = len(feature["input_ids"])
        input_ids += feature["input_ids"]
        # The first token of a sample must never be a target of the previous sample's last token.
        labels += [IGNORE_INDEX] + feature["labels"][1:]
        positions += list(range(n))
        preserve += [feature.get("preserve", 0)] * n
    return {
        "input_ids": torch.tensor([input_ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
        "preserve_mask": torch.tensor([preserve], dtype=torch.bool),
    }
