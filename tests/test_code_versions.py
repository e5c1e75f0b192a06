"""Code versions are read from the code (tasks/core/keys.py), never from hand-kept name lists. Each case edits a
copy of tasks/ and flows/ and computes every stage's code version in a fresh process from that copy:

- a comment or docstring edit in every module changes no key (nor does an edit of infrastructure or of a
  manifest's `summary()`);
- an edit of a helper changes the keys of exactly the stages whose code reaches it;
- a helper added to a stage's module and called is covered without being listed;
- a call of a helper that was renamed away fails when the module is imported, naming it;
- where code lives is not what it does: moving a helper to another module, renaming a module (imported by name
  or as a module) or splitting one changes no key, and an edit of a moved helper still changes exactly the
  stages that reach it.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

PROBE = ("import json; import flows.continued_pretraining; from tasks.core import keys; "
         "print('VERSIONS', json.dumps({s: keys.code_version(s) for s in sorted(keys._SPECS)}))")
DATA = ["load", "load-file", "load-content", "shuffle", "tokenize", "tokenize-file", "token-stats",
        "token-stats-part", "chunk", "chunk-part", "mix"]


def tree_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    for pkg in ("tasks", "flows"):
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def versions(src: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", PROBE], cwd=src, env=env, capture_output=True, text=True)


def read(out: subprocess.CompletedProcess) -> dict[str, str]:
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("VERSIONS "))[9:])


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{path}: {old!r} not found: the test must be updated with the code"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> dict[str, str]:
    return read(versions(tree_copy(tmp_path_factory.mktemp("original"))))


@pytest.mark.slow  # a fresh interpreter reads a copy's code versions
def test_the_probe_sees_every_stage(original):
    assert set(DATA) | {"evaluate-base", "evaluate", "train", "gate", "push"} <= set(original)


@pytest.mark.slow  # a fresh interpreter reads a copy's code versions
def test_comments_docstrings_infrastructure_and_summaries_change_no_key(tmp_path, original):
    src = tree_copy(tmp_path)
    for path in sorted(src.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        # A comment after every plain `return` line (no string on it: it may open a multi-line one) and an edited
        # docstring for every function: edits a reader makes all the time.
        text = re.sub(r"^(\s*)(return [^\"'#\n]*)$", r"\1\2  # why this is returned", text, flags=re.M)
        text = re.sub(r'^(\s*)def (\w+)\((.*)\):\n(\s+)"""', r'\1def \2(\3):\n\4"""Edited docs. ', text, flags=re.M)
        path.write_text(text + "\n# a comment appended to every module\n", encoding="utf-8")
    edit(src / "tasks" / "core" / "root.py", "def entry(self, rel: str) -> Path:",
         "def entry(self, rel: str) -> Path:  # infrastructure, edited")
    edit(src / "tasks" / "core" / "report.py", 'return "yes" if v else "no"', 'return "Yes" if v else "No"')
    edit(src / "tasks" / "train.py", 'f"TensorBoard logs in', 'f"TensorBoard logs are in')  # Trained.summary
    assert read(versions(src)) == original


@pytest.mark.slow  # a fresh interpreter reads a copy's code versions
def test_editing_a_helper_changes_exactly_the_stages_that_reach_it(tmp_path, original):
    src = tree_copy(tmp_path)
    # window_plan decides the chunk windows, once: the chunk stage (which records the plan in its output, where
    # its pieces and evaluate's general corpus take it from, keyed by its values) and token-stats (which predicts
    # the chunk stage's rows before it runs) reach it; load, tokenize, train and the pieces do not.
    edit(src / "tasks" / "data" / "windows.py", "    window = max_seq_length - (1 if has_bos else 0)\n",
         "    window = max_seq_length - (1 if has_bos else 0)\n    window = int(window)\n")
    after = read(versions(src))
    changed = {s for s in original if after[s] != original[s]}
    assert changed == {"chunk", "token-stats"}


@pytest.mark.slow  # a fresh interpreter reads a copy's code versions
def test_the_static_row_length_is_decided_where_train_is_keyed(tmp_path, original):
    """How long static packed rows are is decided in the training child's code: a change of the rule reruns the
    stages that train (train, and a stable line's anneal) and nothing else (it was a method of the config,
    infrastructure, which no key sees)."""
    src = tree_copy(tmp_path)
    edit(src / "tasks" / "ml" / "static_batches.py", "return -(-max_seq_length // ALIGN) * ALIGN",
         "return -(-max_seq_length // (2 * ALIGN)) * 2 * ALIGN")
    after = read(versions(src))
    assert {s for s in original if after[s] != original[s]} == {"train", "anneal"}


@pytest.mark.slow  # a fresh interpreter reads a copy's code versions
def test_a_new_helper_is_covered_without_being_listed(tmp_path, original):
    src = tree_copy(tmp_path)
    edit(src / "tasks" / "shuffle.py", "def split_values(", "def _salt(seed):\n    return seed\n\n\ndef split_values(")
    edit(src / "tasks" / "shuffle.py", 'salt = seed.to_bytes(16, "little", signed=True)',
         'salt = _salt(seed).to_bytes(16, "little", signed=True)')
    first = read(versions(src))
    assert first["shuffle"] != original["shuffle"] and first["load"] == original["load"]
    edit(src / "tasks" / "shuffle.py", "    return seed\n", "    return seed + 0\n")  # only the new helper changes
    second = read(versions(src))
    assert second["shuffle"] != first["shuffle"]


@pytest.mark.slow  # a fresh interpreter reads a copy's code versions
def test_a_renamed_helper_fails_at_import_naming_it(tmp_path):
    src = tree_copy(tmp_path)
    edit(src / "tasks" / "shuffle.py", "def one_per_text(", "def one_copy_per_text(")  # the call is not renamed
    out = versions(src)
    assert out.returncode != 0
    assert "CodeReferenceError" in out.stderr and "one_per_text" in out.stderr and "tasks.shuffle" in out.stderr


def test_a_piece_version_bump_reaches_the_stage_that_lists_the_pieces():
    import dataclasses

    import flows.continued_pretraining  # noqa: F401  every stage declared
    from tasks.core import keys

    before = {s: keys.code_version(s) for s in keys._SPECS}
    spec = keys._SPECS["chunk-part"]
    keys._SPECS["chunk-part"] = dataclasses.replace(spec, version=spec.version + 1)
    keys._VERSIONS.clear()
    try:
        after = {s: keys.code_version(s) for s in keys._SPECS}
    finally:
        keys._SPECS["chunk-part"] = spec
        keys._VERSIONS.clear()
    assert {s for s in before if before[s] != after[s]} == {"chunk-part", "chunk"}


# ------------------------------------------------------------------------------ where code lives


def module_file(src: Path, module: str) -> Path:
    return src.joinpath(*module.split(".")).with_suffix(".py")


def _top_names(node: ast.AST) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    return []


def movable(src: Path, module: str) -> list[str]:
    """Top-level functions and classes of `module` that no module-level statement uses (a decorator, a
    registration): what can move to another module without changing when the first one can be imported."""
    tree = ast.parse(module_file(src, module).read_text(encoding="utf-8"))
    at_import = {n.id for node in tree.body if not isinstance(node, (ast.FunctionDef, ast.ClassDef))
                 for n in ast.walk(node) if isinstance(n, ast.Name)}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            at_import |= {n.id for d in node.decorator_list for n in ast.walk(d) if isinstance(n, ast.Name)}
    return [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))
            and node.name not in at_import and not node.decorator_list]


def move(src: Path, module: str, names: list[str], to: str) -> None:
    """Move the top-level definitions `names` of `module` into a new module `to`, as a person would: the new
    module gets the old one's imports and imports what it uses of the old one; the old one imports the moved
    names back at its end, so every other importer keeps working unchanged."""
    path = module_file(src, module)
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    spans, defined, imports = [], set(), []
    for node in tree.body:
        start = min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno]) - 1
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if not (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
                imports.append("".join(lines[start:node.end_lineno]))
        elif set(_top_names(node)) & set(names):
            spans.append((start, node.end_lineno))
        else:
            defined.update(_top_names(node))
    assert {n for a, b in spans for n in names if f"def {n}(" in "".join(lines[a:b])
            or f"class {n}" in "".join(lines[a:b])} == set(names), "a name to move is not a top-level definition"
    moved = "\n\n".join("".join(lines[a:b]) for a, b in spans)
    used = {n.id for a, b in spans for n in ast.walk(ast.parse("".join(lines[a:b]))) if isinstance(n, ast.Name)}
    back = sorted(used & defined)
    head = "from __future__ import annotations\n\n" + "".join(imports)
    if back:
        head += f"from {module} import {', '.join(back)}\n"
    module_file(src, to).write_text(f"{head}\n\n{moved}\n", encoding="utf-8")
    keep = [line for i, line in enumerate(lines) if not any(a <= i < b for a, b in spans)]
    path.write_text("".join(keep) + f"\nfrom {to} import {', '.join(names)}  # noqa: E402\n", encoding="utf-8")


def rename_module(src: Path, old: str, new: str) -> None:
    """Rename a module and every import of it (`from package.old import x`, `from package import old` and its
    uses as `old.x`), in tasks/ and flows/."""
    module_file(src, old).rename(module_file(src, new))
    package, old_short = old.rsplit(".", 1)
    new_short = new.rsplit(".", 1)[1]
    # `from package import a, old, b`: the module among the names a line imports
    as_module = re.compile(rf"^(from {re.escape(package)} import (?:[\w ,]*, )?){old_short}\b(?=,|$)", flags=re.M)
    for path in sorted(src.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        edited = re.sub(rf"\b{re.escape(old)}\b", new, text)
        if as_module.search(edited):
            edited = as_module.sub(rf"\g<1>{new_short}", edited)
            edited = re.sub(rf"(?<![.\w\"']){old_short}\.(?=[A-Za-z_])", f"{new_short}.", edited)
        if edited != text:
            path.write_text(edited, encoding="utf-8")


@pytest.mark.slow  # a fresh interpreter reads a copy's code versions
def test_moving_a_helper_changes_no_key_and_an_edit_of_it_still_reaches_the_same_stages(tmp_path, original):
    src = tree_copy(tmp_path)
    move(src, "tasks.data.windows", ["window_plan"], "tasks.data.geometry")
    assert "def window_plan(" not in module_file(src, "tasks.data.windows").read_text()
    assert read(versions(src)) == original
    edit(module_file(src, "tasks.data.geometry"), "    window = max_seq_length - (1 if has_bos else 0)\n",
         "    window = max_seq_length - (1 if has_bos else 0)\n    window = int(window)\n")
    after = read(versions(src))
    assert {s for s in original if after[s] != original[s]} == {"chunk", "token-stats"}


@pytest.mark.slow  # a fresh interpreter reads a copy's code versions
def test_renaming_a_module_changes_no_key(tmp_path, original):
    src = tree_copy(tmp_path)
    rename_module(src, "tasks.shuffle", "tasks.splitting")  # imported by name: `from tasks.shuffle import …`
    rename_module(src, "tasks.data.minhash", "tasks.data.lsh")  # imported as a module: `minhash.signatures(…)`
    assert not module_file(src, "tasks.shuffle").exists() and not module_file(src, "tasks.data.minhash").exists()
    assert read(versions(src)) == original


@pytest.mark.slow  # a fresh interpreter reads a copy's code versions
def test_splitting_a_module_changes_no_key(tmp_path, original):
    src = tree_copy(tmp_path)
    for module in ("tasks.data.shingles", "tasks.tokenize"):
        names = movable(src, module)
        assert len(names) >= 6, names
        move(src, module, names[1::2], f"{module}_part")  # every second definition: both halves call each other
    assert read(versions(src)) == original


@pytest.mark.slow  # a fresh interpreter reads a copy's code versions
def test_the_move_test_can_fail(tmp_path):
    """The move above is a real change of where code lives: a digest that names modules (the old way, put back
    as a mutation) sees it in chunk's key and not in load's."""
    def mutated(name: str, moved: bool) -> dict[str, str]:
        src = tree_copy(tmp_path / name)
        edit(module_file(src, "tasks.core.keys"), "    for dump in sorted(seen.values()):",
             "    for dump in sorted(f'{k}={v}' for k, v in seen.items()):")
        if moved:
            move(src, "tasks.data.windows", ["window_plan"], "tasks.data.geometry")
        return read(versions(src))

    before, after = mutated("before", False), mutated("after", True)
    assert after["chunk"] != before["chunk"] and after["load"] == before["load"]


def test_each_library_version_is_looked_up_once_per_process(monkeypatch):
    """A library's version is part of every key that names it, and looking it up scans sys.path's distributions
    (~1.4 ms): every stage's first key once asked again for numpy and pyarrow."""
    import importlib.metadata

    import flows.continued_pretraining  # noqa: F401  every stage declared
    from tasks.core import keys

    asked: list[str] = []
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: asked.append(name) or real(name))
    keys.library_version.cache_clear()
    keys._VERSIONS.clear()
    try:
        versions = {s: keys.code_version(s) for s in keys._SPECS}
    finally:
        keys._VERSIONS.clear()
        keys.library_version.cache_clear()
    named = {lib for spec in keys._SPECS.values() for lib in spec.libraries}
    assert sorted(asked) == sorted(named) and len(named) > 1
    assert versions == {s: keys.code_version(s) for s in keys._SPECS}  # the same versions as computed afresh
