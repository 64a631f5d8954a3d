"""The streaming decoder: token by token over the model's KV cache, whole characters out.

This module imports only torch and transformers, so `selfcog deploy` copies it unchanged next to the deployed
app, and the app generates exactly as `selfcog chat`, `selfcog web` and `selfcog serve` do.
"""

from __future__ import annotations

import inspect
import threading
from typing import Iterator

import torch

# End-of-turn markers used by common chat templates; generation stops on whichever the vocab has.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def end_of_turn_ids(tokenizer) -> list[int]:
    """EOS plus the template's end-of-turn token(s): generation stops on any of them."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    # Token by token rather than through get_vocab(), which builds the whole vocabulary dict (~0.1 s a call).
    # An unknown token maps to the unk id, which maps back to another token.
    for token in END_OF_TURN_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and tokenizer.convert_ids_to_tokens(token_id) == token and token_id not in ids:
            ids.append(token_id)
    return ids


class Detokenizer:
    """Turns token ids, one step at a time, into text pieces made of whole characters only.

    Incremental detokenization: each step decodes a short window of recent ids with and without the newest
    ones and returns the difference, so leading spaces and merges come out exactly as in a full decode. A
    piece ending in U+FFFD (a multi-byte character still incomplete) is held back until it completes.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self.emit(final=False)

    def flush(self) -> str:
        return self.emit(final=True)

    def emit(self, final: bool) -> str:
        before = self.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.decode(self.ids[self.prefix_offset:])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(before):]


class Reply:
    """One answer's accounting: token ids in, text pieces out, and `info` kept current.

    `info` holds `prompt_tokens`, `completion_tokens` and, once closed, `finish_reason` ("stop" after a stop
    token, "length" at `max_new_tokens`, "cancelled" otherwise).
    """

    def __init__(self, tokenizer, prompt_tokens: int, max_new_tokens: int, stop_ids: list[int],
                 info: dict | None = None):
        self.text = Detokenizer(tokenizer)
        self.stop_ids, self.max_new_tokens = set(stop_ids), max_new_tokens
        self.info = info if info is not None else {}
        self.info.update(prompt_tokens=prompt_tokens, completion_tokens=0, finish_reason=None)
        self.ended = False

    def push(self, token: int) -> str:
        """The text this token completes ("" while a character is incomplete, or for a stop token)."""
        self.info["completion_tokens"] += 1
        if token in self.stop_ids:
            self.info["finish_reason"] = "stop"
            self.ended = True
            return ""
        self.ended = self.info["completion_tokens"] >= self.max_new_tokens
        return self.text.push(token)

    def close(self, cancelled: bool) -> str:
        """Settle `finish_reason`; the held-back tail of the text, or "" when cancelled."""
        if self.info["finish_reason"] is None:
            done = not cancelled and self.info["completion_tokens"] >= self.max_new_tokens
            self.info["finish_reason"] = "length" if done else "cancelled"
        return "" if cancelled else self.text.flush()


def logits_processors(args, stop_ids: list[int], prompt_length: int, min_new_tokens: int):
    """transformers' own processors, in the order `generate` applies them for these options.

    `args` has `temperature`, `top_p`, `top_k` and `repetition_penalty`."""
    from transformers import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor,
                              RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    processors = LogitsProcessorList()
    if min_new_tokens > 0:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, min_new_tokens, stop_ids))
    if args.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(args.repetition_penalty))
    if args.temperature > 0:
        if args.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(args.temperature))
        if args.top_k:
            processors.append(TopKLogitsWarper(args.top_k))
        if args.top_p < 1.0:
            processors.append(TopPLogitsWarper(args.top_p))
    return processors


def next_token(processors, sequence: torch.Tensor, logits: torch.Tensor, temperature: float,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """The one sampler: the next token ([1, 1]) after `sequence` ([1, n]) from its last logits ([1, vocab])."""
    scores = processors(sequence, logits.float())
    if temperature > 0:
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=generator)
    return scores.argmax(dim=-1, keepdim=True)


def base_model(model):
    """A PEFT model's underlying transformers model; any other model itself."""
    return model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model


def batchable(model) -> bool:
    """Whether every layer keeps a plain full-length KV cache (no sliding windows, no recurrent state): the
    engine left-pads and concatenates caches, which needs that."""
    config = base_model(model).config
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    return kinds == {"full_attention"} and not getattr(config, "sliding_window", None)


def accepts(model, argument: str) -> bool:
    """Whether the model's forward (a PEFT model's: its base model's) takes `argument`."""
    return argument in inspect.signature(base_model(model).forward).parameters


def cache_keyword(model) -> str:
    """The forward keyword of the KV cache: `cache` in current transformers, `past_key_values` (deprecated there,
    removed in 5.40) in older releases and in hub models' own code. A PEFT model answers for its base model, and
    a subclass whose `forward(*args, **kwargs)` passes everything on answers for the class it extends."""
    for cls in type(base_model(model)).__mro__:
        forward = cls.__dict__.get("forward")
        if forward is None:
            continue
        parameters = inspect.signature(forward).parameters
        if "cache" in parameters:
            return "cache"
        if "past_key_values" in parameters:
            return "past_key_values"
    return "cache"


def returned_cache(out):
    """The KV cache a forward returned; outputs name it as the forward does."""
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


@torch.inference_mode()
def decode_tokens(model, ids: list[int], args, max_new_tokens: int, stop_ids: list[int], stop: threading.Event,
                  adapter: str | None = None, generator: torch.Generator | None = None) -> Iterator[int]:
    """The reply's token ids, one per forward pass over the newest token with the model's KV cache.

    The same steps as `model.generate` (greedy, or transformers' logits processors and multinomial
    sampling), run in the caller's thread. Stops after a stop token, at `max_new_tokens`, or when `stop` is
    set. `adapter` names the PEFT adapter to answer with (`"__base__"`: none) in a model holding several.
    """
    sequence = torch.tensor([ids], device=model.device)
    min_new = getattr(getattr(model, "generation_config", None), "min_new_tokens", None) or 0
    processors = logits_processors(args, stop_ids, len(ids), min_new)
    extra = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
    if adapter is not None:
        extra["adapter_names"] = [adapter]
    keyword = cache_keyword(model)
    inputs, cache = sequence, None
    for _ in range(max_new_tokens):
        if stop.is_set():
            return
        out = model(input_ids=inputs, use_cache=True, **{keyword: cache}, **extra)
        cache = returned_cache(out)
        token = next_token(processors, sequence, out.logits[:, -1, :], args.temperature, generator)
        sequence = torch.cat([sequence, token], dim=1)
        inputs = token
        token_id = int(token)
        yield token_id
        if token_id in stop_ids:
            return


def stream_ids(model, tokenizer, ids: list[int], args, max_new_tokens: int, stop: threading.Event | None = None,
               info: dict | None = None, adapter: str | None = None,
               generator: torch.Generator | None = None) -> Iterator[str]:
    """Yield the reply to prompt `ids` as text pieces of whole characters, as they are generated.

    Ends at EOS or the template's end-of-turn token, at `max_new_tokens`, or when `stop` is set; leaving the
    loop early (break, close, an exception) also stops it. `info` is filled as `Reply` describes.
    """
    stop = stop or threading.Event()
    stops = end_of_turn_ids(tokenizer)
    reply = Reply(tokenizer, len(ids), max_new_tokens, stops, info)
    cancelled = True
    try:
        for token in decode_tokens(model, ids, args, max_new_tokens, stops, stop, adapter, generator):
            piece = reply.push(token)
            if piece:
                yield piece
        cancelled = stop.is_set()
    finally:
        tail = reply.close(cancelled)
    if tail:
        yield tail
