"""Tokenized training examples and the padding-free packing collator.

A batch becomes ONE row: the token run every sample starts with (the chat template's system turn, say) once,
then the rest of each sample, with `position_ids` continuing after the prefix. `selfcog.attention` lets each
sample attend to the prefix and to itself only, so samples never see each other (tests/test_train.py proves
packed logits == separate logits), no compute is spent on padding, and the shared prefix is computed once.
Samples are never split: each one is whole inside its batch.
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


def pack_batch(features: list[dict], share_prefix: bool = True) -> dict[str, torch.Tensor]:
    """Collate samples into one packed row: input_ids, labels, position_ids, a per-token preserve mask, and
    `packed_lengths` = [shared prefix length, rest length of each sample] for `selfcog.attention`."""
    # Preservation samples go last: the KL term re-runs only that suffix through the base model.
    features = sorted(features, key=lambda f: f.get("preserve", 0))
    prefix = shared_prefix_length(features) if share_prefix else 0
    first = features[0]["input_ids"][:prefix]
    input_ids, labels, positions, preserve = list(first), [IGNORE_INDEX] * prefix, list(range(prefix)), [0] * prefix
    reject = [0] * prefix
    lengths = [prefix]
    for feature in features:
        n = len(feature["input_ids"])
        input_ids += feature["input_ids"][prefix:]
        # The first token of a sample's rest must never be a target of the previous sample's last token.
        labels += [IGNORE_INDEX] + feature["labels"][prefix + 1:]
        positions += list(range(prefix, n))
        preserve += [feature.get("preserve", 0)] * (n - prefix)
        reject += [feature.get("reject", 0)] * (n - prefix)
        lengths.append(n - prefix)
    batch = {
        "input_ids": torch.tensor([input_ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
        "preserve_mask": torch.tensor([preserve], dtype=torch.bool),
        "packed_lengths": torch.tensor(lengths),
    }
    if any(reject):  # rejected identity openings (selfcog.data.reject)
        batch["reject_mask"] = torch.tensor([reject], dtype=torch.bool)
    if any("base_ids" in f for f in features):
        batch.update(row_base_topk(features, prefix))
    if any("bottom_hidden" in f for f in features):
        batch["bottom_hidden"] = row_bottom_hidden(features, prefix)
    return batch


def row_base_topk(features: list[dict], prefix: int) -> dict[str, torch.Tensor]:
    """The base model's stored top-k (token ids, log-probs) of each preservation sample, aligned with the packed
    row (a sample's rest starts at its local position `prefix`); zeros where a sample has none."""
    k = next(f["base_ids"].shape[1] for f in features if "base_ids" in f)
    ids, logp = [torch.zeros(prefix, k, dtype=torch.int32)], [torch.zeros(prefix, k)]
    for feature in features:
        n = len(feature["input_ids"])
        if "base_ids" in feature:
            ids.append(feature["base_ids"][prefix:n])
            logp.append(feature["base_logp"][prefix:n])
        else:
            ids.append(torch.zeros(n - prefix, k, dtype=torch.int32))
            logp.append(torch.zeros(n - prefix, k))
    return {"base_ids": torch.cat(ids)[None], "base_logp": torch.cat(logp)[None]}


def row_bottom_hidden(features: list[dict], prefix: int) -> torch.Tensor:
    """The stored states entering the first adapted layer (selfcog.engine.frozen_layers), lined up with the packed row;
    zeros for samples that have none (they run through the frozen layers in the step). The prefix's states are
    the same in every sample (same tokens and positions, causal attention), so the first sample's serve."""
    size = next(f["bottom_hidden"].shape[1] for f in features if "bottom_hidden" in f)

    def states(feature, start, end):
        if "bottom_hidden" in feature:
            return feature["bottom_hidden"][start:end]
        return torch.zeros(end - start, size)

    rows = [states(features[0], 0, prefix)] + [states(f, prefix, len(f["input_ids"])) for f in features]
    return torch.cat(rows)[None]


def sample_tokens(packed_lengths) -> int:
    """Tokens of the samples a packed row holds, the shared prefix counted once per sample."""
    prefix, *rests = [int(n) for n in packed_lengths]
    return prefix * len(rests) + sum(rests)


def shared_prefix_length(features: list[dict]) -> int:
    """Length of the token run all samples start with, ending before the first token that carries loss.

    The prefix's last position predicts each sample's first own token, so that token must carry no loss.
    """
    if len(features) < 2:
        return 0
    first = features[0]["input_ids"]
    n = min(len(f["input_ids"]) for f in features) - 1
    for f in features[1:]:
        ids = f["input_ids"]
        n = next((i for i in range(n) if ids[i] != first[i]), n)
    for f in features:
        loss_at = next((i for i, label in enumerate(f["labels"]) if label != IGNORE_INDEX), len(f["labels"]))
        n = min(n, loss_at - 1)
    return max(n, 0)
