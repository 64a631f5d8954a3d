"""llama.cpp itself, through its Python bindings (`pip install 'selfcog[gguf]'`, the `llama-cpp-python` package):
its quantizer writes the k-quant files, and its runtime loads every exported file and answers with it.

The prompts are what llama.cpp makes of the chat template stored in the GGUF (`llama_model_chat_template`, then
`llama_chat_apply_template`, as llama.cpp's own chat tools do without `--jinja`), tokenized by llama.cpp with its
special-token handling (BOS added when the file says so). Answers are greedy.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

from gguf import GGUFReader

from selfcog.errors import SelfcogError

# --type -> llama.cpp's llama_ftype for its quantizer (llama.h: LLAMA_FTYPE_MOSTLY_Q4_K_M = 15, Q5_K_M = 17).
K_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M"}
INSTALL = "pip install 'selfcog[gguf]' (llama-cpp-python, compiled from source with cmake and a C++ compiler)"


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def bindings():
    if not available():
        raise SelfcogError(f"llama.cpp's Python bindings are not installed: {INSTALL}")
    import llama_cpp  # the optional selfcog[gguf] extra, checked for above

    return llama_cpp


def versions() -> dict:
    llama_cpp = bindings()
    version = getattr(llama_cpp, "llama_version", None)
    return {"llama_cpp_python": llama_cpp.__version__,
            "llama_cpp": version().decode() if version is not None else None}


def threads() -> int:
    """As many threads as torch uses here (it follows OMP_NUM_THREADS)."""
    import torch  # only for its thread count: importing this module loads no torch

    return max(1, torch.get_num_threads())


def quantize(source: Path, target: Path, qtype: str) -> None:
    """llama.cpp's own quantizer: `source` (an f16 GGUF) -> `target` in the k-quant mix `qtype`."""
    llama_cpp = bindings()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_QUANTS[qtype])
    params.nthread = threads()
    # llama.cpp writes a line per tensor to stderr; the report counts the types it chose. Kept for an error message.
    with tempfile.TemporaryFile() as chatter:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(chatter.fileno(), 2)
        try:
            status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        chatter.seek(0)
        said = [line for line in chatter.read().decode("utf-8", "replace").splitlines() if line.strip()]
    if status != 0 or not Path(target).is_file():
        reason = said[-1].strip() if said else f"status {status}"
        raise SelfcogError(f"export-gguf: llama.cpp's quantizer failed on {source.name}: {reason}")


class Runtime:
    """One GGUF file loaded in llama.cpp."""

    def __init__(self, path: Path, n_ctx: int = 2048, n_threads: int | None = None):
        llama_cpp = bindings()
        n_ctx = min(n_ctx, context_length(path) or n_ctx)
        start = time.perf_counter()
        try:
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads or threads(),
                                       n_threads_batch=n_threads or threads(), verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise SelfcogError(f"{path}: llama.cpp cannot load this file: {exc}") from exc
        self.load_seconds = time.perf_counter() - start
        self.llama_cpp = llama_cpp
        template = llama_cpp.llama_model_chat_template(self.llm.model, None)
        self.template = template.decode("utf-8") if template else None

    def close(self) -> None:
        self.llm.close()

    def apply_template(self, messages: list[dict]) -> str | None:
        """The prompt llama.cpp renders from the file's chat template (None: llama.cpp does not recognise it)."""
        if not self.template:
            return None
        llama_cpp = self.llama_cpp
        chat = (llama_cpp.llama_chat_message * len(messages))(
            *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages])
        size = 256 + 2 * sum(len(m["content"].encode()) + 16 for m in messages)
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_chat_apply_template(self.template.encode(), chat, len(messages), True, buf, size)
            if n < 0:
                return None
            if n <= size:
                return buf.raw[:n].decode("utf-8")
            size = n
        return None

    def tokenize(self, prompt: str) -> list[int]:
        """Token ids as llama.cpp reads a prompt: special tokens parsed, BOS added when the file asks for it."""
        return self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)

    def answer(self, prompt_ids: list[int], max_new_tokens: int, stop_at_end: bool = True) -> tuple[list[int], float]:
        """Greedy answer token ids (the end-of-generation token excluded) and the seconds spent."""
        vocab = self.llama_cpp.llama_model_get_vocab(self.llm.model)
        self.llm.reset()
        start = time.perf_counter()
        out: list[int] = []
        for token in self.llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            if stop_at_end and self.llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            out.append(token)
            if len(out) >= max_new_tokens:
                break
        return out, time.perf_counter() - start

    def text(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace").strip()


def context_length(path: Path) -> int | None:
    """The `ARCH.context_length` the file states (llama.cpp warns when a context exceeds it)."""
    fields = GGUFReader(path).fields
    for key, field in fields.items():
        if key.endswith(".context_length"):
            return int(field.contents())
    return None


def file_summary(path: Path) -> dict:
    """Size and the count of tensors per storage type, read with gguf-py."""
    reader = GGUFReader(path)
    kinds: dict[str, int] = {}
    for tensor in reader.tensors:
        kinds[tensor.tensor_type.name] = kinds.get(tensor.tensor_type.name, 0) + 1
    return {"size_bytes": os.path.getsize(path), "tensor_types": dict(sorted(kinds.items()))}
