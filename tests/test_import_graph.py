"""The packages of waldo/ import each other without cycles, and the library stays apart from the
studies (waldo_experiments) and from plotting.

Every module under waldo/ is parsed (not imported), so imports at any depth count, including
function-local ones: a lazy import still ties two packages together. Each module maps to its
package: ``waldo.eval.runner`` -> ``waldo.eval``, ``waldo.cli`` -> ``waldo.cli``, and the top
``waldo/__init__.py`` -> ``waldo``. Imports *of* the top package (``from waldo import __version__``)
make no edge: Python runs waldo/__init__.py before any submodule anyway, so every module depends
on it; its own imports (the lazy ``Waldo`` re-export) do count.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from waldo.paths import PROJECT_ROOT

WALDO = PROJECT_ROOT / "waldo"
EXPERIMENTS = "waldo_experiments"


@dataclass(frozen=True)
class Import:
    """One import statement's target: ``module`` (absolute) imported at ``where`` (file:line)."""

    module: str
    where: str


def _module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> Iterator[Import]:
    """Every module ``path`` imports; ``from a import b`` yields ``a.b`` (b may be a submodule)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: level 1 is this package, each further level its parent
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names = [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        where = f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}"
        yield from (Import(name, where) for name in names)


def _package_of(module: str) -> str | None:
    """The waldo/ package (or top-level module) ``module`` belongs to; None outside waldo/."""
    parts = module.split(".")
    if parts[0] != "waldo":
        return None
    if len(parts) > 1 and ((WALDO / parts[1]).is_dir() or (WALDO / f"{parts[1]}.py").is_file()):
        return f"waldo.{parts[1]}"
    return "waldo"


def _all_imports() -> Iterator[tuple[Path, Import]]:
    for path in sorted(WALDO.rglob("*.py")):
        yield from ((path, found) for found in _imports(path))


def package_graph() -> dict[str, dict[str, list[str]]]:
    """source package -> target package -> the file:line of each import making that edge."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path, found in _all_imports():
        source, target = _package_of(_module_name(path)), _package_of(found.module)
        if target not in (None, "waldo", source):
            places = graph.setdefault(source, {}).setdefault(target, [])
            if found.where not in places:  # ``from a import b, c`` is one place
                places.append(found.where)
    return graph


def find_cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """One cycle (a list of packages, first repeated last) per strongly connected component."""
    cycles, done = [], set()
    for start in sorted(graph):
        if start in done:
            continue
        # Depth-first from start; a path back to a node still on the stack closes a cycle.
        stack, on_path = [(start, iter(sorted(graph.get(start, {}))))], [start]
        while stack:
            node, targets = stack[-1]
            target = next(targets, None)
            if target is None:
                stack.pop()
                done.add(on_path.pop())
            elif target in on_path:
                cycle = on_path[on_path.index(target):] + [target]
                if not any(set(cycle) <= set(known) for known in cycles):
                    cycles.append(cycle)
            elif target not in done:
                stack.append((target, iter(sorted(graph.get(target, {})))))
                on_path.append(target)
    return cycles


def _describe(cycle: list[str], graph: dict[str, dict[str, list[str]]]) -> str:
    lines = [" -> ".join(cycle)]
    for source, target in zip(cycle, cycle[1:]):
        lines.append(f"  {source} -> {target}: {', '.join(graph[source][target])}")
    return "\n".join(lines)


def test_finds_a_cycle_and_names_its_imports():
    graph = {"a": {"b": ["a.py:1"]}, "b": {"c": ["b.py:2"]}, "c": {"a": ["c.py:3"], "d": ["c.py:4"]}, "d": {}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert "c -> a: c.py:3" in _describe(find_cycles(graph)[0], graph)
    assert find_cycles({"a": {"b": ["a.py:1"]}, "b": {}}) == []


def test_waldo_packages_have_no_import_cycle():
    graph = package_graph()
    assert "waldo.eval" in graph and "waldo.data" in graph["waldo.eval"]  # the walk sees real imports
    # Evaluation sits below training: the trainers validate with it, so it must never train.
    assert "waldo.train" not in graph["waldo.eval"], f"waldo.eval trains: {graph['waldo.eval'].get('waldo.train')}"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles between waldo/ packages:\n" + "\n".join(_describe(c, graph) for c in cycles)


def test_only_the_cli_door_imports_the_studies():
    offenders = [found.where for path, found in _all_imports()
                 if found.module.split(".")[0] == EXPERIMENTS and path != WALDO / "cli.py"]
    assert not offenders, f"waldo/ imports {EXPERIMENTS} outside waldo/cli.py: {offenders}"


def test_the_library_never_imports_matplotlib():
    offenders = [found.where for _, found in _all_imports() if found.module.split(".")[0] == "matplotlib"]
    assert not offenders, f"plotting belongs in {EXPERIMENTS}, not waldo/: {offenders}"
