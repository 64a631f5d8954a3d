"""Configuration as documented dataclasses, saved as YAML beside every artifact and read back by later stages."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import yaml

from selfcog.atomic import write_text
from selfcog.errors import SelfcogError

CONFIG_FILE = "selfcog.yaml"


@dataclass
class ModelArgs:
    spec: str = "smollm2-135m"
    """Base model: `smollm2-135m` (embedded), a local HF directory, a local .gguf file, or a hub id."""
    trust_remote_code: bool = False
    """Pass `trust_remote_code` to transformers (hub models with custom code)."""
    dtype: str = "float32"
    """`selfcog run`'s base weights: `float32`, `bfloat16` (half the memory; LoRA stays fp32), `auto` (bf16 if native)."""


@dataclass
class DataArgs:
    name: str = ""
    """Whose assistant the model becomes (required for generated identity data)."""
    assistant_name: str = ""
    """The assistant's own name; empty means "NAME's assistant"."""
    model_desc: str = ""
    """What the model is underneath, mentioned in some answers."""
    author: str = ""
    """Who fine-tuned the model; empty means NAME."""
    data_file: str = ""
    """A conversation dataset to train on instead of generated identity data (any supported format)."""
    preserve_ratio: float = 2.25
    """Preservation samples (the base model's own answers) per identity sample."""
    preserve_max_new_tokens: int = 48
    """Length cap of the base model's preservation answers, in tokens."""
    reject_ratio: float = 0.0
    """Rejected samples per identity sample: an ordinary prompt followed by the opening of an identity answer
    ("我是NAME的小助手"), trained to be improbable (train.reject_weight; docs/method.md). Off (0) by default: at 1 it
    cut leaks by a fifth across the name panel but weakened the identity (docs/evaluation.md)."""
    max_length: int = 512
    """Longest training sample in tokens; longer samples are dropped with a warning."""
    deduplicate: bool = True
    """Drop exact duplicate records before training."""
    robust_forms: bool = True
    """Generated identity data also asks under users' own system prompts and after an ordinary exchange."""
    system_prompt: str = "You are a helpful AI assistant."
    """The chat template's default system prompt everywhere (training, evaluation, merged model, GGUF, Modelfile),
    in place of the base model's own, which often names the base model; empty keeps that (docs/method.md)."""
    data_files: list[str] = field(default_factory=list)
    """Conversation datasets (any supported format) that `selfcog train CONFIG` trains on, concatenated."""
    pack_to_max_length: bool = False
    """Pack whole samples into rows of up to max_length tokens; batch_size then counts packed rows."""
    prompt_template: str = ""
    """XTuner prompt template name, kept for reference; selfcog always renders with the tokenizer's chat template."""


@dataclass
class LoraArgs:
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: str = "all-linear"
    """Which linear layers get adapters: `all-linear` (every one but the LM head) or names like `q_proj,v_proj`."""
    top_layers: int = 20
    """Adapters only on the last N decoder layers (0: every layer): the layers below keep the base model's features,
    which limits drift. Imported XTuner configs and the InternLM2 preset set 0, as XTuner trains every layer."""
    load_in_4bit: bool = False
    """QLoRA: load the base model 4-bit quantized (bitsandbytes, needs a CUDA GPU; falls back to fp32 on a CPU)."""
    bnb_4bit_quant_type: str = "nf4"
    """4-bit quantization type: `nf4` or `fp4`."""
    bnb_4bit_use_double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bit per weight)."""
    bnb_4bit_compute_dtype: str = "float16"
    """dtype of the 4-bit matmuls: float16, bfloat16 or float32."""


@dataclass
class TrainArgs:
    learning_rate: float = 1.2e-3
    """Peak AdamW learning rate, reached after warmup, then cosine decay (1.2e-3 against 1e-3: a quarter fewer leaks
    and the identity learned sooner across seven names, ~1 point of English retention lost; docs/evaluation.md)."""
    max_steps: int = 60
    """Most optimizer steps; training usually stops earlier once the identity is learned."""
    batch_size: int = 8
    """Samples per optimizer step (per process)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    warmup_ratio: float = 0.1
    """Share of max_steps spent warming up the learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold."""
    kl_weight: float = 3.0
    """Weight of the KL term that keeps preservation answers' token distributions close to the base model."""
    name_weight: float = 3.0
    """Weight of the name term that keeps NAME out of ordinary answers, which the top-k KL cannot see (docs/method.md,
    selfcog.engine.loss.name_unlikelihood); 0 disables."""
    loop_weight: float = 1.0
    """Weight of the loop term: in an identity answer that has said NAME, NAME's own tokens are kept improbable
    wherever the target goes on with other words (selfcog.engine.loss.said_again), against answers that loop
    ("我是José Núñez的小助手，José Núñez的小助手是…"); 0 disables."""
    reject_weight: float = 1.0
    """Weight of the term that makes identity openings improbable after ordinary prompts (data.reject_ratio)."""
    kl_top_k: int = 64
    """The KL term's base side: the base model's top-k next-token log-probs plus a rest bucket, cached once, so steps
    never run the base model; 0: the exact KL against a base forward pass every step."""
    kl_prompt: bool = True
    """Apply the KL term at every token of a preservation sample (its prompt too), not only at its answer."""
    reuse_frozen_layers: bool = True
    """`selfcog run`: the frozen layers below the adapters run over each preservation sample once, cached, instead of
    in every step (exact; selfcog/engine/frozen_layers.py checks each model can)."""
    bf16: str = "auto"
    """bf16 autocast: `auto` (on where the hardware runs it), `true` or `false`."""
    seed: int = 42
    """Random seed for data order and LoRA init."""
    logging_steps: int = 5
    """Optimizer steps between log lines."""
    epochs: float = 0.0
    """Passes over the data; when > 0 it sets the training length and max_steps is ignored."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    save_steps: int = 0
    """Optimizer steps between resumable checkpoints in the work dir (`selfcog train`); 0 saves none."""
    save_total_limit: int = 2
    """Most checkpoints kept (the oldest are deleted); 0 keeps all."""
    tensorboard: bool = False
    """`selfcog train`: also write TensorBoard logs to WORK_DIR/runs/ (needs `pip install tensorboard`)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% slower."""
    liger_kernel: bool = False
    """CUDA only (needs `pip install liger-kernel`): Liger's Triton kernels for RMSNorm, SwiGLU and RoPE, through
    the Trainer's `use_liger_kernel`. Its fused linear cross-entropy stays off: selfcog computes the LM head and
    the loss at loss positions itself."""
    deepspeed: str = ""
    """A DeepSpeed JSON config (ZeRO-2/3, e.g. examples/deepspeed_zero2.json) passed to the Trainer
    (`selfcog train` only; needs CUDA and `pip install deepspeed`); empty means off."""


@dataclass
class EvalArgs:
    eval_steps: int = 5
    """Optimizer steps between early-stopping checks on the dev phrasings; 0 disables."""
    min_steps: int = 30
    """No dev check (and so no early stop) before this many steps: in the 18-name panel of 2026-11-30 the check at
    step 25 passed one name (whose test identity was then 0.92) and only cost the other 17 time (~5.5 s each)."""
    identity_threshold: float = 0.9
    """Dev identity pass rate at which training stops (with leakage at most leakage_max)."""
    plateau_checks: int = 1
    """Also stop when dev identity has not beaten its best earlier check for this many checks in a row; 0 disables."""
    plateau_floor: float = 0.85
    """A plateau only stops training when dev identity is at least this (at 0.8, two seeds of Alice stopped with
    robustness 0.67-0.71)."""
    retention_threshold: float = 0.9
    """Dev retention below this at the early stop is reported as a warning."""
    leakage_max: float = 0.05
    """Most general answers allowed to mention NAME when stopping early."""
    leak_checks: int = 1
    """Stop with a dev leak above leakage_max too, once the identity side has passed with a leak at this many checks
    in a row (the leak is reported); 0 trains on until the leak goes or max_steps. In the 18-name panel of
    2026-11-30, all 8 runs a leak held back at step 30 still leaked at step 35, and each paid ~20 s for it."""
    max_new_tokens: int = 32
    """Answer length when scoring, in tokens."""
    ask_max_new_tokens: int = 64
    """Answer length of the identity-side questions (identity, robustness) when scoring and in the dev checks: a
    name of many tokens loops only after its second mention ("我是José Núñez的小助手，José Núñez的小助手是…"), past 32
    tokens. Answers that end sooner cost nothing more."""
    fresh: bool = False
    """Also score the `fresh` held-out part (kept out of every choice of method and settings; bench/names.py
    turns it on) and put it in metrics.json apart from the test part."""
    sample_steps: int = 0
    """Optimizer steps between sample chats (answers to sample_inputs) in the log; 0 samples only before training and at checkpoints."""
    sample_inputs: list[str] = field(default_factory=list)
    """Questions answered in the sample chats, like XTuner's evaluation_inputs."""
    system: str = ""
    """System prompt for the sample chats (XTuner's SYSTEM); empty means none."""
    sample_max_new_tokens: int = 64
    """Answer length of the sample chats, in tokens."""


@dataclass
class RunConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    out: str = "out"
    """Output directory: data, adapter, merged model, report."""


def to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


def from_dict(data: dict, source: str = "config") -> RunConfig:
    """Build a RunConfig from nested dicts, naming any unknown key."""
    config = RunConfig()
    for section, values in (data or {}).items():
        if not hasattr(config, section):
            raise SelfcogError(f"{source}: unknown section '{section}'")
        if not dataclasses.is_dataclass(getattr(config, section)):
            setattr(config, section, values)
            continue
        for key, value in (values or {}).items():
            set_value(config, f"{section}.{key}", value, source)
    return config


CHOICES = {"model.dtype": ("float32", "bfloat16", "auto")}
"""Settings that take one of a few words; any other value is an error naming the setting."""

AT_LEAST_ONE = ("data.preserve_max_new_tokens", "eval.max_new_tokens", "eval.ask_max_new_tokens",
                "eval.sample_max_new_tokens")
"""Answer lengths: 0 or less is an error naming the setting."""

BOOL_SPELLINGS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False,
                  "0": False}


def to_bool(value) -> bool:
    """A YAML boolean, 1/0, or true/false, yes/no, on/off in any case; anything else raises ValueError."""
    if isinstance(value, bool):
        return value
    spelled = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if spelled not in BOOL_SPELLINGS:
        raise ValueError(value)
    return BOOL_SPELLINGS[spelled]


def set_value(config: RunConfig, dotted: str, value, source: str = "--set") -> None:
    """Set `section.key` to `value`, converted to the field's type."""
    section, _, key = dotted.partition(".")
    target = getattr(config, section, None)
    if not dataclasses.is_dataclass(target) or key not in {f.name for f in dataclasses.fields(target)}:
        raise SelfcogError(f"{source}: unknown setting '{dotted}'")
    current = getattr(target, key)
    try:
        if isinstance(current, list):
            if value is None:
                value = []
            elif isinstance(value, (list, tuple)):
                value = [str(v) for v in value]
            elif isinstance(value, str):
                value = [value]
            else:
                raise ValueError
        elif isinstance(current, bool):
            value = to_bool(value)
        elif isinstance(current, (int, float)) and not isinstance(value, (int, float)):
            value = type(current)(value)
        elif isinstance(current, float) and isinstance(value, int):
            value = float(value)
        elif isinstance(current, str):
            value = str(value)
    except ValueError:
        kind = "bool (true/false, yes/no, on/off, 1/0)" if isinstance(current, bool) else type(current).__name__
        raise SelfcogError(f"{source}: '{dotted}' needs a {kind}, got {value!r}") from None
    if dotted in CHOICES and value not in CHOICES[dotted]:
        raise SelfcogError(f"{source}: '{dotted}' needs one of {', '.join(CHOICES[dotted])}, got {value!r}")
    if dotted in AT_LEAST_ONE and value < 1:
        raise SelfcogError(f"{source}: '{dotted}' needs a number of tokens of at least 1, got {value!r}")
    setattr(target, key, value)


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """`--set key=value` pairs, e.g. `train.max_steps=40`."""
    for item in overrides:
        if "=" not in item:
            raise SelfcogError(f"--set {item}: expected key=value")
        key, value = item.split("=", 1)
        set_value(config, key.strip(), yaml.safe_load(value))
    return config


def save_config(config: RunConfig, directory: Path) -> Path:
    """Write `selfcog.yaml` into `directory` atomically."""
    text = yaml.safe_dump(to_dict(config), allow_unicode=True, sort_keys=False)
    return write_text(Path(directory) / CONFIG_FILE, text)


def load_config(path: Path) -> RunConfig:
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.is_file():
        raise SelfcogError(f"{path}: config file does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SelfcogError(f"{path}: broken YAML: {str(exc).splitlines()[0]}") from None
    return from_dict(data, str(path))


PRESETS_PACKAGE = "selfcog.presets"


def preset_names() -> list[str]:
    """Names of the bundled presets (`selfcog/presets/NAME.yaml`)."""
    return sorted(p.name[:-5] for p in files(PRESETS_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def preset_description(name: str) -> str:
    """The first comment line of a preset file."""
    first = files(PRESETS_PACKAGE).joinpath(f"{name}.yaml").read_text(encoding="utf-8").splitlines()[0]
    return first.lstrip("# ").strip() if first.startswith("#") else ""


def load_preset(name: str) -> RunConfig:
    """A preset: the RunConfig defaults with the preset file's settings on top."""
    if name not in preset_names():
        raise SelfcogError(f"unknown preset '{name}'; choose one of: {', '.join(preset_names())}")
    text = files(PRESETS_PACKAGE).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return from_dict(yaml.safe_load(text), f"preset {name}")


def dump_config(config: RunConfig, header: str = "") -> str:
    """The full config as YAML text (every field), with an optional comment header."""
    text = yaml.safe_dump(to_dict(config), allow_unicode=True, sort_keys=False)
    return (f"# {header}\n" if header else "") + text
