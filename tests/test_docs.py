"""The documentation matches the product: docs/cli.md is the commands' current --help, links resolve, the README
stays short, and no file narrates the project's development history."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.fixture(scope="module")
def gen_cli_docs():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_current(gen_cli_docs):
    stored = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert stored == gen_cli_docs.render(), "docs/cli.md is stale: run python scripts/gen_cli_docs.py"


def test_cli_reference_covers_every_command(gen_cli_docs):
    from selfcog.cli import main

    documented = {path for path, _ in gen_cli_docs.helps(main, "selfcog")}
    assert {f"selfcog {name}" for name in main.commands} <= documented
    assert {"selfcog config list", "selfcog config copy"} <= documented


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 150


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # code blocks hold no links
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = page.parent / path if path else page
        if not linked.exists() or anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)} links to missing files or headings: {missing}"


# Numbered rounds of work: the word "session" followed by a number, with or without a hyphen or an "s", or in the
# possessive, or after "this", "earlier", "previous" or "last". Streamlit's session_state and HTTP sessions pass.
DIARY = re.compile(r"\bsession(?:s?[- _]?\d|'s)|\b(?:this|earlier|previous|last) session\b", re.I)


def test_no_development_history_in_the_repository():
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    hits = []
    for name in filter(None, files):
        path = ROOT / name
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):  # binary files, files deleted in the working tree
            continue
        hits += [f"{name}:{n}: {line.strip()[:100]}" for n, line in enumerate(text.splitlines(), 1)
                 if DIARY.search(line)]
    assert not hits, "describe things by what they are, or by version/date/machine:\n" + "\n".join(hits)
