"""Training building blocks without Prefect: packing isolation, optimizer fallback, padding accounting."""

import pytest
import torch

from tasks.train_worker import choose_optimizer, padding_fraction


def test_packed_rows_do_not_attend_across_chunks(tiny_model):
    """With packing, position ids restart per chunk and the model must not attend across chunks: each packed
    chunk's logits equal the logits of that chunk alone."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    chunks = [[1, 40, 41, 42, 43, 44], [1, 50, 51, 52], [1, 60, 61, 62, 63]]
    examples = [{"input_ids": c, "labels": [-100] + c[1:]} for c in chunks]
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    assert packed["input_ids"].shape == (1, sum(map(len, chunks)))
    inputs = {k: v for k, v in packed.items() if k != "labels"}
    with torch.no_grad():
        # use_cache=False as in training (TRL sets it): transformers derives the per-chunk mask from
        # position ids only without a KV cache.
        together = model(**inputs, use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([c])).logits[0] for c in chunks]
        # The same tokens concatenated without restarting positions do see each other: the check can fail.
        leaky = model(input_ids=packed["input_ids"]).logits[0]
    start = 0
    for c, ref in zip(chunks, alone):
        torch.testing.assert_close(together[start : start + len(c)], ref, atol=1e-4, rtol=1e-4)
        start += len(c)
    assert not torch.allclose(leaky[len(chunks[0]):], together[len(chunks[0]):], atol=1e-3)
    # Labels keep the chunk's own masking and never predict across a boundary.
    assert packed["labels"][0, len(chunks[0])].item() == -100


def test_eight_bit_optimizer_falls_back_off_cuda():
    assert choose_optimizer("paged_adamw_8bit", "adamw_torch", "cpu")[0] == "adamw_torch"
    assert "CUDA" in choose_optimizer("paged_adamw_8bit", "adamw_torch", "cpu")[1]
    assert choose_optimizer("adamw_torch", "sgd", "cpu") == ("adamw_torch", None)


def test_padding_fraction_counts_positions_without_tokens():
    batches = [{"input_ids": torch.ones(2, 4), "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])},
               {"input_ids": torch.ones(1, 6)}]  # a padding-free batch
    got = padding_fraction(batches)
    assert got == {"padding_fraction": pytest.approx(2 / 14), "positions": 14, "tokens": 12}


def test_attention_choice():
    from types import SimpleNamespace

    from tasks.modeling import choose_attention

    assert choose_attention("auto", SimpleNamespace(model_type="gemma3_text", attn_logit_softcapping=None)) == "sdpa"
    assert choose_attention("auto", SimpleNamespace(model_type="gemma2", attn_logit_softcapping=50.0)) == "eager"
    assert choose_attention("eager", SimpleNamespace()) == "eager"


def test_launch_command_per_device_and_distributed_setup(tmp_path):
    from tasks.train import launch_command

    spec = tmp_path / "spec.json"
    cpu = launch_command(spec, 1, "cpu")
    assert "--cpu" in cpu and cpu[-3:] == ["-m", "tasks.train_worker", str(spec)]
    ddp = launch_command(spec, 4, "cuda")
    assert "--multi_gpu" in ddp and ddp[ddp.index("--num_processes") + 1] == "4"
    fsdp = launch_command(spec, 8, "cuda", "fsdp.yaml")
    assert fsdp[fsdp.index("--config_file") + 1] == "fsdp.yaml" and "--multi_gpu" not in fsdp


def test_resume_skips_and_removes_checkpoints_cut_short(tmp_path):
    from tasks.train_worker import last_complete_checkpoint

    assert last_complete_checkpoint(tmp_path / "none") is None
    for step, state in ((4, '{"global_step": 4}'), (6, '{"global_st'), (8, None)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
        if state is not None:
            (d / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


def test_gradient_checkpointing_is_kept_on_a_gpu_and_turned_off_on_cpu():
    from tasks.train_worker import activation_checkpointing

    assert activation_checkpointing(True, "cuda") == (True, None)
    assert activation_checkpointing(False, "cpu") == (False, None)
    on, why = activation_checkpointing(True, "cpu")
    assert on is False and "off on CPU" in why
