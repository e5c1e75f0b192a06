"""The architecture the folders show, checked: the import graph of tasks/ and flows/ (every import counted: those
inside functions, and those under `if TYPE_CHECKING:` that name a type for an annotation) has no cycle and at
most 10 layers; tasks/core imports no project module outside it, the object store knows only the manifest types,
tasks/data/ and tasks/ml/ import no stage module; no module under tasks/ or flows/ is over 600 lines."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

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
    # fence: a leaf; signing: the keys that seal and open store objects (it imports the config errors alone);
    # paths: a leaf (where this host's files go, temp names)
    assert graph["tasks.core.objectstore"] == {"tasks.core.manifest", "tasks.core.fence", "tasks.core.signing",
                                               "tasks.core.store_lock", "tasks.core.paths"}
    assert graph["tasks.core.paths"] == set()
    assert graph["tasks.core.store_lock"] == {"tasks.core.fence"}  # its lease lock
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


def test_the_slow_guard_sits_on_every_way_a_test_starts_a_process_a_server_or_a_flow():
    """conftest's guard (tests/slow_guard.py) wraps each entry point a child process, a listening socket or a
    Prefect flow or task run goes through; checked without starting any (this test is in `make test-fast`)."""
    import inspect
    import multiprocessing.util
    import os
    import socket
    import subprocess

    import slow_guard

    entry_points = {"subprocess.Popen._execute_child": subprocess.Popen._execute_child,
                    "multiprocessing.util.spawnv_passfds": multiprocessing.util.spawnv_passfds,
                    "os.fork": os.fork, "os.forkpty": os.forkpty, "os.posix_spawn": os.posix_spawn,
                    "os.posix_spawnp": os.posix_spawnp, "os.system": os.system,
                    "socket.socket.listen": socket.socket.listen}
    assert [name for name, f in entry_points.items() if not getattr(f, slow_guard.MARK, False)] == []
    # subprocess.run/call/check_output and asyncio's subprocesses all construct a Popen, which calls the method.
    assert "self._execute_child(" in inspect.getsource(subprocess.Popen.__init__)

    import prefect.flow_engine
    import prefect.task_engine
    from prefect import Flow, Task

    assert getattr(prefect.flow_engine.run_flow, slow_guard.MARK, False)
    assert getattr(prefect.task_engine.run_task, slow_guard.MARK, False)
    # A flow call (and a task called outside .fn) looks the engine's entry up at call time, so it meets the wrapper.
    assert "from prefect.flow_engine import run_flow" in inspect.getsource(Flow.__call__)
    assert "from prefect.task_engine import run_task" in inspect.getsource(Task.__call__)


def test_the_slow_guard_reports_to_the_innermost_watch_and_names_what_was_started():
    from slow_guard import report, verdict, watching

    with watching() as outer:
        report("a")
        with watching() as inner:
            report("b")
        report("a")
    assert outer == ["a", "a"] and inner == ["b"]
    assert verdict("t.py::x", []) is None
    message = verdict("t.py::x", ["a child process `python -c pass`"] * 2)
    assert message.startswith("t.py::x is not marked slow but started:\n  a child process `python -c pass`\n")
    assert message.count("python -c pass") == 1 and "@pytest.mark.slow" in message


INNER_CONFTEST = """
import subprocess, sys
import pytest


@pytest.fixture(scope="session")
def child():  # a session fixture that starts a process, like a server fixture
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p
    p.kill()
    p.wait()


@pytest.fixture(scope="session")
def other_child():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p
    p.kill()
    p.wait()
"""

INNER_TESTS = """
import multiprocessing, socket, subprocess, sys
import pytest


def test_pure():
    assert sum([1, 2]) == 3


def test_child():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


@pytest.mark.slow
def test_child_marked():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_swallowed():
    try:
        subprocess.run(["/nonexistent/cpt"])
    except OSError:
        pass


def test_multiprocessing():
    p = multiprocessing.get_context("spawn").Process(target=print)
    p.start()
    p.join()


def test_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()


def test_flow(monkeypatch):
    import prefect.flow_engine
    from prefect import flow

    monkeypatch.setattr(prefect.flow_engine, "run_flow_sync", lambda **kw: "ran")  # the engine, minus the API

    @flow
    def tiny():
        return 1

    assert tiny() == "ran"


@pytest.mark.slow
def test_fixture_first(child):  # sets the session fixture up
    pass


def test_fixture_later(child):  # gets it from the cache: the guard still knows what it started
    pass


def test_fixture_unmarked_first(other_child):
    pass
"""


@pytest.mark.slow  # a pytest session in a child process, whose tests start processes, a server and a flow
def test_the_slow_guard_fails_each_unmarked_test_that_starts_something_and_only_those(tmp_path):
    """A suite run with the guard (`-p slow_guard`, as conftest loads it): every unmarked test that starts a child
    process, a server or a flow (itself or through a fixture, even one an earlier test set up) fails naming it;
    the same starts under the slow mark, and a test that starts nothing, pass."""
    import subprocess
    import sys
    import xml.etree.ElementTree as ET

    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: starts a server, a flow or a child process\n")
    (inner / "conftest.py").write_text(INNER_CONFTEST)
    (inner / "test_inner.py").write_text(INNER_TESTS)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "PREFECT_HOME": str(tmp_path / "prefect")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "slow_guard", "-p", "no:cacheprovider", "-q",
                           f"--junitxml={tmp_path / 'out.xml'}", "test_inner.py"], cwd=inner, env=env,
                          capture_output=True, text=True, timeout=300)
    assert (tmp_path / "out.xml").exists(), done.stdout[-3000:] + done.stderr[-3000:]
    outcome = {}
    for case in ET.parse(tmp_path / "out.xml").getroot().iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        outcome[case.get("name")] = "passed" if bad is None else bad.get("message", "") + (bad.text or "")
    passed = sorted(name for name, o in outcome.items() if o == "passed")
    assert passed == ["test_child_marked", "test_fixture_first", "test_pure"], f"{passed}\n{done.stdout[-3000:]}"
    expected = {"test_child": "a child process `python -c pass`",
                "test_swallowed": "a child process `/nonexistent/cpt`",
                "test_multiprocessing": "a child process (multiprocessing)",
                "test_server": "a server (a socket listening on 127.0.0.1:",
                "test_flow": "a Prefect flow run (tiny)",
                "test_fixture_later": "(in fixture 'child')",
                "test_fixture_unmarked_first": "(in fixture 'other_child')"}
    assert {name: o for name, o in outcome.items() if o != "passed"}.keys() == expected.keys()
    for name, what in expected.items():
        assert f"test_inner.py::{name} is not marked slow but started" in outcome[name], outcome[name]
        assert what in outcome[name], outcome[name]


def readme_map(text: str) -> set[str]:
    """The paths the README's map names: its code block under '## The map', a name per line, nested by indent."""
    block = text.split("## The map", 1)[1].split("```", 2)[1]
    stack: list[tuple[int, str]] = []
    named = set()
    for line in block.splitlines():
        if not line.strip() or not line.lstrip()[0].isalnum() and line.lstrip()[0] not in "._":
            continue
        indent, name = len(line) - len(line.lstrip()), line.split()[0]
        if line.startswith(" " * 28):  # a description's continuation
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "".join(d for _, d in stack) + name
        if name.endswith("/"):
            stack.append((indent, name))
        named.add(path)
    return named


def test_the_readme_is_short_its_map_names_every_module_and_it_links_every_docs_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200, "README.md is over 200 lines: move reference material to a docs/ page"
    named = readme_map(text)
    code = {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if p.name != "__init__.py"} | {str(p.relative_to(ROOT)) for p in (ROOT / "tasks").rglob("*.c")}
    assert not code - named, f"modules missing from the README's map: {sorted(code - named)}"
    stale = {n for n in named - code if n.endswith((".py", ".c")) and n.startswith(PACKAGES)}
    assert not stale, f"the README's map names modules that do not exist: {sorted(stale)}"
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert not {p for p in pages if f"({p})" not in text}, "docs pages the README links nowhere: " + str(
        sorted(p for p in pages if f"({p})" not in text))


def test_the_map_check_can_fail():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    named = readme_map(text)
    assert "tasks/data/readers.py" in named and "flows/cli.py" in named and "tasks/core/config/tree.py" in named
    assert "tasks/readers.py" not in named and "tasks/core/readers.py" not in named
    without = text.replace("    readers.py ", "    ", 1)
    assert "tasks/data/readers.py" not in readme_map(without)


def test_a_temporary_file_is_named_per_call_never_by_the_process_alone(tmp_path):
    """Atomic writes (a temp file, then os.replace) take their temp name from `temp_beside`, unique to the call:
    a name from the process id alone is shared by the threads of one process (a task runner's, a lease renewer's)
    and two of them writing one file would write into one temp file."""
    import re

    from tasks.core.paths import temp_beside

    target = tmp_path / "refs.json"
    a, b = temp_beside(target), temp_beside(target)
    assert a != b and a.parent == b.parent == tmp_path and a.name.startswith(".refs.json.")
    assert temp_beside(target, ".part").suffix == ".part"
    pid_only = re.compile(r"getpid\(\)\}\.(tmp|part|get)\b")
    offenders = [f"{p.relative_to(ROOT)}:{n}" for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pid_only.search(line)]
    assert not offenders, f"temp names from the process id alone (use tasks.core.paths.temp_beside): {offenders}"
