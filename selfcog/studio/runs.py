"""Run directories of `selfcog studio`, under its home: check the page's settings, create a run directory and
start `selfcog run --config RUN/selfcog.yaml --out RUN` in the background, read its progress back from what the
run writes (RUN/studio/run/log, RUN/log.jsonl, data/, adapter/, merged/, metrics.json), cancel it, list runs.

A run directory has the layout of `selfcog run --out` plus `studio/` (the background job's files and an uploaded
data file) and `ship/` (downloads built on request).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from selfcog.config import CONFIG_FILE, RunConfig, apply_overrides, load_config, load_preset, save_config
from selfcog.data.check import check_data_report, load_checked
from selfcog.data.identity import check_name
from selfcog.errors import SelfcogError
from selfcog.paths import selfcog_home
from selfcog.studio import jobs

EMBEDDED = "smollm2-135m"
FORMATS = ("json", "jsonl")
"""Upload file types: XTuner conversation, OpenAI messages, alpaca and sharegpt records, as a JSON array or JSONL."""
ADVANCED = (("train.max_steps", "Most training steps"), ("train.learning_rate", "Learning rate"),
            ("data.preserve_ratio", "Preservation samples per identity sample"),
            ("train.kl_weight", "KL weight (keeps ordinary answers)"), ("lora.r", "LoRA rank"))
"""Settings on the page, with their labels; any other one can be set as `section.key=value` lines."""


def studio_home(home: str | Path | None = None) -> Path:
    """`--home`, else $SELFCOG_STUDIO_HOME, else $SELFCOG_HOME/studio."""
    chosen = home or os.environ.get("SELFCOG_STUDIO_HOME")
    return Path(chosen).expanduser() if chosen else selfcog_home() / "studio"


def run_job_dir(run_dir: Path) -> Path:
    return run_dir / "studio" / "run"


@dataclass
class Settings:
    """What the set-up form holds."""
    name: str = ""
    assistant_name: str = ""
    author: str = ""
    model: str = "embedded"
    """`embedded`, `preset` or `local`."""
    preset: str = ""
    local_dir: str = ""
    upload_name: str = ""
    upload: bytes | None = None
    advanced: dict = field(default_factory=dict)
    """`section.key` -> value, from the page's advanced fields."""
    more: str = ""
    """More settings, one `section.key=value` a line."""


def base_config(settings: Settings) -> RunConfig:
    """The config the chosen base model starts from; a missing local model is named here."""
    if settings.model == "preset":
        return load_preset(settings.preset)
    config = RunConfig()
    if settings.model == "local":
        path = Path(settings.local_dir.strip()).expanduser()
        if not settings.local_dir.strip():
            raise SelfcogError("Local model directory: empty; give the path of a Hugging Face model folder")
        if not path.exists():
            raise SelfcogError(f"Local model directory: {path} does not exist")
        if not (path.is_dir() and (path / "config.json").is_file()) and path.suffix != ".gguf":
            raise SelfcogError(f"Local model directory: {path} is not a Hugging Face model folder (no config.json) "
                               "or a .gguf file")
        config.model.spec = str(path.resolve())
    elif settings.model != "embedded":
        raise SelfcogError(f"Base model: unknown choice {settings.model!r}")
    return config


@contextmanager
def upload_file(settings: Settings):
    """The uploaded data as a file with its own name (the format is read from it), in a temp folder; None without
    an upload."""
    if settings.upload is None:
        yield None
        return
    suffix = Path(settings.upload_name).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise SelfcogError(f"Data file {settings.upload_name}: expected a .json or .jsonl file")
    with tempfile.TemporaryDirectory(prefix="selfcog-studio-upload-") as tmp:
        path = Path(tmp) / Path(settings.upload_name).name
        path.write_bytes(settings.upload)
        yield path


def check_upload(settings: Settings, config: RunConfig) -> str:
    """`selfcog check-data`'s report on the upload (counts, duplicates, token lengths with the base model's
    tokenizer, an example); a malformed record raises, naming it."""
    from selfcog.models import load_tokenizer  # torch, kept out of `selfcog studio`'s launcher

    with upload_file(settings) as path:
        conversations = load_checked(path)
        tokenizer = load_tokenizer(config.model.spec, trust_remote_code=config.model.trust_remote_code)
        report = check_data_report(path, conversations, tokenizer, config.model.spec, False,
                                   config.data.max_length)
    return report.replace(str(path), settings.upload_name)


def resolve(settings: Settings) -> RunConfig:
    """The run's config from the page's settings; bad input raises SelfcogError naming the field and the reason,
    before anything is written."""
    name = settings.name.strip()
    try:
        check_name(name)
    except SelfcogError as exc:
        raise SelfcogError(f"Name: {exc}") from None
    config = base_config(settings)
    config.data.name = name
    config.data.assistant_name = settings.assistant_name.strip()
    config.data.author = settings.author.strip()
    for dotted, value in settings.advanced.items():
        apply_overrides(config, [f"{dotted}={value}"])
    try:
        apply_overrides(config, [line.strip() for line in settings.more.splitlines() if line.strip()])
    except SelfcogError as exc:
        raise SelfcogError(f"More settings: {re.sub(r'^--set:? ?', '', str(exc))}") from None
    if config.train.max_steps < 1:
        raise SelfcogError("Most training steps: must be at least 1")
    with upload_file(settings) as path:
        if path is not None:
            load_checked(path)  # names the first malformed record
    return config


def slug(name: str) -> str:
    return re.sub(r"[^\w]+", "-", name, flags=re.UNICODE).strip("-")[:40] or "run"


@contextmanager
def home_lock(home: Path):
    """One page at a time starts a run: two tabs pressing Start together start one run."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def active_run(home: Path) -> Path | None:
    """The run whose background job is starting or running, if any."""
    for run_dir in run_dirs(home):
        if jobs.state(run_job_dir(run_dir)).active:
            return run_dir
    return None


def start_run(home: Path, settings: Settings) -> Path:
    """Check the settings, create RUN under `home` and start the pipeline on it in the background; returns RUN.
    Bad input or a run already going raises SelfcogError and creates nothing."""
    config = resolve(settings)
    with home_lock(home):
        busy = active_run(home)
        if busy is not None:
            raise SelfcogError(f"A run is in progress ({busy.name}): wait for it or cancel it first")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(100):
            run_dir = home / (f"{slug(config.data.name)}-{stamp}" + (f"-{n}" if n else ""))
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                continue
        else:
            raise SelfcogError(f"{home}: no free run directory name")
        try:
            if settings.upload is not None:
                upload = run_dir / "studio" / "upload" / Path(settings.upload_name).name
                upload.parent.mkdir(parents=True)
                upload.write_bytes(settings.upload)
                config.data.data_file = str(upload)
            config.out = str(run_dir)
            save_config(config, run_dir)
            jobs.start(run_job_dir(run_dir), [sys.executable, "-m", "selfcog", "run", "--config",
                                              str(run_dir / CONFIG_FILE), "--out", str(run_dir)])
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
    return run_dir


def cancel_run(run_dir: Path) -> None:
    """Stop the run's background job and remove the hidden temp files it left; the rest stays for reading."""
    jobs.cancel(run_job_dir(run_dir))
    for path in run_dir.glob(".*"):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def delete_run(run_dir: Path) -> None:
    if jobs.state(run_job_dir(run_dir)).active:
        raise SelfcogError(f"{run_dir.name}: still running; cancel it first")
    shutil.rmtree(run_dir)


def run_dirs(home: Path) -> list[Path]:
    """Run directories under `home`, newest first."""
    if not home.is_dir():
        return []
    found = [p for p in home.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "studio").is_dir()]
    return sorted(found, key=started, reverse=True)


def started(run_dir: Path) -> float:
    """When the run's background job started (the directory's time before it has)."""
    info = jobs.read_json(run_job_dir(run_dir) / jobs.JOB)
    return info["started"] if info else run_dir.stat().st_mtime


# -- progress ---------------------------------------------------------------------------------------------------
STAGES = ("starting", "loading the model", "scoring the base model", "preparing training data", "training",
          "merging", "scoring the merged model", "done")
TQDM = re.compile(r"^\s*\d+%\|[^|]*\|\s*(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")
DEV = re.compile(r"selfcog: step (\d+) dev identity ([\d.]+) retention (n/a|[\d.]+)")


@dataclass
class Progress:
    state: str
    """The background job's state: starting, running, cancelling, done, failed, cancelled, none."""
    stage: str = "starting"
    step: int = 0
    total: int = 0
    eta: float | None = None
    """Seconds of training left, from the trainer's progress bar (training can stop earlier: dev checks)."""
    elapsed: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)
    dev: list[dict] = field(default_factory=list)
    """One dict per dev check: step, identity, retention (None when the base model got none right)."""
    log_tail: list[str] = field(default_factory=list)
    metrics: dict | None = None
    config: RunConfig | None = None

    @property
    def fraction(self) -> float:
        return min(self.step / self.total, 1.0) if self.total else 0.0


def seconds(clock: str) -> float | None:
    if "?" in clock:
        return None
    value = 0.0
    for part in clock.split(":"):
        value = value * 60 + int(part)
    return value


def read_progress(run_dir: Path) -> Progress:
    """Where the run is, read from its log and the files it has written so far."""
    job = run_job_dir(run_dir)
    state = jobs.state(job)
    progress = Progress(state.state)
    try:
        progress.config = load_config(run_dir / CONFIG_FILE)
    except SelfcogError:
        pass
    if state.started:
        progress.elapsed = (state.ended or time.time()) - state.started
    lines = jobs.screen_lines(jobs.read_log(job))
    progress.log_tail = lines[-20:]
    text = "\n".join(lines)
    for line in lines:
        bar = TQDM.match(line)
        if bar:
            progress.step, progress.total = int(bar[1]), int(bar[2])
            progress.eta = seconds(bar[4])
        dev = DEV.search(line)
        if dev:
            progress.dev.append({"step": int(dev[1]), "identity": float(dev[2]),
                                 "retention": None if dev[3] == "n/a" else float(dev[3])})
    if not progress.total and progress.config is not None:
        progress.total = progress.config.train.max_steps
    progress.losses = losses(run_dir / "log.jsonl")
    progress.metrics = jobs.read_json(run_dir / "metrics.json")
    if progress.metrics is not None:
        progress.stage = "done"
        history = progress.metrics.get("training", {}).get("dev_history")
        if history:
            progress.dev = [{"step": h["step"], "identity": h.get("asked", h.get("identity")),
                             "retention": h.get("retention")} for h in history]
        progress.step = progress.total = progress.metrics.get("training", {}).get("steps", progress.step)
        progress.eta = 0.0
    elif (run_dir / "merged").is_dir():
        progress.stage = "scoring the merged model"
    elif (run_dir / "adapter").is_dir():
        progress.stage = "merging"
    elif "selfcog: training on" in text:
        progress.stage = "training"
    elif (run_dir / "data" / "preserve.json").exists():
        progress.stage = "preparing training data"
    elif "scoring the base model" in text:
        progress.stage = "scoring the base model"
    elif state.state != "starting" and lines:
        progress.stage = "loading the model"
    return progress


def losses(log_file: Path) -> list[tuple[int, float]]:
    points = []
    try:
        rows = log_file.read_text(encoding="utf-8").splitlines()
    except OSError:
        return points
    for row in rows:
        try:
            entry = json.loads(row)
        except ValueError:
            continue  # a line being written
        if isinstance(entry.get("loss"), (int, float)):
            points.append((entry["step"], float(entry["loss"])))
    return points


@dataclass
class RunSummary:
    path: Path
    name: str
    state: str
    identity: float | None = None
    retention: float | None = None
    leakage: float | None = None


def summarize(run_dir: Path) -> RunSummary:
    try:
        name = load_config(run_dir / CONFIG_FILE).data.name
    except SelfcogError:
        name = run_dir.name
    state = jobs.state(run_job_dir(run_dir)).state
    metrics = jobs.read_json(run_dir / "metrics.json")
    if metrics is None:
        return RunSummary(run_dir, name, state)
    tuned = metrics["tuned"]
    return RunSummary(run_dir, name, "done" if state == "done" else state, tuned.get("identity"),
                      tuned.get("retention"), tuned.get("leakage"))
