"""The floor plan (README "Layout"): imports run one way, and nothing edits ``sys.path``.

    common (config schema, durable writes)  <-  pipelines, models  <-  engine (training only)
        <-  toolkit (tool logic)  <-  tools (CLIs)

Every import statement of every module (also the ones inside functions) is read with ``ast``; a
module may import its own package and the layers below it, nothing else of this project.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "common": {"common"},
    "pipelines": {"common", "pipelines"},
    "models": {"common", "models"},
    "engine": {"common", "pipelines", "models", "engine"},
    "toolkit": {"common", "pipelines", "models", "engine", "toolkit"},
    "tools": {"common", "pipelines", "models", "engine", "toolkit", "tools"},
}
PROJECT = set(ALLOWED) | {"benchmarks", "tests"}


def imported_packages(path: Path, package: str) -> set[tuple[str, int]]:
    """(top-level project package, line) of each import in ``path``; relative imports stay in ``package``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [package] if node.level else [node.module or ""]
        else:
            continue
        found |= {(n.split(".")[0], node.lineno) for n in names if n.split(".")[0] in PROJECT}
    return found


def edges_against_the_rule(root: Path = ROOT) -> list[str]:
    bad = []
    for package, allowed in ALLOWED.items():
        for path in sorted((root / package).rglob("*.py")):
            for target, line in sorted(imported_packages(path, package)):
                if target not in allowed:
                    bad.append(f"{path.relative_to(root)}:{line} imports {target}")
    return bad


def test_imports_run_one_way():
    assert not edges_against_the_rule(), "\n".join(edges_against_the_rule())


def test_every_package_is_checked():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages - {"tests"} <= set(ALLOWED), f"packages the rule does not place: {packages - set(ALLOWED)}"


def test_the_rule_sees_a_bad_edge(tmp_path):
    """The walker finds lazy and relative imports too (a rule that cannot fail checks nothing)."""
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "x.py").write_text("def f():\n    from engine.evaluate import evaluate\n")
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "y.py").write_text("import models.factory\nfrom . import config\n")
    assert edges_against_the_rule(tmp_path) == ["common/y.py:1 imports models", "pipelines/x.py:2 imports engine"]


def test_nothing_edits_sys_path():
    edits = []
    for folder in (*ALLOWED, "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                        and node.value.id == "sys"):
                    edits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not edits, f"sys.path used (the editable install makes the packages importable): {edits}"
