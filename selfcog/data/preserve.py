"""Preservation samples: the base model's own greedy answers to ordinary prompts (self-distillation).

Trained alongside the identity data (with a KL term to the base model's token distributions, see
train.py), they anchor ordinary answers where they were, so the identity does not leak into them.
"""

from __future__ import annotations

import re

from selfcog.cache import cached_answers
from selfcog.data.general import preservation_prompts
from selfcog.generate import generate_batch

SENTENCE_END = re.compile(r"[.!?。！？](?=\s|$)|[。！？]")


def trim_to_sentence(answer: str) -> str:
    """Cut an answer that hit the token cap back to its last complete sentence."""
    ends = [m.end() for m in SENTENCE_END.finditer(answer)]
    return answer[:ends[-1]].strip() if ends else answer.strip()


def preservation_conversations(model, tokenizer, count: int, max_new_tokens: int = 64,
                               fingerprint: str | None = None) -> list[list[dict]]:
    """`count` conversations (at most the built-in prompt set) answered by `model` itself."""
    prompts = preservation_prompts(max(0, count))
    if not prompts:
        return []
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    answers = cached_answers(fingerprint, conversations, max_new_tokens,
                             lambda: generate_batch(model, tokenizer, conversations, max_new_tokens=max_new_tokens),
                             template=getattr(tokenizer, "chat_template", None))
    return [[{"role": "user", "content": p}, {"role": "assistant", "content": trim_to_sentence(a)}]
            for p, a in zip(prompts, answers) if trim_to_sentence(a)]
