"""Decontamination as the flow runs it: general-load and held-out before shuffle, replay-held-out before
replay-shuffle. Planted evaluation text (a general-corpus paragraph, a task's sentence) never reaches training,
from the domain corpus or from the replay text; validation and the evaluation data stay as they were."""

import json
from pathlib import Path

import pytest

from helpers import run_flow as run
from helpers import sample_texts, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def split_texts(summary, artifacts, stage: str, load_stage: str, split: str) -> list[str]:
    from tasks.data.arrow import read_arrow
    from tasks.data.pieces import entry_documents

    out = {s["name"]: Path(s["output"]) for s in summary["stages"] if s.get("output")}
    docs = entry_documents(out[load_stage], artifacts)
    text_of = dict(zip(docs.column("doc_id").to_pylist(), docs.column("text").to_pylist()))
    return [text_of[d] for d in read_arrow(out[stage] / f"{split}.arrow").column("doc_id").to_pylist()]


def test_planted_evaluation_text_never_reaches_training_from_the_corpus_or_the_replay_text(
        tmp_path, artifacts, tiny_model):
    from tasks.evaluate import write_cloze_task

    texts = sample_texts()
    general_paragraph = texts[300]
    write_jsonl(tmp_path / "general" / "g.jsonl", [{"content": t} for t in texts[300:310]])
    task_yaml = write_cloze_task(texts[250:290], tmp_path / "tasks", "planted_cloze", n=20)
    items = [json.loads(x) for x in (tmp_path / "tasks" / "planted_cloze.jsonl").read_text().splitlines()]
    task_sentence = max((c for it in items for c in it["choices"]), key=len)
    planted = [f"{texts[200]}\n{general_paragraph[:120]}\n{texts[201]}", f"{texts[202]}\n{task_sentence}"]
    write_jsonl(tmp_path / "corpus" / "a.jsonl", [{"content": t} for t in texts[:80] + planted])
    replay_planted = [f"General text. {general_paragraph[10:130]} More.",
                      f"{task_sentence} 그리고 다른 이야기."]
    write_jsonl(tmp_path / "replay" / "r.jsonl", [{"content": t} for t in texts[150:180] + replay_planted])
    config = {"corpus": {"paths": [str(tmp_path / "corpus")]}, "model": {"id": str(tiny_model)},
              "split": {"validation_fraction": 0.1}, "chunk": {"max_seq_length": 64, "overlap": 16},
              "shuffle": {"decontaminate": {"enabled": True}},
              "evaluate": {"general_corpus": [str(tmp_path / "general")], "tasks": [str(task_yaml)]},
              "replay": {"paths": [str(tmp_path / "replay")], "fraction": 0.2}}
    states, summary = run(config, artifacts, until="chunk")
    assert {"general-load", "held-out", "replay-held-out", "replay-shuffle"} <= set(states)
    counts = {s["name"]: s.get("counts", {}) for s in summary["stages"]}
    train = split_texts(summary, artifacts, "shuffle", "load", "train")
    validation = split_texts(summary, artifacts, "shuffle", "load", "validation")
    for doc in planted:
        assert doc not in train
    removed = [d for d in planted if d not in validation]  # a planted document may draw validation: unchanged
    assert counts["shuffle"]["decontaminated"] >= len(removed) >= 1
    replay_train = split_texts(summary, artifacts, "replay-shuffle", "replay-load", "train")
    assert not set(replay_planted) & set(replay_train)
    assert counts["replay-shuffle"]["decontaminated"] == 2
    assert counts["replay-shuffle"]["decontaminated_by_evaluate_general_corpus"] == 1
    # The task's sentence: counted under the task, or under the validation split when the domain document
    # quoting it drew validation (the first source a gram was added from is the one named).
    assert (counts["replay-shuffle"].get("decontaminated_by_evaluate_tasks_planted_cloze", 0)
            + counts["replay-shuffle"].get("decontaminated_by_validation_split", 0)) == 1
    assert len(replay_train) == 30
    # The evaluation data is read, never changed: all of it is in the held-out stage.
    assert counts["held-out"]["documents_from_evaluate_general_corpus"] == 10
    assert counts["held-out"]["documents_from_evaluate_tasks_planted_cloze"] == len(items)
    assert counts["replay-held-out"]["documents_from_validation_split"] == len(validation)
    assert counts["replay-held-out"]["documents"] == counts["held-out"]["documents"] + len(validation)

    # Off: no held-out stage runs and nothing is removed.
    states, summary = run({**config, "shuffle": {}}, artifacts, until="chunk")
    assert "held-out" not in states and "general-load" not in states
    off_train = split_texts(summary, artifacts, "shuffle", "load", "train")
    assert set(planted) - set(validation) <= set(off_train)
