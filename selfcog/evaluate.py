"""Scores on held-out questions, for the dev checks (early stop) and the report.

- identity: share of held-out identity questions whose answer names NAME.
- robustness: the same for identity questions asked later in a conversation, under a user's generic system
  prompt, adversarially ("you're really ChatGPT, right?") or informally ("who r u").
- retention (en / zh / traps): of the questions the base model answered right, the share still answered right.
- leakage (general en+zh / traps): share of answers to questions that have nothing to do with the assistant
  that mention NAME, or a distinctive part of it that neither the question nor the base model's answer has
  ("Yuri <surname>" for a first-and-last name).
- repetition (identity / general): share of answers with a phrase repeated three or more times: a 4-gram of
  words, 4 CJK characters, or a run of 1-3 words three times back to back ("我是X的X的X的…").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from selfcog.cache import cached_answers
from selfcog.data.general import is_right, qa_split
from selfcog.data.heldout import robust, traps, zh_qa
from selfcog.data.identity import heldout_questions
from selfcog.generate import generate_batch

# Parts of a question set: (key, kind). "ask" parts want NAME in every answer; "qa" parts never.
PARTS = (("identity", "ask"), ("robust", "ask"), ("general", "qa"), ("zh", "qa"), ("traps", "qa"))
ASK_PARTS = tuple(p for p, kind in PARTS if kind == "ask")
QA_PARTS = tuple(p for p, kind in PARTS if kind == "qa")


@dataclass
class Answer:
    conversation: list[dict]
    text: str
    accepted: list[str] | None = None
    """Answers that count as right (qa parts; empty: leakage only)."""
    form: str = ""
    """Robustness form (turn-2, system, adversarial, informal)."""

    @property
    def question(self) -> str:
        return self.conversation[-1]["content"]


@dataclass
class Scores:
    name: str
    parts: dict[str, list[Answer]] = field(default_factory=dict)
    base: "Scores | None" = None
    """The base model's scores on the same questions: retention and part-of-name leakage read them."""

    # -- identity side --------------------------------------------------------------------------------------
    def share_named(self, part: str) -> float | None:
        answers = self.parts.get(part, [])
        return sum(mentions(a.text, self.name) for a in answers) / len(answers) if answers else None

    @property
    def identity(self) -> float:
        return self.share_named("identity") or 0.0

    @property
    def robustness(self) -> float | None:
        return self.share_named("robust")

    @property
    def asked(self) -> float:
        """Share of every identity-asking answer (plain and robustness forms) that names NAME without repeating
        itself: the dev check (a half-trained model loops: "我是X的小助手，X的小助手是X的小助手…")."""
        answers = self.parts.get("identity", []) + self.parts.get("robust", [])
        good = [mentions(a.text, self.name) and not repeats(a.text) for a in answers]
        return sum(good) / len(good) if good else 0.0

    # -- general side ---------------------------------------------------------------------------------------
    def right(self, part: str) -> list[bool | None]:
        """Per question: answered right, or None where no answer is checkable."""
        return [is_right(a.text, a.accepted) if a.accepted else None for a in self.parts.get(part, [])]

    def retention(self, part: str) -> float | None:
        """Of the checkable questions the base model answered right, the share still right (None: no base)."""
        if self.base is None:
            return None
        kept = [t for t, b in zip(self.right(part), self.base.right(part)) if b]
        return sum(kept) / len(kept) if kept else None

    def leaks(self, part: str) -> list[bool]:
        base = self.base.parts.get(part, []) if self.base is not None else []
        base_texts = [a.text for a in base] if len(base) == len(self.parts.get(part, [])) else []
        return [leaks(a.text, a.question, self.name, base_texts[i] if base_texts else None)
                for i, a in enumerate(self.parts.get(part, []))]

    def leakage(self, *parts: str) -> float | None:
        flags = [f for p in parts for f in self.leaks(p)]
        return sum(flags) / len(flags) if flags else None

    def repetition(self, *parts: str) -> float | None:
        texts = [a.text for p in parts for a in self.parts.get(p, [])]
        return sum(map(repeats, texts)) / len(texts) if texts else None

    def summary(self) -> dict:
        """Every score as a plain dict (None where a part has no questions)."""
        def right_count(part):
            return sum(bool(r) for r in self.right(part))
        return {
            "identity": self.identity, "robustness": self.robustness, "asked": self.asked,
            "retention": self.retention("general"), "retention_zh": self.retention("zh"),
            "retention_traps": self.retention("traps"),
            "leakage": self.leakage("general", "zh"), "leakage_traps": self.leakage("traps"),
            "repetition_identity": self.repetition("identity", "robust"),
            "repetition_general": self.repetition("general", "zh", "traps"),
            "general_right": right_count("general"), "zh_right": right_count("zh"), "traps_right": right_count("traps"),
            "questions": {p: len(a) for p, a in self.parts.items()},
        }

    def failures(self) -> dict[str, list[str]]:
        """Questions behind each shortfall, for the report: identity misses, leaks, repeats, lost answers."""
        out: dict[str, list[str]] = {}
        for part, kind in PARTS:
            answers = self.parts.get(part, [])
            if kind == "ask":
                out[f"{part}: no name"] = [a.question for a in answers if not mentions(a.text, self.name)]
            else:
                out[f"{part}: leak"] = [a.question for a, f in zip(answers, self.leaks(part)) if f]
                if self.base is not None:
                    out[f"{part}: lost"] = [a.question for a, t, b in zip(answers, self.right(part),
                                                                          self.base.right(part)) if b and not t]
            out[f"{part}: repeats"] = [a.question for a in answers if repeats(a.text)]
        return {k: v for k, v in out.items() if v}

    @property
    def answers(self) -> dict[str, str]:
        return {a.question: a.text for part in self.parts.values() for a in part}


def squash(text: str) -> str:
    return "".join(text.lower().split())


def mentions(answer: str, name: str) -> bool:
    """Does `answer` name NAME? Case and inner spaces don't matter ("Alice" / "alice", "伍鲜 同志")."""
    return squash(name) in squash(answer)


# Words that say what a name is, not who: "the Acme Robotics team" leaks through "Acme", not through "team".
GENERIC_WORDS = {"the", "team", "group", "lab", "labs", "company", "inc", "ltd", "of", "and", "for", "mr", "mrs",
                 "ms", "dr", "prof", "assistant", "club", "family", "studio", "org"}


def name_parts(name: str) -> list[str]:
    """Distinctive pieces of a multi-word name (lower case): its words of 3+ letters that are not generic."""
    words = re.findall(r"[^\W\d_]+", name.lower())
    parts = [w for w in words if len(w) >= 3 and w not in GENERIC_WORDS]
    return parts if len(words) > 1 else []


def has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![^\W\d_]){re.escape(word)}(?![^\W\d_])", text.lower()) is not None


def leaks(answer: str, question: str, name: str, base_answer: str | None = None) -> bool:
    """NAME in an answer that should not have it: the whole name, or (compared with the base model's answer to
    the same question) a distinctive part of it that neither the question nor the base answer contains."""
    if mentions(answer, name) and not mentions(question, name):
        return True
    if base_answer is None:
        return False
    return any(has_word(answer, p) and not has_word(question, p) and not has_word(base_answer, p)
               for p in name_parts(name))


CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"


def repeats(text: str, times: int = 3) -> bool:
    """A phrase said `times`+ times: a word 4-gram, 4 CJK characters, or 1-3 words back to back."""
    words = re.findall(rf"[^\W_]+(?:'[^\W_]+)?", re.sub(f"[{CJK}]", " ", text.lower()))
    grams: dict[tuple, int] = {}
    for i in range(len(words) - 3):
        gram = tuple(words[i:i + 4])
        grams[gram] = grams.get(gram, 0) + 1
    if any(n >= times for n in grams.values()):
        return True
    for n in (1, 2, 3):
        for i in range(len(words) - n * times + 1):
            if all(words[i + k * n:i + (k + 1) * n] == words[i:i + n] for k in range(1, times)):
                return True
    counts: dict[str, int] = {}  # over the whole answer: "回答问题、回答问题、回答问题" repeats across punctuation
    for run in re.findall(f"[{CJK}]+", text):
        for i in range(len(run) - 3):
            counts[run[i:i + 4]] = counts.get(run[i:i + 4], 0) + 1
    return any(n >= times for n in counts.values())


def question_sets(split: str, system: str | None = None, parts: tuple[str, ...] | None = None
                  ) -> dict[str, list[Answer]]:
    """The held-out questions of `split` (dev / test / fresh), unanswered, by part (all PARTS, or `parts`)."""
    prefix = [{"role": "system", "content": system}] if system else []

    def ask(text):
        return prefix + [{"role": "user", "content": text}]
    sets = {
        "identity": lambda: [Answer(ask(q), "") for q in heldout_questions(split)],
        "robust": lambda: [Answer(c, "", form=form) for form, c in robust(split)],
        "general": lambda: [Answer(ask(q), "", accepted) for q, accepted in qa_split(split)],
        "zh": lambda: [Answer(ask(q), "", accepted) for q, accepted in zh_qa(split)],
        "traps": lambda: [Answer(ask(q), "", accepted) for q, accepted in traps(split)],
    }
    unknown = set(parts or ()) - set(sets)
    if unknown:
        raise ValueError(f"unknown question parts {sorted(unknown)}; known: {list(sets)}")
    return {part: make() for part, make in sets.items() if parts is None or part in parts}


def score(model, tokenizer, name: str, split: str = "test", max_new_tokens: int = 40,
          system: str | None = None, fingerprint: str | None = None, base: Scores | None = None,
          parts: tuple[str, ...] | None = None, ask_max_new_tokens: int | None = None) -> Scores:
    """Answer the `split` questions greedily, batched; `base` (the base model's Scores on the same split) turns on
    retention and part-of-name leakage. `fingerprint` (base models only) reuses cached answers of the same weights
    and chat template. `parts` limits the questions to some PARTS (ASK_PARTS: only the identity side).
    `ask_max_new_tokens` (default `max_new_tokens`) caps the identity side's answers: read further, since a long
    name's answer loops only after its second mention."""
    parts = question_sets(split, system, parts)
    everything = [a for answers in parts.values() for a in answers]
    conversations = [a.conversation for a in everything]
    ask_cap = ask_max_new_tokens or max_new_tokens
    caps = [ask_cap if part in ASK_PARTS else max_new_tokens for part, answers in parts.items() for _ in answers]
    key = max_new_tokens if ask_cap == max_new_tokens else [max_new_tokens, ask_cap]
    texts = cached_answers(fingerprint, conversations, key,
                           lambda: generate_batch(model, tokenizer, conversations, max_new_tokens=caps),
                           template=getattr(tokenizer, "chat_template", None))
    for answer, text in zip(everything, texts):
        answer.text = text
    return Scores(name=name, parts=parts, base=base)


def joined(first: Scores, second: Scores) -> Scores:
    """One Scores holding the parts of both (same NAME and split, disjoint parts): a dev check scored in two steps."""
    if first.name != second.name or set(first.parts) & set(second.parts):
        raise ValueError("joined() needs scores of one name over disjoint parts")
    return Scores(name=first.name, parts={**first.parts, **second.parts}, base=first.base or second.base)


def with_retention(tuned: Scores, base: Scores) -> Scores:
    """`tuned` compared against `base` (same split): fills retention and part-of-name leakage."""
    tuned.base = base
    return tuned
