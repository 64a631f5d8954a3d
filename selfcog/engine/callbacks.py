"""Trainer callbacks: the identity job's early stop on the dev sets (`IdentityEarlyStop`, `stop_reason`), the
log file and throughput lines, XTuner-style sample chats, and the stopping rule for deduplicated identity data
(`IdentityReached`)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from transformers import TrainerCallback

from selfcog.atomic import write_text
from selfcog.config import RunConfig
from selfcog.engine.memory import peak_memory_mib
from selfcog.evaluate import ASK_PARTS, QA_PARTS, Scores, joined, mentions, score
from selfcog.generate import generate_batch

logger = logging.getLogger(__name__)


class IdentityEarlyStop(TrainerCallback):
    """Every `eval_steps`: score the dev phrasings; stop once identity, retention and leakage all pass.

    A check answers the identity questions first and the general ones (retention, leakage) only when the identity
    side would stop training: the stopping decisions are those of scoring everything at every check, at about half
    the cost for the checks that do not stop (20 of the 58 dev questions: ~5.5 s against ~10 s on a 2-core CPU).
    """

    def __init__(self, config: RunConfig, tokenizer, base_dev: Scores | None):
        self.config, self.tokenizer, self.base_dev = config, tokenizer, base_dev
        self.history: list[dict] = []
        self.seconds = 0.0  # spent scoring, inside the Trainer's train_runtime

    def on_step_end(self, args, state, control, model=None, **kwargs):
        every = self.config.eval.eval_steps
        if not every or state.global_step % every or state.global_step < self.config.eval.min_steps:
            return control
        if state.global_step >= state.max_steps:
            return control
        began = time.perf_counter()
        model.eval()
        ev = self.config.eval
        dev = self.dev_scores(model, ASK_PARTS)
        entry = check_entry(state.global_step, dev)
        if identity_reason(self.history + [entry], ev):
            dev = joined(dev, self.dev_scores(model, QA_PARTS))
            entry = check_entry(state.global_step, dev)
        model.train()
        self.seconds += time.perf_counter() - began
        self.history.append(entry)
        logger.info(f"selfcog: step {state.global_step} dev identity {dev.asked:.2f} "
                    f"retention {fmt(entry['retention'])} (zh {fmt(entry['retention_zh'])}) "
                    f"leakage {fmt(entry['leakage'])} (traps {fmt(entry['leakage_traps'])})")
        reason = stop_reason(self.history, ev)
        if reason:
            # More steps only move general answers further from the base model, so stop here either way;
            # a retention drop is reported rather than trained through.
            retention = entry["retention"]
            if retention is not None and retention < ev.retention_threshold:
                logger.warning(f"selfcog: warning: dev retention {retention:.2f} is below {ev.retention_threshold}; "
                               "a lower learning rate or more preservation samples may keep more")
            if dev_leakage(entry) > ev.leakage_max:
                leaked = [q for key, qs in entry["failures"].items() if key.endswith(": leak") for q in qs]
                logger.warning(f"selfcog: warning: dev answers still name {self.config.data.name}: {'; '.join(leaked)}")
            logger.info(f"selfcog: {reason} at step {state.global_step}; stopping early")
            control.should_training_stop = True
        return control

    def dev_scores(self, model, parts: tuple[str, ...]) -> Scores:
        return score(model, self.tokenizer, self.config.data.name, "dev", self.config.eval.max_new_tokens,
                     base=self.base_dev, parts=parts, ask_max_new_tokens=self.config.eval.ask_max_new_tokens)


def check_entry(step: int, dev: Scores) -> dict:
    """One dev check for `training.dev_history`: every score (None for parts not asked) and the questions behind
    each shortfall."""
    entry = {"step": step, **dev.summary()}
    entry["parts"] = sorted(entry.pop("questions"))
    entry["failures"] = dev.failures()
    return entry


def dev_leakage(entry: dict) -> float:
    return max(entry.get("leakage") or 0.0, entry.get("leakage_traps") or 0.0)


def stop_reason(history: list[dict], ev) -> str | None:
    """Why training should stop after the latest dev check in `history`, or None to go on.

    Stops once the identity is learned (`identity_reason`) with general and trap leakage <= leakage_max, or, with a
    leak, once the identity side has passed with a leak at `leak_checks` checks in a row: more steps did not remove
    it, and they cost general answers.
    """
    reason = identity_reason(history, ev)
    if reason is None or dev_leakage(history[-1]) <= ev.leakage_max:
        return reason
    n = ev.leak_checks
    if n and len(history) >= n and all(identity_reason(history[:k], ev) and dev_leakage(history[k - 1]) > ev.leakage_max
                                       for k in range(len(history) - n + 1, len(history) + 1)):
        return f"{reason}; a dev leak stayed for {n} checks" if n > 1 else f"{reason}, with a dev leak"
    return None


def identity_reason(history: list[dict], ev) -> str | None:
    """Whether the identity side of the latest check in `history` says stop: the share of dev identity answers
    (plain and robustness forms) that name NAME fluently >= identity_threshold, or a plateau: no gain over the best
    earlier check for `plateau_checks` checks in a row while at or above `plateau_floor`."""
    last = history[-1]
    if last["asked"] >= ev.identity_threshold:
        return "identity learned"
    n = ev.plateau_checks
    if n and len(history) > n:
        best_before = max(h["asked"] for h in history[:-n])
        recent = [h["asked"] for h in history[-n:]]
        if max(recent) <= best_before and min(recent) >= ev.plateau_floor:
            return f"dev identity plateaued at {max(recent):.2f}"
    return None


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


class JsonlLog(TrainerCallback):
    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": state.global_step, **(logs or {})}) + "\n")


class ThroughputLog(TrainerCallback):
    """Adds `tokens_per_s` (sample tokens trained since the last log line, per second) and `peak_mem_mib` (peak
    CUDA memory allocated, or this process's peak RSS on a CPU) to every log line, and prints them."""

    def __init__(self, trainer, say=logger.info):
        self.trainer, self.say = trainer, say
        self.tokens, self.time = 0, time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return control
        now, tokens = time.perf_counter(), self.trainer.tokens_trained
        logs["tokens_per_s"] = round((tokens - self.tokens) / max(now - self.time, 1e-9), 1)
        logs["peak_mem_mib"] = peak_memory_mib()
        self.tokens, self.time = tokens, now
        self.say(f"selfcog: step {state.global_step} loss {logs['loss']:.4g} lr {logs.get('learning_rate', 0):.3g} "
                 f"grad_norm {logs.get('grad_norm', float('nan')):.3g} {logs['tokens_per_s']} tokens/s "
                 f"peak {logs['peak_mem_mib']} MiB")
        return control


class SampleChats(TrainerCallback):
    """XTuner's EvaluateChatHook: greedy answers to eval.sample_inputs every sample_steps and at each checkpoint,
    logged and written to `WORK_DIR/eval_outputs/step_N.txt`.

    Under torchrun every process generates (ZeRO-3 needs all of them for a forward pass) and only the one with
    `write` set logs and writes.
    """

    def __init__(self, config: RunConfig, tokenizer, work_dir: Path, write: bool = True):
        self.config, self.tokenizer, self.out, self.write = config, tokenizer, Path(work_dir) / "eval_outputs", write
        self.done: set[int] = set()

    def sample(self, model, step: int) -> list[str]:
        inputs = self.config.eval.sample_inputs
        if not inputs:
            return []
        self.done.add(step)
        system = [{"role": "system", "content": self.config.eval.system}] if self.config.eval.system else []
        was_training = model.training
        model.eval()
        answers = generate_batch(model, self.tokenizer, [system + [{"role": "user", "content": q}] for q in inputs],
                                 self.config.eval.sample_max_new_tokens)
        if was_training:
            model.train()
        if self.write:
            text = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in zip(inputs, answers))
            write_text(self.out / f"step_{step}.txt", text)
            logger.info(f"selfcog: sample chats at step {step}:\n{text.rstrip()}")
        return answers

    def on_step_end(self, args, state, control, model=None, **kwargs):
        every = self.config.eval.sample_steps
        if every and state.global_step % every == 0:
            self.sample(model, state.global_step)
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.global_step not in self.done:
            self.sample(model, state.global_step)
        return control


class IdentityReached(TrainerCallback):
    """The explicit stopping rule for identity data whose duplicates were removed: every `every` steps, answer the
    data's own questions greedily (up to 16 distinct ones), and stop (saving a checkpoint, which also takes the last
    sample chats) once at least as many answers name NAME as the data's answers do: the tutorial's own test of
    success, which its user otherwise watches for in the sample chats (docs/tutorial.md: the steps a config implies
    can end before the model answers with the name)."""

    def __init__(self, tokenizer, conversations: list[list[dict]], name: str, every: int, max_new_tokens: int,
                 say=logger.info):
        asked = [c for c in conversations if c and c[-1]["role"] == "assistant"][:16]
        self.questions = [c[:-1] for c in asked]
        self.needed = sum(mentions(c[-1]["content"], name) for c in asked)
        self.tokenizer, self.name, self.every, self.max_new_tokens, self.say = \
            tokenizer, name, every, max_new_tokens, say
        self.history: list[tuple[int, int]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every or state.global_step >= state.max_steps:
            return control
        was_training = model.training
        model.eval()
        answers = generate_batch(model, self.tokenizer, self.questions, self.max_new_tokens)
        if was_training:
            model.train()
        named = sum(mentions(a, self.name) for a in answers)
        self.history.append((state.global_step, named))
        if named >= self.needed:
            self.say(f"selfcog: step {state.global_step}: {named} of the data's {len(self.questions)} questions "
                     f"answered with {self.name}, as the data answers them; stopping")
            control.should_training_stop = True
            control.should_save = True  # a checkpoint to resume from, and the sample chats of the last step
        return control
