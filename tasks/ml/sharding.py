"""train.sharding: fsdp in the training child: FSDP2 through accelerate (transformers' Trainer builds the plugin
from the `fsdp`/`fsdp_config` training arguments), and the one safetensors model written at the end.

Checked in the pinned sources (accelerate 1.15, transformers 5.24): `fsdp_config` {"version": 2,
"auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "transformer_layer_cls_to_wrap": [...]} becomes accelerate's
FullyShardedDataParallelPlugin; `fsdp2_prepare_model` calls `fully_shard` on every module of those classes (each
decoder layer), on embed_tokens, on the tail (final norm + lm_head) and on the root, and upcasts trainable
parameters to float32 when mixed precision is on (master weights; MixedPrecisionPolicy computes in bf16/fp16).
With `state_dict_type: SHARDED_STATE_DICT` the Trainer's checkpoints hold `pytorch_model_fsdp_0/` and
`optimizer_0/` as torch.distributed.checkpoint folders, whose `.metadata` is a pickle: the worker verifies every
file of a checkpoint against the manifest it wrote before any of them is read (train_worker.verified_checkpoint).
"""

from __future__ import annotations

from pathlib import Path


def decoder_layer_class(model) -> str:
    """The class name of the model's decoder layers: each one is an FSDP unit (what torchtitan shards)."""
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not layers:
        raise ValueError(f"train.sharding: fsdp: {type(model).__name__} has no decoder layers to wrap")
    return type(layers[0]).__name__


def fsdp_arguments(model, checkpointing: bool) -> dict:
    """The SFTConfig arguments of a fully sharded FSDP2 training."""
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": [decoder_layer_class(model)],
            "reshard_after_forward": True,  # full shard: parameters freed after each unit's forward (ZeRO-3)
            "state_dict_type": "SHARDED_STATE_DICT",  # every rank writes its own shards; nothing gathered
            "activation_checkpointing": checkpointing,  # FSDP's own, per wrapped layer
            "cpu_ram_efficient_loading": False,
        },
    }


def allow_fsdp_on_cpu() -> None:
    """accelerate 1.15 turns FSDP on only for accelerator-backed process groups (state.py: `distributed_type in
    [MULTI_GPU, MULTI_NPU, ...]`; MULTI_CPU is not in the list) although torch's `fully_shard` runs over gloo.
    On CPU, after TrainingArguments made the process group, this marks the shared state as MULTI_GPU so the
    Accelerator the Trainer creates takes the FSDP branch; the device stays the CPU it was set to, and every
    collective goes through the gloo group already made. Only the CPU proof (tests) takes this path; a GPU
    training uses accelerate as it is."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState()
    if state.device.type != "cpu" or state.distributed_type != DistributedType.MULTI_CPU:
        return
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def save_consolidated(trainer, out: Path, dtype, is_main: bool) -> None:
    """Gather the sharded model into one state dict on rank 0 (a collective: every rank calls it) and write it
    as safetensors in `dtype` (the master weights are float32), so evaluate, the gate and push read the model as
    after any other training."""
    state = trainer.accelerator.get_state_dict(trainer.model)  # full on rank 0, on CPU; empty elsewhere
    if not is_main:
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    # Tied weights (lm_head = embed_tokens) come back under both names; the model saves the source alone, as
    # save_pretrained does for an unsharded model.
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k not in tied}
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.save_pretrained(str(out), state_dict=state, safe_serialization=True)
