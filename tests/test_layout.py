"""The architecture the folders show, checked: the import graph of tasks/ and flows/ (every import counted: those
inside functions, and those under `if TYPE_CHECKING:` that name a type for an annotation) has no cycle and at
most 10 layers; tasks/core imports no project module outside it, the object store knows only the manifest types,
tasks/data/ and tasks/ml/ import no stage module; no module under tasks/ or flows/ is over 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

PACKAGES = ("tasks", "flows")
STAGES = {"tasks.load", "tasks.held_out", "tasks.shuffle", "tasks.tokenize", "tasks.token_stats", "tasks.chunk",
          "tasks.mix", "tasks.evaluate", "tasks.train", "tasks.gate", "tasks.push"}
MAX_LINES = 600
MAX_LAYERS = 10


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING"
                                         or getattr(test, "attr", None) == "TYPE_CHECKING")


def _nodes(tree: ast.AST, annotations: bool):
    """Every node of the module; without `annotations`, not those under `if TYPE_CHECKING:` (they name a type for
    an annotation and never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo += [c for c in ast.iter_child_nodes(node) if annotations or not _type_checking(c)]


def imports_of(path: Path, known: set[str], annotations: bool = True) -> set[str]:
    """Project modules `path` imports: at module level, inside functions (lazy imports) or for annotations."""
    found: set[str] = set()
    for node in _nodes(ast.parse(path.read_text(encoding="utf-8")), annotations):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name in known:
                found.add(name)
            # `import tasks.core.root` imports its packages too; they are only docstrings here.
    return found


def import_graph(annotations: bool = True) -> dict[str, set[str]]:
    """Module -> the project modules it imports; with `annotations`, those imported only to name a type too (a
    cycle through an annotation is a knot a reader must untie as much as any other)."""
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, known, annotations) - {name} for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layers(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's height: 0 for one that imports no project module, else 1 + the highest it imports."""
    memo: dict[str, int] = {}

    def height(v: str) -> int:
        if v not in memo:
            memo[v] = 0
            memo[v] = 1 + max((height(w) for w in graph[v]), default=-1)
        return memo[v]

    return {v: height(v) for v in graph}


def test_the_import_graph_has_no_cycle_lazy_and_annotation_imports_included():
    graph = import_graph()
    assert "tasks.core.root" in graph and "flows.continued_pretraining" in graph  # the walk found the modules
    assert not cycles(graph), cycles(graph)


def test_the_cycle_check_can_fail():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_core_imports_nothing_outside_core_and_the_store_only_the_manifest_types_and_the_fence():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("tasks.core"):
            outside = {d for d in deps if not d.startswith("tasks.core")}
            assert not outside, f"{name} imports {sorted(outside)}: infrastructure must not know a stage"
    # fence: a leaf; signing: the keys that seal and open store objects (it imports the config errors alone)
    assert graph["tasks.core.objectstore"] == {"tasks.core.manifest", "tasks.core.fence", "tasks.core.signing"}
    assert graph["tasks.core.signing"] <= {"tasks.core.config.base"}
    for name in ("tasks.core.manifest", "tasks.core.keys", "tasks.core.entries", "tasks.core.objectstore"):
        assert "tasks.core.root" not in graph[name]  # the root builds on them, never the reverse


def test_data_and_model_code_import_no_stage():
    graph = import_graph()
    assert any(name.startswith("tasks.data.") for name in graph)
    for name, deps in graph.items():
        if name.startswith(("tasks.data", "tasks.ml")):
            assert not deps & STAGES, f"{name} imports the stage modules {sorted(deps & STAGES)}"


def test_no_module_is_over_600_lines():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules().items()}
    assert len(sizes) > 40
    over = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not over, f"split by concern: {over}"


def test_the_tower_is_low(capsys):
    """Printed for the README and the notes: how many layers of imports that run the project has (an annotation's
    import runs nowhere, so it is a tie in the cycle test, not a layer)."""
    graph = import_graph(annotations=False)
    height = layers(graph)
    tallest = max(height.values())
    with capsys.disabled():
        print(f"\nimport layers: {tallest + 1} (tallest: {max(height, key=height.get)})")
    assert tallest + 1 <= MAX_LAYERS  # 14 before the first redesign (lazy imports counted, with a cycle), then 11


def test_a_test_that_starts_a_server_without_the_slow_mark_is_refused():
    """conftest refuses a collection where a test uses a server fixture unmarked (what keeps test-fast fast)."""
    import types

    from helpers import unmarked_server_tests

    def item(nodeid, fixtures, slow):
        return types.SimpleNamespace(nodeid=nodeid, fixturenames=fixtures,
                                     get_closest_marker=lambda name: object() if slow and name == "slow" else None)

    items = [item("a", ["prefect_harness", "tmp_path"], False), item("b", ["s3_endpoint"], True),
             item("c", ["tmp_path"], False)]
    assert unmarked_server_tests(items) == ["a"]
