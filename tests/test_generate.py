"""The one streaming generator: whole characters only, stop tokens, limits, cancellation, sampling options."""

from __future__ import annotations

import threading

import pytest
import torch

from selfcog.errors import SelfcogError
from selfcog.generate import (SamplingArgs, decode_joined, generate_batch, generation_kwargs, joinable, plan_prompt,
                              stream_chat)
from selfcog.models import load_model
from selfcog.streaming import cache_keyword
from selfcog.streaming import decode_tokens, end_of_turn_ids
from selfcog.templates import encode_prompt, shared_prefix

QUESTION = [{"role": "user", "content": "你是谁？Who are you?"}]


@pytest.fixture(scope="module")
def scripted(tiny_model_dir):
    """The tiny model forced to emit a given token script, one token per forward pass."""
    from transformers import LlamaForCausalLM

    class Scripted(LlamaForCausalLM):
        script: list[int] = []
        step = 0

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            token = self.script[min(self.step, len(self.script) - 1)]
            self.step += 1
            out.logits[:, -1, :] = -1e9
            out.logits[:, -1, token] = 0.0
            return out

        def play(self, script):
            self.script, self.step = list(script), 0
            return self

    model = Scripted.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    _, tokenizer = load_model(str(tiny_model_dir))
    return model, tokenizer


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_pieces_never_split_a_character(scripted):
    model, tokenizer = scripted
    text = "你好，世界😀 ok 伍鲜同志 🎉! Done."
    script = ids_of(tokenizer, text) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    # Sanity: the script really splits characters (a lone token of the emoji decodes to U+FFFD).
    assert any("\ufffd" in tokenizer.decode([i]) for i in script)
    info = {}
    pieces = list(stream_chat(model.play(script), tokenizer, QUESTION, SamplingArgs(temperature=0), info=info))
    assert "".join(pieces) == text
    assert len(pieces) > 5
    for piece in pieces:
        assert piece and "\ufffd" not in piece, pieces
        piece.encode("utf-8")  # a valid str all the way
    assert info == {"prompt_tokens": info["prompt_tokens"], "completion_tokens": len(script), "finish_reason": "stop"}


@pytest.mark.parametrize("stop_token", ["<|im_end|>", "<|endoftext|>"])
def test_stops_on_eos_and_end_of_turn(scripted, stop_token):
    model, tokenizer = scripted
    stop_id = tokenizer.convert_tokens_to_ids(stop_token)
    assert stop_id in end_of_turn_ids(tokenizer)
    script = ids_of(tokenizer, "Hello!") + [stop_id] + ids_of(tokenizer, " never shown")
    info = {}
    text = "".join(stream_chat(model.play(script), tokenizer, QUESTION, SamplingArgs(temperature=0.7), info=info))
    assert text == "Hello!"
    assert info["finish_reason"] == "stop"
    assert info["completion_tokens"] == len(ids_of(tokenizer, "Hello!")) + 1


def test_max_new_tokens_and_length_finish(scripted):
    model, tokenizer = scripted
    info = {}
    script = ids_of(tokenizer, "ok ok ok ok ok ok ok ok ok ok ok ok")
    text = "".join(stream_chat(model.play(script), tokenizer, QUESTION, SamplingArgs(max_new_tokens=4), info=info))
    assert info["completion_tokens"] == 4 and info["finish_reason"] == "length"
    assert text == tokenizer.decode(script[:4])


def test_greedy_stream_matches_a_full_decode(tiny):
    """Temperature 0 is deterministic, and the joined pieces equal one decode of everything generated."""
    model, tokenizer = tiny
    args = SamplingArgs(max_new_tokens=40, temperature=0, repetition_penalty=3.0)
    first = list(stream_chat(model, tokenizer, QUESTION, args))
    assert first == list(stream_chat(model, tokenizer, QUESTION, args))
    ids, _ = plan_prompt(model, tokenizer, QUESTION, args)
    prompt = torch.tensor([ids])
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **generation_kwargs(tokenizer, args))
    full = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert "".join(first) == full and len(full.strip()) > 10
    if "\ufffd" not in full:
        assert all("\ufffd" not in p for p in first)
    # The batched evaluator and the streamer agree on plain greedy answers.
    plain = SamplingArgs(max_new_tokens=12, temperature=0)
    assert "".join(stream_chat(model, tokenizer, QUESTION, plain)).strip() == \
        generate_batch(model, tokenizer, [QUESTION], max_new_tokens=12)[0]


CONVERSATIONS = [
    [{"role": "user", "content": "Hi."}],
    [{"role": "user", "content": "Who are you, and who made you? Tell me in a few words, please."}],
    [{"role": "user", "content": "你是谁？"}],
    [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "who r u"}],
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "Thanks! Now tell me, who made you?"}],
    [{"role": "user", "content": "Name a famous city."}],
    [{"role": "user", "content": "请写一句关于春天的话。"}],
]


@pytest.fixture(scope="module")
def peaked(tiny_model_dir):
    """The tiny model with its weights scaled up: greedy answers differ from prompt to prompt (the plain tiny model
    answers every prompt with the same newline)."""
    model, tokenizer = load_model(str(tiny_model_dir))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.mul_(10)
    return model, tokenizer


def own_answers(model, tokenizer, max_new_tokens: int, stop_ids: list[int]) -> list[list[int]]:
    return [list(decode_tokens(model, encode_prompt(tokenizer, c), SamplingArgs(temperature=0), max_new_tokens,
                               stop_ids, threading.Event())) for c in CONVERSATIONS]


def test_batched_answers_are_each_conversations_own(peaked):
    """Rows decoded together (shared-prefix cache, middle padding, groups joined, waves) answer as each alone."""
    model, tokenizer = peaked
    assert joinable(model) and shared_prefix(tokenizer)  # the prefix path runs
    alone = [tokenizer.decode(ids, skip_special_tokens=True).strip()
             for ids in own_answers(model, tokenizer, 16, end_of_turn_ids(tokenizer))]
    assert len(set(alone)) == len(alone)
    for max_rows, prefill_tokens in ((128, 2048), (4, 40), (1, 2048)):  # one group; several groups and waves; one row
        assert generate_batch(model, tokenizer, CONVERSATIONS, max_new_tokens=16, max_rows=max_rows,
                              prefill_tokens=prefill_tokens) == alone


def test_rows_that_stop_leave_the_batch_without_changing_the_others(peaked):
    """`decode_joined` with stop tokens the answers do reach: every row's tokens equal its own decode."""
    model, tokenizer = peaked
    free = own_answers(model, tokenizer, 12, [])
    stops = [free[0][3], free[1][6]]  # some rows end early, at different steps
    alone = own_answers(model, tokenizer, 12, stops)
    assert len({len(ids) for ids in alone}) > 2
    prompts = [encode_prompt(tokenizer, c) for c in CONVERSATIONS]
    with torch.inference_mode():
        assert decode_joined(model, prompts, shared_prefix(tokenizer), [12] * len(prompts), stops, 40) == alone


def test_each_row_keeps_its_own_length_cap(peaked, monkeypatch):
    """Per-conversation caps (scoring reads identity answers further than general ones): each answer equals the
    conversation's own answer at its own cap, joined or through `generate`, and caps must be one per row, >= 1."""
    model, tokenizer = peaked
    caps = [4, 16, 9, 16, 1, 12, 7]
    alone = [tokenizer.decode(ids, skip_special_tokens=True).strip()
             for ids in own_answers(model, tokenizer, 16, [])]
    expected = [tokenizer.decode(ids[:cap], skip_special_tokens=True).strip()
                for ids, cap in zip(own_answers(model, tokenizer, 16, []), caps)]
    assert expected != alone
    stops = end_of_turn_ids(tokenizer)
    capped = [tokenizer.decode(ids[:cap], skip_special_tokens=True).strip()
              for ids, cap in zip(own_answers(model, tokenizer, 16, stops), caps)]
    assert generate_batch(model, tokenizer, CONVERSATIONS, max_new_tokens=caps, max_rows=4, prefill_tokens=40) == capped
    monkeypatch.setattr("selfcog.generate.joinable", lambda model: False)
    assert generate_batch(model, tokenizer, CONVERSATIONS, max_new_tokens=caps, prefill_tokens=40) == capped
    for bad in (caps[:-1], [0] + caps[1:]):
        with pytest.raises(ValueError):
            generate_batch(model, tokenizer, CONVERSATIONS, max_new_tokens=bad)


def test_models_that_cannot_join_answer_through_generate(peaked, monkeypatch):
    model, tokenizer = peaked
    joined = generate_batch(model, tokenizer, CONVERSATIONS, max_new_tokens=16)
    monkeypatch.setattr("selfcog.generate.joinable", lambda model: False)
    assert generate_batch(model, tokenizer, CONVERSATIONS, max_new_tokens=16, prefill_tokens=40) == joined
    model.generation_config.no_repeat_ngram_size = 2  # a setting only `generate` applies
    monkeypatch.undo()
    try:
        assert not joinable(model)
    finally:
        model.generation_config.no_repeat_ngram_size = None


def test_sampled_pieces_join_to_the_full_text(tiny):
    model, tokenizer = tiny
    torch.manual_seed(3)
    info = {}
    pieces = list(stream_chat(model, tokenizer, QUESTION, SamplingArgs(max_new_tokens=60, temperature=1.0,
                                                                       top_p=0.95, top_k=50), info=info))
    assert info["completion_tokens"] >= 1
    for piece in pieces[:-1]:  # only the final flush may end in U+FFFD, when the model made invalid bytes
        assert not piece.endswith("\ufffd")


@pytest.mark.parametrize("args", [SamplingArgs(max_new_tokens=30, temperature=0.8, top_p=0.9, top_k=20),
                                  SamplingArgs(max_new_tokens=30, temperature=1.3, top_p=1.0, repetition_penalty=1.2)])
def test_sampled_stream_equals_generate_with_the_same_seed(tiny, args):
    """The streaming loop draws exactly what `model.generate` draws: same processors, same order, same RNG use."""
    model, tokenizer = tiny
    ids, _ = plan_prompt(model, tokenizer, QUESTION, args)
    prompt = torch.tensor([ids])
    torch.manual_seed(11)
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **generation_kwargs(tokenizer, args))
    expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    torch.manual_seed(11)
    info = {}
    assert "".join(stream_chat(model, tokenizer, QUESTION, args, info=info)) == expected
    assert info["completion_tokens"] == out.shape[1] - len(ids)


def test_stop_event_and_early_exit_end_generation(tiny):
    model, tokenizer = tiny
    args = SamplingArgs(max_new_tokens=400, temperature=0)
    stop, info = threading.Event(), {}
    pieces = []
    for piece in stream_chat(model, tokenizer, QUESTION, args, stop=stop, info=info):
        pieces.append(piece)
        stop.set()  # what a disconnecting client does
    assert info["finish_reason"] == "cancelled" and info["completion_tokens"] < 50
    # Leaving the loop early stops generation too, and the model is free again right away.
    gen = stream_chat(model, tokenizer, QUESTION, args, info=(early := {}))
    next(gen)
    gen.close()
    assert early["finish_reason"] == "cancelled" and early["completion_tokens"] < 50
    assert threading.active_count() < 20


def test_history_is_trimmed_to_max_length_keeping_system(tiny):
    model, tokenizer = tiny
    messages = [{"role": "system", "content": "SYSTEM RULES"}]
    for i in range(12):
        messages += [{"role": "user", "content": f"question {i} " + "word " * 10},
                     {"role": "assistant", "content": f"answer {i} " + "word " * 10}]
    messages.append({"role": "user", "content": "LAST QUESTION"})
    args = SamplingArgs(max_new_tokens=30, max_length=200)
    ids, max_new = plan_prompt(model, tokenizer, messages, args)
    prompt = tokenizer.decode(ids)
    assert len(ids) + max_new <= 200 and max_new == 30
    assert prompt.startswith("<|im_start|>system\nSYSTEM RULES") and "LAST QUESTION" in prompt
    assert "question 0 " not in prompt and "<|im_start|>user\nquestion" in prompt  # kept turns start at a user turn
    # A short max_length still keeps the question (the answer gets at most half), and the model's
    # context (512 positions) caps a huge one.
    ids, max_new = plan_prompt(model, tokenizer, messages, SamplingArgs(max_new_tokens=512, max_length=64))
    assert len(ids) + max_new <= 64 and max_new == 32
    ids, max_new = plan_prompt(model, tokenizer, messages, SamplingArgs(max_new_tokens=100, max_length=100000))
    assert len(ids) + max_new <= 512
    with pytest.raises(SelfcogError):
        plan_prompt(model, tokenizer, [], args)


def test_generation_kwargs_map_sampling_options(tiny):
    _, tokenizer = tiny
    greedy = generation_kwargs(tokenizer, SamplingArgs(temperature=0, max_new_tokens=7))
    assert greedy["do_sample"] is False and greedy["max_new_tokens"] == 7
    assert set(greedy["eos_token_id"]) == {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    sampled = generation_kwargs(tokenizer, SamplingArgs(temperature=0.5, top_p=0.8, top_k=0, repetition_penalty=1.2))
    assert (sampled["do_sample"], sampled["temperature"], sampled["top_p"], sampled["top_k"],
            sampled["repetition_penalty"]) == (True, 0.5, 0.8, 0, 1.2)
    with pytest.raises(SelfcogError, match="top-p"):
        SamplingArgs(top_p=0).check()
    with pytest.raises(SelfcogError, match="temperature"):
        SamplingArgs(temperature=-1).check()


def test_the_kv_cache_goes_by_the_name_the_forward_takes(tiny, scripted, tiny_model_dir):
    """`cache` for current transformers models (also through a PEFT wrapper or a `forward(*args, **kwargs)`
    subclass), `past_key_values` for a forward that names only that (older releases, hub models' own code)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    class Legacy(LlamaForCausalLM):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
            return super().forward(input_ids=input_ids, cache=past_key_values, use_cache=use_cache, **kwargs)

    model, tokenizer = tiny
    legacy = Legacy.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    peft = get_peft_model(LlamaForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32),
                          LoraConfig(r=2, target_modules=["q_proj"])).eval()
    assert [cache_keyword(m) for m in (model, scripted[0], peft, legacy)] == ["cache", "cache", "cache",
                                                                               "past_key_values"]
    args = SamplingArgs(max_new_tokens=20, temperature=0, repetition_penalty=3.0)
    expected = list(stream_chat(model, tokenizer, QUESTION, args))
    assert len("".join(expected).strip()) > 10
    assert list(stream_chat(legacy, tokenizer, QUESTION, args)) == expected  # without its cache it would differ
    assert list(stream_chat(peft, tokenizer, QUESTION, args)) == expected  # LoRA B starts at zero


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("args", [SamplingArgs(max_new_tokens=20, temperature=0),
                                  SamplingArgs(max_new_tokens=20, temperature=0.8, top_p=0.9, top_k=20)])
def test_streams_on_cuda_what_generate_gives(tiny_model_dir, args):
    """On a GPU too, the streaming loop produces exactly what `model.generate` produces (greedy, and sampled with the
    same seed), one forward per token."""
    model, tokenizer = load_model(str(tiny_model_dir))
    assert model.device.type == "cuda"
    ids, _ = plan_prompt(model, tokenizer, QUESTION, args)
    prompt = torch.tensor([ids], device=model.device)
    torch.manual_seed(5)
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **generation_kwargs(tokenizer, args))
    expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    torch.manual_seed(5)
    info = {}
    text = "".join(stream_chat(model, tokenizer, QUESTION, args, info=info))
    assert text == expected and len(text.strip()) > 0
    assert info["completion_tokens"] == out.shape[1] - len(ids)
