"""Model loading shared by train, evaluate and push: identity (fingerprint), dtype/attention choice, perplexity
and seeded generation. torch and transformers are imported inside the functions."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tasks.core.config.base import ConfigError
from tasks.core.config.model import GenerationConfig, ModelConfig
from tasks.core.manifest import Fingerprint, combine_digests, hash_file

IGNORE_INDEX = -100
CARD = "README.md"  # a release's model card: not part of the model's identity


def model_files(directory: Path) -> list[Path]:
    """A model folder's files, less the card (a release adds one) and hidden files."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and p.relative_to(directory).as_posix() != CARD)


def model_digest(directory: str | Path, digest=hash_file) -> str:
    """A model's identity: the digest of its files (the same weights in a cache entry or a release folder)."""
    directory = Path(directory)
    return combine_digests([(p.relative_to(directory).as_posix(), digest(p)) for p in model_files(directory)])


def without_location(desc: dict[str, Any]) -> dict[str, Any]:
    """A model description as records and cards keep it: where it sits now is not part of what it is."""
    return {k: v for k, v in desc.items() if k != "location"}


def resolve_model(model: ModelConfig, digest=hash_file) -> Fingerprint:
    """Local dir: digest of every file. Hub id: the snapshot's commit (git content address), downloaded once."""
    local = Path(model.id).expanduser()
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not (local / "config.json").is_file():
            raise ConfigError(f"model.id: {local} has no config.json; is it a saved model?")
        parts = [(p.relative_to(local).as_posix(), digest(p)) for p in files]
        return Fingerprint(kind="model", digest=combine_digests(parts), location=str(local.resolve()))
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(model.id, revision=model.revision))
    except Exception as e:
        raise ConfigError(f"model.id: cannot fetch {model.id!r}: {e}") from None
    return Fingerprint(kind="model", digest=f"{model.id}@{path.name}", location=str(path))


def choose_dtype(setting: str, device_type: str):
    import torch

    if setting == "auto":
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, setting)


def choose_attention(setting: str, config) -> str:
    if setting != "auto":
        return setting
    # Attention-logit soft-capping (Gemma 2) exists only in the eager kernel; without it sdpa is exact and
    # faster (Gemma 3 dropped soft-capping, so it gets sdpa too).
    return "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"


def device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pretrained(location: str, model: ModelConfig, device: str, quantization_config=None):
    """The model at `location` with the dtype and attention kernel `model` asks for on `device`, not yet moved
    (with `quantization_config`, QLoRA's 4-bit base: quantized as it loads, onto this process's GPU)."""
    import os

    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(location, trust_remote_code=model.trust_remote_code)
    extra = {}
    if quantization_config is not None:
        extra = {"quantization_config": quantization_config,
                 "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}}
    return AutoModelForCausalLM.from_pretrained(
        location,
        dtype=choose_dtype(model.dtype, device),
        attn_implementation=choose_attention(model.attn_implementation, cfg),
        trust_remote_code=model.trust_remote_code,
        **extra,
    )


def load_model(location: str, model: ModelConfig, device: str | None = None):
    """`load_pretrained` on `device` (default: the GPU if any), in eval mode."""
    device = device or device_type()
    m = load_pretrained(location, model, device)
    m.to(device)
    m.eval()
    return m


def load_tokenizer_with_pad(location: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # the seed notebook's fallback, for batching in training and generation
    return tok


def perplexity(model, rows: list[dict[str, Any]], batch_size: int, pad_id: int) -> dict[str, float]:
    """Token-weighted perplexity over rows with `input_ids` and `labels` (-100 not scored), padding right."""
    import torch

    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            nll, tokens = batch_nll(model, rows[start : start + batch_size], pad_id)
            total_nll += nll
            total_tokens += tokens
    if total_tokens == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), "tokens": 0}
    loss = total_nll / total_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "tokens": total_tokens}


def batch_nll(model, batch: list[dict[str, Any]], pad_id: int) -> tuple[float, int]:
    """Summed next-token NLL of the labelled positions of `batch`, and how many there were."""
    import torch

    device = next(model.parameters()).device
    width = max(len(r["input_ids"]) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return float(nll), int((shift_labels != IGNORE_INDEX).sum())


def generate(model, tok, prompts: list[str], gen: GenerationConfig) -> list[str]:
    import torch
    from transformers import set_seed

    outputs = []
    device = next(model.parameters()).device
    for prompt in prompts:
        set_seed(gen.seed)
        enc = tok(prompt, return_tensors="pt").to(device)
        # remove_invalid_values: a diverged model's NaN/inf logits become a warning and odd text, not a crash
        # of the evaluation that the promotion gate needs to refuse it.
        kwargs = dict(max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample,
                      repetition_penalty=gen.repetition_penalty, pad_token_id=tok.pad_token_id,
                      remove_invalid_values=True)
        if gen.do_sample:
            kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
        with torch.no_grad():
            out = model.generate(**enc, **kwargs)
        outputs.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return outputs


def release(model) -> None:
    import gc

    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
