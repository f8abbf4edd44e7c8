"""The shape of the tree, checked: who may import whom, and how large a file or function may grow.

- The product (vit/, kernels/, train.py, evaluate.py, cmdline.py, resume.py) never imports the
  oracle package (JAX autodiff, the check commands), lazily or not.
- The import graph has no loop, module by module (``from vit import layers`` is an edge to
  vit.layers) and package by package (vit -> kernels -> vit would be one).
- No file over MAX_FILE_LINES lines unless its docstring says why ("Long because: ..."), and no
  function whose body (its statements, not its signature or docstring) runs over MAX_BODY_LINES.
- Importing any product module starts no JAX backend (train.py's multi-process start must call
  jax.distributed.initialize before one starts): no jnp array is made at import time.
- README.md's paths and links lead somewhere: every path it names in backticks under one of the
  project's folders (`vit/step.py`, `bench/results/`) is in the tree, and every `(#anchor)` is one
  of its headings.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vit", "kernels", "oracle", "bench")
TOP_MODULES = ("train", "evaluate", "cmdline", "resume")
PRODUCT = ("vit", "kernels", "train", "evaluate", "cmdline", "resume")
CHECKERS = ("oracle",)
MAX_FILE_LINES = 450
MAX_BODY_LINES = 80


def _modules() -> dict[str, Path]:
    """Every project module by dotted name (a package as its own name, for __init__.py)."""
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    for name in TOP_MODULES:
        out[name] = ROOT / f"{name}.py"
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that `name` imports anywhere in its file (inside functions too)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # "vit.layers.matmul" -> "vit.layers"
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _top(name: str) -> str:
    return name.split(".")[0]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_the_imports_it_should():
    """The parser itself: known edges are there (so an empty graph cannot pass the tests below)."""
    graph = _graph()
    assert "vit.layers" in graph["vit.model"] and "vit.ops" in graph["vit.model"]
    assert "vit.layers" in graph["kernels.attention"]
    assert {"kernels", "vit.ops"} <= graph["oracle.kernel_gradcheck"]
    assert "cmdline" in graph["train"] and "kernels" in graph["cmdline"]


def test_no_product_module_imports_the_oracle_or_a_checker():
    offenders = [f"{name} imports {target}" for name, targets in _graph().items()
                 if _top(name) in PRODUCT for target in targets if _top(target) in CHECKERS]
    assert not offenders, "\n".join(offenders)


def test_no_import_loop_between_modules():
    loop = _cycle(_graph())
    assert loop is None, "import loop: " + " -> ".join(loop)


def test_no_import_loop_between_packages():
    packages: dict[str, set[str]] = {}
    for name, targets in _graph().items():
        packages.setdefault(_top(name), set()).update(_top(t) for t in targets if _top(t) != _top(name))
    loop = _cycle(packages)
    assert loop is None, "import loop between packages: " + " -> ".join(loop)


def test_the_loop_finder_finds_loops():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_importing_the_product_starts_no_jax_backend():
    names = sorted(name for name in _modules() if _top(name) in PRODUCT and not name.endswith("__main__"))
    code = (f"import importlib\nfor name in {names!r}:\n    importlib.import_module(name)\n"
            "from jax._src import xla_bridge\nprint(xla_bridge.backends_are_initialized())")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"], ("a module makes a JAX array when imported (a "
                                              "module-level jnp call?)")


def _python_files():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in {".git", "build", ".whl"} or any(p.startswith(".") for p in rel.parts):
            continue
        yield path


def test_no_long_file_without_a_reason():
    offenders = []
    for path in _python_files():
        text = path.read_text()
        lines = text.count("\n")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if lines > MAX_FILE_LINES and "Long because:" not in doc:
            offenders.append(f"{path.relative_to(ROOT)}: {lines} lines and no 'Long because:' in "
                             "its docstring")
    assert not offenders, "\n".join(offenders)


def _body_lines(node) -> int:
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None),
                                                             ast.Constant):
        body = body[1:]  # the docstring
    return 0 if not body else node.end_lineno - body[0].lineno + 1


def test_no_long_function():
    offenders = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _body_lines(node)
                if n > MAX_BODY_LINES:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not offenders, "\n".join(offenders)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but '-' and '_' dropped, spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_names_paths_that_exist_and_links_headings_it_has():
    readme = (ROOT / "README.md").read_text()
    folders = set(PACKAGES) | {"configs", "docs", "tests"}  # not a run's or a dataset's folders
    named = {t for t in re.findall(r"`([\w.\-]+/[\w./\-]*)`", readme) if t.split("/")[0] in folders}
    assert len(named) > 30, sorted(named)  # the pattern still finds the layout table's paths
    assert sorted(t for t in named if not (ROOT / t).exists()) == []
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", readme, re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", readme)
    assert links and sorted(set(links) - anchors) == []
    assert _anchor("Benchmarks: `pytest bench/ --benchmark`") == "benchmarks-pytest-bench---benchmark"
