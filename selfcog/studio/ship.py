"""What `selfcog studio` offers for download once a run is done, each built by a background job into RUN/ship/:
the merged model as a zip, a q8_0 GGUF with its Ollama Modelfile, and deploy bundles (OpenXLab, HF Space)."""

from __future__ import annotations

import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from selfcog.atomic import atomic_file
from selfcog.studio import jobs

SHIP = "ship"


@dataclass(frozen=True)
class Artifact:
    key: str
    label: str
    """The build button's label."""
    help: str


ARTIFACTS = (
    Artifact("merged", "Merged model (zip)", "The merged model folder as a zip: stock transformers loads it."),
    Artifact("gguf", "GGUF q8_0 + Ollama Modelfile", "One GGUF file for llama.cpp / Ollama, and its Modelfile."),
    Artifact("openxlab", "Deploy bundle: OpenXLab", "A Streamlit app folder with the model, ready to upload."),
    Artifact("hf-space", "Deploy bundle: HF Space", "A Streamlit app folder with the model, ready to upload."),
)


def stem(run_dir: Path) -> str:
    return run_dir.name


def files(run_dir: Path, key: str) -> list[Path]:
    """The downloads artifact `key` gives, once built."""
    ship = run_dir / SHIP
    if key == "merged":
        return [ship / f"{stem(run_dir)}-merged.zip"]
    if key == "gguf":
        return [ship / "gguf" / f"{stem(run_dir)}-q8_0.gguf", ship / "gguf" / "Modelfile"]
    return [ship / f"{stem(run_dir)}-{key}.zip"]


def job_dir(run_dir: Path, key: str) -> Path:
    return run_dir / "studio" / f"ship-{key}"


def command(run_dir: Path, key: str) -> list[str]:
    merged, target = str(run_dir / "merged"), str(files(run_dir, key)[0])
    if key == "merged":
        return [sys.executable, "-m", "selfcog.studio.ship", "zip", merged, target]
    if key == "gguf":
        return [sys.executable, "-m", "selfcog", "export-gguf", merged, target, "--type", "q8_0"]
    return [sys.executable, "-m", "selfcog.studio.ship", "deploy", merged, target, key]


def build(run_dir: Path, key: str) -> None:
    """Start building artifact `key` in the background (nothing happens while a build of it runs)."""
    if not jobs.state(job_dir(run_dir, key)).active:
        jobs.start(job_dir(run_dir, key), command(run_dir, key))


def zip_dir(source: Path, target: Path) -> Path:
    """`source`'s files in a zip under one top folder named after the zip; written to a temp file, then renamed."""
    top = target.stem
    with atomic_file(target) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
            for path in sorted(source.rglob("*")):
                if path.is_file():
                    archive.write(path, f"{top}/{path.relative_to(source).as_posix()}")
    return target


def deploy_zip(model: str, target: Path, kind: str) -> Path:
    """`selfcog deploy MODEL --target KIND` into a temp folder, zipped into `target`."""
    from selfcog.deploy import deploy  # torch, kept out of the zip job, which runs this module

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=".deploy-"))
    try:
        bundle = deploy(model, work / target.stem, kind)
        return zip_dir(bundle, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str]) -> int:
    """The build jobs `command` starts: `zip DIR ZIP` and `deploy MODEL ZIP TARGET`."""
    if len(argv) == 3 and argv[0] == "zip":
        zip_dir(Path(argv[1]), Path(argv[2]))
        return 0
    if len(argv) == 4 and argv[0] == "deploy":
        deploy_zip(argv[1], Path(argv[2]), argv[3])
        return 0
    print("usage: python -m selfcog.studio.ship zip DIR ZIP | deploy MODEL ZIP TARGET", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
