"""Import hygiene of the ``gatekeeper`` package: no import cycle, no heavy client pulled in by
parsing a reference, and no production module (the ``gatekeeper`` CLI included) leaning on the research code.

Each check runs in a fresh interpreter (``python -m tests.test_imports <check>`` for the static
ones, ``python -c`` for the runtime one), so modules this pytest process already imported (the
conftest imports torch; other tests import the Hub client) cannot mask anything.

The import graph is built statically with :mod:`ast` from the source files, nothing is imported
to build it. An edge ``a -> b`` is recorded for ``import gatekeeper.b``, ``from gatekeeper.b import
x`` (plus ``gatekeeper.b.x`` when that is a submodule) and relative imports, wherever they sit.
Each edge has a kind:

* ``module``: runs while ``a`` is being imported (top level, including ``if``/``try``/``with`` and
  class bodies);
* ``function``: inside a ``def``/``lambda``, runs only when that function is called (a lazy import);
* ``typing``: under ``if TYPE_CHECKING:``, never runs; ignored by every check here.

Not edges: the implicit import of a package's ``__init__`` before its submodule (Python always
starts the parent first, so a submodule importing a sibling through the package path is the normal
layout, not a cycle) and imports spelled as strings (``importlib.import_module``; gatekeeper has
none).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import deque
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "gatekeeper"
RESEARCH = ("gatekeeper.redteam", "gatekeeper.bench", "gatekeeper.lab")  # red team, benchmarks, their CLI
WIRING: tuple[str, ...] = ()  # modules allowed to wire research code in (none: the product CLI does not)
Edge = tuple[str, str, str]  # (importer, imported, kind)


# --------------------------------------------------------------------------- static import graph


def _modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package is its ``__init__.py``)."""
    found: dict[str, Path] = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if "__pycache__" in parts:
            continue
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportVisitor(ast.NodeVisitor):
    """Collects ``(target, kind)`` for every import statement of one module."""

    def __init__(self, module: str, is_package: bool, known: set[str]) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.known = known
        self.kind = "module"
        self.found: list[tuple[str, str]] = []

    def _nested(self, node: ast.AST, kind: str) -> None:
        outer, self.kind = self.kind, kind if self.kind == "module" else self.kind
        self.generic_visit(node)
        self.kind = outer

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._nested(node, "function")

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._nested(node, "function")

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._nested(node, "function")

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        outer, self.kind = self.kind, "typing" if self.kind == "module" else self.kind
        for stmt in node.body:
            self.visit(stmt)
        self.kind = outer
        for stmt in node.orelse:
            self.visit(stmt)

    def _add(self, name: str) -> None:
        """Record ``name``, or the nearest enclosing known module (``import a.b.attr`` -> ``a.b``)."""
        while name and name not in self.known:
            name = name.rpartition(".")[0]
        if name:
            self.found.append((name, self.kind))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        if source != PACKAGE and not source.startswith(PACKAGE + "."):
            return
        self._add(source)
        for alias in node.names:
            if f"{source}.{alias.name}" in self.known:  # ``from pkg import submodule``
                self._add(f"{source}.{alias.name}")


def import_edges(root: Path = ROOT) -> list[Edge]:
    """The package's import edges, self-imports dropped, each (importer, imported, kind) once."""
    modules = _modules(root)
    known = set(modules)
    edges: set[Edge] = set()
    for name, path in modules.items():
        visitor = _ImportVisitor(name, path.name == "__init__.py", known)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        edges.update((name, target, kind) for target, kind in visitor.found if target != name)
    return sorted(edges)


def _graph(edges: list[Edge], kinds: tuple[str, ...]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for src, dst, kind in edges:
        if kind in kinds:
            graph.setdefault(src, set()).add(dst)
    return graph


def _path(graph: dict[str, set[str]], start: str, goal: str, allowed: set[str] | None = None) -> list[str] | None:
    """A shortest path ``start -> ... -> goal`` (breadth first), through ``allowed`` nodes only when given."""
    previous: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph.get(node, ())):
            if nxt in previous or (allowed is not None and nxt != goal and nxt not in allowed):
                continue
            previous[nxt] = node
            if nxt == goal:
                path = [goal]
                while (step := previous[path[-1]]) is not None:
                    path.append(step)
                return path[::-1]
            queue.append(nxt)
    return None


def _label(path: list[str], edges: list[Edge]) -> str:
    """``a -[module]-> b -[function]-> c``, the kinds read from ``edges`` (module wins over function)."""
    kinds: dict[tuple[str, str], str] = {}
    for src, dst, kind in edges:
        if kind != "typing" and kinds.get((src, dst)) != "module":
            kinds[(src, dst)] = kind
    text = path[0]
    for src, dst in pairwise(path):
        text += f" -[{kinds[(src, dst)]}]-> {dst}"
    return text


def find_cycles(edges: list[Edge]) -> list[str]:
    """The import cycles gatekeeper refuses, one example cycle per offending module-level edge.

    Policy: a cycle is refused when at least one of its edges is module-level.

    * Module-level only: importing any module on it first meets a partially initialised module
      (``ImportError: cannot import name ...``, or ``None``s depending on who was imported first).
    * Mixed (a lazy import closing a loop of module-level ones, like the former
      ``sources.base -[function]-> mlflow_source -[module]-> hub -[module]-> base``): it does not
      break at import time, but the module-level part says "the lower module needs the upper one to
      exist" while the lazy import says the opposite, so neither can be imported, tested or reasoned
      about alone, and the lazy side drags every heavy dependency of the other in (there: parsing
      ``models:/m/1`` imported huggingface_hub). A lazy import was used to hide the cycle, not to
      defer a cost: the fix is to move the shared code down, so this is refused too.
    * Function-level only: allowed. Both sides defer the import to call time, when every module
      has finished importing, and neither needs the other to exist at import time; that is the
      usual shape of a dispatcher and the handlers it loads lazily (``sources.resolve`` loading a
      transport). It is a call-graph relationship, not an import-order one.

    A module-level edge ``u -> v`` lies on a refused cycle exactly when ``v`` reaches ``u`` back
    through runtime (module or function) edges; the example is the edge plus the shortest way back.
    """
    runtime = _graph(edges, ("module", "function"))
    found: dict[tuple[str, ...], str] = {}
    for src, dst, kind in edges:
        back = _path(runtime, dst, src) if kind == "module" else None
        if back is not None:
            cycle = [src, *back[:-1]]
            start = cycle.index(min(cycle))  # one report per cycle, whichever edge found it
            key = tuple(cycle[start:] + cycle[:start])
            found.setdefault(key, _label([*key, key[0]], edges))
    return list(found.values())


def research_imports(edges: list[Edge], modules: set[str]) -> list[str]:
    """Production modules that import research code: every direct edge, then every module that
    reaches research code only through other production modules (with its shortest such path).

    Production: every module except ``RESEARCH`` and ``WIRING`` (the CLI). Module- and
    function-level imports both count: a lazy import of the red team's code is still a dependency.
    A path is not followed through the CLI (``__main__ -> cli -> redteam`` is the CLI's wiring).
    """

    def research(name: str) -> bool:
        return any(name == r or name.startswith(r + ".") for r in RESEARCH)

    production = {m for m in modules if not research(m) and m not in WIRING}
    direct = [(s, d) for s, d, kind in edges if kind != "typing" and s in production and research(d)]
    found = [_label([s, d], edges) for s, d in sorted(set(direct))]
    runtime = _graph(edges, ("module", "function"))
    targets = sorted({d for _, d in direct})
    for module in sorted(production - {s for s, _ in direct}):
        paths = [_path(runtime, module, t, allowed=production) for t in targets]
        shortest = min((p for p in paths if p), key=len, default=None)
        if shortest is not None:
            found.append("through " + _label(shortest, edges))
    return found


# --------------------------------------------------------------------------- fresh-interpreter runs


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def _static(check: str) -> list[str]:
    done = _run(["-m", "tests.test_imports", check])
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert isinstance(result, list)
    return result


def test_graph_builder_sees_every_kind_of_edge(tmp_path: Path) -> None:
    """The analysis itself: absolute, relative, submodule, lazy and TYPE_CHECKING imports."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import leaf\n")
    (pkg / "sub" / "leaf.py").write_text("from ..top import x\n")
    (pkg / "top.py").write_text(
        "from typing import TYPE_CHECKING\nimport gatekeeper.sub.leaf.attr\nif TYPE_CHECKING:\n"
        "    import gatekeeper.other\nclass C:\n    def f(self):\n        from gatekeeper import sub\n"
    )
    (pkg / "other.py").write_text("import os\n")
    edges = import_edges(tmp_path)
    assert edges == [
        ("gatekeeper.sub", "gatekeeper.sub.leaf", "module"),
        ("gatekeeper.sub.leaf", "gatekeeper.top", "module"),
        ("gatekeeper.top", "gatekeeper", "function"),
        ("gatekeeper.top", "gatekeeper.other", "typing"),
        ("gatekeeper.top", "gatekeeper.sub", "function"),
        ("gatekeeper.top", "gatekeeper.sub.leaf", "module"),
    ]
    # sub -> leaf -> top -[function]-> sub is mixed; leaf -> top -> leaf is all module-level
    assert find_cycles(edges) == [
        "gatekeeper.sub -[module]-> gatekeeper.sub.leaf -[module]-> gatekeeper.top -[function]-> gatekeeper.sub",
        "gatekeeper.sub.leaf -[module]-> gatekeeper.top -[module]-> gatekeeper.sub.leaf",
    ]
    lazy_only = [("gatekeeper.a", "gatekeeper.b", "function"), ("gatekeeper.b", "gatekeeper.a", "function")]
    assert find_cycles(lazy_only) == []


def test_no_import_cycle() -> None:
    cycles = _static("cycles")
    assert not cycles, "import cycles in gatekeeper:\n" + "\n".join(cycles)


def test_production_code_does_not_import_research_code() -> None:
    found = _static("research")
    assert not found, "production modules importing gatekeeper.redteam/bench:\n" + "\n".join(found)


def test_parsing_a_reference_imports_no_registry_client(tmp_path: Path) -> None:
    """Parsing ``models:/`` or a path, resolving a local folder and redacting an error message (what
    an MLflow resolution does) load neither huggingface_hub nor mlflow."""
    (tmp_path / "gatekeeper.json").write_text("{}")
    code = (
        "import sys, gatekeeper.sources\n"
        "from gatekeeper.sources._redact import public_url, redact\n"
        "assert gatekeeper.sources.__file__.startswith(sys.argv[2]), gatekeeper.sources.__file__\n"
        "assert gatekeeper.sources.parse_reference('models:/m/1') == ('mlflow', 'm', '1')\n"
        "assert gatekeeper.sources.parse_reference('models:/m@champion') == ('mlflow', 'm', '@champion')\n"
        "assert gatekeeper.sources.parse_reference('some/folder') == ('local', 'some/folder', None)\n"
        "gatekeeper.sources.resolve(sys.argv[1])\n"
        "assert redact('Bearer abc') == 'Bearer ***' and public_url('https://u:p@h/') == 'https://h'\n"
        "print(sorted(m for m in ('huggingface_hub', 'mlflow') if m in sys.modules))\n"
    )
    done = _run(["-c", code, str(tmp_path), str(ROOT / PACKAGE)])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"loaded: {done.stdout.strip()}"


if __name__ == "__main__":  # the static checks, run by the tests above in a fresh interpreter
    all_edges = import_edges()
    if sys.argv[1:] == ["cycles"]:
        print(json.dumps(find_cycles(all_edges)))
    elif sys.argv[1:] == ["research"]:
        print(json.dumps(research_imports(all_edges, set(_modules()))))
    elif sys.argv[1:] == ["edges"]:  # for a human: every edge with its kind
        print("\n".join(f"{src} -[{kind}]-> {dst}" for src, dst, kind in all_edges))
    else:
        raise SystemExit("usage: python -m tests.test_imports cycles|research|edges")
