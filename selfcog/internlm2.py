"""InternLM2(-Chat) checkpoints on current transformers, without their remote code.

InternLM2 is a Llama decoder with renamed weights and a fused `wqkv` projection, and its tokenizer is a
BPE sentencepiece model with Llama's legacy handling. So we load it as a plain `LlamaForCausalLM` plus a
`tokenizers`-backed tokenizer: whatever is trained, merged or exported from it is a stock Llama checkpoint
that any tool loads without `trust_remote_code`.

Weight names (InternLM2 -> Llama), per layer `i` under `model.layers.{i}.`:
  attention.wqkv      -> self_attn.q_proj / k_proj / v_proj (split, see `split_wqkv`)
  attention.wo        -> self_attn.o_proj
  feed_forward.w1/w3/w2 -> mlp.gate_proj / up_proj / down_proj
  attention_norm / ffn_norm -> input_layernorm / post_attention_layernorm
and `model.tok_embeddings` -> `model.embed_tokens`, `output` -> `lm_head`, `model.norm` unchanged.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import AddedToken, Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import generate_merges

from selfcog.errors import SelfcogError

ARCHITECTURE = "InternLM2ForCausalLM"
# tokenizer_config.json of internlm2-chat-*; used when a checkpoint has none.
INTERNLM2_CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + "
                           "'\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONFIG_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
LAYER_RENAMES = {
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wo.bias": "self_attn.o_proj.bias",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
TOP_RENAMES = {
    "model.tok_embeddings.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def read_config(path: Path) -> dict:
    config = Path(path) / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SelfcogError(f"{config}: not found; an InternLM2 checkpoint needs its config.json") from None
    except (OSError, ValueError) as exc:
        raise SelfcogError(f"{config}: unreadable config ({exc})") from exc
    if not isinstance(data, dict):
        raise SelfcogError(f"{config}: config is not a JSON object")
    return data


def is_internlm2_checkpoint(path: Path) -> bool:
    """True when `path/config.json` declares InternLM2 (`InternLM2ForCausalLM` or model_type `internlm2`)."""
    config = Path(path) / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    return data.get("model_type") == "internlm2" or ARCHITECTURE in (data.get("architectures") or [])


def rope_parameters_from_internlm2(cfg: dict) -> dict:
    """InternLM2's `rope_theta` + `rope_scaling` ({"type": "dynamic"|"linear", "factor": F} or null) as
    transformers 5 `rope_parameters`. InternLM2's dynamic NTK formula is the one transformers uses."""
    theta = float(cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling")
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be an object or null, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in ("dynamic", "linear"):
        raise ValueError(f"unsupported rope_scaling type {rope_type!r} (InternLM2 knows 'dynamic' and 'linear')")
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)) or factor < 1.0:
        raise ValueError(f"rope_scaling factor must be a number >= 1, got {factor!r}")
    return {"rope_type": rope_type, "factor": float(factor), "rope_theta": theta}


def llama_config_from_internlm2(cfg: dict):
    """The `LlamaConfig` of an InternLM2 config.json (as a dict)."""
    missing = [key for key in CONFIG_REQUIRED if key not in cfg]
    if missing:
        raise ValueError(f"config lacks {', '.join(missing)}")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError(f"hidden_size {cfg['hidden_size']} is not a multiple of "
                         f"num_attention_heads {cfg['num_attention_heads']}")
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    bias = bool(cfg.get("bias", False))
    return LlamaConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_act=cfg.get("hidden_act", "silu"),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        initializer_range=cfg.get("initializer_range", 0.02),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        use_cache=cfg.get("use_cache", True),
        pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=cfg.get("bos_token_id", 1),
        eos_token_id=cfg.get("eos_token_id", 2),
        tie_word_embeddings=False,
        rope_parameters=rope_parameters_from_internlm2(cfg),
        # InternLM2's `bias` covers wqkv and wo; its MLP never has biases.
        attention_bias=bias,
        mlp_bias=False,
        architectures=["LlamaForCausalLM"],
    )


def split_wqkv(wqkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """Split InternLM2's fused projection into Llama's q, k, v.

    Rows (or bias entries) are grouped per KV head: for each of the `num_kv_heads` groups, that group's
    `num_heads // num_kv_heads` query heads, then one key head, then one value head, `head_dim` rows each.
    Query head `g * groups + j` is the j-th query of group g, which is exactly the head that Llama's GQA
    pairs with KV head g, so no other reordering is needed.
    """
    groups = num_heads // num_kv_heads
    rest = wqkv.shape[1:]
    expected = (num_heads + 2 * num_kv_heads) * head_dim
    if wqkv.shape[0] != expected:
        raise ValueError(f"wqkv has {wqkv.shape[0]} rows, expected {expected}")
    grouped = wqkv.reshape(num_kv_heads, groups + 2, head_dim, *rest)
    q = grouped[:, :groups].reshape(num_heads * head_dim, *rest)
    k = grouped[:, groups].reshape(num_kv_heads * head_dim, *rest)
    v = grouped[:, groups + 1].reshape(num_kv_heads * head_dim, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def convert_internlm2_state_dict(sd: dict, cfg: dict) -> dict:
    """Rename an InternLM2 state dict to Llama's and split every `wqkv`; unknown keys raise ValueError."""
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg["hidden_size"] // heads
    out = {}
    for key, tensor in sd.items():
        if key in TOP_RENAMES:
            out[TOP_RENAMES[key]] = tensor
            continue
        match = LAYER_KEY.match(key)
        if not match:
            raise ValueError(f"unexpected weight {key}")
        prefix, rest = f"model.layers.{match.group(1)}.", match.group(2)
        if rest in ("attention.wqkv.weight", "attention.wqkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            q, k, v = split_wqkv(tensor, heads, kv_heads, head_dim)
            out[f"{prefix}self_attn.q_proj.{kind}"] = q
            out[f"{prefix}self_attn.k_proj.{kind}"] = k
            out[f"{prefix}self_attn.v_proj.{kind}"] = v
        elif rest in LAYER_RENAMES:
            out[prefix + LAYER_RENAMES[rest]] = tensor
        elif rest.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some old checkpoints saved; recomputed from the config
        else:
            raise ValueError(f"unexpected weight {key}")
    return out


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors preferred, sharded (via the index) or single."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = path / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise SelfcogError(f"{index}: unreadable weight index ({exc})") from exc
            files = [path / name for name in dict.fromkeys(weight_map.values())]
            absent = [f.name for f in files if not f.exists()]
            if absent:
                raise SelfcogError(f"{path}: weight shard {absent[0]} named in {index_name} is missing")
            return files
        if (path / single).exists():
            return [path / single]
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        found = sorted(path.glob(pattern))
        if found:
            return found
    raise SelfcogError(f"{path}: no weights found (model*.safetensors or pytorch_model*.bin)")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        try:
            if file.suffix == ".safetensors":
                part = load_file(str(file))
            else:
                part = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt or truncated files fail in many library-specific ways
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SelfcogError(f"{file}: could not read weights ({first})") from exc
        if not isinstance(part, dict):
            raise SelfcogError(f"{file}: not a state dict")
        sd.update(part)
    return sd


def load_internlm2_as_llama(path, dtype: torch.dtype = torch.float32, **from_pretrained_kwargs):
    """Load an InternLM2 checkpoint directory as a `LlamaForCausalLM`, with no remote code.

    Extra keyword arguments (`quantization_config`, `device_map`, `attn_implementation`, ...) go to
    `LlamaForCausalLM.from_pretrained`, which gets the converted state dict. All weights must map:
    any missing, unexpected or mis-shaped weight raises `SelfcogError`.
    """
    path = Path(path)
    cfg = read_config(path)
    if not is_internlm2_checkpoint(path):
        raise SelfcogError(f"{path}: not an InternLM2 checkpoint (config.json names neither {ARCHITECTURE} "
                           f"nor model_type internlm2)")
    try:
        config = llama_config_from_internlm2(cfg)
    except (ValueError, TypeError) as exc:
        raise SelfcogError(f"{path / 'config.json'}: {exc}") from exc
    try:
        state_dict = convert_internlm2_state_dict(read_state_dict(path), cfg)
    except ValueError as exc:
        raise SelfcogError(f"{path}: {exc}") from exc
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    for key in ("state_dict", "config", "output_loading_info", "trust_remote_code"):
        from_pretrained_kwargs.pop(key, None)
    try:
        model, info = LlamaForCausalLM.from_pretrained(None, config=config, state_dict=state_dict, dtype=dtype,
                                                       output_loading_info=True, **from_pretrained_kwargs)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SelfcogError(f"{path}: could not build the Llama model ({first})") from exc
    problems = [(name, sorted(info.get(name) or [])) for name in ("missing_keys", "unexpected_keys",
                                                                  "mismatched_keys", "error_msgs")]
    problems = [(name, keys) for name, keys in problems if keys]
    if problems:
        name, keys = problems[0]
        shown = ", ".join(str(k) for k in keys[:3]) + (" ..." if len(keys) > 3 else "")
        raise SelfcogError(f"{path}: weights do not fit the model ({name.replace('_', ' ')}: {shown})")
    if (path / "generation_config.json").exists():
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise SelfcogError(f"{path / 'generation_config.json'}: unreadable ({exc})") from exc
    model.config.name_or_path = str(path)
    return model.eval()


def read_json(file: Path) -> dict:
    if not file.exists():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SelfcogError(f"{file}: unreadable ({exc})") from exc
    if not isinstance(data, dict):
        raise SelfcogError(f"{file}: not a JSON object")
    return data


def token_content(value) -> str | None:
    """A special token as saved: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def build_internlm2_backend(sp_model_file: Path, added: dict[int, dict]):
    """A `tokenizers.Tokenizer` equal to InternLM2TokenizerFast (its remote `InternLM2Converter`).

    BPE over the sentencepiece vocab with byte fallback; no pre-tokenizer; the normalizer prepends "▁"
    (sentencepiece's dummy prefix) to every text span between special tokens and turns spaces into "▁",
    as InternLM2's slow tokenizer does by calling sentencepiece on each span. Pieces at the ids of
    `added` tokens are renamed to those tokens (the hub model ships `[UNUSED_TOKEN_146]` at the id of
    `<|im_start|>`, for instance); added tokens past the vocab are appended in id order.
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2  # protobuf classes: only InternLM2 needs them

    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(sp_model_file.read_bytes())
    except Exception as exc:  # protobuf's DecodeError and OSError
        raise SelfcogError(f"{sp_model_file}: not a sentencepiece model ({exc})") from exc
    if not proto.pieces:
        raise SelfcogError(f"{sp_model_file}: not a sentencepiece model (no pieces)")
    if proto.trainer_spec.model_type != sp_pb2.TrainerSpec.BPE:
        raise SelfcogError(f"{sp_model_file}: InternLM2 tokenizers are BPE sentencepiece models; "
                           f"this one is {sp_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)}")
    Piece = sp_pb2.ModelProto.SentencePiece
    pieces = [p.piece for p in proto.pieces]
    for token_id, info in added.items():
        content = info["content"]
        if token_id < len(pieces) and pieces[token_id] != content:
            if content in pieces:
                raise SelfcogError(f"{sp_model_file}: added token {content!r} (id {token_id}) is already "
                                   f"piece {pieces.index(content)} of the sentencepiece vocab")
            pieces[token_id] = content
    vocab = {piece: i for i, piece in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise SelfcogError(f"{sp_model_file}: the sentencepiece vocab has duplicate pieces")
    # Merges come from the ordinary pieces only, ranked by sentencepiece score as in its BPE.
    normal = {pieces[i]: p.score for i, p in enumerate(proto.pieces) if p.type == Piece.NORMAL and i not in added}
    skip = set(pieces) - set(normal)
    merges = generate_merges(vocab, normal, skip_tokens=skip)
    unk_id = proto.trainer_spec.unk_id
    unk = pieces[unk_id] if 0 <= unk_id < len(pieces) else None
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    dummy_prefix = proto.normalizer_spec.add_dummy_prefix
    steps = [normalizers.Prepend("▁")] if dummy_prefix else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if dummy_prefix else []))

    def added_token(content: str, info: dict) -> AddedToken:
        return AddedToken(content, single_word=bool(info.get("single_word", False)),
                          lstrip=bool(info.get("lstrip", False)), rstrip=bool(info.get("rstrip", False)),
                          normalized=bool(info.get("normalized", False)), special=bool(info.get("special", True)))

    # sentencepiece's control and user-defined pieces stay whole, as they do in sentencepiece.
    atomic = {i: {"content": pieces[i], "special": p.type == Piece.CONTROL}
              for i, p in enumerate(proto.pieces) if p.type in (Piece.CONTROL, Piece.USER_DEFINED, Piece.UNKNOWN)}
    atomic.update(added)
    for token_id in sorted(atomic):
        info = atomic[token_id]
        new = added_token(info["content"], info)
        if info.get("special", True):
            backend.add_special_tokens([new])
        else:
            backend.add_tokens([new])
        got = backend.token_to_id(info["content"])
        if got != token_id:
            raise SelfcogError(f"{sp_model_file}: added token {info['content']!r} should have id {token_id} "
                               f"but lands at {got} (ids past the vocab must follow on from it)")
    return backend


def load_internlm2_tokenizer(path):
    """InternLM2's tokenizer without remote code, as a stock `tokenizers`-backed tokenizer.

    Same ids as InternLM2Tokenizer: `<s>` BOS added, no EOS; `<|im_start|>`, `<|im_end|>`, ... are single
    tokens; the chat template is the checkpoint's, or InternLM2-Chat's when it has none. `save_pretrained`
    writes a tokenizer.json that `AutoTokenizer.from_pretrained` loads without `trust_remote_code`.
    """
    path = Path(path)
    sp_model = path / "tokenizer.model"
    if not sp_model.exists():
        raise SelfcogError(f"{path}: no tokenizer.model; an InternLM2 tokenizer is a sentencepiece model")
    config = read_json(path / "tokenizer_config.json")
    special_map = read_json(path / "special_tokens_map.json")
    added: dict[int, dict] = {}
    for key, info in (config.get("added_tokens_decoder") or {}).items():
        content = token_content(info)
        try:
            token_id = int(key)
        except ValueError:
            token_id = -1
        if content is None or token_id < 0:
            raise SelfcogError(f"{path / 'tokenizer_config.json'}: bad added_tokens_decoder entry {key!r}")
        added[token_id] = dict(info, content=content) if isinstance(info, dict) else {"content": content}
    backend = build_internlm2_backend(sp_model, added)

    def special(name: str, default: str | None) -> str | None:
        value = token_content(config.get(name)) or token_content(special_map.get(name))
        return value if value is not None else default

    extra = config.get("additional_special_tokens") or special_map.get("additional_special_tokens") or []
    extra = [t for t in (token_content(x) for x in extra) if t]
    if not extra:
        extra = [info["content"] for _, info in sorted(added.items())
                 if info.get("special", True) and info["content"] not in ("<unk>", "<s>", "</s>")]
    vocab = backend.get_vocab()
    absent = [t for t in extra if t not in vocab]
    if absent:
        raise SelfcogError(f"{path / 'tokenizer_config.json'}: special token {absent[0]!r} is not in the vocab")
    bos, eos = special("bos_token", "<s>"), special("eos_token", "</s>")
    unk, pad = special("unk_token", "<unk>"), special("pad_token", eos)
    for name, token in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad)):
        if token not in vocab:
            raise SelfcogError(f"{path}: {name} {token!r} is not in the tokenizer vocab")
    max_length = config.get("model_max_length")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
        additional_special_tokens=extra,
        add_bos_token=bool(config.get("add_bos_token", True)),
        add_eos_token=bool(config.get("add_eos_token", False)),
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        padding_side=config.get("padding_side", "right"),
        name_or_path=str(path),
        **({"model_max_length": max_length} if isinstance(max_length, int) else {}),
    )
    template = config.get("chat_template") or INTERNLM2_CHAT_TEMPLATE
    if isinstance(template, list):  # the multi-template format: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None) or INTERNLM2_CHAT_TEMPLATE
    tokenizer.chat_template = template
    return tokenizer
