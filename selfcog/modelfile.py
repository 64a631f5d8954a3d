"""The Ollama `Modelfile` written beside a GGUF: its TEMPLATE comes from the model's own chat template.

A chat template is read as a structure by rendering probe conversations with the HF template: a prefix (a BOS the
template writes itself), each role's text before and after the message content, the assistant's opening that
asks for an answer, and the system prompt the template adds when a conversation has none. The structure is kept
only if it renders every probe exactly as the HF template does. The Modelfile's TEMPLATE (Ollama's Go template
language) and SYSTEM are generated from it, and the generated text is rendered back with `render_go_template`, a
renderer for the few Go-template constructs it uses, under Ollama's rule for SYSTEM (prepended as a system message
when the conversation has none): a TEMPLATE that renders any probe differently from the HF template is not
written.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from selfcog.errors import SelfcogError
from selfcog.streaming import end_of_turn_ids
from selfcog.templates import default_system_prompt

ROLES = ("system", "user", "assistant")
# Probe contents: distinct, multi-line, non-ASCII, so no piece of template text can be mistaken for them.
S, U1, A1, U2 = "\u2063S: be brief\nplease\u2063", "\u2063U1: 你好?\u2063", "\u2063A1: hi\n\u2063", "\u2063U2: again\u2063"
PROBES = (
    [{"role": "user", "content": U1}],
    [{"role": "system", "content": S}, {"role": "user", "content": U1}],
    [{"role": "user", "content": U1}, {"role": "assistant", "content": A1}, {"role": "user", "content": U2}],
    [{"role": "system", "content": S}, {"role": "user", "content": U1}, {"role": "assistant", "content": A1},
     {"role": "user", "content": U2}],
)


@dataclass(frozen=True)
class ChatFormat:
    """A chat template as text around each message, which Python and a Go template can both render."""

    prefix: str
    turns: dict[str, tuple[str, str]]
    """role -> (text before the content, text after it)."""
    generation: str
    """What asks the model to answer: the assistant turn's opening."""
    system: str | None
    """The system prompt added when a conversation has none."""

    def render(self, messages: list[dict]) -> str:
        """The prompt for `messages`, ending with the assistant's opening (`add_generation_prompt=True`)."""
        if self.system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.system}, *messages]
        return self.prefix + "".join(self.turns[m["role"]][0] + m["content"] + self.turns[m["role"]][1]
                                     for m in messages) + self.generation


def hf_render(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_format(tokenizer) -> ChatFormat | None:
    """The structure of `tokenizer`'s chat template, or None when the template is not made of role turns (or
    renders a probe in a way the structure cannot)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        system_only = hf_render(tokenizer, [{"role": "system", "content": S}], add_generation_prompt=False)
        one = hf_render(tokenizer, PROBES[1][:2], add_generation_prompt=False)
        two = hf_render(tokenizer, PROBES[3][:3], add_generation_prompt=False)
        asked = hf_render(tokenizer, PROBES[1][:2], add_generation_prompt=True)
        user_only = hf_render(tokenizer, PROBES[0], add_generation_prompt=False)
        system = default_system_prompt(tokenizer)
    except Exception:  # noqa: BLE001 - a template that cannot render these probes has no such structure
        return None
    user_turn = one[len(system_only):]
    if not (one.startswith(system_only) and two.startswith(one) and asked.startswith(one)
            and user_only.endswith(user_turn)):
        return None
    if system is None:  # what comes before a lone user turn is the prefix
        prefix = user_only[:len(user_only) - len(user_turn)]
    else:  # every prompt starts with a system turn: a BOS written once, unless every turn opens with it (ChatML)
        bos = getattr(tokenizer, "bos_token", None)
        prefix = bos if bos and system_only.startswith(bos) and not user_turn.startswith(bos) else ""
    if not system_only.startswith(prefix):
        return None
    turns = {"system": split_turn(system_only[len(prefix):], S), "user": split_turn(user_turn, U1),
             "assistant": split_turn(two[len(one):], A1)}
    if None in turns.values():
        return None
    found = ChatFormat(prefix, turns, asked[len(one):], system)
    try:
        if any(found.render(probe) != hf_render(tokenizer, probe) for probe in PROBES):
            return None
    except Exception:  # noqa: BLE001
        return None
    return found


def split_turn(text: str, content: str) -> tuple[str, str] | None:
    head, found, tail = text.partition(content)
    return (head, tail) if found and content not in tail else None


# --- Go templates (Ollama) --------------------------------------------------------------------------------------

def go_template(fmt: ChatFormat, bos_added: bool) -> str:
    """Ollama TEMPLATE text for `fmt`. `bos_added`: the runtime adds BOS itself, so the template must not."""
    prefix = "" if bos_added else fmt.prefix
    pieces = [prefix, fmt.generation, *(text for turn in fmt.turns.values() for text in turn)]
    if any("{{" in piece or "}}" in piece for piece in pieces):
        raise SelfcogError("export-gguf: the chat template's text contains '{{' or '}}', which a Go template "
                           "would read as an action")
    shared = role_pattern(fmt)
    if shared:
        before, after, tail = shared
        body = f"{before}{{{{ .Role }}}}{after}{{{{ .Content }}}}{tail}"
    else:
        branches = [f'{"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{head}{{{{ .Content }}}}{tail}'
                    for i, (role, (head, tail)) in enumerate(fmt.turns.items())]
        body = "{{ " + "{{ ".join(branches) + "{{ end }}"
    opening = "{{ range .Messages }}" if prefix else "{{- range .Messages }}"
    return f"{prefix}{opening}{body}{{{{ end }}}}{fmt.generation}"


def role_pattern(fmt: ChatFormat) -> tuple[str, str, str] | None:
    """(before, after, tail) when every turn is `before + ROLE + after + content + tail` (ChatML and its kin)."""
    tails = {tail for _, tail in fmt.turns.values()}
    role, (head, _) = next(iter(fmt.turns.items()))
    if len(tails) != 1 or head.count(role) != 1:
        return None
    before, after = head.split(role)
    if all(h == before + r + after for r, (h, _) in fmt.turns.items()):
        return before, after, tails.pop()
    return None


ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.S)


def render_go_template(template: str, messages: list[dict]) -> str:
    """Render the Go-template subset `go_template` writes: `range .Messages`, `if`/`else if eq .Role "x"`,
    `else`, `end`, `.Role` and `.Content`, and the `{{-`/`-}}` whitespace trims."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    for match in ACTION.finditer(template):
        text = template[pos:match.start()]
        if match.group(1):
            text = text.rstrip()
        if tokens and tokens[-1][0] == "trim":
            tokens.pop()
            text = text.lstrip()
        tokens.append(("text", text))
        tokens.append(("action", match.group(2)))
        if match.group(3):
            tokens.append(("trim", ""))
        pos = match.end()
    tail = template[pos:]
    if tokens and tokens[-1][0] == "trim":
        tokens.pop()
        tail = tail.lstrip()
    tokens.append(("text", tail))
    tree, rest = parse(tokens, 0, ())
    if rest != len(tokens):
        raise ValueError(f"unexpected {{{{ {tokens[rest][1]} }}}}")
    return run(tree, {"Messages": messages})


def parse(tokens: list[tuple[str, str]], i: int, stops: tuple[str, ...]) -> tuple[list, int]:
    """Nodes up to a token starting with one of `stops` (left unconsumed)."""
    nodes: list = []
    while i < len(tokens):
        kind, text = tokens[i]
        if kind == "text":
            nodes.append(("text", text))
            i += 1
        elif text.split(" ")[0] in stops:
            return nodes, i
        elif text.startswith("range "):
            body, i = parse(tokens, i + 1, ("end",))
            nodes.append(("range", text[6:].strip(), body))
            i += 1
        elif text.startswith("if "):
            node, i = parse_if(tokens, i)
            nodes.append(node)
        elif re.fullmatch(r"\.\w+", text):
            nodes.append(("field", text[1:]))
            i += 1
        else:
            raise ValueError(f"unsupported action {{{{ {text} }}}}")
    if stops:
        raise ValueError(f"missing {{{{ {stops[0]} }}}}")
    return nodes, i


def parse_if(tokens: list[tuple[str, str]], i: int) -> tuple[tuple, int]:
    """`if COND` ... [`else if COND` ... ] [`else` ...] `end`: a chain of (condition, body), None for else."""
    branches = []
    condition: str | None = tokens[i][1][3:].strip()
    i += 1
    while True:
        body, i = parse(tokens, i, ("else", "end"))
        if i >= len(tokens):
            raise ValueError("missing {{ end }}")
        branches.append((condition, body))
        text = tokens[i][1]
        i += 1
        if text == "end":
            return ("if", branches), i
        if condition is None:
            raise ValueError("{{ else }} after {{ else }}")
        condition = text[8:].strip() if text.startswith("else if ") else None


def run(nodes: list, dot) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "field":
            out.append(str(field(dot, node[1])))
        elif node[0] == "range":
            out += [run(node[2], item) for item in field(dot, node[1].lstrip("."))]
        else:
            body = next((body for condition, body in node[1] if condition is None or test(condition, dot)), [])
            out.append(run(body, dot))
    return "".join(out)


def field(dot, name: str):
    return dot[name] if name in dot else dot[name.lower()]


def test(condition: str, dot) -> bool:
    match = re.fullmatch(r'eq \.(\w+) "((?:[^"\\]|\\.)*)"', condition)
    if not match:
        raise ValueError(f"unsupported condition {condition!r}")
    return field(dot, match.group(1)) == json.loads(f'"{match.group(2)}"')


# --- the Modelfile ----------------------------------------------------------------------------------------------

def ollama_prompt(modelfile_text: str, messages: list[dict], bos: str = "") -> str:
    """The prompt Ollama builds from this Modelfile for `messages`: SYSTEM goes in front of a conversation without
    a system message, the TEMPLATE renders the messages, and `bos` is what the runtime adds in front."""
    template = re.search(r'^TEMPLATE """(.*?)"""$', modelfile_text, re.S | re.M)
    system = re.search(r'^SYSTEM """(.*?)"""$', modelfile_text, re.S | re.M)
    if not template:
        raise ValueError("the Modelfile has no TEMPLATE")
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system.group(1)}, *messages]
    return bos + render_go_template(template.group(1), messages)


def modelfile(gguf_name: str, tokenizer, bos_added: bool) -> str:
    """An Ollama Modelfile: the weights, the chat format as a Go template, the default system prompt, stops.

    `bos_added`: the GGUF tells the runtime to add BOS to the prompt (`tokenizer.ggml.add_bos_token`)."""
    lines = [f"FROM ./{gguf_name}", ""]
    fmt = chat_format(tokenizer)
    text = None
    if fmt is not None:
        text = f'TEMPLATE """{go_template(fmt, bos_added)}"""'
        if fmt.system is not None:
            text += f'\nSYSTEM """{fmt.system}"""'
        bos = fmt.prefix if bos_added else ""
        if '"""' in (fmt.system or "") or any(ollama_prompt(text, probe, bos) != hf_render(tokenizer, probe)
                                              for probe in PROBES):
            text = None
    if text is None:
        lines += ["# The chat template is not one Ollama's TEMPLATE can reproduce exactly: Ollama derives the prompt "
                  "format from the chat template in the GGUF."]
    else:
        lines += text.splitlines()
    stops = [tokenizer.convert_ids_to_tokens(i) for i in end_of_turn_ids(tokenizer)]
    if fmt is not None and text is not None:
        # The user turn's opening special token (<|im_start|>): a model that starts a new turn has finished.
        opening = fmt.turns["user"][0]
        special = [t for t in getattr(tokenizer, "all_special_tokens", []) if t and opening.startswith(t)]
        stops += special[:1]
    for stop in dict.fromkeys(stops):
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"
