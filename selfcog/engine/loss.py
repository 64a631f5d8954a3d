"""The loss terms: cross-entropy and the KL term read one chunked log-softmax gather; the name term keeps NAME out
of ordinary answers; the base model's top-k next-token log-probs are stored once before training."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfcog.cache import cached_tensors
from selfcog.engine.frozen_layers import per_position
from selfcog.templates import IGNORE_INDEX


def preservation_loss(logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(base || tuned) over the given positions (rows of logits)."""
    tuned = F.log_softmax(logits.float(), dim=-1)
    base = F.log_softmax(base_logits.float(), dim=-1)
    return F.kl_div(tuned, base, log_target=True, reduction="batchmean")


def topk_preservation_loss(tuned_logp: torch.Tensor, base_logp: torch.Tensor) -> torch.Tensor:
    """Mean KL(base || tuned) over rows, from the base model's stored top-k log-probs and the tuned model's
    log-probs of the same k tokens: the k tokens plus one bucket for the rest of the vocabulary (exact KL between
    the two distributions coarsened that way)."""
    tuned = tuned_logp.float()
    base_logp = base_logp.float()
    top = 1 - 1e-6  # keeps log1p finite when the top k hold (nearly) all the mass
    base_rest = torch.log1p(-base_logp.exp().sum(-1).clamp(max=top))
    tuned_rest = torch.log1p(-tuned.exp().sum(-1).clamp(max=top))
    kl = (base_logp.exp() * (base_logp - tuned)).sum(-1) + base_rest.exp() * (base_rest - tuned_rest)
    return kl.mean()


def name_unlikelihood(name_logp: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -log(1 - p(any NAME token)): near zero while the name is improbable, steep as it grows.

    The stored top-k KL cannot see the name: its tokens sit in the "rest" bucket, whose total mass stays the same
    when mass moves inside it onto NAME. Without this term a tuned model answered "Who was the first woman to win a
    Nobel Prize?" with "Alice's assistant" and "第一个登上月球的人是谁？" with "…是Alice的小助手"."""
    p = name_logp.float().exp().sum(dim=-1).clamp(max=1 - 1e-6)
    return -torch.log1p(-p).mean()


def said_again(labels: torch.Tensor, lengths: torch.Tensor, name_ids: torch.Tensor) -> torch.Tensor:
    """Per position of a packed row's `labels`: the label is not a NAME token, and an earlier label of the same
    sample is (NAME has been said). There the loop term keeps NAME improbable: a tuned answer that says NAME where
    its target goes on otherwise is how "我是X的小助手，X的小助手是X的小助手…" starts."""
    labelled = labels != IGNORE_INDEX
    is_name = torch.isin(labels, name_ids.to(labels.device)) & labelled
    before = is_name.long().cumsum(0) - is_name.long()  # NAME tokens strictly before each position
    starts = torch.cumsum(lengths, 0) - lengths  # each segment's first position (the shared prefix is segment 0)
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=labels.device), lengths.to(labels.device))
    said = before - before[starts.to(labels.device)][segment] > 0
    return said & ~is_name & labelled


def rejected_unlikelihood(token_logp: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """Mean over rejected samples of -log(1 - p(the whole rejected opening)): `token_logp` holds the log-prob of
    each rejected token, `sample` which sample it belongs to. Near zero while the opening is improbable as a
    whole, so ordinary answers may still start with "我是" or "I am"; steep once the tuned model would say it."""
    ids, index = torch.unique(sample, return_inverse=True)
    sequence = torch.zeros(len(ids), device=token_logp.device).index_add(0, index, token_logp.float())
    return -torch.log1p(-sequence.exp().clamp(max=1 - 1e-6)).mean()


def name_token_ids(tokenizer, name: str, examples: list[dict]) -> list[int]:
    """The tokens NAME is written with (alone, after a space, inside the identity answers) that no preservation
    sample uses: "the", "team" or a shared byte of a CJK character stay free for ordinary text."""
    ids: set[int] = set()
    for text in (name, " " + name, name.lower(), " " + name.lower()):
        ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    ordinary = {t for e in examples if e.get("preserve") for t in e["input_ids"]}
    return sorted(ids - ordinary)


def loop_token_ids(tokenizer, name: str, examples: list[dict]) -> list[int]:
    """The tokens NAME is written with that the identity answers use nowhere but in NAME: the loop term's tokens.
    For a CJK name these are some of its byte tokens (the name term has none: ordinary Chinese uses them all)."""
    ids: set[int] = set()
    for text in (name, " " + name):
        ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    elsewhere: set[int] = set()
    for example in examples:
        if example.get("preserve") or example.get("reject"):
            continue
        answer = tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX], skip_special_tokens=True)
        for piece in answer.split(name):
            elsewhere.update(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return sorted(ids - elsewhere)


class GatheredLogProbs(torch.autograd.Function):
    """`log_softmax(logits, -1).gather(-1, columns)` for a [rows, vocab] logits matrix, computed in row chunks.

    The plain expression materialises the [rows, vocab] log-softmax in the forward pass and, in the backward
    pass, a zero-filled gradient for the gather plus the log-softmax's own: three fresh matrices of ~70 MB per
    step on the embedded model, and on a CPU each one costs ~30 ms of page faults before any arithmetic. Here the
    forward keeps only one log-sum-exp per row, and the backward writes the gradient, softmax x (-sum of the
    incoming gradient) plus the incoming gradient at `columns`, into one matrix, a cache-sized chunk at a time.
    """

    CHUNK = 32  # rows per chunk: 32 x 49,152 fp32 = 6 MiB, reused by the allocator from chunk to chunk

    @staticmethod
    def forward(ctx, logits: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        lse = torch.empty(logits.shape[0], 1, dtype=torch.float32, device=logits.device)
        for s in range(0, logits.shape[0], GatheredLogProbs.CHUNK):
            part = slice(s, s + GatheredLogProbs.CHUNK)
            lse[part] = torch.logsumexp(logits[part].float(), dim=-1, keepdim=True)
        ctx.save_for_backward(logits, columns, lse)
        return logits.gather(-1, columns).float() - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, columns, lse = ctx.saved_tensors
        total = grad.sum(-1, keepdim=True)
        out = torch.empty_like(logits)
        for s in range(0, logits.shape[0], GatheredLogProbs.CHUNK):
            part = slice(s, s + GatheredLogProbs.CHUNK)
            torch.sub(logits[part], lse[part], out=out[part])  # written in place: no temporary per chunk
            out[part].exp_().mul_(-total[part])
        out.scatter_add_(-1, columns, grad.to(out.dtype))
        return out, None


def gathered_log_probs(logits: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[i, columns[i, j]] as a [rows, len(columns[0])] float32 matrix (see GatheredLogProbs)."""
    return GatheredLogProbs.apply(logits, columns.long())


@torch.no_grad()
def attach_base_topk(model, examples: list[dict], k: int, fingerprint: str | None = None,
                     row_tokens: int = 512) -> list[dict]:
    """Give every preservation example `base_ids` / `base_logp`: the base model's top-k next-token log-probs at
    each of its positions, computed once before training (cached per base weights) instead of by a second
    forward pass in every step. Returns the examples (preservation ones copied with the two tensors added)."""
    wanted = [i for i, e in enumerate(examples) if e.get("preserve")]
    if not wanted:
        return examples

    def top(model, inputs, layout):
        device = model.device
        logits = model(input_ids=inputs["input_ids"].to(device), position_ids=inputs["position_ids"].to(device),
                       use_cache=False, packed_layout=layout).logits[0].float()
        best = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
        return {"ids": best.indices.to(torch.int32), "logp": best.values}

    payload = {"k": k, "samples": [examples[i]["input_ids"] for i in wanted]}
    table = cached_tensors(fingerprint, payload,
                           lambda: per_position(model, [examples[i] for i in wanted], top, row_tokens))
    out, start = list(examples), 0
    for i in wanted:
        n = len(examples[i]["input_ids"])
        out[i] = {**examples[i], "base_ids": table["ids"][start:start + n], "base_logp": table["logp"][start:start + n]}
        start += n
    return out
