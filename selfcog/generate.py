"""Generation: batched greedy answers for evaluation, and the one streaming generator for every surface.

Only public transformers APIs: `model.generate` for batches; the streaming generator (`selfcog.streaming`) runs
the model's forward with its KV cache and transformers' logits processors, step by step in the caller's thread.
`selfcog.batching` runs many streams at once with the same sampler.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from selfcog.errors import SelfcogError
from selfcog.streaming import accepts, batchable, cache_keyword, end_of_turn_ids, returned_cache, stream_ids
from selfcog.templates import encode_prompt, shared_prefix

PREFILL_TOKENS = 2048
"""Most (padded) prompt tokens in one prefill forward, for batched evaluation and the serving engine alike."""


@dataclass
class SamplingArgs:
    max_new_tokens: int = 512
    """Most tokens in one answer."""
    max_length: int = 4096
    """Most tokens of prompt plus answer; older history is dropped first to fit."""
    temperature: float = 0.7
    """0 means greedy decoding."""
    top_p: float = 0.9
    """Nucleus sampling mass."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 disables."""
    repetition_penalty: float = 1.0
    """>1 discourages repeating tokens."""

    def check(self) -> "SamplingArgs":
        """Raise SelfcogError naming the first out-of-range value; return self."""
        problems = [
            (self.max_new_tokens >= 1, f"max new tokens must be >= 1 (got {self.max_new_tokens})"),
            (self.max_length >= 2, f"max length must be >= 2 (got {self.max_length})"),
            (self.temperature >= 0, f"temperature must be >= 0 (got {self.temperature})"),
            (0 < self.top_p <= 1, f"top-p must be in (0, 1] (got {self.top_p})"),
            (self.top_k >= 0, f"top-k must be >= 0 (got {self.top_k})"),
            (self.repetition_penalty > 0, f"repetition penalty must be > 0 (got {self.repetition_penalty})"),
        ]
        for ok, message in problems:
            if not ok:
                raise SelfcogError(message)
        return self


def generation_kwargs(tokenizer, args: SamplingArgs) -> dict:
    kwargs = dict(max_new_tokens=args.max_new_tokens, eos_token_id=end_of_turn_ids(tokenizer),
                  pad_token_id=tokenizer.pad_token_id, repetition_penalty=args.repetition_penalty)
    if args.temperature <= 0:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        # top_k=0 switches top-k off explicitly (None would fall back to a model's generation_config).
        kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    return kwargs


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding keeps every prompt's last token at the end, so a batch generates together."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def length_groups(indices: list[int], width, max_tokens: int, max_rows: int) -> list[list[int]]:
    """`indices` sorted by `width(i)` and cut into groups of at most `max_rows` whose padded size (rows x widest)
    stays within `max_tokens` (a group holds at least one)."""
    groups: list[list[int]] = []
    for i in sorted(indices, key=width):
        group = groups[-1] if groups else None
        if group is None or len(group) >= max_rows or (len(group) + 1) * max(width(group[-1]), width(i)) > max_tokens:
            groups.append([i])
        else:
            group.append(i)
    return groups


def pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`tensor` zero-padded on the left of `dim` to `width`."""
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim % tensor.dim()) + [missing, 0]
    return F.pad(tensor, pad)


GENERATE_ONLY = ("min_new_tokens", "min_length", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
                 "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id", "sequence_bias")
"""Generation-config fields that make `model.generate` change logits before its argmax."""


def joinable(model) -> bool:
    """Whether greedy answers can be decoded together from joined caches (`decode_joined`): a plain full-attention
    model whose forward takes transformers' `cache` keyword, and whose generation config changes no logits (hub
    code with its own cache handling, sliding windows or such settings go through `model.generate`)."""
    config = getattr(model, "generation_config", None)
    changes_logits = any(getattr(config, key, None) for key in GENERATE_ONLY) or \
        getattr(config, "repetition_penalty", None) not in (None, 1.0)
    return cache_keyword(model) == "cache" and batchable(model) and not changes_logits


def last_logits_only(model) -> dict:
    """`logits_to_keep=1` where the forward takes it: a prompt's other positions need no vocabulary projection."""
    return {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}


def join_caches(caches: list, masks: list[torch.Tensor]):
    """One `DynamicCache` and attention mask for the rows of several, each left-padded to the widest."""
    from transformers import DynamicCache

    width = max(mask.shape[1] for mask in masks)
    layers = [(torch.cat([pad_left(layer[0], width, 2) for layer in group]),
               torch.cat([pad_left(layer[1], width, 2) for layer in group])) for group in zip(*caches)]
    return DynamicCache(ddp_cache_data=layers), torch.cat([pad_left(mask, width, 1) for mask in masks])


def prefix_states(model, prefix: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The keys and values of `prefix` alone, per layer (empty for no prefix)."""
    if not prefix:
        return []
    out = model(input_ids=torch.tensor([prefix], device=model.device), use_cache=True, cache=None)
    return [(layer[0], layer[1]) for layer in returned_cache(out)]


def prefill_group(model, prompts: list[list[int]], prefix: list[int], states: list, shares: list[bool],
                  extra: dict):
    """One forward over the prompts of a group, after the shared `prefix` (its `states` copied to every row): rows
    that start with it go on from there, the others mask it out and hold their whole prompt after it. Position ids are
    counted over each row's own tokens, as `generate` counts them. Returns (cache, mask, the greedy first tokens)."""
    from transformers import DynamicCache

    rests = [p[len(prefix):] if share else p for p, share in zip(prompts, shares)]
    ids, mask = left_pad(rests, 0, model.device)
    cache = None
    if prefix:
        rows = len(prompts)
        cache = DynamicCache(ddp_cache_data=[(k.repeat(rows, 1, 1, 1), v.repeat(rows, 1, 1, 1)) for k, v in states])
        mask = torch.cat([mask.new_tensor([[int(share)] * len(prefix) for share in shares]), mask], dim=1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -ids.shape[1]:]
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, cache=cache, **extra)
    return returned_cache(out), mask, out.logits[:, -1, :].argmax(dim=-1)


def keep_rows(cache, mask: torch.Tensor, keep: torch.Tensor):
    """The batch's cache and mask with only the `keep` rows, less the leading columns only padding still fills."""
    from transformers import DynamicCache

    cache.batch_select_indices(keep)
    mask = mask[keep]
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if len(used) else 0
    if start == 0:
        return cache, mask
    return DynamicCache(ddp_cache_data=[(layer[0][:, :, start:], layer[1][:, :, start:]) for layer in cache]), \
        mask[:, start:]


@torch.inference_mode()
def decode_joined(model, prompts: list[list[int]], prefix: list[int], max_new_tokens: list[int], stop_ids: list[int],
                  prefill_tokens: int) -> list[list[int]]:
    """Greedy token ids (stop token included) for many prompts decoded as one batch: prefilled in groups of similar
    length (padding costs compute there), then joined, so each step streams the weights once for every row; rows
    that end (a stop token, or their own `max_new_tokens`) leave the batch."""
    shares = [bool(prefix) and len(p) > len(prefix) and p[:len(prefix)] == prefix for p in prompts]
    width = [len(p) - len(prefix) if share else len(p) for p, share in zip(prompts, shares)]
    groups = length_groups(list(range(len(prompts))), width.__getitem__, prefill_tokens, len(prompts))
    states, extra = prefix_states(model, prefix), last_logits_only(model)
    caches, masks, firsts, order = [], [], [], []
    for group in groups:
        cache, mask, first = prefill_group(model, [prompts[i] for i in group], prefix, states,
                                           [shares[i] for i in group], extra)
        caches.append(cache), masks.append(mask), firsts.append(first), order.extend(group)
    cache, mask = join_caches(caches, masks) if len(caches) > 1 else (caches[0], masks[0])
    tokens = torch.cat(firsts)
    answers: dict[int, list[int]] = {i: [] for i in order}
    live = list(order)
    stops = torch.tensor(stop_ids, device=tokens.device)
    limits = torch.tensor([max_new_tokens[i] for i in order], device=tokens.device)
    for step in range(max(max_new_tokens)):
        for i, token in zip(live, tokens.tolist()):
            answers[i].append(token)
        ended = torch.isin(tokens, stops) | (limits <= step + 1)
        if bool(ended.all()):
            break
        if bool(ended.any()):
            keep = (~ended).nonzero().flatten()
            cache, mask = keep_rows(cache, mask, keep)
            tokens, live, limits = tokens[keep], [live[k] for k in keep.tolist()], limits[keep]
        positions = mask.sum(dim=-1, keepdim=True)  # the new token follows each row's own tokens
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, use_cache=True, cache=cache,
                    **extra)
        cache = returned_cache(out)
        tokens = out.logits[:, -1, :].argmax(dim=-1)
    return [answers[i] for i in range(len(prompts))]


@torch.inference_mode()
def generate_batch(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int | list[int] = 64,
                   max_rows: int = 128, prefill_tokens: int = PREFILL_TOKENS) -> list[str]:
    """Greedy answers to many conversations, batched; answers come back in input order. `max_new_tokens` is one
    length cap for every answer or one per conversation (an answer that ends sooner costs nothing more).

    Decoding on a CPU streams every weight once per step whatever the rows, so rows decode together: up to
    `max_rows` at once, prefilled in groups of at most `prefill_tokens` padded prompt tokens, every row from one
    computed cache of the template's shared prefix (`decode_joined`). Models it cannot join (`joinable`) answer
    through `model.generate` in groups of the same size. The 347 test questions on the embedded model (2-core CPU):
    48 s, against 73 s in left-padded batches of 32 and 200 s through transformers' continuous batching, with the
    same answers (`bench/batch_answers.py`).
    """
    prompts = [encode_prompt(tokenizer, c) for c in conversations]
    caps = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(caps) != len(prompts) or min(caps, default=1) < 1:
        raise ValueError("max_new_tokens needs one cap of at least 1 per conversation")
    stop_ids = end_of_turn_ids(tokenizer)
    join = joinable(model)
    prefix = (shared_prefix(tokenizer) or []) if join else []
    by_index: dict[int, list[int] | torch.Tensor] = {}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for wave in (order[start:start + max_rows] for start in range(0, len(order), max_rows)):
        if join:
            for i, ids in zip(wave, decode_joined(model, [prompts[i] for i in wave], prefix, [caps[i] for i in wave],
                                                  stop_ids, prefill_tokens)):
                by_index[i] = ids
            continue
        for chunk in length_groups(wave, lambda i: len(prompts[i]), prefill_tokens, max_rows):
            ids, mask = left_pad([prompts[i] for i in chunk], tokenizer.pad_token_id, model.device)
            longest = max(caps[i] for i in chunk)
            out = model.generate(input_ids=ids, attention_mask=mask,
                                 **generation_kwargs(tokenizer, SamplingArgs(max_new_tokens=longest, temperature=0)))
            # Greedy tokens do not depend on the cap: a row's first caps[i] tokens are its answer at that cap.
            by_index.update((i, row[ids.shape[1]:ids.shape[1] + caps[i]]) for i, row in zip(chunk, out))
    return [tokenizer.decode(by_index[i], skip_special_tokens=True).strip() for i in range(len(prompts))]


def context_limit(model) -> int | None:
    """The model's position limit (`max_position_embeddings`), when its config states one."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) if config is not None else None
    return limit if isinstance(limit, int) and limit > 1 else None


def fit_history(tokenizer, messages: list[dict], args: SamplingArgs, budget: int | None = None) -> list[int]:
    """Prompt ids for `messages`, dropping the oldest turns (never the system prompt) to fit `budget` tokens.

    `budget` defaults to `max_length - max_new_tokens`. Turns go oldest first, and the kept history always
    starts at a user turn; a last message longer than the budget alone is cut from the left.
    """
    if budget is None:
        budget = args.max_length - args.max_new_tokens
    budget = max(1, budget)
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while True:
        ids = encode_prompt(tokenizer, system + turns)
        if len(ids) <= budget or len(turns) <= 1:
            return ids[-budget:]
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":
            turns = turns[1:]


class ContextLengthExceeded(SelfcogError):
    """The conversation alone fills the context: no room is left for an answer."""


def plan_prompt(model, tokenizer, messages: list[dict], args: SamplingArgs, trim: bool = True) -> tuple[list[int], int]:
    """`(prompt ids, max new tokens)` so that prompt plus answer fit `max_length` and the model's context.

    With `trim`, the oldest history is dropped to fit, and the answer keeps room for `max_new_tokens` but never
    more than half of the length, so a small `max_length` still leaves the latest question in the prompt.
    Without it the whole conversation is kept, the answer gets what room is left, and a conversation that leaves
    none raises `ContextLengthExceeded`.
    """
    if not messages:
        raise SelfcogError("no messages to answer")
    limit = args.max_length
    context = context_limit(model)
    if context:
        limit = min(limit, context)
    limit = max(2, limit)
    if not trim:
        ids = encode_prompt(tokenizer, messages)
        if len(ids) >= limit:
            raise ContextLengthExceeded(f"the messages take {len(ids)} tokens; this model answers within {limit} "
                                        "tokens of prompt plus answer")
        return ids, min(args.max_new_tokens, limit - len(ids))
    reserve = max(1, min(args.max_new_tokens, limit // 2))
    ids = fit_history(tokenizer, messages, args, budget=limit - reserve)
    return ids, max(1, min(args.max_new_tokens, limit - len(ids)))


def stream_chat(model, tokenizer, messages: list[dict], args: SamplingArgs | None = None,
                stop: threading.Event | None = None, info: dict | None = None, adapter: str | None = None,
                generator: torch.Generator | None = None) -> Iterator[str]:
    """Yield the assistant's reply to `messages` as text pieces, as they are generated.

    Pieces hold only whole characters. Generation ends at EOS or the template's end-of-turn token, at
    `max_new_tokens`, or when `stop` is set (a closed browser tab, a disconnected API client); leaving
    the loop early (break, close, an exception) also stops it. `info`, when given, is filled with
    `prompt_tokens`, `completion_tokens` and `finish_reason` ("stop", "length" or "cancelled"). `adapter`
    picks one PEFT adapter of a model holding several (`"__base__"`: the base model).
    """
    args = args or SamplingArgs()
    ids, max_new_tokens = plan_prompt(model, tokenizer, messages, args)
    yield from stream_ids(model, tokenizer, ids, args, max_new_tokens, stop, info, adapter, generator)
