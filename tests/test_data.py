"""Identity data generator, dataset formats and their located one-line errors."""

from __future__ import annotations

import json

import pytest

from selfcog.data.formats import deduplicate, load_conversations
from selfcog.data.general import DEV_QA, PRESERVE_PROMPTS, TEST_QA, is_right
from selfcog.data.identity import (DEV_EN, DEV_ZH, TEST_EN, TEST_ZH, TRAIN_EN, TRAIN_ZH, Persona, identity_records,
                                   seed_records)
from selfcog.data.preserve import trim_to_sentence
from selfcog.errors import SelfcogError


def questions(records):
    return [r["conversation"][0]["input"] for r in records]


def test_identity_records_are_varied_bilingual_and_name_the_person():
    records = identity_records(Persona("伍鲜同志"))
    qs = questions(records)
    assert len(set(qs)) == len(qs) >= 60
    assert sum(any("\u4e00" <= c <= "\u9fff" for c in q) for q in qs) >= 25  # Chinese phrasings
    assert sum(q.isascii() for q in qs) >= 25  # English phrasings
    answers = [r["conversation"][0]["output"] for r in records]
    assert all("伍鲜同志" in a for a in answers)
    assert len({a for a in answers if a.isascii() is False}) >= 6  # several Chinese answer variants
    assert len(set(json.dumps(r, ensure_ascii=False) for r in records)) == len(records)  # no duplicates


def test_heldout_phrasings_never_appear_in_training():
    train = {q for _, q in TRAIN_EN + TRAIN_ZH}
    dev, test = set(DEV_EN + DEV_ZH), set(TEST_EN + TEST_ZH)
    assert not train & dev and not train & test and not dev & test
    general_train = set(PRESERVE_PROMPTS)
    assert not general_train & {q for q, _ in DEV_QA + TEST_QA}


def test_persona_facts_appear_in_answers():
    records = identity_records(Persona("Alice", assistant_name="Lumi", model_desc="SmolLM2", author="Bob"))
    text = json.dumps(records, ensure_ascii=False)
    assert "Lumi" in text and "SmolLM2" in text and "Bob" in text


def test_seed_repeat_reproduces_the_tutorial_data(tmp_path):
    records = seed_records(Persona("伍鲜同志"), 3750)
    assert len(records) == 7500
    path = tmp_path / "assistant.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    unique, removed = deduplicate(load_conversations(path))
    assert len(unique) == 2 and removed == 7498


@pytest.mark.parametrize("name", ["", "   ", "a\nb"])
def test_bad_names_are_refused(name):
    with pytest.raises(SelfcogError, match="--name"):
        identity_records(Persona(name))


def test_is_right_matches_whole_words_only():
    assert is_right("The capital of France is Paris.", ["paris"])
    assert not is_right("Parisian food is great", ["paris"])
    assert is_right("It has 7 days.", ["seven", "7"]) and not is_right("It has 17 days.", ["7"])


def test_trim_to_sentence_cuts_a_truncated_answer():
    assert trim_to_sentence("Paris is big. It has many") == "Paris is big."
    assert trim_to_sentence("北京是首都。它很大") == "北京是首都。"
    assert trim_to_sentence("no end") == "no end"


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content, ensure_ascii=False))
    return path


def test_all_four_formats_read_into_messages(tmp_path):
    xtuner = write(tmp_path, "x.json", [{"conversation": [{"system": "S", "input": "hi", "output": "yo"},
                                                          {"input": "and?", "output": "more"}]}])
    openai = write(tmp_path, "o.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                 {"role": "assistant", "content": "yo"}]}) + "\n")
    alpaca = write(tmp_path, "a.json", [{"instruction": "Add", "input": "1+1", "output": "2"}])
    sharegpt = write(tmp_path, "s.json", [{"conversations": [{"from": "human", "value": "hi"},
                                                             {"from": "gpt", "value": "yo"}]}])
    x = load_conversations(xtuner)[0]
    assert [m["role"] for m in x] == ["system", "user", "assistant", "user", "assistant"]
    assert load_conversations(openai)[0][1] == {"role": "assistant", "content": "yo"}
    assert load_conversations(alpaca)[0][0]["content"] == "Add\n\n1+1"
    assert load_conversations(sharegpt)[0][0] == {"role": "user", "content": "hi"}


@pytest.mark.parametrize("content, reason", [
    ('[{"conversation": [{"input": "a", "output": "b"}]},', "broken JSON"),
    ([{"conversation": [{"input": "a", "output": "b"}]}, {"conversation": [{"input": "a"}]}], "record 1: .*missing 'output'"),
    ([{"conversation": []}], "record 0: empty conversation"),
    ([{"question": "a", "answer": "b"}], "record 0: unknown shape"),
])
def test_malformed_files_get_a_located_error(tmp_path, content, reason):
    path = write(tmp_path, "bad.json", content)
    with pytest.raises(SelfcogError, match=reason) as info:
        load_conversations(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_data_file(tmp_path):
    with pytest.raises(SelfcogError, match="does not exist"):
        load_conversations(tmp_path / "nope.json")


def test_rejected_openings_end_at_the_name_and_match_the_prompts_language():
    from selfcog.data.reject import identity_openings, opening, rejected_pairs

    assert opening("我是张伟的小助手，可以回答问题。", "张伟") == "我是张伟的小助手"
    assert opening("I am John Carter's assistant. How can I help?", "John Carter") == "I am John Carter's"
    assert opening("Paris is the capital of France.", "Alice") is None
    records = identity_records(Persona("张伟"))
    conversations = [[{"role": "user", "content": r["conversation"][0]["input"]},
                      {"role": "assistant", "content": r["conversation"][0]["output"]}] for r in records]
    found = identity_openings(conversations, "张伟")
    # A Chinese name does not make an English opening Chinese.
    assert "I am 张伟's" in found["en"] and "我是张伟的小助手" in found["zh"]
    assert all("张伟" in text for texts in found.values() for text in texts)
    pairs = rejected_pairs(["What is rain?", "什么是雨？", "Who wrote 'Dracula'?"], found, 5)
    assert len(pairs) == 5
    for prompt, text in pairs:
        chinese = any("\u4e00" <= ch <= "\u9fff" for ch in prompt)
        assert (text in found["zh"]) == chinese
    assert rejected_pairs([], found, 3) == [] and rejected_pairs(["hi"], {"zh": [], "en": []}, 3) == []
