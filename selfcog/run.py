"""The main job: fetch/load -> data -> evaluate base -> train -> merge -> evaluate merged -> report.

Every stage writes into a temp path and renames, so an interrupted run never leaves a half-written
`data/`, `adapter/` or `merged/` behind.
"""

from __future__ import annotations

import gc
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from selfcog.atomic import write_text
from selfcog.cache import model_fingerprint
from selfcog.config import RunConfig, save_config
from selfcog.data.formats import deduplicate, load_conversations
from selfcog.data.general import preservation_prompts
from selfcog.data.identity import Persona, check_name, dumps, identity_records, robust_records
from selfcog.data.preserve import preservation_conversations
from selfcog.data.reject import identity_openings, rejected_examples, rejected_pairs
from selfcog.data.tokenize import build_examples
from selfcog.distributed import liger_args
from selfcog.engine.trainer import base_dtype
from selfcog.errors import SelfcogError
from selfcog.evaluate import Scores, score
from selfcog.export import save_merged
from selfcog.models import load_model
from selfcog.recipes.identity import fit
from selfcog.templates import set_default_system_prompt

logger = logging.getLogger(__name__)


def prepare_out(out: Path) -> Path:
    """Create `out` and prove it is writable before any slow work starts."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise SelfcogError(f"--out {out}: not writable ({exc.strerror or exc})") from None
    return out


def identity_data(config: RunConfig, out: Path) -> list[list[dict]]:
    """Generated identity conversations (or the user's data file), written to `out/data/identity.json`."""
    d = config.data
    if d.data_file:
        conversations = load_conversations(Path(d.data_file))
    else:
        records = identity_records(Persona(d.name, d.assistant_name, d.model_desc, d.author))
        path = write_text(out / "data" / "identity.json", dumps(records))
        conversations = load_conversations(path)
    if d.deduplicate:
        conversations, removed = deduplicate(conversations)
        if removed:
            logger.info(f"selfcog: removed {removed} duplicate records")
    return conversations


def robust_identity(config: RunConfig, out: Path, preserve: list[list[dict]]) -> list[list[dict]]:
    """Generated identity questions also under users' own system prompts and after an ordinary exchange (the base
    model's own preservation answers), written to `out/data/identity_forms.json`; none for a user's data file."""
    d = config.data
    if d.data_file or not d.robust_forms:
        return []
    records = robust_records(Persona(d.name, d.assistant_name, d.model_desc, d.author), preserve[:8])
    return load_conversations(write_text(out / "data" / "identity_forms.json", dumps(records)))


def rejected_data(config: RunConfig, out: Path, identity: list[list[dict]]) -> list[tuple[str, str]]:
    """The preservation prompts paired with identity openings (selfcog.data.reject), written to
    `out/data/rejected.json`; none for a user's data file or with data.reject_ratio 0."""
    d = config.data
    count = round(d.reject_ratio * len(identity))
    if d.data_file or count <= 0 or config.train.reject_weight <= 0:
        return []
    pairs = rejected_pairs(preservation_prompts(count), identity_openings(identity, d.name), count)
    write_text(out / "data" / "rejected.json",
               json.dumps([{"prompt": p, "rejected": r} for p, r in pairs], ensure_ascii=False, indent=2))
    return pairs


def run(config: RunConfig) -> Path:
    """Give the base model NAME's identity; returns the output directory holding merged/, report.md, metrics.json."""
    check_name(config.data.name)
    liger_args(config.train.liger_kernel)  # fails in one line before any slow work
    dtype = base_dtype(config.model.dtype)
    out = prepare_out(Path(config.out))
    name = config.data.name
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def lap(stage: str, began: float) -> float:
        now = time.perf_counter()
        timings[stage] = round(now - began, 1)
        return now

    t = time.perf_counter()
    model, tokenizer = load_model(config.model.spec, dtype=dtype, trust_remote_code=config.model.trust_remote_code)
    if config.data.system_prompt and set_default_system_prompt(tokenizer, config.data.system_prompt):
        logger.info(f"selfcog: default system prompt is now {config.data.system_prompt!r} (training, evaluation, exports)")
    t = lap("load", t)
    identity = identity_data(config, out)
    save_config(config, out)
    logger.info(f"selfcog: {len(identity)} identity conversations; scoring the base model ...")
    fingerprint = model_fingerprint(model.name_or_path, dtype)  # bf16 answers and log-probs are cached apart
    splits = ("test", "fresh") if config.eval.fresh else ("test",)
    base_scores = {split: score(model, tokenizer, name, split, config.eval.max_new_tokens, fingerprint=fingerprint,
                                ask_max_new_tokens=config.eval.ask_max_new_tokens)
                   for split in splits}
    base_dev = score(model, tokenizer, name, "dev", config.eval.max_new_tokens, fingerprint=fingerprint,
                     ask_max_new_tokens=config.eval.ask_max_new_tokens)
    t = lap("evaluate_base", t)
    preserve = preservation_conversations(model, tokenizer, round(config.data.preserve_ratio * len(identity)),
                                          config.data.preserve_max_new_tokens, fingerprint)
    write_text(out / "data" / "preserve.json", json.dumps(preserve, ensure_ascii=False, indent=2))
    rejected = rejected_data(config, out, identity)
    identity += robust_identity(config, out, preserve)
    t = lap("preservation_data", t)

    examples, dropped = build_examples(tokenizer, identity, False, config.data.max_length)
    rejects = rejected_examples(tokenizer, rejected)
    kept, dropped_p = build_examples(tokenizer, preserve, True, config.data.max_length)
    if dropped + dropped_p:
        logger.info(f"selfcog: dropped {dropped + dropped_p} samples longer than {config.data.max_length} tokens")
    logger.info(f"selfcog: training on {len(examples)} identity + {len(rejects)} rejected + {len(kept)} preservation "
                "samples ...")
    peft_model, summary = fit(config, model, tokenizer, examples + rejects + kept, out, base_dev, fingerprint)
    t = lap("train", t)

    save_merged(peft_model, tokenizer, out / "merged", config)  # fp32 whatever the base: read back memory-mapped
    del model, peft_model  # the merged weights in memory go before the merged model is read back: one copy at a time
    gc.collect()
    t = lap("merge", t)
    merged, merged_tokenizer = load_model(str(out / "merged"), dtype=torch.float32)
    tuned_scores = {}
    for split, base in base_scores.items():  # the fresh part (eval.fresh) timed apart: it is not part of a plain run
        tuned_scores[split] = score(merged, merged_tokenizer, name, split, config.eval.max_new_tokens, base=base,
                                    ask_max_new_tokens=config.eval.ask_max_new_tokens)
        t = lap("evaluate_merged" if split == "test" else f"evaluate_merged_{split}", t)
    timings["total"] = round(time.perf_counter() - start, 1)

    metrics = {"name": name, "model": config.model.spec, "system_prompt": config.data.system_prompt,
               "base": base_scores["test"].summary(), "tuned": tuned_scores["test"].summary(),
               "failures": tuned_scores["test"].failures(), "training": summary, "seconds": timings,
               "samples": {"identity": len(examples), "preservation": len(kept)}}
    if "fresh" in tuned_scores:
        metrics["fresh"] = {"base": base_scores["fresh"].summary(), "tuned": tuned_scores["fresh"].summary(),
                            "failures": tuned_scores["fresh"].failures()}
    write_text(out / "metrics.json", json.dumps(metrics, ensure_ascii=False, indent=2))
    write_text(out / "report.md", report(metrics, base_scores["test"], tuned_scores["test"]))
    print(table(metrics))
    return out


COLUMNS = (("identity", "identity"), ("robust", "robustness"), ("retention", "retention"),
           ("ret. zh", "retention_zh"), ("ret. traps", "retention_traps"), ("leakage", "leakage"),
           ("leak traps", "leakage_traps"), ("repeats id", "repetition_identity"))


def cell(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def table(metrics: dict) -> str:
    rows = [("", *(label for label, _ in COLUMNS), "steps", "seconds")]
    for label in ("base", "tuned"):
        m = metrics[label]
        steps = metrics["training"]["steps"] if label == "tuned" else "-"
        seconds = metrics["seconds"]["total"] if label == "tuned" else "-"
        rows.append((label, *(cell(m[key]) for _, key in COLUMNS), str(steps), str(seconds)))
    return "\n".join("".join(c.ljust(11) for c in row).rstrip() for row in rows)


def report(metrics: dict, base: Scores, tuned: Scores) -> str:
    n = tuned.summary()["questions"]
    lines = [f"# selfcog report: {metrics['name']}", "",
             f"Base model `{metrics['model']}`; {metrics['samples']['identity']} identity + "
             f"{metrics['samples']['preservation']} preservation samples; {metrics['training']['steps']} steps; "
             f"default system prompt {metrics['system_prompt']!r}.", "",
             f"Held-out questions: {n['identity']} identity, {n['robust']} identity in other forms (robustness), "
             f"{n['general']} general (en), {n['zh']} general (zh), {n['traps']} about other people, places and "
             "works (traps). Retention: of the questions the base model answered right, the share still right. "
             "Leakage: answers to non-identity questions naming NAME (or a part of it). Repeats: answers with a "
             "phrase said three times.", "",
             "| model | " + " | ".join(label for label, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for label in ("base", "tuned"):
        lines.append(f"| {label} | " + " | ".join(cell(metrics[label][key]) for _, key in COLUMNS) + " |")
    lines += ["", "Seconds per stage: " + ", ".join(f"{k} {v}" for k, v in metrics["seconds"].items()), ""]
    if metrics["failures"]:
        lines += ["## Shortfalls", ""] + [f"- {kind}: " + "; ".join(qs) for kind, qs in metrics["failures"].items()]
        lines.append("")
    lines += ["## Held-out answers (base → tuned)", ""]
    base_answers = base.answers
    for part, answers in tuned.parts.items():
        lines += [f"### {part}", ""]
        for a in answers:
            form = f" ({a.form})" if a.form else ""
            lines.append(f"- **{shown(a.question)}**{form}\n  - base: {shown(base_answers.get(a.question, ''))}"
                         f"\n  - tuned: {shown(a.text)}")
        lines.append("")
    return "\n".join(lines)


def shown(answer: str) -> str:
    """One line; an answer cut at the token limit inside a multi-byte character loses the broken U+FFFD tail."""
    return answer.replace("\n", " ").rstrip("\ufffd")
