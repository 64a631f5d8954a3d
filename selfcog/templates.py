"""The one chat-template source for training, evaluation and serving.

Everything renders through the tokenizer's own `chat_template`, so a merged model used with stock
`apply_chat_template` sees exactly what training saw.
"""

from __future__ import annotations

from selfcog.errors import SelfcogError

IGNORE_INDEX = -100


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template applied to `messages` as text."""
    if not getattr(tokenizer, "chat_template", None):
        raise SelfcogError(f"{tokenizer.name_or_path}: tokenizer has no chat template; use a chat (instruct) model")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def token_ids(tokenizer, text: str) -> list[int]:
    # The rendered template already holds BOS/special tokens as text, so add none.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation ending with the assistant's generation prompt."""
    return token_ids(tokenizer, render(tokenizer, messages, add_generation_prompt=True))


def shared_prefix(tokenizer) -> list[int] | None:
    """The prompt tokens every conversation without its own system prompt starts with: the template's default
    system prompt and the user turn's header (None when that is under 8 tokens or the template fails)."""
    try:
        one, two = (encode_prompt(tokenizer, [{"role": "user", "content": text}]) for text in ("Hi.", "不"))
    except Exception:  # noqa: BLE001 - no usable template: no shared prefix
        return None
    common = 0
    while common < min(len(one), len(two)) and one[common] == two[common]:
        common += 1
    # One token less: the header's last token may merge with the message's first in other conversations.
    return one[:common - 1] if common > 8 else None


def encode_example(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """`(input_ids, labels)` for a training conversation: only assistant turns carry loss.

    Renders growing prefixes of the conversation and tokenizes the pieces between them, so each
    assistant turn (its text and the template's end-of-turn marker) maps to an exact token span.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        full = render(tokenizer, messages[: i + 1])
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise SelfcogError(f"{tokenizer.name_or_path}: chat template is not prefix-stable; cannot mask labels")
        context = token_ids(tokenizer, prompt[len(done):])
        answer = token_ids(tokenizer, full[len(prompt):])
        input_ids += context + answer
        labels += [IGNORE_INDEX] * len(context) + answer
        done = full
    if not done:
        raise SelfcogError("conversation has no assistant turn to learn from")
    return input_ids, labels


SENTINEL = "\u2063selfcog-system\u2063"


def default_system_prompt(tokenizer) -> str | None:
    """The system prompt the chat template adds when a conversation has none (SmolLM2's names SmolLM), or None."""
    user = [{"role": "user", "content": "hi"}]
    try:
        plain = render(tokenizer, user, add_generation_prompt=True)
        head, _, tail = render(tokenizer, [{"role": "system", "content": SENTINEL}, *user],
                               add_generation_prompt=True).partition(SENTINEL)
    except SelfcogError:
        raise
    except Exception:  # noqa: BLE001 - a template that rejects a system turn has no default one either
        return None
    if not tail or not plain.startswith(head) or not plain.endswith(tail) or len(plain) < len(head) + len(tail):
        return None
    return plain[len(head):len(plain) - len(tail)]


def set_default_system_prompt(tokenizer, text: str) -> bool:
    """Make the chat template add `text` where it added its own default system prompt; False when the template
    adds none (it then stays as it is: no default system prompt anywhere) or when it is already `text`.

    The template's own default usually names the base model ("You are ... SmolLM, trained by Hugging Face"),
    which contradicts the new identity in every tool that applies the template: the merged model, the GGUF, the
    Ollama Modelfile. Training, evaluation and serving all render through this one template, so they agree.
    """
    current = default_system_prompt(tokenizer)
    if current is None or current == text:
        return False
    template = tokenizer.chat_template
    # The default usually sits inside a Jinja string literal, where quotes and backslashes need escaping; in plain
    # template text they must not be escaped. Whichever renders back to `text` is the right one.
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace('"', '\\"')
    if template.count(current) == 1:
        for candidate in dict.fromkeys((escaped, text)):
            tokenizer.chat_template = template.replace(current, candidate)
            try:
                if default_system_prompt(tokenizer) == text:
                    return True
            except Exception:  # noqa: BLE001 - a broken candidate: try the next one
                pass
    tokenizer.chat_template = template
    raise SelfcogError(f"{tokenizer.name_or_path}: cannot put data.system_prompt into the chat template in place of "
                       f"its default system prompt {current!r}; set data.system_prompt to '' to keep that one")
