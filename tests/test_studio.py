"""`selfcog studio`: run directories, background jobs (start, progress, cancel, crash, one at a time), bad input,
and the page driven end to end in headless chromium on a tiny random model."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sys
import time
import zipfile
from pathlib import Path

import pytest

from conftest import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, WATCH_FOR_CURSOR, streamlit_page
from selfcog.config import RunConfig, save_config
from selfcog.errors import SelfcogError
from selfcog.gguf_export import identity_failure
from selfcog.run import COLUMNS
from selfcog.studio import APP, jobs, runs, ship, streamlit_command

FAST = {"train.batch_size": 4, "eval.eval_steps": 10, "eval.min_steps": 0, "eval.max_new_tokens": 4,
        "eval.ask_max_new_tokens": 4,
        "data.preserve_max_new_tokens": 6, "data.preserve_ratio": 0.2, "train.logging_steps": 2}


def fast_settings(model_dir: Path, name: str = "Alice", steps: int = 6, **kw) -> runs.Settings:
    more = "\n".join(f"{k}={v}" for k, v in {**FAST, "train.max_steps": steps}.items())
    return runs.Settings(name=name, model="local", local_dir=str(model_dir), more=more, **kw)


def wait_for(run_dir: Path, done, timeout: float = 180) -> runs.Progress:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = runs.read_progress(run_dir)
        if done(progress):
            return progress
        time.sleep(0.2)
    pytest.fail(f"run not there after {timeout}s: {progress}\n" + "\n".join(progress.log_tail))


def finished(progress: runs.Progress) -> bool:
    return progress.state not in ("starting", "running", "cancelling")


def page(home: Path, run_name: str):
    """The studio page showing run `run_name`, run once in this process (Streamlit's AppTest)."""
    from streamlit.testing.v1 import AppTest

    sys_argv = sys.argv
    sys.argv = [str(APP), "--home", str(home)]
    try:
        app = AppTest.from_file(str(APP), default_timeout=60)
        app.query_params["run"] = run_name
        app.run()
    finally:
        sys.argv = sys_argv
    assert not app.exception, app.exception
    return app


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "studio"


@pytest.fixture(autouse=True)
def no_job_left(home):
    """Every background job a test starts is gone when it ends."""
    yield
    for job in home.glob("*/studio/*/"):
        info = jobs.read_json(job / jobs.JOB)
        if info and jobs.alive(info):
            os.killpg(info["pid"], signal.SIGKILL)


# -- bad input --------------------------------------------------------------------------------------------------
BROKEN = '[{"conversation": [{"input": "Who are you?", "output": "I am A."}]}, {"conversation": [{"input": 3}]}]'


@pytest.mark.parametrize("change, message", [
    ({"name": "  "}, "Name: "),
    ({"local_dir": "/no/such/model"}, "Local model directory: /no/such/model does not exist"),
    ({"upload_name": "d.json", "upload": BROKEN.encode()}, "d.json: record 1"),
    ({"upload_name": "d.json", "upload": b"[{\"conversation\": ["}, "d.json"),
    ({"upload_name": "d.csv", "upload": b"a,b"}, "expected a .json or .jsonl file"),
    ({"more": "train.nope=1"}, "More settings: unknown setting 'train.nope'"),
    ({"more": "train.max_steps"}, "More settings: train.max_steps: expected key=value"),
])
def test_bad_input_is_named_and_creates_no_run_directory(tiny_model_dir, home, change, message):
    settings = fast_settings(tiny_model_dir)
    for key, value in change.items():
        setattr(settings, key, value)
    with pytest.raises(SelfcogError) as error:
        runs.start_run(home, settings)
    assert message in str(error.value)
    assert runs.run_dirs(home) == [] and not [p for p in home.glob("*") if p.name != ".lock"]


def test_upload_check_shows_counts_and_duplicates(tiny_model_dir):
    records = [{"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "A."}]}]
    settings = fast_settings(tiny_model_dir, upload_name="mine.jsonl",
                             upload="\n".join(json.dumps(r) for r in records * 3).encode())
    report = runs.check_upload(settings, runs.base_config(settings))
    assert report.startswith("mine.jsonl: OK")
    assert "records           3" in report and "exact duplicates  2" in report


# -- background runs --------------------------------------------------------------------------------------------
def test_a_run_writes_the_selfcog_run_layout_and_one_runs_at_a_time(tiny_model_dir, home):
    run_dir = runs.start_run(home, fast_settings(tiny_model_dir, steps=6))
    with pytest.raises(SelfcogError, match="A run is in progress"):
        runs.start_run(home, fast_settings(tiny_model_dir))
    progress = wait_for(run_dir, finished)
    assert progress.state == "done", progress.log_tail
    assert progress.stage == "done" and progress.step == progress.total == 6
    assert [step for step, _ in progress.losses] == [2, 4, 6]
    assert [d["step"] for d in progress.dev] == [] or all(d["step"] % 10 == 0 for d in progress.dev)
    for part in ("merged/config.json", "adapter/adapter_config.json", "report.md", "metrics.json", "log.jsonl",
                 "data/identity.json", "selfcog.yaml"):
        assert (run_dir / part).exists(), part
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]
    summary = runs.summarize(run_dir)
    assert (summary.name, summary.state, summary.identity) == ("Alice", "done", progress.metrics["tuned"]["identity"])


def test_progress_is_read_while_training_and_cancel_stops_the_job(tiny_model_dir, home):
    run_dir = runs.start_run(home, fast_settings(tiny_model_dir, steps=2000))
    progress = wait_for(run_dir, lambda p: p.stage == "training" and p.step >= 3)
    assert progress.state == "running" and progress.total == 2000 and progress.eta is not None
    info = jobs.read_json(runs.run_job_dir(run_dir) / jobs.JOB)
    runs.cancel_run(run_dir)
    assert not jobs.alive(info)
    progress = runs.read_progress(run_dir)
    assert progress.state == "cancelled" and not (run_dir / "metrics.json").exists()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # the trainer's temp dir is gone
    assert runs.active_run(home) is None
    runs.delete_run(run_dir)
    assert runs.run_dirs(home) == []


def test_a_crashed_run_is_shown_with_its_last_log_lines(tiny_model_dir, home, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for path in tiny_model_dir.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not weights")
    run_dir = runs.start_run(home, fast_settings(broken))
    progress = wait_for(run_dir, finished)
    assert progress.state == "failed" and "header" in progress.log_tail[-1]  # safetensors could not read it

    app = page(home, run_dir.name)
    assert app.error[0].value.startswith("The training process failed (exit status 1) at stage: loading the model")
    assert app.code[0].value.endswith(progress.log_tail[-1])


def finished_run(home: Path, name: str = "Alice") -> Path:
    """A run directory as a finished run leaves it (config, metrics, merged/, a job that ended with status 0),
    without training."""
    run_dir = home / "alice-run"
    (run_dir / "merged").mkdir(parents=True)
    config = RunConfig()
    config.data.name = name
    save_config(config, run_dir)
    scores = {key: 0.5 for _, key in COLUMNS}
    (run_dir / "metrics.json").write_text(json.dumps({"base": scores, "tuned": scores, "training": {"steps": 6},
                                                      "seconds": {"total": 12.0}}))
    jobs.start(runs.run_job_dir(run_dir), [sys.executable, "-c", "pass"])
    assert wait_ended(runs.run_job_dir(run_dir)).state == "done"
    return run_dir


def wait_ended(job: Path, timeout: float = 30) -> jobs.JobState:
    deadline = time.monotonic() + timeout
    while jobs.state(job).active and time.monotonic() < deadline:
        time.sleep(0.1)
    return jobs.state(job)


def test_a_gguf_build_that_loses_the_identity_shows_export_gguf_s_one_line(home, monkeypatch):
    """export-gguf refuses a file that lost the identity in llama.cpp (exit 2, one line); the page shows that line,
    also when more output follows it."""
    run_dir = finished_run(home)
    failure = identity_failure({"identity": 0.0, "source_identity": 1.0, "name": "Alice"}, "q8_0")
    message = f"{ship.files(run_dir, 'gguf')[0]}: not written: {failure}; --force keeps it"
    fake_export = (  # what export-gguf writes, then lines llama.cpp or Python may still write as the process ends
        "import sys\n"
        "print('selfcog: answering 24 identity questions with the source model ...', file=sys.stderr)\n"
        "print('selfcog: loading alice-run-q8_0.gguf in llama.cpp and asking 24 identity questions ...', "
        "file=sys.stderr)\n"
        f"print({jobs.ERROR + message!r}, file=sys.stderr)\n"
        "print('llama_context: freeing', file=sys.stderr)\nprint('ggml: done', file=sys.stderr)\n"
        "print('a warning at exit', file=sys.stderr)\nsys.exit(2)\n")
    monkeypatch.setattr(ship, "command", lambda run_dir, key: [sys.executable, "-c", fake_export])
    ship.build(run_dir, "gguf")
    job = ship.job_dir(run_dir, "gguf")
    state = wait_ended(job)
    assert (state.state, state.returncode) == ("failed", 2)
    assert jobs.failure(job) == message

    app = page(home, run_dir.name)
    assert [e.value for e in app.error] == [f"Build failed: {message}"]
    assert "Held-out scores" in [h.value for h in app.subheader]


def test_a_job_records_how_it_ended(tmp_path):
    job = tmp_path / "job"
    jobs.start(job, [sys.executable, "-c", "import sys; print('hello'); sys.exit(3)"])
    state = wait_ended(job)
    assert (state.state, state.returncode) == ("failed", 3) and jobs.log_tail(job) == ["hello"]
    assert jobs.failure(job) == "hello"  # no `selfcog: error:` line: the last log lines
    assert jobs.screen_lines("a\r 1/3\r 2/3\nb\n\n") == [" 2/3", "b"]


def test_ship_zips_and_deploy_bundles_are_atomic(tiny_model_dir, tmp_path):
    target = ship.zip_dir(tiny_model_dir, tmp_path / "ship" / "m.zip")
    with zipfile.ZipFile(target) as archive:
        assert "m/config.json" in archive.namelist()
    bundle = ship.deploy_zip(str(tiny_model_dir), tmp_path / "ship" / "app-openxlab.zip", "openxlab")
    with zipfile.ZipFile(bundle) as archive:
        names = archive.namelist()
    assert "app-openxlab/app.py" in names and "app-openxlab/model/config.json" in names
    assert sorted(p.name for p in (tmp_path / "ship").iterdir()) == ["app-openxlab.zip", "m.zip"]


def test_cli_builds_the_streamlit_command(tmp_path):
    cmd = streamlit_command(tmp_path, port=8600)
    assert cmd[:5] == [sys.executable, "-m", "streamlit", "run", str(APP)]
    assert cmd[cmd.index("--server.port") + 1] == "8600" and cmd[cmd.index("--") + 1:] == ["--home", str(tmp_path)]


def test_cli_rejects_a_bad_port_in_one_line():
    from click.testing import CliRunner

    from selfcog.cli import main

    result = CliRunner().invoke(main, ["studio", "--port", "70000"])
    assert result.exit_code == 2 and result.stderr.startswith("selfcog: error: --port 70000")


# -- the page in a browser --------------------------------------------------------------------------------------
@pytest.fixture
def studio_server(home, tmp_path, free_port):
    """`selfcog studio --home HOME` on a free port."""
    port = free_port()
    with streamlit_page(["studio", "--port", str(port), "--home", str(home)], port, tmp_path / "studio.log") as url:
        yield url


GLYPH_BOXES = """(el, text) => {
    const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
        const at = node.data.indexOf(text);
        if (at < 0) continue;
        return [...text].map((_, k) => {
            const range = document.createRange();
            range.setStart(node, at + k);
            range.setEnd(node, at + k + 1);
            const r = range.getBoundingClientRect();
            return [r.x, r.y, r.width, r.height];
        });
    }
    return null;
}"""


def glyph_images(page, locator, text: str) -> list:
    """Each character of `text` inside `locator` as drawn on screen, cut out of a screenshot and cropped to its ink,
    scaled to 24x24 (grayscale arrays); None for a character drawn without ink."""
    import numpy as np
    from PIL import Image

    locator.scroll_into_view_if_needed()
    boxes = locator.evaluate(GLYPH_BOXES, text)
    assert boxes, f"{text!r} is not on the page"
    shot = Image.open(io.BytesIO(page.screenshot())).convert("L")
    scale = shot.width / page.viewport_size["width"]
    images = []
    for x, y, w, h in boxes:
        cell = shot.crop(tuple(round(v * scale) for v in (x, y, x + w, y + h)))
        ink = Image.eval(cell, lambda v: 255 if v < 160 else 0).getbbox()
        images.append(None if ink is None else np.asarray(cell.crop(ink).resize((24, 24)), dtype=float))
    return images


def drawn_distinctly(images: list) -> bool:
    """Every glyph has ink, and no two glyphs look alike: missing glyphs are drawn as identical boxes (or nothing)."""
    if any(img is None for img in images):
        return False
    return all(abs(a - b).mean() > 30 for i, a in enumerate(images) for b in images[i + 1:])


def assert_cjk_drawn(page, locator, text: str) -> None:
    """`text` (Chinese) is drawn with real glyphs: checked against characters no font has (U+E000...), which the
    same check must reject, in the same element and font."""
    assert drawn_distinctly(glyph_images(page, locator, text)), \
        f"{text!r} is not drawn with real glyphs (no CJK font? apt-get install fonts-noto-cjk)"
    missing = "\ue000\ue001\ue002\ue003"
    locator.evaluate("(el, t) => { const s = document.createElement('span'); s.id = 'missing-glyphs'; "
                     "s.textContent = ' ' + t; el.appendChild(s); }", missing)
    assert not drawn_distinctly(glyph_images(page, page.locator("#missing-glyphs"), missing))
    page.locator("#missing-glyphs").evaluate("el => el.remove()")


def progress_bar(page):
    # The run page's progress bar, not the set-up form's "Most training steps" label or settings box, which
    # Streamlit may still show greyed out while the page reruns into the run view.
    return page.get_by_test_id("stProgress").filter(has_text=re.compile(r"step \d+/\d+")).first


def step_shown(page) -> tuple[int, int]:
    text = progress_bar(page).inner_text()
    found = re.search(r"step (\d+)/(\d+)", text)
    return (int(found[1]), int(found[2])) if found else (0, 0)


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)")
def test_browser_set_up_train_reattach_compare_chat_download(studio_server, tiny_model_dir, home, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    name = "伍鲜同志"
    more = "\n".join(f"{k}={v}" for k, v in {**FAST, "train.max_steps": 200, "eval.eval_steps": 40}.items())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
            page.goto(studio_server)
            expect(page.get_by_role("heading", name="Set up a run")).to_be_visible(timeout=90_000)
            start = page.get_by_role("button", name="Start training")
            errors = page.get_by_test_id("stAlertContentError")

            # Bad input: a message on the page, no run directory.
            start.click()
            expect(errors.first).to_contain_text("Name: ", timeout=30_000)
            page.get_by_label("Name", exact=True).fill(name)
            page.get_by_text("A local folder").click()
            local = page.get_by_label("Local model directory")
            local.fill(str(tmp_path / "no-such-model"))
            local.press("Enter")
            start.click()
            expect(errors.first).to_contain_text("does not exist", timeout=30_000)
            broken = tmp_path / "broken.json"
            broken.write_text(BROKEN)
            page.locator("input[type=file]").set_input_files(str(broken))
            expect(errors.first).to_contain_text("Data file: ", timeout=30_000)
            expect(errors.first).to_contain_text("record 1")
            page.screenshot(path=str(ARTIFACTS / "studio-1-bad-input.png"), full_page=True)
            start.click()
            expect(errors.first).to_contain_text("record 1", timeout=30_000)
            assert runs.run_dirs(home) == []
            page.get_by_test_id("stFileChipDeleteBtn").click()
            expect(errors).to_have_count(0, timeout=30_000)

            # A good start: the tiny model, fast settings.
            local.fill(str(tiny_model_dir))
            local.press("Enter")
            page.locator("summary").filter(has_text="Advanced settings").first.click()
            page.get_by_label("More settings").fill(more)
            page.get_by_label("More settings").press("Control+Enter")
            page.screenshot(path=str(ARTIFACTS / "studio-2-set-up.png"), full_page=True)
            start.click()
            expect(page.get_by_role("heading", name=f"Run: {name}")).to_be_visible(timeout=60_000)
            expect(progress_bar(page)).to_be_visible(timeout=120_000)
            first = step_shown(page)
            page.wait_for_function("() => /step ([0-9]+)\\//.exec(document.body.innerText)?.[1] > " + str(first[0] + 4),
                                   timeout=60_000)
            moved = step_shown(page)
            assert moved[0] > first[0] and moved[1] == 200
            page.screenshot(path=str(ARTIFACTS / "studio-3-training.png"), full_page=True)
            url = page.url

            # A refresh and a second tab show the same run going on; nothing is started twice.
            page.reload()
            expect(page.get_by_role("heading", name=f"Run: {name}")).to_be_visible(timeout=60_000)
            assert page.url == url
            expect(progress_bar(page)).to_be_visible(timeout=60_000)
            assert step_shown(page)[0] >= moved[0]
            other = browser.new_page(viewport={"width": 1400, "height": 1000})
            other.goto(studio_server)
            expect(other.get_by_role("heading", name=f"Run: {name}")).to_be_visible(timeout=60_000)
            other.close()
            assert len(runs.run_dirs(home)) == 1
            page.screenshot(path=str(ARTIFACTS / "studio-4-reattached.png"), full_page=True)

            # Results: the before/after table, the held-out answers; Chinese drawn with real glyphs.
            expect(page.get_by_role("heading", name="Held-out scores")).to_be_visible(timeout=240_000)
            table = page.get_by_test_id("stTable")
            expect(table).to_contain_text("base")
            expect(table).to_contain_text("tuned")
            expect(table).to_contain_text("identity")
            run_dir = runs.run_dirs(home)[0]
            assert json.loads((run_dir / "metrics.json").read_text())["training"]["steps"] == 200
            zh = page.get_by_test_id("stExpander").filter(has=page.locator("summary").get_by_text("zh", exact=True))
            zh.locator("summary").click()
            expect(zh.locator("strong").first).to_be_visible(timeout=30_000)
            assert_cjk_drawn(page, page.get_by_role("heading", name=f"Run: {name}"), name)
            windows = [(text, r[i:i + 4]) for text in zh.locator("strong").all_inner_texts()
                       for r in re.findall("[\u4e00-\u9fff]{4,}", text) for i in range(len(r) - 3)
                       if len(set(r[i:i + 4])) == 4]
            assert windows, "no zh question with four different characters in a row"
            text, cjk = windows[0]
            question = zh.locator("strong").filter(has_text=text).first
            assert_cjk_drawn(page, question, cjk)
            page.screenshot(path=str(ARTIFACTS / "studio-5-results.png"), full_page=True)

            # Ship: the merged model as a zip, downloaded and loaded back.
            page.get_by_role("button", name="Build").first.click()
            download_button = page.get_by_role("button", name=f"{run_dir.name}-merged.zip")
            expect(download_button).to_be_visible(timeout=120_000)
            with page.expect_download() as info:
                download_button.click()
            target = tmp_path / "downloaded.zip"
            info.value.save_as(target)
            with zipfile.ZipFile(target) as archive:
                archive.extractall(tmp_path / "unzipped")
            from transformers import AutoModelForCausalLM, AutoTokenizer

            merged = tmp_path / "unzipped" / f"{run_dir.name}-merged"
            assert AutoModelForCausalLM.from_pretrained(merged).config.vocab_size == len(
                AutoTokenizer.from_pretrained(merged))

            # Chat: base and tuned side by side, answers streamed with a cursor.
            page.get_by_text("Load both models and chat").click()
            box = page.get_by_test_id("stChatInputTextArea")
            expect(box).to_be_visible(timeout=90_000)
            page.evaluate(WATCH_FOR_CURSOR)
            box.fill("你是谁？Who are you?")
            box.press("Enter")
            page.wait_for_function("""() => {
                const m = document.querySelectorAll('[data-testid="stChatMessage"]');
                return window.sawCursor && m.length === 4 && [...m].every(x => x.innerText.trim().length > 0
                    && !x.innerText.includes('\u258c'));
            }""", timeout=90_000)
            page.screenshot(path=str(ARTIFACTS / "studio-6-chat.png"), full_page=True)
        finally:
            browser.close()
