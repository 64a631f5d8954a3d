"""`selfcog check-data`: validate a dataset and show what training will see (like `xtuner check-custom-dataset`)."""

from __future__ import annotations

import json
from collections import Counter
from itertools import groupby
from pathlib import Path

from selfcog.data.formats import load_conversations
from selfcog.errors import SelfcogError
from selfcog.templates import IGNORE_INDEX, encode_example


def broken_json_record(path: Path) -> int | None:
    """Index of the first record of a JSON array that does not parse (None when the array itself is fine)."""
    text = path.read_text(encoding="utf-8")
    decoder, i = json.JSONDecoder(), text.index("[") + 1
    index = 0
    while True:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        if i < len(text) and text[i] == "]":
            return None
        try:
            _, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return index
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        if i < len(text) and text[i] == ",":
            i += 1
        elif i >= len(text) or text[i] != "]":
            return index + 1 if i < len(text) else index
        index += 1


def marked_example(tokenizer, messages: list[dict]) -> str:
    """The rendered sample with each span of loss-carrying tokens wrapped in [[ ]]."""
    input_ids, labels = encode_example(tokenizer, messages)
    pieces = []
    for learned, group in groupby(zip(input_ids, labels), key=lambda pair: pair[1] != IGNORE_INDEX):
        text = tokenizer.decode([token for token, _ in group])
        pieces.append(f"[[{text}]]" if learned else text)
    return "".join(pieces)


def load_checked(path: Path) -> list[list[dict]]:
    """load_conversations, with the record index added to a broken-JSON error in a JSON array."""
    try:
        return load_conversations(path)
    except SelfcogError as exc:
        message = str(exc)
        if "broken JSON at line" in message:
            index = broken_json_record(path)
            if index is not None:
                message = message.replace(": broken JSON", f": record {index}: broken JSON", 1)
        raise SelfcogError(message) from None


def check_data_report(path: Path, conversations: list[list[dict]], tokenizer, model_spec: str,
                      keep_duplicates: bool, max_length: int) -> str:
    """Counts, token length stats and one example with its loss-carrying tokens marked."""
    counts = Counter(json.dumps(c, ensure_ascii=False, sort_keys=True) for c in conversations)
    duplicates = len(conversations) - len(counts)
    turns = sum(1 for c in conversations for m in c if m["role"] == "assistant")
    lengths = {key: len(encode_example(tokenizer, json.loads(key))[0]) for key in counts}
    sizes = ([n for key, n in lengths.items() for _ in range(counts[key])] if keep_duplicates
             else list(lengths.values()))
    too_long = sum(1 for n in sizes if n > max_length)
    kept = "kept (--keep-duplicates)" if keep_duplicates else "removed before training; --keep-duplicates keeps them"
    lines = [f"{path}: OK",
             f"  records           {len(conversations)}",
             f"  turns             {turns} (assistant answers)",
             f"  distinct          {len(counts)}",
             f"  exact duplicates  {duplicates}" + (f" ({kept})" if duplicates else ""),
             f"  tokens ({model_spec}, {len(sizes)} samples): min {min(sizes)}  mean {sum(sizes) / len(sizes):.1f}"
             f"  max {max(sizes)}  longer than max_length {max_length}: {too_long}",
             "", "example (record 0), loss-carrying tokens in [[ ]]:", marked_example(tokenizer, conversations[0])]
    if duplicates:
        top, n = counts.most_common(1)[0]
        lines.insert(5, f"  most repeated     {n}x {json.loads(top)[-1]['content'][:60]!r}")
    return "\n".join(lines)
