"""Counts the import graph of our packages: files, import edges, levels and cycles (stdlib `ast` only).

    python scripts/import_graph.py [--root .] [--packages kvzap_eval exporters] [--edges] [--list-cycles]

A node is a module file; an edge is "module A imports module B" (top-level or inside a function, once per pair),
resolved to the file it names: `from pkg import name` points to `pkg/name.py` when that is a module, else to
`pkg/__init__.py`; a module also depends on its packages' `__init__` as Python imports them first (not counted as
an edge: it is not an import statement). Cycles are the strongly connected components of more than one module;
levels are the longest import chain of the graph with each cycle counted as one node.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def module_names(root: Path, packages: list[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every `.py` under the packages."""
    names = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names[".".join(parts)] = path
    return names


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ours that `name` imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:  # `import a.b.c` where only a.b is ours, etc.
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node.level, node.module)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in known else base)
    return found


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def levels(graph: dict[str, set[str]], components: list[list[str]]) -> int:
    """Longest chain of imports (in modules, a cycle counting as one), over the condensed graph."""
    owner = {member: i for i, component in enumerate(components) for member in component}
    depth: dict[int, int] = {}
    # Tarjan emits components in reverse topological order: dependencies first.
    for i, component in enumerate(components):
        below = {owner[t] for member in component for t in graph[member]} - {i}
        depth[i] = 1 + max((depth[j] for j in below), default=0)
    return max(depth.values(), default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--packages", nargs="+", default=["kvzap_eval", "exporters"])
    parser.add_argument("--edges", action="store_true", help="print every edge")
    parser.add_argument("--list-cycles", action="store_true", help="print the modules of each cycle")
    args = parser.parse_args()
    known = module_names(args.root, args.packages)
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    components = strongly_connected(graph)
    cycles = [c for c in components if len(c) > 1]
    edges = sum(len(targets) for targets in graph.values())
    if args.edges:
        for name in sorted(graph):
            for target in sorted(graph[name]):
                print(f"{name} -> {target}")
    for package in args.packages:
        files = [n for n in known if n == package or n.startswith(package + ".")]
        inner = sum(1 for n in files for t in graph[n] if t == package or t.startswith(package + "."))
        print(f"{package}: {len(files)} files, {inner} import edges inside")
    print(f"all: {len(known)} files, {edges} import edges, {levels(graph, components)} levels, {len(cycles)} cycles")
    if args.list_cycles:
        for cycle in cycles:
            print("cycle:", " ".join(cycle))


if __name__ == "__main__":
    main()
