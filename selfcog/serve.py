"""An OpenAI-compatible chat API (FastAPI + uvicorn) over the one streaming generator.

`GET /v1/models`, `POST /v1/chat/completions` (plain JSON or `stream: true` server-sent events ending
`data: [DONE]`), errors shaped like OpenAI's `{"error": {"message", "type", "param", "code"}}`.
Requests decode together in one continuous batch (`selfcog.batching`), or one at a time in arrival order with
`batching=False`; a client that disconnects (or whose request was still queued) stops its own generation.
Several identities (LoRA adapters over one base model) are served side by side: a request's `model` picks one.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import queue
import socket
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from selfcog.batching import DONE, BatchEngine, Overloaded
from selfcog.chat import load_identities, parse_adapters
from selfcog.errors import SelfcogError
from selfcog.generate import ContextLengthExceeded, SamplingArgs, plan_prompt
from selfcog.hardware import cpu_has_native_bf16
from selfcog.streaming import stream_ids

LOOPBACK = ("127.0.0.1", "localhost", "::1")


# ---------------------------------------------------------------------------------------------- errors

class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# ---------------------------------------------------------------------------------------------- request

class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise APIError(400, f"content part of type {part.type!r} is not supported; send text",
                               param="messages")
        return "\n".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="accepted, ignored")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="accepted, ignored")
    # Extensions (as in vLLM): not in OpenAI's API.
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    trim_history: bool | None = Field(None, description="drop the oldest turns to fit the context")

    @field_validator("stop")
    @classmethod
    def check_stop(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 non-empty stop strings")
        return stops

    def sampling(self, defaults: SamplingArgs) -> SamplingArgs:
        pick = lambda value, default: default if value is None else value  # noqa: E731
        return SamplingArgs(
            max_new_tokens=self.max_completion_tokens or self.max_tokens or defaults.max_new_tokens,
            max_length=defaults.max_length,
            temperature=pick(self.temperature, defaults.temperature),
            top_p=pick(self.top_p, defaults.top_p),
            top_k=pick(self.top_k, defaults.top_k),
            repetition_penalty=pick(self.repetition_penalty, defaults.repetition_penalty))


# ---------------------------------------------------------------------------------------------- worker

class Job:
    """One request's generation: pieces flow from the generating thread into the request's event loop."""

    def __init__(self, ids: list[int], max_new_tokens: int, args: SamplingArgs, seed: int | None,
                 adapter: str | None = None):
        self.ids, self.max_new_tokens, self.args, self.seed, self.adapter = ids, max_new_tokens, args, seed, adapter
        self.stop = threading.Event()
        self.info: dict = {}
        self.loop = asyncio.get_running_loop()
        self.out: asyncio.Queue = asyncio.Queue()

    def push(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the request's event loop is gone: nobody is listening
            self.stop.set()

    async def pieces(self):
        """Text pieces until generation ends; re-raises a generation error."""
        while True:
            item = await self.out.get()
            if item is DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Worker:
    """One request at a time: the model and the one thread that runs it; jobs run in arrival order."""

    def __init__(self, model, tokenizer, max_queue: int):
        self.model, self.tokenizer, self.max_queue = model, tokenizer, max_queue
        self.jobs: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.waiting = 0
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "skipped": 0}

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.waiting >= self.max_queue:
                raise Overloaded(self.waiting)
            self.waiting += 1
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self.run, name="selfcog-serve-worker", daemon=True)
                self.thread.start()
        self.jobs.put(job)

    def close(self, timeout: float = 10) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join(timeout)

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                if job.stop.is_set():  # its client left while it waited
                    self.stats["skipped"] += 1
                    job.info.update(finish_reason="cancelled", completion_tokens=0)
                    job.push(DONE)
                    continue
                self.generate(job)
            finally:
                with self.lock:
                    self.waiting -= 1

    def generate(self, job: Job) -> None:
        import torch

        try:
            generator = None if job.seed is None else torch.Generator(self.model.device).manual_seed(job.seed)
            for piece in stream_ids(self.model, self.tokenizer, job.ids, job.args, job.max_new_tokens, job.stop,
                                    job.info, job.adapter, generator):
                job.push(piece)
        except Exception as exc:  # noqa: BLE001 - reported to this request's client
            self.stats["failed"] += 1
            job.push(exc)
            return
        self.stats["cancelled" if job.info.get("finish_reason") == "cancelled" else "completed"] += 1
        job.push(DONE)


class StopStrings:
    """Cuts the text at the first stop string, holding back a tail that might begin one."""

    def __init__(self, stops: list[str]):
        self.stops, self.buffer, self.hit = stops, "", False

    def feed(self, piece: str) -> str:
        if not self.stops:
            return piece
        self.buffer += piece
        cuts = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.hit = True
            out, self.buffer = self.buffer[:min(cuts)], ""
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.buffer.endswith(s[:k])), default=0)
        out = self.buffer[:len(self.buffer) - keep]
        self.buffer = self.buffer[len(out):]
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


class RequireKey:
    """ASGI middleware: every /v1 request needs `Authorization: Bearer KEY`, checked before the body is read."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = dict(scope.get("headers") or [])
            header = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = header.partition(" ")
            problem = None
            if not header:
                problem = "missing API key: send 'Authorization: Bearer KEY'"
            elif scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1"), self.key):
                problem = "incorrect API key provided"
            if problem:
                response = error_response(401, problem, code="invalid_api_key",
                                          headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class LimitBody:
    """ASGI middleware: a request body over `max_bytes` gets 413 before the app sees it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        too_large = declared.isdigit() and int(declared) > self.max_bytes
        body, more = b"", not too_large
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
            too_large = len(body) > self.max_bytes
            if too_large:
                break
        if too_large:
            response = error_response(413, f"request body is larger than {self.max_bytes} bytes",
                                      code="request_too_large")
            await response(scope, receive, send)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class GenerationResponse(StreamingResponse):
    """A streaming response that stops its generation however it ends (finished, disconnected, failed)."""

    def __init__(self, content, stop: threading.Event, **kwargs):
        super().__init__(content, **kwargs)
        self.stop = stop

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stop.set()


# ---------------------------------------------------------------------------------------------- app

def create_app(model, tokenizer, model_name: str, api_key: str | None = None, *,
               defaults: SamplingArgs | None = None, max_queue: int = 64, batching: bool = True,
               max_batch: int = 32, identities: dict[str, str | None] | None = None,
               max_body_bytes: int = 1 << 20, trim_history: bool = False) -> FastAPI:
    """The API app for one loaded model. `api_key` set: every /v1 request needs `Authorization: Bearer KEY`.

    `identities` maps each model id clients may ask for to the PEFT adapter that answers it (`BASE_ADAPTER`: the
    base model); by default `model_name` alone, answered by the model as loaded. `batching` decodes requests
    together (up to `max_batch` at once); without it one at a time. A conversation longer than the context is a
    400 `context_length_exceeded` unless `trim_history` (or the request's `trim_history`) drops its oldest turns.
    """
    defaults = defaults or SamplingArgs()
    identities = identities or {model_name: None}
    worker = BatchEngine(model, tokenizer, max_batch, max_queue) if batching else Worker(model, tokenizer, max_queue)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()

    app = FastAPI(title="selfcog", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = worker
    app.state.model_name = model_name

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError):
        errors = exc.errors() or [{"loc": ("body",), "msg": "invalid request"}]
        first = errors[0]
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            message = f"request body is not valid JSON ({first.get('msg', 'parse error')})"
        elif first.get("type") == "missing" and param:
            message = f"'{param}' is required"
        else:
            message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = f"unknown path {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    app.add_middleware(LimitBody, max_bytes=max_body_bytes)
    if api_key is not None:
        app.add_middleware(RequireKey, api_key=api_key)  # added last: runs first, before the body is read

    def card(model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "selfcog"}

    def unknown(model_id: str) -> APIError:
        served = ", ".join(f"'{m}'" for m in identities)
        return APIError(404, f"model '{model_id}' not found; this server serves {served}", param="model",
                        code="model_not_found")

    @app.get("/health")
    async def health():
        return {"status": "ok", "waiting": worker.waiting}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [card(m) for m in identities]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id not in identities:
            raise unknown(model_id)
        return card(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        model_id = next(iter(identities)) if body.model is None else body.model
        if model_id not in identities:
            raise unknown(model_id)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        args = body.sampling(defaults)
        trim = trim_history if body.trim_history is None else body.trim_history
        try:
            args.check()
            ids, max_new_tokens = plan_prompt(model, tokenizer, messages, args, trim=trim)
        except ContextLengthExceeded as exc:
            raise APIError(400, f"{exc}; shorten the messages, or send \"trim_history\": true to drop the oldest "
                           "turns", param="messages", code="context_length_exceeded") from None
        except SelfcogError as exc:
            raise APIError(400, str(exc), param="messages") from None
        except Exception as exc:  # noqa: BLE001 - e.g. a chat template rejecting the role order
            raise APIError(400, f"messages: the model's chat template rejected them ({exc})",
                           param="messages") from None
        job = Job(ids, max_new_tokens, args, body.seed, identities[model_id])
        try:
            worker.submit(job)
        except Overloaded as exc:
            raise APIError(503, str(exc), type_="server_error", code="overloaded") from None
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        stops = StopStrings(body.stop)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return GenerationResponse(sse_events(job, stops, reply_id, model_id, include_usage), job.stop,
                                      media_type="text/event-stream",
                                      headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await complete(job, stops, reply_id, model_id, request)

    return app


def usage_of(job: Job) -> dict:
    prompt, completion = job.info.get("prompt_tokens", 0), job.info.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(job: Job, stops: StopStrings) -> str:
    return "stop" if stops.hit else ("length" if job.info.get("finish_reason") == "length" else "stop")


async def complete(job: Job, stops: StopStrings, reply_id: str, model_name: str, request: Request):
    """A whole answer as one chat.completion; a client that hangs up stops the generation."""
    text = []
    try:
        while True:
            try:
                item = await asyncio.wait_for(job.out.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.stop.set()
                continue
            if item is DONE:
                break
            if isinstance(item, BaseException):
                raise APIError(500, f"generation failed: {item}", type_="server_error")
            if not stops.hit:
                text.append(stops.feed(item))
                if stops.hit:
                    job.stop.set()
    finally:
        job.stop.set()
    if not stops.hit:
        text.append(stops.flush())
    return {
        "id": reply_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text).strip()},
                     "logprobs": None, "finish_reason": finish_reason(job, stops)}],
        "usage": usage_of(job),
    }


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def sse_events(job: Job, stops: StopStrings, reply_id: str, model_name: str, include_usage: bool):
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return sse(body)

    try:
        yield chunk({"role": "assistant", "content": ""})
        started = False
        try:
            async for piece in job.pieces():
                if stops.hit:
                    continue  # generation is stopping; drop what was already on its way
                text = stops.feed(piece)
                if stops.hit:
                    job.stop.set()
                if not started:  # answers often open with a newline; drop leading blank space
                    text = text.lstrip()
                    started = bool(text)
                if text:
                    yield chunk({"content": text})
            tail = "" if stops.hit else stops.flush()
            if tail and (started or tail.strip()):
                yield chunk({"content": tail if started else tail.lstrip()})
        except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band, OpenAI style
            yield sse({"error": {"message": f"generation failed: {exc}", "type": "server_error", "param": None,
                                 "code": None}})
            yield "data: [DONE]\n\n"
            return
        yield chunk({}, finish_reason(job, stops))
        if include_usage:
            yield sse({"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                       "system_fingerprint": None, "choices": [], "usage": usage_of(job)})
        yield "data: [DONE]\n\n"
    finally:
        job.stop.set()


# ---------------------------------------------------------------------------------------------- CLI

def check_port(host: str, port: int) -> None:
    """Fail early, in one line, when the port cannot be bound."""
    if not 0 < port < 65536:
        raise SelfcogError(f"--port {port}: must be 1-65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SelfcogError(f"--host {host}: cannot resolve ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise SelfcogError(f"{host}:{port}: cannot listen ({exc.strerror or exc})") from None


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on `host:port` (closed connections in TIME_WAIT do not count)."""
    with socket.socket() as sock:
        if sock.connect_ex((host, port)) == 0:
            return True
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def serving_dtype(setting: str = "auto"):
    """`auto`: bf16 on a GPU that has it and on a CPU with native bf16 (AVX512-BF16 or AMX), else fp32."""
    import torch


    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if setting in choices:
        return choices[setting]
    if setting != "auto":
        raise SelfcogError(f"--dtype {setting}: choose auto, float32 or bfloat16")
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def serve(spec: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          adapters: tuple[str, ...] = (), model_name: str | None = None, defaults: SamplingArgs | None = None,
          trust_remote_code: bool = False, *, batching: bool = True, max_batch: int = 32, dtype: str = "auto",
          trim_history: bool = False, no_auth: bool = False, max_body_bytes: int = 1 << 20) -> None:
    """Serve `spec` (and each `--adapter [NAME=]DIR` over it) until SIGINT or SIGTERM."""
    import uvicorn


    check_port(host, port)
    if host not in LOOPBACK and not api_key and not no_auth:
        raise SelfcogError(f"--host {host}: serving beyond this machine needs --api-key (or SELFCOG_API_KEY); "
                           "pass --no-auth to serve without one")
    if max_batch < 1:
        raise SelfcogError(f"--max-batch must be >= 1 (got {max_batch})")
    name = model_name or spec
    named = parse_adapters(adapters, name)
    model, tokenizer, identities = load_identities(spec, named, name, trust_remote_code, serving_dtype(dtype))
    app = create_app(model, tokenizer, name, api_key, defaults=(defaults or SamplingArgs()).check(),
                     batching=batching, max_batch=max_batch, identities=identities, max_body_bytes=max_body_bytes,
                     trim_history=trim_history)
    import torch

    how = f"continuous batching up to {max_batch}" if batching else "one request at a time"
    print(f"selfcog: serving {', '.join(identities)} at http://{host}:{port}/v1 (OpenAI-compatible; "
          f"{how}; {str(next(model.parameters()).dtype).replace('torch.', '')}, {torch.get_num_threads()} threads)",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
