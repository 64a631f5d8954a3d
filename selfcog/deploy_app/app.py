"""A Streamlit chat app for one model: history, streamed answers, sampling controls.

Self-contained: it needs only torch, transformers and streamlit, and selfcog_streaming.py next to it (selfcog's
own streaming decoder, copied unchanged). Run it with `streamlit run app.py`. `selfcog deploy` wrote the two
settings below.
"""

from pathlib import Path
from types import SimpleNamespace

import streamlit as st
import torch
from selfcog_streaming import stream_ids
from transformers import AutoModelForCausalLM, AutoTokenizer

TITLE = "selfcog chat"
# A folder next to this file holding the model, or a Hugging Face repo id downloaded at start.
MODEL_SOURCE = "model"
# On OpenXLab, a model kept in its model center can be fetched first instead:
#     from openxlab.model import download
#     download(model_repo="ORG/NAME", output="model")   # then MODEL_SOURCE = "model"


def model_location() -> str:
    bundled = Path(__file__).resolve().parent / MODEL_SOURCE
    return str(bundled) if bundled.is_dir() else MODEL_SOURCE


@st.cache_resource
def load_model():
    """Loaded once per server process and shared by every session."""
    source = model_location()
    tokenizer = AutoTokenizer.from_pretrained(source)
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16 if cuda else torch.float32)
    model = model.to("cuda" if cuda else "cpu").eval()
    return model, tokenizer


def stream_answer(model, tokenizer, messages, max_length, top_p, temperature):
    """Yield the answer's text piece by piece (whole characters), generated in this thread."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template holds BOS and the like as text
    room = max_length - len(ids)
    if room < 1:
        yield "The conversation is longer than Max Length: raise it or clear the chat history."
        return
    sampling = SimpleNamespace(temperature=temperature, top_p=max(top_p, 0.01), top_k=0, repetition_penalty=1.0)
    yield from stream_ids(model, tokenizer, ids, sampling, room)


def main():
    st.set_page_config(page_title=TITLE)
    st.title(TITLE)
    with st.sidebar:
        max_length = st.slider("Max Length", min_value=8, max_value=8192, value=2048, step=1)
        top_p = st.slider("Top P", 0.0, 1.0, 0.8, step=0.01)
        temperature = st.slider("Temperature", 0.0, 1.0, 0.7, step=0.01)
        if st.button("Clear Chat History"):
            st.session_state.messages = []
    model, tokenizer = load_model()
    st.session_state.setdefault("messages", [])
    for message in st.session_state.messages:
        with st.chat_message(message["role"]):
            st.markdown(message["content"])
    if prompt := st.chat_input("What is up?"):
        with st.chat_message("user"):
            st.markdown(prompt)
        st.session_state.messages.append({"role": "user", "content": prompt})
        with st.chat_message("assistant"):
            answer = st.write_stream(stream_answer(model, tokenizer, st.session_state.messages, max_length,
                                                   top_p, temperature))
        st.session_state.messages.append({"role": "assistant", "content": str(answer).strip()})


main()
