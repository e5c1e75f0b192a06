"""`corpus` + `replay` is the two-source case of `sources`: a config written before `sources` existed runs the same
stage calls with the same keys (its cache stays valid). The keys were recorded from the flow as it was before the
`sources` section (the load/shuffle/tokenize/chunk calls of the corpus, the replay-* calls and mix, with and without
decontamination); a run today must give exactly those stage names and keys.

After a deliberate change of a data stage's code (which changes its key on purpose):

    CPT_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_legacy_keys.py
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import tempfile
from pathlib import Path

import pytest

from helpers import run_flow

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

GOLDEN = Path(__file__).parent / "golden" / "legacy_keys.json"
LIBRARIES = ["tokenizers", "transformers", "numpy", "pyarrow", "datasets", "lm-eval"]

DOMAIN = [f"문서 {i}: 고혈압 환자는 하루 나트륨 섭취를 {1500 + 10 * i}mg 이하로 줄이고 매일 같은 시간에 혈압을 잰다. "
          f"약은 의사와 상의해 {i % 7 + 1}주마다 조정한다." for i in range(40)]
REPLAY = [f"General text {i}: the committee met on day {i} and agreed that the bridge needs {i % 5 + 2} more "
          "inspections before the winter." for i in range(20)]
GENERAL = [f"일반 문서 {i}: 오늘 날씨는 맑고 기온은 {i}도이다. 시장에는 사람이 많았다." for i in range(6)]
TOKENIZER_TEXTS = DOMAIN + REPLAY + GENERAL


@pytest.fixture(scope="module")
def fixed_tokenizer(tmp_path_factory) -> Path:
    """A tokenizer trained on the fixture's own fixed text: its digest (part of every key) does not move."""
    from tasks.ml.tiny_model import train_tokenizer

    out = tmp_path_factory.mktemp("legacy-tok") / "tok"
    train_tokenizer(TOKENIZER_TEXTS, vocab_size=300).save_pretrained(out)
    (out / "config.json").write_text("{}")
    return out


# The load stage keys the files' paths (they are its `source` column): the fixture's files live at one fixed
# place, written atomically with the same bytes by every run (concurrent runs included).
FIXTURE = Path(tempfile.gettempdir()) / "cpt-legacy-keys-fixture"


def write_fixed(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps({"content": t}, ensure_ascii=False) + "\n" for t in texts).encode()
    if not path.is_file() or path.read_bytes() != data:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


def legacy_config(tokenizer: Path, decontaminate: bool) -> dict:
    write_fixed(FIXTURE / "corpus" / "a.jsonl", DOMAIN)
    write_fixed(FIXTURE / "replay" / "r.jsonl", REPLAY)
    write_fixed(FIXTURE / "general" / "g.jsonl", GENERAL)
    config = {"corpus": {"paths": [str(FIXTURE / "corpus")]}, "model": {"id": str(tokenizer)},
              "split": {"validation_fraction": 0.1}, "chunk": {"max_seq_length": 32, "overlap": 8},
              "replay": {"paths": [str(FIXTURE / "replay")], "fraction": 0.25}}
    if decontaminate:
        config["shuffle"] = {"decontaminate": {"enabled": True}}
        config["evaluate"] = {"general_corpus": [str(FIXTURE / "general")]}
    return config


@pytest.mark.parametrize("decontaminate", [False, True], ids=["replay", "replay+decontaminate"])
def test_an_old_two_source_config_keeps_every_stage_and_key(artifacts, fixed_tokenizer, decontaminate):
    _, summary = run_flow(legacy_config(fixed_tokenizer, decontaminate), artifacts, until="chunk")
    keys = [[s["name"], s["key"]] for s in summary["stages"]]
    libraries = {lib: importlib.metadata.version(lib) for lib in LIBRARIES}
    case = "decontaminate" if decontaminate else "replay"
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if os.environ.get("CPT_UPDATE_GOLDEN"):
        golden = {**golden, "libraries": libraries, case: keys}
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=2, sort_keys=True) + "\n")
        return
    if golden.get("libraries") != libraries:
        pytest.skip(f"the legacy keys were recorded with {golden.get('libraries')}, this environment has {libraries}: "
                    "library versions are part of every key")
    assert keys == golden[case]
