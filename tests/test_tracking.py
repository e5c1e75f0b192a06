"""train.report_to: the tracker's run is named after the Prefect flow run and tagged with the line, the drop, the
train key and the run's URL; the training, evaluate's numbers and the gate's decision land in the same run;
credentials come from the environment and are written nowhere. Offline: an MLflow file store and W&B's offline
mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FLOW = {"name": "brave-otter", "id": "0b5c", "url": "http://127.0.0.1:4200/runs/flow-run/0b5c", "line": "ko-med",
        "drop": "/data/drops/2026-11-25"}
SECRET = "s3cr3t-" + "9f1c2e7a"


def test_the_run_is_named_after_the_flow_run_and_tagged_without_credentials(monkeypatch):
    from tasks.core.tracking import child_environment, tracker_run, wandb_run_id

    run = tracker_run("train-abc123", FLOW)
    assert run.name == "brave-otter"
    assert run.tags == {"cpt.train_key": "train-abc123", "cpt.line": "ko-med", "cpt.drop": "/data/drops/2026-11-25",
                        "cpt.prefect_url": FLOW["url"], "cpt.flow_run_id": "0b5c"}
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    env = child_environment(["mlflow", "wandb", "trackio"], run)
    assert json.loads(env["MLFLOW_TAGS"]) == run.tags
    assert env["WANDB_RUN_ID"] == wandb_run_id("train-abc123") and "line=ko-med" in env["WANDB_TAGS"]
    assert SECRET not in json.dumps(env) and SECRET not in run.model_dump_json()
    assert tracker_run("train-x", {}).name == "train-x"  # outside a flow run: the key names it


@pytest.mark.slow  # a training child
def test_mlflow_and_wandb_hold_the_training_the_evaluation_and_the_gate(tiny_model, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from tasks.core.config.model import ModelConfig, TrainConfig
    from tasks.core.tracking import log_evaluation, log_gate, tracker_run, wandb_run_id
    from tasks.train import train_model
    from test_lora import _chunks

    # MLflow 3.18's recommended local store (its file store is in maintenance mode): SQLite, artifacts in a folder.
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    MlflowClient(store).create_experiment("cpt", artifact_location=(tmp_path / "mlartifacts").as_uri())
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    (tmp_path / "wandb-home").mkdir()
    monkeypatch.setenv("WANDB_API_KEY", SECRET)  # read by the libraries, never written by cpt
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    chunks = _chunks(tiny_model, tmp_path / "chunks")
    out = tmp_path / "train"
    out.mkdir()
    cfg = TrainConfig(max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=3e-3,
                      warmup_ratio=0.0, logging_steps=1, eval_steps=3, save_steps=3, early_stopping_patience=None,
                      optim="adamw_torch", report_to=["tensorboard", "mlflow", "wandb"])
    key = "train-0123456789abcdef01234567"
    spec = {"model_location": str(tiny_model), "model": ModelConfig(id=str(tiny_model)).model_dump(),
            "train": cfg.model_dump(), "max_seq_length": 48, "chunks_dir": str(chunks), "output_dir": str(out),
            "checkpoint_dir": str(out / "checkpoints"), "tensorboard_dir": str(out / "tensorboard"),
            "tracker": tracker_run(key, FLOW).model_dump()}
    train_model(spec, 1)
    doc = {"perplexity": {"validation": {"before": 480.0, "after": 455.5, "relative_change": -0.05, "tokens": 100},
                          "general": None}, "generations": []}
    rows = [{"metric": "perplexity (validation)", "before": 480.0, "after": 455.5, "change": -0.05}]
    assert log_evaluation(key, doc, "| metric | before | after |", rows, report_to=["mlflow", "wandb"]) == \
        ["mlflow", "wandb"]
    decision = {"promoted": True, "reason": "validation perplexity 455.5 < 480.0", "checks": []}
    assert log_gate(key, decision, report_to=["mlflow", "wandb"]) == ["mlflow", "wandb"]

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("cpt")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "brave-otter"
    assert {k: run.data.tags[k] for k in ("cpt.line", "cpt.drop", "cpt.train_key", "cpt.prefect_url")} == {
        "cpt.line": "ko-med", "cpt.drop": FLOW["drop"], "cpt.train_key": key, "cpt.prefect_url": FLOW["url"]}
    assert run.data.params["learning_rate"] == "0.003" and run.data.params["max_steps"] == "6"
    curve = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in curve] == [1, 2, 3, 4, 5, 6]  # the loss curve, a point per step
    assert len(client.get_metric_history(run.info.run_id, "eval_loss")) == 2
    assert run.data.metrics["eval/validation_perplexity_after"] == 455.5
    assert run.data.metrics["gate/promoted"] == 1.0 and run.data.tags["cpt.gate"] == "promoted"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval.md", "eval.json", "eval_table.json", "gate.json"} <= artifacts
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "eval_table.json", str(tmp_path))).read_text())
    assert "perplexity (validation)" in json.dumps(table)

    # W&B, offline: the training's run folder, named by the id derived from the train key, and the later
    # evaluation and gate logged under the same id.
    runs = sorted((tmp_path / "wandb-home" / "wandb").glob(f"offline-run-*-{wandb_run_id(key)}"))
    assert len(runs) >= 2 and all(list(r.glob("*.wandb")) for r in runs)

    # No credential anywhere cpt or the trackers wrote.
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert SECRET.encode() not in path.read_bytes(), path
