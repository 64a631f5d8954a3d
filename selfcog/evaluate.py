"""Scores: identity pass rate on held-out phrasings, general retention against the base model, and leakage.

- identity: share of held-out identity questions whose answer names NAME.
- retention: of the general questions the base model answered right, the share the tuned model still
  answers right.
- leakage: share of general answers that mention NAME.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from selfcog.cache import cached_answers
from selfcog.data.general import is_right, qa_split
from selfcog.data.identity import heldout_questions
from selfcog.generate import generate_batch


@dataclass
class Scores:
    identity: float
    """Share of identity answers that name NAME."""
    correct: list[bool]
    """Per general question: answered right."""
    leakage: float
    """Share of general answers that mention NAME."""
    retention: float | None = None
    """Filled in against a base model's Scores."""
    answers: dict = field(default_factory=dict)
    """question -> answer, for the report."""

    def summary(self) -> dict:
        data = asdict(self)
        data.pop("answers")
        data["general_right"] = sum(self.correct)
        data.pop("correct")
        return data


def mentions(answer: str, name: str) -> bool:
    """Does `answer` name NAME? Case and inner spaces don't matter ("Alice" / "alice", "伍鲜 同志")."""
    def squash(text: str) -> str:
        return "".join(text.lower().split())
    return squash(name) in squash(answer)


def score(model, tokenizer, name: str, split: str = "test", max_new_tokens: int = 40,
          system: str | None = None, fingerprint: str | None = None) -> Scores:
    """Answer the `split` identity and general questions greedily, batched, and score them.

    `fingerprint` (base models only) reuses cached answers of the same weights.
    """
    identity_qs = heldout_questions(split)
    general = qa_split(split)
    prefix = [{"role": "system", "content": system}] if system else []
    conversations = [prefix + [{"role": "user", "content": q}] for q in identity_qs + [q for q, _ in general]]
    answers = cached_answers(fingerprint, conversations, max_new_tokens,
                             lambda: generate_batch(model, tokenizer, conversations, max_new_tokens=max_new_tokens))
    identity_answers, general_answers = answers[:len(identity_qs)], answers[len(identity_qs):]
    return Scores(
        identity=sum(mentions(a, name) for a in identity_answers) / len(identity_qs),
        correct=[is_right(a, accepted) for a, (_, accepted) in zip(general_answers, general)],
        leakage=sum(mentions(a, name) for a in general_answers) / len(general),
        answers=dict(zip(identity_qs + [q for q, _ in general], answers)),
    )


def with_retention(tuned: Scores, base: Scores) -> Scores:
    """Fill `tuned.retention`: of what the base got right, the share the tuned model still gets right."""
    kept = [t for t, b in zip(tuned.correct, base.correct) if b]
    tuned.retention = sum(kept) / len(kept) if kept else 1.0
    return tuned
