"""The dev check answers the general questions only when the identity side would stop training, and decides
exactly as scoring everything at every check would."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from selfcog.config import RunConfig
from selfcog.engine import callbacks
from selfcog.engine.callbacks import IdentityEarlyStop, stop_reason
from selfcog.evaluate import ASK_PARTS, QA_PARTS, Scores, question_sets


def answered(split, parts, named: int, leaking: int) -> Scores:
    """Dev answers: the first `named` identity-asking answers name Alice; the first `leaking` general ones do too."""
    sets = question_sets(split, parts=parts)
    asks = [a for p in ASK_PARTS for a in sets.get(p, [])]
    for i, a in enumerate(asks):
        a.text = "I am Alice's assistant." if i < named else "I am a language model."
    general = [a for p in QA_PARTS for a in sets.get(p, [])]
    for i, a in enumerate(general):
        a.text = "Alice did." if i < leaking else (a.accepted[0] if a.accepted else "Fine.")
    return Scores("Alice", sets)


class FakeModel:
    def eval(self):
        pass

    def train(self):
        pass


@pytest.mark.parametrize("plan", [
    [(4, 0), (12, 0), (19, 0), (20, 0)],     # identity grows, then learned with no leak
    [(10, 0), (19, 5), (17, 0), (17, 0)],    # learned but leaking: keep going, then a plateau stops it
    [(10, 0), (19, 5), (20, 5), (17, 0)],    # learned, the leak stays for two checks: stop with it
    [(19, 5), (14, 0), (20, 5), (20, 0)],    # leaks at checks that are not in a row: go on until it is gone
    [(2, 0), (3, 0), (2, 0), (3, 0)],        # never near: every check asks the identity questions only
])
def test_two_step_checks_decide_as_full_checks(monkeypatch, plan):
    config = RunConfig()
    config.data.name = "Alice"
    config.eval.eval_steps, config.eval.min_steps = 5, 5
    base = answered("dev", None, 0, 0)
    asked_parts = []

    def fake_score(model, tokenizer, name, split, max_new_tokens, base=None, parts=None, ask_max_new_tokens=None):
        asked_parts.append(parts)
        named, leaking = plan[state.global_step // 5 - 1]
        s = answered(split, parts, named, leaking)
        s.base = base
        return s

    monkeypatch.setattr(callbacks, "score", fake_score)
    stopper = IdentityEarlyStop(config, tokenizer=None, base_dev=base)
    full: list[dict] = []  # what scoring every part at every check would have recorded
    state = SimpleNamespace(global_step=0, max_steps=100)
    stopped_at = None
    for step in range(5, 5 * len(plan) + 1, 5):
        state.global_step = step
        control = stopper.on_step_end(None, state, SimpleNamespace(should_training_stop=False), model=FakeModel())
        named, leaking = plan[step // 5 - 1]
        whole = answered("dev", None, named, leaking)
        whole.base = base
        full.append({"step": step, **whole.summary()})
        if stop_reason(full, config.eval):
            assert control.should_training_stop, (step, stopper.history[-1])
            stopped_at = step
            break
        assert not control.should_training_stop, (step, stopper.history[-1])
    for entry, want in zip(stopper.history, full):
        assert entry["asked"] == want["asked"]
        if entry["leakage"] is not None:  # the general side was scored: the same figures as a full check
            assert entry["leakage"] == want["leakage"] and entry["parts"] == sorted(want["questions"])
    general_asked = sum(p == QA_PARTS for p in asked_parts)
    assert all(p in (ASK_PARTS, QA_PARTS) for p in asked_parts)
    assert general_asked < len(stopper.history) or stopped_at is not None
    if plan[0][0] < 10 and plan[-1][0] < 10:
        assert general_asked == 0
