"""A Streamlit chat app for one model: history, streamed answers, sampling controls.

Self-contained: it needs only torch, transformers and streamlit. Run it with
`streamlit run app.py`. `selfcog deploy` wrote the two settings below.
"""

import threading
from pathlib import Path

import streamlit as st
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

TITLE = "selfcog chat"
# A folder next to this file holding the model, or a Hugging Face repo id downloaded at start.
MODEL_SOURCE = "model"
# On OpenXLab, a model kept in its model center can be fetched first instead:
#     from openxlab.model import download
#     download(model_repo="ORG/NAME", output="model")   # then MODEL_SOURCE = "model"
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


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


def stop_ids(tokenizer) -> list[int]:
    """EOS plus the chat template's end-of-turn token: the answer ends at whichever comes first."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    return ids + [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab and vocab[t] not in ids]


def stream_answer(model, tokenizer, messages, max_length, top_p, temperature):
    """Yield the answer's text piece by piece while `generate` runs in a thread."""
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                              return_dict=True)["input_ids"].to(model.device)
    room = max_length - input_ids.shape[1]
    if room < 1:
        yield "The conversation is longer than Max Length: raise it or clear the chat history."
        return
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"do_sample": True, "top_p": max(top_p, 0.01), "temperature": temperature} if temperature > 0 \
        else {"do_sample": False}
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=room,
                  eos_token_id=stop_ids(tokenizer), pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                  streamer=streamer, **sampling)
    thread = threading.Thread(target=model.generate, kwargs=kwargs, daemon=True)
    thread.start()
    yield from streamer
    thread.join()


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
