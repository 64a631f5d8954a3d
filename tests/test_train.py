"""Label masking, template round trip, packing isolation and the preservation (KL) loss, on a tiny model."""

from __future__ import annotations

import ctypes
import json
import os

import pytest
import torch

from selfcog.config import EvalArgs, RunConfig
from selfcog.attention import packed_attention, packed_layout
from selfcog.data.tokenize import build_examples, pack_batch, shared_prefix_length
from selfcog.models import load_model
from selfcog.templates import IGNORE_INDEX, encode_example, encode_prompt, render
from selfcog.engine.callbacks import stop_reason
from selfcog.engine.frozen_layers import attach_bottom_hidden, reusable
from selfcog.engine.lora import add_lora
from selfcog.engine.loss import (GatheredLogProbs, attach_base_topk, gathered_log_probs, preservation_loss,
                                 topk_preservation_loss)
from selfcog.engine.memory import freed_memory_kept
from selfcog.engine.trainer import PreservingTrainer
from selfcog.recipes.identity import fit, training_args

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


SHARED_SYSTEM = [[{"role": "system", "content": "You are a helpful assistant."}] + c[-2:] for c in CONVERSATIONS]


def packed_logits(model, batch, **kwargs):
    layout = packed_layout(batch["packed_lengths"])
    with packed_attention(model):
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                    packed_layout=layout, **kwargs)
    assert layout.used
    return out.logits[0]


def sample_rows(batch, examples):
    """Row positions of each sample's tokens: the shared prefix, then the sample's own rest."""
    prefix, rests = int(batch["packed_lengths"][0]), batch["packed_lengths"][1:].tolist()
    start = prefix
    for example, n in zip(examples, rests):
        assert len(example["input_ids"]) == prefix + n
        yield torch.cat([torch.arange(prefix), torch.arange(start, start + n)])
        start += n
    assert start == batch["input_ids"].shape[1]  # every sample whole, none split


@pytest.mark.parametrize("conversations", [CONVERSATIONS, SHARED_SYSTEM], ids=["mixed", "shared-system"])
def test_packed_logits_equal_separate_logits(tiny_model_dir, conversations):
    """Samples packed into one row never attend to each other: logits match running each alone."""
    model, tokenizer = load_model(str(tiny_model_dir))
    examples, _ = build_examples(tokenizer, conversations, preserve=False, max_length=512)
    batch = pack_batch(examples)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    if conversations is SHARED_SYSTEM:  # the system turn is stored once
        assert batch["packed_lengths"][0] > 5
        assert batch["input_ids"].shape[1] < sum(len(e["input_ids"]) for e in examples)
    with torch.no_grad():
        packed = packed_logits(model, batch)
        for example, rows in zip(examples, sample_rows(batch, examples)):
            alone = model(input_ids=torch.tensor([example["input_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[rows], alone, atol=1e-5, rtol=1e-4)


def test_packed_gradients_equal_separate_gradients(tiny_model_dir):
    """The packed row's loss gradient equals the gradient of the same token-mean loss over separate samples."""
    model, tokenizer = load_model(str(tiny_model_dir))
    peft_model = add_lora(model, RunConfig())
    for name, param in peft_model.named_parameters():  # B = 0 at init would make every LoRA-A gradient zero
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    examples, _ = build_examples(tokenizer, SHARED_SYSTEM, preserve=False, max_length=512)
    batch = pack_batch(examples)
    labels = batch["labels"][0]
    keep = (labels[1:] != IGNORE_INDEX).nonzero().squeeze(1)
    loss = torch.nn.functional.cross_entropy(packed_logits(peft_model, batch)[keep], labels[keep + 1])
    packed = torch.autograd.grad(loss, [p for p in peft_model.parameters() if p.requires_grad])
    total, count = 0, 0
    for example in examples:
        ids, lab = torch.tensor([example["input_ids"]]), torch.tensor(example["labels"])
        logits = peft_model(input_ids=ids, use_cache=False).logits[0, :-1]
        mask = lab[1:] != IGNORE_INDEX
        total = total + torch.nn.functional.cross_entropy(logits[mask], lab[1:][mask], reduction="sum")
        count += int(mask.sum())
    separate = torch.autograd.grad(total / count, [p for p in peft_model.parameters() if p.requires_grad])
    for a, b in zip(packed, separate):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_top_layers_adapts_only_the_last_layers(tiny_model_dir):
    """lora.top_layers=1: adapters on every linear layer of the last decoder layer only, and a training step
    leaves the layers below untouched."""
    model, tokenizer = load_model(str(tiny_model_dir))
    last = model.config.num_hidden_layers - 1
    config = RunConfig()
    config.lora.top_layers = 1
    peft_model = add_lora(model, config)
    adapted = {name.split(".lora_A")[0] for name, _ in peft_model.named_parameters() if "lora_A" in name}
    every = {name for name, module in load_model(str(tiny_model_dir))[0].named_modules()
             if isinstance(module, torch.nn.Linear) and name != "lm_head"}
    assert adapted and {name.removeprefix("base_model.model.") for name in adapted} == \
        {name for name in every if f"layers.{last}." in name}
    examples, _ = build_examples(tokenizer, SHARED_SYSTEM, preserve=False, max_length=512)
    batch = pack_batch(examples)
    keep = (batch["labels"][0, 1:] != IGNORE_INDEX).nonzero().squeeze(1)
    loss = torch.nn.functional.cross_entropy(packed_logits(peft_model, batch)[keep], batch["labels"][0, keep + 1])
    loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)
    assert all(p.grad is None for n, p in peft_model.named_parameters() if f"layers.{last}." not in n)


def test_shared_prefix_stops_before_the_first_loss_token(tiny_model_dir):
    _, tokenizer = load_model(str(tiny_model_dir))
    convs = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": a}] for a in ("Hello", "Hey there")]
    examples, _ = build_examples(tokenizer, convs, preserve=False, max_length=512)
    prefix = shared_prefix_length(examples)
    first_loss = min(e["labels"].index(next(l for l in e["labels"] if l != IGNORE_INDEX)) for e in examples)
    assert prefix == first_loss - 1  # the whole prompt is shared, up to the token predicting the answer
    assert pack_batch(examples, share_prefix=False)["packed_lengths"][0] == 0


def test_pack_batch_puts_preservation_last_and_masks_sample_starts(tiny_model_dir):
    _, tokenizer = load_model(str(tiny_model_dir))
    identity, _ = build_examples(tokenizer, CONVERSATIONS[:2], preserve=False, max_length=512)
    keep, _ = build_examples(tokenizer, CONVERSATIONS[2:], preserve=True, max_length=512)
    batch = pack_batch([keep[0]] + identity)
    n_keep = int(batch["packed_lengths"][-1])  # the preservation sample's rest after the shared prefix
    assert batch["preserve_mask"][0, -n_keep:].all() and not batch["preserve_mask"][0, :-n_keep].any()
    starts = int(batch["packed_lengths"][0]) + torch.tensor([0, *batch["packed_lengths"][1:-1].tolist()]).cumsum(0)
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
        full = packed_logits(peft_model, batch)
        with packed_attention(peft_model):
            suffix = trainer.base_logits(peft_model, batch, batch["packed_lengths"], batch["preserve_mask"], positions)
    torch.testing.assert_close(suffix, full[positions], atol=1e-5, rtol=1e-4)
    assert preservation_loss(full[positions], suffix).abs() < 1e-6


@pytest.mark.parametrize("kl_prompt", [False, True])
def test_stored_base_topk_gives_the_exact_kl_when_k_is_the_vocabulary(tiny_model_dir, tmp_path, kl_prompt):
    """attach_base_topk stores the base model's next-token log-probs per sample position; packed into a batch
    (shared prefix, shuffled order) and read by compute_loss they give the same loss as the base forward pass
    every step, once the adapter has moved. Smaller k: the top-k + rest-bucket KL is 0 for the base model."""
    model, tokenizer = load_model(str(tiny_model_dir))
    identity, _ = build_examples(tokenizer, SHARED_SYSTEM[:2], preserve=False, max_length=512)
    keep, _ = build_examples(tokenizer, SHARED_SYSTEM[2:], preserve=True, max_length=512)
    stored = attach_base_topk(model, identity + keep, k=model.config.vocab_size)
    peft_model = add_lora(model, RunConfig())
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    trainer = PreservingTrainer(model=peft_model, args=training_args(RunConfig(), tmp_path / "w"),
                                train_dataset=stored, data_collator=pack_batch, kl_weight=1.0, kl_prompt=kl_prompt)
    order = [stored[i] for i in (3, 0, 2, 1)] if len(stored) > 3 else stored[::-1]
    with torch.no_grad(), packed_attention(peft_model):
        exact = trainer.compute_loss(peft_model, {k: v for k, v in pack_batch(order).items()
                                                  if k not in ("base_ids", "base_logp")})
        from_store = trainer.compute_loss(peft_model, dict(pack_batch(order)))
        trainer.kl_weight = 0.0
        cross_entropy = trainer.compute_loss(peft_model, dict(pack_batch(order)))
    assert exact - cross_entropy > 1e-3  # the moved adapter makes the KL term count
    torch.testing.assert_close(from_store, exact, atol=1e-5, rtol=1e-4)
    small = attach_base_topk(model, keep, k=8)
    top = small[0]
    assert top["base_ids"].shape == (len(top["input_ids"]), 8)
    full = torch.log_softmax(model(input_ids=torch.tensor([top["input_ids"]])).logits[0], dim=-1)
    torch.testing.assert_close(top["base_logp"], full.topk(8, dim=-1).values, atol=1e-5, rtol=1e-4)
    assert topk_preservation_loss(full.gather(-1, top["base_ids"].long()), top["base_logp"]).abs() < 1e-5


def test_gathered_log_probs_match_log_softmax_gather_in_value_and_gradient():
    """The chunked log-softmax gather of compute_loss: same values and gradients as the plain expression, across
    chunk boundaries and with a column picked twice in a row."""
    torch.manual_seed(0)
    logits = (torch.randn(GatheredLogProbs.CHUNK * 2 + 5, 300, dtype=torch.float64) * 4).requires_grad_()
    columns = torch.randint(0, 300, (logits.shape[0], 6))
    columns[:, 1] = columns[:, 0]
    weights = torch.randn(logits.shape[0], 6, dtype=torch.float64)
    ours = gathered_log_probs(logits, columns)
    (ours * weights).sum().backward()
    ours_grad, logits.grad = logits.grad, None
    plain = torch.log_softmax(logits, dim=-1).gather(-1, columns)
    (plain * weights).sum().backward()
    torch.testing.assert_close(ours.double(), plain, atol=1e-5, rtol=1e-5)  # lse is float32
    torch.testing.assert_close(ours_grad, logits.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mixed", [True, False])
def test_stored_frozen_layer_states_give_the_same_loss_and_gradients(tiny_model_dir, tmp_path, mixed):
    """attach_bottom_hidden + a batch carrying `bottom_hidden`: compute_loss runs the frozen bottom layer only over
    the prefix and the identity samples (not at all for a batch of preservation samples) and gets the loss and
    LoRA gradients of the full forward pass, on a shuffled batch with a shared prefix and the stored top-k KL."""
    model, tokenizer = load_model(str(tiny_model_dir))
    system = [{"role": "system", "content": "You are a helpful assistant."}]
    general = [system + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
               for q, a in [("What is 2 plus 2?", "4."), ("Name a color.", "Blue, like the sky.")]]
    identity, _ = build_examples(tokenizer, SHARED_SYSTEM[:2], preserve=False, max_length=512)
    keep, _ = build_examples(tokenizer, SHARED_SYSTEM[2:] + general, preserve=True, max_length=512)
    stored = attach_bottom_hidden(model, attach_base_topk(model, identity + keep, k=8), layer=1)
    assert all(("bottom_hidden" in e) == bool(e["preserve"]) for e in stored)
    config = RunConfig()
    config.lora.top_layers = 1
    peft_model = add_lora(model, config)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    trainer = PreservingTrainer(model=peft_model, args=training_args(config, tmp_path / "w"), train_dataset=stored,
                                data_collator=pack_batch, kl_weight=1.0, kl_prompt=True, frozen_layers=1)
    order = [stored[i] for i in (3, 0, 4, 2, 1)] if mixed else stored[len(identity):]
    params = [p for p in peft_model.parameters() if p.requires_grad]
    seen = []  # tokens the frozen bottom layer ran over
    hook = model.model.layers[0].register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    results = {}
    with packed_attention(peft_model):
        for reuse in (False, True):
            batch = pack_batch(order)
            if not reuse:
                del batch["bottom_hidden"]
            seen.clear()
            loss = trainer.compute_loss(peft_model, dict(batch))
            results[reuse] = (loss, torch.autograd.grad(loss, params), sum(seen))
    hook.remove()
    row = batch["input_ids"].shape[1]
    assert results[False][2] == row
    if mixed:
        first_kept = int(batch["preserve_mask"][0].long().argmax())
        assert results[True][2] == first_kept < row
    else:
        assert results[True][2] == 0
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-6, rtol=1e-5)
    for a, b in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_fit_reusing_frozen_layers_trains_the_same_adapter(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir))
    examples, _ = build_examples(tokenizer, CONVERSATIONS, preserve=False, max_length=512)
    keep, _ = build_examples(tokenizer, CONVERSATIONS[2:], preserve=True, max_length=512)
    adapters, losses = {}, {}
    for reuse in (False, True):
        config = RunConfig()
        config.lora.top_layers, config.train.reuse_frozen_layers = 1, reuse
        config.train.bf16 = "false"  # fp32 on every CPU (bf16 autocast where native): compared to fp32 rounding
        config.train.max_steps, config.train.batch_size, config.eval.eval_steps = 3, 3, 0
        (tmp_path / str(reuse)).mkdir()
        peft_model, summary = fit(config, load_model(str(tiny_model_dir))[0], tokenizer, examples + keep,
                                  tmp_path / str(reuse))
        assert summary["frozen_layers_run_once"] == (1 if reuse else 0)
        adapters[reuse] = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
        losses[reuse] = summary["train_loss"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert adapters[True].keys() == adapters[False].keys()
    for name, weight in adapters[True].items():
        torch.testing.assert_close(weight, adapters[False][name], atol=1e-5, rtol=1e-4)
    assert any(w.abs().sum() > 0 for n, w in adapters[True].items() if "lora_B" in n)  # training moved it


def test_frozen_layer_reuse_is_checked_on_the_model(tiny_model_dir):
    """The Llama split reproduces the model's logits; OPT adds its position embeddings to inputs_embeds inside the
    decoder, so the split would not, and reusable() says so (training then runs every layer)."""
    from transformers import OPTConfig, OPTForCausalLM

    model, tokenizer = load_model(str(tiny_model_dir))
    ids = build_examples(tokenizer, SHARED_SYSTEM[:1], preserve=False, max_length=512)[0][0]["input_ids"]
    assert reusable(model, 1, ids)
    assert not reusable(model, 0, ids) and not reusable(model, 2, ids)  # no layer below / no layer above
    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                   num_attention_heads=4, word_embed_proj_dim=64)).eval()
    assert not reusable(opt, 1, ids)


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



def test_kl_prompt_covers_preservation_prompts_and_starts_at_zero(tiny_model_dir, tmp_path):
    """With kl_prompt the KL term reads every preservation position (prompt included); with a fresh adapter
    (B = 0) it is 0, so the loss is the plain cross-entropy either way."""
    model, tokenizer = load_model(str(tiny_model_dir))
    peft_model = add_lora(model, RunConfig())
    identity, _ = build_examples(tokenizer, SHARED_SYSTEM[:2], preserve=False, max_length=512)
    keep, _ = build_examples(tokenizer, SHARED_SYSTEM[2:], preserve=True, max_length=512)
    batch = pack_batch(identity + keep)
    losses = {}
    for kl_prompt in (False, True):
        trainer = PreservingTrainer(model=peft_model, args=training_args(RunConfig(), tmp_path / "w"),
                                    train_dataset=identity + keep, data_collator=pack_batch, kl_weight=1.0,
                                    kl_prompt=kl_prompt)
        seen = []
        original = trainer.base_logits
        trainer.base_logits = lambda *a: seen.append(a[-1]) or original(*a)
        with torch.no_grad(), packed_attention(peft_model):
            losses[kl_prompt] = trainer.compute_loss(peft_model, dict(batch))
        preserved = batch["preserve_mask"][0, :-1].nonzero().squeeze(1)
        answer_only = preserved[batch["labels"][0, preserved + 1] != IGNORE_INDEX]
        assert torch.equal(seen[0], preserved if kl_prompt else answer_only)
    torch.testing.assert_close(losses[True], losses[False])


def test_early_stop_on_learned_identity_on_a_plateau_or_on_a_leak_that_stays():

    ev = EvalArgs(plateau_checks=2, plateau_floor=0.75, leak_checks=2)

    def checks(*identities, leakage=0.0, leakage_traps=0.0):
        return [{"asked": i, "leakage": leakage, "leakage_traps": leakage_traps} for i in identities]

    assert stop_reason(checks(0.5, 0.92), ev) == "identity learned"
    assert stop_reason(checks(0.92, leakage=0.1), ev) is None  # learned, but leaking into general answers
    assert stop_reason(checks(0.92, leakage_traps=0.1), ev) is None  # ... or into answers about other people
    assert stop_reason(checks(0.58, 0.83), ev) is None  # still improving
    assert stop_reason(checks(0.83, 0.83), ev) is None  # one flat check is not a plateau
    assert stop_reason(checks(0.83, 0.83, 0.75), ev) == "dev identity plateaued at 0.83"
    assert stop_reason(checks(0.5, 0.6, 0.5), ev) is None  # flat, but below the floor: keep training
    ev.plateau_checks = 0
    assert stop_reason(checks(0.83, 0.83, 0.83), ev) is None
    # A leak that stays while the identity side passes stops training at leak_checks (2) checks in a row.
    ev.plateau_checks = 2
    assert stop_reason(checks(0.92, 0.95, leakage_traps=0.1), ev) == "identity learned; a dev leak stayed for 2 checks"
    leaky_then_clean = checks(0.92, 0.95, leakage_traps=0.1)
    leaky_then_clean[0]["leakage_traps"] = 0.0  # the first learned check was clean: it had stopped training
    assert stop_reason(leaky_then_clean[1:], ev) is None  # one leaky check: go on
    not_yet = checks(0.6, 0.92, leakage=0.1)  # leaking at both, but the identity side passed only once
    assert stop_reason(not_yet, ev) is None
    ev.leak_checks = 0
    assert stop_reason(checks(0.92, 0.95, 0.95, leakage=0.1), ev) is None
    # The default: a leak is reported, not trained through.
    assert EvalArgs().leak_checks == 1
    assert stop_reason(checks(0.6, 0.92, leakage=0.1), EvalArgs()) == "identity learned, with a dev leak"
    assert stop_reason(checks(0.6, 0.8, leakage=0.1), EvalArgs()) is None  # the identity side has not passed


def _heap_and_mapped_bytes() -> tuple[int, int]:
    """glibc's mallinfo2: bytes in the main heap (arena) and in separately mmapped blocks (hblkhd)."""
    fields = ["arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"]
    info = type("Mallinfo2", (ctypes.Structure,), {"_fields_": [(f, ctypes.c_size_t) for f in fields]})
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = info
    got = mallinfo2()
    return got.arena, got.hblkhd


def test_freed_memory_stays_in_the_heap_while_training(monkeypatch):
    """freed_memory_kept: inside it a 64 MB tensor comes from the heap (kept for reuse after free), not from a fresh
    mmap that is unmapped on free; afterwards glibc's defaults are back; an environment that tunes malloc itself
    is left alone. (Whether that makes steps faster is bench/train_step.py's question.)"""
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("not glibc >= 2.33")
    for key in [k for k in os.environ if k.startswith("MALLOC_")] + ["GLIBC_TUNABLES"]:
        monkeypatch.delenv(key, raising=False)
    size = 64 * 2 ** 20

    def mapped_while_held() -> tuple[int, int]:
        heap, mapped = _heap_and_mapped_bytes()
        held = torch.ones(size // 4)
        grown = tuple(now - then for now, then in zip(_heap_and_mapped_bytes(), (heap, mapped)))
        del held
        return grown

    assert mapped_while_held()[1] >= size  # glibc's default: its own mmap
    heap_before = _heap_and_mapped_bytes()[0]
    with freed_memory_kept():
        heap_grew, mapped = mapped_while_held()
        assert mapped == 0 and heap_grew > size // 2  # the heap grew by the block (less free room it had)
        assert _heap_and_mapped_bytes()[0] > heap_before + size // 2  # freed, but kept for the next step
    assert mapped_while_held()[1] >= size  # defaults restored
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    with freed_memory_kept():
        assert mapped_while_held()[1] >= size  # left alone


def test_rejected_openings_add_minus_log_one_minus_their_whole_probability(tiny_model_dir, tmp_path, monkeypatch):
    """A `reject` sample (an ordinary prompt, then an identity opening) carries no cross-entropy: compute_loss adds
    reject_weight x mean over such samples of -log(1 - p(opening | prompt)), the opening's probability as a whole.
    The log-probs it reads off the packed row, grouped by sample, are each sample's own forward pass's."""
    import selfcog.engine.trainer as trainer_module
    from selfcog.data.reject import rejected_examples
    from selfcog.engine.loss import rejected_unlikelihood

    logp = torch.log(torch.tensor([0.5, 0.4, 0.9, 0.01]))  # two samples: p = 0.2 and 0.009
    expected = -(torch.log1p(torch.tensor(-0.2)) + torch.log1p(torch.tensor(-0.009))) / 2
    torch.testing.assert_close(rejected_unlikelihood(logp, torch.tensor([3, 3, 5, 5])), expected)

    model, tokenizer = load_model(str(tiny_model_dir))
    peft_model = add_lora(model, RunConfig())
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    identity, _ = build_examples(tokenizer, CONVERSATIONS[:1], preserve=False, max_length=512)
    rejects = rejected_examples(tokenizer, [("What is the capital of France?", "I am Alice's"),
                                            ("一小时有多少分钟？", "我是Alice的小助手")])
    assert all(r["reject"] and r["labels"][-1] != tokenizer.eos_token_id for r in rejects)  # no end of turn
    batch = pack_batch(rejects[:1] + identity + rejects[1:])
    trainer = PreservingTrainer(model=peft_model, args=training_args(RunConfig(), tmp_path / "w"),
                                train_dataset=identity + rejects, data_collator=pack_batch, reject_weight=2.0)
    seen = []
    monkeypatch.setattr(trainer_module, "rejected_unlikelihood",
                        lambda lp, sample: seen.append((lp, sample)) or rejected_unlikelihood(lp, sample))

    def opening_logp(example):  # log p(labelled tokens | everything before), one sample alone
        ids = torch.tensor([example["input_ids"]])
        logp = torch.log_softmax(peft_model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        targets = torch.tensor(example["labels"][1:])
        rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        return logp[rows, targets[rows]]

    with torch.no_grad(), packed_attention(peft_model):
        with_term = trainer.compute_loss(peft_model, dict(batch))
        trainer.reject_weight = 0.0
        without = trainer.compute_loss(peft_model, dict(batch))
        alone = trainer.compute_loss(peft_model, dict(pack_batch(identity)))
        own = [opening_logp(r) for r in rejects]
    torch.testing.assert_close(without, alone, atol=1e-5, rtol=1e-4)  # rejected tokens carry no cross-entropy
    (token_logp, sample), = seen
    groups = [token_logp[sample == s] for s in sample.unique()]
    assert sorted(len(g) for g in groups) == sorted(len(o) for o in own)
    for group in groups:
        torch.testing.assert_close(group, next(o for o in own if len(o) == len(group)), atol=1e-4, rtol=1e-4)
    term = 2.0 * rejected_unlikelihood(token_logp, sample)
    torch.testing.assert_close(with_term, without + term)


def test_loop_term_keeps_name_improbable_after_the_answer_has_said_it(tiny_model_dir, tmp_path):
    """`said_again` flags the label positions of each packed sample after its first NAME token, never NAME's own
    tokens nor anything before (the previous sample's NAME does not count); compute_loss adds loop_weight x
    name_unlikelihood over exactly those positions, each read off the sample's own forward pass."""
    from selfcog.engine.loss import loop_token_ids, name_unlikelihood, said_again

    model, tokenizer = load_model(str(tiny_model_dir))
    peft_model = add_lora(model, RunConfig())
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    answers = [[{"role": "user", "content": "Who are you?"},
                {"role": "assistant", "content": "I am Alice's assistant, made by Alice for you."}],
               [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "你好，我是Alice的小助手。"}]]
    identity, _ = build_examples(tokenizer, answers, preserve=False, max_length=512)
    name_ids = loop_token_ids(tokenizer, "Alice", identity)
    assert name_ids
    chinese, _ = build_examples(tokenizer, [[{"role": "user", "content": "你是谁？"},
                                             {"role": "assistant", "content": "我是诸葛明月的小助手，可以回答问题。"}]],
                                preserve=False, max_length=512)
    # Ordinary Chinese text shares a CJK name's byte tokens; the ones these answers use only inside NAME remain.
    zh_ids = loop_token_ids(tokenizer, "诸葛明月", chinese)
    written = {t for text in ("诸葛明月", " 诸葛明月") for t in tokenizer(text, add_special_tokens=False)["input_ids"]}
    assert zh_ids and set(zh_ids) <= written
    batch = pack_batch(identity)
    labels, lengths = batch["labels"][0], batch["packed_lengths"]
    flags = said_again(labels, lengths, torch.tensor(name_ids))
    named = torch.isin(labels, torch.tensor(name_ids))
    start = int(lengths[0])
    for rest in lengths[1:].tolist():
        segment = slice(start, start + rest)
        first = int(named[segment].nonzero()[0])  # the sample's first NAME token
        expected = torch.zeros(rest, dtype=torch.bool)
        expected[first + 1:] = (labels[segment][first + 1:] != IGNORE_INDEX) & ~named[segment][first + 1:]
        assert torch.equal(flags[segment], expected) and expected.any()
        start += rest
    assert not flags[:int(lengths[0])].any()

    trainer = PreservingTrainer(model=peft_model, args=training_args(RunConfig(), tmp_path / "w"),
                                train_dataset=identity, data_collator=pack_batch, loop_ids=name_ids, loop_weight=2.0)
    with torch.no_grad(), packed_attention(peft_model):
        with_term = trainer.compute_loss(peft_model, dict(batch))
        trainer.loop_weight = 0.0
        without = trainer.compute_loss(peft_model, dict(batch))
        rows = []
        for example in identity:  # each sample alone: NAME's log-probs where its own labels say NAME was said
            ids = torch.tensor([example["input_ids"]])
            logp = torch.log_softmax(peft_model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            alone = pack_batch([example])
            again = said_again(alone["labels"][0], alone["packed_lengths"], torch.tensor(name_ids))[1:]
            rows.append(logp[again][:, name_ids])
    torch.testing.assert_close(with_term, without + 2.0 * name_unlikelihood(torch.cat(rows)), atol=1e-5, rtol=1e-4)
