"""LoRA and QLoRA in the training child (train.method lora / qlora): the adapter on the frozen base, the
embeddings trained in full with their own learning rate, and the merged model written at the end.

peft and bitsandbytes are imported here, in the child only. The merged model is what every later stage sees:
evaluate, the gate and push read `model/` as for a full training (base + the adapter's update, in model.dtype);
`adapter/` holds the adapter alone (push.adapter_only releases it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.core.config.model import EMBEDDING_MODULES, ModelConfig, TrainConfig

ADAPTER_DIR = "adapter"


def quantization_config(model: ModelConfig, dtype):
    """QLoRA's 4-bit base: NF4 with double quantization, computing in the model's dtype (the QLoRA paper's
    settings, peft's and axolotl's defaults)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)


def embedding_modules(model) -> list[str]:
    """The names of embed_tokens and lm_head as peft's modules_to_save matches them (the last name part)."""
    found = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in EMBEDDING_MODULES if m not in found]
    if missing:
        raise ValueError(f"train.lora.train_embeddings: the model has no module named {missing} "
                         f"({type(model).__name__}); cpt trains embed_tokens and lm_head")
    return list(EMBEDDING_MODULES)


def wrap(model, train: TrainConfig, checkpointing: bool):
    """The base model with the adapter (peft's get_peft_model): only the adapter, and embed_tokens and lm_head
    with train_embeddings, are trainable. QLoRA's base goes through prepare_model_for_kbit_training first (norms
    and embeddings to float32, inputs that require grad for checkpointing)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lora = train.lora
    if train.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
        bias="none", task_type="CAUSAL_LM",
        modules_to_save=embedding_modules(model) if lora.train_embeddings else None,
        # Tied embed_tokens and lm_head stay one matrix, trained once (peft's ensure_weight_tying).
        ensure_weight_tying=bool(lora.train_embeddings and tied),
    )
    model = get_peft_model(model, config)  # adapters in float32 (peft's autocast_adapter_dtype)
    if lora.train_embeddings:
        import torch

        # The trainable copies in float32: a small embedding learning rate vanishes in bf16's 8-bit mantissa.
        for name, param in model.named_parameters():
            if param.requires_grad and ".modules_to_save." in name and param.dtype != torch.float32:
                param.data = param.data.float()
    return model


def is_embedding_parameter(name: str) -> bool:
    """A trainable copy peft keeps of embed_tokens or lm_head (modules_to_save)."""
    return ".modules_to_save." in name and any(f".{m}." in f".{name}" for m in EMBEDDING_MODULES)


def embedding_learning_rate(train: TrainConfig) -> float:
    return train.lora.embedding_learning_rate or train.learning_rate / 10


def parameter_groups(model, train: TrainConfig, weight_decay: float) -> list[dict[str, Any]]:
    """The optimizer's groups: the adapter at train.learning_rate, embed_tokens and lm_head at their own rate
    (Unsloth's embedding_learning_rate); norms and biases without weight decay, as the Trainer does. The
    scheduler scales every group by the same factor, so the ratio holds through warm-up and decay."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim >= 2 and "norm" not in name.lower()
        groups.setdefault((is_embedding_parameter(name), decay), []).append(param)
    out = []
    for (embedding, decay), params in sorted(groups.items()):
        out.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                    "lr": embedding_learning_rate(train) if embedding else train.learning_rate,
                    "cpt_group": "embeddings" if embedding else "adapter"})
    return out


def trainable_counts(model) -> dict[str, int]:
    total = trainable = embeddings = 0
    seen = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = param.numel()
        total += n
        if param.requires_grad:
            trainable += n
            if is_embedding_parameter(name):
                embeddings += n
    return {"parameters": total, "trainable_parameters": trainable, "trainable_embedding_parameters": embeddings}


def save_merged(peft_model, base_location: str, model_cfg: ModelConfig, dtype, out: Path, adapter_out: Path,
                trust_remote_code: bool = False) -> None:
    """Write the adapter to `adapter_out`, then the merged model to `out`: the base loaded again in `dtype` (not
    the 4-bit weights QLoRA trained on: a merge into NF4 would round the update away), the adapter applied and
    folded in (W + B A alpha / r; embed_tokens and lm_head replaced by their trained copies)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tasks.ml.modeling import choose_attention

    peft_model.save_pretrained(str(adapter_out))
    # The adapter's own config names the base by where it sat on this machine; push writes the base's id there.
    base = AutoModelForCausalLM.from_pretrained(
        base_location, dtype=dtype, trust_remote_code=trust_remote_code,
        attn_implementation=choose_attention(model_cfg.attn_implementation, _config(base_location)))
    merged = PeftModel.from_pretrained(base, str(adapter_out), torch_device="cpu").merge_and_unload()
    merged = merged.to(dtype)
    with torch.no_grad():
        merged.save_pretrained(str(out), safe_serialization=True)


def _config(location: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(location)


def adapter_summary(adapter_dir: Path) -> dict[str, Any]:
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    return {k: cfg.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save")}
