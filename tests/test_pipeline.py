"""The whole flow with the tiny model: training, evaluation, push, caching across them, resume, early stop."""

import json
from pathlib import Path

import pytest

from flows.stages import PIPELINE
import torch

from helpers import flow_run_artifacts, flow_run_logs, sample_texts, touched_entries, write_jsonl
from tasks.core.config.tree import validate_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]
ALL_STAGES = [s for s in PIPELINE if s != "anneal"]  # flows/stages.py; anneal runs for a stable line only
PROMPT = "질문: 고혈압의 약물 치료는 어떻게 해야 하나요? \n답변:"


@pytest.fixture
def config(tmp_path, tiny_model):
    write_jsonl(tmp_path / "corpus.jsonl", [{"content": t} for t in sample_texts()])
    return {
        "corpus": {"paths": [str(tmp_path / "corpus.jsonl")]},
        "model": {"id": str(tiny_model)},
        "split": {"validation_fraction": 0.1},
        "chunk": {"max_seq_length": 96, "overlap": 16},
        "train": {"max_steps": 16, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                  "learning_rate": 3e-3, "warmup_ratio": 0.0, "logging_steps": 2, "eval_steps": 4,
                  "save_steps": 8, "packing": True},
        "evaluate": {"prompts": [PROMPT], "generation": {"max_new_tokens": 8}, "max_eval_rows": 32},
        "push": {"name": "tiny-test"},
    }


def run(config, artifacts, until=None, **sections):
    from flows.continued_pretraining import continued_pretraining

    cfg = json.loads(json.dumps(config))
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    summary = continued_pretraining(config=validate_config(cfg), artifacts=str(artifacts), until=until)
    return {s["name"]: s["state"] for s in summary["stages"]}, {s["name"]: s for s in summary["stages"]}


def test_end_to_end_learns_and_reruns_only_what_changed(config, artifacts):
    states, stages = run(config, artifacts)
    assert states == dict.fromkeys(ALL_STAGES, "Completed")

    t = stages["train"]["counts"]
    assert t["last_loss"] < t["first_loss"] and t["global_step"] == 16
    # Published entries are immutable: training (packing maps the dataset) wrote nothing into the chunks.
    assert not touched_entries(artifacts)
    # Packing: the unfilled room of the packed rows (max_seq_length each), measured from the packed dataset.
    assert 0.0 < t["padding_fraction"] < 0.5
    e = stages["evaluate"]["counts"]
    assert e["validation_perplexity_after"] < e["validation_perplexity_before"]

    eval_dir = Path(stages["evaluate"]["output"])
    doc = json.loads((eval_dir / "eval.json").read_text())
    assert set(doc["perplexity"]) == {"validation", "general"} and doc["perplexity"]["general"] is None
    assert [g["prompt"] for g in doc["generations"]] == [PROMPT] and isinstance(doc["generations"][0]["after"], str)
    assert "| perplexity (validation) |" in (eval_dir / "eval.md").read_text()

    train_dir = Path(stages["train"]["output"])
    assert (train_dir / "loss_curve.png").stat().st_size > 1000
    assert list((train_dir / "tensorboard").rglob("events.out.tfevents.*"))
    model_dir = artifacts / "models" / "tiny-test"
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in model_dir.iterdir()}
    card = (model_dir / "README.md").read_text()
    assert "base_model:" in card and "perplexity (validation)" in card and "learning_rate: 0.003" in card

    # What the Prefect UI shows for the run: live training progress, loss curve, eval table, model location.
    arts = flow_run_artifacts(next((artifacts / "runs").iterdir()).name)
    assert any(a.type == "progress" and a.data == 100.0 and "train: done 16/16" in a.description for a in arts)
    markdown = {a.key: a.data for a in arts if a.type == "markdown"}
    assert "data:image/png;base64," in markdown["train-loss-curve"]
    assert "| perplexity (validation) |" in markdown["eval-before-after"]
    assert str(model_dir) in markdown["model-location"]

    states, stages = run(config, artifacts, train={"learning_rate": 1e-3})
    # The gate compares the new model with the one promoted above; push runs only if it is no worse.
    pushed = "Completed" if stages["gate"]["counts"]["promoted"] else "Skipped"
    # The reference is the model promoted above, measured on the same validation chunks.
    assert states == {**dict.fromkeys(ALL_STAGES[:6], "Cached"), "train": "Completed", "evaluate": "Completed",
                      "evaluate-reference": "Completed", "gate": "Completed", "push": pushed}
    assert stages["gate"]["counts"]["reference"] == "promoted"
    states, _ = run(config, artifacts, train={"learning_rate": 1e-3})
    assert states == {**dict.fromkeys(ALL_STAGES[:-1], "Cached"), "evaluate-reference": "Cached",
                      "push": "Cached" if pushed == "Completed" else pushed}
    latest = max((artifacts / "runs").iterdir(), key=lambda p: p.stat().st_mtime).name
    cached_view = {a.key for a in flow_run_artifacts(latest)}
    assert {"run-summary", "token-stats-histogram", "train-loss-curve", "eval-before-after", "gate",
            *(["model-location"] if pushed == "Completed" else [])} <= cached_view


def test_killed_training_resumes_from_its_last_checkpoint(config, artifacts, monkeypatch):
    from tasks.train import TrainingFailed

    monkeypatch.setenv("CPT_TEST_KILL_AFTER_SAVE_STEP", "8")
    with pytest.raises(TrainingFailed, match="killed by signal 9|exit status"):
        run(config, artifacts, until="train")
    checkpoints = list((artifacts / "work" / "train").glob("*/checkpoints/checkpoint-8"))
    assert checkpoints, "the killed attempt left its checkpoint for the next one"
    assert not list((artifacts / "cache" / "train").glob("train-*"))  # nothing published

    monkeypatch.delenv("CPT_TEST_KILL_AFTER_SAVE_STEP")
    states, stages = run(config, artifacts, until="train")
    t = stages["train"]["counts"]
    assert states["train"] == "Completed" and t["resumed_from"] == "checkpoint-8" and t["global_step"] == 16
    history = json.loads((Path(stages["train"]["output"]) / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h][:2] == [2, 4]  # the first attempt's log is kept
    assert not list((artifacts / "work" / "train").iterdir())  # checkpoints go once the model is published
    # The resumed attempt really continued: its first optimizer step (the Trainer's own global_step in
    # on_step_end) is the checkpoint's + 1, not 1 as in a silent restart.
    assert t["first_step"] == 9

    # And it ends where an uninterrupted run with the same seed ends: the same loss at every logged step and
    # the same weights.
    _, whole = run(config, artifacts.parent / "uninterrupted", until="train")
    w = whole["train"]["counts"]
    assert w["resumed_from"] is None and w["first_step"] == 1
    reference = json.loads((Path(whole["train"]["output"]) / "log_history.json").read_text())

    def losses(h):
        return [(x["step"], x["loss"]) for x in h if "loss" in x]

    assert [s for s, _ in losses(history)] == [s for s, _ in losses(reference)] == list(range(2, 17, 2))
    for (_, resumed_loss), (_, reference_loss) in zip(losses(history), losses(reference)):
        assert resumed_loss == pytest.approx(reference_loss, rel=1e-4)
    from safetensors.torch import load_file

    resumed = load_file(Path(stages["train"]["output"]) / "model" / "model.safetensors")
    uninterrupted = load_file(Path(whole["train"]["output"]) / "model" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=1e-5, atol=1e-6)


def test_early_stopping_keeps_the_best_model(config, artifacts):
    from tasks.core.config.model import EvaluateConfig, ModelConfig
    from tasks.evaluate import evaluate_model, validation_rows

    # A learning rate this high makes validation loss rise after the first evaluations.
    train = {"learning_rate": 0.5, "max_steps": 60, "eval_steps": 2, "save_steps": 2, "warmup_ratio": 0.0,
             "early_stopping_patience": 2, "packing": False, "per_device_eval_batch_size": 64,
             "gradient_checkpointing": True}
    _, stages = run(config, artifacts, until="train", train=train, evaluate={"max_eval_rows": None})
    t = stages["train"]["counts"]
    assert t["stopped_early"] and t["global_step"] < 60
    metrics = json.loads((Path(stages["train"]["output"]) / "metrics.json").read_text())
    assert t["best_eval_loss"] == min(metrics["eval_losses"])
    assert metrics["gradient_checkpointing"] is False  # asked for, turned off on CPU as its description says
    # The saved model is the best checkpoint, not the last: its validation loss is the best one.
    from tasks.chunk import Chunks
    from tasks.core.manifest import read_manifest
    from tasks.core.root import open_root

    chunks = Chunks.model_validate(read_manifest(Path(stages["chunk"]["output"])).model_dump())
    rows = validation_rows(chunks, open_root(artifacts), None)
    kept = evaluate_model(str(Path(stages["train"]["output"]) / "model"), ModelConfig(id="x"),
                          EvaluateConfig(batch_size=64), rows, None)
    assert kept["validation"]["loss"] == pytest.approx(t["best_eval_loss"], rel=1e-3)
    assert kept["validation"]["loss"] < metrics["eval_losses"][-1]


def test_push_uploads_model_tokenizer_and_card_to_a_local_hub_without_leaking_the_token(
        config, artifacts, monkeypatch, capfd):
    import uuid

    from fake_hub import FakeHub, online

    token = "hf_test_" + uuid.uuid4().hex  # made here: no credential-like string is committed
    with FakeHub(user="me") as hub:  # the token is me's: it may write to me/…
        online(monkeypatch, hub.url)
        monkeypatch.setenv("HF_TOKEN", token)
        states, stages = run(config, artifacts, push={"repo_id": "me/tiny-cpt", "revision": "cpt-run"})
    assert states["push"] == "Completed"
    assert stages["push"]["counts"]["hub_url"].endswith("/me/tiny-cpt/tree/cpt-run")
    assert hub.repos["me/tiny-cpt"]["private"] is True and "cpt-run" in hub.repos["me/tiny-cpt"]["branches"]
    uploaded = hub.files("me/tiny-cpt", "cpt-run")
    local = artifacts / "models" / "tiny-test"
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= set(uploaded)
    assert uploaded["model.safetensors"] == (local / "model.safetensors").read_bytes()
    assert uploaded["README.md"] == (local / "README.md").read_bytes()
    assert all(h.get("authorization") == f"Bearer {token}" for m, p, h in hub.requests if m == "POST")

    # The token is in no file, no terminal output and no Prefect log of the run.
    leaks = [p for p in artifacts.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    assert not leaks
    captured = capfd.readouterr()
    assert token not in captured.out and token not in captured.err
    summary_name = next((artifacts / "runs").iterdir()).name
    assert not [m for m in flow_run_logs(summary_name) if token in m]


def test_failed_upload_is_retried_then_fails_clearly_and_keeps_the_local_save(config, artifacts, monkeypatch):
    from fake_hub import FakeHub, online
    from tasks.push import PushFailed

    monkeypatch.setenv("CPT_PUSH_BACKOFF_SECONDS", "0")
    with FakeHub(fail_commits=100, user="me") as hub:
        online(monkeypatch, hub.url, disable_xet=True)  # one HTTP commit per attempt: our retries are counted
        monkeypatch.setenv("HF_TOKEN", "hf_test_token_for_a_failing_hub")
        with pytest.raises(PushFailed, match="me/tiny-cpt failed after 3 attempts .*HTTP 500.*saved locally"):
            run(config, artifacts, push={"repo_id": "me/tiny-cpt", "retries": 2})
    assert hub.commit_attempts == 3 and not hub.commits
    assert (artifacts / "models" / "tiny-test" / "model.safetensors").exists()
    assert not list((artifacts / "cache" / "push").glob("push-*"))  # a failed push is not cached

    monkeypatch.delenv("HF_TOKEN")
    from tasks.line.preflight import RunConflict

    # No token at all: refused before any stage runs (tasks/line/preflight.py), not after training.
    with pytest.raises(RunConflict, match="no token to upload with: export HF_TOKEN"):
        run(config, artifacts, push={"repo_id": "me/tiny-cpt"})


def test_general_corpus_perplexity_shows_forgetting(config, artifacts, tmp_path):
    general = write_jsonl(tmp_path / "general" / "news.jsonl",
                          [{"content": "The committee met on Tuesday to review the budget for next year."},
                           {"content": "Rain is expected in the north, with clearer skies in the south."}])
    states, stages = run(config, artifacts, until="evaluate", evaluate={"general_corpus": [str(general)]})
    e = stages["evaluate"]["counts"]
    assert e["general_perplexity_before"] > 0 and e["general_perplexity_after"] > 0
    doc = json.loads((Path(stages["evaluate"]["output"]) / "eval.json").read_text())
    assert set(doc["perplexity"]["general"]) >= {"before", "after", "relative_change"}
    assert "perplexity (general)" in (Path(stages["evaluate"]["output"]) / "eval.md").read_text()


def test_output_neutral_settings_and_moved_inputs_keep_every_stage_cached(config, artifacts, tmp_path, tiny_model):
    import shutil

    states, _ = run(config, artifacts)
    assert set(states.values()) == {"Completed"}
    # Settings that bound memory or fetch batches differently: the same outputs, so nothing reruns.
    for section, values in [("tokenize", {"batch_size": 7}), ("tokenize", {"batch_bytes": 4096}),
                            ("evaluate", {"batch_size": 3}), ("train", {"dataloader_num_workers": 1})]:
        states, _ = run(config, artifacts, **{section: values})
        assert set(states.values()) == {"Cached"}, (section, values, states)
    # The same model and corpus at other paths: keyed by content, so nothing retrains; load re-assembles its
    # provenance column (source = path:line) from cached pieces, nothing else reruns.
    moved_model = shutil.copytree(tiny_model, tmp_path / "elsewhere" / "model")
    states, _ = run(config, artifacts, model={"id": str(moved_model)})
    assert set(states.values()) == {"Cached"}, states
    moved_corpus = tmp_path / "moved" / "corpus.jsonl"
    moved_corpus.parent.mkdir()
    shutil.copyfile(config["corpus"]["paths"][0], moved_corpus)
    states, stages = run(config, artifacts, corpus={"paths": [str(moved_corpus)]}, model={"id": str(moved_model)})
    assert states == {**dict.fromkeys(ALL_STAGES, "Cached"), "load": "Completed"}, states
    assert stages["load"]["counts"]["files_read"] == 0

    # A fully cached run in a fresh process imports no torch, transformers, datasets or trl.
    import subprocess
    import sys

    import yaml

    cfg = {**config, "corpus": {"paths": [str(moved_corpus)]}, "model": {"id": str(moved_model)}}
    (tmp_path / "cached.yaml").write_text(yaml.safe_dump(cfg))
    probe = ("import sys; from flows.cli import main; rc = main(sys.argv[1:]); "
             "print('HEAVY', [m for m in ('torch', 'transformers', 'datasets', 'trl', 'accelerate') "
             "if m in sys.modules]); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", probe, "run", "-c", str(tmp_path / "cached.yaml"), "--artifacts",
                          str(artifacts)], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert out.returncode == 0 and "HEAVY []" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    # What to open, named by the stages that produced it, also when everything is Cached.
    eval_md = next(line for line in out.stdout.splitlines() if line.startswith("eval table: ")).split(": ", 1)[1]
    assert Path(eval_md).is_file() and "tensorboard --logdir" in out.stdout
    assert out.stdout.count("Cached") == len(ALL_STAGES), out.stdout
