"""Typed recipe configuration: TOML in, validated dataclasses out.

A recipe is a TOML file with one table per section below. A recipe may say
``base = "a3.toml"`` (relative to its own folder) and override only some keys;
``--set section.key=value`` overrides apply last. Every error a user can cause
(unknown key, wrong type, value outside its choices, missing or broken file)
raises :class:`ConfigError` with one line that names the key and, for typos, the
closest valid name; the CLI turns it into exit status 2.

The section and key names follow timm's train.py and ffcv-imagenet where they
have a counterpart, so that their users recognise the knobs.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A user-caused configuration problem; its message is one line."""


# --------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    arch: str = "resnet50"
    drop_path_rate: float = 0.0
    drop_rate: float = 0.0  # dropout before the classifier (ResNet-RS uses 0.25)
    zero_init_last: bool = True  # zero-init the last BN gamma of each residual block
    blurpool: bool = False  # anti-aliased downsampling (ffcv-imagenet's rn50 configs)


@dataclass
class DataConfig:
    pipeline: str = "reference"
    root: str = "data/imagenet"
    num_classes: int = 1000
    workers: int = 8  # decode workers per process


@dataclass
class ProgressiveConfig:
    """Progressive resolution. ``linear`` is ffcv-imagenet's ramp, ``stages`` is
    EfficientNetV2 / ResNet-RS style: equal-length stages whose resolution (and
    optionally regularization) grows from ``start_res`` to ``end_res``."""

    kind: str = "none"  # none | linear | stages
    start_res: int = 160
    end_res: int = 192
    start_epoch: int = 0
    end_epoch: int = 0
    num_stages: int = 4
    round_to: int = 32
    scale_regularization: bool = False  # stages: grow RandAugment magnitude / mixup alpha with res


@dataclass
class TrainConfig:
    epochs: int = 100
    global_batch_size: int = 2048
    per_device_batch_size: int = 0  # 0 = global / world size; smaller values use gradient accumulation
    train_res: int = 224
    precision: str = "auto"  # auto: bf16 on CUDA GPUs with native bf16, fp16 + loss scaling on older ones (V100), fp32 on CPU
    channels_last: bool = True
    compile: bool = False
    seed: int = 0
    deterministic: bool = False
    grad_clip: float = 0.0  # global grad-norm clipping; 0 = off (LAMB clips internally, see optim)
    ema_decay: float = 0.0  # 0 = no EMA of weights
    eval_every: int = 1  # epochs between evaluations; the last epoch is always evaluated
    log_every: int = 50  # steps between metric log points (loss checks, checkpoints and stop decisions happen there)
    loss_limit: float = 1000.0  # a logged mean train loss above this stops the run as diverging; 0 = no limit
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)


@dataclass
class EvalConfig:
    res: int = 224
    crop_pct: float = 0.95
    batch_size: int = 256


@dataclass
class OptimConfig:
    name: str = "lamb"
    lr: float = 5e-3
    weight_decay: float = 0.01
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # lamb / adamw
    eps: float = 1e-6
    max_grad_norm: float = 1.0  # LAMB's internal global-norm clip (timm and apex default 1.0)
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-4
    min_lr: float = 1e-6
    cooldown_epochs: int = 0
    schedule: str = "cosine"
    peak_epoch: float = 2.0  # 'step_free_linear' (ffcv) schedule: epoch of the peak lr


@dataclass
class AugmentConfig:
    rand_augment: str = ""
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    mix_mode: str = "batch"
    repeated_aug: int = 0
    hflip: float = 0.5
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random-resized-crop area
    ratio: list[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])  # aspect ratio
    random_erasing: float = 0.0


@dataclass
class LossConfig:
    name: str = "bce"
    label_smoothing: float = 0.0
    bce_target_thresh: float = 0.0  # 0 = soft targets kept; >0 binarizes targets at this threshold


@dataclass
class CheckpointConfig:
    every_epochs: int = 1
    every_minutes: float = 30.0  # also save mid-epoch this often; 0 = only at epoch ends
    keep_last: int = 2
    keep_best: bool = True
    export_safetensors: bool = True


@dataclass
class LogConfig:
    wandb: str = "off"  # off | offline | online
    project: str = "rsb-trainer"
    run_name: str = ""
    progress: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


# Closed sets of values; checked after loading so a typo in a value is caught too.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.pipeline": ("ffcv", "dali", "reference", "synthetic"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "train.progressive.kind": ("none", "linear", "stages"),
    "optim.name": ("lamb", "sgd", "adamw"),
    "optim.schedule": ("cosine", "step_free_linear", "constant"),
    "augment.mix_mode": ("batch", "pair", "elem"),
    "loss.name": ("bce", "ce"),
    "log.wandb": ("off", "offline", "online"),
}


# --------------------------------------------------------------------------- loading
def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.0)
    return match[0] if match else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotated type; ints widen to floats, nothing else converts."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug in this module, not user error


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in hints:
            guess = _closest(key, names)
            hint = f"; did you mean {prefix}{guess}?" if guess else ""
            raise ConfigError(f"unknown key {full}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a table [{full}], got {value!r}")
            kwargs[key] = _build(tp, value, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe and its ``base`` chain into one merged dict (no validation yet)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path} (give a path such as recipes/a1.toml)")
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(p.name for p in (*_seen, resolved))
        raise ConfigError(f"recipe inheritance loops: {chain}")
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a file name string, got {base!r}")
    parent = read_recipe(path.parent / base, (*_seen, resolved))
    return _merge(parent, data)


def _field_type(key: str) -> Any:
    """The annotated type of a dotted key such as ``train.progressive.kind``."""
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            prefix = ".".join(parts[:i])
            names = list(hints)
            guess = _closest(part, names)
            full_guess = f"{prefix}.{guess}" if prefix else guess
            raise ConfigError(f"unknown key {key}; did you mean {full_guess}?")
        cls = hints[part]
    if dataclasses.is_dataclass(cls):
        raise ConfigError(f"--set {key}: names a section; set one of its keys, e.g. {key}.{dataclasses.fields(cls)[0].name}")
    return cls


def parse_override(text: str) -> tuple[str, Any]:
    """Turn ``section.key=value`` into a (key, typed value) pair using the field's type."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = (s.strip() for s in text.split("=", 1))
    if "." not in key:
        raise ConfigError(f"--set {key}: expected section.key=value (e.g. optim.lr=0.008)")
    tp = _field_type(key)
    if tp is str:
        # Strings need no TOML quoting on the command line; accept quoted ones too.
        return key, raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'" else raw
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        raise ConfigError(f"--set {key}={raw}: expected {_type_name(tp)}") from None
    return key, value


def _apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a table in the recipe")
    node[leaf] = value


def validate(cfg: Config) -> None:
    """Checks across values that types alone cannot express."""
    for key, options in CHOICES.items():
        value = get_value(cfg, key)
        if value not in options:
            guess = _closest(str(value), list(options))
            raise ConfigError(f"{key} = {value!r} is not one of {', '.join(options)}; did you mean {guess!r}?")
    positive = ["train.epochs", "train.global_batch_size", "train.train_res", "eval.res", "data.num_classes"]
    for key in positive:
        if get_value(cfg, key) <= 0:
            raise ConfigError(f"{key} must be > 0, got {get_value(cfg, key)}")
    if not 0.0 < cfg.eval.crop_pct <= 1.0:
        raise ConfigError(f"eval.crop_pct must be in (0, 1], got {cfg.eval.crop_pct}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    for key in ("augment.mixup_alpha", "augment.cutmix_alpha", "optim.weight_decay", "model.drop_path_rate",
                "model.drop_rate", "loss.label_smoothing", "train.ema_decay", "train.grad_clip"):
        if get_value(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {get_value(cfg, key)}")
    for key in ("augment.hflip", "augment.mix_prob", "augment.switch_prob", "augment.random_erasing",
                "loss.bce_target_thresh", "model.drop_path_rate", "model.drop_rate"):
        if not 0.0 <= get_value(cfg, key) <= 1.0:
            raise ConfigError(f"{key} must be in [0, 1], got {get_value(cfg, key)}")
    if cfg.loss.name == "ce" and cfg.loss.bce_target_thresh > 0:
        raise ConfigError(f"loss.bce_target_thresh = {cfg.loss.bce_target_thresh} applies to loss.name = 'bce' only; "
                          f"with loss.name=ce also set loss.bce_target_thresh=0")
    if cfg.augment.repeated_aug < 0 or cfg.augment.repeated_aug == 1:
        raise ConfigError(f"augment.repeated_aug is a repeat count >= 2, or 0 for off; got {cfg.augment.repeated_aug}")
    if len(cfg.augment.scale) != 2 or len(cfg.augment.ratio) != 2 or len(cfg.optim.betas) != 2:
        raise ConfigError("augment.scale, augment.ratio and optim.betas take two numbers each, e.g. [0.08, 1.0]")
    if cfg.augment.rand_augment and not cfg.augment.rand_augment.startswith("rand"):
        raise ConfigError(f"augment.rand_augment must be a timm string like 'rand-m7-mstd0.5-inc1' or '', "
                          f"got {cfg.augment.rand_augment!r}")
    if cfg.train.per_device_batch_size < 0:
        raise ConfigError("train.per_device_batch_size must be >= 0 (0 = global batch / world size)")
    p = cfg.train.progressive
    if p.kind != "none":
        if p.start_res <= 0 or p.end_res <= 0 or p.round_to <= 0:
            raise ConfigError("train.progressive start_res, end_res and round_to must be > 0")
        if p.kind == "linear" and not 0 <= p.start_epoch <= p.end_epoch <= cfg.train.epochs:
            raise ConfigError(f"train.progressive needs 0 <= start_epoch <= end_epoch <= train.epochs, "
                              f"got {p.start_epoch}, {p.end_epoch}, {cfg.train.epochs}")
        if p.kind == "stages" and p.num_stages < 1:
            raise ConfigError("train.progressive.num_stages must be >= 1")


def get_value(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a recipe with its base chain, apply ``--set`` overrides, validate."""
    data = read_recipe(path)
    for text in overrides:
        key, value = parse_override(text)
        _apply_override(data, key, value)
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config saved as a dict (checkpoints store the resolved config)."""
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- output
def toml_value(value: Any) -> str:
    """``value`` written as TOML (also the form ``--set`` parses)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _dump_table(name: str, data: dict[str, Any], lines: list[str]) -> None:
    lines.append(f"[{name}]")
    subtables = []
    for key, value in data.items():
        if isinstance(value, dict):
            subtables.append((key, value))
        else:
            lines.append(f"{key} = {toml_value(value)}")
    lines.append("")
    for key, value in subtables:
        _dump_table(f"{name}.{key}", value, lines)


def to_toml(cfg: Config) -> str:
    """The fully resolved config as TOML that :func:`load_config` reads back to an equal config."""
    lines: list[str] = []
    for name, table in dataclasses.asdict(cfg).items():
        _dump_table(name, table, lines)
    return "\n".join(lines)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key; the 'every field is read' test walks this."""
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys
