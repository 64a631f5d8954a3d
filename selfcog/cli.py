"""The `selfcog` command: verbs mapped to stage functions, nothing else.

Commands whose stage needs torch import it inside the command (each such import marked `# torch`), so `selfcog
--help`, `selfcog data`, `selfcog config` and `selfcog train --dry-run` start without loading it."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from selfcog.atomic import write_text
from selfcog.config import (RunConfig, apply_overrides, dump_config, load_config, load_preset, preset_description,
                            preset_names)
from selfcog.data.check import check_data_report, load_checked
from selfcog.data.identity import Persona, dumps, identity_records, seed_records
from selfcog.errors import SelfcogError
from selfcog.studio import launch as launch_studio
from selfcog.web import launch as launch_web
from selfcog.xtuner import resolve_train_config

if TYPE_CHECKING:
    from selfcog.generate import SamplingArgs

DEFAULT_MODEL = "smollm2-135m"


class UserError(click.ClickException):
    """A SelfcogError shown as one line, exit status 2."""
    exit_code = 2

    def show(self, file=None):
        click.echo(f"selfcog: error: {self.format_message()}", err=True)


class StderrHandler(logging.StreamHandler):
    """Writes each progress line to the `sys.stderr` of the moment (click's test runner swaps it), so stdout stays
    clean for answers (`selfcog chat --message`)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):  # StreamHandler.__init__ assigns one; the property always reads sys.stderr
        pass


def show_progress() -> None:
    """selfcog's log lines, as written, on stderr (once per process)."""
    logger = logging.getLogger("selfcog")
    if not any(isinstance(h, StderrHandler) for h in logger.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # printed once, whatever the root logger does


class Cli(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SelfcogError as exc:
            raise UserError(str(exc)) from None


@click.group(cls=Cli)
@click.version_option(package_name="selfcog")
def main():
    """Give a small open chat model its own identity in minutes, keep what it knew, chat with it, serve it."""
    show_progress()


def sampling_options(f):
    f = click.option("--max-new-tokens", default=512, show_default=True, help="Most tokens in one answer.")(f)
    f = click.option("--max-length", default=4096, show_default=True, help="Most tokens of prompt plus answer.")(f)
    f = click.option("--temperature", default=0.7, show_default=True, help="0 means greedy.")(f)
    f = click.option("--top-p", default=0.9, show_default=True)(f)
    f = click.option("--top-k", default=0, show_default=True, help="0 disables.")(f)
    f = click.option("--repetition-penalty", default=1.0, show_default=True)(f)
    return f


def sampling_from(kwargs) -> SamplingArgs:
    from selfcog.generate import SamplingArgs  # torch

    args = SamplingArgs(**{k: kwargs.pop(k) for k in ("max_new_tokens", "max_length", "temperature", "top_p",
                                                      "top_k", "repetition_penalty")})
    if args.max_new_tokens < 1 or args.max_length < 2 or args.temperature < 0 or not 0 < args.top_p <= 1 \
            or args.top_k < 0 or args.repetition_penalty <= 0:
        raise SelfcogError("sampling options out of range (max-new-tokens>=1, temperature>=0, 0<top-p<=1, top-k>=0)")
    return args


@main.command()
@click.option("--name", default=None, help="Whose assistant the model becomes, e.g. 伍鲜同志 (required unless the "
              "config sets data.name).")
@click.option("--model", "model_spec", default=None, help=f"Base model spec [default: {DEFAULT_MODEL}].")
@click.option("--out", default=None, help="Output directory [default: out].")
@click.option("--assistant-name", default=None, help="The assistant's own name.")
@click.option("--model-desc", default=None, help="What the model is underneath, used in some answers.")
@click.option("--author", default=None, help="Who fine-tuned it (default: NAME).")
@click.option("--data", "data_file", default=None, help="Train on this dataset instead of generated identity data.")
@click.option("--config", "config_file", default=None, help="A selfcog YAML config to start from; the options "
              "above override it only when given, --set overrides both.")
@click.option("--set", "overrides", multiple=True, help="Override a setting: --set train.max_steps=40.")
@click.option("--trust-remote-code", is_flag=True, default=None, help="Allow a hub model's own code.")
def run(name, model_spec, out, assistant_name, model_desc, author, data_file, config_file, overrides,
        trust_remote_code):
    """Fetch -> data -> evaluate base -> train -> merge -> evaluate -> report, into OUT."""
    from selfcog.run import run as run_job  # torch

    config = load_config(Path(config_file)) if config_file else RunConfig()
    given = {"model.spec": model_spec, "model.trust_remote_code": trust_remote_code, "out": out,
             "data.name": name, "data.assistant_name": assistant_name, "data.model_desc": model_desc,
             "data.author": author, "data.data_file": data_file}
    for dotted, value in given.items():  # an option left out keeps the config's value (or the default)
        if value is not None:
            section, _, key = dotted.rpartition(".")
            setattr(getattr(config, section) if section else config, key, value)
    apply_overrides(config, list(overrides))
    if name is None and not config.data.name:
        raise SelfcogError("--name: missing (give --name NAME, data.name in --config, or --set data.name=NAME)")
    result = run_job(config)
    click.echo(f"merged model: {result / 'merged'}\nreport: {result / 'report.md'}")


@main.command()
@click.option("--name", required=True, help="Whose assistant the model becomes.")
@click.option("--assistant-name", default="", help="The assistant's own name.")
@click.option("--model-desc", default="", help="What the model is underneath.")
@click.option("--author", default="", help="Who fine-tuned it (default: NAME).")
@click.option("--system", default="", help="A system prompt stored with every record.")
@click.option("--repeat", default=0, help="Reproduce the seed tutorial: its two fixed pairs, each N times.")
@click.option("--out", required=True, help="Output JSON file (XTuner conversation format).")
def data(name, assistant_name, model_desc, author, system, repeat, out):
    """Write a bilingual (zh/en) identity dataset in XTuner `conversation` format."""
    persona = Persona(name, assistant_name, model_desc, author)
    if repeat < 0:
        raise SelfcogError("--repeat must be >= 0")
    records = seed_records(persona, repeat) if repeat else identity_records(persona, system)
    try:
        write_text(Path(out), dumps(records))
    except OSError as exc:
        raise SelfcogError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
    click.echo(f"wrote {len(records)} records to {out}")


@main.command()
@click.argument("model_spec", default=DEFAULT_MODEL)
@click.option("--message", "-m", default=None, help="Ask one question, print only the reply, and exit.")
@click.option("--system", default=None, help="System prompt.")
@click.option("--adapter", default=None, help="A LoRA adapter directory applied without merging.")
@click.option("--trust-remote-code", is_flag=True)
@sampling_options
def chat(model_spec, message, system, adapter, trust_remote_code, **kwargs):
    """Chat with MODEL (any spec, e.g. out/merged) in the terminal."""
    from selfcog.chat import chat as chat_loop  # torch

    sampling = sampling_from(kwargs)
    chat_loop(model_spec, message=message, system=system, sampling=sampling, adapter=adapter,
              trust_remote_code=trust_remote_code)


@main.command()
@click.argument("base")
@click.argument("adapter")
@click.argument("out")
@click.option("--max-shard-size", default="2GB", show_default=True)
@click.option("--dtype", default="fp32", show_default=True, help="bf16, fp16 or fp32.")
def merge(base, adapter, out, max_shard_size, dtype):
    """Merge ADAPTER into BASE and write a standard HF model directory OUT."""
    from selfcog.export import merge as merge_adapter  # torch

    click.echo(f"merged model: {merge_adapter(base, Path(adapter), Path(out), max_shard_size, dtype)}")


@main.command()
@click.argument("model_spec", default=DEFAULT_MODEL)
@click.option("--compare", "compare_spec", default=None, help="A base model answering side by side with MODEL.")
@click.option("--port", default=8501, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Listen address (loopback by default).")
@click.option("--adapter", multiple=True, metavar="[NAME=]DIR",
              help="A LoRA adapter applied to MODEL without merging; several NAME=DIR add an identity switch.")
@click.option("--system", default=None, help="Initial system prompt.")
@click.option("--max-new-tokens", default=512, show_default=True, help="Most tokens in one answer.")
@click.option("--trust-remote-code", is_flag=True)
def web(model_spec, compare_spec, port, host, adapter, system, max_new_tokens, trust_remote_code):
    """Chat with MODEL in the browser (Streamlit); --compare BASE shows both answers side by side."""
    sys.exit(launch_web(model_spec, port, host, compare_spec, adapter, system, max_new_tokens, trust_remote_code))


@main.command()
@click.option("--port", default=8501, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Listen address (loopback by default).")
@click.option("--home", default=None, help="Where run directories are kept [default: $SELFCOG_STUDIO_HOME, "
              "else $SELFCOG_HOME/studio].")
def studio(port, host, home):
    """The whole job in one local web page: set up, train in the background, compare, chat, download."""
    sys.exit(launch_studio(home, port, host))


@main.command()
@click.argument("model_spec", default=DEFAULT_MODEL)
@click.option("--host", default="127.0.0.1", show_default=True, help="Listen address (loopback by default).")
@click.option("--port", default=8000, show_default=True)
@click.option("--api-key", default=None, envvar="SELFCOG_API_KEY",
              help="Require 'Authorization: Bearer KEY' (or set SELFCOG_API_KEY).")
@click.option("--adapter", "adapters", multiple=True, metavar="[NAME=]DIR",
              help="A LoRA adapter served without merging; repeat for several identities over one base. NAME=DIR "
              "serves it as model NAME beside the bare base; a bare DIR answers as the base's own id.")
@click.option("--model-name", default=None, help="The model id clients use (default: MODEL_SPEC).")
@click.option("--no-batching", is_flag=True, help="Answer one request at a time instead of batching them.")
@click.option("--max-batch", default=32, show_default=True, help="Most requests decoded together.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="auto: bfloat16 on a CPU with native bf16 (AVX512-BF16, AMX) or a GPU, else float32.")
@click.option("--trim-history", is_flag=True, help="Drop the oldest turns of a conversation longer than the "
              "context instead of answering 400 context_length_exceeded.")
@click.option("--max-request-bytes", default=1 << 20, show_default=True, help="Larger request bodies get 413.")
@click.option("--no-auth", is_flag=True, help="Allow a non-loopback --host without an API key.")
@click.option("--trust-remote-code", is_flag=True)
@sampling_options
def serve(model_spec, host, port, api_key, adapters, model_name, no_batching, max_batch, dtype, trim_history,
          max_request_bytes, no_auth, trust_remote_code, **kwargs):
    """Serve MODEL as an OpenAI-compatible API; sampling options are defaults for requests that omit them."""
    from selfcog.serve import serve as run_server  # torch

    run_server(model_spec, host, port, api_key, adapters, model_name, sampling_from(kwargs), trust_remote_code,
               batching=not no_batching, max_batch=max_batch, dtype=dtype, trim_history=trim_history,
               no_auth=no_auth, max_body_bytes=max_request_bytes)


@main.command("export-gguf")
@click.argument("model_spec")
@click.argument("out")
@click.option("--type", "qtype", default="f16", show_default=True,
              help="f16, q8_0, q4_k_m or q5_k_m (the k-quants need llama-cpp-python: pip install 'selfcog[gguf]').")
@click.option("--verify/--no-verify", default=None,
              help="Check the file with transformers and in llama.cpp (default: llama.cpp when installed); "
                   "--no-verify checks nothing.")
@click.option("--name", default=None, help="The identity llama.cpp's answers must name (default: data.name of the "
                                           "model's selfcog.yaml).")
@click.option("--force", is_flag=True, help="Keep a file that fails the identity check in llama.cpp.")
@click.option("--trust-remote-code", is_flag=True)
def export_gguf(model_spec, out, qtype, verify, name, force, trust_remote_code):
    """Write MODEL as one GGUF file OUT (llama.cpp, Ollama) plus an Ollama Modelfile and OUT.report.json beside it."""
    from selfcog.gguf_export import export_gguf as export  # torch

    report = export(model_spec, Path(out), qtype, verify=verify, trust_remote_code=trust_remote_code, name=name,
                    force=force)
    if "max_abs_logit_diff" in report:
        click.echo(f"round trip: token ids identical on {report['texts']} texts; max |logit diff| "
                   f"{report['max_abs_logit_diff']:.4f} vs fp32 (largest logit {report['max_abs_logit']:.1f}), "
                   f"top-1 agreement {report['top1_agreement']:.0%}")
    check = report.get("llama_cpp")
    if check:
        identity = "" if check["identity"] is None else (
            f"identity {check['identity']:.2f} (source model {check['source_identity']:.2f}), ")
        agreement = "" if check["agreement"] is None else \
            f"answers equal to the source model's {check['agreement']:.0%}; "
        click.echo(f"llama.cpp: loaded in {check['load_seconds']:.2f} s; {identity}{agreement}"
                   f"identity check {report['identity_check']}")
    if report.get("identity_check", "").startswith("failed"):
        click.echo(f"warning: {out}: {report['identity_check']}", err=True)
    click.echo(f"gguf: {report['gguf']} ({report['size_bytes'] / 2**20:.1f} MiB)\nreport: {report['report']}\n"
               f"ollama: ollama create NAME -f {report['modelfile']}")


@main.command()
@click.argument("model_spec")
@click.argument("out_dir")
@click.option("--target", required=True, help="openxlab or hf-space.")
@click.option("--repo-id", default=None, help="Bundle no weights; the app downloads ORG/NAME when it starts.")
@click.option("--title", default=None, help="The app's title (default: the assistant's name).")
def deploy(model_spec, out_dir, target, repo_id, title):
    """Write an app folder (Streamlit chat) ready to upload to OpenXLab or a Hugging Face Space."""
    from selfcog.deploy import deploy as make_bundle  # torch

    click.echo(f"app bundle: {make_bundle(model_spec, Path(out_dir), target, repo_id, title)} (see its README.md)")


@main.command("check-data")
@click.argument("data_file", type=click.Path(path_type=Path))
@click.option("--model", "model_spec", default=DEFAULT_MODEL, show_default=True,
              help="Model whose tokenizer and chat template measure the samples.")
@click.option("--keep-duplicates", is_flag=True, help="Count token stats over every record, duplicates included.")
@click.option("--max-length", default=512, show_default=True, help="Report samples longer than this many tokens.")
@click.option("--trust-remote-code", is_flag=True)
def check_data(data_file, model_spec, keep_duplicates, max_length, trust_remote_code):
    """Validate DATA_FILE (XTuner conversation, OpenAI messages, alpaca, sharegpt), like `xtuner check-custom-dataset`."""
    from selfcog.models import load_tokenizer  # torch

    conversations = load_checked(data_file)  # a malformed file fails before any model is fetched
    tokenizer = load_tokenizer(model_spec, trust_remote_code=trust_remote_code)
    click.echo(check_data_report(data_file, conversations, tokenizer, model_spec, keep_duplicates, max_length))


@main.group("config")
def config_group():
    """Bundled presets: list them, copy one out as an editable YAML config."""


@config_group.command("list")
def config_list():
    """Show the bundled presets."""
    for name in preset_names():
        click.echo(f"{name:32} {preset_description(name)}")


@config_group.command("copy")
@click.argument("name")
@click.argument("directory", type=click.Path(path_type=Path))
def config_copy(name, directory):
    """Write preset NAME, every setting spelled out, to DIRECTORY/NAME.yaml."""
    text = dump_config(load_preset(name), f"{name}: {preset_description(name)}")
    target = Path(directory) / f"{name}.yaml"
    try:
        write_text(target, text)
    except OSError as exc:
        raise SelfcogError(f"{target}: cannot write ({exc.strerror or exc})") from None
    click.echo(f"wrote {target}")


@main.command()
@click.argument("config_source", metavar="CONFIG")
@click.option("--dry-run", is_flag=True, help="Print the resolved selfcog config as YAML and exit.")
@click.option("--work-dir", default=None, help="Checkpoints, logs, sample chats and the adapter (default "
              "work_dirs/CONFIG_NAME).")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in the work dir.")
@click.option("--set", "overrides", multiple=True, help="Override a setting: --set train.epochs=1.")
@click.option("--verbose", "-v", is_flag=True, help="List every XTuner setting without a selfcog meaning, one a line.")
@click.option("--identity", "identity_name", default=None, metavar="NAME",
              help="Identity data: train like `selfcog run --data FILE --name NAME` (preservation, held-out "
                   "scores, early stop, merge) into the work dir instead of plain SFT.")
def train(config_source, dry_run, work_dir, resume, overrides, verbose, identity_name):
    """Train a LoRA adapter from CONFIG: a selfcog YAML, an XTuner Python config, or a preset name.

    Data-parallel on N GPUs or CPU processes: torchrun --nproc-per-node N -m selfcog train CONFIG
    """
    if identity_name is not None and resume:
        raise SelfcogError("--identity: trains from the start (no --resume)")
    config = apply_overrides(resolve_train_config(config_source, verbose), list(overrides))
    if dry_run:
        click.echo(dump_config(config), nl=False)
        return
    from selfcog.distributed import is_main_process  # torch
    from selfcog.recipes.sft import train_from_config, train_identity  # torch

    work = Path(work_dir) if work_dir else Path("work_dirs") / Path(config_source).stem
    if identity_name is not None:
        click.echo(f"adapter: {train_identity(config, work, identity_name)}")
        return
    adapter = train_from_config(config, work, resume=resume)
    if is_main_process():
        click.echo(f"adapter: {adapter}")


if __name__ == "__main__":
    sys.exit(main())
