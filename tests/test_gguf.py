"""`selfcog export-gguf`: the file reads back with transformers' GGUF loader as the model it came from, llama.cpp
itself loads and answers every --type (when llama-cpp-python is installed), and the Ollama Modelfile renders the
same prompts as the HF chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import selfcog.gguf_export as gguf_export
import selfcog.gguf_llama as gguf_llama
from conftest import CHATML, CORPUS, build_tiny_model, build_tokenizer
from selfcog.cli import main
from selfcog.data.identity import heldout_questions
from selfcog.errors import SelfcogError
from selfcog.gguf_export import export_gguf
from selfcog.modelfile import PROBES, chat_format, ollama_prompt, render_go_template
from selfcog.templates import set_default_system_prompt

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
    report = json.loads((tmp_path / "tiny.gguf.report.json").read_text())
    assert report["type"] == "f16" and report["size_bytes"] == (tmp_path / "tiny.gguf").stat().st_size
    assert report["identity_check"] == "skipped" and "llama_cpp" not in report


# SmolLM2-135M-Instruct's chat template, as shipped.
SMOLLM2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                    "{% endif %}")
CONVERSATIONS = [
    [{"role": "system", "content": "You answer in one line.\nBe kind."}, {"role": "user", "content": "Who are you?"},
     {"role": "assistant", "content": "I am Alice's assistant."}, {"role": "user", "content": "你能做什么？"},
     {"role": "assistant", "content": "回答问题。\n"}, {"role": "user", "content": "Thanks!"}],
    [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "An assistant."},
     {"role": "user", "content": "And who made you?"}],
    [{"role": "user", "content": "Hi"}],
]


def modelfile_matches_hf(tokenizer, bos_added: bool) -> str:
    """The Modelfile's TEMPLATE + SYSTEM, rendered as Ollama does (+ the BOS the runtime adds), equals the HF chat
    template's prompt for multi-turn conversations with and without a system prompt. Returns the Modelfile."""
    from selfcog.modelfile import modelfile

    text = modelfile("m.gguf", tokenizer, bos_added)
    assert 'TEMPLATE """' in text, text
    bos = tokenizer.bos_token if bos_added else ""
    for messages in CONVERSATIONS:
        wanted = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ollama_prompt(text, messages, bos) == wanted
    return text


@pytest.mark.parametrize("system", [None, "You are Alice's assistant, made by \"Alice\" {{not an action}}."])
def test_modelfile_template_renders_like_smollm2_chat_template(system):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    tokenizer.bos_token = "<|im_start|>"  # as SmolLM2's tokenizer has it (the GGUF does not add it)
    if system:
        assert set_default_system_prompt(tokenizer, system)
    text = modelfile_matches_hf(tokenizer, bos_added=False)
    expected = system or "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert f'SYSTEM """{expected}"""' in text
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}' in text


def test_modelfile_template_renders_like_internlm2_chat_template(tmp_path):
    from selfcog.testing import write_tiny_internlm2

    from selfcog.gguf_export import adds_special
    from selfcog.models import tokenizer_from_source

    tokenizer = tokenizer_from_source(str(write_tiny_internlm2(tmp_path / "internlm2")))
    assert tokenizer.apply_chat_template(CONVERSATIONS[2], tokenize=False).startswith("<s><|im_start|>user")
    # The GGUF tells llama.cpp to add BOS itself: the TEMPLATE must not write a second one.
    assert adds_special(tokenizer)[0]
    text = modelfile_matches_hf(tokenizer, bos_added=True)
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>' in text and "SYSTEM" not in text
    assert 'TEMPLATE """<s>' in modelfile_matches_hf(tokenizer, bos_added=False)


def test_modelfile_template_per_role_and_unrepresentable_templates():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{{ '<|begin|>' }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[U]' + m['content'] + '[/U]\n' }}"
        "{% elif m['role'] == 'system' %}{{ '<<SYS>>' + m['content'] + '<</SYS>>' }}{% else %}"
        "{{ ' ' + m['content'] + '</s>' }}{% endif %}{% endfor %}")
    assert chat_format(tokenizer).generation == ""
    text = modelfile_matches_hf(tokenizer, bos_added=False)
    assert '{{ if eq .Role "system" }}<<SYS>>' in text
    # A template whose output depends on more than the messages' roles and contents gets no TEMPLATE.
    tokenizer.chat_template = "{% for m in messages %}{{ loop.index ~ m['content'] }}{% endfor %}"
    assert chat_format(tokenizer) is None
    from selfcog.modelfile import modelfile

    assert "TEMPLATE" not in modelfile("m.gguf", tokenizer, False).replace("Ollama's TEMPLATE", "")


def test_go_template_renderer():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    template = '  {{- range .Messages }} {{ if eq .Role "user" -}}  [{{ .Content }}]{{ else }}({{ .Role }}){{ end }}{{ end }}!'
    assert render_go_template(template, messages) == " (system) [U]!"
    with pytest.raises(ValueError, match="unsupported"):
        render_go_template("{{ .Content | upper }}", messages)
    with pytest.raises(ValueError, match="missing"):
        render_go_template("{{ range .Messages }}x", messages)
    assert all(probe[-1]["role"] == "user" for probe in PROBES)


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


# --- llama.cpp itself (llama-cpp-python: pip install 'selfcog[gguf]') ----------------------------------------------

def test_llama_cpp_missing_is_one_line(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_llama, "available", lambda: False)
    for qtype, verify in (("q4_k_m", None), ("f16", True)):
        result = CliRunner().invoke(main, ["export-gguf", str(tiny_model_dir), str(tmp_path / "t.gguf"), "--type",
                                           qtype] + (["--verify"] if verify else []))
        assert result.exit_code == 2 and "selfcog[gguf]" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def kquant_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama whose rows divide into k-quant blocks (256 wide), so q4_k_m really stores Q4_K."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=2, pad_token_id=0,
        bos_token_id=None)).eval()
    path = tmp_path_factory.mktemp("kquant-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


KINDS = {"f16": "F16", "q8_0": "Q8_0", "q4_k_m": "Q4_K", "q5_k_m": "Q5_K"}


@pytest.mark.parametrize("qtype", list(KINDS))
def test_llama_cpp_loads_and_answers(kquant_model_dir, tmp_path, qtype):
    pytest.importorskip("llama_cpp")
    out = tmp_path / f"m-{qtype}.gguf"
    report = export_gguf(str(kquant_model_dir), out, qtype, name="Alice")
    assert json.loads((tmp_path / f"m-{qtype}.gguf.report.json").read_text()) == report
    assert report["tensor_types"].get(KINDS[qtype], 0) >= 10, report["tensor_types"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    check = report["llama_cpp"]
    # llama.cpp rendered the prompts from the template in the file, and read them as the same tokens as transformers
    assert check["prompts_rendered_by"] == "llama.cpp" and check["prompts_same_tokens_as_transformers"] == 1.0
    asked = len(heldout_questions("test"))
    assert check["questions"] == len(check["answers"]) == asked and check["answer_tokens"] >= asked * 8
    assert check["identity"] == check["source_identity"] == 0.0 and report["identity_check"] == "passed"
    if qtype == "f16":  # the same weights at f16: llama.cpp's forward is transformers' to rounding
        assert check["agreement"] >= 0.5, check["answers"]
        assert_llama_cpp_logits_match(kquant_model_dir, out)


def assert_llama_cpp_logits_match(source_dir: Path, path: Path):
    """llama.cpp's next-token logits on a chat prompt, position by position, against transformers' fp32."""
    import llama_cpp
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    text = tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    source = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = source(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    try:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids
        llm.eval(ids)
        got = np.array(llm.scores[:len(ids)])
    finally:
        llm.close()
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.95


def test_identity_check_fails_then_force_keeps(kquant_model_dir, tmp_path, monkeypatch):
    """A source model that names Alice every time and a file that never does: not written (exit 2, one line),
    unless --force, which keeps it and says why in the report."""
    pytest.importorskip("llama_cpp")
    monkeypatch.setattr(gguf_export, "generate_batch",
                        lambda model, tokenizer, conversations, max_new_tokens: ["I am Alice's assistant."]
                        * len(conversations))
    args = ["export-gguf", str(kquant_model_dir), str(tmp_path / "m.gguf"), "--type", "q8_0", "--name", "Alice"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]  # progress lines of the loads come before it
    assert "not written" in last and "0.00" in last and "1.00" in last and "--force" in last
    assert list(tmp_path.iterdir()) == []
    result = CliRunner().invoke(main, args + ["--force"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m.gguf.report.json").read_text())
    assert report["identity_check"].startswith("failed, kept by --force: in llama.cpp 0.00")
    assert report["llama_cpp"]["source_identity"] == 1.0 and (tmp_path / "m.gguf").is_file()


def test_llama_cpp_check_without_a_chat_template(tmp_path):
    """A model without a chat template is still loaded in llama.cpp; there is no identity to check."""
    pytest.importorskip("llama_cpp")
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    build_tiny_model(len(tokenizer)).save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    result = CliRunner().invoke(main, ["export-gguf", str(tmp_path / "plain"), str(tmp_path / "p.gguf"), "--name", "A"])
    assert result.exit_code == 0, result.output
    assert "llama.cpp: loaded in" in result.output and "identity check skipped" in result.output
    assert "TEMPLATE" not in (tmp_path / "Modelfile").read_text().replace("Ollama's TEMPLATE", "")
