"""Continuous batching: many requests decode together, one forward pass per step for all of them.

A request joins the running batch at a step boundary: its prompt is prefilled alone (exactly as the single
stream does it), and its KV cache rows are appended to the batch's cache, left-padded to a common length; the
attention mask hides the padding and each row gets its own position ids. A request that finishes (a stop
token, its `max_tokens`, its client gone) leaves the batch at the next step, and columns that only padding
still fills are dropped. Each row keeps its own sampling settings and samples with the one sampler of
`selfcog.streaming` (transformers' logits processors); requests for different PEFT adapters share a batch
through peft's `adapter_names`.

transformers' `ContinuousBatchingManager` does per-request temperature, top-k and top-p only (no repetition
penalty, no PEFT adapter per request), so this loop runs the model's forward with a `DynamicCache` instead,
through public APIs only.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from selfcog.errors import SelfcogError
from selfcog.generate import PREFILL_TOKENS, join_caches, keep_rows, pad_left
from selfcog.streaming import (Reply, accepts, batchable, cache_keyword, end_of_turn_ids, logits_processors,
                               next_token, returned_cache)
from selfcog.templates import shared_prefix

BASE_ADAPTER = "__base__"
"""peft's name for "no adapter" in `adapter_names`."""

DONE = object()
"""Pushed to a request after its last text piece."""


@dataclass
class Request:
    """One generation. The engine calls `push` (from its thread) with text pieces, then `DONE` or an exception."""

    ids: list[int]
    args: object
    """Sampling settings: `temperature`, `top_p`, `top_k`, `repetition_penalty`."""
    max_new_tokens: int
    push: Callable[[object], None]
    stop: threading.Event = field(default_factory=threading.Event)
    info: dict = field(default_factory=dict)
    seed: int | None = None
    adapter: str | None = None
    """A PEFT adapter name of the engine's model, `BASE_ADAPTER`, or None (a model without adapters)."""


class Row:
    """A request while it is in the batch."""

    def __init__(self, request: Request, reply: Reply, processors, device):
        self.request, self.reply, self.processors = request, reply, processors
        self.sequence = torch.tensor([request.ids], device=device)
        self.generator = None
        if request.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(request.seed)

    @property
    def length(self) -> int:
        return self.sequence.shape[1]

    def sample(self, logits: torch.Tensor) -> int:
        token = next_token(self.processors, self.sequence, logits, self.request.args.temperature, self.generator)
        self.sequence = torch.cat([self.sequence, token], dim=1)
        return int(token)


class BatchEngine:
    """The model and the one thread that decodes every running request, up to `max_batch` at a time.

    `submit` queues a request (503-style `SelfcogError` from `Overloaded` when `max_queue` are already in);
    `stats` counts completed, cancelled, failed and skipped (cancelled before they started) requests.
    """

    def __init__(self, model, tokenizer, max_batch: int = 32, max_queue: int = 64):
        if not batchable(model):
            raise SelfcogError("this model's attention layers keep sliding-window or recurrent state; "
                               "serve it with --no-batching")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max(1, max_batch), max_queue
        self.stop_ids = end_of_turn_ids(tokenizer)
        self.min_new = getattr(getattr(model, "generation_config", None), "min_new_tokens", None) or 0
        self.keyword = cache_keyword(model)
        self.logits_to_keep = accepts(model, "logits_to_keep")
        self.prefix = shared_prefix(tokenizer)
        self.prefixes: dict[str | None, list] = {}
        self.pending: deque[Request] = deque()
        self.condition = threading.Condition()
        self.thread: threading.Thread | None = None
        self.closed = False
        self.rows: list[Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "skipped": 0, "steps": 0, "largest_batch": 0,
                      "largest_prefill": 0, "prefix_reused": 0}

    # ------------------------------------------------------------------------------------------ interface

    @property
    def waiting(self) -> int:
        """Requests queued or running."""
        return len(self.pending) + len(self.rows)

    def submit(self, request: Request) -> None:
        with self.condition:
            if self.waiting >= self.max_queue:
                raise Overloaded(self.waiting)
            self.pending.append(request)
            if self.thread is None or not self.thread.is_alive():
                self.closed = False
                self.thread = threading.Thread(target=self.run, name="selfcog-batch-engine", daemon=True)
                self.thread.start()
            self.condition.notify()

    def close(self, timeout: float = 10) -> None:
        """Fail what is still queued or running, and end the thread."""
        with self.condition:
            self.closed = True
            self.condition.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def stream(self, ids: list[int], args, max_new_tokens: int, stop: threading.Event | None = None,
               info: dict | None = None, seed: int | None = None, adapter: str | None = None):
        """The reply's text pieces for a caller in another thread (a blocking iterator)."""
        out: queue.Queue = queue.Queue()
        request = Request(ids, args, max_new_tokens, out.put, stop or threading.Event(),
                          info if info is not None else {}, seed, adapter)
        self.submit(request)
        try:
            while (item := out.get()) is not DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.stop.set()

    # ------------------------------------------------------------------------------------------ the loop

    def run(self) -> None:
        while True:
            with self.condition:
                while not self.pending and not self.rows and not self.closed:
                    self.condition.wait()
                if self.closed:
                    self.fail_all(SelfcogError("the server is shutting down"))
                    return
                joining = []
                while self.pending and len(self.rows) + len(joining) < self.max_batch:
                    joining.append(self.pending.popleft())
            try:
                with torch.inference_mode():
                    self.admit(joining)
                    self.drop_finished()
                    if self.rows:
                        self.step()
                        self.drop_finished()
            except Exception as exc:  # noqa: BLE001 - reported to every request in the batch
                self.fail_all(exc)

    def admit(self, requests: list[Request]) -> None:
        """Prefill the joining requests (together, left-padded, up to `PREFILL_TOKENS` prompt tokens a forward),
        sample each one's first token, and append their caches to the batch's."""
        rows = []
        for request in requests:
            if request.stop.is_set():  # its client left while it waited
                self.stats["skipped"] += 1
                request.info.update(prompt_tokens=len(request.ids), completion_tokens=0, finish_reason="cancelled")
                request.push(DONE)
                continue
            reply = Reply(self.tokenizer, len(request.ids), request.max_new_tokens, self.stop_ids, request.info)
            processors = logits_processors(request.args, self.stop_ids, len(request.ids), self.min_new)
            rows.append(Row(request, reply, processors, self.model.device))
        rows.sort(key=lambda row: row.length)  # similar lengths together: little padding
        group: list[Row] = []
        for row in rows + [None]:
            if group and (row is None or (len(group) + 1) * max(group[-1].length, row.length) > PREFILL_TOKENS):
                self.prefill(group)
                group = []
            if row is not None:
                group.append(row)

    def prefill(self, rows: list[Row]) -> None:
        """One forward over the rows' prompts. Rows whose prompt starts with the chat template's shared prefix
        (its default system prompt and the user turn's header) start from that prefix's cached keys and values."""
        shared = self.prefix is not None and all(
            row.length > len(self.prefix) and row.request.ids[:len(self.prefix)] == self.prefix for row in rows)
        skip = len(self.prefix) if shared else 0
        width = max(row.length for row in rows) - skip
        device = self.model.device
        self.stats["largest_prefill"] = max(self.stats["largest_prefill"], len(rows))
        ids = torch.cat([pad_left(row.sequence[:, skip:], width, 1) for row in rows])
        mask = torch.cat([pad_left(torch.ones_like(row.sequence[:, skip:]), width, 1) for row in rows])
        inputs = {"input_ids": ids}
        try:
            cache = None
            if shared:
                self.stats["prefix_reused"] += len(rows)
                cache = self.prefix_cache(rows)
                mask = torch.cat([mask.new_ones((len(rows), skip)), mask], dim=1)
            if not bool(mask.all()):  # a request alone (or equal lengths) runs exactly as the single stream does
                positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, skip:]
                inputs.update(attention_mask=mask, position_ids=positions.to(device))
            out = self.model(**inputs, use_cache=True, **{self.keyword: cache}, **self.extra(rows))
            logits = out.logits[:, -1, :]
            for i, row in enumerate(rows):
                self.emit(row, row.sample(logits[i:i + 1]))
        except Exception as exc:  # noqa: BLE001 - these requests alone failed
            for row in rows:
                self.stats["failed"] += 1
                row.request.push(exc)
            return
        self.join(rows, returned_cache(out), mask)

    def prefix_cache(self, rows: list[Row]):
        """A cache holding the shared prefix once per row, for each row's adapter (computed once per adapter)."""
        from transformers import DynamicCache

        for adapter in {row.request.adapter for row in rows} - set(self.prefixes):
            probe = Row(Request(self.prefix, None, 1, print, adapter=adapter), None, None, self.model.device)
            out = self.model(input_ids=probe.sequence, use_cache=True, **{self.keyword: None}, **self.extra([probe]))
            self.prefixes[adapter] = [(layer[0], layer[1]) for layer in returned_cache(out)]
        per_row = [self.prefixes[row.request.adapter] for row in rows]
        return DynamicCache(ddp_cache_data=[(torch.cat([kv[i][0] for kv in per_row]),
                                             torch.cat([kv[i][1] for kv in per_row]))
                                            for i in range(len(per_row[0]))])

    def extra(self, rows: list[Row]) -> dict:
        kwargs = {"logits_to_keep": 1} if self.logits_to_keep else {}
        if any(row.request.adapter is not None for row in rows):
            kwargs["adapter_names"] = [row.request.adapter or BASE_ADAPTER for row in rows]
        return kwargs

    def step(self) -> None:
        """One forward pass over every row's newest token."""
        rows = self.rows
        inputs = {"input_ids": torch.cat([row.sequence[:, -1:] for row in rows])}
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(rows), 1))], dim=1)
        if not bool(self.mask.all()):  # without padding (a request alone) it runs as the single stream does
            # A row's newest token is not in the cache yet: its position is the number of tokens before it.
            inputs.update(attention_mask=self.mask, position_ids=torch.tensor([[row.length - 1] for row in rows],
                                                                              device=self.mask.device))
        out = self.model(**inputs, use_cache=True, **{self.keyword: self.cache}, **self.extra(rows))
        self.cache = returned_cache(out)
        logits = out.logits[:, -1, :]
        for i, row in enumerate(rows):
            self.emit(row, row.sample(logits[i:i + 1]))
        self.stats["steps"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))

    def emit(self, row: Row, token: int) -> None:
        piece = row.reply.push(token)
        if piece:
            row.request.push(piece)

    # ------------------------------------------------------------------------------------------ the cache

    def join(self, rows: list[Row], cache, mask: torch.Tensor) -> None:
        """Append the new rows' cache and mask to the batch's, both left-padded to one width."""
        if self.cache is None:
            self.cache, self.mask, self.rows = cache, mask, self.rows + rows
            return
        self.cache, self.mask = join_caches([self.cache, cache], [self.mask, mask])
        self.rows = self.rows + rows

    def drop_finished(self) -> None:
        """Finish rows that ended or were cancelled, and take them out of the batch."""
        keep = []
        for i, row in enumerate(self.rows):
            cancelled = row.request.stop.is_set()
            if not (row.reply.ended or cancelled):
                keep.append(i)
                continue
            tail = row.reply.close(cancelled and not row.reply.ended)
            if tail:
                row.request.push(tail)
            self.stats["cancelled" if row.request.info["finish_reason"] == "cancelled" else "completed"] += 1
            row.request.push(DONE)
        if len(keep) == len(self.rows):
            return
        with self.condition:
            self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
            return
        self.cache, self.mask = keep_rows(self.cache, self.mask, torch.tensor(keep, device=self.mask.device))

    def fail_all(self, exc: BaseException) -> None:
        with self.condition:
            requests = [row.request for row in self.rows] + list(self.pending)
            self.rows, self.cache, self.mask = [], None, None
            self.pending.clear()
        for request in requests:
            self.stats["failed"] += 1
            request.push(exc)


class Overloaded(SelfcogError):
    def __init__(self, waiting: int):
        super().__init__(f"server is busy ({waiting} requests waiting); retry later")
