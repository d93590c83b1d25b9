"""The package's import graph: no circles, and imports only flow from higher layers to lower ones.

Checked: (a) no import cycle between modules; (b) no import from a layer to a higher one
(``LAYERS``, ``SIDE_COMPONENTS``); (c) no cycle between components (top-level modules and
subpackages), which (b) alone allows inside one layer, e.g. ``training`` <-> ``arguments``.

Every module under ``megatron_lsh/`` is parsed with :mod:`ast` (never imported), and every
``import`` / ``from ... import`` statement counts, wherever it is: at module level, inside a
function (lazy imports), under ``if TYPE_CHECKING:``. A lazy import still couples the two
modules, it only hides the circle until the function runs.

Edges go to the most specific module an import names: ``from megatron_lsh.parallel import
random`` is an edge to ``megatron_lsh.parallel.random``; ``from megatron_lsh.models import
build_model`` (a name, not a submodule) is an edge to ``megatron_lsh.models`` (its
``__init__``). The implicit import of a parent package's ``__init__`` is not an edge: every
module would otherwise depend on its package's ``__init__``, which is what lazy package
``__init__`` files (PEP 562) are for. Imports of modules that are not ``.py`` files of the
package (third-party, compiled extensions) are ignored.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

PACKAGE = "megatron_lsh"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE

LAYERS: Dict[str, int] = {
    PACKAGE: 0,  # megatron_lsh/__init__.py
    "config": 0,
    "settings": 0,
    "model_config": 0,
    "glue": 0,
    "parallel": 1,
    "moe": 2,
    "models": 3,
    "training": 4,
    "arguments": 4,
    "compat": 4,
    "convert": 5,
    "finetune": 6,
    "launch": 0,
}
"""The layer of each component (a top-level module or subpackage of ``megatron_lsh``).

A module may import modules of its own layer or of a lower one, never of a higher one:
``config`` (with the package ``__init__``) < ``parallel`` (process groups, parallel layers,
optimizers) < ``moe`` (router, dispatcher, experts, compression) < ``models`` (GPT, RoBERTa,
T5 built from those) < ``training`` (the loop, tasks, checkpoints) and ``arguments`` (the
command line, which fills the config for the training entry points) with ``compat`` (the
Megatron-LM flags the command line accepts or refuses without a setting) < ``convert``
(checkpoints used outside training: whole-model loading, Hugging Face export, generation)
< ``finetune`` (GLUE fine-tuning: the trainer with epochs and scoring, a pretrained body
loaded through ``convert``). ``launch`` (the torchrun wrapper) imports nothing of the package.
"""

SIDE_COMPONENTS: Dict[str, Set[str]] = {
    "data": {PACKAGE, "config", "data", "tokenizer"},
    "tokenizer": {PACKAGE, "config", "tokenizer"},
}
"""Components outside the model stack, with what they may import.

``data`` (datasets, samplers, preprocessing) and ``tokenizer`` are used by ``training`` (and
``arguments``), but know nothing of ``parallel``, ``moe``, ``models`` or ``training``. The data
pipeline may use the tokenizer (preprocessing tokenizes); the tokenizer does not use the data
pipeline.
"""


def module_name(path: Path) -> str:
    """``megatron_lsh/models/gpt.py`` -> ``megatron_lsh.models.gpt``; an ``__init__.py`` -> its
    package."""
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> Dict[str, Path]:
    """Every module of the package by dotted name."""
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve_relative(module: str, is_package: bool, level: int, name: Optional[str]) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[:-(level - 1)]
    return ".".join(base + ([name] if name else []))


def _most_specific(name: str, modules: Dict[str, Path]) -> Optional[str]:
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: Dict[str, Path]) -> Dict[str, int]:
    """The package modules ``module`` imports, each with the line of its first import."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: Dict[str, int] = {}

    def add(target: Optional[str], line: int) -> None:
        if target is not None and target != module:
            found.setdefault(target, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(_most_specific(alias.name, modules), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = (_resolve_relative(module, is_package, node.level, node.module)
                    if node.level else node.module)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                add(submodule if submodule in modules else _most_specific(base, modules),
                    node.lineno)
    return found


def import_graph() -> Dict[str, Dict[str, int]]:
    """module -> {imported module: line}, for every module of the package."""
    modules = all_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def component(module: str) -> str:
    """The top-level component of a module: ``megatron_lsh.moe.router`` -> ``moe``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def strongly_connected(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected sets of more than one node (each sorted), by Tarjan's algorithm."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:  # Tarjan; the graph is small, recursion is fine
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            members = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                members.append(w)
                if w == v:
                    break
            if len(members) > 1:
                components.append(sorted(members))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return sorted(components)


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle (a closed path) per strongly connected set of more than one node."""
    return [_cycle_through(members[0], set(members), graph)
            for members in strongly_connected(graph)]


def _cycle_through(start: str, members: Set[str], graph: Dict[str, Set[str]]) -> List[str]:
    """A shortest closed path from ``start`` back to itself inside one strongly connected set."""
    parents: Dict[str, str] = {}
    frontier, seen = [start], {start}
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return path[::-1] + [start]
                if w in members and w not in seen:
                    seen.add(w)
                    parents[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"{start} is not on a cycle")


def allowed(source: str, target: str) -> bool:
    """May a module of component ``source`` import one of component ``target``?"""
    if source in SIDE_COMPONENTS:
        return target in SIDE_COMPONENTS[source]
    if target in SIDE_COMPONENTS:  # the model stack below training knows no data pipeline
        return LAYERS[source] >= LAYERS["training"]
    return LAYERS[target] <= LAYERS[source]


def test_every_component_has_a_layer():
    unknown = sorted({component(m) for m in all_modules()} - set(LAYERS) - set(SIDE_COMPONENTS))
    assert not unknown, f"add {unknown} to LAYERS or SIDE_COMPONENTS in {__file__}"


def _describe(cycle: List[str], lines: Dict[str, Dict[str, int]]) -> str:
    """``a -> b -> a`` with the file and line of each import."""
    modules = all_modules()
    steps = [f"{a} ({modules[a].relative_to(ROOT.parent)}:{lines[a][b]})"
             for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(steps + [cycle[-1]])


def test_no_import_cycles_between_modules():
    lines = import_graph()
    graph = {m: set(targets) for m, targets in lines.items()}
    report = [f"{_describe(_cycle_through(members[0], set(members), graph), lines)}"
              f"\n    (modules on circles here: {', '.join(members)})"
              for members in strongly_connected(graph)]
    assert not report, "import cycles:\n" + "\n".join(report)


def test_no_import_cycles_between_components():
    graph: Dict[str, Set[str]] = {}
    witness: Dict[tuple, str] = {}  # (component, component) -> one import that links them
    modules = all_modules()
    for module, targets in sorted(import_graph().items()):
        for target, line in sorted(targets.items()):
            a, b = component(module), component(target)
            if a != b:
                graph.setdefault(a, set()).add(b)
                witness.setdefault((a, b), f"{modules[module].relative_to(ROOT.parent)}:{line} "
                                           f"imports {target}")
    cycles = find_cycles(graph)
    assert not cycles, "import cycles between components:\n" + "\n".join(
        " -> ".join(f"{a} ({witness[a, b]})" for a, b in zip(c, c[1:])) + f" -> {c[-1]}"
        for c in cycles)


def test_imports_flow_down_the_layers():
    violations = []
    for module, targets in sorted(import_graph().items()):
        for target, line in sorted(targets.items()):
            if not allowed(component(module), component(target)):
                path = all_modules()[module].relative_to(ROOT.parent)
                violations.append(f"{path}:{line}: {module} ({component(module)}) imports "
                                  f"{target} ({component(target)})")
    assert not violations, "imports against the layer order:\n" + "\n".join(violations)


def test_the_checker_sees_lazy_relative_and_package_imports(tmp_path):
    """The parser's rules on a synthetic package (so a broken rule cannot pass silently)."""
    modules = {f"{PACKAGE}.x": tmp_path / "x" / "__init__.py", f"{PACKAGE}.x.a": tmp_path / "a.py",
               f"{PACKAGE}.x.b": tmp_path / "b.py", f"{PACKAGE}.y": tmp_path / "y.py"}
    source = tmp_path / "a.py"
    source.write_text("import torch\nfrom . import b\n\ndef f():\n"
                      "    from megatron_lsh.y import z\n    import megatron_lsh.x\n")
    assert imports_of(f"{PACKAGE}.x.a", source, modules) == {
        f"{PACKAGE}.x.b": 2, f"{PACKAGE}.y": 5, f"{PACKAGE}.x": 6}
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    assert not allowed("models", "training") and allowed("training", "data")
    assert not allowed("data", "parallel") and not allowed("moe", "data")
