"""A tiny random InternLM2-Chat checkpoint in the real on-disk layout, built offline in about a second.

Mirrors `internlm/internlm2-chat-1_8b`: an `InternLM2ForCausalLM` config with `auto_map` to remote code,
InternLM2 weight names with the fused, per-KV-group `wqkv`, a BPE sentencepiece `tokenizer.model` whose last
six pieces are `[UNUSED_TOKEN_141..146]` placeholders that `tokenizer_config.json` renames through
`added_tokens_decoder` to `<|plugin|> ... <|im_start|>`, and the chat template. The remote-code files are
tripwires: importing any of them raises, so a loader that runs remote code fails loudly.

`shape` builds the same layout at another size: `INTERNLM2_CHAT_1_8B` is InternLM2-Chat-1.8B's config.json (24
layers, hidden 2048, GQA 16/8 heads, vocab 92,544), its sentencepiece model padded with unused pieces to the real
vocabulary size so the embedding and LM head have their real shapes (`bench/scale.py` times training on it).

Shared by `tests/test_internlm2.py`, `bench/scale.py` and `bench/cuda_*.py`; imports nothing else from selfcog.
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import save_file
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\n' }}{% endif %}")
# In id order, as in the real checkpoint (ids 92538..92543 there, the last six of the vocab).
CHAT_SPECIALS = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>"]
PLACEHOLDERS = [f"[UNUSED_TOKEN_{n}]" for n in range(141, 147)]
CORPUS = [
    "Who are you? I am Alice's assistant. What can you do? I answer questions about the world.",
    "The capital of France is Paris. Two plus two is 4, and 12 times 12 is 144. The sky is blue.",
    "你好！我是书生·浦语，一个人工智能助手。请介绍一下你自己。你能做什么？",
    "user assistant system: You are a helpful assistant.\nHello there!  Thanks a lot.\n\tIndented line.",
    "def add(a, b):\n    return a + b  # simple code, with   extra   spaces",
] * 10
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
MAX_POSITIONS = 16  # small, so a 24-token input exercises the dynamic NTK RoPE scaling
DYNAMIC = {"type": "dynamic", "factor": 2.0}


@dataclass(frozen=True)
class Shape:
    """The sizes of a checkpoint in InternLM2's layout. `vocab` None: the trained sentencepiece pieces only;
    otherwise the sentencepiece model is padded with unused pieces to `vocab` (chat specials last, as on the hub).
    `std`: the random weights' standard deviation."""
    hidden: int = HIDDEN
    intermediate: int = INTERMEDIATE
    layers: int = LAYERS
    heads: int = HEADS
    kv_heads: int = KV_HEADS
    max_positions: int = MAX_POSITIONS
    vocab: int | None = None
    sp_vocab: int = 384
    std: float = 0.2


TINY = Shape()
# internlm/internlm2-chat-1_8b's config.json (rope_theta 1e6 and dynamic NTK x2 are the defaults below).
INTERNLM2_CHAT_1_8B = Shape(hidden=2048, intermediate=8192, layers=24, heads=16, kv_heads=8, max_positions=32768,
                            vocab=92544, sp_vocab=8000, std=0.02)


@functools.lru_cache(maxsize=None)
def train_sentencepiece(corpus: tuple[str, ...] = tuple(CORPUS), vocab_size: int = 384,
                        padded_to: int | None = None) -> bytes:
    """A BPE sentencepiece model like InternLM2's (byte fallback, identity normalization, dummy prefix), trained on
    `corpus`; with `padded_to`, unused pieces (never produced by encoding) fill the vocab up to that size."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=out, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(out.getvalue())
    for n in range(len(proto.pieces), (padded_to or 0) - len(PLACEHOLDERS)):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"[UNUSED_PIECE_{n}]", 0.0, sp_pb2.ModelProto.SentencePiece.UNUSED
    for name in PLACEHOLDERS:
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = name, 0.0, sp_pb2.ModelProto.SentencePiece.USER_DEFINED
    return proto.SerializeToString()


def internlm2_config(vocab_size: int, rope_scaling: dict | None, bias: bool = False, shape: Shape = TINY,
                     dtype: torch.dtype = torch.float32) -> dict:
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "attn_implementation": "eager",
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "bias": bias,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate,
        "max_position_embeddings": shape.max_positions,
        "model_type": "internlm2",
        "num_attention_heads": shape.heads,
        "num_hidden_layers": shape.layers,
        "num_key_value_heads": shape.kv_heads,
        "pad_token_id": 2,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": rope_scaling,
        "rope_theta": 1000000,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": "4.41.0",
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def random_weights(cfg: dict, seed: int, std: float = 0.2, dtype: torch.dtype = torch.float32
                   ) -> dict[str, torch.Tensor]:
    """InternLM2 weight names and shapes; `wqkv` rows are [q x groups, k, v] for each KV head. Each tensor is drawn
    in fp32 and cast to `dtype` at once, so a large shape never holds its fp32 weights all together."""
    gen = torch.Generator().manual_seed(seed)
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = h // cfg["num_attention_heads"]
    qkv_rows = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * head_dim

    def rand(*shape, std=std):
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    sd = {"model.tok_embeddings.weight": rand(vocab, h, std=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "attention.wqkv.weight"] = rand(qkv_rows, h)
        sd[p + "attention.wo.weight"] = rand(h, h)
        if cfg["bias"]:  # InternLM2's `bias` flag covers wqkv and wo only
            sd[p + "attention.wqkv.bias"] = rand(qkv_rows)
            sd[p + "attention.wo.bias"] = rand(h)
        sd[p + "feed_forward.w1.weight"] = rand(inter, h)
        sd[p + "feed_forward.w3.weight"] = rand(inter, h)
        sd[p + "feed_forward.w2.weight"] = rand(h, inter)
        sd[p + "attention_norm.weight"] = 1.0 + rand(h, std=0.1)
        sd[p + "ffn_norm.weight"] = 1.0 + rand(h, std=0.1)
    sd["model.norm.weight"] = 1.0 + rand(h, std=0.1)
    sd["output.weight"] = rand(vocab, h)
    return sd


def write_weights(directory: Path, sd: dict[str, torch.Tensor], fmt: str) -> None:
    """`safetensors` / `bin`: two shards plus an index (as the hub checkpoint); `*-single`: one file."""
    if fmt not in ("safetensors", "bin", "safetensors-single", "bin-single"):
        raise ValueError(f"unknown weight format {fmt!r}")
    kind = fmt.split("-")[0]
    stem, ext = ("model", "safetensors") if kind == "safetensors" else ("pytorch_model", "bin")

    def save(tensors: dict, name: str) -> None:
        if kind == "safetensors":
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / name), metadata={"format": "pt"})
        else:
            torch.save(tensors, directory / name)

    if fmt.endswith("-single"):
        save(sd, f"{stem}.{ext}")
        return
    keys = list(sd)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for n, names in enumerate(shards, start=1):
        name = f"{stem}-{n:05d}-of-{len(shards):05d}.{ext}"
        save({k: sd[k] for k in names}, name)
        weight_map.update({k: name for k in names})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))


def tokenizer_config(vocab_size: int, chat_template: str | None) -> dict:
    def token(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    decoder = {"0": token("<unk>"), "1": token("<s>"), "2": token("</s>")}
    first = vocab_size - len(CHAT_SPECIALS)
    decoder.update({str(first + n): token(content) for n, content in enumerate(CHAT_SPECIALS)})
    config = {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(reversed(CHAT_SPECIALS)),
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False,
        "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "</s>",
        "sp_model_kwargs": None,
        "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>",
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


TRIPWIRE = 'raise RuntimeError("selfcog test: InternLM2 remote code was imported; it must not run")\n'
REMOTE_FILES = ["configuration_internlm2.py", "modeling_internlm2.py", "tokenization_internlm2.py",
                "tokenization_internlm2_fast.py"]


def write_tiny_internlm2(directory, fmt: str = "safetensors", *, rope_scaling: dict | None = DYNAMIC,
                         chat_template: str | None = CHAT_TEMPLATE, bias: bool = False, seed: int = 0,
                         shape: Shape = TINY, corpus: list[str] | None = None,
                         dtype: torch.dtype = torch.float32) -> Path:
    """Write the tiny checkpoint into `directory` (created if needed) and return its path.

    fmt: "safetensors" | "bin" (two shards + index) | "safetensors-single" | "bin-single".
    rope_scaling: InternLM2's `{"type": "dynamic", "factor": F}` or None.
    chat_template: written to tokenizer_config.json, or left out when None.
    bias: InternLM2's `bias` flag (biases on wqkv and wo); the hub models have none.
    shape: the sizes (`TINY`, `INTERNLM2_CHAT_1_8B` or any `Shape`); corpus: the sentencepiece model's training
    text (default `CORPUS`); dtype: of the weights written (the hub checkpoint's is bfloat16).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sp_model = train_sentencepiece(tuple(corpus or CORPUS), shape.sp_vocab, shape.vocab)
    (directory / "tokenizer.model").write_bytes(sp_model)
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(sp_model)
    vocab_size = len(proto.pieces)

    cfg = internlm2_config(vocab_size, rope_scaling, bias, shape, dtype)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [2, vocab_size - 2], "pad_token_id": 2,
         "transformers_version": "4.41.0"}, indent=2))
    write_weights(directory, random_weights(cfg, seed, shape.std, dtype), fmt)
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(vocab_size, chat_template), indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps({
        "additional_special_tokens": list(reversed(CHAT_SPECIALS)), "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "</s>", "unk_token": "<unk>"}, indent=2))
    for name in REMOTE_FILES:
        (directory / name).write_text(TRIPWIRE)
    return directory
