"""The memory estimate per GPU (tasks/ml/memory.py), the one function `cpt validate`'s warning and the shipped
recipes' comments use, and validate's machine checks (qlora needs CUDA)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import ROOT


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_parameter_count_from_the_config_is_the_models_own(arch):
    """Shape.params, read from config.json values, equals the parameters of the model transformers builds from
    the same config (tied and untied heads, Gemma 3's four norms and q/k norms, Qwen 2's q/k/v biases)."""
    import transformers

    from tasks.ml.memory import Shape

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)
    cls, cfg = {"llama": ("LlamaForCausalLM", transformers.LlamaConfig(**common, tie_word_embeddings=False)),
                "gemma3": ("Gemma3ForCausalLM", transformers.Gemma3TextConfig(**common, tie_word_embeddings=True)),
                "qwen2": ("Qwen2ForCausalLM", transformers.Qwen2Config(**common, tie_word_embeddings=False))}[arch]
    model = getattr(transformers, cls)(cfg)
    assert Shape.from_config(cfg.to_dict()).params == _count(model)


def test_known_config_gives_llama_3_1_8b_its_published_parameter_count():
    from tasks.ml.memory import KNOWN_CONFIGS, Shape

    shape = Shape.from_config(KNOWN_CONFIGS["meta-llama/Llama-3.1-8B"])
    assert shape.params == 8_030_261_248  # the model card's count (safetensors metadata)
    assert shape.lora_params(64, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]) \
        == 32 * 64 * (8192 + 5120 + 5120 + 8192 + 3 * 18432)


def test_the_adapter_the_estimate_counts_is_the_one_peft_trains(tiny_model):
    """The estimate's trainable parameters for lora with train_embeddings equal what the training child's
    `adapters.wrap` leaves trainable on the tiny model (tied embeddings: one trained copy)."""
    import json

    from tasks.core.config.model import ModelConfig, TrainConfig
    from tasks.ml import adapters
    from tasks.ml.memory import Shape, estimate
    from tasks.ml.modeling import load_pretrained

    train = TrainConfig(method="lora", lora={"r": 4, "train_embeddings": True})
    model = adapters.wrap(load_pretrained(str(tiny_model), ModelConfig(id=str(tiny_model)), "cpu"), train, False)
    shape = Shape.from_config(json.loads((tiny_model / "config.json").read_text()))
    est = estimate(train, ModelConfig(id=str(tiny_model), dtype="float32"), 48)
    assert est.trainable == adapters.trainable_counts(model)["trainable_parameters"]
    assert est.parameters == shape.params


def test_estimate_terms_follow_the_formula():
    """Full DDP: weights, gradients and AdamW in bf16 (2 + 2 + 4 bytes a parameter); fsdp over 8 divides the
    float32 master weights, gradients and states by 8; the 8-bit optimizer keeps 2 bytes a parameter; activations
    scale with the micro-batch's tokens; checkpointing keeps one input per layer."""
    from tasks.core.config.model import ModelConfig, TrainConfig
    from tasks.ml.memory import GIB, KNOWN_CONFIGS, Shape, estimate

    model = ModelConfig(id="meta-llama/Llama-3.1-8B", dtype="bfloat16")
    p = Shape.from_config(KNOWN_CONFIGS[model.id]).params
    ddp = estimate(TrainConfig(optim="adamw_torch", num_processes=8), model, 4096).terms
    assert (ddp["weights"], ddp["gradients"], ddp["optimizer"]) == (2 * p, 2 * p, 4 * p)
    fsdp = estimate(TrainConfig(optim="adamw_torch", num_processes=8, sharding="fsdp"), model, 4096).terms
    assert fsdp["gradients"] == 4 * p / 8 and fsdp["optimizer"] == 8 * p / 8
    assert 4 * p / 8 < fsdp["weights"] < 4 * p / 8 + 1 * GIB  # + two gathered layers
    eight = estimate(TrainConfig(optim="paged_adamw_8bit"), model, 4096).terms
    assert eight["optimizer"] == 2 * p
    one = estimate(TrainConfig(per_device_train_batch_size=1), model, 4096).terms
    four = estimate(TrainConfig(per_device_train_batch_size=4), model, 4096).terms
    assert four["activations"] == 4 * one["activations"] and four["logits"] == 4 * one["logits"]
    ckpt = estimate(TrainConfig(per_device_train_batch_size=1, gradient_checkpointing=True), model, 4096).terms
    h, kv, i = 4096, 1024, 14336
    assert ckpt["activations"] == 4096 * (32 * h + 9 * h + 3 * kv + 4 * i) * 2
    assert one["activations"] == 4096 * 32 * (9 * h + 3 * kv + 4 * i) * 2


def test_shipped_recipes_fit_and_their_comments_quote_the_estimate():
    """The two Llama 3.1 8B recipes: the estimate per GPU fits the 80 GB they name (no warning), and the total
    each comment quotes is the function's."""
    from tasks.core.config.tree import load_config
    from tasks.ml.memory import estimate, memory_warning

    for name in ("llama3.1-8b-qlora-1gpu.yaml", "llama3.1-8b-fsdp-8gpu.yaml"):
        path = ROOT / "configs" / name
        cfg = load_config(path)
        est = estimate(cfg.train, cfg.model, cfg.chunk.max_seq_length)
        assert memory_warning(cfg) is None
        assert f"total        {est.total / 2**30:.1f} GiB" in path.read_text()
        for term, gib in est.gib().items():
            if term != "total":
                assert f"{term:<12}{gib:>5.1f} GiB" in path.read_text().replace("#   ", ""), (name, term, gib)


@pytest.mark.slow  # runs `cpt validate` in a child process
def test_validate_warns_over_the_gpu_memory_given_and_refuses_qlora_without_cuda():
    """`cpt validate` (a process, as typed): a budget under the estimate is a warning naming both; qlora on
    this machine (no CUDA) is an error naming why; neither imports torch."""
    probe = ("import sys; from flows.cli import main; rc = main(sys.argv[1:]); "
             "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH'); sys.exit(rc)")
    fsdp = ["validate", "--config", "configs/llama3.1-8b-fsdp-8gpu.yaml", "--set", "train.gpu_memory_gb=30"]
    done = subprocess.run([sys.executable, "-c", probe, *fsdp], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "warning: train.gpu_memory_gb: the estimate is 40.4 GiB per GPU, over the 30" in done.stderr
    assert "NO-TORCH" in done.stdout
    qlora = ["validate", "--config", "configs/llama3.1-8b-qlora-1gpu.yaml"]
    done = subprocess.run([sys.executable, "-c", probe, *qlora], cwd=ROOT, capture_output=True, text=True,
                          env={**__import__("os").environ, "CPT_FAKE_CUDA_DEVICES": ""})
    assert done.returncode == 2
    assert "qlora" in done.stderr and "needs a CUDA GPU" in done.stderr and "libcuda" in done.stderr
    assert "NO-TORCH" in done.stdout
    # Where the driver reports a GPU, the same config passes.
    done = subprocess.run([sys.executable, "-c", probe, *qlora], cwd=ROOT, capture_output=True, text=True,
                          env={**__import__("os").environ, "CPT_FAKE_CUDA_DEVICES": "1"})
    assert done.returncode == 0, done.stderr
