"""Downstream tasks (lm-evaluation-harness) in evaluate, the gate and the card, offline: a local Korean health
cloze written from the project's own samples; nothing downloads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from helpers import sample_texts, write_jsonl
from tasks.core.config.base import ConfigError
from tasks.core.config.model import GateConfig
from tasks.core.config.tree import validate_config
from tasks.gate import decide, task_values

REPO = Path(__file__).resolve().parents[1]
SAMPLE_TASK = REPO / "samples" / "tasks" / "ko_health_cloze.yaml"


@pytest.fixture
def cloze(tmp_path) -> Path:
    from tasks.evaluate import write_cloze_task

    return write_cloze_task(sample_texts(), tmp_path / "tasks", "ko_cloze_test", n=24)


def base(tmp_path, **evaluate) -> dict:
    return {"corpus": {"paths": [str(tmp_path)]}, "model": {"id": "m"}, "evaluate": evaluate}


# ------------------------------------------------------------------------------------------- config


def test_a_registry_task_offline_fails_validation_naming_the_task_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError) as e:
        validate_config(base(tmp_path, tasks=["kormedmcqa"]))
    assert "evaluate.tasks" in str(e.value) and "'kormedmcqa'" in str(e.value)
    assert "HF_DATASETS_OFFLINE" in str(e.value)
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert validate_config(base(tmp_path, tasks=["kormedmcqa"])).evaluate.tasks == ["kormedmcqa"]


def test_local_tasks_are_checked_in_validate(tmp_path, cloze):
    assert validate_config(base(tmp_path, tasks=[str(cloze)])).evaluate.local_tasks() == [cloze]
    with pytest.raises(ConfigError, match="no such task YAML"):
        validate_config(base(tmp_path, tasks=[str(tmp_path / "nope.yaml")]))
    cloze.with_suffix(".jsonl").unlink()
    with pytest.raises(ConfigError, match="its data file .* does not exist"):
        validate_config(base(tmp_path, tasks=[str(cloze)]))


def test_gate_tasks_need_evaluated_tasks(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ConfigError, match="evaluate.tasks is empty"):
        validate_config({**base(tmp_path), "gate": {"tasks": [{"task": "kormedmcqa"}]}})
    with pytest.raises(ConfigError, match=r"\['kmmlu'\] not in evaluate.tasks"):
        validate_config({**base(tmp_path, tasks=["kormedmcqa"]), "gate": {"tasks": [{"task": "kmmlu"}]}})
    with pytest.raises(ConfigError, match="max_drop"):
        validate_config({**base(tmp_path, tasks=["kormedmcqa"]),
                         "gate": {"tasks": [{"task": "kormedmcqa", "max_drop": -0.1}]}})


def test_a_task_folder_runs_every_task_its_yamls_name(tmp_path):
    from tasks.core.config.model import EvaluateConfig
    from tasks.evaluate import write_cloze_task
    from tasks.ml.lm_tasks import write_private_tasks

    for name in ("b_cloze", "a_cloze"):
        write_cloze_task(sample_texts(), tmp_path / "suite", name, n=5)
    (tmp_path / "suite" / "_shared.yaml").write_text("doc_to_text: !function utils.doc_to_text\n")  # no task
    cfg = EvaluateConfig(tasks=[str(tmp_path / "suite")])
    private = tmp_path / "private"
    assert write_private_tasks(cfg.tasks, private) == ["a_cloze", "b_cloze"]
    copied = sorted(p.relative_to(private).as_posix() for p in private.rglob("*") if p.is_file())
    assert copied == ["task-001/_shared.yaml", "task-002/a_cloze.yaml", "task-002/data/001-a_cloze.jsonl",
                      "task-003/b_cloze.yaml", "task-003/data/001-b_cloze.jsonl"]


def test_the_committed_sample_task_is_what_the_generator_writes(tmp_path, monkeypatch):
    """samples/tasks/ is generated (cpt make-cloze-task samples/tasks), never edited by hand."""
    from tasks.evaluate import write_cloze_task
    from tasks.ml.tiny_model import read_texts

    monkeypatch.chdir(REPO)
    out = write_cloze_task(read_texts(Path("samples/medical_ko.jsonl")), tmp_path, "ko_health_cloze",
                           data_path="samples/tasks/ko_health_cloze.jsonl", source="samples/medical_ko.jsonl")
    assert out.read_text() == SAMPLE_TASK.read_text()
    assert out.with_suffix(".jsonl").read_text() == SAMPLE_TASK.with_suffix(".jsonl").read_text()
    items = [json.loads(x) for x in SAMPLE_TASK.with_suffix(".jsonl").read_text().splitlines()]
    assert len(items) > 100 and all(len(i["choices"]) == 4 and len(set(i["choices"])) == 4 for i in items)
    assert {i["label"] for i in items} == {0, 1, 2, 3}  # the answer's position is shuffled


# --------------------------------------------------------------------------------------------- gate


def test_the_gate_refuses_a_model_whose_task_accuracy_fell_although_its_perplexity_improved():
    cfg = GateConfig(tasks=[{"task": "ko_cloze", "metric": "acc", "max_drop": 0.02}])
    args = ({"validation": 10.0}, {"validation": 20.0}, {"validation": 20.0}, {"train_loss": 2.0}, "the base model")
    refused = decide(cfg, *args, new_tasks={"ko_cloze": {"acc": 0.40}}, reference_tasks={"ko_cloze": {"acc": 0.50}})
    assert not refused["promoted"]
    assert [c["check"] for c in refused["checks"] if not c["passed"]] == ["task ko_cloze acc"]
    assert "task ko_cloze acc 0.4 < 0.48" in refused["reason"]
    task_check = refused["checks"][-1]
    assert task_check["value"] == 0.40 and task_check["limit"] == pytest.approx(0.48) and task_check["task"] == "ko_cloze"
    # Within max_drop: promoted (the perplexity check alone decides).
    ok = decide(cfg, *args, new_tasks={"ko_cloze": {"acc": 0.49}}, reference_tasks={"ko_cloze": {"acc": 0.50}})
    assert ok["promoted"], ok["reason"]


@pytest.mark.parametrize("new, ref, shown", [(None, 0.5, "this model's is missing"),
                                             (float("nan"), 0.5, "this model's is nan"),
                                             (0.5, None, "the base model's is missing")])
def test_a_missing_or_non_finite_task_result_refuses_naming_the_task(new, ref, shown):
    cfg = GateConfig(tasks=[{"task": "ko_cloze", "metric": "acc"}])
    d = decide(cfg, {"validation": 10.0}, {"validation": 20.0}, {"validation": 20.0}, {"train_loss": 2.0},
               "the base model", new_tasks={"ko_cloze": {"acc": new}}, reference_tasks={"ko_cloze": {"acc": ref}})
    assert not d["promoted"] and "task 'ko_cloze' metric 'acc' not measured" in d["reason"] and shown in d["reason"]


def test_task_values_read_both_eval_documents():
    base_doc = {"tasks": {"t": {"metrics": {"acc": {"value": 0.3, "stderr": 0.1}}, "examples": 8}}}
    after_doc = {"tasks": {"t": {"acc": {"before": 0.3, "after": 0.4, "stderr_after": 0.1}}}}
    assert task_values(base_doc) == {"t": {"acc": 0.3}} and task_values(after_doc) == {"t": {"acc": 0.4}}


# ------------------------------------------------------------------------------------- the harness


@pytest.mark.slow  # lm-eval's simple_evaluate records its environment: git, pip, uname, nvcc as child processes
def test_the_harness_runs_the_local_task_on_the_loaded_model(tiny_model, cloze, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from tasks.core.config.model import EvaluateConfig, ModelConfig
    from tasks.evaluate import comparison, comparison_markdown, evaluate_model

    cfg = EvaluateConfig(tasks=[str(cloze)], task_limit=6, num_fewshot=0, task_batch_size=4)
    rows = [{"input_ids": [1, 5, 6, 7, 8], "labels": [-100, 5, 6, 7, 8]}]
    result = evaluate_model(str(tiny_model), ModelConfig(id=str(tiny_model)), cfg, rows, None)
    t = result["tasks"]["ko_cloze_test"]
    assert t["examples"] == 6 and set(t["metrics"]) == {"acc", "acc_norm"}
    acc = t["metrics"]["acc"]
    assert 0 <= acc["value"] <= 1 and acc["value"] * 6 == pytest.approx(round(acc["value"] * 6))
    assert math.isfinite(acc["stderr"]) and result["task_seconds"] > 0
    doc = comparison(result, result, [])
    assert doc["tasks"]["ko_cloze_test"]["acc"] == {"before": acc["value"], "after": acc["value"],
                                                     "stderr_before": acc["stderr"], "stderr_after": acc["stderr"],
                                                     "examples": 6}
    assert "| ko_cloze_test | acc |" in comparison_markdown(doc)


def test_the_task_fingerprint_follows_the_task_files_content(cloze):
    from tasks.core.config.model import EvaluateConfig
    from tasks.evaluate import task_fingerprint

    cfg = EvaluateConfig(tasks=[str(cloze)])
    assert task_fingerprint(EvaluateConfig()) is None
    first = task_fingerprint(cfg).digest
    data = cloze.with_suffix(".jsonl")
    data.write_text(data.read_text().replace('"label": 0', '"label": 1', 1))
    assert task_fingerprint(cfg).digest != first


def test_the_card_lists_the_task_table():
    from tasks.push import evaluation_markdown

    md = evaluation_markdown({"evaluation": {"validation_base": 20.0, "validation_new": 10.0,
                                             "tasks": {"ko_cloze/acc": {"base": 0.25, "reference": 0.25, "new": 0.5}},
                                             "task_examples": {"ko_cloze": 8}}})
    assert "| task / metric (lm-evaluation-harness) | examples | base model | gate reference | this model |" in md
    assert "| ko_cloze/acc | 8 | 0.2500 | 0.2500 | 0.5000 |" in md


# ------------------------------------------------------------------------------------------- the flow


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_tasks_through_the_flow_gate_card_and_a_cached_rerun_evaluates_nothing(tmp_path, tiny_model, artifacts,
                                                                               cloze, monkeypatch):
    from flows.continued_pretraining import continued_pretraining
    from tasks import evaluate as evaluate_stage

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_jsonl(tmp_path / "corpus" / "corpus.jsonl", [{"content": t} for t in sample_texts()])
    config = validate_config({
        "corpus": {"paths": [str(tmp_path / "corpus")]}, "model": {"id": str(tiny_model)},
        "split": {"validation_fraction": 0.1}, "chunk": {"max_seq_length": 96, "overlap": 16},
        "train": {"max_steps": 6, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                  "learning_rate": 3e-3, "warmup_ratio": 0.0, "logging_steps": 1, "eval_steps": 3, "save_steps": 3,
                  "early_stopping_patience": None},
        "evaluate": {"max_eval_rows": 16, "tasks": [str(cloze)], "task_limit": 8, "num_fewshot": 0},
        # Perplexity may rise 10x: the task check alone decides whether this model is promoted.
        "gate": {"max_validation_increase": 10.0, "tasks": [{"task": "ko_cloze_test", "metric": "acc"}]},
        "push": {"name": "tasks-test"}})
    calls = []
    real = evaluate_stage.run_tasks
    monkeypatch.setattr(evaluate_stage, "run_tasks", lambda *a, **k: calls.append(1) or real(*a, **k))
    summary = continued_pretraining(config=config, artifacts=str(artifacts))
    stages = {s["name"]: s for s in summary["stages"]}
    assert len(calls) == 2  # the base (also the reference) and the new model, once each
    ev = stages["evaluate"]["counts"]
    assert set(ev["tasks"]) == {"ko_cloze_test/acc", "ko_cloze_test/acc_norm"} and ev["task_examples"] == {
        "ko_cloze_test": 8} and ev["task_seconds"] > 0
    doc = json.loads((Path(stages["evaluate"]["output"]) / "eval.json").read_text())
    acc = doc["tasks"]["ko_cloze_test"]["acc"]
    assert acc["before"] == stages["evaluate-base"]["counts"]["tasks"]["ko_cloze_test/acc"]
    assert acc["after"] == ev["tasks"]["ko_cloze_test/acc"] and acc["stderr_after"] is not None
    checks = {c["check"]: c for c in summary["gate"]["checks"]}
    task_check = checks["task ko_cloze_test acc"]
    assert task_check["value"] == acc["after"] and task_check["limit"] == acc["before"]
    assert task_check["passed"] == (acc["after"] >= acc["before"])
    assert summary["gate"]["promoted"] == all(c["passed"] for c in checks.values())
    if summary["gate"]["promoted"]:
        card = (artifacts / "models" / "tasks-test" / "README.md").read_text()
        assert "| ko_cloze_test/acc | 8 |" in card and "## Tasks (lm-evaluation-harness" in card
    else:
        assert "task ko_cloze_test acc" in summary["gate"]["reason"]

    calls.clear()
    again = continued_pretraining(config=config, artifacts=str(artifacts))
    states = {s["name"]: s["state"] for s in again["stages"]}
    assert states["evaluate-base"] == states["evaluate"] == states["gate"] == "Cached" and calls == []


def word_order_task(folder: Path, n: int = 24) -> Path:
    """A task the domain training hurts by construction: the 'right' continuation is the document's own next
    sentence with its words shuffled, the wrong one the sentence as written. A model that learnt the domain's
    text prefers the sentence as written, so its accuracy here falls while its perplexity improves."""
    import random

    from tasks.evaluate import CLOZE_YAML, cloze_items

    rng = random.Random(0)
    items = []
    for item in cloze_items(sample_texts(), n):
        own = item["choices"][item["label"]]
        words = own.split()
        rng.shuffle(words)
        if " ".join(words) != own:
            items.append({"context": item["context"], "choices": [own, " ".join(words)], "label": 1})
    write_jsonl(folder / "word_order.jsonl", items)
    yaml_file = folder / "word_order.yaml"
    yaml_file.write_text(CLOZE_YAML.format(name="word_order", data=folder / "word_order.jsonl", source="test"))
    return yaml_file


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_model_whose_task_accuracy_falls_is_refused_though_its_perplexity_improved(tmp_path, tiny_model,
                                                                                      artifacts, monkeypatch):
    from flows.continued_pretraining import continued_pretraining

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_jsonl(tmp_path / "corpus" / "corpus.jsonl", [{"content": t} for t in sample_texts()])
    task = word_order_task(tmp_path / "tasks")
    config = validate_config({
        "corpus": {"paths": [str(tmp_path / "corpus")]}, "model": {"id": str(tiny_model)},
        "split": {"validation_fraction": 0.1}, "chunk": {"max_seq_length": 96, "overlap": 16},
        "train": {"max_steps": 12, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                  "learning_rate": 3e-3, "warmup_ratio": 0.0, "logging_steps": 1, "eval_steps": 6, "save_steps": 6,
                  "early_stopping_patience": None},
        "evaluate": {"max_eval_rows": 16, "tasks": [str(task)], "num_fewshot": 0},
        "gate": {"tasks": [{"task": "word_order", "metric": "acc", "max_drop": 0.02}]},
        "push": {"name": "word-order-test"}})
    summary = continued_pretraining(config=config, artifacts=str(artifacts))
    states = {s["name"]: s["state"] for s in summary["stages"]}
    checks = {c["check"]: c for c in summary["gate"]["checks"]}
    assert checks["validation perplexity"]["passed"]  # better perplexity than the base model ...
    task_check = checks["task word_order acc"]  # ... but worse at the task
    assert not task_check["passed"] and task_check["value"] < task_check["limit"]
    assert summary["gate"]["promoted"] is False and "task word_order acc" in summary["gate"]["reason"]
    assert states["push"] == "Skipped" and not (artifacts / "models" / "word-order-test").exists()
