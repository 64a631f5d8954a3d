"""Terminal chat: one-shot `--message`, or an interactive loop with history, /reset and /exit."""

from __future__ import annotations

import sys
from pathlib import Path

from selfcog.errors import SelfcogError
from selfcog.generate import SamplingArgs, stream_chat
from selfcog.models import load_model


def load_chat_model(spec: str, adapter: str | None = None, trust_remote_code: bool = False):
    """`(model, tokenizer)` for chatting; `adapter` applies a LoRA adapter without merging."""
    model, tokenizer = load_model(spec, trust_remote_code=trust_remote_code)
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise SelfcogError(f"--adapter {adapter}: not a LoRA adapter directory (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, adapter).eval()
    return model, tokenizer


def reply(model, tokenizer, history: list[dict], sampling: SamplingArgs, out=sys.stdout) -> str:
    """Stream one answer to `out` and return it."""
    pieces = []
    for piece in stream_chat(model, tokenizer, history, sampling):
        pieces.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    return "".join(pieces).strip()


def chat(spec: str, message: str | None = None, system: str | None = None, sampling: SamplingArgs | None = None,
         adapter: str | None = None, trust_remote_code: bool = False, stdin=sys.stdin, out=sys.stdout) -> None:
    sampling = sampling or SamplingArgs()
    model, tokenizer = load_chat_model(spec, adapter, trust_remote_code)
    start = [{"role": "system", "content": system}] if system else []
    if message is not None:
        reply(model, tokenizer, start + [{"role": "user", "content": message}], sampling, out)
        return
    history = list(start)
    out.write("selfcog chat — /reset clears the history, /exit quits.\n")
    while True:
        out.write(">>> ")
        out.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = list(start)
            out.write("(history cleared)\n")
            continue
        history.append({"role": "user", "content": text})
        history.append({"role": "assistant", "content": reply(model, tokenizer, history, sampling, out)})
