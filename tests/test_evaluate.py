"""The held-out scores see what users see: the name leaking (whole or in part), repeated phrases, forms."""

from __future__ import annotations

from selfcog.data import general, heldout, identity
from selfcog.evaluate import Answer, Scores, leaks, mentions, name_parts, question_sets, repeats


def test_repeats_catches_loops_in_both_languages_and_spares_fluent_text():
    assert repeats("我是伍鲜同志的伍鲜同志的伍鲜同志的")
    assert repeats("我是小助手，可以帮你回答问题、回答问题、回答问题。")
    assert repeats("I am Alice's Alice's Alice's assistant.")
    assert repeats("I can help you write, help you write, help you write and more.")
    assert repeats("the capital of the city is the capital of the city and the capital of the city")
    assert not repeats("I'm Alice's assistant. I can answer questions, write and explain things.")
    assert not repeats("The capital of France is Paris. Paris is known for the Eiffel Tower.")
    assert not repeats("你好！我是伍鲜同志的小助手。我可以帮伍鲜同志回答问题、写作和解释各种知识。")


def test_leaks_whole_name_or_a_distinctive_part_the_base_did_not_say():
    assert leaks("The Big Apple is a fictional city created by Alice.", "Which city is known as the Big Apple?", "Alice")
    assert not leaks("New York is called the Big Apple.", "Which city is known as the Big Apple?", "Alice")
    # A surname alone, where the base model said another one.
    assert leaks("Yuri Carter was the first person in space.", "Who was the first person in space?", "John Carter",
                 base_answer="Yuri Gagarin was the first person in space.")
    # A common word of an organisation's name is no leak when the base model used it too.
    assert not leaks("A robotics team builds robots.", "What does a robotics team do?", "the Acme Robotics team",
                     base_answer="A robotics team designs and builds robots.")
    assert leaks("Acme built the first telephone.", "Who invented the telephone?", "the Acme Robotics team",
                 base_answer="Alexander Graham Bell invented the telephone.")
    assert name_parts("Alice") == [] and name_parts("José Núñez") == ["josé", "núñez"]
    assert name_parts("the Acme Robotics team") == ["acme", "robotics"]
    assert mentions("我是伍鲜 同志的助手", "伍鲜同志")


def test_scores_read_every_part_against_the_base():
    def answered(texts, split="test"):
        parts = question_sets(split)
        flat = [a for answers in parts.values() for a in answers]
        for a, t in zip(flat, texts):
            a.text = t
        return parts

    parts = question_sets("test")
    n = sum(len(v) for v in parts.values())
    base = Scores("Alice", answered(["I am an AI."] * n))
    texts = []
    for part, answers in parts.items():
        for a in answers:
            if part in ("identity", "robust"):
                texts.append("I am Alice's assistant.")
            else:
                texts.append(a.accepted[0] if a.accepted else "Fine.")
    tuned = Scores("Alice", answered(texts), base=base)
    s = tuned.summary()
    assert s["identity"] == 1.0 and s["robustness"] == 1.0 and s["asked"] == 1.0
    assert s["leakage"] == 0.0 and s["leakage_traps"] == 0.0 and s["repetition_identity"] == 0.0
    assert base.summary()["identity"] == 0.0 and base.summary()["retention"] is None
    # Break one trap answer: it leaks and is lost.
    trap = tuned.parts["traps"][0]
    base.parts["traps"][0].text = trap.accepted[0]
    trap.text = "Alice wrote it."
    s = tuned.summary()
    assert s["leakage_traps"] == 1 / len(parts["traps"]) and s["retention_traps"] == 0.0
    assert tuned.failures()["traps: leak"] == [trap.question]


def test_heldout_sets_are_disjoint_from_training_and_from_each_other():
    trained = {q for _, q in identity.TRAIN_EN + identity.TRAIN_ZH}
    trained |= set(general.PRESERVE_PROMPTS + general.PRESERVE_ZH + general.PRESERVE_OTHERS + general.contrast_prompts())
    trained |= {q for q in general.preservation_prompts(10_000)}
    seen: set[str] = set()
    for split in heldout.SPLITS:
        asked = [a.conversation[-1]["content"] for answers in question_sets(split).values() for a in answers]
        assert not set(asked) & trained, split
        assert not set(asked) & seen, split
        seen |= set(asked)
    assert len(heldout.TRAPS["test"]) >= 40 and {a.form for a in question_sets("test")["robust"]} == {
        "turn-2", "turn-3", "system", "adversarial", "informal"}


def test_answer_question_is_the_last_user_turn():
    a = Answer([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], "A")
    assert a.question == "Q"


def test_a_dev_check_scored_in_two_steps_equals_one_scored_at_once():
    from selfcog.evaluate import ASK_PARTS, QA_PARTS, joined

    def answered(parts):
        for answers in parts.values():
            for i, a in enumerate(answers):
                a.text = "I am Alice's assistant." if i % 2 else (a.accepted[0] if a.accepted else "Alice wrote it.")
        return parts

    base = Scores("Alice", answered(question_sets("dev")))
    whole = Scores("Alice", answered(question_sets("dev")), base=base)
    ask = Scores("Alice", answered(question_sets("dev", parts=ASK_PARTS)), base=base)
    qa = Scores("Alice", answered(question_sets("dev", parts=QA_PARTS)), base=base)
    assert set(ask.parts) == {"identity", "robust"} and ask.summary()["leakage"] is None
    assert ask.asked == whole.asked
    assert joined(ask, qa).summary() == whole.summary() and joined(ask, qa).failures() == whole.failures()
    try:
        question_sets("dev", parts=("identity", "nonsense"))
    except ValueError as exc:
        assert "nonsense" in str(exc)
    else:
        raise AssertionError("an unknown part must be refused")
