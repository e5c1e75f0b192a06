"""What one training attempt's schedule and validation are, in the training child.

A phase (TrainSpec.phase): `standard` (one training with train.lr_scheduler_type, warmed up and decayed afresh),
or a stable line's two (train.schedule: stable_anneal; warmup-stable-decay, Hägele et al. 2024): `stable` trains
at the constant peak rate — warmed up only on the line's first run — for the run's steps less its decay share,
and keeps its last state (no best checkpoint, no early stop: the line continues from where it is); `decay` starts
from a stable model and lets the rate fall linearly to 0 over its steps, keeping the best checkpoint, on another
data order (the stable phase saw the first rows of the seeded one).

Validation per source (the mix's `sources`): one eval set each, evaluated by transformers' Trainer as a dict
(`eval_<name>_loss`), combined into `eval_loss` with weights as NeMo AutoModel's domain_mixture does (a weighted
sum of the per-domain losses, the weights normalised): what early stopping and the best checkpoint read.

`average_models`: train.anneal: average's release, the element-wise mean of stable models.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from tasks.core.config.model import TrainConfig


def run_steps(train: TrainConfig, trainer) -> int:
    """The run's optimizer steps: max_steps, else num_train_epochs over the training rows (after packing)."""
    if train.max_steps > 0:
        return train.max_steps
    per_epoch = max(math.ceil(len(trainer.get_train_dataloader()) / train.gradient_accumulation_steps), 1)
    return math.ceil(per_epoch * train.num_train_epochs)


def decay_length(train: TrainConfig, total: int) -> int:
    """The decay branch's steps out of a run of `total`: anneal_ratio of them, at least 1, at most total - 1."""
    return min(max(1, round(train.anneal_ratio * total)), max(total - 1, 1))


def phase_arguments(phase: str, train: TrainConfig, warmup: bool) -> dict[str, Any]:
    """The training arguments a phase sets (over the standard ones, `standard_arguments`)."""
    if phase == "stable":
        return {"lr_scheduler_type": "constant_with_warmup" if warmup else "constant",
                "warmup_steps": train.warmup_ratio if warmup else 0, "load_best_model_at_end": False}
    if phase == "decay":
        return {"lr_scheduler_type": "linear", "warmup_steps": 0, "data_seed": train.seed + 1}
    return {}


def apply_phase(trainer, spec) -> dict[str, int]:
    """Set the attempt's step count for its phase once the trainer knows its data (packing changes the rows):
    stable: the run's steps less the decay share (all of them with anneal: average); decay: spec.decay_steps.
    Returns {run_steps, max_steps}."""
    train = spec.train
    total = run_steps(train, trainer)
    steps = total
    if spec.phase == "stable" and train.anneal == "decay":
        steps = total - decay_length(train, total)
    elif spec.phase == "decay":
        steps = spec.decay_steps
    if spec.phase != "standard":
        trainer.args.max_steps = steps
    return {"run_steps": total, "max_steps": steps}


def early_stopping(phase: str) -> bool:
    """Only a standard run stops early: a stable phase runs its steps, a decay branch its whole decay."""
    return phase == "standard"


def validation_sets(validation, sources: list[list]) -> Any:
    """The validation rows as the trainer evaluates them: one set, or a dict {source: its rows} when the mix says
    where each source's validation rows are (sources without any left out)."""
    if not sources:
        return validation
    sets = {name: validation.select(range(start, end)) for name, start, end in sources if end > start}
    return sets if len(sets) > 1 else next(iter(sets.values()), validation)


def weighted_loss(metrics: dict[str, float], weights: dict[str, float], prefix: str = "eval") -> float:
    """sum_i w_i * loss_i / sum_i w_i over the sources evaluated (NeMo AutoModel's weighted_validation_loss)."""
    found = {n: w for n, w in weights.items() if f"{prefix}_{n}_loss" in metrics}
    total = sum(found.values())
    if not found or total <= 0:
        raise ValueError(f"no weighted source among the evaluated ones ({sorted(metrics)}; weights {weights})")
    return sum(w * metrics[f"{prefix}_{n}_loss"] for n, w in found.items()) / total


def combining_evaluate(trainer_cls, weights: dict[str, float]):
    """`trainer_cls` whose evaluation of its own per-source dict adds `eval_loss`, the weighted loss, logs it and
    tells the callbacks (early stopping counts it once)."""

    class Combining(trainer_cls):
        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            if eval_dataset is None and isinstance(self.eval_dataset, dict):
                combined = {f"{metric_key_prefix}_loss": weighted_loss(metrics, weights, metric_key_prefix)}
                metrics.update(combined)
                self.log(combined)
                self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, combined)
            return metrics

    return Combining


def average_models(folders: list[Path], out: Path) -> dict[str, Any]:
    """The element-wise mean of models saved alike (the same safetensors files and tensor names: one architecture,
    saved by the same code) into `out`: every other file (config, tokenizer) is the first folder's. Each tensor is
    summed in float32 and written back in its own dtype, one file at a time (memory: about two copies of the
    largest file)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    first = folders[0]
    files = sorted(p.name for p in first.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{first}: no safetensors weights to average")
    for folder in folders[1:]:  # the same weight files (a model sharded otherwise is another save: refused here)
        theirs = sorted(p.name for p in folder.glob("*.safetensors"))
        if theirs != files:
            raise ValueError(f"{folder}: weight files {theirs}, not {first}'s {files}: not the same architecture "
                             "(or not saved alike); only models of one architecture are averaged")
    out.mkdir(parents=True, exist_ok=True)
    for f in first.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy2(f, out / f.name)
    tensors = 0
    for name in files:
        total: dict[str, torch.Tensor] = {}
        dtypes: dict[str, torch.dtype] = {}
        for folder in folders:
            with safe_open(str(folder / name), framework="pt") as src:
                keys = set(src.keys())
                if total and keys != set(total):
                    raise ValueError(f"{folder / name}: other tensors than {first / name}: not the same architecture")
                for key in keys:
                    t = src.get_tensor(key)
                    if key in total and t.shape != total[key].shape:  # the same names, other sizes: refused, named
                        raise ValueError(f"{folder / name}: {key} has shape {tuple(t.shape)}, not "
                                         f"{tuple(total[key].shape)} as in {first / name}: not the same architecture")
                    dtypes.setdefault(key, t.dtype)
                    total[key] = total[key] + t.float() if key in total else t.float()
        save_file({k: (v / len(folders)).to(dtypes[k]).contiguous() for k, v in total.items()}, str(out / name),
                  metadata={"format": "pt"})
        tensors += len(total)
    return {"averaged_models": len(folders), "tensors": tensors}
