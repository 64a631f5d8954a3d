"""The one chat-template source for training, evaluation and serving.

Everything renders through the tokenizer's own `chat_template`, so a merged model used with stock
`apply_chat_template` sees exactly what training saw.
"""

from __future__ import annotations

from selfcog.errors import SelfcogError

IGNORE_INDEX = -100
# End-of-turn markers used by common chat templates; generation stops on whichever the vocab has.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


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


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus the template's end-of-turn token(s): generation stops on any of them."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    # Token by token rather than through get_vocab(), which builds the whole vocabulary dict (~0.1 s a call here,
    # paid on every chat request). An unknown token maps to the unk id, which maps back to another token.
    for token in END_OF_TURN_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and tokenizer.convert_ids_to_tokens(token_id) == token and token_id not in ids:
            ids.append(token_id)
    return ids
