"""The chat pane shared by `selfcog web` (app.py) and `selfcog studio`: sampling controls, one or two models
answering side by side with streamed answers, each model loaded once per server."""

from __future__ import annotations

import threading
from contextlib import closing
from dataclasses import dataclass

import streamlit as st

from selfcog.chat import load_chat_model, load_identities, parse_adapters
from selfcog.generate import SamplingArgs, context_limit, stream_chat

CURSOR = "▌"
EMPTY = "_(no answer)_"


@dataclass
class Pane:
    key: str
    """Names the pane's chat history; `base` and `tuned` in compare mode."""
    title: str
    """Shown above the pane when there is more than one; empty shows none."""
    model: object
    tokenizer: object
    adapter: str | None = None
    """The PEFT adapter that answers, in a model holding several (`get_identities`)."""


@st.cache_resource(show_spinner="Loading the model (once) ...")
def get_model(spec: str, adapter: str | None, trust_remote_code: bool):
    return load_chat_model(spec, adapter, trust_remote_code)


@st.cache_resource(show_spinner="Loading the model and its adapters (once) ...")
def get_identities(spec: str, adapters: tuple[str, ...], trust_remote_code: bool):
    """`(model, tokenizer, {identity: adapter})` for `--adapter NAME=DIR` values over one base model."""
    return load_identities(spec, parse_adapters(adapters, "base"), "base", trust_remote_code)


@st.cache_resource
def generation_lock() -> threading.Lock:
    """One generation at a time across all browser sessions: the models are shared."""
    return threading.Lock()


def show(text: str) -> str:
    return text if text.strip() else EMPTY


def sampling_controls(panes: list[Pane], max_new_tokens: int, system: str | None = None,
                      state_key: str = "histories") -> tuple[SamplingArgs, str]:
    """Max Length, Top P, Temperature, System Prompt and Clear Chat History in the current container."""
    longest = min((context_limit(p.model) or 8192) for p in panes)
    max_length = st.slider("Max Length", min_value=32, max_value=max(longest, 64), value=min(2048, max(longest, 64)),
                           step=32, key=f"{state_key}-max-length")
    top_p = st.slider("Top P", min_value=0.01, max_value=1.0, value=0.8, step=0.01, key=f"{state_key}-top-p")
    temperature = st.slider("Temperature", min_value=0.0, max_value=1.5, value=0.6, step=0.01,
                            help="0 answers greedily (deterministic).", key=f"{state_key}-temperature")
    system = st.text_area("System Prompt", value=system or "", height=80, key=f"{state_key}-system")
    st.button("Clear Chat History", on_click=st.session_state.pop, args=(state_key, None), width="stretch",
              key=f"{state_key}-clear")
    return SamplingArgs(max_new_tokens=max_new_tokens, max_length=max_length, temperature=temperature,
                        top_p=top_p), system


def chat_panes(panes: list[Pane], sampling: SamplingArgs, system: str = "", state_key: str = "histories") -> None:
    """Each pane's history (side by side when there are several), one chat input, and every pane's answer to it
    streamed with a cursor; histories live in `st.session_state[state_key]`."""
    histories = st.session_state.setdefault(state_key, {})
    columns = st.columns(len(panes)) if len(panes) > 1 else [st.container()]
    for pane, column in zip(panes, columns):
        with column:
            if pane.title:
                st.subheader(pane.title)
            for message in histories.get(pane.key, []):
                with st.chat_message(message["role"]):
                    st.markdown(show(message["content"]))

    question = st.chat_input("Ask something", key=f"{state_key}-input")
    if not question:
        return
    for column in columns:
        with column:
            with st.chat_message("user"):
                st.markdown(question)
    start = [{"role": "system", "content": system}] if system.strip() else []
    for pane, column in zip(panes, columns):
        history = histories.get(pane.key, []) + [{"role": "user", "content": question}]
        with column:
            with st.chat_message("assistant"):
                placeholder = st.empty()
                placeholder.markdown(CURSOR)
                text = ""
                with generation_lock(), closing(stream_chat(pane.model, pane.tokenizer, start + history,
                                                            sampling, adapter=pane.adapter)) as pieces:
                    for piece in pieces:  # a rerun or a closed tab raises here, which stops generation
                        text += piece
                        placeholder.markdown(text.lstrip() + CURSOR)
                text = text.strip()
                placeholder.markdown(show(text))
        histories[pane.key] = history + [{"role": "assistant", "content": text}]
