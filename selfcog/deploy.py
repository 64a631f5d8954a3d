"""`selfcog deploy`: a folder ready to upload as an OpenXLab app or a Hugging Face Space.

The bundle is a self-contained Streamlit chat app (`app.py`, from `selfcog/deploy_app/`), its pinned
requirements, a README with the upload steps, and the model itself in `model/` -- or, with a repo id,
no weights at all: the app downloads them when it starts.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from importlib import metadata, resources
from pathlib import Path

from selfcog.atomic import atomic_dir
from selfcog.config import load_config
from selfcog.errors import SelfcogError
from selfcog.export import merge, share
from selfcog.models import HUB_ID, resolve_model

logger = logging.getLogger(__name__)

TARGETS = ("openxlab", "hf-space")
# What app.py imports, plus what transformers needs to read the usual tokenizer and weight files.
REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "huggingface_hub", "accelerate",
                "sentencepiece", "protobuf", "streamlit")
# The bundle's copy of selfcog/streaming.py, imported by app.py.
STREAMING = "selfcog_streaming.py"
# Files of a model directory that the app does not need.
SKIP_FILES = {"selfcog-complete.json"}


def deploy(spec: str, out: Path, target: str, repo_id: str | None = None, title: str | None = None) -> Path:
    """Write the app bundle for MODEL into `out` (atomically); returns `out`."""
    out = Path(out)
    if target not in TARGETS:
        raise SelfcogError(f"--target {target}: choose one of {', '.join(TARGETS)}")
    if repo_id is not None and not HUB_ID.match(repo_id):
        raise SelfcogError(f"--repo-id {repo_id}: expected ORG/NAME")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "app.py").exists())):
        raise SelfcogError(f"{out}: exists and is not an app bundle; choose a new directory")
    adapter = Path(spec) / "adapter_config.json" if repo_id is None else None
    source = None
    if repo_id is None and not (adapter and adapter.is_file()):
        source = resolve_model(spec)
        if not Path(source).is_dir():  # a hub id: the app can download it just as well
            repo_id, source = source, None
    title = title or default_title(source)
    with atomic_dir(out) as tmp:
        if adapter is not None and adapter.is_file():
            bundle_adapter(Path(spec), tmp / "model")
        elif source is not None:
            bundle_model(Path(source), tmp / "model")
        (tmp / "app.py").write_text(app_source(repo_id or "model", title), encoding="utf-8")
        # The streaming decoder selfcog chats with, unchanged: the app answers exactly as `selfcog chat` does.
        (tmp / STREAMING).write_text(streaming_source(), encoding="utf-8")
        (tmp / "requirements.txt").write_text(requirements(), encoding="utf-8")
        (tmp / "README.md").write_text(readme(target, title, repo_id), encoding="utf-8")
        share(tmp)
    return out


def bundle_model(source: Path, target: Path) -> None:
    """Copy a HF model directory's files (weights, config, tokenizer, chat template)."""
    logger.info(f"selfcog: copying the model from {source} into the bundle ...")
    target.mkdir()
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name not in SKIP_FILES:
            shutil.copyfile(path, target / path.name)  # contents only: the bundle gets ordinary permissions


def bundle_adapter(adapter: Path, target: Path) -> None:
    """A LoRA adapter directory: merge it into the base it names, so the app needs no peft."""
    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise SelfcogError(f"{adapter}: adapter_config.json names no base model; merge it first (selfcog merge)")
    logger.info(f"selfcog: merging {adapter} into {base} for the bundle ...")
    merge(base, adapter, target)


def default_title(source: str | None) -> str:
    """The assistant's name from the run that made the model, when there is one."""
    if source is not None and (Path(source) / "selfcog.yaml").is_file():
        try:
            data = load_config(Path(source) / "selfcog.yaml").data
            if data.assistant_name or data.name:
                return data.assistant_name or f"{data.name}'s assistant"
        except SelfcogError:
            pass
    return "selfcog chat"


def streaming_source() -> str:
    return resources.files("selfcog").joinpath("streaming.py").read_text(encoding="utf-8")


def app_source(model_source: str, title: str) -> str:
    """The app template with its two settings filled in."""
    text = resources.files("selfcog.deploy_app").joinpath("app.py").read_text(encoding="utf-8")
    for name, value in (("TITLE", title), ("MODEL_SOURCE", model_source)):
        text, count = re.subn(rf"^{name} = .*$", lambda _: f"{name} = {value!r}", text, count=1, flags=re.M)
        assert count == 1, f"app template lost its {name} line"
    return text


def requirements() -> str:
    """The versions installed here, pinned: the app runs on what selfcog was tested with."""
    lines = ["# Pinned from the environment that ran `selfcog deploy`."]
    for name in REQUIREMENTS:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            lines.append(name)
            continue
        lines.append(f"{name}=={version.split('+')[0]}")  # drop local tags like +cpu: PyPI has no such wheel
    return "\n".join(lines) + "\n"


def readme(target: str, title: str, repo_id: str | None) -> str:
    where = (f"The app downloads `{repo_id}` from the Hugging Face Hub when it starts; no weights are bundled."
             if repo_id else "The model is bundled in `model/`.")
    local = "Try it locally first:\n\n    pip install -r requirements.txt\n    streamlit run app.py\n"
    if target == "hf-space":
        front = "\n".join(["---", f"title: {json.dumps(title, ensure_ascii=False)}", "emoji: 💬", "colorFrom: blue",
                           "colorTo: indigo", "sdk: streamlit", f"sdk_version: {metadata.version('streamlit')}",
                           "app_file: app.py", "pinned: false", "---"])
        steps = """## Upload to a Hugging Face Space

1. Create a Space at https://huggingface.co/new-space and pick the **Streamlit** SDK
   (the front matter above also sets it: `sdk: streamlit`, `app_file: app.py`).
2. Log in: `pip install -U huggingface_hub` then `hf auth login` (older versions: `huggingface-cli login`).
3. From this folder: `hf upload ORG/SPACE . --repo-type space`
   (older: `huggingface-cli upload ORG/SPACE . --repo-type=space`). Weight files go through LFS by themselves.
   With git instead: clone `https://huggingface.co/spaces/ORG/SPACE`, copy these files in,
   `git lfs track "*.safetensors"`, then `git add . && git commit -m app && git push`.
4. The Space installs `requirements.txt` and starts `app.py`; the first start loads the model.
   The free CPU hardware (2 vCPU, 16 GB) runs models up to about 1B parameters.
"""
        return f"{front}\n\n# {title}\n\n{where}\n\n{local}\n{steps}"
    steps = """## Upload to OpenXLab

OpenXLab builds apps from a GitHub (or Gitee) repository:

1. Push this folder to a new repository. Bundled weights need Git LFS (`git lfs install`,
   `git lfs track "*.safetensors"`); GitHub refuses single files over 100 MB without it. For large
   weights, upload the model to the OpenXLab model center and redeploy with `--repo-id`, fetching it
   with `openxlab.model.download` as the comment in `app.py` shows (add `openxlab` to `requirements.txt`).
2. At https://openxlab.org.cn/apps choose *Create* -> *Streamlit*, pick the repository and branch,
   main file `app.py`, and hardware (a CPU machine is enough for models up to about 1B parameters).
3. OpenXLab installs `requirements.txt` (and Debian packages from a `packages.txt`, none needed here)
   and starts `app.py`.
"""
    return f"# {title}\n\n{where}\n\n{local}\n{steps}"
