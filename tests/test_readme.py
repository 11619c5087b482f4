"""The README and every tool's --help as a newcomer follows them on a fresh clone after `make demo`: each
file path they name is in the repository, is made by the demo, is written by a command the README
itself runs (--out, --json), is what training a shipped recipe writes (checkpoint names computed from
the recipe and the sampler, not copied from the README), or is a dataset the user brings (a short
list, each with its reason)."""
from __future__ import annotations

import math
import re
from pathlib import Path


from common.config import load_config
from engine import checkpoint as ckpt
from pipelines.convert.demo_data import CLASS_DIRS
from pipelines.sampler import repeat_aug_length
from tests.helpers.cli import SCRIPTS, TYPED, help_in_process

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_TRAIN = 1_281_167  # ILSVRC2012 train images
FMNIST_TRAIN_PER_CLASS = 6_000  # tools/make_demo_data.py writes all of Fashion-MNIST's train set
GPUS = 8  # the README's runs: one node, 8 GPUs
FILE = re.compile(r"\.(toml|py|pt|safetensors|png|json|jsonl|md|csv|tsv|txt|beton|sh|tar|idx)$")
USER_DATA = {  # what the user brings; the README names them as examples of their own data
    "/data/ILSVRC2012": "the ImageNet download",
    "data/imagenet": "the converter's output for ImageNet (the recipes' data.root)",
    "imagenetv2-matched-frequency-format-val": "the ImageNet-V2 download",
    "LOC_val_solution.csv": "Kaggle's val labels",
    "my_sweep.toml": "the user's own sweep file",
    "/shared/runs/a1": "a run folder on the user's shared file system",
    "/shared/rsb-trainer": "the user's checkout on the cluster (the --dry-run example's working folder)",
    "/shared/rsb-trainer/.venv/bin/python": "that checkout's set-up Python",
}
# what tools/launch_slurm.py keeps in OUT/slurm/ (workflows/slurm_launch.py: the script, the frozen recipe,
# the submissions, the log, srun's own messages, the current job id, every job id)
LAUNCH_FILES = ("job.sh", "recipe.toml", "launch.json", "job.log", "srun.log", "job", "jobs.txt")
WRITTEN_ELSEWHERE = {  # files a command the README names writes, on a machine this suite does not assume
    "benchmarks/results/gpu.md": "written by python -m benchmarks.gpu_check on a CUDA GPU",
}
TOOL_FILES = {"profile": ("profile.json", "profile.png"),
              "sweeps": ("results.csv", "results.md", "sweep.png", "curves.png", "study.journal")}


def last_checkpoint(recipe: str, train_images: int, world: int) -> str:
    """The end-of-training checkpoint a run of ``recipe`` writes: epochs counted from 0 (the last is
    epochs - 1) and its global step, from the sampler's per-rank length and the per-device batch."""
    cfg = load_config(ROOT / "recipes" / recipe)
    repeats = cfg.augment.repeated_aug
    per_rank = repeat_aug_length(train_images, world, repeats) if repeats else math.ceil(train_images / world)
    steps = per_rank // (cfg.train.global_batch_size // world)
    epochs = cfg.train.epochs + cfg.optim.cooldown_epochs
    return ckpt.checkpoint_name(epochs - 1, epochs * steps)


def demo_outputs() -> set[str]:
    """What `make demo` leaves (tools/demo.py: data, conversion, the run of recipes/demo.toml)."""
    demo_ckpt = last_checkpoint("demo.toml", FMNIST_TRAIN_PER_CLASS * len(CLASS_DIRS), 1)
    run = ["metrics.jsonl", "metrics.png", "model.safetensors", "best.safetensors", demo_ckpt]
    return {"data/demo/src", "data/demo/converted", "data/demo/converted/manifest.json", "runs/demo",
            *(f"runs/demo/{f}" for f in run)}


def recipe_outputs() -> set[str]:
    """What `python -m engine.run recipes/X.toml` writes into its default run folder runs/X."""
    out = set()
    for recipe in (ROOT / "recipes").glob("*.toml"):
        run = f"runs/{recipe.stem}"
        out |= {run, f"{run}/model.safetensors", f"{run}/best.safetensors", f"{run}/metrics.jsonl"}
        if recipe.stem != "demo":
            out.add(f"{run}/{last_checkpoint(recipe.name, IMAGENET_TRAIN, GPUS)}")
    return out


def code_spans(text: str) -> list[str]:
    """The commands of the bash blocks (without their comments), inline code and link targets (the
    pictures). Untagged blocks are program output and the layout tree."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = ["\n".join(ln.split(" # ")[0] for ln in b.splitlines()) for b in blocks]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return commands + re.findall(r"`([^`\n]+)`", prose) + re.findall(r"\]\(([^)\s]+)\)", prose)


def command_outputs(spans: list[str]) -> set[str]:
    """Files and folders the README's own commands write: the value after --out / --json."""
    tokens = " ".join(spans).split()
    return {tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t in ("--out", "--json")}


TOP = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")} | {"runs", "data", "..", ""}
NOT_IN_A_CLONE = {"data", "runs", "out", "wandb", "build"}  # .gitignore: what the demo and the tools write


def in_clone(path: str) -> bool:
    """``path`` is in a fresh clone: inside the repository, outside the folders that runs write (which
    exist here after a `make demo`, and must be explained as its outputs, as on a clean CI clone)."""
    full = (ROOT / path).resolve()
    if not full.is_relative_to(ROOT) or full.relative_to(ROOT).parts[0] in NOT_IN_A_CLONE:
        return False
    return full.exists()


def paths(spans: list[str]) -> set[str]:
    """Every token of the code that names a file or folder: a name with a file extension, or a path
    from the repository's top level (runs/, data/, recipes/, ...), above it or absolute; no options,
    placeholders or globs (``img/s`` or ``bf16/fp16`` are no paths)."""
    found = set()
    for span in spans:
        for token in re.split(r"[\s,;:()\"'=|]+", span):
            token = token.rstrip(".").strip("\\").rstrip("/")
            if not token or token.startswith(("-", "http", "$")) or re.search(r"[<>*{}@\[\]]", token):
                continue
            if token.split("/")[0].split(".")[0].isupper():  # a placeholder: OUT/profile.json, SWEEP.toml
                continue
            if (FILE.search(token) and not token.startswith(".")) or ("/" in token and token.split("/")[0] in TOP):
                found.add(token)
    return found


def explain(path: str, made: set[str]) -> str | None:
    """Why ``path`` is fine to name, or None."""
    if in_clone(path) or in_clone(f"recipes/{path}"):
        return "in the repository"
    if "/" not in path and any(in_clone(p.relative_to(ROOT).as_posix()) for p in ROOT.glob(f"*/**/{path}")):
        return "a file of the repository named alone"
    if path in USER_DATA:
        return USER_DATA[path]
    if path in WRITTEN_ELSEWHERE:
        return WRITTEN_ELSEWHERE[path]
    if path in made:  # each file by its own name: a folder made does not vouch for what is named in it
        return "made by the demo, a README command or a recipe's run"
    if "/" not in path and any(m.endswith("/" + path) for m in made):  # a run folder's file named alone
        return "a file of a run folder"
    if path.startswith("python") or path.startswith("benchmarks."):
        return "a module"
    return None


def test_checkpoint_names_are_the_ones_the_code_writes():
    # cross-checks of the computation itself: Fashion-MNIST 60,000 / 256 = 234 steps (drop_last);
    # ImageNet under timm's repeated augmentation on 8 ranks: 1,281,024 // 8 = 160,128 per rank // 256
    assert last_checkpoint("demo.toml", 60_000, 1) == "ckpt-e0005-s000001404.pt"
    assert last_checkpoint("a1.toml", IMAGENET_TRAIN, GPUS) == "ckpt-e0599-s000375000.pt"
    run = ROOT / "runs" / "demo"
    if (run / "metrics.jsonl").is_file():  # after a real `make demo` here: its files are the ones computed
        made = {p.relative_to(ROOT).as_posix() for p in run.iterdir()}
        assert {m for m in demo_outputs() if m.startswith("runs/demo/")} <= made


def test_every_path_the_readme_and_the_help_name_exists_or_is_made(monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    spans = code_spans(readme)
    helps = []
    for name, module in sorted(SCRIPTS.items()):
        typed = TYPED[module]
        argv0 = str(ROOT / "engine" / "run.py") if module == "engine.run" else typed.split()[1]
        helps.append(help_in_process(module, argv0, monkeypatch, capsys))
    spans += helps
    written = command_outputs(spans) | {"runs/sweeps/a3_lr_demo", "runs/sweeps/a3_lr_asha_demo"}  # the demo sweeps'
    # default folders (tools/sweep.py: runs/sweeps/<sweep file name>)
    made = demo_outputs() | recipe_outputs() | written | \
        {f"{out}/{f}" for out in written for kind, files in TOOL_FILES.items() if kind in out for f in files} | \
        {f"{out}/slurm/{f}" for out in written for f in LAUNCH_FILES}
    named = paths(spans)
    assert {"runs/demo/model.safetensors", "runs/a1/ckpt-e0599-s000375000.pt", "recipes/a1.toml",
            "docs/images/gradcam.png"} <= named  # the extraction sees the README's examples
    unexplained = sorted(p for p in named if explain(p, made) is None)
    assert not unexplained, f"paths named that a fresh clone + make demo does not have: {unexplained}"
