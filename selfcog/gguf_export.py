"""`selfcog export-gguf`: write a model as one GGUF file for llama.cpp / Ollama, and prove it reads back.

The file is what llama.cpp's own converter would write for a llama or qwen2 model: the same tensor
names, the same q/k row permutation (llama only), F32 norms and biases, and the tokenizer as metadata
(byte-level BPE as `gpt2`, sentencepiece-style BPE as `llama`). Before it is renamed into place, it is
loaded back with transformers' GGUF reader and compared with the source model: identical token ids on
sample texts, and logits within the storage type's rounding. An Ollama `Modelfile` is written beside it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from selfcog.atomic import write_text
from selfcog.errors import SelfcogError
from selfcog.export import share
from selfcog.models import load_model
from selfcog.templates import END_OF_TURN_TOKENS, stop_token_ids

logger = logging.getLogger(__name__)

# transformers model_type -> GGUF architecture. Both are llama-shaped decoders; qwen2 adds q/k/v biases.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
TYPES = ("f16", "q8_0")
# The read-back model is compared with the source after rounding the source's weights exactly as the file
# stores them, so only float32 arithmetic noise may remain: this fraction of the largest logit.
ARITHMETIC_NOISE = 1e-3
# The split regex of a byte-level tokenizer -> llama.cpp's name for that pre-tokenizer (`tokenizer.ggml.pre`).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRE_TOKENIZERS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
SAMPLE_TEXTS = ("Hello! Who are you, and what can you do?", "你是谁？请介绍一下你自己。",
                "The year 2024 had 366 days;  tabs\tand\nnew lines.")


def export_gguf(spec: str, out: Path, qtype: str = "f16", verify: bool = True,
                trust_remote_code: bool = False) -> dict:
    """Write MODEL as `out` (.gguf) plus `Modelfile`; returns what the round-trip check measured."""
    out = Path(out)
    if qtype not in TYPES:
        raise SelfcogError(f"--type {qtype}: choose one of {', '.join(TYPES)}")
    if out.suffix != ".gguf":
        raise SelfcogError(f"{out}: the output file must end in .gguf")
    if out.is_dir():
        raise SelfcogError(f"{out}: is a directory")
    model, tokenizer = load_model(spec, dtype=torch.float32, device="cpu", trust_remote_code=trust_remote_code)
    arch = check_architecture(model.config)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written and checked in a hidden temp dir beside `out` (alone there, so the reader sees no other
    # config), and renamed into place only once it reads back right.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-tmp-") as tmp_dir:
        tmp = Path(tmp_dir) / out.name
        write_gguf(model, tokenizer, arch, qtype, tmp, name=Path(str(model.name_or_path)).name or spec)
        report = verify_round_trip(model, tokenizer, tmp, qtype) if verify else {}
        os.replace(share(tmp), out)
    report["gguf"] = str(out)
    report["modelfile"] = str(share(write_text(out.parent / "Modelfile", modelfile(out.name, tokenizer))))
    return report


def check_architecture(config) -> str:
    """The GGUF architecture for this config, or a one-line reason it cannot be exported faithfully."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise SelfcogError(f"export-gguf supports llama-architecture models (SmolLM2, Llama, Qwen2); "
                           f"this one is {model_type!r}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise SelfcogError(f"export-gguf: rope scaling {rope.get('rope_type')!r} is not supported yet")
    if getattr(config, "mlp_bias", False) or (model_type == "qwen2" and getattr(config, "use_sliding_window", False)):
        raise SelfcogError(f"export-gguf: this {model_type} variant (MLP biases or sliding window) is not supported")
    return ARCHITECTURES[model_type]


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def write_gguf(model, tokenizer, arch: str, qtype: str, path: Path, name: str) -> None:
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    if qtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer, config.vocab_size)
    for gguf_name, data in gguf_tensors(model, arch):
        add_tensor(writer, gguf_name, data, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k layout: within each head, interleave the two rotary halves.

    transformers rotates the first and second halves of a head (rotate_half); llama.cpp's llama rope
    rotates adjacent pairs, so its converter reorders rows to match. transformers' GGUF reader undoes
    exactly this (`_reverse_permute_weights`).
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(model, arch: str):
    """`(gguf name, fp32 numpy array)` for every weight, in llama.cpp's naming and layout."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: readers reuse token_embd when output.weight is absent
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise SelfcogError(f"export-gguf: {name} has no GGUF counterpart; refusing to drop it")
        data = tensor.detach().float()
        if arch == "llama" and ".self_attn.q_proj." in name:
            data = permute_rows(data, config.num_attention_heads)
        elif arch == "llama" and ".self_attn.k_proj." in name:
            data = permute_rows(data, config.num_key_value_heads)
        yield gguf_name, data.contiguous().numpy()


def encode(data: np.ndarray, qtype: str):
    """`(array, raw ggml type or None)`: norms and biases stay F32 (as llama.cpp keeps them), matrices
    become F16 or Q8_0 (F16 where a row does not divide into Q8_0's 32-wide blocks)."""
    import gguf

    q8_0 = gguf.GGMLQuantizationType.Q8_0
    if data.ndim == 1:
        return data.astype(np.float32), None
    if qtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[q8_0][0] == 0:
        return gguf.quants.quantize(data, q8_0), q8_0
    return data.astype(np.float16), None


def stored_values(data: np.ndarray, qtype: str) -> np.ndarray:
    """What a reader gets back for `data`: the array after the file's rounding, as float32."""
    import gguf

    array, raw = encode(data, qtype)
    return (gguf.quants.dequantize(array, raw) if raw is not None else array).astype(np.float32)


def add_tensor(writer, name: str, data: np.ndarray, qtype: str) -> None:
    array, raw = encode(data, qtype)
    writer.add_tensor(name, array, raw_dtype=raw)


def tokenizer_state(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SelfcogError("export-gguf needs a fast (tokenizers) tokenizer; this model has a slow one")
    state = json.loads(backend.to_str())
    if state["model"]["type"] != "BPE":
        raise SelfcogError(f"export-gguf: {state['model']['type']} tokenizers are not supported (BPE only)")
    return state


def pre_tokenizer_name(state: dict) -> str:
    """llama.cpp's name for how a byte-level tokenizer splits text before BPE."""
    pre = state.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = SPLIT_PRE_TOKENIZERS.get(steps[0].get("pattern", {}).get("Regex"))
        if name:
            return name
    raise SelfcogError(f"export-gguf: unknown pre-tokenizer {json.dumps(pre)[:120]}; llama.cpp would split text "
                       f"differently from this tokenizer")


def vocabulary(tokenizer, vocab_size: int) -> dict:
    """Tokens, token types, merges (and scores for sentencepiece) in id order, padded to the embedding size."""
    import gguf

    state = tokenizer_state(tokenizer)
    model = state["model"]
    sentencepiece = bool(model.get("byte_fallback"))
    added = {entry["id"]: entry for entry in state.get("added_tokens", [])}
    by_id = {index: token for token, index in model["vocab"].items()}
    largest = max([*by_id, *added]) + 1
    if largest > vocab_size:
        raise SelfcogError(f"export-gguf: the tokenizer has {largest} tokens but the model embeds only {vocab_size}")
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    # A sentencepiece vocabulary is merged by score in llama.cpp: the token a merge makes scores -rank.
    rank = {merge.replace(" ", ""): -float(i) for i, merge in reversed(list(enumerate(merges)))}
    unk = tokenizer.unk_token_id
    tokens, types, scores = [], [], []
    for index in range(vocab_size):
        if index in added:
            token = added[index]["content"]
            kind = gguf.TokenType.CONTROL if added[index]["special"] else gguf.TokenType.USER_DEFINED
        elif index in by_id:
            token = by_id[index]
            kind = gguf.TokenType.BYTE if sentencepiece and re.fullmatch(r"<0x[0-9A-F]{2}>", token) \
                else gguf.TokenType.NORMAL
        else:  # embedding rows past the tokenizer (padding for alignment); llama.cpp writes them like this
            token, kind = f"[PAD{index}]", gguf.TokenType.UNUSED
        if index == unk:
            kind = gguf.TokenType.UNKNOWN
        tokens.append(token)
        types.append(kind)
        scores.append(rank.get(token, 0.0))
    return {"model": "llama" if sentencepiece else "gpt2",
            "pre": "default" if sentencepiece else pre_tokenizer_name(state),
            "tokens": tokens, "types": types, "merges": merges, "scores": scores,
            "add_space_prefix": sentencepiece and prepends_space(state)}


def prepends_space(state: dict) -> bool:
    pre = json.dumps(state.get("pre_tokenizer")) + json.dumps(state.get("normalizer"))
    return '"prepend_scheme": "first"' in pre or '"prepend_scheme": "always"' in pre or '"Prepend"' in pre


def adds_special(tokenizer) -> tuple[bool, bool]:
    """Whether plain encoding adds BOS / EOS (llama.cpp reads this from the file, not the template)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id is not None and full[:1] == [tokenizer.bos_token_id] and len(full) > len(bare)
    eos = tokenizer.eos_token_id is not None and full[-1:] == [tokenizer.eos_token_id] and len(full) > len(bare) + bos
    return bos, eos


def end_of_turn_id(tokenizer) -> int | None:
    """The chat template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`, ...); llama.cpp stops on it."""
    vocab = tokenizer.get_vocab()
    return next((vocab[token] for token in END_OF_TURN_TOKENS if token in vocab), None)


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    vocab = vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if vocab["model"] == "llama":
        writer.add_token_scores(vocab["scores"])
        writer.add_add_space_prefix(vocab["add_space_prefix"])
    if vocab["merges"]:
        writer.add_token_merges(vocab["merges"])
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id),
                          (end_of_turn_id(tokenizer), writer.add_eot_token_id)):
        if token_id is not None:
            add(token_id)
    bos, eos = adds_special(tokenizer)
    writer.add_add_bos_token(bos)
    writer.add_add_eos_token(eos)
    template = chat_template(tokenizer)
    if template:
        writer.add_chat_template(template)


def chat_template(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: llama.cpp takes the default one
        template = template.get("default")
    return template or None


def sample_texts(tokenizer) -> list[str]:
    """English, Chinese, whitespace and digits, and a rendered chat that carries the special tokens."""
    texts = list(SAMPLE_TEXTS)
    if chat_template(tokenizer):
        texts.append(tokenizer.apply_chat_template(
            [{"role": "user", "content": "你好，你是谁？"}, {"role": "assistant", "content": "I am an assistant."},
             {"role": "user", "content": "Thanks!"}], tokenize=False, add_generation_prompt=True))
    return texts


def verify_round_trip(model, tokenizer, path: Path, qtype: str) -> dict:
    """Load `path` with transformers' GGUF reader and compare it with the source model.

    Token ids must be identical on the sample texts. For the weights, the source model is rounded in
    place exactly as the file stores them (`model` is spent afterwards): the read-back logits must then
    match to float32 noise, whatever the storage type, so a wrong layout cannot hide inside a loose
    tolerance. The difference against the unrounded source is reported: that is what f16 or q8_0 costs.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info(f"selfcog: checking that {path.name} reads back with transformers ...")
    back_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = sample_texts(tokenizer)
    mismatched = [text for text in texts if tokenizer(text)["input_ids"] != back_tokenizer(text)["input_ids"]]
    if mismatched:
        raise SelfcogError(f"export-gguf: the GGUF tokenizer encodes {mismatched[0][:40]!r} differently")
    if chat_template(back_tokenizer) != chat_template(tokenizer):
        raise SelfcogError("export-gguf: the chat template did not survive the round trip")
    back = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer(texts[-1])["input_ids"]])
    with torch.no_grad():
        read_back = back(ids).logits
        source = model(ids).logits
        round_weights(model, qtype)
        rounded = model(ids).logits
    layout_error = (rounded - read_back).abs().max().item()
    if not layout_error <= ARITHMETIC_NOISE * max(1.0, rounded.abs().max().item()):
        raise SelfcogError(f"export-gguf: the GGUF weights do not read back as written "
                           f"(logits off by {layout_error:.3g} beyond {qtype} rounding)")
    return {"texts": len(texts), "tokens_identical": True, "layout_error": layout_error,
            "max_abs_logit_diff": (source - read_back).abs().max().item(),
            "max_abs_logit": source.abs().max().item(),
            "top1_agreement": (source.argmax(-1) == read_back.argmax(-1)).float().mean().item()}


def round_weights(model, qtype: str) -> None:
    """Round every matrix of `model` in place the way the file stores it (a tied matrix once)."""
    done = set()
    for tensor in model.state_dict().values():
        if tensor.ndim == 2 and tensor.data_ptr() not in done:
            done.add(tensor.data_ptr())
            tensor.copy_(torch.from_numpy(stored_values(tensor.float().numpy(), qtype)))


# --- Ollama -----------------------------------------------------------------------------------------

CHATML_TEMPLATE = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
                   "{{ end }}<|im_start|>assistant\n")


def chatml_default_system(tokenizer) -> tuple[bool, str | None]:
    """(is the template ChatML?, the system prompt it adds when a conversation has none)."""
    if not chat_template(tokenizer):
        return False, None
    user = [{"role": "user", "content": "X"}]
    turn = "<|im_start|>user\nX<|im_end|>\n<|im_start|>assistant\n"
    try:
        plain = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        with_system = tokenizer.apply_chat_template([{"role": "system", "content": "S"}, *user], tokenize=False,
                                                    add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that cannot render these is simply not ChatML
        return False, None
    if with_system != "<|im_start|>system\nS<|im_end|>\n" + turn or not plain.endswith(turn):
        return False, None
    head = plain[: -len(turn)]
    match = re.fullmatch(r"<\|im_start\|>system\n(.*)<\|im_end\|>\n", head, re.S)
    if head and not match:
        return False, None
    return True, match.group(1) if match else None


def modelfile(gguf_name: str, tokenizer) -> str:
    """An Ollama Modelfile: the weights, the chat format as a Go template, the default system prompt, stops."""
    lines = [f"FROM ./{gguf_name}", ""]
    chatml, system = chatml_default_system(tokenizer)
    if chatml:
        lines += [f'TEMPLATE """{CHATML_TEMPLATE}"""']
        if system and '"""' not in system:
            lines += [f'SYSTEM """{system}"""']
    else:
        lines += ["# Not a ChatML template: Ollama derives the prompt format from the chat template in the GGUF."]
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)]
    if chatml:
        stops.append("<|im_start|>")
    for stop in dict.fromkeys(stops):
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"
