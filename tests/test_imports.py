"""Every module of specrt imports on its own, and the import graph has no cycle.

Two checks:

* static: the module-level imports of every file under specrt/ (the Triton kernels included) (function
  bodies excluded: lazy imports are how a cycle is broken) form an acyclic graph; and
  the ops package imports nothing of specrt beyond itself, specrt.kernels and
  specrt._C (so it can never import a caller back, as specrt/ops.py and
  specrt/verify.py once imported each other).
* dynamic: each module is imported first thing in a fresh interpreter state: one
  subprocess imports the third-party dependencies, then forks a child per module
  (no specrt module loaded before it), so a module that only works when something
  else was imported first fails here. (Modules that ``import specrt`` itself loads
  need no child of their own: importing one of them first runs specrt/__init__.py
  first, which is the ``specrt`` child.)
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# where the package's files live (the Triton kernels are specrt/kernels/)
PACKAGE_DIRS = {"specrt": ROOT / "specrt"}


def _modules() -> dict[str, Path]:
    """module name -> file, for every .py under the package dirs."""
    out = {}
    for pkg, base in PACKAGE_DIRS.items():
        for f in sorted(base.rglob("*.py")):
            rel = f.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
                continue
            name = ".".join([pkg, *parts])
            out[name] = f
    return out


MODULES = _modules()
# compiled extensions (specrt._C): imported like modules, import nothing of specrt
EXTENSIONS = {f"{pkg}.{f.name.split('.')[0]}" for pkg, base in PACKAGE_DIRS.items()
              for pat in ("*.so", "*.pyd") for f in base.glob(pat)}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _module_level_imports(tree: ast.Module, lazy: bool = False):
    """Import nodes executed when the module is imported (not inside def bodies, nor
    under ``if TYPE_CHECKING:``); every import node with ``lazy``."""
    if lazy:
        yield from (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
        return
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def _edges(name: str, lazy: bool = False) -> set[str]:
    """The specrt modules ``name`` imports at module level (anywhere with ``lazy``)."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    here = name if _is_package(name) else name.rpartition(".")[0]
    out = set()
    for node in _module_level_imports(tree, lazy):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                up = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import sub` imports the submodule; `from pkg import name` the package
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES.keys() | EXTENSIONS
                       else base for a in node.names]
        for t in targets:
            if t in EXTENSIONS:
                continue
            while t and t not in MODULES:          # `import specrt.x.y` with y not a module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


GRAPH = {m: _edges(m) for m in MODULES}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(u):
        color[u] = GREY
        stack.append(u)
        for v in sorted(graph[u]):
            if color[v] == GREY:
                return stack[stack.index(v):] + [v]
            if color[v] == WHITE and (c := visit(v)):
                return c
        stack.pop()
        color[u] = BLACK
        return None

    for u in sorted(graph):
        if color[u] == WHITE and (c := visit(u)):
            return c
    return None


def test_module_list_sane():
    for m in ("specrt", "specrt.ops", "specrt.ops.attention", "specrt.ops.kv",
              "specrt.ops.verify", "specrt.ops._backend", "specrt.model.llama",
              "specrt.kernels.attention"):
        assert m in MODULES, m
    assert "specrt.verify" not in MODULES, "specrt/verify.py is back: verify lives in specrt.ops"


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    # what the old specrt/ops.py <-> specrt/verify.py pair looked like to the parser
    # (the lazy import hid the cycle from the interpreter, hence the lazy=True ops check)
    old_ops = ast.parse("from specrt.verify import verify_tree\n")
    old_verify = ast.parse("import torch\ndef _run():\n    from specrt.ops import backend_for\n")
    assert [n.module for n in _module_level_imports(old_ops)] == ["specrt.verify"]
    assert [n.names[0].name for n in _module_level_imports(old_verify)] == ["torch"]
    assert [getattr(n, "module", None) for n in _module_level_imports(old_verify, lazy=True)
            ] == [None, "specrt.ops"]
    lazy = ast.parse("if TYPE_CHECKING:\n    import a\nelse:\n    import b\n")
    assert [n.names[0].name for n in _module_level_imports(lazy)] == ["b"]


def test_no_import_cycle():
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_ops_imports_only_itself_kernels_and_native():
    """Lazy imports (inside functions) included: the old cycle hid behind one."""
    allowed = ("specrt.ops", "specrt.kernels")
    for m in MODULES:
        if m == "specrt.ops" or m.startswith("specrt.ops."):
            bad = {t for t in _edges(m, lazy=True) if not t.startswith(allowed)}
            assert not bad, f"{m} imports {sorted(bad)}"
    # the old cycle, named: specrt.ops must not import specrt.verify (nor the model / engine)
    reach, todo = set(), ["specrt.ops"]
    while todo:
        for t in GRAPH[todo.pop()]:
            if t not in reach:
                reach.add(t)
                todo.append(t)
    assert not reach & {"specrt.verify", "specrt.engine", "specrt.model.llama", "specrt"}


def test_ops_modules_small():
    for m, f in MODULES.items():
        if m.startswith("specrt.ops"):
            n = len(f.read_text().splitlines())
            assert n <= 600, f"{f} has {n} lines"


_FORK_IMPORTER = textwrap.dedent("""
    import importlib, json, os, sys, traceback
    # third-party dependencies first (shared by every child); no specrt module yet
    import numpy, torch  # noqa: F401
    for dep in ("triton", "safetensors", "tokenizers", "gguf", "jinja2", "tqdm"):
        try:
            importlib.import_module(dep)
        except ImportError:
            pass
    assert not any(m == "specrt" or m.startswith("specrt.") for m in sys.modules)
    results = {}

    def specrt_modules():
        return sorted(m for m in sys.modules if m == "specrt" or m.startswith("specrt."))

    for name in json.loads(sys.argv[1]):
        # `import specrt.x` runs specrt/__init__.py first; a module that import loads is
        # then already there, so importing it first is importing specrt first
        if name != "specrt" and results.get("specrt", {}).get("ok") and (
                name in results["specrt"]["loaded"]):
            results[name] = {"ok": True, "loaded": results["specrt"]["loaded"]}
            continue
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                importlib.import_module(name)
                msg = {"ok": True, "loaded": specrt_modules()}
            except BaseException:
                msg = {"ok": False, "error": traceback.format_exc()}
            with os.fdopen(w, "w") as f:
                f.write(json.dumps(msg))
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            data = f.read()
        os.waitpid(pid, 0)
        results[name] = json.loads(data) if data else {"ok": False, "error": "child died"}
    print(json.dumps(results))
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_every_module_imports_on_its_own():
    names = ["specrt"] + sorted(m for m in MODULES if m != "specrt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, "-c", _FORK_IMPORTER, json.dumps(names)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = {m: r["error"] for m, r in results.items() if not r["ok"]}
    assert not failed, "\n\n".join(f"{m}:\n{e}" for m, e in failed.items())
    assert "specrt.verify" not in results["specrt.ops"]["loaded"]
    assert "specrt.ops.verify" in results["specrt.ops"]["loaded"]
