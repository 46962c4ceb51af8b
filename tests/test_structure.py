"""The rules of the house (docs/design.md), held by reading the code's own imports.

- Each tier imports only what stands to its left: spec <- estimate <- search <- report <- cli; run stands
  on spec; check may use estimate and run; only cli imports across everything.
- estimate, search, report (and spec) load no torch: a plan for 10,000 GPUs is estimated where torch is
  not installed.
- Imports between shardwise modules sit at module top, where a reader sees the real graph. The one
  exception: a module that loads no torch imports a torch-loading one inside the function that needs it.
- No cycle among module-level imports; no empty package.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "shardwise"

# tier -> the tiers it may import (besides itself); the ground floor (errors, units) is open to all
GROUND = {"errors", "units", "paths"}
ALLOWED = {
    "spec": set(),
    "estimate": {"spec"},
    "search": {"spec", "estimate"},
    "report": {"spec", "estimate", "search"},
    "export": {"spec", "estimate"},
    "run": {"spec"},
    "trace": {"spec", "estimate", "run"},
    "check": {"spec", "estimate", "run", "trace"},
    "validate": {"spec", "estimate"},
    "cli": {"spec", "estimate", "search", "report", "export", "run", "check", "trace", "validate", "serve"},
    "serve": {"spec", "estimate", "search", "report", "export", "cli"},
    "": {"spec", "estimate", "search"},  # shardwise/__init__.py: the Python API
    "__main__": {"cli"},
}
TORCH_FREE = ("spec", "estimate", "search", "report", "export", "validate", "errors", "units", "paths")


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _tier(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _targets(node: ast.AST, module: str) -> list[str]:
    """The modules an import statement loads (a `from pkg import submodule` loads the submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            here = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
        subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
        return subs or [base]
    return []


@cache
def _imports(module: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(imports at module level, imports inside functions), as module names."""
    tree = ast.parse(MODULES[module].read_text())
    top, inner = [], []
    for node in tree.body:
        top += _targets(node, module)
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                inner += _targets(node, module)
    return tuple(top), tuple(inner)


def _shardwise(names) -> list[str]:
    return [n for n in names if n == "shardwise" or n.startswith("shardwise.")]


@cache
def _loads_torch(module: str) -> bool:
    """Importing `module` loads torch: some module it loads (through module-level imports, its own
    or its parent packages', followed to the end) imports torch at module level."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        for t in _imports(m)[0]:
            if t.split(".")[0] == "torch":
                return True
            if t in MODULES:
                todo.append(t)
    return False


def test_each_tier_imports_only_what_stands_to_its_left():
    wrong = []
    for module in MODULES:
        tier = _tier(module)
        if tier in GROUND:
            allowed = set()
        else:
            allowed = ALLOWED[tier] | {tier}
        top, inner = _imports(module)
        for target in _shardwise(top + inner):
            t = _tier(target)
            if t and t not in GROUND and t not in allowed:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the arrows: " + ", ".join(wrong)


def test_imports_sit_at_module_top_except_torch_loading_ones():
    hidden = []
    for module in MODULES:
        for target in _shardwise(_imports(module)[1]):
            if not (_loads_torch(target) and not _loads_torch(module)):
                hidden.append(f"{module} imports {target} inside a function")
    assert not hidden, "; ".join(hidden)


def test_no_cycle_among_module_level_imports():
    graph = {m: [t for t in _shardwise(_imports(m)[0]) if t in MODULES and t != m] for m in MODULES}
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(m, path):
        state[m] = 1
        for t in graph[m]:
            # a package's __init__ re-exporting its own submodules is not a loop back into it
            if t == m.rsplit(".", 1)[0] and MODULES[t].name == "__init__.py":
                continue
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t) :] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])


def test_no_empty_package():
    for init in PACKAGE.rglob("__init__.py"):
        siblings = [p for p in init.parent.iterdir() if p.name != "__init__.py" and (p.suffix == ".py" or p.is_dir())]
        siblings = [p for p in siblings if p.name != "__pycache__"]
        assert siblings or init.read_text().strip(), f"{init.parent.relative_to(ROOT)} is an empty package"


@pytest.mark.parametrize("tier", TORCH_FREE)
def test_torch_free_tiers_load_no_torch(tier):
    """Import every module of the tier in a fresh interpreter where `import torch` fails."""
    modules = [m for m in MODULES if _tier(m) == tier]
    assert modules
    code = "import sys; sys.modules['torch'] = None\n" + "".join(f"import {m}\n" for m in modules)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr.strip().splitlines()[-1]
    assert not any(_loads_torch(m) for m in modules)


def test_estimate_and_plan_run_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from shardwise.cli import main\n"
        "assert main(['estimate', 'llama-3.1-8b', '--gpus', '8', '--json']) in (0, 1)\n"
        "assert main(['plan', 'llama-3.1-8b', '--gpus', '8', '--json']) in (0, 1)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr.strip()[-500:]


def test_the_guard_sees_a_real_violation():
    """The rules above could fail: run/ (torch) standing below report/ would be caught."""
    assert _loads_torch("shardwise.run.engine")
    assert not _loads_torch("shardwise.estimate")
    assert "run" not in ALLOWED["report"] and "report" not in ALLOWED["check"]
    assert _tier("shardwise.check.compare") == "check" and _tier("shardwise") == ""
