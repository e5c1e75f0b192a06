"""The docs' checklists, followed once each on a copy of the code. docs/adding-a-reader.md is followed by
tests/test_load.py::test_adding_a_reader_format_is_one_function_and_one_row; docs/adding-a-stage.md here: a
`doc-count` stage after load, added by its four steps (three: it has no settings), then run by `cpt run --until`
twice — built, then Cached — with its summary line and its place in the run summary."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, SAMPLE_CORPUS

pytestmark = pytest.mark.slow

STAGE = '''"""doc-count: how many documents load kept (a stage added by docs/adding-a-stage.md)."""

from __future__ import annotations

import json
import logging

from tasks.core.manifest import StageOutput
from tasks.core.stage import Build, stage
from tasks.load import Docs


class DocCount(StageOutput):
    def summary(self, root):
        return [(logging.INFO, f"{self.counts['documents']} documents counted")]


@stage("doc-count", version=1, output=DocCount)
def doc_count(build: Build, docs: Docs):
    n = docs.index(build.root, ["doc_id"]).num_rows
    (build.tmp / "count.json").write_text(json.dumps({"documents": n}))
    return {"documents": n}, {}
'''


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{path}: {old!r} not found: docs/adding-a-stage.md must be updated with the code"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_adding_a_stage_by_the_checklist(tmp_path, tiny_model):
    src = tmp_path / "src"
    for pkg in ("tasks", "flows"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    # 1. tasks/<stage>.py
    (src / "tasks" / "doc_count.py").write_text(STAGE, encoding="utf-8")
    # 2. its place in PIPELINE
    edit(src / "flows" / "stages.py", '("load", "shuffle",', '("load", "doc-count", "shuffle",')
    # 3. one call in the flow, at its place
    flow = src / "flows" / "continued_pretraining.py"
    edit(flow, "from tasks.shuffle import shuffle\n", "from tasks.shuffle import shuffle\nfrom tasks.doc_count import doc_count\n")
    loaded = "    first.docs = run(load, **load_inputs(source.corpus, first.fingerprint), runtime=config.runtime)\n"
    edit(flow, loaded, loaded + "    run(doc_count, docs=first.docs)\n")

    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONDONTWRITEBYTECODE": "1", "PREFECT_HOME": str(tmp_path / "ph"),
           "CPT_CACHE_HOME": str(tmp_path / "cache-home"), "CPT_NO_PROGRESS": "1"}
    command = [sys.executable, "-m", "flows.cli", "run", "--artifacts", str(tmp_path / "artifacts"),
               "--set", f"corpus.paths=[{SAMPLE_CORPUS}]", "--set", f"model.id={tiny_model}",
               "--until", "doc-count", "--summary", str(tmp_path / "summary.json")]
    states, logs = [], []
    for _ in range(2):
        out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        summary = json.loads((tmp_path / "summary.json").read_text())
        states.append({s["name"]: s["state"] for s in summary["stages"]})
        logs.append(out.stdout + out.stderr)
    assert states[0] == {"load": "Completed", "doc-count": "Completed"}, states[0]
    assert states[1] == {"load": "Cached", "doc-count": "Cached"}, states[1]
    assert "doc-count: 322 documents counted" in logs[0]  # its summary(), logged when it is built
    assert "doc-count" in subprocess.run([sys.executable, "-m", "flows.cli", "run", "--help"], cwd=tmp_path,
                                         env=env, capture_output=True, text=True).stdout
