"""Every recipe key is read, by the package that owns its section (docs/design.md: a key that is set
but never used is silent recipe drift).

``common.config.SECTION_OWNERS`` says which package reads each section. For each leaf key
``section.key`` the owner's modules must contain an attribute read ``<x>.key`` where ``<x>`` is the
section itself: ``cfg.section.key``, or a name bound to it (``aug = cfg.augment``; a parameter
annotated ``aug: AugmentConfig``; ``self.aug = aug``). A bare ``.key`` elsewhere does not count:
``Path.name`` must not stand in for ``optim.name``. Read with ``ast``, not regular expressions.
"""
from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

from common.config import SECTION_OWNERS, Config, all_keys

ROOT = Path(__file__).resolve().parents[1]


def section_classes(cls: type = Config, prefix: str = "") -> dict[str, str]:
    """``{"augment": "AugmentConfig", "train.progressive": "ProgressiveConfig", ...}``."""
    out = {}
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out[f"{prefix}{f.name}"] = tp.__name__
            out.update(section_classes(tp, f"{prefix}{f.name}."))
    return out


def _ref(node: ast.AST) -> str | None:
    """``name`` for a Name, ``self.x`` for an attribute of self; what an alias can be."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return f"self.{node.attr}"
    return None


def reads_of(section: str, class_name: str, tree: ast.AST) -> set[str]:
    """Keys read from ``section`` in one module."""
    last = section.split(".")[-1]
    aliases: set[str] = set()

    def is_section(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == last) or _ref(node) in aliases

    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and isinstance(node.annotation, (ast.Name, ast.Constant)):
            ann = node.annotation.id if isinstance(node.annotation, ast.Name) else node.annotation.value
            if ann == class_name:
                aliases.add(node.arg)
    changed = True
    while changed:  # names bound to the section, or to a name bound to it
        changed = False
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and is_section(node.value):
                for target in node.targets:
                    name = _ref(target)
                    if name and name not in aliases:
                        aliases.add(name)
                        changed = True
    return {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and is_section(node.value)}


def unread_keys(root: Path = ROOT) -> list[str]:
    classes = section_classes()
    trees = {}
    unread = []
    for key in all_keys():
        section, name = key.rsplit(".", 1)
        owner = SECTION_OWNERS[section.split(".")[0]]
        files = sorted((root / owner).rglob("*.py"))
        trees.update({p: ast.parse(p.read_text()) for p in files if p not in trees})
        if not any(name in reads_of(section, classes[section], trees[p]) for p in files):
            unread.append(f"{key} (owner: {owner}/)")
    return unread


def test_every_section_has_an_owner_package():
    assert set(SECTION_OWNERS) == {f.name for f in dataclasses.fields(Config)}
    assert all((ROOT / pkg / "__init__.py").is_file() for pkg in SECTION_OWNERS.values())


def test_every_config_field_is_read_by_its_owner():
    assert not unread_keys(), f"config keys their owner package never reads: {unread_keys()}"


def test_a_deleted_read_is_found(tmp_path):
    """A copy of models/ without the read of model.blurpool reports exactly that key."""
    import shutil

    shutil.copytree(ROOT / "models", tmp_path / "models")
    for p in (tmp_path / "models").rglob("*.py"):
        p.write_text(p.read_text().replace(".blurpool", ".blur_pool_renamed"))
    for owner in set(SECTION_OWNERS.values()) - {"models"}:
        (tmp_path / owner).symlink_to(ROOT / owner)
    assert unread_keys(tmp_path) == ["model.blurpool (owner: models/)"]
