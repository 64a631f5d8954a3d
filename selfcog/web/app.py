"""The Streamlit chat demo: `selfcog web MODEL [--compare BASE]` runs this with `streamlit run`.

Chat history, answers streamed with a cursor, sidebar sliders (Max Length, Top P, Temperature), a Clear
Chat History button, each model loaded once per server (`st.cache_resource`), and a compare mode where the
base and the tuned model answer the same question side by side.
"""

from __future__ import annotations

import argparse
import sys
import threading
from contextlib import closing

import streamlit as st

from selfcog.chat import load_chat_model
from selfcog.errors import SelfcogError
from selfcog.generate import SamplingArgs, context_limit, stream_chat

CURSOR = "▌"
EMPTY = "_(no answer)_"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="selfcog web")
    parser.add_argument("--model", required=True, help="The (tuned) model spec.")
    parser.add_argument("--compare", default=None, help="A base model spec answering side by side.")
    parser.add_argument("--adapter", default=None, help="LoRA adapter applied to --model without merging.")
    parser.add_argument("--system", default=None, help="Initial system prompt.")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--trust-remote-code", action="store_true")
    return parser.parse_args(argv)


@st.cache_resource(show_spinner="Loading the model (once) ...")
def get_model(spec: str, adapter: str | None, trust_remote_code: bool):
    return load_chat_model(spec, adapter, trust_remote_code)


@st.cache_resource
def generation_lock() -> threading.Lock:
    """One generation at a time across all browser sessions: the models are shared."""
    return threading.Lock()


def show(text: str) -> str:
    return text if text.strip() else EMPTY


def clear_history() -> None:
    st.session_state.histories = {}


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    panes = [("tuned", args.model + (f" + {args.adapter}" if args.adapter else ""), args.model, args.adapter)]
    if args.compare:
        panes.insert(0, ("base", args.compare, args.compare, None))

    st.set_page_config(page_title="selfcog chat", page_icon="💬", layout="wide" if args.compare else "centered")
    st.title("💬 selfcog chat")
    st.caption("compare mode: base (left) and tuned (right) answer the same question" if args.compare
               else f"model: {panes[0][1]}")

    models = {}
    try:
        for key, _, spec, adapter in panes:
            models[key] = get_model(spec, adapter, args.trust_remote_code)
    except SelfcogError as exc:
        st.error(str(exc))
        st.stop()

    longest = min((context_limit(m) or 8192) for m, _ in models.values())
    with st.sidebar:
        max_length = st.slider("Max Length", min_value=32, max_value=max(longest, 64),
                               value=min(2048, max(longest, 64)), step=32)
        top_p = st.slider("Top P", min_value=0.01, max_value=1.0, value=0.8, step=0.01)
        temperature = st.slider("Temperature", min_value=0.0, max_value=1.5, value=0.6, step=0.01,
                                help="0 answers greedily (deterministic).")
        system = st.text_area("System Prompt", value=args.system or "", height=80)
        st.button("Clear Chat History", on_click=clear_history, width="stretch")
    sampling = SamplingArgs(max_new_tokens=args.max_new_tokens, max_length=max_length, temperature=temperature,
                            top_p=top_p)

    histories = st.session_state.setdefault("histories", {})
    columns = st.columns(len(panes)) if len(panes) > 1 else [st.container()]
    for (key, label, _, _), column in zip(panes, columns):
        with column:
            if len(panes) > 1:
                st.subheader(("Base: " if key == "base" else "Tuned: ") + label)
            for message in histories.get(key, []):
                with st.chat_message(message["role"]):
                    st.markdown(show(message["content"]))

    question = st.chat_input("Ask something")
    if not question:
        return
    for column in columns:
        with column:
            with st.chat_message("user"):
                st.markdown(question)
    start = [{"role": "system", "content": system}] if system.strip() else []
    for (key, _, _, _), column in zip(panes, columns):
        model, tokenizer = models[key]
        history = histories.get(key, []) + [{"role": "user", "content": question}]
        with column:
            with st.chat_message("assistant"):
                placeholder = st.empty()
                placeholder.markdown(CURSOR)
                text = ""
                with generation_lock(), closing(stream_chat(model, tokenizer, start + history, sampling)) as pieces:
                    for piece in pieces:  # a rerun or a closed tab raises here, which stops generation
                        text += piece
                        placeholder.markdown(text.lstrip() + CURSOR)
                text = text.strip()
                placeholder.markdown(show(text))
        histories[key] = history + [{"role": "assistant", "content": text}]


main(sys.argv[1:])
