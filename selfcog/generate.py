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

from selfcog.errors import SelfcogError
from selfcog.streaming import end_of_turn_ids, stream_ids
from selfcog.templates import encode_prompt


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


@torch.inference_mode()
def generate_batch(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64,
                   batch_size: int = 32) -> list[str]:
    """Greedy answers to many conversations, batched (about 10x faster than one by one on a CPU)."""
    args = SamplingArgs(max_new_tokens=max_new_tokens, temperature=0)
    prompts = [encode_prompt(tokenizer, c) for c in conversations]
    # Sorting by length keeps padding small; answers go back in input order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    by_index = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = left_pad([prompts[i] for i in chunk], tokenizer.pad_token_id, model.device)
        out = model.generate(input_ids=ids, attention_mask=mask, **generation_kwargs(tokenizer, args))
        for i, row in zip(chunk, out[:, ids.shape[1]:]):
            by_index[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return [by_index[i] for i in range(len(prompts))]


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
