"""What issue 32's review found no test running: train.anneal: average (the release is the element-wise mean of the
named stable models, the line continues from the stable one), anneal.sources (the decay branch's own mixture, exact
to the token, rerunning only the anneal branch) and the weighted validation loss (per-source eval losses combined
with the configured weights; early stopping and the best checkpoint read the combination)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_flow, sample_texts, write_jsonl


# ------------------------------------------------------------------------------------------ average_models

def _saved_model(folder: Path, seed: int, dtype, layers: int = 2, hidden: int = 32) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4)
    LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
    return folder


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
def test_average_models_is_the_element_wise_mean_in_each_tensors_own_dtype(tmp_path, dtype_name):
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.ml.schedule import average_models

    dtype = getattr(torch, dtype_name)
    a = _saved_model(tmp_path / "a", 1, dtype)
    b = _saved_model(tmp_path / "b", 2, dtype)
    got = average_models([a, b], tmp_path / "mean")
    ta, tb, mean = _tensors(a), _tensors(b), _tensors(tmp_path / "mean")
    assert set(mean) == set(ta) and got == {"averaged_models": 2, "tensors": len(ta)}
    for name, t in mean.items():
        assert t.dtype == dtype, name  # written back in its own dtype
        assert not torch.equal(ta[name], tb[name]) or name.endswith("norm.weight"), name  # two different models
        assert torch.equal(t, ((ta[name].float() + tb[name].float()) / 2).to(dtype)), name
    # the config came along: the mean loads as the model it is
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "mean", dtype=dtype)
    assert torch.equal(model.state_dict()["model.layers.0.mlp.up_proj.weight"], mean["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("other, says", [
    ({"layers": 1}, "not the same architecture"),   # other tensor names
    ({"hidden": 48}, "not the same architecture"),  # the same names, other shapes
])
def test_average_models_refuses_another_architecture_with_a_clear_error(tmp_path, other, says):
    import torch

    from tasks.ml.schedule import average_models

    a = _saved_model(tmp_path / "a", 1, torch.float32)
    b = _saved_model(tmp_path / "b", 2, torch.float32, **other)
    with pytest.raises(ValueError, match=says) as e:
        average_models([a, b], tmp_path / "mean")
    assert str(tmp_path / "b") in str(e.value)  # names the model that differs


def test_average_models_refuses_a_model_without_the_first_ones_weight_files(tmp_path):
    import torch

    from tasks.ml.schedule import average_models

    a = _saved_model(tmp_path / "a", 1, torch.float32)
    b = _saved_model(tmp_path / "b", 2, torch.float32)
    (b / "model.safetensors").rename(b / "other.safetensors")
    with pytest.raises(ValueError, match="not the same architecture"):
        average_models([a, b], tmp_path / "mean")


# ------------------------------------------------------------------------------------------ weighted_loss

def test_weighted_loss_normalises_over_the_sources_evaluated():
    from tasks.ml.schedule import weighted_loss

    metrics = {"eval_domain_loss": 2.0, "eval_code_loss": 4.0, "eval_general_ko_loss": 3.0, "eval_runtime": 9.0}
    assert weighted_loss(metrics, {"domain": 0.6, "general_ko": 0.3, "code": 0.1}) == pytest.approx(
        0.6 * 2.0 + 0.3 * 3.0 + 0.1 * 4.0)
    # weights not summing to 1 are normalised: 3:1
    assert weighted_loss(metrics, {"domain": 3.0, "code": 1.0}) == pytest.approx((3 * 2.0 + 4.0) / 4)
    # a source missing from the metrics is left out, the others normalised among themselves
    assert weighted_loss(metrics, {"domain": 0.5, "missing": 0.4, "code": 0.1}) == pytest.approx(
        (0.5 * 2.0 + 0.1 * 4.0) / 0.6)
    # a zero weight counts for nothing
    assert weighted_loss(metrics, {"domain": 0.0, "code": 1.0}) == pytest.approx(4.0)
    # another prefix (the trainer's metric_key_prefix)
    assert weighted_loss({"test_domain_loss": 5.0}, {"domain": 1.0}, prefix="test") == pytest.approx(5.0)


@pytest.mark.parametrize("weights", [{"missing": 1.0}, {}, {"domain": 0.0}])
def test_weighted_loss_without_a_weighted_source_evaluated_is_an_error(weights):
    from tasks.ml.schedule import weighted_loss

    with pytest.raises(ValueError, match="no weighted source"):
        weighted_loss({"eval_domain_loss": 2.0}, weights)


# ------------------------------------------------------------------------------------------ through the flow

def _two_sources(tmp_path: Path, tiny_model: Path, **train) -> dict:
    from test_sources_flow import three_sources

    config = three_sources(tmp_path, tiny_model)
    config["sources"] = config["sources"][:2]
    config["sources"][0]["weight"], config["sources"][1]["weight"] = 0.8, 0.2
    config.update({
        "train": {"max_steps": 5, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                  "learning_rate": 3e-3, "warmup_ratio": 0.2, "logging_steps": 1, "eval_steps": 5, "save_steps": 5,
                  "early_stopping_patience": None, "init": "last_promoted", "schedule": "stable_anneal", **train},
        "evaluate": {"max_eval_rows": 8},
        # Promotion is not what is tested here: every run must be released, whatever a tiny model did.
        "gate": {"max_validation_increase": 10.0},
        "push": {"name": "line"},
    })
    return config


def _stages(summary) -> dict:
    return {s["name"]: s for s in summary["stages"]}


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_anneal_average_releases_the_mean_of_the_last_k_stable_models_and_the_line_continues_from_the_stable_one(
        tmp_path, tiny_model, artifacts):
    import torch

    from tasks.core.root import open_root
    from tasks.line.promotions import read_promotions
    from tasks.ml.modeling import model_digest

    config = _two_sources(tmp_path, tiny_model, anneal="average", anneal_checkpoints=2)
    stables, releases = [], []
    for run, docs in enumerate((80, 90, 100)):  # new domain text each run: each trains anew
        write_jsonl(tmp_path / "domain" / "d.jsonl", [{"content": t} for t in sample_texts(docs)])
        states, summary = run_flow(config, artifacts, until=None)
        stages = _stages(summary)
        assert [states[n] for n in ("train", "anneal", "evaluate", "gate", "push")] == ["Completed"] * 5, states
        trained, annealed = stages["train"], stages["anneal"]
        assert trained["counts"]["global_step"] == 5  # average: the stable phase trains every step, no decay share
        stable_dir, release_dir = Path(trained["output"]) / "model", Path(annealed["output"]) / "model"
        stables.append((model_digest(stable_dir), stable_dir))
        releases.append(model_digest(release_dir))
        # the stable parent: the base model first, then the last run's stable model, never its (averaged) release
        if run == 0:
            assert trained["counts"]["warmed_up"] is True and trained["counts"]["parent"] == "base model"
        else:
            assert trained["counts"]["warmed_up"] is False
            assert trained["counts"]["parent"] == f"stable {stables[run - 1][0][:16]}"
            if run == 2:  # run 2's release was the mean of two stable models, not its stable one: not the parent
                assert releases[1] != stables[1][0] and not trained["counts"]["parent"].endswith(releases[1][:16])
        # the release is exactly the element-wise mean of the named stable models: this run's and the one before
        named = [d for d, _ in stables[::-1][:2]]
        assert annealed["counts"]["anneal"] == "average" and annealed["counts"]["averaged"] == named
        assert annealed["counts"]["averaged_models"] == len(named) == min(run + 1, 2)
        averaged = [_tensors(folder) for _, folder in stables[::-1][:2]]
        release = _tensors(release_dir)
        assert set(release) == set(averaged[0])
        for name, t in release.items():
            parts = [m[name] for m in averaged]
            assert t.dtype == parts[0].dtype
            assert torch.equal(t, (sum(p.float() for p in parts) / len(parts)).to(t.dtype)), name
        if run == 0:  # the line's first run has one stable model: its "average" is that model
            assert releases[0] == stables[0][0]
        else:  # two different stable models averaged: the release is neither
            assert releases[-1] not in {d for d, _ in stables}
        # what was released, and the lineage: the release, the stable model it came from, the parent
        record = read_promotions(open_root(artifacts), "name-line").last
        assert record.model_digest == releases[-1] == model_digest(artifacts / "models" / "line")
        assert record.stable["digest"] == stables[-1][0]
        assert record.parent["kind"] == ("base" if run == 0 else "stable")
        if run:
            assert record.parent["digest"] == stables[run - 1][0]
        card = (artifacts / "models" / "line" / "README.md").read_text(encoding="utf-8")
        row = next(line for line in card.splitlines() if line.startswith("| stable checkpoint"))
        assert f"the average of {len(named)} stable models" in row
        assert all(d[:32] in row for d in named), row  # the card names each stable model averaged
        if run == 2:
            assert stables[0][0][:32] not in row  # anneal_checkpoints: 2 leaves the first run's out
    # The last run again: its training finds its own parent, its average the same stable models: Cached.
    states, _ = run_flow(config, artifacts, until=None)
    assert states["train"] == "Cached" and states["anneal"] == "Cached", states


def _trained_tokens(output: str, artifacts: Path) -> list[int]:
    """Trained (labelled) tokens of each training row of a chunk or mix entry, counted from its rows: the positions
    from `trained_from` on."""
    from helpers import chunk_entry_rows

    return [len(r["input_ids"]) - r["trained_from"] for r in chunk_entry_rows(output, artifacts)["train"]]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_anneal_sources_give_the_decay_branch_its_own_mixture_exact_to_the_token_and_rerun_only_that_branch(
        tmp_path, tiny_model, artifacts):
    config = _two_sources(tmp_path, tiny_model, max_steps=5, anneal_ratio=0.4)
    config["anneal"] = {"sources": [{"name": "domain", "weight": 0.4}, {"name": "general_ko", "weight": 0.6}]}
    states, summary = run_flow(config, artifacts, until=None)
    stages = _stages(summary)
    assert [states[n] for n in ("mix", "anneal-mix", "train", "anneal", "push")] == ["Completed"] * 5, states

    # The anneal mixture's shares, exact to the token, counted from its rows: the domain (first, weight 0.4) read
    # once sets the total; general_ko gets 0.6 of it, its small pool repeated.
    pools = {"domain": sum(_trained_tokens(stages["chunk"]["output"], artifacts)),
             "general_ko": sum(_trained_tokens(stages["general_ko-chunk"]["output"], artifacts))}
    total = pools["domain"] / 0.4
    want = {"domain": pools["domain"], "general_ko": round(0.6 * total)}
    mixed = stages["anneal-mix"]
    table = {t["source"]: t for t in _mix_table(mixed)}
    rows = _trained_tokens(mixed["output"], artifacts)
    got = {"domain": sum(rows[: table["domain"]["rows"]]), "general_ko": sum(rows[table["domain"]["rows"]:])}
    assert got == want and len(rows) == table["domain"]["rows"] + table["general_ko"]["rows"]
    for name in want:
        assert mixed["counts"][f"{name}_trained_tokens"] == table[name]["trained_tokens"] == want[name]
        assert mixed["counts"][f"{name}_share"] == pytest.approx(want[name] / sum(want.values()))
    assert table["general_ko"]["passes"] > 1
    # ... which are not the stable phase's (0.8 / 0.2): the stable phase trained on the mix, the decay on its own
    stable_mix = stages["mix"]["counts"]
    assert stable_mix["general_ko_share"] == pytest.approx(0.2, abs=0.01)
    assert mixed["counts"]["general_ko_share"] == pytest.approx(0.6, abs=0.01)
    assert stages["train"]["counts"]["source_shares"] == {
        n: round(stable_mix[f"{n}_share"], 6) for n in ("domain", "general_ko")}
    assert stages["anneal"]["counts"]["source_shares"] == {
        n: round(mixed["counts"][f"{n}_share"], 6) for n in ("domain", "general_ko")}
    assert stages["anneal"]["counts"]["source_trained_tokens"] == want
    assert stages["anneal"]["counts"]["global_step"] == 2 and stages["train"]["counts"]["global_step"] == 3

    # Only anneal.sources changes: the anneal branch (its mix, the decay) and what follows rerun; the stable train
    # and every data stage are Cached.
    config["anneal"]["sources"] = [{"name": "domain", "weight": 0.5}, {"name": "general_ko", "weight": 0.5}]
    states, summary = run_flow(config, artifacts, until=None)
    rerun = {n for n, s in states.items() if s != "Cached"}
    after_anneal = {"anneal-mix", "anneal", "evaluate", "evaluate-reference", "gate", "push"}
    assert {"anneal-mix", "anneal"} <= rerun <= after_anneal, states
    assert states["train"] == "Cached" and states["mix"] == "Cached", states
    assert _stages(summary)["anneal-mix"]["counts"]["general_ko_share"] == pytest.approx(0.5, abs=0.01)


def _mix_table(stage: dict) -> list[dict]:
    from tasks.core.manifest import read_manifest

    return read_manifest(Path(stage["output"])).meta.sources


# ------------------------------------------------------------------------------------------ the weighted validation loss

@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_training_on_two_sources_stops_early_and_keeps_the_best_checkpoint_on_the_weighted_validation_loss(
        tmp_path, tiny_model, artifacts):
    from test_sources_flow import three_sources

    config = three_sources(tmp_path, tiny_model)
    config["sources"] = config["sources"][:2]
    config["sources"][0].update(weight=0.8, eval_weight=1.0)  # configured: 1:3, not the sampling shares 0.8:0.2
    config["sources"][1].update(weight=0.2, eval_weight=3.0)
    # A rate this high makes the validation loss turn up within a few steps: early stopping must act.
    config["train"] = {"max_steps": 12, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                       "learning_rate": 5e-2, "warmup_ratio": 0.0, "logging_steps": 1, "eval_steps": 1,
                       "save_steps": 1, "early_stopping_patience": 2}
    states, summary = run_flow(config, artifacts, until="train")
    assert states["train"] == "Completed", states
    trained = _stages(summary)["train"]
    history = json.loads((Path(trained["output"]) / "log_history.json").read_text())
    by_step: dict[int, dict] = {}
    for h in history:
        if any(k.startswith("eval_") and k.endswith("_loss") for k in h):
            by_step.setdefault(h["step"], {}).update(h)
    evals = sorted(by_step.items())
    assert evals, history
    for step, e in evals:  # each evaluation: a loss per source, and eval_loss their 1:3 weighted mean
        assert e["eval_loss"] == pytest.approx((1.0 * e["eval_domain_loss"] + 3.0 * e["eval_general_ko_loss"]) / 4,
                                               rel=1e-9), step
    weighted = [(step, e["eval_loss"]) for step, e in evals]
    assert weighted != [(s, (0.8 * e["eval_domain_loss"] + 0.2 * e["eval_general_ko_loss"])) for s, e in evals]
    # Early stopping as transformers' EarlyStoppingCallback counts (patience 2, no threshold), on eval_loss:
    best, waited, stop = None, 0, None
    for step, loss in weighted:
        if best is None or loss < best[1]:
            best, waited = (step, loss), 0
        else:
            waited += 1
        if waited >= 2:
            stop = step
            break
    c = trained["counts"]
    assert stop is not None and stop < 12, weighted  # the data made it stop: a real test of early stopping
    assert c["stopped_early"] is True and c["global_step"] == stop
    # the best checkpoint is the one of the lowest weighted loss, not of either source's own
    assert c["best_eval_loss"] == pytest.approx(best[1], rel=1e-9)
    assert c["source_eval_losses"] == {"domain": evals[-1][1]["eval_domain_loss"],
                                       "general_ko": evals[-1][1]["eval_general_ko_loss"]}
    metrics = json.loads((Path(trained["output"]) / "metrics.json").read_text())
    assert metrics["best_checkpoint"] == f"checkpoint-{best[0]}"
