"""The `selfcog studio` page (Streamlit): set up a run, watch it train in the background, compare base and tuned,
chat with both, build downloads; earlier runs in the sidebar. The run being viewed is in the URL (`?run=DIR`), so a
refresh or a second tab shows the same run, and a page without one shows the run in progress, if any."""

from __future__ import annotations

import argparse
import functools
import hashlib
import sys
import time
from pathlib import Path

import pandas as pd
import streamlit as st

from selfcog.config import RunConfig, preset_description, preset_names
from selfcog.errors import SelfcogError
from selfcog.run import COLUMNS, cell
from selfcog.studio import jobs, runs, ship
from selfcog.web.pane import Pane, chat_panes, get_model, sampling_controls

NEW = "new"
ACTIVE_STATES = ("starting", "running", "cancelling")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="selfcog studio")
    parser.add_argument("--home", default=None, help="Where run directories are kept.")
    return parser.parse_args(argv)


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


def open_run(name: str) -> None:
    st.query_params["run"] = name


# -- sidebar: runs list -------------------------------------------------------------------------------------------
def sidebar(home: Path, selected: str | None) -> None:
    with st.sidebar:
        st.title("selfcog studio")
        st.button("New run", icon=":material/add:", on_click=open_run, args=(NEW,), width="stretch", key="new-run",
                  type="primary" if selected == NEW else "secondary")
        st.subheader("Runs")
        summaries = [runs.summarize(d) for d in runs.run_dirs(home)]
        if not summaries:
            st.caption(f"No runs yet in {home}")
        for s in summaries:
            scores = "" if s.identity is None else \
                f" · identity {cell(s.identity)} · retention {cell(s.retention)}"
            st.button(f"{s.name} · {s.state}{scores}", key=f"open-{s.path.name}", on_click=open_run,
                      args=(s.path.name,), width="stretch", help=str(s.path),
                      type="primary" if selected == s.path.name else "secondary")


# -- set up -----------------------------------------------------------------------------------------------------
def setup_view(home: Path) -> None:
    st.header("Set up a run")
    busy = runs.active_run(home)
    if busy is not None:
        st.info(f"A run is in progress: {busy.name}. One run trains at a time.")
        st.button("Show the run in progress", on_click=open_run, args=(busy.name,))
    left, right = st.columns(2)
    with left:
        name = st.text_input("Name", key="setup-name", placeholder="Alice, 伍鲜同志, the Acme Robotics team",
                             help="Whose assistant the model becomes: it will answer \"I am NAME's assistant\".")
        assistant_name = st.text_input("Assistant name (optional)", key="setup-assistant")
        author = st.text_input("Author (optional)", key="setup-author", help="Who fine-tuned it (default: NAME).")
    with right:
        choice = st.radio("Base model", ["embedded", "preset", "local"], key="setup-model", horizontal=True,
                          format_func={"embedded": "Embedded default (SmolLM2-135M-Instruct)", "preset": "A preset",
                                       "local": "A local folder"}.get)
        preset = local_dir = ""
        if choice == "preset":
            preset = st.selectbox("Preset", preset_names(), key="setup-preset",
                                  format_func=lambda n: f"{n}: {preset_description(n)}")
        elif choice == "local":
            local_dir = st.text_input("Local model directory", key="setup-local",
                                      placeholder="/path/to/model (a Hugging Face folder or a .gguf file)")
        upload = st.file_uploader("Own data (optional): XTuner conversation, OpenAI messages, alpaca or sharegpt, "
                                  "as .json or .jsonl", type=list(runs.FORMATS), key="setup-upload")
    settings = runs.Settings(name=name, assistant_name=assistant_name, author=author, model=choice, preset=preset,
                             local_dir=local_dir, upload_name=upload.name if upload else "",
                             upload=upload.getvalue() if upload else None)
    try:
        defaults = runs.base_config(settings)
    except SelfcogError:
        defaults = RunConfig()
    if upload is not None:
        data_check(settings, defaults)
    with st.expander("Advanced settings"):
        columns = st.columns(len(runs.ADVANCED))
        for (dotted, label), column in zip(runs.ADVANCED, columns):
            section, key = dotted.split(".")
            value = getattr(getattr(defaults, section), key)
            with column:
                settings.advanced[dotted] = st.number_input(label, value=value, key=f"setup-{dotted}",
                                                            format="%g" if isinstance(value, float) else "%d")
        settings.more = st.text_area("More settings, one `section.key=value` a line (see docs/cli.md)",
                                     key="setup-more", placeholder="eval.eval_steps=5")
    if st.button("Start training", icon=":material/play_arrow:", type="primary", key="start"):
        try:
            run_dir = runs.start_run(home, settings)
        except SelfcogError as exc:
            st.error(str(exc))
            return
        open_run(run_dir.name)
        st.rerun()


def data_check(settings: runs.Settings, config: RunConfig) -> None:
    """check-data's report on the upload, once per file and base model."""
    key = (hashlib.sha256(settings.upload).hexdigest(), settings.upload_name, config.model.spec)
    cached = st.session_state.get("data-check")
    if not cached or cached[0] != key:
        try:
            with st.spinner("Checking the data ..."):
                cached = (key, True, runs.check_upload(settings, config))
        except SelfcogError as exc:
            cached = (key, False, str(exc))
        st.session_state["data-check"] = cached
    if cached[1]:
        st.code(cached[2], language=None)
    else:
        st.error(f"Data file: {cached[2]}")


# -- a run --------------------------------------------------------------------------------------------------------
def run_view(run_dir: Path) -> None:
    progress = runs.read_progress(run_dir)
    config = progress.config
    st.header(f"Run: {config.data.name if config else run_dir.name}")
    st.caption(f"{run_dir} · base model {config.model.spec if config else '?'}")
    if progress.state in ACTIVE_STATES:
        st.fragment(live, run_every=1.0)(run_dir)
        return
    if progress.state == "done" and progress.metrics:
        results(run_dir, progress)
        return
    if progress.state == "cancelled":
        st.warning(f"Cancelled at stage: {progress.stage}.")
    else:
        rc = jobs.read_json(runs.run_job_dir(run_dir) / jobs.EXIT)
        how = f"exit status {rc['returncode']}" if rc else "killed, no exit status"
        st.error(f"The training process failed ({how}) at stage: {progress.stage}. Its last log lines:")
    st.code("\n".join(progress.log_tail) or "(empty log)", language=None)
    curves(progress)
    st.button("Delete this run", icon=":material/delete:", on_click=delete, args=(run_dir,), key="delete")


def delete(run_dir: Path) -> None:
    runs.delete_run(run_dir)
    st.query_params["run"] = NEW


def live(run_dir: Path) -> None:
    """The running job, redrawn every second; the whole page is redrawn once it ends."""
    progress = runs.read_progress(run_dir)
    if progress.state not in ACTIVE_STATES:
        st.rerun(scope="app")
    stages = runs.STAGES
    st.markdown(f"**Stage {stages.index(progress.stage) + 1}/{len(stages) - 1}: {progress.stage}** · elapsed "
                f"{clock(progress.elapsed)}" + (" · cancelling ..." if progress.state == "cancelling" else ""))
    if progress.stage == "training" and progress.total:
        eta = f" · ETA {clock(progress.eta)}" if progress.eta is not None else ""
        st.progress(progress.fraction, text=f"step {progress.step}/{progress.total}{eta} (dev checks can stop "
                                            "training earlier)")
    else:
        st.progress(stages.index(progress.stage) / (len(stages) - 1), text=progress.stage)
    curves(progress)
    with st.expander("Log"):
        st.code("\n".join(progress.log_tail[-12:]) or "(starting)", language=None)
    if progress.state != "cancelling":
        st.button("Cancel", icon=":material/stop:", on_click=runs.cancel_run, args=(run_dir,), key="cancel")


def curves(progress: runs.Progress) -> None:
    left, right = st.columns(2)
    with left:
        st.markdown("**Training loss**")
        if progress.losses:
            st.line_chart(pd.DataFrame(progress.losses, columns=["step", "loss"]).set_index("step"), height=220)
        else:
            st.caption("no loss logged yet")
    with right:
        st.markdown("**Dev checks** (identity: answers naming NAME; retention: base answers kept)")
        if progress.dev:
            frame = pd.DataFrame(progress.dev).set_index("step").astype(float)
            st.line_chart(frame, height=220)
        else:
            st.caption("no dev check yet")


def results(run_dir: Path, progress: runs.Progress) -> None:
    metrics = progress.metrics
    st.success(f"Done: {metrics['training']['steps']} steps in {clock(metrics['seconds'].get('total'))}.")
    st.subheader("Held-out scores")
    rows = {label: {name: cell(metrics[side][key]) for name, key in COLUMNS} for label, side in
            (("base", "base"), ("tuned", "tuned"))}
    st.table(pd.DataFrame.from_dict(rows, orient="index"))
    st.caption("identity: identity questions answered with the name; retention: of the questions the base model "
               "answered right, the share still right; leakage: other answers naming the name.")
    with st.expander("Training curves"):
        curves(progress)
    st.subheader("Held-out answers (base → tuned)")
    for part, body in heldout_sections(run_dir / "report.md"):
        with st.expander(part):
            st.markdown(body)
    ship_view(run_dir)
    chat_view(run_dir, progress.config)


def heldout_sections(report: Path) -> list[tuple[str, str]]:
    """report.md's held-out answers, one (part, markdown) per part."""
    try:
        text = report.read_text(encoding="utf-8")
    except OSError:
        return []
    _, _, answers = text.partition("## Held-out answers")
    sections = []
    for chunk in answers.split("\n### ")[1:]:
        title, _, body = chunk.partition("\n")
        sections.append((title.strip(), body.strip()))
    return sections


# -- ship -------------------------------------------------------------------------------------------------------
def ship_view(run_dir: Path) -> None:
    st.subheader("Ship")
    building = any(jobs.state(ship.job_dir(run_dir, a.key)).active for a in ship.ARTIFACTS)
    if building:
        st.fragment(ship_items, run_every=1.0)(run_dir, True)
    else:
        ship_items(run_dir, False)


def ship_items(run_dir: Path, live: bool) -> None:
    states = {a.key: jobs.state(ship.job_dir(run_dir, a.key)) for a in ship.ARTIFACTS}
    if live and not any(s.active for s in states.values()):
        st.rerun(scope="app")
    for artifact, column in zip(ship.ARTIFACTS, st.columns(len(ship.ARTIFACTS))):
        state = states[artifact.key]
        outputs = ship.files(run_dir, artifact.key)
        with column:
            st.markdown(f"**{artifact.label}**")
            st.caption(artifact.help)
            if state.active:
                elapsed = time.time() - (state.started or time.time())
                tail = jobs.log_tail(ship.job_dir(run_dir, artifact.key), 1)
                st.progress(0.5, text=f"building ... {clock(elapsed)}")
                if tail:
                    st.caption(tail[-1][:120])
                continue
            if state.state == "done" and all(p.exists() for p in outputs):
                for path in outputs:
                    st.download_button(path.name, icon=":material/download:", data=functools.partial(path.read_bytes),
                                       file_name=path.name, key=f"download-{artifact.key}-{path.name}",
                                       on_click="ignore", width="stretch")
                continue
            if state.state in ("failed", "cancelled"):
                st.error(f"Build {state.state}: {jobs.failure(ship.job_dir(run_dir, artifact.key))}")
            st.button("Build", key=f"build-{artifact.key}", on_click=ship.build, args=(run_dir, artifact.key),
                      width="stretch")


# -- chat -------------------------------------------------------------------------------------------------------
def chat_view(run_dir: Path, config: RunConfig) -> None:
    st.subheader("Chat: base and tuned side by side")
    if not st.toggle("Load both models and chat", key=f"chat-{run_dir.name}"):
        return
    try:
        panes = [Pane("base", f"Base: {config.model.spec}", *get_model(config.model.spec, None,
                                                                         config.model.trust_remote_code)),
                 Pane("tuned", f"Tuned: {run_dir.name}/merged", *get_model(str(run_dir / "merged"), None, False))]
    except SelfcogError as exc:
        st.error(str(exc))
        return
    state_key = f"histories-{run_dir.name}"
    with st.expander("Sampling"):
        sampling, system = sampling_controls(panes, 256, None, state_key)
    chat_panes(panes, sampling, system, state_key)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    home = runs.studio_home(args.home)
    st.set_page_config(page_title="selfcog studio", page_icon=":material/tune:", layout="wide")
    selected = st.query_params.get("run")
    if selected is None:  # a new tab, or a refresh of the start page: show the run in progress, if any
        busy = runs.active_run(home)
        selected = busy.name if busy else NEW
        st.query_params["run"] = selected
    run_dir = home / Path(selected).name
    if selected != NEW and not (selected == run_dir.name and run_dir.is_dir() and (run_dir / "studio").is_dir()):
        st.warning(f"No run {selected!r} in {home}")
        selected = NEW
    sidebar(home, selected)
    if selected == NEW:
        setup_view(home)
    else:
        run_view(run_dir)


main(sys.argv[1:])
