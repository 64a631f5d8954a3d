"""Where selfcog keeps what it fetches and computes once: a leaf module (no torch), so any module can ask."""

from __future__ import annotations

import os
from pathlib import Path

COMPLETE_MARKER = "selfcog-complete.json"
"""Written last into a converted model directory: its presence means the conversion finished."""


def selfcog_home() -> Path:
    """Cache root: `$SELFCOG_HOME`, default `~/.cache/selfcog`."""
    return Path(os.environ.get("SELFCOG_HOME", "~/.cache/selfcog")).expanduser()
