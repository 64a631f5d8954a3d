"""Read conversation datasets into one shape: a list of `[{"role", "content"}, ...]` conversations.

Formats (JSON array or JSONL, detected per record):
- XTuner `conversation`: `{"conversation": [{"system"?, "input", "output"}, ...]}`
- OpenAI `messages`: `{"messages": [{"role", "content"}, ...]}`
- alpaca: `{"instruction", "input"?, "output", "system"?}`
- sharegpt: `{"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}`
Every problem raises a one-line `SelfcogError` naming the file, the record index and the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

from selfcog.errors import SelfcogError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


class RecordError(ValueError):
    """A record's problem; the reader adds file and index."""


def read_records(path: Path) -> list:
    """Raw records of a JSON array or JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise SelfcogError(f"{path}: data file does not exist")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise SelfcogError(f"{path}: data file is empty")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SelfcogError(f"{path}: broken JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
        return records
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise SelfcogError(f"{path}: broken JSON on line {lineno} (record {len(records)}): {exc.msg}") from None
    return records


def text_field(obj: dict, key: str, required: bool = True) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise RecordError(f"missing '{key}'")
        return ""
    if not isinstance(value, str):
        raise RecordError(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def from_xtuner(record: dict) -> list[dict]:
    turns = record["conversation"]
    if not isinstance(turns, list) or not turns:
        raise RecordError("empty conversation")
    messages = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"conversation turn {j} is not an object")
        try:
            system = text_field(turn, "system", required=False)
            if system and not messages:
                messages.append({"role": "system", "content": system})
            messages.append({"role": "user", "content": text_field(turn, "input")})
            messages.append({"role": "assistant", "content": text_field(turn, "output")})
        except RecordError as exc:
            raise RecordError(f"conversation turn {j}: {exc}") from None
    return messages


def from_openai(record: dict) -> list[dict]:
    turns = record["messages"]
    if not isinstance(turns, list) or not turns:
        raise RecordError("empty messages")
    messages = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant"):
            raise RecordError(f"message {j}: role must be system, user or assistant")
        messages.append({"role": turn["role"], "content": text_field(turn, "content")})
    return messages


def from_alpaca(record: dict) -> list[dict]:
    instruction = text_field(record, "instruction")
    extra = text_field(record, "input", required=False)
    output = text_field(record, "output")
    system = text_field(record, "system", required=False)
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def from_sharegpt(record: dict) -> list[dict]:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise RecordError("empty conversations")
    messages = []
    for j, turn in enumerate(turns):
        role = SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None:
            raise RecordError(f"conversations turn {j}: 'from' must be one of {sorted(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": text_field(turn, "value")})
    return messages


def to_messages(record) -> list[dict]:
    """One record in any supported format -> validated messages."""
    if not isinstance(record, dict):
        raise RecordError(f"record is a {type(record).__name__}, not an object")
    if "conversation" in record:
        messages = from_xtuner(record)
    elif "messages" in record:
        messages = from_openai(record)
    elif "conversations" in record:
        messages = from_sharegpt(record)
    elif "instruction" in record or "output" in record:
        messages = from_alpaca(record)
    else:
        raise RecordError(f"unknown shape (keys: {', '.join(sorted(record)) or 'none'}); expected conversation, "
                          "messages, conversations or instruction/output")
    check_turn_order(messages)
    return messages


def check_turn_order(messages: list[dict]) -> None:
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body or body[0]["role"] != "user":
        raise RecordError("conversation must start with a user turn")
    if not any(m["role"] == "assistant" for m in body):
        raise RecordError("conversation has no assistant turn")
    for a, b in zip(body, body[1:]):
        if a["role"] == b["role"]:
            raise RecordError(f"two '{a['role']}' turns in a row")


def load_conversations(path: Path) -> list[list[dict]]:
    """All conversations of a data file, validated; the first bad record stops with its location."""
    records = read_records(path)
    if not isinstance(records, list):
        raise SelfcogError(f"{path}: top level must be a JSON array or JSONL records")
    if not records:
        raise SelfcogError(f"{path}: no records")
    conversations = []
    for index, record in enumerate(records):
        try:
            conversations.append(to_messages(record))
        except RecordError as exc:
            raise SelfcogError(f"{path}: record {index}: {exc}") from None
    return conversations


def deduplicate(conversations: list[list[dict]]) -> tuple[list[list[dict]], int]:
    """Exact duplicates removed, first occurrence kept; returns (unique, number removed)."""
    seen = set()
    unique = []
    for conversation in conversations:
        key = json.dumps(conversation, ensure_ascii=False, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(conversation)
    return unique, len(conversations) - len(unique)
