"""`make demo` as a user runs it (its two commands, in a fresh folder), and what it promises."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT


def hangul_share(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    return sum("\uac00" <= c <= "\ud7a3" for c in chars) / len(chars) if chars else 0.0


@pytest.mark.slow
def test_make_demo_shows_what_cpt_is_for(tmp_path):
    """The demo's promises: the validation loss still falls at its last evaluation, the run prints where the loss
    curve is, and the generations after training are Korean health sentences — every character a Hangul syllable
    or punctuation, no U+FFFD, no word repeated over and over, one continuation per prompt — where the untrained
    model's were not."""
    for folder in ("configs", "samples"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    env = {"PYTHONPATH": str(ROOT), "CPT_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90"}
    import os

    env = {**os.environ, **env}
    for cmd in (["init-tiny-model", "artifacts/models/tiny-ko", "--corpus", "samples/medical_ko.jsonl"],
                ["run", "--config", "configs/demo.yaml", "--summary", "summary.json"]):
        out = subprocess.run([sys.executable, "-m", "flows.cli", *cmd], cwd=tmp_path, env=env, capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    stages = {s["name"]: s for s in json.loads((tmp_path / "summary.json").read_text())["stages"]}
    curve = next(line.split(": ", 1)[1] for line in out.stdout.splitlines() if line.startswith("loss curve: "))
    assert Path(curve).is_file() and Path(curve).parent == Path(stages["train"]["output"])
    history = json.loads((Path(stages["train"]["output"]) / "log_history.json").read_text())
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert len(evals) >= 4 and evals[-1] < evals[-2] < evals[0], evals  # still falling at the end
    assert stages["train"]["counts"]["global_step"] == stages["train"]["counts"]["max_steps"]  # no early stop
    doc = json.loads((Path(stages["evaluate"]["output"]) / "eval.json").read_text())
    before = [g["before"] for g in doc["generations"]]
    after = [g["after"] for g in doc["generations"]]
    assert len(after) == 4 and all(a.strip() for a in after)
    text = "".join(after)
    assert hangul_share(text) >= 0.7, after
    assert "\ufffd" not in text, after
    assert hangul_share("".join(before)) < hangul_share(text), (before, after)
    assert len(set(after)) == 4, after  # not one continuation whatever the prompt
    for a in after:  # not word salad on repeat: no word more than twice in one continuation
        words = a.split()
        assert max(words.count(w) for w in words) <= 2, a
    assert stages["gate"]["counts"]["promoted"] is True
    assert "missing keys" not in out.stdout + out.stderr  # tied embeddings load without a warning
    assert "train: done 200/200 step" in out.stdout + out.stderr
    # A rate said as zero (`0 step/s`), not one that ends in a zero digit (`3.0 step/s`, `10 step/s`).
    assert not re.search(r"(?<![\d.,])0 step/s", out.stdout + out.stderr)
