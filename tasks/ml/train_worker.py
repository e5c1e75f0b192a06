"""The training child process: `accelerate launch -m tasks.ml.train_worker SPEC.json`.

It runs TRL's SFTTrainer on the training rows the train stage gathers from the chunks (int32 input_ids and labels,
`training_columns`), checkpoints into the stage's work dir, resumes from the last checkpoint of a killed attempt,
stops early on validation loss and keeps the best model. It talks to the parent through stdout lines that start
with `@@cpt ` followed by JSON (progress, the optimizer choice, final metrics); everything else is plain log.
Being a separate process is what frees every byte of GPU memory when training ends.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tasks.core.config.model import TrainConfig
from tasks.ml.checkpoints import checkpoint_seal, last_complete_checkpoint, verified_checkpoint
from tasks.ml.clock import StepClock, decay_steps, emit, make_callbacks, plot_loss_curve
from tasks.ml.modeling import load_pretrained, load_tokenizer_with_pad
from tasks.ml.spec import TrainSpec
from tasks.ml.static_batches import StaticPackedCollator, static_length, static_padding_fraction


def training_columns(data):
    """Training rows as the trainer reads them: int32 input_ids and labels. A set that has them (the train stage
    writes one from the chunks) is taken as it is; chunk rows (input_ids in the tokens' narrow type,
    trained_from: a benchmark's or a user's) get their labels derived (-100 before trained_from), one
    vectorised Arrow pass per batch of rows, written to this process's temp cache."""
    from tasks.data.arrow import with_labels

    if "labels" in data["train"].column_names:
        return data

    return data.with_format("arrow").map(
        with_labels, batched=True, batch_size=4096, remove_columns=data["train"].column_names,
        desc="Deriving labels").with_format(None)


def choose_optimizer(optim: str, fallback: str, device: str) -> tuple[str, str | None]:
    """(optimizer to use, reason for falling back or None). bitsandbytes' 8-bit/paged optimizers need CUDA."""
    needs_bnb = "8bit" in optim or optim.startswith("paged_")
    if not needs_bnb:
        return optim, None
    if device != "cuda":
        return fallback, f"{optim} needs a CUDA device for bitsandbytes; this run is on {device}"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # an install without CUDA kernels
        return fallback, f"{optim} needs bitsandbytes, which failed to import: {e}"
    return optim, None


def activation_checkpointing(requested: bool, device: str) -> tuple[bool, str | None]:
    """(recompute activations in backward?, why a request was turned off). It only trades time for GPU memory:
    on CPU, memory is not the limit and it would cost ~30% of the step time for nothing."""
    if requested and device == "cpu":
        return False, "gradient_checkpointing only saves GPU memory; off on CPU"
    return requested, None


def unwrapped(model):
    """The model under DDP's (or torch.compile's) wrapper."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def compile_layers(model, mode: str, backend: str = "inductor") -> int:
    """torch.compile each decoder layer in place (`Module.compile`); returns how many. Regional: the layers
    share one graph (Gemma 3's sliding and global layers differ only in their mask), so compiling takes
    seconds where the whole model takes minutes, and the parts outside stay eager: the per-batch mask built from
    the position ids, the forward hooks, and TRL's fused LM head, whose tile count follows the number of trained
    tokens (a new shape on every batch)."""
    kwargs = {"mode": mode} if backend == "inductor" else {}
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    for module in layers if layers is not None else [decoder]:
        module.compile(backend=backend, **kwargs)
    return len(layers) if layers is not None else 1


def packed_padding_fraction(packed, max_length: int) -> dict[str, float]:
    """With packing, the share of the packed rows' capacity (rows × max_length) that holds no token: what a
    padded batch would carry, and what a padding-free batch saves computing but still wastes of each row's
    room. Read from the packed dataset the trainer uses (Arrow list lengths, no Python loop)."""
    import pyarrow.compute as pc

    tokens = int(pc.sum(pc.list_value_length(packed.data.column("input_ids"))).as_py() or 0)
    positions = len(packed) * max_length
    return {"padding_fraction": 0.0 if positions == 0 else 1 - tokens / positions, "positions": positions,
            "tokens": tokens}


def padding_fraction(dataloader, limit_batches: int | None = None) -> dict[str, float]:
    """Without packing: the share of positions in the batches the model sees that are padding (labels -100 added
    by collation are not counted as padding; only positions with no token are)."""
    real = total = 0
    for i, batch in enumerate(dataloader):
        if limit_batches is not None and i >= limit_batches:
            break
        ids = batch["input_ids"]
        total += ids.numel()
        if "attention_mask" in batch:
            real += int(batch["attention_mask"].sum())
        else:  # padding-free: one flattened row; padding only from pad_to_multiple_of (position 0 runs)
            real += ids.numel()
    return {"padding_fraction": 0.0 if total == 0 else 1 - real / total, "positions": total, "tokens": real}


def trainer_class(base, train: TrainConfig, warn):
    """The trainer cpt runs: TRL's SFTTrainer plus two things. With lora.train_embeddings, the optimizer gets
    embed_tokens and lm_head in their own group at their own learning rate (`adapters.parameter_groups`). And the
    best checkpoint is verified against its seal before load_best_model_at_end reads it (a resume's checkpoint is
    verified before training starts)."""

    class CptTrainer(base):
        def create_optimizer(self, model=None):
            if train.method == "full" or not train.lora.train_embeddings or self.optimizer is not None:
                return super().create_optimizer(model)
            from tasks.ml.adapters import parameter_groups

            opt_model = self.model if model is None else model
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = cls(parameter_groups(opt_model, train, self.args.weight_decay), **kwargs)
            return self.optimizer

        def _load_best_model(self):
            best = self.state.best_model_checkpoint
            if best is not None:
                why = verified_checkpoint(Path(best))
                if why is not None:
                    raise RuntimeError(f"the best checkpoint {Path(best).name} is not loaded: {why}")
            return super()._load_best_model()

    return CptTrainer


def run(spec: TrainSpec) -> None:
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list
    from datasets import disable_caching, load_from_disk
    from trl import SFTConfig, SFTTrainer

    from tasks.core import tracking

    train, model_cfg = spec.train, spec.model
    # cpu=True without a GPU, as the Trainer's use_cpu will ask too: several CPU processes (train.num_processes)
    # join over gloo.
    state = PartialState(cpu=not torch.cuda.is_available())
    device = state.device.type
    out_dir, checkpoints = Path(spec.output_dir), Path(spec.checkpoint_dir)
    os.environ.update(tracking.child_environment(train.report_to, spec.tracker))

    tok = load_tokenizer_with_pad(spec.model_location, model_cfg.trust_remote_code)
    if train.method == "qlora":
        from tasks.ml.adapters import quantization_config
        from tasks.ml.modeling import choose_dtype

        dtype = choose_dtype(model_cfg.dtype, device)
        model = load_pretrained(spec.model_location, model_cfg, device, quantization_config(model_cfg, dtype))
    else:
        model = load_pretrained(spec.model_location, model_cfg, device)
    dtype = model.dtype
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id

    # The chunks are a published cache entry, immutable: without this, the trainer's dataset maps (packing,
    # collation prep) would write their `cache-*.arrow` files into it. Now they go to a temp dir of this process.
    disable_caching()
    data = training_columns(load_from_disk(spec.chunks_dir))
    has_validation = len(data["validation"]) > 0
    optim, why = choose_optimizer(train.optim, train.optim_fallback, device)
    if why and state.is_main_process:
        emit("optimizer_fallback", requested=train.optim, used=optim, reason=why)
    checkpointing, why_not = activation_checkpointing(train.gradient_checkpointing, device)
    if why_not and state.is_main_process:
        emit("setting_off", setting="train.gradient_checkpointing", reason=why_not)

    adapter = None
    if train.method != "full":
        from transformers import set_seed

        from tasks.ml import adapters

        set_seed(train.seed)  # the adapter's random init (lora_A) is part of the run: the same seed, the same run
        model = adapters.wrap(model, train, checkpointing)
        adapter = adapters.trainable_counts(model)
    sharded: dict[str, Any] = {}
    if train.sharding == "fsdp":
        from tasks.ml.sharding import fsdp_arguments

        # FSDP's own activation checkpointing, per wrapped decoder layer (the Trainer refuses both at once).
        sharded = fsdp_arguments(model, checkpointing)

    static = static_length(train.packing, train.packed_length, spec.max_seq_length)
    os.environ["TENSORBOARD_LOGGING_DIR"] = spec.tensorboard_dir
    args = SFTConfig(
        output_dir=str(checkpoints),
        max_length=spec.max_seq_length,
        packing=train.packing,
        packing_strategy="bfd",
        padding_free=train.packing,
        eval_packing=False,  # validation loss stays comparable between packing on and off
        num_train_epochs=train.num_train_epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.per_device_train_batch_size,
        per_device_eval_batch_size=train.per_device_eval_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler_type,
        warmup_steps=train.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=optim,
        activation_checkpointing=checkpointing and not sharded,  # transformers 5's name for gradient checkpointing
        gradient_checkpointing=None,
        logging_steps=train.logging_steps,
        eval_strategy="steps" if has_validation else "no",
        eval_steps=train.eval_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        load_best_model_at_end=has_validation,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        # TensorBoard always (its logs are part of the train entry), and the trackers of train.report_to; the run
        # is named after the Prefect flow run (tasks/ml/tracking.py).
        report_to=["tensorboard", *[t for t in train.report_to if t != "tensorboard"]],
        run_name=spec.tracker.name if spec.tracker else None,
        project=tracking.project(),
        seed=train.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device == "cpu",
        dataloader_num_workers=train.dataloader_num_workers,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        save_only_model=False,
        **sharded,
    )
    if sharded and device == "cpu":
        from tasks.ml.sharding import allow_fsdp_on_cpu

        allow_fsdp_on_cpu()
    clock = StepClock()
    callbacks = make_callbacks(train, has_validation, clock)
    reporter = callbacks[0]
    # Before the Reporter: a checkpoint is sealed (and in the store) before anything else happens.
    callbacks.insert(0, checkpoint_seal(spec))
    trainer = trainer_class(SFTTrainer, train, emit)(
        model=model, args=args, processing_class=tok,
        train_dataset=data["train"], eval_dataset=data["validation"] if has_validation else None,
        callbacks=callbacks,
    )
    if static is not None:
        # TRL refuses a custom collator with best-fit packing (it assumes its own padding-free one); the static
        # collator is that same flattened layout, padded to one shape, so it replaces TRL's after construction.
        flat = str(getattr(model.config, "_attn_implementation", "")).startswith("flash")
        trainer.data_collator = StaticPackedCollator(train.per_device_train_batch_size, static, tok.pad_token_id,
                                                     flat)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the Reporter already sends every log line to the parent
    trainer.model.register_forward_pre_hook(clock.hook, with_kwargs=True)
    if train.lr_scheduler_type == "warmup_stable_decay":
        # transformers' WSD schedule needs its decay length in steps; the step count is known only now (packing
        # changes the number of rows).
        trainer.args.lr_scheduler_kwargs = {"num_decay_steps": decay_steps(train, trainer)}
    if static is not None:
        padding = static_padding_fraction(trainer.train_dataset, train.per_device_train_batch_size, static)
    elif train.packing:
        padding = packed_padding_fraction(trainer.train_dataset, spec.max_seq_length)
    else:
        padding = padding_fraction(trainer.get_train_dataloader())
    if train.compile:
        compile_layers(trainer.model, train.compile_mode)
    # The main process picks the checkpoint to resume from, after checking every file of it against its seal
    # (and removing what was cut short or changed); the others take its choice: nothing is read before that.
    chosen = [None]
    if state.is_main_process:
        resume = last_complete_checkpoint(
            checkpoints, warn=lambda why: emit("setting_off", setting="resume", reason=why))
        chosen = [str(resume) if resume else None]
    if state.num_processes > 1:
        chosen = broadcast_object_list(chosen)
    resume = chosen[0]
    if state.is_main_process:
        emit("start", device=device, dtype=str(dtype).removeprefix("torch."), optim=optim,
             resume_from=Path(resume).name if resume else None, train_rows=len(data["train"]),
             validation_rows=len(data["validation"]), packed_length=static, compile=train.compile,
             method=train.method, sharding=train.sharding, **(adapter or {}), **padding)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started

    wrote = []
    model_dir = out_dir / "model"
    if train.sharding == "fsdp":
        from tasks.ml.sharding import save_consolidated

        save_consolidated(trainer, model_dir, dtype, state.is_main_process)
    if state.is_main_process:
        if train.method != "full":
            from tasks.ml.adapters import ADAPTER_DIR, save_merged

            # The best adapter (load_best_model_at_end) merged into the base in model.dtype: what every later
            # stage reads; the adapter alone beside it.
            save_merged(unwrapped(trainer.model), spec.model_location, model_cfg,
                        dtype if train.method == "lora" else _compute_dtype(model_cfg, device), model_dir,
                        out_dir / ADAPTER_DIR, model_cfg.trust_remote_code)
        elif train.sharding != "fsdp":
            trainer.save_model(str(model_dir))  # the best model when early stopping / load_best_model_at_end
        tok.save_pretrained(str(model_dir))
        history = trainer.state.log_history
        (out_dir / "log_history.json").write_text(json.dumps(history, indent=1))
        plot_loss_curve(history, out_dir / "loss_curve.png")
        evals = [h["eval_loss"] for h in history if "eval_loss" in h]
        trained_tokens = trainer.state.num_input_tokens_seen - reporter.tokens_at_begin
        groups = [{"group": g.get("cpt_group", "all"), "lr": g.get("initial_lr", g["lr"])}
                  for g in trainer.optimizer.param_groups] if trainer.optimizer is not None else []
        metrics = {
            "global_step": trainer.state.global_step,
            "max_steps": trainer.state.max_steps,
            "stopped_early": trainer.state.global_step < trainer.state.max_steps,
            "train_loss": result.training_loss,
            "first_loss": next((h["loss"] for h in history if "loss" in h), None),
            "last_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
            "best_eval_loss": trainer.state.best_metric,
            "best_checkpoint": Path(trainer.state.best_model_checkpoint).name
            if trainer.state.best_model_checkpoint else None,
            "eval_losses": evals,
            "resumed_from": Path(resume).name if resume else None,
            "first_step": reporter.first_step,
            "seconds": seconds,
            "tokens_seen": trainer.state.num_input_tokens_seen,
            # The whole train() call (evaluations, checkpoint saves and warm-up included), non-padding tokens:
            "run_tokens_per_second": trained_tokens / seconds if seconds > 0 else None,
            # The optimizer steps alone (StepClock): all tokens and trained tokens (label != -100) per second.
            **clock.metrics(),
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
            "device": device,
            "dtype": str(dtype).removeprefix("torch."),
            "optim": optim,
            "optim_fallback_reason": why,
            "gradient_checkpointing": checkpointing,
            "packed_length": static,
            # TRL's SFTTrainer scores the LM head in tiles (no [tokens, vocab] logits) by setting the model's
            # forward on the instance; an upgrade that dropped it would bring the full logits back unseen.
            "fused_lm_head": "forward" in vars(unwrapped(trainer.model)),
            "compile": train.compile and train.compile_mode,
            "method": train.method,
            "sharding": train.sharding,
            "optimizer_groups": groups,
            **(adapter or {}),
            **padding,
        }
        metrics.update(rank=state.process_index, world_size=state.num_processes,
                       global_batch_rows=train.per_device_train_batch_size * train.gradient_accumulation_steps
                       * state.num_processes)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        wrote = sorted(p.name for p in out_dir.iterdir())
    # Every process says what it trained on and what it wrote (only the main process writes outputs), and its
    # peak GPU memory (with fsdp each GPU holds its shard: bench/gpu_check compares it with DDP's).
    emit("rank_done", rank=state.process_index, world_size=state.num_processes, steps=trainer.state.global_step,
         wrote=wrote, peak_memory_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None,
         **clock.forwards)


def _compute_dtype(model_cfg, device):
    from tasks.ml.modeling import choose_dtype

    return choose_dtype(model_cfg.dtype, device)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    run(TrainSpec.read(argv[0]))


if __name__ == "__main__":
    main()
