"""Continuous batching: a request's answer is the same whether it decodes alone or in a batch with others."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from selfcog.batching import BASE_ADAPTER, BatchEngine
from selfcog.generate import SamplingArgs, plan_prompt, stream_chat

QUESTIONS = ["Who are you?", "你是谁？请介绍一下你自己。你能做什么？" * 3, "The capital of France", "hi",
             "Two plus two is four. The sky is blue. " * 4, "system user", "Paris?"]


def spiky_model(tokenizer, seed: int = 0, dtype=torch.float32):
    """A tiny random Llama whose greedy answers vary token to token (the default init repeats one token)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=2, pad_token_id=0, bos_token_id=None,
                         initializer_range=0.2)
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    return model


@pytest.fixture(scope="module")
def spiky(tiny):
    _, tokenizer = tiny
    return spiky_model(tokenizer), tokenizer


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def run_together(engine, model, tokenizer, jobs, stagger: float = 0.02) -> list[tuple[str, dict]]:
    """Each job `(question, args, seed, adapter)` from its own thread, arriving `stagger` s apart, so requests
    join a batch that is already decoding and leave it at different steps."""
    results: list = [None] * len(jobs)

    def one(i, question, args, seed, adapter):
        time.sleep(stagger * i)
        ids, max_new = plan_prompt(model, tokenizer, ask(question), args)
        info = {}
        results[i] = ("".join(engine.stream(ids, args, max_new, info=info, seed=seed, adapter=adapter)), info)

    threads = [threading.Thread(target=one, args=(i, *job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def alone(model, tokenizer, question, args, seed=None, adapter=None) -> tuple[str, dict]:
    info = {}
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    text = "".join(stream_chat(model, tokenizer, ask(question), args, info=info, adapter=adapter,
                               generator=generator))
    return text, info


def test_greedy_batch_equals_each_request_alone(spiky):
    """Seven prompts of different lengths, different max_tokens and repetition penalties, at most 4 at once."""
    model, tokenizer = spiky
    jobs = [(q, SamplingArgs(max_new_tokens=10 + 7 * i, temperature=0, repetition_penalty=(1.0, 1.5)[i % 2]),
             None, None) for i, q in enumerate(QUESTIONS)]
    expected = [alone(model, tokenizer, q, args) for q, args, _, _ in jobs]
    assert len({text for text, _ in expected}) == len(jobs) and all(len(set(t)) > 5 for t, _ in expected)
    engine = BatchEngine(model, tokenizer, max_batch=4)
    try:
        assert run_together(engine, model, tokenizer, jobs) == expected
        # How many overlap depends on arrival timing against decoding speed; never more than max_batch.
        assert 2 <= engine.stats["largest_batch"] <= 4 and engine.stats["completed"] == len(jobs)
    finally:
        engine.close()


def test_requests_arriving_together_are_prefilled_together_with_the_same_answers(spiky):
    import queue

    from selfcog.batching import DONE, Request

    model, tokenizer = spiky
    args = SamplingArgs(max_new_tokens=20, temperature=0)
    expected = [alone(model, tokenizer, q, args)[0] for q in QUESTIONS]
    engine = BatchEngine(model, tokenizer, max_batch=8)
    outs = [queue.Queue() for _ in QUESTIONS]
    try:
        with engine.condition:  # the engine thread waits until every request is queued
            for q, out in zip(QUESTIONS, outs):
                ids, max_new = plan_prompt(model, tokenizer, ask(q), args)
                engine.submit(Request(ids, args, max_new, out.put))
        answers = []
        for out in outs:
            pieces = []
            while (item := out.get(timeout=60)) is not DONE:
                pieces.append(item)
            answers.append("".join(pieces))
        assert answers == expected
        assert engine.stats["largest_prefill"] == len(QUESTIONS)
        assert engine.stats["prefix_reused"] == len(QUESTIONS)  # the template's system prompt, computed once
    finally:
        engine.close()


def test_sampled_batch_equals_each_request_alone_with_its_seed(spiky):
    model, tokenizer = spiky
    settings = [SamplingArgs(max_new_tokens=24, temperature=0.8, top_p=0.9, top_k=20),
                SamplingArgs(max_new_tokens=30, temperature=1.3, top_p=1.0, repetition_penalty=1.2),
                SamplingArgs(max_new_tokens=16, temperature=0)]
    jobs = [(q, settings[i % 3], 100 + i, None) for i, q in enumerate(QUESTIONS[:6])]
    expected = [alone(model, tokenizer, q, args, seed) for q, args, seed, _ in jobs]
    engine = BatchEngine(model, tokenizer, max_batch=8)
    try:
        assert run_together(engine, model, tokenizer, jobs) == expected
    finally:
        engine.close()


def test_cancelled_request_leaves_and_the_others_finish(spiky):
    model, tokenizer = spiky
    engine = BatchEngine(model, tokenizer, max_batch=4)
    args = SamplingArgs(max_new_tokens=200, temperature=0)
    ids, max_new = plan_prompt(model, tokenizer, ask("hi"), args)
    stop, info = threading.Event(), {}
    try:
        others = threading.Thread(target=lambda: run_together(engine, model, tokenizer,
                                                              [(q, SamplingArgs(max_new_tokens=30, temperature=0),
                                                                None, None) for q in QUESTIONS[:3]]))
        others.start()
        pieces = engine.stream(ids, args, max_new, stop=stop, info=info)
        next(pieces)
        stop.set()  # what a disconnecting client does
        assert list(pieces) == [] or info["completion_tokens"] < 200
        others.join(60)
        deadline = time.monotonic() + 10
        while engine.waiting:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert info["finish_reason"] == "cancelled" and engine.stats["cancelled"] == 1
        assert engine.stats["completed"] == 3 and engine.cache is None
    finally:
        engine.close()


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir, tmp_path_factory):
    """Two LoRA adapters of the tiny model with random (non-zero) weights, saved: different identities."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    paths = []
    for seed, targets in ((1, ["q_proj", "v_proj"]), (2, ["q_proj", "o_proj", "down_proj"])):
        torch.manual_seed(seed)
        base = LlamaForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=targets, init_lora_weights=False))
        path = tmp_path_factory.mktemp(f"adapter{seed}")
        peft.save_pretrained(path)
        paths.append(str(path))
    return paths


def test_mixed_adapter_batch_equals_each_adapter_alone(tiny_model_dir, two_adapters):
    from selfcog.chat import load_identities

    model, tokenizer, identities = load_identities(str(tiny_model_dir), [("alice", two_adapters[0]),
                                                                         ("伍鲜", two_adapters[1])], "tiny")
    assert identities == {"tiny": BASE_ADAPTER, "alice": "identity0", "伍鲜": "identity1"}
    args = SamplingArgs(max_new_tokens=24, temperature=0, repetition_penalty=3.0)
    adapters = list(identities.values())
    jobs = [(q, args, None, adapters[i % 3]) for i, q in enumerate(QUESTIONS[:6])]
    expected = [alone(model, tokenizer, q, args, adapter=adapter) for q, args, _, adapter in jobs]
    # The identities answer differently.
    assert len({alone(model, tokenizer, QUESTIONS[0], args, adapter=a)[0] for a in adapters}) == 3
    engine = BatchEngine(model, tokenizer, max_batch=6)
    try:
        assert run_together(engine, model, tokenizer, jobs, stagger=0.005) == expected
        assert engine.stats["largest_batch"] >= 3
    finally:
        engine.close()


def test_bf16_answers_match_fp32_within_tolerance(spiky, tiny):
    """bf16 serving: the next-token distribution stays within 0.05 (total variation) of fp32's, and the batched
    bf16 answers equal bf16's single-stream answers token for token."""
    model, tokenizer = spiky
    half = spiky_model(tokenizer, dtype=torch.bfloat16)
    for question in QUESTIONS:
        ids, _ = plan_prompt(model, tokenizer, ask(question), SamplingArgs())
        with torch.inference_mode():
            full = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
            low = torch.softmax(half(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        assert 0.5 * (full - low).abs().sum() < 0.05
    jobs = [(q, SamplingArgs(max_new_tokens=20, temperature=0, repetition_penalty=1.5), None, None)
            for q in QUESTIONS[:5]]
    expected = [alone(half, tokenizer, q, args) for q, args, _, _ in jobs]
    engine = BatchEngine(half, tokenizer, max_batch=5)
    try:
        got = run_together(engine, half, tokenizer, jobs)
    finally:
        engine.close()
    assert sum(g == e for g, e in zip(got, expected)) >= 4, (got, expected)
