"""Read an XTuner Python config into a RunConfig without executing it or importing xtuner/mmengine.

The file is parsed with `ast`; only module-level assignments are evaluated, and only literals, names,
simple arithmetic/comparisons, `dict(...)` calls, attribute access on imported names (kept as symbols,
e.g. `PROMPT_TEMPLATE.internlm2_chat`) and `x if cond else y`. Anything else becomes an `Unknown` value.
Settings are read from the structures XTuner itself uses (`model.llm`, `model.lora`, `train_dataloader`,
`optim_wrapper`, `param_scheduler`, `train_cfg`, `default_hooks`, `custom_hooks`, `randomness`), falling
back to the usual top-level names, so renamed variables carry over too. Every setting without a selfcog
meaning is reported by name in `warnings`; `ImportReport` sorts them into settings that need no action (one summary
line) and those that change what is trained or need the user (one line each).
"""

from __future__ import annotations

import ast
import logging
import operator
from dataclasses import dataclass, field
from pathlib import Path

from selfcog.config import RunConfig, load_config, load_preset, preset_names, set_value
from selfcog.errors import SelfcogError

logger = logging.getLogger(__name__)

# xtuner.utils.SYSTEM_TEMPLATE values used as `SYSTEM` in the stock configs.
SYSTEM_TEMPLATES = {
    "alpaca": ("Below is an instruction that describes a task. "
               "Write a response that appropriately completes the request.\n"),
    "arxiv_gentile": ("If you are an expert in writing papers, please generate a good paper title for this "
                      "paper based on other authors' descriptions of their abstracts.\n"),
}
# Top-level names whose setting selfcog knowingly does not use, with why.
IGNORED = {
    "sequence_parallel_size": "selfcog has no sequence parallelism; torchrun trains data-parallel",
    "dataloader_num_workers": "selfcog tokenizes up front and loads in the main process",
    "use_varlen_attn": "selfcog always packs with per-sample position ids (varlen-style attention)",
    "optim_type": "selfcog always uses AdamW",
    "sampler": "selfcog shuffles with the Trainer's seeded sampler",
    "visualizer": "selfcog logs to log.jsonl",
    "log_processor": "selfcog logs per optimizer step",
    "log_level": "selfcog logs progress to stderr",
    "env_cfg": "selfcog picks the distributed backend itself (NCCL on GPUs, gloo on CPUs, under torchrun)",
    "deepspeed": "set train.deepspeed to a DeepSpeed JSON file (xtuner takes --deepspeed on its command line)",
    "load_from": "use `selfcog train --resume` to continue from a checkpoint",
    "resume": "use `selfcog train --resume`",
    "model_max_length": "max_length sets the sample length",
}
BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
          ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not}


@dataclass(frozen=True)
class Sym:
    """A reference to something imported (a class, function, template), kept by dotted name."""
    name: str

    @property
    def last(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Unknown:
    """An expression this reader does not evaluate."""
    source: str


@dataclass
class XtunerConfig:
    names: dict = field(default_factory=dict)
    """Top-level name -> evaluated value."""
    deps: dict = field(default_factory=dict)
    """Top-level name -> top-level names its value was computed from."""
    imports: set = field(default_factory=set)
    skipped: list = field(default_factory=list)
    """Statements not evaluated (defs, loops, bare calls), as `line N: source`."""


class Evaluator:
    def __init__(self, source: str, path: str):
        self.source, self.path = source, path
        self.cfg = XtunerConfig()

    def fail(self, node, why: str):
        raise _Unsupported(ast.get_source_segment(self.source, node) or why)

    def run(self) -> XtunerConfig:
        try:
            tree = ast.parse(self.source, filename=self.path)
        except SyntaxError as exc:
            raise SelfcogError(f"{self.path}: line {exc.lineno}: Python syntax error: {exc.msg}") from None
        self.block(tree.body)
        return self.cfg

    def block(self, body):
        for node in body:
            self.statement(node)

    def statement(self, node):
        names = self.cfg.names
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.asname or alias.name.split(".")[0]
                names[name] = Sym(alias.name if alias.asname else name)
                self.cfg.imports.add(name)
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                name = alias.asname or alias.name
                names[name] = Sym(alias.name)
                self.cfg.imports.add(name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if node.value is None:
                return
            value = self.value(node.value)
            for target in targets:
                if isinstance(target, ast.Name):
                    names[target.id] = value
                    self.cfg.deps[target.id] = self.refs(node.value)
        elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
            old = names.get(name, Unknown(name))
            right = self.value(node.value)
            op = BINOPS.get(type(node.op))
            try:
                names[name] = op(old, right) if op and not isinstance(old, (Unknown, Sym)) \
                    and not isinstance(right, (Unknown, Sym)) else Unknown(ast.get_source_segment(self.source, node))
            except Exception:  # noqa: BLE001 - e.g. a type mismatch in the user's arithmetic
                names[name] = Unknown(ast.get_source_segment(self.source, node))
            self.cfg.deps[name] = self.cfg.deps.get(name, set()) | self.refs(node.value)
        elif isinstance(node, ast.If):
            test = self.value(node.test)
            if isinstance(test, (Unknown, Sym)):
                return
            self.block(node.body if test else node.orelse)
        elif not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            # Everything else (defs, loops, calls) is skipped: nothing in it is executed.
            first = ((ast.get_source_segment(self.source, node) or "").splitlines() or [""])[0][:60]
            self.cfg.skipped.append(f"line {node.lineno}: {first}")

    def refs(self, node) -> set:
        return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id not in self.cfg.imports}

    def value(self, node):
        try:
            return self.eval(node)
        except _Unsupported as exc:
            return Unknown(str(exc))

    def eval(self, node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in self.cfg.names:
                return self.cfg.names[node.id]
            if node.id in ("None", "True", "False"):
                return {"None": None, "True": True, "False": False}[node.id]
            return Unknown(node.id)
        if isinstance(node, ast.Attribute):
            base = self.eval(node.value)
            if isinstance(base, Sym):
                return Sym(f"{base.name}.{node.attr}")
            self.fail(node, "attribute")
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            items = [self.eval(e) for e in node.elts]
            return tuple(items) if isinstance(node, ast.Tuple) else items
        if isinstance(node, ast.Dict):
            if any(k is None for k in node.keys):
                self.fail(node, "dict unpacking")
            return {self.eval(k): self.eval(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, ast.Call):
            func = self.eval(node.func)
            if isinstance(func, Sym) and func.name == "dict" or (isinstance(node.func, ast.Name)
                                                                  and node.func.id == "dict"):
                if node.args or any(k.arg is None for k in node.keywords):
                    self.fail(node, "dict(...) with positional arguments")
                return {k.arg: self.eval(k.value) for k in node.keywords}
            self.fail(node, "call")
        if isinstance(node, ast.BinOp) and type(node.op) in BINOPS:
            left, right = self.eval(node.left), self.eval(node.right)
            if isinstance(left, (Unknown, Sym)) or isinstance(right, (Unknown, Sym)):
                self.fail(node, "arithmetic on an unknown value")
            try:
                return BINOPS[type(node.op)](left, right)
            except Exception:  # noqa: BLE001
                self.fail(node, "arithmetic")
        if isinstance(node, ast.UnaryOp):
            operand = self.eval(node.operand)
            if isinstance(node.op, ast.Not):
                return not operand
            if isinstance(node.op, ast.USub) and isinstance(operand, (int, float)):
                return -operand
            if isinstance(node.op, ast.UAdd) and isinstance(operand, (int, float)):
                return operand
            self.fail(node, "unary")
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in CMPOPS:
            left, right = self.eval(node.left), self.eval(node.comparators[0])
            if isinstance(left, (Unknown, Sym)) or isinstance(right, (Unknown, Sym)):
                self.fail(node, "comparison on an unknown value")
            return CMPOPS[type(node.ops[0])](left, right)
        if isinstance(node, ast.BoolOp):
            values = [self.eval(v) for v in node.values]
            if isinstance(node.op, ast.And):
                return all(values)
            return any(values)
        if isinstance(node, ast.IfExp):
            test = self.eval(node.test)
            if isinstance(test, (Unknown, Sym)):
                self.fail(node, "condition on an unknown value")
            return self.eval(node.body if test else node.orelse)
        if isinstance(node, ast.JoinedStr):
            self.fail(node, "f-string")
        self.fail(node, type(node).__name__)


class _Unsupported(Exception):
    pass


def parse_xtuner(path: Path) -> XtunerConfig:
    """Evaluate the literal parts of an XTuner config file (nothing is executed or imported)."""
    path = Path(path)
    if not path.is_file():
        raise SelfcogError(f"{path}: config file does not exist")
    return Evaluator(path.read_text(encoding="utf-8"), str(path)).run()


def is_xtuner_config(path: Path) -> bool:
    return Path(path).suffix == ".py"


def type_name(value) -> str:
    t = value.get("type") if isinstance(value, dict) else None
    return t.last if isinstance(t, Sym) else str(t or "")


def show(value) -> str:
    if isinstance(value, Sym):
        return value.name
    if isinstance(value, Unknown):
        return f"<{value.source}>"
    if isinstance(value, dict):
        return "dict(" + ", ".join(f"{k}={show(v)}" for k, v in value.items()) + ")"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return repr(value)


@dataclass
class ImportReport:
    """What an XTuner config import could not carry over, sorted by whether it matters."""
    changes: list = field(default_factory=list)
    """Lines for settings that change what is trained, or that need the user (unreadable values, hub data)."""
    ignored: list = field(default_factory=list)
    """(name, line) for settings that need no action: selfcog does the same thing its own way, or not at all."""

    def lines(self, verbose: bool = False) -> list[str]:
        """One line each for `changes`, then the ignored ones: listed one by one when `verbose`, else one line."""
        out = list(self.changes)
        if verbose:
            out += [line for _, line in self.ignored]
        elif self.ignored:
            names = list(dict.fromkeys(name for name, _ in self.ignored))
            out.append(f"xtuner: {len(names)} settings without a selfcog meaning: {', '.join(names)}; "
                       "`--dry-run -v` lists them")
        return out


def to_run_config(cfg: XtunerConfig, source: str = "config") -> tuple[RunConfig, list[str]]:
    """Map an evaluated XTuner config onto a RunConfig; returns (config, warnings naming every ignored setting)."""
    config, report = to_run_config_report(cfg, source)
    return config, report_warnings(report)


def to_run_config_report(cfg: XtunerConfig, source: str = "config") -> tuple[RunConfig, ImportReport]:
    mapper = _Mapper(cfg, source)
    config = mapper.map()
    return config, mapper.report


def report_warnings(report: ImportReport) -> list[str]:
    return report.changes + [line for _, line in report.ignored]


def load_xtuner_config(path: Path) -> tuple[RunConfig, list[str]]:
    return to_run_config(parse_xtuner(path), str(path))


def load_xtuner_report(path: Path) -> tuple[RunConfig, ImportReport]:
    """The config and its sorted import report (`selfcog train` prints `report.lines()`)."""
    return to_run_config_report(parse_xtuner(path), str(path))


class _Mapper:
    ROOTS = ("model", "tokenizer", "train_dataloader", "optim_wrapper", "param_scheduler", "train_cfg",
             "default_hooks", "custom_hooks", "randomness")

    def __init__(self, cfg: XtunerConfig, source: str):
        self.cfg, self.source = cfg, source
        self.n = cfg.names
        self.report = ImportReport()
        self.config = RunConfig()

    @property
    def warnings(self) -> list[str]:
        return report_warnings(self.report)

    def warn(self, name: str, value, why: str = "no selfcog equivalent", changes: bool = False) -> None:
        """An ignored setting; `changes`: it changes what is trained (its own line), else it needs no action."""
        line = f"xtuner: ignoring {name} = {show(value)} ({why})"
        if changes:
            self.report.changes.append(line)
        else:
            self.report.ignored.append((name, line))

    def attention(self, line: str) -> None:
        """A line of its own: something that changes what is trained or needs the user."""
        self.report.changes.append(line)

    def top(self, *names, default=None):
        for name in names:
            if name in self.n and not isinstance(self.n[name], Unknown):
                return self.n[name]
        return default

    def set(self, dotted: str, value, origin: str) -> None:
        if value is None:
            return
        if isinstance(value, (Unknown, Sym)):
            self.attention(f"xtuner: cannot read {origin} = {show(value)}; keeping selfcog's default for {dotted}")
            return
        set_value(self.config, dotted, value, f"{self.source}: {origin}")

    def map(self) -> RunConfig:
        d = lambda v: v if isinstance(v, dict) else {}  # noqa: E731
        model = d(self.n.get("model"))
        llm = d(model.get("llm"))
        self.model(model, llm)
        self.lora(d(model.get("lora")))
        self.quantization(d(llm.get("quantization_config")))
        self.data(d(self.n.get("train_dataloader")))
        self.optimizer(d(self.n.get("optim_wrapper")))
        self.schedule()
        self.hooks()
        self.seed()
        self.unused_top_level()
        for where in self.cfg.skipped:
            self.attention(f"xtuner: not evaluated (selfcog never executes config code): {where}")
        self.config.eval.eval_steps = 0  # no NAME to score: the sample chats are the progress check
        self.config.train.kl_weight = 0.0  # plain SFT, like XTuner (no preservation samples)
        self.config.lora.top_layers = 0  # XTuner's LoRA adapts every layer
        return self.config

    def model(self, model: dict, llm: dict) -> None:
        spec = llm.get("pretrained_model_name_or_path", self.top("pretrained_model_name_or_path"))
        self.set("model.spec", spec, "pretrained_model_name_or_path")
        remote = llm.get("trust_remote_code")
        if remote and isinstance(spec, str) and "internlm2" in spec.lower():
            self.warn("model.llm.trust_remote_code", remote, "selfcog loads InternLM2 with its own code; "
                      "set model.trust_remote_code to run the hub's")
        elif isinstance(remote, bool):
            self.set("model.trust_remote_code", remote, "trust_remote_code")
        for key in ("torch_dtype", "attn_implementation", "device_map"):
            if key in llm:
                self.warn(f"model.llm.{key}", llm[key], "selfcog loads fp32 and autocasts per train.bf16")
        if model.get("use_varlen_attn"):
            self.warn("model.use_varlen_attn", True, IGNORED["use_varlen_attn"])
        for key in model:
            if key not in ("type", "llm", "lora", "use_varlen_attn"):
                self.warn(f"model.{key}", model[key], changes=True)

    def lora(self, lora: dict) -> None:
        if not lora:
            self.attention("xtuner: no model.lora: selfcog always trains a LoRA adapter (full fine-tuning "
                           "is not supported); keeping selfcog's LoRA defaults")
            return
        self.set("lora.r", lora.get("r"), "lora.r")
        self.set("lora.alpha", lora.get("lora_alpha"), "lora.lora_alpha")
        self.set("lora.dropout", lora.get("lora_dropout"), "lora.lora_dropout")
        targets = lora.get("target_modules")
        if isinstance(targets, (list, tuple)):
            targets = ",".join(targets)
        self.set("lora.target_modules", targets, "lora.target_modules")
        for key, value in lora.items():
            if key in ("type", "r", "lora_alpha", "lora_dropout", "target_modules", "task_type"):
                continue
            if key == "bias" and value == "none":
                continue
            self.warn(f"model.lora.{key}", value, changes=True)

    def quantization(self, q: dict) -> None:
        if not q:
            return
        self.set("lora.load_in_4bit", bool(q.get("load_in_4bit", False)), "quantization_config.load_in_4bit")
        self.set("lora.bnb_4bit_quant_type", q.get("bnb_4bit_quant_type"), "bnb_4bit_quant_type")
        self.set("lora.bnb_4bit_use_double_quant", q.get("bnb_4bit_use_double_quant"), "bnb_4bit_use_double_quant")
        dtype = q.get("bnb_4bit_compute_dtype")
        if isinstance(dtype, Sym):
            dtype = dtype.last
        self.set("lora.bnb_4bit_compute_dtype", dtype, "bnb_4bit_compute_dtype")
        if q.get("load_in_8bit"):
            self.warn("quantization_config.load_in_8bit", True, "selfcog quantizes to 4-bit only", changes=True)
        for key in ("llm_int8_threshold", "llm_int8_has_fp16_weight", "llm_int8_skip_modules"):
            if key in q:
                self.warn(f"quantization_config.{key}", q[key], "8-bit setting; selfcog uses 4-bit or none")

    def datasets(self, dataset) -> list[dict]:
        """The process_hf_dataset dicts inside a dataloader's dataset (ConcatDataset flattened)."""
        if isinstance(dataset, dict) and isinstance(dataset.get("datasets"), (list, tuple)):
            return [x for part in dataset["datasets"] for x in self.datasets(part)]
        return [dataset] if isinstance(dataset, dict) else []

    def data(self, loader: dict) -> None:
        parts = self.datasets(loader.get("dataset"))
        files: list[str] = []
        for i, part in enumerate(parts):
            where = f"dataset {i}" if len(parts) > 1 else "dataset"
            inner = part.get("dataset") if isinstance(part.get("dataset"), dict) else {}
            files += self.data_files(inner, where)
            self.set("data.max_length", part.get("max_length", self.top("max_length")), "max_length")
            self.set("data.pack_to_max_length", part.get("pack_to_max_length", self.top("pack_to_max_length")),
                     "pack_to_max_length")
            template = part.get("template_map_fn")
            template = template.get("template") if isinstance(template, dict) else template
            if isinstance(template, Sym):
                self.set("data.prompt_template", template.last, "prompt_template")
            map_fn = part.get("dataset_map_fn")
            if isinstance(map_fn, Sym) and map_fn.last not in ("alpaca_map_fn", "alpaca_zh_map_fn",
                                                               "openai_map_fn", "default_map_fn"):
                self.warn(f"{where}.dataset_map_fn", map_fn, "selfcog detects conversation/messages/alpaca/"
                          "sharegpt records itself; convert other shapes first", changes=True)
            for key in ("shuffle_before_pack", "remove_unused_columns", "use_varlen_attn", "input_ids_with_output",
                        "max_dataset_length", "split"):
                if key in part and not (key == "use_varlen_attn" and not part[key]) \
                        and not (key == "remove_unused_columns" and part[key]):
                    self.warn(f"{where}.{key}", part[key], changes=key in ("max_dataset_length", "split"))
        if not parts:
            self.attention("xtuner: no train_dataloader.dataset found; set data.data_files")
        if files:
            self.set("data.data_files", files, "data_files")
        if not parts:
            self.set("data.max_length", self.top("max_length"), "max_length")
            self.set("data.pack_to_max_length", self.top("pack_to_max_length"), "pack_to_max_length")
        self.set("train.batch_size", loader.get("batch_size", self.top("batch_size")), "batch_size")
        if loader.get("num_workers"):
            self.warn("train_dataloader.num_workers", loader["num_workers"], IGNORED["dataloader_num_workers"])

    def data_files(self, inner: dict, where: str) -> list[str]:
        path, files = inner.get("path"), inner.get("data_files")
        if files is None:
            if isinstance(path, str) and path not in ("json", "csv", "parquet"):
                if Path(path).suffix in (".json", ".jsonl"):
                    return [path]
                self.attention(f"xtuner: {where}: '{path}' is a hub dataset; selfcog reads local JSON/JSONL "
                               "only — download it and set data.data_files")
            return []
        if path not in (None, "json"):
            self.warn(f"{where}.dataset.path", path, "selfcog reads JSON/JSONL data files only", changes=True)
        if isinstance(files, dict):
            for split in files:
                if split != "train":
                    self.warn(f"{where}.data_files.{split}", files[split], "only the train split is used")
            files = files.get("train", [])
        if isinstance(files, str):
            files = [files]
        if not isinstance(files, (list, tuple)) or not all(isinstance(f, str) for f in files):
            self.attention(f"xtuner: cannot read {where}.data_files = {show(files)}; set data.data_files")
            return []
        return list(files)

    def optimizer(self, wrapper: dict) -> None:
        opt = wrapper.get("optimizer") if isinstance(wrapper.get("optimizer"), dict) else {}
        kind = opt.get("type", self.top("optim_type"))
        if kind is not None and not (isinstance(kind, Sym) and kind.last == "AdamW"):
            self.warn("optim_wrapper.optimizer.type", kind, IGNORED["optim_type"], changes=True)
        self.set("train.learning_rate", opt.get("lr", self.top("lr")), "lr")
        betas = opt.get("betas", self.top("betas"))
        if isinstance(betas, (list, tuple)) and len(betas) == 2:
            self.set("train.adam_beta1", betas[0], "betas[0]")
            self.set("train.adam_beta2", betas[1], "betas[1]")
        self.set("train.weight_decay", opt.get("weight_decay", self.top("weight_decay")), "weight_decay")
        clip = wrapper.get("clip_grad", "absent")
        if clip == "absent":
            self.set("train.max_grad_norm", self.top("max_norm"), "max_norm")
        elif clip is None:
            self.set("train.max_grad_norm", 0.0, "clip_grad=None")
        elif isinstance(clip, dict):
            self.set("train.max_grad_norm", clip.get("max_norm"), "clip_grad.max_norm")
        self.set("train.grad_accum", wrapper.get("accumulative_counts", self.top("accumulative_counts")),
                 "accumulative_counts")
        for key in ("type", "dtype", "loss_scale"):
            if key in wrapper:
                self.warn(f"optim_wrapper.{key}", wrapper[key], "mixed precision follows train.bf16")

    def schedule(self) -> None:
        train_cfg = self.n.get("train_cfg") if isinstance(self.n.get("train_cfg"), dict) else {}
        epochs = train_cfg.get("max_epochs", self.top("max_epochs"))
        if train_cfg.get("max_iters") is not None:
            self.set("train.max_steps", train_cfg["max_iters"], "train_cfg.max_iters")
            epochs = None
        self.set("train.epochs", epochs, "max_epochs")
        schedulers = self.n.get("param_scheduler")
        schedulers = [schedulers] if isinstance(schedulers, dict) else schedulers
        warmup = self.top("warmup_ratio")
        if isinstance(schedulers, list):
            kinds = [type_name(s) for s in schedulers]
            for s in schedulers:
                if type_name(s) == "LinearLR" and isinstance(s, dict) and isinstance(epochs, (int, float)) \
                        and s.get("by_epoch", True) and isinstance(s.get("end"), (int, float)) and epochs:
                    warmup = s["end"] / epochs
                elif type_name(s) not in ("LinearLR", "CosineAnnealingLR"):
                    self.warn("param_scheduler", kinds, "selfcog uses linear warmup then cosine decay", changes=True)
                    break
                if type_name(s) == "CosineAnnealingLR" and isinstance(s, dict) and s.get("eta_min", 0) not in (0, 0.0):
                    self.warn("param_scheduler.eta_min", s["eta_min"], "selfcog's cosine decays to 0", changes=True)
        self.set("train.warmup_ratio", round(warmup, 6) if isinstance(warmup, float) else warmup, "warmup_ratio")

    def hooks(self) -> None:
        hooks = self.n.get("default_hooks") if isinstance(self.n.get("default_hooks"), dict) else {}
        checkpoint = hooks.get("checkpoint") if isinstance(hooks.get("checkpoint"), dict) else {}
        self.set("train.save_steps", checkpoint.get("interval", self.top("save_steps")), "save_steps")
        keep = checkpoint.get("max_keep_ckpts", self.top("save_total_limit"))
        self.set("train.save_total_limit", 0 if isinstance(keep, int) and keep < 0 else keep, "save_total_limit")
        if checkpoint.get("by_epoch"):
            self.warn("default_hooks.checkpoint.by_epoch", True, "selfcog checkpoints every save_steps steps")
        logger = hooks.get("logger") if isinstance(hooks.get("logger"), dict) else {}
        self.set("train.logging_steps", logger.get("interval"), "default_hooks.logger.interval")
        for key in hooks:
            if key not in ("checkpoint", "logger", "param_scheduler", "timer", "sampler_seed"):
                self.warn(f"default_hooks.{key}", hooks[key])
        evaluate = None
        for hook in self.n.get("custom_hooks") or []:
            name = type_name(hook)
            if name == "EvaluateChatHook":
                evaluate = hook
            elif name != "DatasetInfoHook":
                self.warn(f"custom_hooks.{name or '?'}", hook)
        evaluate = evaluate or {}
        self.set("eval.sample_steps", evaluate.get("every_n_iters", self.top("evaluation_freq")), "evaluation_freq")
        inputs = evaluate.get("evaluation_inputs", self.top("evaluation_inputs"))
        if isinstance(inputs, str):
            inputs = [inputs]
        self.set("eval.sample_inputs", inputs, "evaluation_inputs")
        system = evaluate.get("system", self.top("SYSTEM"))
        if isinstance(system, Sym):
            text = SYSTEM_TEMPLATES.get(system.last)
            if text is None:
                self.attention(f"xtuner: unknown system template {system.name}; set eval.system")
            system = text
        self.set("eval.system", system, "SYSTEM")
        for key in ("evaluation_images", "max_new_tokens", "stop_word", "stop_words"):
            if key in evaluate:
                if key == "max_new_tokens":
                    self.set("eval.sample_max_new_tokens", evaluate[key], "EvaluateChatHook.max_new_tokens")
                else:
                    self.warn(f"EvaluateChatHook.{key}", evaluate[key], "stops on the template's end-of-turn token")

    def seed(self) -> None:
        randomness = self.n.get("randomness") if isinstance(self.n.get("randomness"), dict) else {}
        seed = randomness.get("seed")
        if isinstance(seed, int):
            self.set("train.seed", seed, "randomness.seed")
        elif "seed" in randomness:
            self.report.ignored.append(("randomness.seed", f"xtuner: randomness.seed = {show(seed)} (random each run); "
                                        f"selfcog uses train.seed = {self.config.train.seed} so runs are reproducible"))
        if randomness.get("deterministic"):
            self.warn("randomness.deterministic", True)

    def unused_top_level(self) -> None:
        """Warn about every top-level setting no mapped structure or name uses."""
        used = set()
        stack = [r for r in self.ROOTS if r in self.n]
        stack += [name for name in ("pretrained_model_name_or_path", "max_length", "pack_to_max_length", "batch_size",
                                    "accumulative_counts", "max_epochs", "lr", "betas", "weight_decay", "max_norm",
                                    "warmup_ratio", "save_steps", "save_total_limit", "evaluation_freq",
                                    "evaluation_inputs", "SYSTEM", "prompt_template") if name in self.n]
        while stack:
            name = stack.pop()
            if name in used:
                continue
            used.add(name)
            stack += list(self.cfg.deps.get(name, ()))
        for name, value in self.n.items():
            if name in self.cfg.imports or name.startswith("_"):
                continue
            if name == "optim_type" and isinstance(value, Sym) and value.last == "AdamW":
                continue
            if name in IGNORED:
                self.warn(name, value, IGNORED[name])
            elif name not in used:
                self.warn(name, value, "not used by any setting selfcog reads")


def resolve_train_config(source: str, verbose: bool = False) -> RunConfig:
    """`selfcog train`'s CONFIG: a selfcog YAML file, an XTuner .py config or a preset name.

    An XTuner config's import report is logged: one line each for settings that change what is trained, and
    one summary line naming the settings that need no action (`verbose`: one line each for those too)."""
    path = Path(source)
    if path.suffix == ".py":
        config, report = load_xtuner_report(path)
        for line in report.changes:
            logger.warning(f"selfcog: warning: {line}")
        for line in report.lines(verbose)[len(report.changes):]:
            logger.warning(f"selfcog: {'note' if verbose else 'warning'}: {line}")
        return config
    if not path.exists() and source in preset_names():
        return load_preset(source)
    return load_config(path)
