"""Terminal chat: one-shot `--message`, or an interactive loop with history, /reset and /exit."""

from __future__ import annotations

import sys
from pathlib import Path

from selfcog.batching import BASE_ADAPTER
from selfcog.errors import SelfcogError
from selfcog.generate import SamplingArgs, stream_chat
from selfcog.models import load_model

HELP = "selfcog chat — /reset clears the history, /exit quits, Ctrl+C stops an answer."


def load_chat_model(spec: str, adapter: str | None = None, trust_remote_code: bool = False):
    """`(model, tokenizer)` for chatting; `adapter` applies a LoRA adapter without merging."""
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise SelfcogError(f"--adapter {adapter}: not a LoRA adapter directory (no adapter_config.json)")
    model, tokenizer = load_model(spec, trust_remote_code=trust_remote_code)
    if adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter).eval()
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SelfcogError(f"--adapter {adapter}: does not fit {spec}: {first}") from exc
    return model, tokenizer


def parse_adapters(values, main_name: str) -> list[tuple[str, str]]:
    """`--adapter NAME=DIR` values as `(model id, dir)`; a bare `DIR` answers as `main_name` itself."""
    named: list[tuple[str, str]] = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = main_name, value
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise SelfcogError(f"--adapter {value}: expected NAME=DIR or DIR")
        if any(name == other for other, _ in named):
            raise SelfcogError(f"--adapter {value}: the name '{name}' is given twice")
        if not (Path(path) / "adapter_config.json").is_file():
            raise SelfcogError(f"--adapter {value}: {path} is not a LoRA adapter directory (no adapter_config.json)")
        named.append((name, path))
    return named


def load_identities(spec: str, adapters: list[tuple[str, str]], main_name: str, trust_remote_code: bool = False,
                    dtype=None):
    """`(model, tokenizer, identities)`: the base model with every adapter loaded side by side (not merged), and
    `identities` mapping each model id to the PEFT adapter that answers it (`"__base__"`: the base model).

    The base answers as `main_name` unless an adapter took that name. Without adapters the identities are
    `{main_name: None}`: the model as loaded."""
    model, tokenizer = load_model(spec, dtype=dtype, trust_remote_code=trust_remote_code)
    if not adapters:
        return model, tokenizer, {main_name: None}
    from peft import PeftModel

    identities: dict[str, str | None] = {}
    if all(name != main_name for name, _ in adapters):
        identities[main_name] = BASE_ADAPTER
    for i, (name, path) in enumerate(adapters):
        slot = f"identity{i}"  # peft's module keys: ASCII, no dots, whatever the model id is
        try:
            if i == 0:
                model = PeftModel.from_pretrained(model, path, adapter_name=slot)
            else:
                model.load_adapter(path, adapter_name=slot)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SelfcogError(f"--adapter {name}={path}: does not fit {spec}: {first}") from exc
        identities[name] = slot
    return model.eval(), tokenizer, identities


def reply(model, tokenizer, history: list[dict], sampling: SamplingArgs, out=None) -> str:
    """Stream one answer to `out` (leading blank space dropped) and return it, stripped."""
    out = out or sys.stdout
    pieces = []
    started = False
    for piece in stream_chat(model, tokenizer, history, sampling):
        pieces.append(piece)
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        if piece:
            out.write(piece)
            out.flush()
    out.write("\n")
    out.flush()
    return "".join(pieces).strip()


def read_line(stdin, out) -> str | None:
    """One line of input after the `>>> ` prompt; None at end of input."""
    if stdin is sys.stdin and stdin.isatty() and out is sys.stdout:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        try:
            return input(">>> ")
        except EOFError:
            out.write("\n")
            return None
    out.write(">>> ")
    out.flush()
    line = stdin.readline()
    return line if line else None


def chat(spec: str, message: str | None = None, system: str | None = None, sampling: SamplingArgs | None = None,
         adapter: str | None = None, trust_remote_code: bool = False, stdin=None, out=None) -> None:
    stdin, out = stdin or sys.stdin, out or sys.stdout
    sampling = (sampling or SamplingArgs()).check()
    model, tokenizer = load_chat_model(spec, adapter, trust_remote_code)
    start = [{"role": "system", "content": system}] if system else []
    if message is not None:
        if not message.strip():
            raise SelfcogError("--message is empty")
        reply(model, tokenizer, start + [{"role": "user", "content": message}], sampling, out)
        return
    history = list(start)
    out.write(HELP + "\n")
    while True:
        try:
            line = read_line(stdin, out)
        except KeyboardInterrupt:
            out.write("\n")
            return
        if line is None or line.strip() in ("/exit", "/quit"):
            return
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = list(start)
            out.write("(history cleared)\n")
            continue
        if text.startswith("/") and text.split()[0] in ("/help", "/?"):
            out.write(HELP + "\n")
            continue
        history.append({"role": "user", "content": text})
        try:
            answer = reply(model, tokenizer, history, sampling, out)
        except KeyboardInterrupt:  # Ctrl+C stops this answer (generation ends), not the chat
            out.write("\n(answer stopped)\n")
            history.pop()
            continue
        history.append({"role": "assistant", "content": answer})
