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


def key(default: Any, help: str) -> Any:
    """A recipe key: its default and the one-line help ``--help-config`` prints."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    if dataclasses.is_dataclass(default):
        return field(default_factory=type(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# --------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    """The network: a timm architecture and its regularization options (models/)."""

    arch: str = key("resnet50", "timm model name: resnet50, resnet101, resnetrs50, resnet18 ... (built without downloads)")
    drop_path_rate: float = key(0.0, "stochastic depth rate of the residual branches (RSB A1: 0.05, A2: 0.05, A3: 0.0)")
    drop_rate: float = key(0.0, "dropout before the classifier (ResNet-RS: 0.25)")
    zero_init_last: bool = key(True, "zero-init the last BN gamma of each residual block (timm's zero_init_last)")
    blurpool: bool = key(False, "anti-aliased downsampling in strided convs (ffcv-imagenet's rn50 configs)")


@dataclass
class DataConfig:
    """Where the converted data lives and which stage-1 backend reads it (pipelines/)."""

    pipeline: str = key("reference", "stage-1 backend: ffcv | dali | reference (PIL, the semantic oracle) | synthetic")
    root: str = key("data/imagenet", "folder written by tools/convert_imagenet.py (holds manifest.json)")
    num_classes: int = key(1000, "classes of the classifier head; must match the converted data")
    workers: int = key(8, "decode workers (FFCV/DALI threads, reference loader processes) per process")
    mean: list[float] = key([0.485, 0.456, 0.406], "per-channel mean (0-1 scale) that stage 2 subtracts, in "
                            "train and eval (timm's IMAGENET_DEFAULT_MEAN)")
    std: list[float] = key([0.229, 0.224, 0.225], "per-channel std (0-1 scale) that stage 2 divides by "
                           "(timm's IMAGENET_DEFAULT_STD)")


@dataclass
class ProgressiveConfig:
    """Progressive resolution: the training resolution grows over the run.

    ``linear`` is ffcv-imagenet's ramp, ``stages`` is EfficientNetV2 / ResNet-RS style: equal-length stages whose resolution (and
    optionally regularization) grows from ``start_res`` to ``end_res``."""

    kind: str = key("none", "none | linear (ffcv-imagenet's ramp) | stages (EfficientNetV2 / ResNet-RS)")
    start_res: int = key(160, "training resolution at the start of the ramp")
    end_res: int = key(192, "training resolution at the end of the ramp")
    start_epoch: int = key(0, "linear: epoch where the ramp starts")
    end_epoch: int = key(0, "linear: epoch where the ramp ends")
    num_stages: int = key(4, "stages: number of equal-length stages")
    round_to: int = key(32, "resolutions are rounded to a multiple of this")
    scale_regularization: bool = key(False, "stages: grow RandAugment magnitude and mixup alpha with resolution")


@dataclass
class TrainConfig:
    """The training loop (engine/)."""

    epochs: int = key(100, "epochs to train (RSB A1: 600, A2: 300, A3: 100)")
    global_batch_size: int = key(2048, "images per optimizer step over all processes")
    per_device_batch_size: int = key(0, "images per forward pass; 0 = global / world size, smaller accumulates gradients")
    train_res: int = key(224, "training resolution when train.progressive.kind = none (RSB A3: 160)")
    precision: str = key("auto", "auto (bf16 on GPUs with native bf16, fp16 + loss scaling on V100/T4, fp32 on CPU) | bf16 | fp16 | fp32")
    channels_last: bool = key(True, "channels-last memory format for model and images (faster convs with AMP)")
    compile: bool = key(False, "torch.compile the model (one graph per resolution)")
    seed: int = key(0, "seed of weights, sampling and augmentation (each rank derives its own stream)")
    deterministic: bool = key(False, "deterministic cuDNN algorithms (slower; for debugging)")
    grad_clip: float = key(0.0, "global grad-norm clipping; 0 = off (LAMB clips internally: optim.max_grad_norm)")
    ema_decay: float = key(0.0, "decay of an EMA of the weights, evaluated beside the model; 0 = no EMA")
    eval_every: int = key(1, "epochs between evaluations; the last epoch is always evaluated")
    log_every: int = key(50, "steps between log points (metrics, loss checks, mid-epoch checkpoints, stop decisions)")
    loss_limit: float = key(1000.0, "a logged mean train loss above this stops the run as diverging; 0 = no limit")
    dist_timeout_s: float = key(300.0, "under DDP: seconds a rank may go without progress (waiting in a collective, "
                                       "for a batch, in a write) before the run stops with one line naming it; the "
                                       "process group's own timeout is 60 s later, the last resort")
    dist_start_timeout_s: float = key(900.0, "the same until the first training step: the rendezvous and the start's "
                                             "collectives wait for every rank's imports, data and checkpoint load")
    progressive: ProgressiveConfig = key(ProgressiveConfig(), "progressive resolution (table [train.progressive])")


@dataclass
class EvalConfig:
    """Validation: timm's resize-then-center-crop transform."""

    res: int = key(224, "validation crop size (RSB evaluates at 224)")
    crop_pct: float = key(0.95, "center-crop fraction: images are resized to res / crop_pct, then cropped to res")
    interpolation: str = key("bicubic", "resize filter of validation images: bicubic (timm's ResNet default) | bilinear")
    batch_size: int = key(256, "validation images per forward pass per process")
    max_images: int = key(0, "evaluate at most this many val images, evenly spaced over the val set (every class "
                             "kept); 0 = all of them. For smoke runs: a top-1 on few images is noisy, and "
                             "the run's logged figures are then of these images only")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (engine/optim.py, engine/schedule.py)."""

    name: str = key("lamb", "lamb (RSB A1-A3; apex FusedLAMB on CUDA when installed) | sgd | adamw")
    lr: float = key(5e-3, "peak learning rate (RSB A1: 5e-3 at batch 2048, A3: 8e-3)")
    weight_decay: float = key(0.01, "weight decay; norms and biases (ndim <= 1) get none")
    momentum: float = key(0.9, "sgd: momentum")
    nesterov: bool = key(False, "sgd: Nesterov momentum")
    betas: list[float] = key([0.9, 0.999], "lamb / adamw: the two moment decays")
    eps: float = key(1e-6, "lamb / adamw: denominator epsilon")
    max_grad_norm: float = key(1.0, "lamb: global grad-norm clip inside the optimizer (timm and apex default 1.0)")
    warmup_epochs: float = key(5.0, "epochs of linear warmup from optim.warmup_lr to optim.lr")
    warmup_lr: float = key(1e-4, "learning rate at the first step of warmup")
    min_lr: float = key(1e-6, "learning rate at the end of the cosine")
    cooldown_epochs: int = key(0, "epochs at optim.min_lr after the schedule ends (timm's cooldown)")
    schedule: str = key("cosine", "cosine (per step, after warmup) | step_free_linear (ffcv's triangle) | constant")
    peak_epoch: float = key(2.0, "step_free_linear: epoch of the peak learning rate")


@dataclass
class AugmentConfig:
    """Training augmentation, the same in every backend (pipelines/augment/, stage 2)."""

    rand_augment: str = key("", "timm RandAugment string, e.g. 'rand-m7-mstd0.5-inc1' (RSB A1); '' = off")
    mixup_alpha: float = key(0.0, "mixup Beta(alpha, alpha); 0 = off (RSB A1: 0.2, A3: 0.1)")
    cutmix_alpha: float = key(0.0, "CutMix Beta(alpha, alpha); 0 = off (RSB: 1.0)")
    mix_prob: float = key(1.0, "probability that a batch (or pair/element) is mixed at all")
    switch_prob: float = key(0.5, "probability of CutMix instead of mixup when both are on")
    mix_mode: str = key("batch", "batch | pair | elem: granularity of the mixing decision (timm's mode)")
    repeated_aug: int = key(0, "repeated augmentation count (RSB A1/A2: 3); 0 = off")
    hflip: float = key(0.5, "probability of a horizontal flip")
    scale: list[float] = key([0.08, 1.0], "random-resized-crop area range, as fractions of the image")
    ratio: list[float] = key([0.75, 4.0 / 3.0], "random-resized-crop aspect-ratio range")
    train_interpolation: str = key("random", "resize filter of the train crops: random (bilinear or bicubic per "
                                   "image, timm's default) | bilinear | bicubic; every backend honours it")
    random_erasing: float = key(0.0, "probability of random erasing per image; 0 = off")


@dataclass
class LossConfig:
    """The training loss (engine/losses.py)."""

    name: str = key("bce", "bce (RSB: binary cross-entropy on mixed targets) | ce (soft-target cross-entropy)")
    label_smoothing: float = key(0.0, "label smoothing of the targets (ResNet-RS: 0.1)")
    bce_target_thresh: float = key(0.0, "bce: binarize targets above this threshold (RSB A1: 0.2); 0 = soft targets")


@dataclass
class CheckpointConfig:
    """Checkpoints in the run folder (engine/checkpoint.py, engine/run_folder.py)."""

    every_epochs: int = key(1, "epochs between end-of-epoch checkpoints")
    every_minutes: float = key(30.0, "also save mid-epoch at a log point this often; 0 = only at epoch ends")
    keep_last: int = key(2, "end-of-epoch checkpoints to keep, and as many mid-epoch/interrupted ones (older ones "
                            "are removed; the newest checkpoint that passed its loss check is always kept)")
    keep_best: bool = key(True, "also write the weights of the best validation top-1 as best.safetensors")
    export_safetensors: bool = key(True, "write the final weights (the EMA's when kept) as model.safetensors for timm")


@dataclass
class LogConfig:
    """Console, metrics.jsonl and Weights & Biases."""

    wandb: str = key("off", "off | offline | online: log to Weights & Biases")
    project: str = key("rsb-trainer", "W&B project")
    run_name: str = key("", "W&B run name; '' = the output folder's name")
    progress: bool = key(True, "show progress on the console: a tqdm bar per epoch when stderr is a terminal, "
                               "one line per log point otherwise (CI, files)")


@dataclass
class Config:
    """A whole recipe: one table per section."""

    model: ModelConfig = key(ModelConfig(), "[model] the network")
    data: DataConfig = key(DataConfig(), "[data] converted data and backend")
    train: TrainConfig = key(TrainConfig(), "[train] the training loop")
    eval: EvalConfig = key(EvalConfig(), "[eval] validation")
    optim: OptimConfig = key(OptimConfig(), "[optim] optimizer and schedule")
    augment: AugmentConfig = key(AugmentConfig(), "[augment] training augmentation")
    loss: LossConfig = key(LossConfig(), "[loss] the loss")
    checkpoint: CheckpointConfig = key(CheckpointConfig(), "[checkpoint] checkpoints")
    log: LogConfig = key(LogConfig(), "[log] logging")


# The package that reads each section (tests/test_config_fields_used.py checks every key is read
# there): models/ builds the model; pipelines/ reads the data, eval and augment sections (its
# build.py maps them onto a backend and stage 2); the training engine reads the rest.
SECTION_OWNERS: dict[str, str] = {
    "model": "models", "data": "pipelines", "eval": "pipelines", "augment": "pipelines",
    "train": "engine", "optim": "engine", "loss": "engine", "checkpoint": "engine", "log": "engine",
}


# The resize filters, as timm names them: every backend and stage 2 take these names, and the
# compiled resizes their index (0 bilinear, 1 bicubic, 2 random: either, per image).
TRAIN_INTERPOLATIONS = ("bilinear", "bicubic", "random")
EVAL_INTERPOLATIONS = ("bilinear", "bicubic")

# Closed sets of values; checked after loading so a typo in a value is caught too.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.pipeline": ("ffcv", "dali", "reference", "synthetic"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "train.progressive.kind": ("none", "linear", "stages"),
    "optim.name": ("lamb", "sgd", "adamw"),
    "optim.schedule": ("cosine", "step_free_linear", "constant"),
    "augment.mix_mode": ("batch", "pair", "elem"),
    "augment.train_interpolation": TRAIN_INTERPOLATIONS,
    "eval.interpolation": EVAL_INTERPOLATIONS,
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


def _closest_key(key: str) -> str:
    """The full dotted key meant by a mistyped one: each part replaced by the closest name valid at its
    level (``optimm.lr`` -> ``optim.lr``, ``train.progresive.kind`` -> ``train.progressive.kind``), else
    the closest of all keys (a section name alone is no key to set)."""
    cls: Any = Config
    fixed = []
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            break
        hints = typing.get_type_hints(cls)
        name = part if part in hints else _closest(part, list(hints))
        fixed.append(name)
        cls = hints[name]
    keys = all_keys()
    guess = ".".join(fixed)
    return guess if guess in keys else _closest(key, keys)


def _field_type(key: str) -> Any:
    """The annotated type of a dotted key such as ``train.progressive.kind``."""
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise ConfigError(f"unknown key {key}; did you mean {_closest_key(key)}?")
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
    positive = ["train.epochs", "train.global_batch_size", "train.train_res", "eval.res", "data.num_classes",
                "train.dist_timeout_s", "train.dist_start_timeout_s"]
    for key in positive:
        if get_value(cfg, key) <= 0:
            raise ConfigError(f"{key} must be > 0, got {get_value(cfg, key)}")
    if not 0.0 < cfg.eval.crop_pct <= 1.0:
        raise ConfigError(f"eval.crop_pct must be in (0, 1], got {cfg.eval.crop_pct}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    for key in ("augment.mixup_alpha", "augment.cutmix_alpha", "optim.weight_decay", "model.drop_path_rate",
                "model.drop_rate", "loss.label_smoothing", "train.ema_decay", "train.grad_clip", "eval.max_images"):
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
    if len(cfg.data.mean) != 3 or len(cfg.data.std) != 3 or min(cfg.data.std) <= 0:
        raise ConfigError(f"data.mean and data.std take three numbers each (RGB, 0-1 scale), std > 0; got "
                          f"{cfg.data.mean} and {cfg.data.std}")
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
        if p.kind == "linear" and p.end_epoch > cfg.train.epochs:
            raise ConfigError(f"train.progressive.end_epoch = {p.end_epoch} is past train.epochs = {cfg.train.epochs}; "
                              f"set train.progressive.end_epoch={cfg.train.epochs} (and start_epoch no later), or "
                              f"train.progressive.kind=none")
        if p.kind == "linear" and not 0 <= p.start_epoch <= p.end_epoch:
            raise ConfigError(f"train.progressive needs 0 <= start_epoch <= end_epoch, got start_epoch = "
                              f"{p.start_epoch}, end_epoch = {p.end_epoch}; set train.progressive.start_epoch to at "
                              f"most {p.end_epoch}")
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


def _leaf_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for name, value in data.items():
        keys += _leaf_keys(value, f"{prefix}{name}.") if isinstance(value, dict) else [f"{prefix}{name}"]
    return keys


def key_sources(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """Where each key a recipe sets comes from: the file's name along its ``base`` chain (the last
    file to set it), or ``--set`` for an override; keys not listed keep their default. Call it after
    :func:`load_config` accepted the same recipe and overrides."""
    chain = []
    path = Path(path)
    while True:
        with path.open("rb") as f:
            data = tomllib.load(f)
        chain.append((path, data))
        base = data.pop("base", None)
        if base is None:
            break
        path = path.parent / base
    sources: dict[str, str] = {}
    for file, data in reversed(chain):
        sources.update({k: file.name for k in _leaf_keys(data)})
    for text in overrides:
        sources[text.split("=", 1)[0].strip()] = "--set"
    return sources


def explain(cfg: Config | None = None, sources: dict[str, str] | None = None) -> str:
    """Every key with its value (the defaults, or ``cfg``'s) and its help, as commented TOML:
    what ``python -m engine.run --help-config`` prints (ffcv-imagenet's fastargs sections do this).
    With ``sources`` (:func:`key_sources`) each value says who set it: the recipe file (with the
    default it replaces), ``--set``, or ``default``."""
    lines: list[str] = []
    defaults = Config()
    if sources is not None:
        files = sorted(set(sources.values()) - {"--set"})
        lines += [f"# where each value comes from: (set by FILE) the recipe's files ({', '.join(files) or 'none'}); "
                  "(--set) the command line; (default) neither", ""]

    def table(cls: type, values: Any, name: str) -> None:
        lines.append(f"[{name}]  # {(cls.__doc__ or '').strip().splitlines()[0]}")
        nested = []
        for f in dataclasses.fields(cls):
            value = getattr(values, f.name)
            if dataclasses.is_dataclass(value):
                nested.append((f, value))
                continue
            lines.append(f"{f.name} = {toml_value(value)}  # {_origin(f'{name}.{f.name}', value)}{f.metadata['help']}")
            choices = CHOICES.get(f"{name}.{f.name}")
            if choices and not all(c in f.metadata["help"] for c in choices):
                lines[-1] += f" (one of {', '.join(choices)})"
        lines.append("")
        for f, value in nested:
            table(type(value), value, f"{name}.{f.name}")

    def _origin(key: str, value: Any) -> str:
        if sources is None:
            return ""
        where = sources.get(key)
        if where is None:
            return "(default) "
        default = get_value(defaults, key)
        by = "--set" if where == "--set" else f"set by {where}"
        return f"({by}) " if value == default else f"({by}; default {toml_value(default)}) "

    cfg = cfg or defaults
    for f in dataclasses.fields(Config):
        table(type(getattr(cfg, f.name)), getattr(cfg, f.name), f.name)
    return "\n".join(lines)


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
