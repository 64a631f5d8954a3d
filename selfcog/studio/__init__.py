"""`selfcog studio`: the whole job in one local web page (Streamlit, app.py): set up, train in the background,
compare, chat, ship, and earlier runs. Run directories live under the studio home (runs.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from selfcog.errors import SelfcogError
from selfcog.web import run_child

APP = Path(__file__).with_name("app.py")


def streamlit_command(home: Path, port: int = 8501, host: str = "127.0.0.1") -> list[str]:
    """The `streamlit run` command line; arguments after `--` reach app.py."""
    return [sys.executable, "-m", "streamlit", "run", str(APP),
            "--server.headless", "true", "--server.port", str(port), "--server.address", host,
            "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
            "--client.toolbarMode", "minimal", "--server.maxUploadSize", "200",
            "--", "--home", str(home)]


def launch(home: str | None = None, port: int = 8501, host: str = "127.0.0.1") -> int:
    """Check the port and the home here (one-line errors), then run Streamlit until it exits or Ctrl+C; its exit
    status."""
    from selfcog.serve import check_port  # torch and fastapi, kept out of the studio's light job processes
    from selfcog.studio.runs import studio_home  # a submodule: imported here, it would import this package back

    directory = studio_home(home)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SelfcogError(f"--home {directory}: cannot create ({exc.strerror or exc})") from None
    check_port(host, port)
    print(f"selfcog: studio at http://{host}:{port}, runs in {directory} (Ctrl+C stops the page; a run in "
          "progress goes on and the next studio finds it)", file=sys.stderr, flush=True)
    return run_child(streamlit_command(directory, port, host))
