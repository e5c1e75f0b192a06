"""train.method lora (and qlora's config): the adapter trains, nothing else changes but the adapter and (with
train_embeddings) embed_tokens/lm_head, the merged model is base + the adapter's delta, a killed LoRA run resumes
exactly, and the keys and the release follow the method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import sample_texts


def _chunks(tiny_model, out: Path, n: int = 80) -> Path:
    """Training and validation chunk sets of the sample corpus (the chunk stage's functions)."""
    import numpy as np
    import pyarrow as pa

    from tasks.chunk import SHARD, chunk_rows, write_dataset_dict
    from tasks.core.config.data import ChunkConfig
    from tasks.data.windows import window_plan
    from tasks.tokenize import encode_batch, load_tokenizer, special_tokens

    tok = load_tokenizer(tiny_model)
    sp = special_tokens(tok)
    texts = sample_texts(n)
    tokens = pa.table({"doc_id": [str(i) for i in range(len(texts))], "input_ids": encode_batch(tok, texts, sp["eos_id"])})
    for split, rows in (("train", np.arange(8, len(texts))), ("validation", np.arange(8))):
        (out / split).mkdir(parents=True)
        chunk_rows(tokens, rows, window_plan(ChunkConfig(max_seq_length=48, overlap=8), sp["bos_id"] is not None), sp["bos_id"],
                   out / split / SHARD)
    write_dataset_dict(out, {"train": [SHARD], "validation": [SHARD]}, "lora-test")
    return out


def _train(tiny_model, chunks, out: Path, **train) -> dict:
    from tasks.core.config.model import ModelConfig, TrainConfig
    from tasks.train import train_model

    settings = dict(max_steps=12, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=3e-3,
                    warmup_ratio=0.0, logging_steps=1, eval_steps=4, save_steps=4, early_stopping_patience=None,
                    optim="adamw_torch", seed=11, method="lora",
                    lora={"r": 8, "alpha": 16, "dropout": 0.0, "train_embeddings": True,
                          "embedding_learning_rate": 1e-3})
    settings.update(train)
    cfg = TrainConfig(**settings)
    out.mkdir(parents=True, exist_ok=True)
    spec = {"model_location": str(tiny_model), "model": ModelConfig(id=str(tiny_model)).model_dump(),
            "train": cfg.model_dump(), "max_seq_length": 48, "chunks_dir": str(chunks), "output_dir": str(out),
            "checkpoint_dir": str(out / "checkpoints"), "tensorboard_dir": str(out / "tensorboard")}
    return train_model(spec, 1)


def _history(out: Path) -> list[dict]:
    return json.loads((out / "log_history.json").read_text())


@pytest.mark.slow  # training children
def test_lora_trains_only_the_adapter_and_embeddings_and_merges_to_base_plus_delta(tiny_model, tmp_path):
    import torch
    from safetensors.torch import load_file

    chunks = _chunks(tiny_model, tmp_path / "chunks")
    out = tmp_path / "lora"
    m = _train(tiny_model, chunks, out)
    evals = [h["eval_loss"] for h in _history(out) if "eval_loss" in h]
    assert len(evals) == 3 and evals[-1] < evals[0]  # validation loss falls
    # The optimizer's groups: the adapter at learning_rate, the embeddings at their own rate.
    assert {(g["group"], g["lr"]) for g in m["optimizer_groups"]} >= {("adapter", 3e-3), ("embeddings", 1e-3)}

    base = load_file(tiny_model / "model.safetensors")
    merged = load_file(out / "model" / "model.safetensors")
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    targets = set(cfg["target_modules"])
    assert set(merged) == set(base)
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    for name, weight in base.items():
        module = name.rsplit(".", 2)[-2]
        if module in targets:  # W + B A alpha/r, B and A as the adapter file holds them
            prefix = "base_model.model." + name.removesuffix(".weight")
            delta = adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"] * scale
            torch.testing.assert_close(merged[name], weight + delta, rtol=1e-5, atol=1e-6)
            assert name in changed
        elif module == "embed_tokens":  # trained in full: the adapter's copy (tied: lm_head is the same matrix)
            trained = next(v for k, v in adapter.items() if k.endswith("embed_tokens.weight"))
            torch.testing.assert_close(merged[name], trained)
            assert name in changed
        else:  # norms: frozen, bit for bit
            assert name not in changed, name
    assert m["trainable_parameters"] < m["parameters"] and m["trainable_embedding_parameters"] > 0


@pytest.mark.slow  # training children
def test_lora_without_embeddings_leaves_them_as_they_were(tiny_model, tmp_path):
    import torch
    from safetensors.torch import load_file

    chunks = _chunks(tiny_model, tmp_path / "chunks")
    out = tmp_path / "lora"
    m = _train(tiny_model, chunks, out, max_steps=4, lora={"r": 4, "alpha": 8, "train_embeddings": False})
    base = load_file(tiny_model / "model.safetensors")
    merged = load_file(out / "model" / "model.safetensors")
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert m["trainable_embedding_parameters"] == 0
    assert {g["group"] for g in m["optimizer_groups"]} == {"all"}


@pytest.mark.slow  # training children
def test_killed_lora_run_resumes_exactly(tiny_model, tmp_path, monkeypatch):
    """Killed right after its checkpoint at step 8, a LoRA run resumed from it ends where an uninterrupted one
    ends: the same loss at every step and the same merged weights."""
    import torch
    from safetensors.torch import load_file

    from tasks.train import TrainingFailed

    chunks = _chunks(tiny_model, tmp_path / "chunks")
    out = tmp_path / "killed"
    monkeypatch.setenv("CPT_TEST_KILL_AFTER_SAVE_STEP", "8")
    with pytest.raises(TrainingFailed, match="killed by signal 9|exit status"):
        _train(tiny_model, chunks, out)
    assert (out / "checkpoints" / "checkpoint-8" / "adapter_model.safetensors").is_file()
    monkeypatch.delenv("CPT_TEST_KILL_AFTER_SAVE_STEP")
    resumed = _train(tiny_model, chunks, out)
    assert resumed["resumed_from"] == "checkpoint-8" and resumed["first_step"] == 9
    whole = _train(tiny_model, chunks, tmp_path / "whole")
    assert whole["resumed_from"] is None

    def losses(d):
        return [(h["step"], h["loss"]) for h in _history(d) if "loss" in h]

    assert [s for s, _ in losses(out)] == [s for s, _ in losses(tmp_path / "whole")] == list(range(1, 13))
    assert [v for _, v in losses(out)] == pytest.approx([v for _, v in losses(tmp_path / "whole")], rel=1e-5)
    a, b = load_file(out / "model" / "model.safetensors"), load_file(tmp_path / "whole" / "model" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- fast


def test_embedding_group_gets_its_own_learning_rate(tiny_model):
    from tasks.core.config.model import ModelConfig, TrainConfig
    from tasks.ml import adapters
    from tasks.ml.modeling import load_pretrained

    train = TrainConfig(method="lora", learning_rate=2e-4, lora={"train_embeddings": True})
    model = adapters.wrap(load_pretrained(str(tiny_model), ModelConfig(id=str(tiny_model)), "cpu"), train, False)
    groups = adapters.parameter_groups(model, train, 0.01)
    by_name = {id(p): n for n, p in model.named_parameters()}
    embeddings = [g for g in groups if g["cpt_group"] == "embeddings"]
    assert embeddings and all(g["lr"] == 2e-5 for g in embeddings)  # learning_rate / 10 by default
    assert all("embed_tokens" in by_name[id(p)] for g in embeddings for p in g["params"])
    adapter = [by_name[id(p)] for g in groups if g["cpt_group"] == "adapter" for p in g["params"]]
    assert adapter and all("lora_" in n for n in adapter)
    # Everything trainable is in exactly one group; nothing frozen is.
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(trainable)


def test_method_and_adapter_settings_are_in_the_train_key_and_trackers_are_not():
    from tasks.core.config.model import TrainConfig
    from tasks.core.keys import stage_key

    def key(**kw):
        return stage_key("train", {"train": TrainConfig(**kw)})

    full = key()
    assert key(method="lora") != full
    assert key(method="lora", lora={"r": 8}) != key(method="lora")
    assert key(method="lora", lora={"train_embeddings": True}) != key(method="lora")
    assert key(sharding="fsdp", num_processes=2) != key(num_processes=2)
    assert key(lora={"r": 8}) == full  # a full training does not read the adapter's settings
    assert key(report_to=["mlflow", "wandb"]) == full  # where a run is reported changes no output
    assert key(gpu_memory_gb=80, model_params_b=8) == full


def test_config_refuses_embeddings_as_lora_targets_and_an_adapter_release_of_a_full_training():
    from tasks.core.config.base import ConfigError
    from tasks.core.config.tree import validate_config

    base = {"corpus": {"paths": ["x.jsonl"]}, "model": {"id": "m"}}
    with pytest.raises(ConfigError, match="embeddings are not LoRA targets.*train_embeddings"):
        validate_config({**base, "train": {"method": "lora", "lora": {"target_modules": ["q_proj", "lm_head"]}}})
    with pytest.raises(ConfigError, match="adapter_only: train.method is full"):
        validate_config({**base, "push": {"adapter_only": True}})
    with pytest.raises(ConfigError, match="num_processes >= 2"):
        validate_config({**base, "train": {"sharding": "fsdp"}})
    with pytest.raises(ConfigError, match="tracker is listed twice"):
        validate_config({**base, "train": {"report_to": ["mlflow", "mlflow"]}})
    validate_config({**base, "train": {"method": "qlora"}, "push": {"adapter_only": True}})  # valid everywhere


def test_adapter_release_names_the_base_and_the_card_says_which(tmp_path):
    """push.adapter_only: the release is the adapter and the tokenizer, its config naming the base by the id users
    load; the card says the folder holds the adapter, measured merged. Without it: the merged model."""
    from tasks.push import model_card, release_source

    adapter, model = tmp_path / "adapter", tmp_path / "model"
    adapter.mkdir()
    model.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/tmp/x/base", "r": 8}))
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    (adapter / "README.md").write_text("peft's placeholder")
    (model / "model.safetensors").write_bytes(b"merged")
    (model / "tokenizer.json").write_text("{}")

    class Trained:
        def verified_adapter_dir(self, root):
            return adapter

        def verified_model_dir(self, root):
            return model

        def model_dir(self, root):
            return model

    staged = release_source(Trained(), None, True, "meta-llama/Llama-3.1-8B", tmp_path / "stage")
    assert sorted(p.name for p in staged.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                        "tokenizer.json"]
    assert json.loads((staged / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "meta-llama/Llama-3.1-8B"
    assert release_source(Trained(), None, False, "x", tmp_path / "stage2") == model
    data = {"fingerprint": "f", "counts": {}}
    lora = {"train": {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj"],
                                                 "train_embeddings": True}}}
    card = model_card("b", data, {**lora, "push": {"adapter_only": True}}, "")
    assert "library_name: peft" in card and "the LoRA adapter only" in card and "measured the merged model" in card
    card = model_card("b", data, {**lora, "push": {"adapter_only": False}}, "")
    assert "library_name: transformers" in card and "the merged model: the base model with the trained LoRA" in card
    assert "the model: every weight trained" in model_card("b", data, {"train": {"method": "full"}}, "")
