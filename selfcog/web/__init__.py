"""`selfcog web`: the Streamlit chat demo (app.py), launched as `python -m streamlit run` in a subprocess."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from pathlib import Path

from selfcog.errors import SelfcogError

APP = Path(__file__).with_name("app.py")


def streamlit_command(spec: str, port: int = 8501, host: str = "127.0.0.1", compare: str | None = None,
                      adapter: str | tuple[str, ...] | None = None, system: str | None = None,
                      max_new_tokens: int = 512, trust_remote_code: bool = False) -> list[str]:
    """The `streamlit run` command line; arguments after `--` reach app.py."""
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP),
           "--server.headless", "true", "--server.port", str(port), "--server.address", host,
           "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
           "--client.toolbarMode", "minimal",
           "--", "--model", spec, "--max-new-tokens", str(max_new_tokens)]
    for flag, value in (("--compare", compare), ("--system", system)):
        if value:
            cmd += [flag, value]
    for value in ([adapter] if isinstance(adapter, str) else adapter or []):
        cmd += ["--adapter", value]
    if trust_remote_code:
        cmd.append("--trust-remote-code")
    return cmd


def launch(spec: str, port: int = 8501, host: str = "127.0.0.1", compare: str | None = None,
           adapter: str | tuple[str, ...] | None = None, system: str | None = None, max_new_tokens: int = 512,
           trust_remote_code: bool = False) -> int:
    """Check the inputs here (one-line errors), then run Streamlit until it exits or Ctrl+C; its exit status."""
    from selfcog.models import resolve_model  # torch: `selfcog --help` imports this module
    from selfcog.serve import check_port  # torch and fastapi, as above

    if max_new_tokens < 1:
        raise SelfcogError(f"--max-new-tokens must be >= 1 (got {max_new_tokens})")
    from selfcog.chat import parse_adapters  # torch, as above

    parse_adapters([adapter] if isinstance(adapter, str) else adapter or [], spec)  # one-line errors here
    check_port(host, port)
    for model in (spec, compare):
        if model:
            resolve_model(model)  # fetches/converts the embedded model here, with progress in the terminal
    print(f"selfcog: web demo at http://{host}:{port} (Ctrl+C stops it)", file=sys.stderr, flush=True)
    return run_child(streamlit_command(spec, port, host, compare, adapter, system, max_new_tokens,
                                       trust_remote_code))


def end_with_parent() -> None:
    """In the child, before exec: Linux sends it SIGTERM when the parent dies, even by SIGKILL."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_child(cmd: list[str]) -> int:
    """Run `cmd` until it exits; SIGINT or SIGTERM to this process ends it too (terminate, then kill after 10 s).

    Its exit status, or 128 + the signal number when a signal ended this process."""
    proc = subprocess.Popen(cmd, preexec_fn=end_with_parent if sys.platform == "linux" else None)
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return 128 + (received[0] if received else signal.SIGINT)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
