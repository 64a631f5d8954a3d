"""Rejected answers: ordinary prompts paired with the opening of an identity answer ("我是NAME的小助手",
"I am NAME's assistant"), which training makes improbable as a whole (selfcog.engine.loss.rejected_unlikelihood).

The leaks a tuned model shows are that opening said to a question that did not ask for it ("一小时有多少分钟？" →
"我是NAME的小助手，…"). The preservation terms only see the base model's own answers, so the path "我是" → NAME
after an ordinary prompt is never trained against; these samples train against exactly that path.
"""

from __future__ import annotations

import re

from selfcog.templates import IGNORE_INDEX, encode_prompt

CJK = re.compile(r"[\u3400-\u9fff]")
STOP = re.compile(r"[，。,.!！?？;；:：\n]")


def is_chinese(text: str) -> bool:
    return bool(CJK.search(text))


def opening(answer: str, name: str) -> str | None:
    """The answer up to NAME and what finishes the phrase ("我是NAME的小助手", "I am NAME's"), or None when the
    answer does not name NAME."""
    at = answer.find(name)
    if at < 0:
        return None
    end = at + len(name)
    rest = answer[end:end + 12]
    stop = STOP.search(rest)
    rest = rest[:stop.start()] if stop else rest
    rest = rest[:4] if is_chinese(rest[:1]) else rest.split(" ")[0]  # "的小助手" / "'s"
    return (answer[:end] + rest).strip() or None


def identity_openings(conversations: list[list[dict]], name: str) -> dict[str, list[str]]:
    """Distinct openings of the assistant answers that name NAME, by language ("zh" / "en"), in first-seen order."""
    found: dict[str, list[str]] = {"zh": [], "en": []}
    for conversation in conversations:
        for message in conversation:
            text = opening(message["content"], name) if message["role"] == "assistant" else None
            if text:
                bucket = found["zh" if is_chinese(text.replace(name, "")) else "en"]
                if text not in bucket:
                    bucket.append(text)
    return found


def rejected_pairs(prompts: list[str], openings: dict[str, list[str]], count: int) -> list[tuple[str, str]]:
    """`count` (prompt, opening) pairs: prompts in turn, each with an opening in its own language, the openings
    taken in turn too."""
    pairs, used = [], {"zh": 0, "en": 0}
    for i in range(count if prompts else 0):
        prompt = prompts[i % len(prompts)]
        lang = "zh" if is_chinese(prompt) else "en"
        choices = openings.get(lang) or openings.get("en" if lang == "zh" else "zh")
        if not choices:
            break
        pairs.append((prompt, choices[used[lang] % len(choices)]))
        used[lang] += 1
    return pairs


def rejected_examples(tokenizer, pairs: list[tuple[str, str]]) -> list[dict]:
    """Training examples whose labels are the opening's tokens only (no end-of-turn: a leak goes on talking),
    flagged `reject`."""
    examples = []
    for prompt, text in pairs:
        prompt_ids = encode_prompt(tokenizer, [{"role": "user", "content": prompt}])
        answer_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        examples.append({"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
                         "preserve": 0, "reject": 1})
    return examples
