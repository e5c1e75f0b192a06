"""Code versions are read from the code (tasks/core/keys.py), never from hand-kept name lists. Each case edits a
copy of tasks/ and flows/ and computes every stage's code version in a fresh process from that copy:

- a comment or docstring edit in every module changes no key (nor does an edit of infrastructure or of a
  manifest's `summary()`);
- an edit of a helper changes the keys of exactly the stages whose code reaches it;
- a helper added to a stage's module and called is covered without being listed;
- a call of a helper that was renamed away fails when the module is imported, naming it.
"""

from __future__ import annotations

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


def test_the_probe_sees_every_stage(original):
    assert set(DATA) | {"evaluate-base", "evaluate", "train", "gate", "push"} <= set(original)


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


def test_editing_a_helper_changes_exactly_the_stages_that_reach_it(tmp_path, original):
    src = tree_copy(tmp_path)
    # window_plan decides the chunk windows: chunk, its pieces, token-stats (which predicts the chunk lengths)
    # and evaluate (which chunks the general corpus the same way) reach it; load, tokenize and train do not.
    edit(src / "tasks" / "chunk.py", "    window = max_seq_length - (1 if has_bos else 0)\n",
         "    window = max_seq_length - (1 if has_bos else 0)\n    window = int(window)\n")
    after = read(versions(src))
    changed = {s for s in original if after[s] != original[s]}
    assert changed == {"chunk", "chunk-part", "token-stats", "token-stats-part", "evaluate-base", "evaluate"}


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
