"""The floor plan (README "Layout", docs/design.md): imports run one way, and nothing edits ``sys.path``.

    common (config schema, durable writes)  <-  pipelines, models  <-  engine (training only)
        <-  workflows (what the tools do)  <-  tools (CLIs)

and beside them: ``tests`` and ``benchmarks`` import any of those, and share only ``tests.helpers``:
no test module is imported by another module, and tests never import a benchmark.

Every import statement of every module (also the ones inside functions) is read with ``ast``; a
module may import its own package and the layers below it, nothing else of this project. Running
one of our own scripts in a subprocess is an import too: ``[python, "-m", "engine.run", ...]``,
``[python, "tools/evaluate.py", ...]`` and ``ROOT / "tools" / "convert_imagenet.py"`` count as
edges to ``engine`` and ``tools``.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = {
    "common": {"common"},
    "pipelines": {"common", "pipelines"},
    "models": {"common", "models"},
    "engine": {"common", "pipelines", "models", "engine"},
    "workflows": {"common", "pipelines", "models", "engine", "workflows"},
    "tools": {"common", "pipelines", "models", "engine", "workflows", "tools"},
}
EVERYTHING = set(PRODUCT)
ALLOWED = {
    **PRODUCT,
    "tests.helpers": EVERYTHING | {"tests.helpers"},
    "tests": EVERYTHING | {"tests.helpers"},
    "benchmarks": EVERYTHING | {"benchmarks", "tests.helpers"},
}
PACKAGES = {"common", "pipelines", "models", "engine", "workflows", "tools", "tests", "benchmarks"}
SCRIPT = re.compile(r"^(\w+)/[\w/]+\.py$")


def target(dotted: str) -> str | None:
    """The unit a dotted module name belongs to: a top-level package, or ``tests.helpers`` /
    ``tests.<module>`` inside tests (a test module is its own unit: no one may import it)."""
    parts = dotted.split(".")
    if parts[0] not in PACKAGES:
        return None
    if parts[0] == "tests" and len(parts) > 1:
        return "tests.helpers" if parts[1] == "helpers" else f"tests.{parts[1]}"
    return parts[0]


def unit_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root).parts
    return "tests.helpers" if rel[:2] == ("tests", "helpers") else rel[0]


def _strings(nodes) -> list[str | None]:
    return [n.value if isinstance(n, ast.Constant) and isinstance(n.value, str) else None for n in nodes]


def script_edges(node: ast.AST) -> list[str]:
    """Our own scripts run as subprocesses, as dotted names: ``-m pkg.mod`` in a command list,
    ``pkg/x.py`` as a command list's element, ``... / "pkg" / "x.py"`` as a path."""
    found = []
    if isinstance(node, (ast.List, ast.Tuple)):
        items = _strings(node.elts)
        for i, s in enumerate(items):
            if s == "-m" and i + 1 < len(items) and items[i + 1]:
                found.append(items[i + 1])
            elif s and (m := SCRIPT.match(s)):
                found.append(m.group(1))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        chain, right = [], node
        while isinstance(right, ast.BinOp) and isinstance(right.op, ast.Div):
            chain.insert(0, right.right)
            right = right.left
        chain.insert(0, right)
        items = _strings(chain)
        for s, nxt in zip(items, items[1:]):
            if s in PACKAGES and nxt and nxt.endswith(".py"):
                found.append(s)
    return found


def edges(path: Path, unit: str) -> set[tuple[str, int]]:
    """(unit it reaches, line) of each import and script run in ``path``; relative imports stay in ``unit``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [unit] if node.level else [node.module or ""]
            if node.module == "tests.helpers" or (node.module or "").startswith("tests.helpers."):
                names = ["tests.helpers"]
        else:
            names = script_edges(node)
        found |= {(t, node.lineno) for n in names if (t := target(n) if n != unit else unit)}
    return found


def edges_against_the_rule(root: Path = ROOT) -> list[str]:
    bad = []
    for top in sorted(PACKAGES):
        for path in sorted((root / top).rglob("*.py")):
            unit = unit_of(path, root)
            allowed = ALLOWED[unit] | ({unit} if unit in PRODUCT else set())
            for reached, line in sorted(edges(path, unit)):
                if reached not in allowed and not (unit == "tests" and reached == f"tests.{path.stem}"):
                    bad.append(f"{path.relative_to(root)}:{line} reaches {reached}")
    return bad


def test_imports_run_one_way():
    assert not edges_against_the_rule(), "\n".join(edges_against_the_rule())


def test_every_package_is_checked():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages <= PACKAGES, f"packages the rule does not place: {packages - PACKAGES}"


def test_the_rule_sees_a_bad_edge(tmp_path):
    """Lazy and relative imports, scripts run as subprocesses, tests importing tests or benchmarks,
    benchmarks importing a test: all seen (a rule that cannot fail checks nothing)."""
    files = {
        "pipelines/x.py": "def f():\n    from engine.evaluate import evaluate\n",
        "common/y.py": "import models.factory\nfrom . import config\n",
        "workflows/z.py": "import sys\ncmd = [sys.executable, ROOT / 'tools' / 'convert_imagenet.py']\n"
                          "other = ROOT / 'tools' / 'convert_imagenet.py'\n",
        "engine/w.py": "cmd = ['python', '-m', 'workflows.sweep']\nok = ['python', '-m', 'engine.run']\n",
        "tests/test_a.py": "from tests.test_b import helper\nfrom benchmarks.faults import Faults\n"
                           "from tests.helpers.cli import run_main\ncmd = ['python', '-m', 'benchmarks.gpu_check']\n",
        "tests/helpers/h.py": "from tests.test_a import x\n",
        "benchmarks/b.py": "from tests.test_a import x\nfrom tests.helpers import faults\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert sorted(edges_against_the_rule(tmp_path)) == [
        "benchmarks/b.py:1 reaches tests.test_a", "common/y.py:1 reaches models", "engine/w.py:1 reaches workflows",
        "pipelines/x.py:2 reaches engine", "tests/helpers/h.py:1 reaches tests.test_a",
        "tests/test_a.py:1 reaches tests.test_b", "tests/test_a.py:2 reaches benchmarks",
        "tests/test_a.py:4 reaches benchmarks", "workflows/z.py:2 reaches tools", "workflows/z.py:3 reaches tools"]


def test_nothing_edits_sys_path():
    edits = []
    for folder in PACKAGES:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                        and node.value.id == "sys"):
                    edits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not edits, f"sys.path used (the editable install makes the packages importable): {edits}"
