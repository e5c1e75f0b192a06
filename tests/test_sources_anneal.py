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
