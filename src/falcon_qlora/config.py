"""The run config: one flat, typed schema whose defaults are the reference recipe.

    from falcon_qlora.config import load_config
    cfg = load_config("demo", max_steps=20)          # a preset (or a YAML path) plus overrides

On the command line the same schema is parsed by TRL's TrlParser (a HfArgumentParser):
    falcon-qlora train --config demo --max_steps 20 --lora_r 8

Every field's `help` is its documentation (it feeds `--help`). Types are checked by pydantic, so a wrong type or an
unknown key is an error that names the key.
"""
from __future__ import annotations

import json
import platform
from dataclasses import asdict, field, fields
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import ConfigDict, ValidationError, field_validator
from pydantic.dataclasses import dataclass

from .errors import UserError

PRESETS_DIR = Path(__file__).parent / "presets"
FALCON_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


class ConfigError(UserError, ValueError):
    """A config problem; the message names the key and the fix."""


def _f(default, help, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(config=ConfigDict(extra="forbid"))
class RunConfig:
    # --- model -----------------------------------------------------------------------------------------------
    model_name_or_path: str = _f("tiiuae/falcon-7b", "Hub name, local folder, or built-in alias (smollm2-135m).")
    trust_remote_code: bool = _f(False, "Run model code shipped with the checkpoint. Off: native transformers only.")
    allow_pickle: bool = _f(False, "Allow .bin/.pt (pickle) weights. Off: safetensors only.")
    # --- quantization ----------------------------------------------------------------------------------------
    load_in_4bit: bool = _f(True, "Load the base in 4-bit through bitsandbytes (QLoRA). False: plain LoRA.")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = _f("nf4", "4-bit data type.")
    bnb_4bit_use_double_quant: bool = _f(True, "Quantize the quantization constants too (~0.4 bit/param saved).")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = _f(
        "auto", "auto: bf16 where the GPU supports it, else fp16 with fp32 layer norms (T4), fp32 on CPU.")
    # --- LoRA ------------------------------------------------------------------------------------------------
    lora_r: int = _f(64, "LoRA rank.")
    lora_alpha: int = _f(16, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = _f(0.1, "Dropout on the LoRA input.")
    lora_bias: Literal["none", "all", "lora_only"] = _f("none", "Which biases to train.")
    lora_target_modules: list[str] = _f(FALCON_TARGETS, "Module names that get LoRA adapters.")
    # --- data ------------------------------------------------------------------------------------------------
    # (a default_factory, so that the command-line parser, which reads this as a list, still knows the default)
    dataset_name: Union[str, list[str]] = field(default_factory=lambda: "timdettmers/openassistant-guanaco", metadata={
        "help": "Hub dataset, local file/folder (jsonl, json, parquet, csv) or built-in alias; or several, mixed "
                "with the seed, each a name or '{name: NAME, format: FORMAT, max_rows: N}'."})
    dataset_format: Literal["auto", "text", "messages", "sharegpt", "alpaca", "prompt_completion"] = _f(
        "auto", "Row format; auto: from the columns (text, messages, conversations, instruction/output, "
        "prompt/completion).")
    dataset_text_field: str = _f("text", "Column holding '### Human: ... ### Assistant: ...' text.")
    train_split: str = _f("train", "Training split.")
    eval_split: Optional[str] = _f("test", "Held-out split (None: no evaluation).")
    max_length: int = _f(512, "Tokens per row; longer rows are truncated (and counted in the data summary).")
    completion_only_loss: bool = _f(False, "Loss on assistant turns only (the reference trains on the whole text).")
    drop_invalid_rows: bool = _f(False, "Drop rows that fail validation (with a count) instead of stopping.")
    packing: bool = _f(False, "Pack rows into max_length sequences without attention across rows.")
    max_train_rows: Optional[int] = _f(None, "Use only the first N training rows.")
    max_eval_rows: Optional[int] = _f(None, "Use only the first N held-out rows.")
    # --- training --------------------------------------------------------------------------------------------
    output_dir: str = _f("./results", "Run directory: checkpoints, final adapter, config, metrics, plot.")
    per_device_train_batch_size: int = _f(4, "Micro-batch per device.")
    gradient_accumulation_steps: int = _f(4, "Micro-batches per optimizer step.")
    batch_policy: Literal["effective", "per_device"] = _f(
        "effective", "Several processes: 'effective' keeps per-device x accumulation (as written) as the rows per "
        "step and divides the accumulation among processes; 'per_device' keeps both, so the batch grows with them.")
    per_device_eval_batch_size: int = _f(4, "Eval micro-batch (independent of training).")
    optim: str = _f("paged_adamw_32bit", "Optimizer name as transformers knows it.")
    learning_rate: float = _f(2e-4, "Peak learning rate.")
    max_grad_norm: float = _f(0.3, "Gradient clipping norm.")
    max_steps: int = _f(500, "Optimizer steps.")
    warmup_ratio: float = _f(0.03, "Share of max_steps spent warming up.")
    lr_scheduler_type: str = _f("constant_with_warmup",
                                "Schedule. The reference's 'constant' with 3 percent warmup is constant_with_warmup.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    gradient_checkpointing: bool = _f(True, "Recompute activations in backward (less memory, ~1.3x the time).")
    profile: Literal["auto", "reference", "speed", "memory"] = _f(
        "auto", "Speed/memory profile; none changes what is learned. auto: speed where memory allows.")
    compile_layers: Literal["auto", "on", "off"] = _f(
        "auto", "torch.compile the decoder layers in the speed/memory profiles (same math, fused kernels; 12-26 percent "
        "faster steps on an H200 after 20-70 s of compiling). auto: on GPUs of compute capability 8.0+ with "
        "Triton, for runs of at least 1,000 steps.")
    save_steps: int = _f(10, "Checkpoint every N steps.")
    save_total_limit: Optional[int] = _f(3, "Keep at most N checkpoints (None: all; each is ~1.5 GB for Falcon-7B r=64 with optimizer state).")
    logging_steps: int = _f(10, "Log loss every N steps.")
    eval_steps: Optional[int] = _f(None, "Evaluate every N steps (None: only at the end).")
    seed: int = _f(42, "Seed for data order, LoRA init and dropout.")
    divergence_factor: Optional[float] = _f(
        2.0, "Stop when the training loss stays above this multiple of its first step's for 5 optimizer steps in a "
        "row (a diverged run; real runs stay at or below 1.0x). None: never.")
    report_to: Literal["none", "tensorboard", "wandb"] = _f("none", "Logger; wandb runs offline without credentials.")
    resume: bool = _f(False, "Continue from the last complete checkpoint in output_dir.")
    overwrite: bool = _f(False, "Start fresh even if output_dir holds another run's checkpoints.")
    push_to_hub: Optional[str] = _f(None, "Hub repo id to upload the adapter to at the end.")
    disable_tqdm: bool = _f(False, "Hide the progress bar.")

    @field_validator("eval_split", "push_to_hub", "max_train_rows", "max_eval_rows", "eval_steps", "save_total_limit",
                     "divergence_factor", mode="before")
    @classmethod
    def _none_words(cls, value):
        """`--eval_split None` arrives from the command line as the word, not the value."""
        return None if isinstance(value, str) and value.strip().lower() in ("none", "null", "") else value

    @field_validator("dataset_name", mode="before")
    @classmethod
    def _one_or_more_sources(cls, value):
        """One source stays a plain name; a mapping (from YAML) is kept as its one-line YAML form."""
        if isinstance(value, (list, tuple)):
            value = [yaml.safe_dump(v, default_flow_style=True, sort_keys=False).strip() if isinstance(v, dict)
                     else v for v in value]
            return value[0] if len(value) == 1 else list(value)
        return value

    def __post_init__(self):
        problems = validate(self)
        if problems:
            raise ConfigError("; ".join(problems))


def validate(cfg: RunConfig) -> list[str]:
    """Value checks that types alone cannot express. Each message names the key and says what to do."""
    p = []
    for key in ("max_steps", "lora_r", "lora_alpha", "max_length", "per_device_train_batch_size",
                "gradient_accumulation_steps", "per_device_eval_batch_size", "save_steps", "logging_steps"):
        if getattr(cfg, key) <= 0:
            p.append(f"{key}={getattr(cfg, key)} must be a positive integer")
    if cfg.learning_rate <= 0:
        p.append(f"learning_rate={cfg.learning_rate} must be > 0 (the reference uses 2e-4)")
    if not 0 <= cfg.lora_dropout < 1:
        p.append(f"lora_dropout={cfg.lora_dropout} must be in [0, 1)")
    if not 0 <= cfg.warmup_ratio < 1:
        p.append(f"warmup_ratio={cfg.warmup_ratio} must be in [0, 1)")
    if cfg.max_grad_norm < 0:
        p.append(f"max_grad_norm={cfg.max_grad_norm} must be >= 0 (0 disables clipping)")
    if not cfg.lora_target_modules:
        p.append("lora_target_modules is empty: name at least one module (Falcon: query_key_value, dense, ...)")
    if cfg.save_total_limit is not None and cfg.save_total_limit <= 0:
        p.append(f"save_total_limit={cfg.save_total_limit} must be >= 1 or None")
    if cfg.resume and cfg.overwrite:
        p.append("resume and overwrite are both set: choose one")
    if cfg.divergence_factor is not None and cfg.divergence_factor <= 1:
        p.append(f"divergence_factor={cfg.divergence_factor} must be > 1 (or None to switch the check off)")
    if cfg.eval_steps is not None and cfg.eval_steps <= 0:
        p.append(f"eval_steps={cfg.eval_steps} must be a positive integer, or None to evaluate only at the end")
    if not 0 <= cfg.seed < 2**32:
        p.append(f"seed={cfg.seed} must be an integer from 0 to 2**32 - 1")
    for spec in (cfg.dataset_name if isinstance(cfg.dataset_name, list) else [cfg.dataset_name]):
        try:
            parse_source(spec, cfg.dataset_format)
        except ConfigError as err:
            p.append(str(err))
    return p


SOURCE_KEYS = ("name", "format", "max_rows")
FORMATS = ("auto", "text", "messages", "sharegpt", "alpaca", "prompt_completion")


def dataset_names(cfg: RunConfig) -> list[str]:
    """The name, file or folder of every dataset source (dataset_name holds one or several)."""
    specs = cfg.dataset_name if isinstance(cfg.dataset_name, list) else [cfg.dataset_name]
    return [parse_source(s)["name"] for s in specs]


def parse_source(spec: str, default_format: str = "auto") -> dict:
    """One dataset_name entry -> {name, format, max_rows}: a plain name, or a mapping written as YAML
    ('{name: chat.jsonl, format: messages, max_rows: 500}')."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"dataset_name entry {spec!r} must be a dataset name, file or folder")
    if not spec.lstrip().startswith("{"):
        return {"name": spec, "format": default_format, "max_rows": None}
    try:
        entry = yaml.safe_load(spec)
    except yaml.YAMLError:
        entry = None
    if not isinstance(entry, dict):
        raise ConfigError(f"dataset_name entry {spec!r} is not a mapping such as '{{name: data.jsonl, "
                          "format: messages, max_rows: 500}'")
    unknown = [k for k in entry if k not in SOURCE_KEYS]
    if unknown or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise ConfigError(f"dataset_name entry {spec!r} needs a 'name' and may have only "
                          f"{', '.join(SOURCE_KEYS)}" + (f" (unknown: {', '.join(map(str, unknown))})" if unknown
                                                         else ""))
    fmt = entry.get("format", default_format)
    if fmt not in FORMATS:
        raise ConfigError(f"dataset_name entry {spec!r}: format {fmt!r} is not one of {', '.join(FORMATS)}")
    rows = entry.get("max_rows")
    if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows <= 0):
        raise ConfigError(f"dataset_name entry {spec!r}: max_rows must be a positive integer")
    return {"name": entry["name"], "format": fmt, "max_rows": rows}


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86: AVX512-BF16 or AMX-BF16; Arm: the bf16 feature)."""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = set()
    for line in info.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[-1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def check_runtime(cfg: RunConfig) -> None:
    """Values that only the installed transformers and this machine can judge (the optimizer and schedule names,
    bf16 on a CPU). train() calls it before anything is written; one ConfigError names every bad key."""
    import torch
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames
    p = []
    optims = [o.value for o in OptimizerNames]
    if cfg.optim not in optims:
        p.append(f"optim={cfg.optim!r} is not an optimizer transformers knows (the reference uses "
                 "paged_adamw_32bit; others: adamw_torch, adamw_8bit, paged_adamw_8bit, adafactor, sgd, ...)")
    schedules = [s.value for s in SchedulerType]
    if cfg.lr_scheduler_type not in schedules:
        p.append(f"lr_scheduler_type={cfg.lr_scheduler_type!r} is not a schedule transformers knows (one of "
                 f"{', '.join(schedules[:8])}, ...)")
    if cfg.compute_dtype == "bf16" and not torch.cuda.is_available() and not cpu_has_bf16():
        p.append("compute_dtype=bf16: there is no GPU and this CPU has no native bf16; set compute_dtype=fp32 "
                 "(or auto)")
    if p:
        raise ConfigError("; ".join(p))


def _pretty(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"]) or "config"
        if e["type"] == "value_error":  # raised by validate() in __post_init__: already names the key
            lines.append(e["msg"].removeprefix("Value error, "))
        elif e["type"] == "unexpected_keyword_argument":
            lines.append(f"unknown config key '{key}' (see `falcon-qlora train --help` for the valid keys)")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def make_config(**values) -> RunConfig:
    """Build a RunConfig, turning pydantic's report into one ConfigError that names each bad key."""
    try:
        return RunConfig(**values)
    except ValidationError as err:
        raise ConfigError(_pretty(err)) from None


def preset_path(name_or_path: str) -> Path:
    """A preset name ('reference', 'demo') or a YAML path -> the file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        return p
    cand = PRESETS_DIR / f"{name_or_path}.yaml"
    if not cand.is_file():
        names = ", ".join(sorted(x.stem for x in PRESETS_DIR.glob("*.yaml")))
        raise ConfigError(f"no preset or file named '{name_or_path}' (presets: {names})")
    return cand


def read_yaml(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, not a {type(data).__name__}")
    return data


def load_config(config: str | Path | None = None, **overrides) -> RunConfig:
    """Defaults (the reference recipe) <- a preset or YAML file <- keyword overrides."""
    values = read_yaml(preset_path(str(config))) if config else {}
    values.update(overrides)
    return make_config(**values)


def to_dict(cfg: RunConfig) -> dict:
    return asdict(cfg)


def field_names() -> list[str]:
    return [f.name for f in fields(RunConfig)]


def library_versions() -> dict:
    """Versions of the libraries that decide what a run does, for the run directory and bug reports."""
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for pkg in ("falcon-qlora", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def from_namespace(namespace: dict, preset: str | None = None) -> RunConfig:
    """The notebook's parameters cell -> a RunConfig: every variable named like a config key is used. With a preset
    (the notebook passes colab-t4 on a T4), the preset's values replace the keys still at their reference default;
    every value the user changed wins."""
    values = {k: v for k, v in namespace.items() if k in field_names()}
    if preset:
        default = RunConfig()
        for key, value in read_yaml(preset_path(preset)).items():
            if values.get(key, getattr(default, key)) == getattr(default, key):
                values[key] = value
    return make_config(**values)


def parse_args(argv: list[str], prog: str = "falcon-qlora train") -> RunConfig:
    """`--config PRESET_OR_YAML` then `--key value` overrides, through TRL's TrlParser."""
    from pydantic import ValidationError
    from trl import TrlParser
    argv = list(argv)
    if "--config" in argv:
        i = argv.index("--config") + 1
        if i < len(argv):
            argv[i] = str(preset_path(argv[i]))
            read_yaml(argv[i])  # a syntax error is one line naming the file, not a parser traceback
    parser = TrlParser([RunConfig], prog=prog)
    parser.error = _parser_error  # argparse would print the usage and exit; we want one line
    try:
        (cfg,) = parser.parse_args_and_config(argv)
    except ValidationError as err:
        raise ConfigError(_pretty(err)) from None
    except ValueError as err:  # argparse errors (see _parser_error), unknown keys in the YAML or on the command line
        raise ConfigError(_parse_message(str(err))) from None
    return make_config(**{k: getattr(cfg, k) for k in cfg.__dataclass_fields__})


def _parser_error(message: str):
    raise ValueError(message)


def _parse_message(msg: str) -> str:
    """TRL/HfArgumentParser say 'Unknown arguments from config file: ['--x', '1']. Please ... add them to the
    dataclass ...'; users need the key names and where to look them up."""
    import re
    msg = msg.splitlines()[0]
    listed = re.search(r"\[(.*)\]", msg)
    if "nknown arguments" in msg or "not used by the HfArgumentParser" in msg:
        items = [k.strip(" '\"") for k in listed.group(1).split(",")] if listed else []
        keys = ", ".join(k.lstrip("-") for k in items if k.startswith("--")) or "?"
        where = "in the config file" if "config file" in msg else "on the command line"
        return f"unknown config key {keys} {where} (see falcon-qlora train --help for the valid keys)"
    return f"{msg} (see falcon-qlora train --help)"


def reference_markdown() -> str:
    """docs/config.md: every key with its default (the reference recipe) and its help, from the schema itself, so
    the page cannot drift from the code (tests/test_docs.py regenerates and compares it)."""
    lines = ["# Run config reference", "",
             "Generated from `falcon_qlora.config.RunConfig` (`python -m falcon_qlora.config > docs/config.md`). "
             "Defaults are the reference recipe; every key is a `falcon-qlora train --KEY VALUE` option and a YAML "
             "key of a preset or `run_config.yaml`.", "", "| key | default | what it does |", "|---|---|---|"]
    default = RunConfig()
    for f in fields(RunConfig):
        value = getattr(default, f.name)
        shown = "None" if value is None else json.dumps(value) if isinstance(value, (list, str)) else str(value)
        help_text = f.metadata.get("help", "").replace("|", "\\|")
        lines.append(f"| `{f.name}` | `{shown}` | {help_text} |")
    return "\n".join(lines) + "\n"


def notebook_parameters() -> str:
    """The notebook's parameters cell: every key at its reference default, commented with its field help, so the
    cell cannot drift from the config (tests/test_notebook.py compares them)."""
    lines = ["# Parameters: the reference recipe. Every name here is a falcon-qlora config key."]
    default = RunConfig()
    for f in fields(RunConfig):
        lines.append(f"{f.name} = {getattr(default, f.name)!r}  # {f.metadata.get('help', '')}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown(), end="")
