"""The Streamlit chat demo: `selfcog web MODEL [--compare BASE]` runs this with `streamlit run`.

Chat history, answers streamed with a cursor, sidebar sliders (Max Length, Top P, Temperature), a Clear
Chat History button, each model loaded once per server (`st.cache_resource`), and a compare mode where the
base and the tuned model answer the same question side by side. The pane itself is selfcog/web/pane.py, shared
with `selfcog studio`.
"""

from __future__ import annotations

import argparse
import sys

import streamlit as st

from selfcog.errors import SelfcogError
from selfcog.web.pane import Pane, chat_panes, get_identities, get_model, sampling_controls


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="selfcog web")
    parser.add_argument("--model", required=True, help="The (tuned) model spec.")
    parser.add_argument("--compare", default=None, help="A base model spec answering side by side.")
    parser.add_argument("--adapter", action="append", default=[],
                        help="[NAME=]DIR: a LoRA adapter over --model; several NAME=DIR give an identity switch.")
    parser.add_argument("--system", default=None, help="Initial system prompt.")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--trust-remote-code", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    single = args.adapter[0] if len(args.adapter) == 1 and "=" not in args.adapter[0] else None
    named = [] if single else args.adapter
    specs = [("tuned", args.model + (f" + {single}" if single else ""), args.model, single)]
    if args.compare:
        specs.insert(0, ("base", args.compare, args.compare, None))

    st.set_page_config(page_title="selfcog chat", page_icon="💬", layout="wide" if args.compare else "centered")
    st.title("💬 selfcog chat")
    st.caption("compare mode: base (left) and tuned (right) answer the same question" if args.compare
               else f"model: {specs[0][1]}")

    panes = []
    try:
        for key, label, spec, adapter in specs:
            title = (("Base: " if key == "base" else "Tuned: ") + label) if args.compare else ""
            if key == "tuned" and named:
                model, tokenizer, identities = get_identities(spec, tuple(named), args.trust_remote_code)
                with st.sidebar:
                    chosen = st.selectbox("Identity", list(identities), index=len(identities) - 1,
                                          help="LoRA adapters over one base model; each keeps its own history.")
                title = f"Tuned: {chosen}" if args.compare else ""
                panes.append(Pane(f"tuned:{chosen}", title, model, tokenizer, identities[chosen]))
            else:
                panes.append(Pane(key, title, *get_model(spec, adapter, args.trust_remote_code)))
    except SelfcogError as exc:
        st.error(str(exc))
        st.stop()

    with st.sidebar:
        sampling, system = sampling_controls(panes, args.max_new_tokens, args.system)
    chat_panes(panes, sampling, system)


main(sys.argv[1:])
