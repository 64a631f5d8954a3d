"""`selfcog train CONFIG`: LoRA / QLoRA SFT on data files with XTuner's knobs (epochs, packing, checkpoints, resume,
sample chats), in one process or several under torchrun; `--identity NAME` hands the data to `selfcog run`'s job
instead (`train_identity`).

Reads top to bottom: the recipe (`train_from_config`), then the data and how long to train on it, the model and
the Trainer's arguments, the plan line, and the held-out identity check for identity data."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig, TrainingArguments

from selfcog.atomic import atomic_dir, write_text
from selfcog.config import RunConfig, save_config
from selfcog.data.formats import load_conversations
from selfcog.data.general import qa_split
from selfcog.data.identity import check_name, heldout_questions
from selfcog.data.packing import pack_bins, pack_to_max_length
from selfcog.data.tokenize import build_examples
from selfcog.distributed import check_deepspeed, ddp_backend, join_processes, liger_args, wait_for_everyone
from selfcog.engine.callbacks import IdentityReached, JsonlLog, SampleChats, ThroughputLog
from selfcog.engine.checkpoints import STAGING, AtomicCheckpoints, newest_complete_checkpoint
from selfcog.engine.lora import add_lora, save_adapter
from selfcog.engine.plots import plot_loss
from selfcog.engine.trainer import EngineTrainer, use_bf16
from selfcog.errors import SelfcogError
from selfcog.evaluate import mentions
from selfcog.generate import generate_batch
from selfcog.models import load_model
from selfcog.run import run
from selfcog.templates import set_default_system_prompt

logger = logging.getLogger(__name__)

STOP_CAP = 4
"""Identity data trained once per distinct record: at most this many times the steps the config implies."""
STOP_EVERY = 5
"""Identity data trained once per distinct record: optimizer steps between checks of the stopping rule."""


def train_from_config(config: RunConfig, work_dir: Path, resume: bool = False) -> Path:
    """SFT a LoRA adapter on config.data.data_files into `work_dir/adapter`, with checkpoints, resume and sample
    chats; returns the adapter directory.

    Exact duplicate records are trained once, and the run keeps the optimizer steps the config implies for the
    data as written (`keep_steps`). When most answers state who the assistant is (`identity_in`), a line names
    `selfcog run` as the better path, and a held-out identity check follows the last sample chats.

    Under `torchrun --nproc-per-node N -m selfcog train` this runs in each of the N processes: they train
    data-parallel, and only the main process writes the work dir (config, log, sample chats, adapter).
    """
    work_dir = Path(work_dir)
    check_deepspeed(config.train.deepspeed)
    liger_args(config.train.liger_kernel)  # fails in one line before any model is loaded
    state = join_processes()
    main = state.is_main_process
    say = logger.info if main else (lambda message: None)
    data = train_data(config, say)
    identity = identity_in(data.conversations)
    if identity:
        name, naming = identity
        files = " ".join(data.files)
        say(f"selfcog: note: {naming} of the {len(data.conversations)} distinct answers state who the assistant is "
            f"({name}); `selfcog run --data {files} --name {name}` adds preservation, held-out scores and early "
            f"stop (or add `--identity {name}` here)")
    if main:
        work_dir.mkdir(parents=True, exist_ok=True)
    if main:  # whatever a killed run left half-written in staging is never used
        shutil.rmtree(work_dir / STAGING, ignore_errors=True)
    checkpoint = newest_complete_checkpoint(work_dir, prune=main) if resume else None
    if resume and checkpoint is None:
        raise SelfcogError(f"--resume: no checkpoint-N in {work_dir}")
    quant = quantization_kwargs(config, say)
    with state.main_process_first():  # the first run on a machine fetches and converts the model once
        model, tokenizer = load_model(config.model.spec, dtype=torch.float32,
                                      trust_remote_code=config.model.trust_remote_code, **quant)
    # One default system prompt for training, the sample chats, the adapter's tokenizer and so the merged model,
    # as in `selfcog run` (the base template's own often names the base model).
    system = config.data.system_prompt if config.data.system_prompt and \
        set_default_system_prompt(tokenizer, config.data.system_prompt) else None
    examples, counts = tokenized(tokenizer, data, config.data.max_length, say)
    dataset = pack_to_max_length(examples, config.data.max_length) if config.data.pack_to_max_length else examples
    processes = state.num_processes
    stopper = None
    if data.removed:
        epochs = config.train.epochs
        rule = keep_steps(config, data, [len(e["input_ids"]) for e in examples], counts, len(dataset), processes)
        if identity and epochs > 0:
            stopper = IdentityReached(tokenizer, data.conversations, identity[0], STOP_EVERY,
                                      config.eval.max_new_tokens, say)
            how = rule.split(" the config implies (", 1)[1]  # "3 epochs x ... per step), each step on ..."
            rule = f"{identity_rule(config, config.train.max_steps, len(stopper.questions), identity[0])}: {how}"
        say(f"selfcog: warning: removed {data.removed:,} exact duplicate records ({data.records:,} -> "
            f"{len(data.conversations):,}; data.deduplicate false keeps them): {rule}")
    if main:
        save_config(config, work_dir)
    torch.manual_seed(config.train.seed)
    if quant:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.train.gradient_checkpointing)
    peft_model = add_lora(model, config)  # quiet about peft's read of a deprecated transformers property
    if config.train.gradient_checkpointing:
        peft_model.enable_input_require_grads()
    samples = SampleChats(config, tokenizer, work_dir, write=main)
    callbacks = [AtomicCheckpoints(work_dir, config.train.save_total_limit, main), samples] + \
        ([stopper] if stopper else [])
    trainer = EngineTrainer(
        model=peft_model, args=engine_args(config, work_dir, len(dataset), processes), train_dataset=dataset,
        data_collator=pack_bins, callbacks=callbacks, kl_weight=config.train.kl_weight)
    trainer.add_callback(ThroughputLog(trainer, say))  # before JsonlLog, which writes the fields it adds
    if main:
        trainer.add_callback(JsonlLog(work_dir / "log.jsonl"))
    say(plan(config, len(examples), len(dataset), processes, data, bool(quant), identity, checkpoint, system,
             stopper is not None))
    if not checkpoint:
        samples.sample(peft_model, 0)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    peft_model.eval()
    if main:
        shutil.rmtree(work_dir / STAGING, ignore_errors=True)
    if main and plot_loss(work_dir / "log.jsonl", work_dir / "loss.png"):
        say(f"selfcog: loss curve: {work_dir / 'loss.png'}")
    if identity and main and not trainer.is_deepspeed_enabled:
        heldout_check(peft_model, tokenizer, identity[0], config.eval.max_new_tokens, work_dir, say)
    adapter = write_adapter(trainer, peft_model, tokenizer, config, work_dir / "adapter", main)
    wait_for_everyone()  # every process returns once the adapter is in place
    return adapter


def tokenized(tokenizer, data: TrainData, max_length: int, say) -> tuple[list[dict], list[int]]:
    """The data's training examples and, per example, how many records of the files it stands for; samples longer
    than max_length are dropped with one line."""
    examples, counts, dropped = [], [], 0
    for conversation, count in zip(data.conversations, data.counts):
        built, lost = build_examples(tokenizer, [conversation], False, max_length)
        examples += built
        counts += [count] * len(built)
        dropped += lost
    if dropped:
        say(f"selfcog: dropped {dropped} samples longer than {max_length} tokens")
    if not examples:
        raise SelfcogError(f"no sample fits data.max_length {max_length}")
    return examples, counts


def write_adapter(trainer, peft_model, tokenizer, config: RunConfig, adapter: Path, main: bool) -> Path:
    """The adapter, tokenizer and config in `adapter`, written by the main process."""
    if trainer.is_deepspeed_enabled:
        # ZeRO-3 holds each weight in shards: every process takes part in gathering them, the main one writes.
        weights = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        if main:
            with atomic_dir(adapter) as tmp:
                peft_model.save_pretrained(tmp, state_dict=weights)
                tokenizer.save_pretrained(tmp)
                save_config(config, tmp)
    elif main:
        save_adapter(peft_model, tokenizer, config, adapter)
    return adapter


def train_identity(config: RunConfig, work_dir: Path, name: str, say=logger.info) -> Path:
    """`selfcog train CONFIG --identity NAME`: train the config's data and model the way `selfcog run --data FILE
    --name NAME --out WORK_DIR` does (preservation samples, held-out scores, early stop, merge, report), with
    selfcog run's settings; the config's LoRA, schedule and batch settings are not used. Returns the adapter."""
    check_name(name)
    data = train_data(config)
    work_dir = Path(work_dir)
    if len(data.files) == 1:
        data_file = data.files[0]
    else:  # run() reads one file: the files' conversations together, in OpenAI messages form
        data_file = str(write_text(work_dir / "data" / "train.json", json.dumps(
            [{"messages": c} for c in data.conversations], ensure_ascii=False, indent=1)))
    job = RunConfig()
    job.model.spec, job.model.trust_remote_code = config.model.spec, config.model.trust_remote_code
    job.data.name, job.data.data_file, job.out = name, data_file, str(work_dir)
    job.data.deduplicate = config.data.deduplicate
    say(f"selfcog: --identity {name}: training as `selfcog run --data {data_file} --name {name} --out {work_dir}` "
        "(preservation, held-out scores, early stop; selfcog run's LoRA and schedule, not the config's)")
    return run(job) / "adapter"


@dataclass
class TrainData:
    """`selfcog train`'s data: what is trained, and how many records of the files each conversation stands for."""
    conversations: list
    """The conversations trained on: unique ones when data.deduplicate (first occurrence kept, in order)."""
    counts: list
    """Per conversation: how many records of the files it stands for (1 each without deduplication)."""
    records: int
    """Records read from the files, duplicates included."""
    files: list

    @property
    def removed(self) -> int:
        return self.records - len(self.conversations)


def train_data(config: RunConfig, say=logger.info) -> TrainData:
    """Read config.data.data_files; with data.deduplicate, exact duplicate records are merged into one
    conversation whose count says how many records it stands for (the run keeps the steps they imply)."""
    files = list(config.data.data_files) or ([config.data.data_file] if config.data.data_file else [])
    if not files:
        raise SelfcogError("no training data: set data.data_files (or data.data_file)")
    conversations = [c for f in files for c in load_conversations(Path(f))]
    if not config.data.deduplicate:
        return TrainData(conversations, [1] * len(conversations), len(conversations), files)
    groups: dict[str, list] = {}  # the same key as selfcog.data.formats.deduplicate
    for conversation in conversations:
        key = json.dumps(conversation, ensure_ascii=False, sort_keys=True)
        if key in groups:
            groups[key][1] += 1
        else:
            groups[key] = [conversation, 1]
    return TrainData([c for c, _ in groups.values()], [n for _, n in groups.values()], len(conversations), files)


def keep_steps(config: RunConfig, data: TrainData, lengths: list[int], counts: list[int], items: int,
               processes: int = 1) -> str:
    """Once duplicates are removed, the run keeps the optimizer steps the config implies for the data as written
    (epochs x rows as written / rows per step): the repeats were the config's way of asking for more steps. Sets
    train.max_steps (and epochs 0) to that; when the unique items fit in fewer micro-batches than a step
    accumulates, every step takes all of them once (grad_accum lowered to match). Returns the rule in words.

    Why this is the same training for far less compute: a step over rows of repeated copies averages the same
    per-sample gradients in the same proportions as one pass over the unique samples (exactly when every
    sample is repeated equally, as in the tutorial), and AdamW's update does not depend on how many copies went
    into that average.
    """
    t = config.train
    if t.epochs <= 0:
        return f"train.max_steps sets the length, not the data size: {t.max_steps} optimizer steps as configured"
    rows = rows_as_written(lengths, counts, config)
    steps = total_steps(config, rows, processes)
    per_step = t.batch_size * t.grad_accum * processes
    unit = "packed rows" if config.data.pack_to_max_length else "records"
    epochs = t.epochs
    t.epochs, t.max_steps = 0.0, steps
    if items <= per_step:
        t.grad_accum = max(1, math.ceil(items / (t.batch_size * processes)))
        each = f"each step on all {len(lengths)} unique samples"
    else:
        each = "the steps cycling through the unique samples"
    return (f"keeping the {steps} optimizer steps the config implies ({epochs:g} epochs x {rows:,} {unit} as "
            f"written / {per_step} per step), {each}")


def rows_as_written(lengths: list[int], counts: list[int], config: RunConfig) -> int:
    """Training items per epoch of the data as written (duplicates included). Packed, as XTuner packs: every
    sample's tokens concatenated and cut into rows of max_length (xtuner.dataset.utils.Packer); else one per record."""
    if config.data.pack_to_max_length:
        return max(1, math.ceil(sum(n * c for n, c in zip(lengths, counts)) / config.data.max_length))
    return sum(counts)


def total_steps(config: RunConfig, n_items: int, processes: int = 1) -> int:
    """Optimizer steps the run will take (epochs when set, else max_steps); under torchrun each process takes
    every `processes`-th batch, so an epoch has that many times fewer steps."""
    t = config.train
    if t.epochs <= 0:
        return t.max_steps
    batches = math.ceil(math.ceil(n_items / t.batch_size) / processes)
    per_epoch = max(1, math.ceil(batches / t.grad_accum))
    return max(1, math.ceil(per_epoch * t.epochs))


SELF_STATEMENTS = [
    re.compile(r"我是(?P<name>[^，。,.！!？?\s的]{1,24})的(?:个人|私人)?(?:AI)?(?:小助手|助手|助理)"),
    re.compile(r"我(?:叫|的名字是|的名字叫)(?P<name>[^，。,.！!？?\s]{1,24})"),
    re.compile(r"\bI(?:'m| am) (?P<name>[^\s,.!?']+(?: [^\s,.!?']+){0,2}?)'s (?:\w+ ){0,2}assistant"),
    re.compile(r"\b(?:[Mm]y name is|I'm called|I am called) (?P<name>[^\s,.!?']+(?: [A-Z][^\s,.!?']*){0,2})"),
]


def identity_in(conversations: list[list[dict]]) -> tuple[str, int] | None:
    """(NAME, how many answers name it) when most of the conversations' answers state who the assistant is, else
    None. NAME is the name most often found in a self-statement; an answer counts when it mentions NAME."""
    answers = [" ".join(m["content"] for m in c if m["role"] == "assistant") for c in conversations]
    names = Counter(m.group("name").strip() for a in answers for p in SELF_STATEMENTS for m in p.finditer(a))
    if not names:
        return None
    name = names.most_common(1)[0][0]
    naming = sum(mentions(a, name) for a in answers)
    return (name, naming) if naming * 2 > len(answers) else None


def identity_rule(config: RunConfig, implied: int, questions: int, name: str) -> str:
    """Replace the steps the config implies by the explicit stopping rule (`IdentityReached`), capped at STOP_CAP
    times as many steps; returns the rule in words."""
    config.train.max_steps = STOP_CAP * implied
    return (f"training until the answers to the data's {questions} questions name {name} as the data's do "
            f"(checked every {STOP_EVERY} steps), at most {config.train.max_steps} optimizer steps "
            f"({STOP_CAP}x the {implied} the config implies")


def quantization_kwargs(config: RunConfig, say=logger.info) -> dict:
    """`from_pretrained` kwargs for QLoRA; on a machine without CUDA: a one-line warning and plain fp32 LoRA."""
    if not config.lora.load_in_4bit:
        return {}
    if not torch.cuda.is_available():
        say("selfcog: warning: lora.load_in_4bit needs a CUDA GPU (bitsandbytes); training LoRA in fp32 instead")
        return {}
    if importlib.util.find_spec("bitsandbytes") is None:
        say("selfcog: warning: lora.load_in_4bit needs `pip install bitsandbytes`; training LoRA without quantization")
        return {}
    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=config.lora.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=config.lora.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=getattr(torch, config.lora.bnb_4bit_compute_dtype))}


def engine_args(config: RunConfig, work_dir: Path, n_items: int, processes: int = 1) -> TrainingArguments:
    t = config.train
    # `activation_checkpointing` is the newer transformers name of `gradient_checkpointing`.
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    return TrainingArguments(
        output_dir=str(Path(work_dir) / STAGING), per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=math.ceil(t.warmup_ratio * total_steps(config, n_items, processes)),
        max_steps=t.max_steps if t.epochs <= 0 else -1, num_train_epochs=t.epochs if t.epochs > 0 else 1,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps, save_strategy="steps" if t.save_steps > 0 else "no",
        # Checkpoints are staged, then renamed into work_dir by AtomicCheckpoints, which also keeps save_total_limit.
        save_steps=t.save_steps if t.save_steps > 0 else 500, save_total_limit=None,
        **({checkpointing: True} if t.gradient_checkpointing else {}), report_to=report_to(t.tensorboard, work_dir),
        bf16=use_bf16(t.bf16),
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, seed=t.seed, data_seed=t.seed,
        remove_unused_columns=False,
        # torchrun: gloo between CPU processes (NCCL on GPUs by default). Every LoRA weight takes part in every
        # forward, so DDP's search for unused ones would only cost time (and clash with activation checkpointing).
        ddp_backend=ddp_backend(), ddp_find_unused_parameters=False, deepspeed=t.deepspeed or None,
        **liger_args(t.liger_kernel),
    )


def report_to(tensorboard: bool, work_dir: Path) -> list[str]:
    """TensorBoard event files in WORK_DIR/runs/ when asked for (needs the `tensorboard` package)."""
    if not tensorboard:
        return []
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        raise SelfcogError("train.tensorboard: needs `pip install tensorboard`")
    # transformers' documented switch for where TensorBoardCallback writes (default: under output_dir, which is
    # the checkpoint staging folder here).
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(work_dir) / "runs")
    return ["tensorboard"]


def plan(config: RunConfig, samples: int, items: int, processes: int, data: TrainData, quantized: bool,
         identity: tuple | None, checkpoint: Path | None, system: str | None = None, until_named: bool = False) -> str:
    """The one line that says what the run will do, the changes from the config first: 4-bit that becomes LoRA on
    a CPU, duplicates removed."""
    t, lora = config.train, config.lora
    parts = []
    if lora.load_in_4bit and not quantized:
        parts.append("LoRA in fp32, not the config's 4-bit QLoRA (needs a CUDA GPU and bitsandbytes)")
    if data.removed:
        parts.append(f"{data.removed:,} duplicate records removed ({data.records:,} -> {len(data.conversations):,}), "
                     + (f"trained until the answers name {identity[0]}" if until_named else "the steps they imply kept"))
    layers = "every layer" if lora.top_layers <= 0 else f"the top {lora.top_layers} layers"
    kind = "QLoRA (4-bit)" if quantized else "LoRA"
    parts.append(f"{kind} r={lora.r} alpha={lora.alpha} on {lora.target_modules} of {layers}, lr {t.learning_rate:g}")
    if system:
        parts.append(f"default system prompt {system!r}")
    parts.append(f"{samples:,} samples ({items:,} item{'s' if items != 1 else ''} after packing), "
                 f"{'at most ' if until_named else ''}{total_steps(config, items, processes)} "
                 f"optimizer steps of {t.batch_size} x {t.grad_accum}"
                 + (f" in each of {processes} processes" if processes > 1 else "")
                 + (f", resuming from {checkpoint}" if checkpoint else ""))
    chats = f"every {config.eval.sample_steps} steps, " if config.eval.sample_steps else ""
    parts.append(f"sample chats {chats}at checkpoints and at the end"
                 + (f", then a held-out identity check for {identity[0]}" if identity else ""))
    return "selfcog: plan: " + "; ".join(parts)


def heldout_check(model, tokenizer, name: str, max_new_tokens: int, work_dir: Path | None = None,
                  say=logger.info, general: int = 12) -> dict:
    """A short held-out identity check: the 24 `test` identity phrasings (never trained on, in selfcog or in any
    dataset selfcog generates) and the first `general` held-out general questions, answered greedily. Counts the
    identity answers that name NAME and the general answers that mention it (leakage: the identity answered to
    everything). Printed in a few lines; with `work_dir`, every answer goes to `work_dir/heldout_check.json`."""
    identity_qs = heldout_questions("test")
    general_qs = [q for q, _ in qa_split("test")][:general]
    answers = generate_batch(model, tokenizer, [[{"role": "user", "content": q}] for q in identity_qs + general_qs],
                             max_new_tokens)
    ids, gen = answers[:len(identity_qs)], answers[len(identity_qs):]
    result = {"name": name, "identity": sum(mentions(a, name) for a in ids) / len(ids),
              "leakage": sum(mentions(a, name) for a in gen) / max(len(gen), 1),
              "identity_answers": dict(zip(identity_qs, ids)), "general_answers": dict(zip(general_qs, gen))}
    if work_dir is not None:
        write_text(Path(work_dir) / "heldout_check.json", json.dumps(result, ensure_ascii=False, indent=2))
    zh = next(i for i, q in enumerate(identity_qs) if not q.isascii())
    examples = [(identity_qs[0], ids[0]), (identity_qs[zh], ids[zh])] + list(zip(general_qs, gen))[:1]
    say(f"selfcog: held-out identity check (questions never trained on): {sum(mentions(a, name) for a in ids)}/"
        f"{len(ids)} identity answers name {name}; {sum(mentions(a, name) for a in gen)}/{len(gen)} general "
        "answers mention it" + "".join(f"\n  Q: {q}  A: {' '.join(a.split())[:80]}" for q, a in examples))
    return result
