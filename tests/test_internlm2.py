"""InternLM2-Chat without remote code: loaded as Llama, tokenized like InternLM2Tokenizer, exported as plain Llama.

The checkpoints are tiny random ones in InternLM2's on-disk layout (selfcog/testing.py). Logits are
checked against a reference forward written here from the architecture, reading the fused `wqkv` directly;
token ids against sentencepiece itself, called span by span as InternLM2's slow tokenizer does.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest
import torch

from selfcog.errors import SelfcogError
from selfcog.testing import CHAT_SPECIALS, CHAT_TEMPLATE, CORPUS, MAX_POSITIONS, write_tiny_internlm2
from selfcog.internlm2 import (  # noqa: E402
    INTERNLM2_CHAT_TEMPLATE,
    convert_internlm2_state_dict,
    is_internlm2_checkpoint,
    llama_config_from_internlm2,
    load_internlm2_as_llama,
    load_internlm2_tokenizer,
)

TEXTS = [
    "Hello there!  How are you?",
    "  leading spaces, trailing spaces  ",
    "def add(a, b):\n    return a + b\n",
    "你好！我是书生·浦语。What is 12 x 144?",
    "unseen: émoji 🙂 Ω and a tab\tdone",
    "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\nI am Alice's assistant.<|im_end|>\n",
    "<s>text</s> <|action_start|><|interpreter|>code<|action_end|>\n<|plugin|>",
    "",
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny checkpoint per weight format / RoPE setting; all share the tokenizer and seed."""
    root = tmp_path_factory.mktemp("internlm2")
    return {
        "safetensors": write_tiny_internlm2(root / "st", "safetensors"),
        "bin": write_tiny_internlm2(root / "bin", "bin", rope_scaling=None),
        "safetensors-single": write_tiny_internlm2(root / "st1", "safetensors-single", rope_scaling=None),
        "bin-single": write_tiny_internlm2(root / "bin1", "bin-single"),
        "bias": write_tiny_internlm2(root / "bias", "safetensors", bias=True, seed=1),
    }


@pytest.fixture(scope="module")
def ckpt(checkpoints) -> Path:
    return checkpoints["safetensors"]


# --- an independent reference: InternLM2's forward in plain torch, float64 -----------------------------


def raw_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = {}
    for file in sorted(path.glob("*.safetensors")):
        sd.update(load_file(str(file)))
    for file in sorted(path.glob("pytorch_model*.bin")):
        sd.update(torch.load(file, weights_only=True))
    return {k: v.double() for k, v in sd.items()}


def reference_logits(path: Path, ids: list[int]) -> torch.Tensor:
    cfg = json.loads((path / "config.json").read_text())
    sd = raw_weights(path)
    hidden, heads, kv_heads = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim, groups, eps, n = hidden // heads, heads // kv_heads, cfg["rms_norm_eps"], len(ids)

    base, scaling = float(cfg["rope_theta"]), cfg["rope_scaling"]
    if scaling and scaling["type"] == "dynamic" and n > cfg["max_position_embeddings"]:
        factor, max_pos = scaling["factor"], cfg["max_position_embeddings"]
        base = base * ((factor * n / max_pos) - (factor - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(n, dtype=torch.float64), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rms_norm(x, weight):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rotate(x):  # x: [heads, n, head_dim]; rotate-half RoPE as in InternLM2's modelling code
        half = head_dim // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def linear(x, prefix):
        bias = sd.get(prefix + ".bias")
        return x @ sd[prefix + ".weight"].T + (bias if bias is not None else 0)

    x = sd["model.tok_embeddings.weight"][torch.tensor(ids)]
    causal = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, sd[p + "attention_norm.weight"])
        qkv = linear(h, p + "attention.wqkv").view(n, kv_heads, groups + 2, head_dim)
        q = qkv[:, :, :groups].reshape(n, heads, head_dim).transpose(0, 1)
        k = qkv[:, :, -2].transpose(0, 1).repeat_interleave(groups, 0)
        v = qkv[:, :, -1].transpose(0, 1).repeat_interleave(groups, 0)
        q, k = rotate(q), rotate(k)
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(head_dim) + causal, -1) @ v
        x = x + linear(attn.transpose(0, 1).reshape(n, hidden), p + "attention.wo")
        h = rms_norm(x, sd[p + "ffn_norm.weight"])
        gate, up = linear(h, p + "feed_forward.w1"), linear(h, p + "feed_forward.w3")
        x = x + linear(torch.nn.functional.silu(gate) * up, p + "feed_forward.w2")
    return rms_norm(x, sd["model.norm.weight"]) @ sd["output.weight"].T


def some_ids(n: int, seed: int = 0, vocab: int = 384) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- model ------------------------------------------------------------------------------------------------


@pytest.fixture
def llama_dir(tmp_path) -> Path:
    """The config of a plain Llama checkpoint (all the detection looks at)."""
    path = tmp_path / "llama"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    return path


def test_detects_internlm2_checkpoints(ckpt, tmp_path, llama_dir):
    assert is_internlm2_checkpoint(ckpt)
    assert not is_internlm2_checkpoint(llama_dir)
    assert not is_internlm2_checkpoint(tmp_path / "missing")
    (tmp_path / "only-type").mkdir()
    (tmp_path / "only-type" / "config.json").write_text(json.dumps({"model_type": "internlm2"}))
    assert is_internlm2_checkpoint(tmp_path / "only-type")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert not is_internlm2_checkpoint(tmp_path / "broken")


def test_config_maps_to_llama(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    config = llama_config_from_internlm2(cfg)
    assert config.model_type == "llama"
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (64, 128, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert config.rope_parameters == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0}
    assert config.max_position_embeddings == MAX_POSITIONS and config.rms_norm_eps == 1e-5
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    assert not config.tie_word_embeddings and not config.attention_bias and not config.mlp_bias
    plain = llama_config_from_internlm2(dict(cfg, rope_scaling=None, bias=True, rope_theta=10000))
    assert plain.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert plain.attention_bias
    with pytest.raises(ValueError, match="rope_scaling"):
        llama_config_from_internlm2(dict(cfg, rope_scaling={"type": "yarn", "factor": 2.0}))


def test_wqkv_split_follows_the_grouped_layout(ckpt):
    """Row r of each output comes from the documented place in wqkv (heads 4, kv 2 -> groups of 2 q + k + v)."""
    cfg = json.loads((ckpt / "config.json").read_text())
    d = 16
    wqkv = torch.arange(8 * d, dtype=torch.float32)[:, None].expand(8 * d, 64).contiguous()
    out = convert_internlm2_state_dict({"model.layers.0.attention.wqkv.weight": wqkv}, cfg)
    block = [torch.arange(b * d, (b + 1) * d, dtype=torch.float32) for b in range(8)]  # [q0 q1 k0 v0 q2 q3 k1 v1]
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"][:, 0], torch.cat([block[i] for i in (0, 1, 4, 5)]))
    assert torch.equal(out["model.layers.0.self_attn.k_proj.weight"][:, 0], torch.cat([block[2], block[6]]))
    assert torch.equal(out["model.layers.0.self_attn.v_proj.weight"][:, 0], torch.cat([block[3], block[7]]))


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "safetensors-single", "bin-single", "bias"])
def test_logits_match_reference_forward(checkpoints, fmt):
    path = checkpoints[fmt]
    model = load_internlm2_as_llama(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    # 10 tokens stay inside max_position_embeddings (16); 24 go past it, where dynamic NTK RoPE rescales.
    for n in (10, 24):
        ids = some_ids(n, seed=n)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        expected = reference_logits(path, ids)
        assert logits.shape == expected.shape
        assert torch.allclose(logits, expected, atol=1e-4, rtol=0), (fmt, n, (logits - expected).abs().max())


def test_dtype_and_generation_config(ckpt):
    model = load_internlm2_as_llama(ckpt, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert list(model.generation_config.eos_token_id) == [2, 388]  # </s> and <|im_end|>
    ids = some_ids(10)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    assert torch.allclose(logits, reference_logits(ckpt, ids), atol=0.15, rtol=0)


# --- tokenizer --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def sentencepiece(path: Path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))


def reference_ids(path: Path, text: str, add_bos: bool = True) -> list[int]:
    """InternLM2Tokenizer's algorithm: split on added tokens, sentencepiece-encode each span, BOS in front."""
    sp = sentencepiece(path)
    added = {v["content"]: int(k) for k, v in
             json.loads((path / "tokenizer_config.json").read_text())["added_tokens_decoder"].items()}
    pattern = "(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")"
    ids = [1] if add_bos else []
    for span in re.split(pattern, text):
        ids += [added[span]] if span in added else (sp.encode(span) if span else [])
    return ids


def test_tokenizer_ids_match_sentencepiece(ckpt):
    tokenizer = load_internlm2_tokenizer(ckpt)
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == reference_ids(ckpt, text), text
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == reference_ids(ckpt, text, False), text
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>" and tokenizer.pad_token == "</s>"
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id == 1
    assert tokenizer("hi")["input_ids"][-1] != tokenizer.eos_token_id  # no EOS appended
    assert len(tokenizer) == 390


def test_tokenizer_matches_sentencepiece_on_random_text(ckpt):
    """Merge order and byte fallback agree with sentencepiece's BPE on many random strings."""
    tokenizer, rng = load_internlm2_tokenizer(ckpt), random.Random(0)
    chars = sorted(set("".join(CORPUS))) + ["é", "🙂", "  ", "\n\n", "<|im_end|>", "<s>", "▁"]
    words = " ".join(CORPUS).split(" ")
    for i in range(400):
        if i % 2:
            text = "".join(rng.choice(chars) for _ in range(rng.randint(0, 40)))
        else:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        assert tokenizer(text)["input_ids"] == reference_ids(ckpt, text), repr(text)


def test_special_tokens_are_single_tokens(ckpt):
    tokenizer = load_internlm2_tokenizer(ckpt)
    for offset, token in enumerate(CHAT_SPECIALS):
        assert tokenizer.encode(token, add_special_tokens=False) == [384 + offset], token
        assert tokenizer.convert_ids_to_tokens(384 + offset) == token
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 388
    assert tokenizer.decode([389, 388], skip_special_tokens=True) == ""


def test_decode_round_trips_plain_text(ckpt):
    tokenizer = load_internlm2_tokenizer(ckpt)
    for text in TEXTS:
        if "<" not in text:
            assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_chat_template_renders_internlm2_chat(ckpt, tmp_path):
    tokenizer = load_internlm2_tokenizer(ckpt)
    text = "Who are you?"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == f"<s><|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids == reference_ids(ckpt, rendered, add_bos=False)
    assert ids[:2] == [1, 389] and ids.count(1) == 1
    # A checkpoint without a template gets InternLM2-Chat's.
    bare = shutil.copytree(ckpt, tmp_path / "bare")
    config = json.loads((bare / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_internlm2_tokenizer(bare).chat_template == INTERNLM2_CHAT_TEMPLATE == CHAT_TEMPLATE


# --- export: a plain Llama checkpoint --------------------------------------------------------------------


def test_save_pretrained_round_trip_needs_no_remote_code(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = load_internlm2_as_llama(ckpt), load_internlm2_tokenizer(ckpt)
    out = tmp_path / "export"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
    assert not list(out.glob("*.py"))

    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    retok = AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    for n in (10, 24):
        ids = torch.tensor([some_ids(n, seed=n)])
        with torch.no_grad():
            assert torch.equal(model(ids).logits, reloaded(ids).logits)
    for text in TEXTS:
        assert retok(text)["input_ids"] == tokenizer(text)["input_ids"], text
        assert retok(text, add_special_tokens=False)["input_ids"] == reference_ids(ckpt, text, False), text
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    rendered = retok.apply_chat_template(messages, tokenize=False)
    assert rendered == tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = retok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert retok(prompt, add_special_tokens=False)["input_ids"] == reference_ids(ckpt, prompt, add_bos=False)
    assert retok.convert_tokens_to_ids("<|im_end|>") == 388
    assert (retok.bos_token, retok.eos_token, retok.pad_token) == ("<s>", "</s>", "</s>")
    assert list(reloaded.generation_config.eos_token_id) == [2, 388]


# --- errors -----------------------------------------------------------------------------------------------


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_errors_name_path_and_reason(ckpt, tmp_path, llama_dir):
    with pytest.raises(SelfcogError) as exc:
        load_internlm2_as_llama(llama_dir)
    assert str(llama_dir) in one_line(exc) and "not an InternLM2" in str(exc.value)

    with pytest.raises(SelfcogError) as exc:
        load_internlm2_as_llama(tmp_path / "nowhere")
    assert "config.json" in one_line(exc)

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(ckpt / "config.json", no_weights)
    with pytest.raises(SelfcogError) as exc:
        load_internlm2_as_llama(no_weights)
    assert str(no_weights) in one_line(exc) and "no weights" in str(exc.value)

    missing_shard = shutil.copytree(ckpt, tmp_path / "missing-shard")
    (missing_shard / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SelfcogError) as exc:
        load_internlm2_as_llama(missing_shard)
    assert "model-00002-of-00002.safetensors" in one_line(exc)

    from safetensors.torch import load_file, save_file

    extra = shutil.copytree(ckpt, tmp_path / "extra-key")
    shard = extra / "model-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    save_file(dict(tensors, **{"model.layers.0.attention.mystery.weight": torch.zeros(2)}), str(shard))
    with pytest.raises(SelfcogError) as exc:
        load_internlm2_as_llama(extra)
    assert "mystery" in one_line(exc)

    short = shutil.copytree(ckpt, tmp_path / "short")
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=1)))
    with pytest.raises(SelfcogError) as exc:
        load_internlm2_as_llama(short)
    assert str(short) in one_line(exc)

    resized = shutil.copytree(ckpt, tmp_path / "resized")
    (resized / "config.json").write_text(json.dumps(dict(config, vocab_size=400)))
    with pytest.raises(SelfcogError) as exc:
        load_internlm2_as_llama(resized)
    assert str(resized) in one_line(exc)

    corrupt = shutil.copytree(ckpt, tmp_path / "corrupt")
    (corrupt / "model-00001-of-00002.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SelfcogError) as exc:
        load_internlm2_as_llama(corrupt)
    assert "model-00001-of-00002.safetensors" in one_line(exc)

    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    with pytest.raises(SelfcogError) as exc:
        load_internlm2_tokenizer(no_tokenizer)
    assert str(no_tokenizer) in one_line(exc) and "tokenizer.model" in str(exc.value)

    bad_sp = shutil.copytree(ckpt, tmp_path / "bad-sp")
    (bad_sp / "tokenizer.model").write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(SelfcogError) as exc:
        load_internlm2_tokenizer(bad_sp)
    assert "tokenizer.model" in one_line(exc)


def test_models_load_model_uses_the_llama_path(ckpt):
    """selfcog.models.load_model goes through this module for InternLM2 when remote code is off."""
    from selfcog.models import load_model

    model, tokenizer = load_model(str(ckpt), dtype=torch.float32, device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 388
