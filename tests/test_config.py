"""Recipe loading: inheritance, overrides, strict validation, and the recipes' Table 1 values."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from common.config import (Config, ConfigError, all_keys, config_from_dict, load_config, to_dict, to_toml)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.run", *args], cwd=ROOT, capture_output=True, text=True)


# --------------------------------------------------------------------------- Table 1
# Values of "ResNet strikes back" Table 1 (arXiv:2110.00476) for ResNet-50, typed in independently of
# the recipe files so that a drifted recipe fails here.
TABLE1 = {
    "a1": dict(epochs=600, bs=2048, res=224, lr=5e-3, wd=0.01, ls=0.1, dp=0.05, ra=3, aug="rand-m7-mstd0.5-inc1",
               mixup=0.2),
    "a2": dict(epochs=300, bs=2048, res=224, lr=5e-3, wd=0.02, ls=0.0, dp=0.05, ra=3, aug="rand-m7-mstd0.5-inc1",
               mixup=0.1),
    "a3": dict(epochs=100, bs=2048, res=160, lr=8e-3, wd=0.02, ls=0.0, dp=0.0, ra=0, aug="rand-m6-mstd0.5-inc1",
               mixup=0.1),
}


@pytest.mark.parametrize("name", sorted(TABLE1))
def test_rsb_recipes_match_table1(name):
    t = TABLE1[name]
    cfg = load_config(RECIPES / f"{name}.toml")
    assert cfg.model.arch == "resnet50"
    assert (cfg.train.epochs, cfg.train.global_batch_size, cfg.train.train_res) == (t["epochs"], t["bs"], t["res"])
    assert (cfg.eval.res, cfg.eval.crop_pct) == (224, 0.95)
    assert cfg.optim.name == "lamb" and cfg.optim.lr == t["lr"] and cfg.optim.weight_decay == t["wd"]
    assert (cfg.optim.warmup_epochs, cfg.optim.schedule, cfg.optim.cooldown_epochs) == (5, "cosine", 0)
    assert (cfg.optim.warmup_lr, cfg.optim.min_lr) == (1e-4, 1e-6)
    assert cfg.loss.name == "bce" and cfg.loss.label_smoothing == t["ls"] and cfg.loss.bce_target_thresh == 0.2
    assert cfg.model.drop_path_rate == t["dp"] and cfg.model.drop_rate == 0.0
    assert cfg.augment.repeated_aug == t["ra"] and cfg.augment.rand_augment == t["aug"]
    assert (cfg.augment.mixup_alpha, cfg.augment.cutmix_alpha) == (t["mixup"], 1.0)
    assert cfg.augment.hflip == 0.5 and cfg.augment.random_erasing == 0.0
    assert cfg.train.ema_decay == 0.0 and cfg.train.grad_clip == 0.0
    assert cfg.train.precision == "auto"  # mixed precision on every GPU: bf16 or fp16 (tests/test_precision.py)


def test_print_config_round_trips_and_matches_table1():
    out = run_cli("recipes/a1.toml", "--print-config")
    assert out.returncode == 0, out.stderr
    data = tomllib.loads(out.stdout)
    assert data["train"]["epochs"] == 600 and data["optim"]["lr"] == 5e-3 and data["loss"]["label_smoothing"] == 0.1
    assert config_from_dict(data) == load_config(RECIPES / "a1.toml")


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.toml")), ids=lambda p: p.name)
def test_every_recipe_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    again = load_config(write(tmp_path, "x.toml", to_toml(cfg)))
    assert again == cfg


def test_ffcv_schedules_ramp_160_to_192():
    for e, (s, f) in {16: (11, 13), 40: (29, 34), 88: (65, 76)}.items():
        cfg = load_config(RECIPES / f"ffcv_rn50_{e}ep.toml")
        p = cfg.train.progressive
        assert (cfg.train.epochs, p.kind, p.start_res, p.end_res, p.start_epoch, p.end_epoch) == (e, "linear", 160, 192, s, f)
        assert cfg.optim.name == "sgd" and cfg.optim.schedule == "step_free_linear" and cfg.model.blurpool


def test_resnetrs50_recipe():
    cfg = load_config(RECIPES / "resnetrs50.toml")
    assert (cfg.model.arch, cfg.train.epochs, cfg.train.train_res, cfg.eval.res) == ("resnetrs50", 350, 160, 224)
    assert (cfg.optim.name, cfg.optim.weight_decay, cfg.train.ema_decay, cfg.model.drop_rate) == ("sgd", 4e-5, 0.9999, 0.25)
    assert cfg.optim.lr == pytest.approx(0.1 * cfg.train.global_batch_size / 256)


# --------------------------------------------------------------------------- inheritance / overrides
def test_base_inheritance_merges_tables(tmp_path):
    write(tmp_path, "parent.toml", '[optim]\nlr = 0.5\nweight_decay = 0.1\n[train]\nepochs = 7\n')
    child = write(tmp_path, "child.toml", 'base = "parent.toml"\n[optim]\nlr = 0.25\n')
    cfg = load_config(child)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.epochs) == (0.25, 0.1, 7)


def test_base_chain_of_three_and_nested_table(tmp_path):
    write(tmp_path, "a.toml", '[train.progressive]\nkind = "linear"\nstart_epoch = 1\nend_epoch = 2\n[train]\nepochs = 5\n')
    write(tmp_path, "b.toml", 'base = "a.toml"\n[train.progressive]\nend_epoch = 3\n')
    cfg = load_config(write(tmp_path, "c.toml", 'base = "b.toml"\n[train]\nepochs = 4\n'))
    assert (cfg.train.epochs, cfg.train.progressive.kind, cfg.train.progressive.start_epoch,
            cfg.train.progressive.end_epoch) == (4, "linear", 1, 3)


def test_overrides_are_typed():
    cfg = load_config(RECIPES / "a3.toml", ["optim.lr=0.004", "train.channels_last=false", "data.pipeline=reference",
                                            "augment.rand_augment=rand-m9-mstd0.5", "train.progressive.kind=stages",
                                            "augment.scale=[0.35, 1]", "train.epochs=3"])
    assert cfg.optim.lr == 0.004 and cfg.train.channels_last is False and cfg.data.pipeline == "reference"
    assert cfg.augment.rand_augment == "rand-m9-mstd0.5" and cfg.train.progressive.kind == "stages"
    assert cfg.augment.scale == [0.35, 1.0] and isinstance(cfg.augment.scale[1], float) and cfg.train.epochs == 3


def test_override_int_widens_to_float_and_quoted_string():
    cfg = load_config(RECIPES / "a3.toml", ["optim.lr=1", 'log.run_name="my run"'])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.log.run_name == "my run"


# --------------------------------------------------------------------------- every bad input, one line each
BAD_OVERRIDES = [
    ("optim.lrr=1", "unknown key optim.lrr; did you mean optim.lr?"),
    ("optimm.lr=1", "unknown key optimm.lr; did you mean optim.lr?"),  # the full key, not the section
    ("train.progresive.kind=none", "unknown key train.progresive.kind; did you mean train.progressive.kind?"),
    ("optim.lr=abc", "--set optim.lr=abc: expected float"),
    ("train.epochs=1.5", "train.epochs: expected an integer, got 1.5"),
    ("train.channels_last=yes", "--set train.channels_last=yes: expected bool"),
    ("data.pipeline=ffvc", "data.pipeline = 'ffvc' is not one of ffcv, dali, reference, synthetic; did you mean 'ffcv'?"),
    ("train.precision=fp8", "train.precision = 'fp8' is not one of"),
    ("optim", "--set 'optim': expected section.key=value"),
    ("lr=1", "--set lr: expected section.key=value"),
    ("optim=1", "--set optim: expected section.key=value"),
    ("train.progressive=1", "--set train.progressive: names a section"),
    ("eval.crop_pct=1.5", "eval.crop_pct must be in (0, 1]"),
    ("augment.repeated_aug=1", "augment.repeated_aug is a repeat count >= 2"),
    ("augment.hflip=2", "augment.hflip must be in [0, 1]"),
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("train.epochs=0", "train.epochs must be > 0"),
    ("augment.rand_augment=m7", "augment.rand_augment must be a timm string"),
    ("augment.scale=[0.1]", "take two numbers each"),
    ("augment.scale=0.1", "augment.scale: expected a list of float"),
    ("optim.lr=inf", "optim.lr: expected a finite number"),
    ("loss.name=ce", "with loss.name=ce also set loss.bce_target_thresh=0"),  # a3 sets the threshold 0.2
    ("train.progressive.kind=linear", None),  # valid on its own (start=end=0)
    ("train.progressive.start_epoch=500", "needs 0 <= start_epoch <= end_epoch, got start_epoch = 500"),
    ("train.progressive.end_epoch=500", "train.progressive.end_epoch = 500 is past train.epochs = 100; set "
                                        "train.progressive.end_epoch=100"),
]


@pytest.mark.parametrize("override,message", BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_bad_override_messages(override, message):
    sets = [override] if not override.startswith("train.progressive.") else ["train.progressive.kind=linear", override]
    if message is None:
        load_config(RECIPES / "a3.toml", sets)
        return
    with pytest.raises(ConfigError) as e:
        load_config(RECIPES / "a3.toml", sets)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


BAD_FILES = [
    ("[optim]\nlrr = 1\n", "unknown key optim.lrr; did you mean optim.lr?"),
    ("[optimizer]\nlr = 1\n", "unknown key optimizer; did you mean optim?"),
    ("[optim]\nlr = \"fast\"\n", "optim.lr: expected a number, got 'fast'"),
    ("[train]\nchannels_last = 1\n", "train.channels_last: expected true or false, got 1"),
    ("[train]\nepochs = true\n", "train.epochs: expected an integer, got True"),
    ("optim = 3\n", "optim: expected a table [optim], got 3"),
    ("[optim\nlr = 1\n", "not valid TOML"),
    ('base = "missing.toml"\n', "recipe not found:"),
    ("base = 3\n", "base must be a file name string"),
    ('[loss]\nname = "focal"\n', "loss.name = 'focal' is not one of bce, ce"),
    ("[augment]\nbetas = [1, 2]\n", "unknown key augment.betas"),
]


@pytest.mark.parametrize("text,message", BAD_FILES, ids=[m for _, m in BAD_FILES])
def test_bad_recipe_files(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "bad.toml", text))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_inheritance_loop(tmp_path):
    write(tmp_path, "x.toml", 'base = "y.toml"\n')
    write(tmp_path, "y.toml", 'base = "x.toml"\n')
    with pytest.raises(ConfigError, match="recipe inheritance loops: x.toml -> y.toml -> x.toml"):
        load_config(tmp_path / "x.toml")


def test_missing_recipe():
    with pytest.raises(ConfigError, match="recipe not found: nope.toml"):
        load_config("nope.toml")


# --------------------------------------------------------------------------- CLI contract
def test_cli_unknown_key_exits_2_with_one_line_naming_lr():
    out = run_cli("recipes/a1.toml", "--set", "optim.lrr=1")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim.lr" in lines[0] and "Traceback" not in out.stderr


def test_cli_wrong_type_and_missing_recipe_exit_2():
    for args in (["recipes/a1.toml", "--set", "train.epochs=many"], ["recipes/nope.toml"]):
        out = run_cli(*args)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_defaults_cover_every_key():
    keys = all_keys()
    assert "train.progressive.kind" in keys and "optim.lr" in keys
    assert set(to_dict(Config())) == {"model", "data", "train", "eval", "optim", "augment", "loss", "checkpoint", "log"}


def test_help_config_lists_every_key_with_a_help_string():
    """ffcv-imagenet's fastargs habit: each recipe key says what it does (`--help-config`)."""
    import dataclasses
    import subprocess
    import sys

    from common.config import Config, all_keys

    def fields(cls, prefix=""):
        for f in dataclasses.fields(cls):
            yield f"{prefix}{f.name}", f
            if dataclasses.is_dataclass(f.type) or isinstance(f.default_factory, type):
                sub = f.default_factory if isinstance(f.default_factory, type) else None
                if sub and dataclasses.is_dataclass(sub):
                    yield from fields(sub, f"{prefix}{f.name}.")

    missing = [name for name, f in fields(Config) if len(f.metadata.get("help", "").strip()) < 10]
    assert not missing, f"keys without a help string: {missing}"
    out = subprocess.run([sys.executable, "-m", "engine.run", "recipes/a1.toml", "--help-config"],
                         capture_output=True, text=True, check=True).stdout
    sections, listed = "", set()
    for line in out.splitlines():
        if line.startswith("["):
            sections = line[1:line.index("]")]
        elif " = " in line:
            listed.add(f"{sections}.{line.split(' = ')[0]}")
            assert "  # " in line, line
    assert listed == set(all_keys())
    assert 'rand_augment = "rand-m7-mstd0.5-inc1"' in out  # the recipe's values, not the defaults


def test_help_config_marks_what_the_recipe_sets():
    """Each value says whether the recipe chain (which file), --set or the default gives it; checked
    against the TOML files themselves, read here with tomllib."""
    import subprocess
    import sys
    import tomllib

    out = subprocess.run([sys.executable, "-m", "engine.run", "recipes/demo.toml", "--set", "train.epochs=3",
                          "--help-config"], capture_output=True, text=True, check=True, cwd=RECIPES.parent).stdout

    def leaves(table, prefix=""):
        for k, v in table.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]

    setter = {}  # key -> the last file of the chain demo -> a3 -> a2 -> a1 that sets it
    path = RECIPES / "demo.toml"
    chain = []
    while path:
        data = tomllib.loads(path.read_text())
        chain.append((path.name, data))
        path = RECIPES / data.pop("base") if "base" in data else None
    for name, data in reversed(chain):
        setter.update({k: name for k, _ in leaves(data)})
    assert setter["model.arch"] == "demo.toml" and setter["optim.name"] != "demo.toml"  # the chain matters
    section, seen = "", {}
    for line in out.splitlines():
        if line.startswith("["):
            section = line[1:line.index("]")]
        elif " = " in line:
            key = f"{section}.{line.split(' = ')[0]}"
            seen[key] = line.split("  # ", 1)[1]
    assert seen["train.epochs"].startswith("(--set; default 100) ")
    assert seen["model.arch"].startswith('(set by demo.toml; default "resnet50") ')
    for key, origin in seen.items():
        if key == "train.epochs":
            continue
        if key in setter:
            assert origin.startswith(f"(set by {setter[key]}"), (key, origin)
        else:
            assert origin.startswith("(default) "), (key, origin)
    assert sum(o.startswith("(default) ") for o in seen.values()) >= 10
