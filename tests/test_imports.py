"""moejax's own import graph, read statically (ast) from every module under moejax/.

(a) No import cycle among moejax modules, counting the imports inside functions too: a
    function-level import that only breaks a cycle at import time still couples the two
    modules both ways (issue 12, defect 9: moe/layer.py <-> train/steps.py).
(b) No function-level import of a moejax module unless `ALLOWED` names it with a reason.
    Lazy imports of third-party packages are not policed here.

`from pkg import name` counts as an import of pkg.name when that is a module, else of pkg;
a package's implicit import of its parents (moejax/__init__.py, ...) is not an edge.
Imports under `if TYPE_CHECKING:` never run and are skipped.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (importing module, imported module) -> why that import sits inside a function.
ALLOWED = {
    ("moejax.config", "moejax.parallel"):
        "config stays light (tests/test_config.py::test_config_module_imports_nothing_heavy): "
        "parallel imports flax and jax, needed only to check mesh.rules in _validate_mesh",
    ("moejax.generate", "moejax.train.checkpoint"):
        "load_run() only: generate() stays free of orbax",
    ("moejax.generate", "moejax.train.loop"):
        "load_run() only: train.loop imports the checkpointer (orbax)",
}


def module_files(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
  """{dotted module name: file} of every module of `package` under `root`."""
  out = {}
  for path in sorted((root / package).rglob("*.py")):
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _is_type_checking(node: ast.If) -> bool:
  t = node.test
  return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
      isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(name: str, path: pathlib.Path, modules: dict) -> list[tuple[str, int, bool]]:
  """(imported module, line, inside a function) for each import of a module in `modules`."""
  is_pkg = path.name == "__init__.py"
  here = name if is_pkg else name.rpartition(".")[0]
  out = []

  def resolve(base: str, names: list[str], line: int, in_fn: bool):
    for n in names:
      if f"{base}.{n}" in modules:
        out.append((f"{base}.{n}", line, in_fn))
      elif base in modules:
        out.append((base, line, in_fn))

  def visit(node: ast.AST, in_fn: bool):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.If) and _is_type_checking(child):
        for c in child.orelse:
          visit(ast.Module(body=[c], type_ignores=[]), in_fn)
        continue
      if isinstance(child, ast.Import):
        for a in child.names:
          parts = a.name.split(".")  # the deepest existing module of a.b.c
          for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in modules:
              out.append((".".join(parts[:i]), child.lineno, in_fn))
              break
      elif isinstance(child, ast.ImportFrom):
        if child.level:
          base = here.split(".")
          base = base[:len(base) - (child.level - 1)]
          mod = ".".join(base + ([child.module] if child.module else []))
        else:
          mod = child.module or ""
        resolve(mod, [a.name for a in child.names], child.lineno, in_fn)
      visit(child, in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                ast.Lambda)))

  visit(ast.parse(path.read_text(), str(path)), False)
  return [(m, line, fn) for m, line, fn in out if m != name]


def import_graph(root: pathlib.Path, package: str):
  """({module: {imported: [(line, in_function)]}}, {module: file})."""
  modules = module_files(root, package)
  graph = {}
  for name, path in modules.items():
    edges: dict[str, list] = {}
    for target, line, in_fn in imports_of(name, path, modules):
      if (line, in_fn) not in edges.get(target, []):  # from m import a, b: one import
        edges.setdefault(target, []).append((line, in_fn))
    graph[name] = edges
  return graph, modules


def find_cycles(graph: dict) -> list[list[str]]:
  """One cycle (as a module path a -> ... -> a) per strongly connected component with
  more than one module (Tarjan)."""
  index, low, stack, on_stack, sccs = {}, {}, [], set(), []

  def strongconnect(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, {})):
      if w not in index:
        strongconnect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      scc = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        scc.append(w)
        if w == v:
          break
      if len(scc) > 1:
        sccs.append(set(scc))

  for v in sorted(graph):
    if v not in index:
      strongconnect(v)

  return [_cycle_through(graph, scc, min(scc)) for scc in sccs]


def _cycle_through(graph: dict, scc: set, start: str) -> list[str]:
  """A shortest path start -> ... -> start inside the component (breadth first)."""
  prev, queue = {start: None}, [start]
  for v in queue:
    for w in sorted(graph[v]):
      if w == start:
        path = [v]
        while prev[path[0]] is not None:
          path.insert(0, prev[path[0]])
        return path + [start]
      if w in scc and w not in prev:
        prev[w] = v
        queue.append(w)
  raise AssertionError(f"no cycle through {start} in {sorted(scc)}")


def _describe(graph: dict, modules: dict, cycle: list[str]) -> str:
  hops = []
  for a, b in zip(cycle, cycle[1:]):
    where = ", ".join(f"{modules[a].relative_to(ROOT)}:{line}"
                      f"{' (in a function)' if fn else ''}" for line, fn in graph[a][b])
    hops.append(f"  {a} -> {b}  [{where}]")
  return "\n".join(hops)


def test_no_import_cycle_among_moejax_modules():
  graph, modules = import_graph(ROOT, "moejax")
  assert len(modules) > 30 and "moejax.moe.layer" in modules  # the scan sees the package
  cycles = find_cycles(graph)
  assert not cycles, "import cycles (move what both sides need down the house):\n" + \
      "\n\n".join(_describe(graph, modules, c) for c in cycles)


def test_no_function_level_moejax_import_outside_the_allowlist():
  graph, modules = import_graph(ROOT, "moejax")
  found = {(a, b): [line for line, fn in uses if fn] for a, edges in graph.items()
           for b, uses in edges.items()}
  found = {k: v for k, v in found.items() if v}
  bad = sorted(f"{modules[a].relative_to(ROOT)}:{line}: imports {b} inside a function"
               for (a, b), lines in found.items() if (a, b) not in ALLOWED for line in lines)
  assert not bad, ("function-level imports of moejax modules (move them to the top; if "
                   "that makes a cycle, move the shared code down; if the laziness is "
                   "deliberate, add it to ALLOWED with the reason):\n" + "\n".join(bad))
  assert all(reason.strip() for reason in ALLOWED.values())


@pytest.fixture
def toy_package(tmp_path):
  """pkg/a.py imports pkg.b inside a function, pkg/b.py imports pkg.a at the top."""
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "a.py").write_text("import os\n\ndef f():\n  from pkg import b\n  return b\n")
  (pkg / "b.py").write_text("from pkg.a import f\nfrom . import c\n")
  (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                            "  from pkg import b\nimport pkg.sub\n")
  return tmp_path


def test_the_checks_see_hidden_cycles(toy_package):
  graph, _ = import_graph(toy_package, "pkg")
  assert graph["pkg.a"] == {"pkg.b": [(4, True)]}
  assert graph["pkg.b"] == {"pkg.a": [(1, False)], "pkg.c": [(2, False)]}
  assert graph["pkg.c"] == {"pkg.sub": [(4, False)]}  # TYPE_CHECKING skipped
  assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]
