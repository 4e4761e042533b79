"""The import graph: one direction of imports and no circles.

Every ``import`` of ``bench/``, ``methods/``, ``tasks/`` and ``reports/`` -
at module level or inside a function - is read with ``ast``. The rules:

- the host (``bench``) imports nothing of its plugins (``methods``, ``tasks``,
  ``reports``);
- plugins import only the public API, the ``bench`` package itself, and no
  other plugin package (a module may import its own package's modules);
- inside the host, layers depend only downwards: files, errors, memory, interrupts and threads
  (``bench.errors``, ``bench.storage``, ``bench.disk``, ``bench.locks``, ``bench.pathnames``, ``bench.corpora``, ``bench.memory``, ``bench.interrupts``,
  ``bench.threads``) < the model layer
  (``bench.model``) < the plugin API (``bench.api``, re-exported by
  ``bench``) < the engine (``bench.engine``) < the command line
  (``bench.cli``) and the interop layer (``bench.interop``); no host module imports the ``bench`` facade;
- no module imports itself through a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "methods", "tasks", "reports")
PLUGIN_PACKAGES = ("methods", "tasks", "reports")
LAYERS = (("bench.errors", "bench.storage", "bench.disk", "bench.locks", "bench.pathnames", "bench.corpora", "bench.memory", "bench.interrupts",
           "bench.threads"), ("bench.model",), ("bench.api", "bench"),
          ("bench.engine",), ("bench.cli", "bench.interop"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """First-party module -> the first-party modules it imports."""
    modules = {module_name(p): p for package in PACKAGES for p in (root / package).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # `from a.b import c` imports module a.b.c when c is a module, else names of a.b
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a name: its module
                    target = target.rpartition(".")[0]
                if target and target.split(".")[0] in PACKAGES and target != name:
                    graph[name].add(target)
    return graph


def layer_of(module: str) -> int | None:
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix != "bench" and module.startswith(prefix + ".")):
                best = index
    return best


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every edge against the rules, and every circle, as readable lines."""
    found = []
    for source, targets in sorted(graph.items()):
        top = source.split(".")[0]
        for target in sorted(targets):
            target_top = target.split(".")[0]
            if top == "bench" and target_top in PLUGIN_PACKAGES:
                found.append(f"host imports a plugin: {source} -> {target}")
            elif top in PLUGIN_PACKAGES and target_top == "bench" and target != "bench":
                found.append(f"plugin imports host internals (use `from bench import ...`): {source} -> {target}")
            elif top in PLUGIN_PACKAGES and target_top in PLUGIN_PACKAGES and target_top != top:
                found.append(f"plugin imports another plugin package: {source} -> {target}")
            elif top == "bench" and target_top == "bench":
                if target == "bench" and source != "bench":
                    found.append(f"host module imports the public facade: {source} -> bench")
                elif (layer_of(target) or 0) > (layer_of(source) or 0):
                    found.append(f"host imports upwards: {source} (layer {layer_of(source)}) -> {target} "
                                 f"(layer {layer_of(target)})")
    found += [f"import circle: {' -> '.join(cycle)}" for cycle in circles(graph)]
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle through every strongly connected group of modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group) + [sorted(group)[0]])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_imports_go_one_way_and_never_in_a_circle():
    graph = import_graph()
    assert "bench.engine.executor" in graph and "methods.svd" in graph  # the walk found the tree
    assert violations(graph) == []


def test_the_public_api_exports_only_the_lower_layers():
    """``bench`` re-exports names lazily; each must come from the API layer or below, never the engine or CLI."""
    import bench

    api_layer, modules = layer_of("bench.api"), import_graph()
    for name, module in bench._API.items():
        assert module in modules, f"bench.{name} points to a missing module {module}"
        assert layer_of(module) <= api_layer, f"bench.{name} comes from {module}, above the plugin API"
        assert getattr(bench, name) is not None


def test_the_checker_catches_each_kind_of_wrong_edge():
    graph = import_graph()
    for source, target, expected in [
        ("bench.engine.executor", "reports.tables", "host imports a plugin"),
        ("methods.svd", "bench.engine.plan", "plugin imports host internals"),
        ("reports.tables", "tasks.perplexity", "plugin imports another plugin package"),
        ("bench.model.targets", "bench.engine.config", "host imports upwards"),
        ("bench.api.method", "bench", "imports the public facade"),
    ]:
        broken = {name: set(targets) for name, targets in graph.items()}
        broken[source].add(target)
        assert any(expected in line for line in violations(broken)), (source, target)
    looped = {"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "a.w": set()}
    assert circles(looped) == [["a.x", "a.y", "a.z", "a.x"]]
