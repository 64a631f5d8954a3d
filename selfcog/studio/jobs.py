"""Background jobs of `selfcog studio`: a command run detached from the page, in its own process group, that a
page refresh, a second tab or a restarted studio finds again from its job directory.

A job directory holds `job.json` (pid, the process's start time, the command), `log` (its stdout and stderr),
`exit.json` (its exit status, written once it ends) and `cancel` (written when the page cancels it). The process
started is `python -m selfcog.studio.jobs wrap JOB_DIR -- COMMAND...`: it runs COMMAND and records its exit
status, so a job that ended is told apart from one that was killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from selfcog.atomic import write_text

JOB, LOG, EXIT, CANCEL = "job.json", "log", "exit.json", "cancel"
ERROR = "selfcog: error: "
"""How a selfcog command starts the one line that says why it failed (exit status 2)."""


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (Linux), None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def alive(info: dict) -> bool:
    """Whether the job's process still runs (the same process: a reused pid has another start time)."""
    if Path("/proc/self/stat").exists():
        start = process_start(info["pid"])
        return start is not None and start == info.get("start")
    try:
        os.kill(info["pid"], 0)
    except OSError:
        return False
    return True


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def start(job_dir: Path, command: list[str], env: dict | None = None) -> dict:
    """Start COMMAND as a detached job writing into `job_dir`; returns what job.json records."""
    job_dir.mkdir(parents=True, exist_ok=True)
    for name in (EXIT, CANCEL):
        (job_dir / name).unlink(missing_ok=True)
    with open(job_dir / LOG, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "selfcog.studio.jobs", "wrap", str(job_dir), "--", *command],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=dict(env or os.environ, PYTHONUNBUFFERED="1"))
    threading.Thread(target=proc.wait, daemon=True).start()  # reaps it if it ends while this server runs
    info = {"pid": proc.pid, "start": process_start(proc.pid), "started": time.time(), "command": command}
    write_text(job_dir / JOB, json.dumps(info, ensure_ascii=False))
    return info


@dataclass
class JobState:
    state: str
    """`none` (never started), `starting`, `running`, `cancelling`, `done`, `failed` or `cancelled`."""
    returncode: int | None = None
    started: float | None = None
    ended: float | None = None

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running", "cancelling")


def state(job_dir: Path, starting_grace: float = 30.0) -> JobState:
    info = read_json(job_dir / JOB)
    cancelled = (job_dir / CANCEL).exists()
    ended = read_json(job_dir / EXIT)
    started = info["started"] if info else None
    if ended is not None:
        rc = ended["returncode"]
        kind = "cancelled" if cancelled else "done" if rc == 0 else "failed"
        return JobState(kind, rc, started, ended.get("ended"))
    if info is None:
        # The page writes job.json right after starting the process; a directory younger than the grace period
        # without one is being started now.
        if job_dir.exists() and time.time() - job_dir.stat().st_mtime < starting_grace:
            return JobState("starting")
        return JobState("none")
    if alive(info):
        return JobState("cancelling" if cancelled else "running", None, started)
    return JobState("cancelled" if cancelled else "failed", None, started)  # killed before it could say


def cancel(job_dir: Path, grace: float = 10.0) -> None:
    """SIGTERM to the job's process group, SIGKILL after `grace` seconds; `cancel` marks it as asked for."""
    info = read_json(job_dir / JOB)
    write_text(job_dir / CANCEL, str(time.time()))
    if not info or not alive(info):
        return
    try:
        os.killpg(info["pid"], signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and alive(info):
        time.sleep(0.1)
    if alive(info):
        try:
            os.killpg(info["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


def log_tail(job_dir: Path, lines: int = 20) -> list[str]:
    """The last lines of the job's log, each progress-bar line as last redrawn."""
    return screen_lines(read_log(job_dir))[-lines:]


def failure(job_dir: Path, lines: int = 3) -> str:
    """Why the job failed, in one line: the last `selfcog: error: ...` line of its log (what a selfcog command
    says when it refuses, such as export-gguf's identity check), else its last log lines."""
    shown = screen_lines(read_log(job_dir))
    errors = [line[len(ERROR):] for line in shown if line.startswith(ERROR)]
    return errors[-1] if errors else " / ".join(shown[-lines:])


def read_log(job_dir: Path) -> str:
    try:
        return (job_dir / LOG).read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return ""


def screen_lines(text: str) -> list[str]:
    """Lines as a terminal shows them: a carriage return redraws the line."""
    shown = (line.rsplit("\r", 1)[-1] if line.rstrip("\r") else "" for line in text.split("\n"))
    return [line for line in (s.rstrip() for s in shown) if line.strip()]


def wrap(job_dir: Path, command: list[str]) -> int:
    """Run COMMAND in this process group, then write exit.json. SIGTERM (a cancel, sent to the whole group) ends
    COMMAND; this process outlives it to record how it ended."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(command, preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    while True:
        try:
            rc = child.wait()
            break
        except KeyboardInterrupt:
            continue
    write_text(job_dir / EXIT, json.dumps({"returncode": rc, "ended": time.time()}))
    return rc


def main(argv: list[str]) -> int:
    if len(argv) >= 4 and argv[0] == "wrap" and argv[2] == "--":
        return wrap(Path(argv[1]), argv[3:])
    print("usage: python -m selfcog.studio.jobs wrap JOB_DIR -- COMMAND...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
