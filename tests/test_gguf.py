"""`selfcog export-gguf`: the file reads back with transformers' GGUF loader as the model it came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import selfcog.gguf_export as gguf_export
from conftest import CHATML, CORPUS, build_tiny_model, build_tokenizer
from selfcog.cli import main
from selfcog.errors import SelfcogError
from selfcog.gguf_export import export_gguf

TEXTS = ["Who are you? I answer questions.", "你是谁？我是伍鲜同志的小助手。", "<|im_start|>user\nHello!<|im_end|>\n",
         "  spaces,\ttabs and 2024 digits"]


def read_back(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, tokenizer


def metadata(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()
              if name not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                              "tokenizer.ggml.scores")}
    fields["tensor_types"] = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    return fields


def assert_same_model(source_dir: Path, path: Path, atol: float):
    """Same token ids on English, Chinese and special-token text; same weights and logits within `atol`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    model, back_tokenizer = read_back(path)
    for text in TEXTS:
        assert back_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert back_tokenizer.chat_template == tokenizer.chat_template
    # The q/k permutation must be undone exactly: compare the weights themselves, not just the logits.
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        torch.testing.assert_close(model.state_dict()[name], source.state_dict()[name], rtol=0, atol=atol)
    ids = torch.tensor([tokenizer(TEXTS[0] + TEXTS[1])["input_ids"]])
    with torch.no_grad():
        diff = (model(ids).logits - source(ids).logits).abs().max().item()
    assert diff < atol * 10
    return diff


def test_f16_round_trip(tiny_model_dir, tmp_path):
    report = export_gguf(str(tiny_model_dir), tmp_path / "tiny.gguf", "f16")
    assert report["tokens_identical"] and report["layout_error"] < 1e-5 and report["max_abs_logit_diff"] < 1e-2
    assert_same_model(tiny_model_dir, tmp_path / "tiny.gguf", atol=1e-3)
    meta = metadata(tmp_path / "tiny.gguf")
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.chat_template"] == CHATML
    # eos and end-of-turn are <|im_end|> (2), pad is <|endoftext|> (0); this tokenizer has no BOS
    assert (meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.eot_token_id"],
            meta["tokenizer.ggml.padding_token_id"]) == (2, 2, 0)
    assert meta["tokenizer.ggml.add_bos_token"] is False and "tokenizer.ggml.bos_token_id" not in meta
    assert meta["tensor_types"]["blk.0.attn_q.weight"] == "F16"
    assert meta["tensor_types"]["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in meta["tensor_types"]  # tied to token_embd


def test_q8_0_round_trip(tiny_model_dir, tmp_path):
    report = export_gguf(str(tiny_model_dir), tmp_path / "tiny.gguf", "q8_0")
    assert report["layout_error"] < 1e-5 and report["max_abs_logit_diff"] < 0.05
    assert_same_model(tiny_model_dir, tmp_path / "tiny.gguf", atol=2e-3)
    assert metadata(tmp_path / "tiny.gguf")["tensor_types"]["blk.0.ffn_down.weight"] == "Q8_0"


def test_wrong_layout_is_caught_and_nothing_is_written(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_export, "permute_rows", lambda weight, n_head: weight)
    with pytest.raises(SelfcogError, match="do not read back as written"):
        export_gguf(str(tiny_model_dir), tmp_path / "tiny.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


def test_modelfile(tiny_model_dir, tmp_path):
    export_gguf(str(tiny_model_dir), tmp_path / "tiny.gguf", "f16", verify=False)
    text = (tmp_path / "Modelfile").read_text()
    assert text.startswith("FROM ./tiny.gguf\n")
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in text
    assert 'SYSTEM """You are a helpful assistant."""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text


def test_qwen2_with_attention_biases(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=2,
        pad_token_id=0, bos_token_id=None))
    for name, param in model.named_parameters():
        if name.endswith("bias"):  # zero at init; make them count
            torch.nn.init.normal_(param, std=0.5)
    model.save_pretrained(tmp_path / "qwen2")
    tokenizer.save_pretrained(tmp_path / "qwen2")
    export_gguf(str(tmp_path / "qwen2"), tmp_path / "qwen2.gguf", "f16")
    meta = metadata(tmp_path / "qwen2.gguf")
    assert meta["general.architecture"] == "qwen2"
    assert meta["tensor_types"]["blk.0.attn_k.bias"] == "F32" and "output.weight" in meta["tensor_types"]
    assert_same_model(tmp_path / "qwen2", tmp_path / "qwen2.gguf", atol=2e-3)


def sentencepiece_style_tokenizer():
    """A Llama-2-style tokenizer: BPE over `▁`-marked words with byte fallback, <s>/</s>/<unk> first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300))
    learned = json.loads(core.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{byte:02X}>": 3 + byte for byte in range(256)}}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=[tuple(merge) for merge in learned["merges"]], add_bos_token=True)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def test_sentencepiece_tokenizer(tmp_path):
    tokenizer = sentencepiece_style_tokenizer()
    model = build_tiny_model(len(tokenizer))
    model.save_pretrained(tmp_path / "sp")
    tokenizer.save_pretrained(tmp_path / "sp")
    export_gguf(str(tmp_path / "sp"), tmp_path / "sp.gguf", "f16")
    meta = metadata(tmp_path / "sp.gguf")
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.unknown_token_id"] == 0
    assert_same_model(tmp_path / "sp", tmp_path / "sp.gguf", atol=2e-3)


def test_refuses_other_architectures(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    model.save_pretrained(tmp_path / "g")
    tokenizer.save_pretrained(tmp_path / "g")
    with pytest.raises(SelfcogError, match="llama-architecture"):
        export_gguf(str(tmp_path / "g"), tmp_path / "g.gguf")


def test_cli(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(main, ["export-gguf", str(tiny_model_dir), str(tmp_path / "t.gguf"), "--type", "q4"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1 and "--type q4" in result.output
    result = CliRunner().invoke(main, ["export-gguf", str(tiny_model_dir), str(tmp_path / "t.gguf")])
    assert result.exit_code == 0, result.output
    assert "token ids identical" in result.output and (tmp_path / "t.gguf").is_file()
