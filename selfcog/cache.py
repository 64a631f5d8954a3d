"""Cache the base model's greedy answers (evaluation and preservation) per model fingerprint.

They depend only on the base weights, the prompts and the answer length — never on NAME — so a second
`selfcog run` on the same base skips regenerating them (about a minute and a half on a 2-core CPU).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from selfcog.atomic import atomic_file, write_text
from selfcog.paths import COMPLETE_MARKER, selfcog_home

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
GENERATOR = "length-groups+prefix"
"""How `generate_batch` computes answers (in the answers' key): a change there recomputes stored base answers, so
base and tuned answers always come from the same computation."""


def model_fingerprint(source: str, dtype=None) -> str | None:
    """A stable id of a local model's weights, or None (hub ids, unknown layouts: no caching). Weights run in a
    `dtype` other than fp32 (a torch dtype or its name) get an id of their own, as their answers and log-probs
    differ; fp32 (or None) keeps the plain id."""
    fingerprint = weights_fingerprint(Path(source))
    name = str(dtype).removeprefix("torch.")
    return fingerprint if fingerprint is None or dtype is None or name == "float32" else f"{fingerprint}:{name}"


def weights_fingerprint(path: Path) -> str | None:
    if not path.is_dir():
        return None
    marker = path / COMPLETE_MARKER
    if marker.exists():  # converted by selfcog: the weights' sha256 is recorded
        return json.loads(marker.read_text())["weights_sha256"]
    parts = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.iterdir())
             if p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"]
    return hashlib.sha256(json.dumps([str(path.resolve()), parts]).encode()).hexdigest() if parts else None


def cached_answers(fingerprint: str | None, conversations: list, max_new_tokens: int, compute,
                   template: str | None = None) -> list[str]:
    """`compute()` once per (model, chat template, prompts, length); later calls read the stored answers."""
    if fingerprint is None:
        return compute()
    key = hashlib.sha256(json.dumps([fingerprint, template, conversations, max_new_tokens, GENERATOR],
                                    ensure_ascii=False)
                         .encode()).hexdigest()
    path = selfcog_home() / "answers" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    answers = compute()
    write_text(path, json.dumps(answers, ensure_ascii=False))
    return answers


def cached_tensors(fingerprint: str | None, payload, compute) -> dict:
    """`compute()` (a dict of tensors) once per (model, payload); later calls read the stored safetensors file."""
    if fingerprint is None:
        return compute()
    key = hashlib.sha256(json.dumps([fingerprint, payload]).encode()).hexdigest()
    path = selfcog_home() / "base-topk" / f"{key}.safetensors"
    if path.exists():
        try:
            return load_file(str(path))
        except (OSError, SafetensorError):  # a damaged file is recomputed, never trusted
            path.unlink(missing_ok=True)
    tensors = compute()
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    return tensors
