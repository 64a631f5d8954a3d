"""`selfcog export-gguf`: write a model as one GGUF file for llama.cpp / Ollama, and prove it works there.

The file is what llama.cpp's own converter would write for a llama or qwen2 model: the same tensor
names, the same q/k row permutation (llama only), F32 norms and biases, and the tokenizer as metadata
(byte-level BPE as `gpt2`, sentencepiece-style BPE as `llama`). f16 and q8_0 are written here; q4_k_m and
q5_k_m are made from the f16 file by llama.cpp's own quantizer (`selfcog.gguf_llama`).

Two checks run before the file is renamed into place:
- transformers' GGUF reader loads the f16/q8_0 file (for a k-quant, the f16 file it is made from): identical
  token ids on sample texts, and logits within the storage type's rounding;
- llama.cpp loads the file itself (when `llama_cpp` is importable, or asked for): it answers the held-out
  identity questions greedily from prompts rendered with the chat template stored in the file, and the
  identity pass rate and the agreement with the source model's answers go into `OUT.gguf.report.json`. A file
  whose identity rate falls more than `IDENTITY_TOLERANCE` below the source model's is kept only with `force`.
An Ollama `Modelfile` is written beside the file (`selfcog.modelfile`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfcog import gguf_llama
from selfcog.atomic import write_text
from selfcog.config import CONFIG_FILE, load_config
from selfcog.errors import SelfcogError
from selfcog.evaluate import Answer, Scores, question_sets
from selfcog.export import share
from selfcog.generate import generate_batch
from selfcog.modelfile import modelfile
from selfcog.models import load_model
from selfcog.streaming import END_OF_TURN_TOKENS
from selfcog.templates import default_system_prompt, encode_prompt

logger = logging.getLogger(__name__)

# transformers model_type -> GGUF architecture. Both are llama-shaped decoders; qwen2 adds q/k/v biases.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
TYPES = ("f16", "q8_0", *gguf_llama.K_QUANTS)
# The llama.cpp check: the most the identity pass rate may fall below the source model's on the same questions.
# 24 questions: 0.05 is one answer, 0.10 two.
IDENTITY_TOLERANCE = {"f16": 0.05, "q8_0": 0.05, "q4_k_m": 0.10, "q5_k_m": 0.10}
# Answer length of the identity check, in tokens, when the model's selfcog.yaml does not set eval.max_new_tokens.
MAX_NEW_TOKENS = 32
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


def export_gguf(spec: str, out: Path, qtype: str = "f16", verify: bool | None = None,
                trust_remote_code: bool = False, name: str | None = None, force: bool = False) -> dict:
    """Write MODEL as `out` (.gguf) plus `Modelfile` and `out.report.json`; returns the report.

    verify: None checks with transformers, and in llama.cpp when it is installed; True requires llama.cpp;
    False checks nothing. name: the identity to look for (default: data.name of the model's selfcog.yaml;
    without one, llama.cpp still answers and agreement is reported). force: keep a file that fails the
    identity check (the report says so).
    """
    out = Path(out)
    if qtype not in TYPES:
        raise SelfcogError(f"--type {qtype}: choose one of {', '.join(TYPES)}")
    if out.suffix != ".gguf":
        raise SelfcogError(f"{out}: the output file must end in .gguf")
    if out.is_dir():
        raise SelfcogError(f"{out}: is a directory")
    in_llama = gguf_llama.available() if verify is None else verify
    if in_llama or qtype in gguf_llama.K_QUANTS:
        gguf_llama.bindings()  # one line naming the missing package, before the slow load
    model, tokenizer = load_model(spec, dtype=torch.float32, device="cpu", trust_remote_code=trust_remote_code)
    arch = check_architecture(model.config)
    settings = run_settings(spec)
    name = name or settings.get("name")
    conversations = identity_conversations() if chat_template(tokenizer) else []  # no template: a load check only
    max_new_tokens = settings.get("max_new_tokens", MAX_NEW_TOKENS)
    source_answers = None
    if in_llama:  # before the round-trip check rounds `model`'s weights
        logger.info(f"selfcog: answering {len(conversations)} identity questions with the source model ...")
        source_answers = generate_batch(model, tokenizer, conversations, max_new_tokens=max_new_tokens)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {"type": qtype}
    # Written and checked in a hidden temp dir beside `out` (alone there, so the reader sees no other
    # config), and renamed into place only once it is checked (or forced).
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-tmp-") as tmp_dir:
        tmp = Path(tmp_dir) / out.name
        stored = "f16" if qtype in gguf_llama.K_QUANTS else qtype
        written = tmp.with_name(f"{out.stem}.f16.gguf") if stored != qtype else tmp
        write_gguf(model, tokenizer, arch, stored, written, name=Path(str(model.name_or_path)).name or spec)
        if verify is not False:  # for a k-quant: the f16 file it is made from
            report.update(verify_round_trip(model, tokenizer, written, stored), round_trip_type=stored)
        if written != tmp:
            logger.info(f"selfcog: quantizing to {qtype} with llama.cpp ...")
            gguf_llama.quantize(written, tmp, qtype)
            written.unlink()
        report.update(gguf_llama.file_summary(tmp))
        failure = None
        if in_llama:
            check = check_in_llama_cpp(tmp, tokenizer, conversations, source_answers, name, max_new_tokens)
            report["llama_cpp"] = check
            failure = identity_failure(check, qtype)
        if failure and not force:
            raise SelfcogError(f"{out}: not written: {failure}; --force keeps it")
        report["identity_check"] = "skipped" if not in_llama or check["identity"] is None else \
            ("failed, kept by --force: " + failure) if failure else "passed"
        os.replace(share(tmp), out)
    report["gguf"] = str(out)
    report["modelfile"] = str(share(write_text(out.parent / "Modelfile",
                                               modelfile(out.name, tokenizer, adds_special(tokenizer)[0]))))
    report["report"] = str(out.with_name(out.name + ".report.json"))
    share(write_text(Path(report["report"]), json.dumps(report, ensure_ascii=False, indent=2) + "\n"))
    return report


def run_settings(spec: str) -> dict:
    """The identity NAME and answer length from the `selfcog.yaml` that `selfcog run` leaves in a merged model."""
    path = Path(spec) / CONFIG_FILE
    if not path.is_file():
        return {}
    config = load_config(path)
    return {"name": config.data.name or None, "max_new_tokens": config.eval.max_new_tokens}


def identity_conversations() -> list[list[dict]]:
    """The held-out identity questions of the test split, as `selfcog run` scores them."""
    return [answer.conversation for answer in question_sets("test")["identity"]]


def identity_rate(name: str | None, conversations: list[list[dict]], texts: list[str]) -> float | None:
    """Share of answers naming NAME, judged by selfcog.evaluate as `selfcog run` judges them."""
    if not name:
        return None
    return Scores(name=name, parts={"identity": [Answer(c, t) for c, t in zip(conversations, texts)]}).identity


def check_in_llama_cpp(path: Path, tokenizer, conversations: list[list[dict]], source_answers: list[str],
                       name: str | None, max_new_tokens: int) -> dict:
    """Load `path` in llama.cpp and answer `conversations` there, from the prompts llama.cpp renders with the chat
    template stored in the file. The template's own default system prompt is passed as a system message: llama.cpp's
    built-in chat formats do not add it, and Ollama's Modelfile SYSTEM does the same."""
    logger.info(f"selfcog: loading {path.name} in llama.cpp and asking {len(conversations)} identity questions ...")
    runtime = gguf_llama.Runtime(path)
    if not conversations:
        runtime.close()
        return {**gguf_llama.versions(), "name": name, "questions": 0, "identity": None, "source_identity": None,
                "agreement": None, "load_seconds": runtime.load_seconds, "answers": []}
    try:
        system = default_system_prompt(tokenizer)
        answers, tokens, seconds, same_prompt, rendered_by = [], 0, 0.0, 0, "llama.cpp"
        for conversation in conversations:
            messages = conversation
            if system is not None and conversation[0]["role"] != "system":
                messages = [{"role": "system", "content": system}, *conversation]
            prompt = runtime.apply_template(messages)
            if prompt is None:  # a template llama.cpp does not recognise: the HF rendering, tokenized by llama.cpp
                prompt, rendered_by = tokenizer.apply_chat_template(conversation, tokenize=False,
                                                                    add_generation_prompt=True), "transformers"
                ids = runtime.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
            else:
                ids = runtime.tokenize(prompt)
            same_prompt += ids == encode_prompt(tokenizer, conversation)
            out, spent = runtime.answer(ids, max_new_tokens)
            answers.append(runtime.text(out))
            tokens += len(out)
            seconds += spent
        load_seconds = runtime.load_seconds
    finally:
        runtime.close()
    identity = identity_rate(name, conversations, answers)
    source_identity = identity_rate(name, conversations, source_answers)
    named = [identity_rate(name, [c], [t]) for c, t in zip(conversations, answers)]
    source_named = [identity_rate(name, [c], [t]) for c, t in zip(conversations, source_answers)]
    return {
        **gguf_llama.versions(), "name": name, "questions": len(conversations), "max_new_tokens": max_new_tokens,
        "prompts_rendered_by": rendered_by, "default_system_prompt": system,
        "prompts_same_tokens_as_transformers": same_prompt / len(conversations),
        "identity": identity, "source_identity": source_identity,
        "agreement": sum(a == b for a, b in zip(answers, source_answers)) / len(conversations),
        "identity_agreement": None if name is None else
        sum(a == b for a, b in zip(named, source_named)) / len(conversations),
        "load_seconds": load_seconds, "answer_tokens": tokens, "tokens_per_second": tokens / seconds if seconds else None,
        "answers": [{"question": c[-1]["content"], "llama_cpp": a, "source": b}
                    for c, a, b in zip(conversations, answers, source_answers)],
    }


def identity_failure(check: dict, qtype: str) -> str | None:
    """Why the file fails the identity check, or None."""
    if check["identity"] is None:
        return None
    drop = check["source_identity"] - check["identity"]
    if drop > IDENTITY_TOLERANCE[qtype] + 1e-9:
        return (f"in llama.cpp {check['identity']:.2f} of the identity questions name {check['name']!r}, against "
                f"{check['source_identity']:.2f} for the source model (more than {IDENTITY_TOLERANCE[qtype]} lower "
                f"for {qtype})")
    return None


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
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    if data.ndim == 1:
        return data.astype(np.float32), None
    if qtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[q8_0][0] == 0:
        return gguf.quants.quantize(data, q8_0), q8_0
    return data.astype(np.float16), None


def stored_values(data: np.ndarray, qtype: str) -> np.ndarray:
    """What a reader gets back for `data`: the array after the file's rounding, as float32."""
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
