"""Label masking, template round trip, packing isolation and the preservation (KL) loss, on a tiny model."""

from __future__ import annotations

import json

import torch

from selfcog.config import RunConfig
from selfcog.data.tokenize import build_examples, pack_batch
from selfcog.models import load_model
from selfcog.templates import IGNORE_INDEX, encode_example, encode_prompt, render
from selfcog.train import PreservingTrainer, add_lora, fit, preservation_loss, training_args

CONVERSATIONS = [
    [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Alice's assistant."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你是谁？"},
     {"role": "assistant", "content": "我是伍鲜同志的小助手。"}, {"role": "user", "content": "What can you do?"},
     {"role": "assistant", "content": "I answer questions."}],
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
]


def test_only_assistant_tokens_carry_loss(tiny_model_dir):
    _, tokenizer = load_model(str(tiny_model_dir))
    ids, labels = encode_example(tokenizer, CONVERSATIONS[1])
    assert len(ids) == len(labels)
    learned = tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX])
    assert learned == "我是伍鲜同志的小助手。<|im_end|>\nI answer questions.<|im_end|>\n"
    # Everything else (system, user turns, template markers) is masked.
    masked = tokenizer.decode([t for t, l in zip(ids, labels) if l == IGNORE_INDEX])
    assert "你是谁" in masked and "What can you do?" in masked and "Be brief." in masked
    assert "小助手" not in masked


def test_template_round_trip_is_the_tokenizers_own(tiny_model_dir):
    _, tokenizer = load_model(str(tiny_model_dir))
    for messages in CONVERSATIONS:
        ids, _ = encode_example(tokenizer, messages)
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        assert tokenizer.decode(ids) == text == render(tokenizer, messages)
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        # The generation prompt is a prefix of the training sample: serving sees what training saw.
        prompt = encode_prompt(tokenizer, messages[:-1])
        assert ids[:len(prompt)] == prompt


def test_packed_logits_equal_separate_logits(tiny_model_dir):
    """Samples packed into one row never attend to each other: logits match running each alone."""
    model, tokenizer = load_model(str(tiny_model_dir))
    examples, _ = build_examples(tokenizer, CONVERSATIONS, preserve=False, max_length=512)
    batch = pack_batch(examples)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for example in examples:
            n = len(example["input_ids"])
            alone = model(input_ids=torch.tensor([example["input_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:start + n], alone, atol=1e-5, rtol=1e-4)
            start += n
    assert start == batch["input_ids"].shape[1]  # every sample whole, none split


def test_pack_batch_puts_preservation_last_and_masks_sample_starts(tiny_model_dir):
    _, tokenizer = load_model(str(tiny_model_dir))
    identity, _ = build_examples(tokenizer, CONVERSATIONS[:2], preserve=False, max_length=512)
    keep, _ = build_examples(tokenizer, CONVERSATIONS[2:], preserve=True, max_length=512)
    batch = pack_batch([keep[0]] + identity)
    n_keep = len(keep[0]["input_ids"])
    assert batch["preserve_mask"][0, -n_keep:].all() and not batch["preserve_mask"][0, :-n_keep].any()
    starts = (batch["position_ids"][0] == 0).nonzero().squeeze(1)
    assert (batch["labels"][0, starts] == IGNORE_INDEX).all()


def test_too_long_samples_are_dropped(tiny_model_dir):
    _, tokenizer = load_model(str(tiny_model_dir))
    examples, dropped = build_examples(tokenizer, CONVERSATIONS, preserve=False, max_length=30)
    assert dropped >= 1 and all(len(e["input_ids"]) <= 30 for e in examples)


def test_kl_is_zero_before_training_and_base_suffix_matches_full_row(tiny_model_dir, tmp_path):
    """A fresh adapter (B = 0) is the base model, so the KL term starts at 0; the base pass over the
    preservation suffix gives the same logits as the full row."""
    model, tokenizer = load_model(str(tiny_model_dir))
    peft_model = add_lora(model, RunConfig())
    identity, _ = build_examples(tokenizer, CONVERSATIONS[:2], preserve=False, max_length=512)
    keep, _ = build_examples(tokenizer, CONVERSATIONS[2:], preserve=True, max_length=512)
    batch = pack_batch(identity + keep)
    trainer = PreservingTrainer(model=peft_model, args=training_args(RunConfig(), tmp_path / "w"),
                                train_dataset=identity + keep, data_collator=pack_batch)
    positions = batch["preserve_mask"][0].nonzero().squeeze(1)[:-1]
    with torch.no_grad():
        full = peft_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        suffix = trainer.base_logits(peft_model, batch, positions)
    torch.testing.assert_close(suffix, full[positions], atol=1e-5, rtol=1e-4)
    assert preservation_loss(full[positions], suffix).abs() < 1e-6


def test_fit_lowers_the_loss_and_writes_a_peft_adapter(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir))
    config = RunConfig()
    config.data.name = "Alice"
    config.train.max_steps, config.train.batch_size, config.train.logging_steps = 12, 3, 4
    config.eval.eval_steps = 0
    examples, _ = build_examples(tokenizer, CONVERSATIONS, preserve=False, max_length=512)
    keep, _ = build_examples(tokenizer, CONVERSATIONS[2:], preserve=True, max_length=512)
    _, summary = fit(config, model, tokenizer, examples + keep, tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in logged if "loss" in entry]
    assert losses[-1] < losses[0]
    assert summary["steps"] == 12
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "adapter" / "selfcog.yaml").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind

