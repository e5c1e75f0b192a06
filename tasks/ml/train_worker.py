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
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tasks.core.config.model import TrainConfig
from tasks.core.manifest import MANIFEST, hash_file, safe_relpath
from tasks.core.root import ArtifactsRoot, open_root
from tasks.ml.modeling import load_pretrained, load_tokenizer_with_pad
from tasks.ml.spec import TrainSpec
from tasks.ml.static_batches import NUM_PADDING, StaticPackedCollator, static_length, static_padding_fraction

MESSAGE_PREFIX = "@@cpt "


def emit(event: str, **data: Any) -> None:
    # One write of the whole line: print() writes the text and its newline separately, and with several ranks
    # on one pipe another rank's line could land between them.
    sys.stdout.write(MESSAGE_PREFIX + json.dumps({"event": event, **data}) + "\n")
    sys.stdout.flush()


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


class StepClock:
    """Throughput of the optimizer steps alone, read from the batches the model really ran.

    A forward pre-hook on the model counts, per training micro-batch, its positions (the rows' capacity),
    tokens (positions holding a token) and trained tokens (labels that are targets: label != -100 after the
    causal shift). A step's interval runs from the end of the previous step to the end of this one, so it holds
    data loading, forward, backward and the optimizer; an interval in which a checkpoint was saved or an
    evaluation ran is left out, and so are the first `warmup` steps (allocator growth, kernel selection,
    compilation). On CUDA both ends synchronise, so the interval is the GPU's work, not the launch queue's.
    """

    def __init__(self, warmup: int = 2):
        import torch

        self.warmup = warmup
        self.cuda = torch.cuda.is_available()
        self.last: float | None = None
        self.dirty = False  # a save or an evaluation happened since the last step ended
        self.pending = [0, 0, 0]  # positions, tokens, trained tokens of the step under way
        self.totals = {"timed_steps": 0, "timed_seconds": 0.0, "positions": 0, "tokens": 0, "trained_tokens": 0}
        # Every training forward of this process, timed or not (what each rank of a distributed run did).
        self.forwards = {"micro_batches": 0, "rows": 0, "tokens": 0}
        self.began: float | None = None
        self.first_step_seconds: float | None = None  # data, forward, backward, optimizer and any compilation

    def hook(self, module, args, kwargs):
        # A static batch says how many of its positions are padding; the model must not see the count.
        padding = kwargs.pop(NUM_PADDING, None)
        if not module.training:
            return args, kwargs
        ids, labels = kwargs.get("input_ids"), kwargs.get("labels")
        if ids is None:
            return args, kwargs
        mask = kwargs.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else ids.numel() - (padding or 0)
        self.forwards["micro_batches"] += 1
        self.forwards["rows"] += ids.shape[0]
        self.forwards["tokens"] += tokens
        self.pending[0] += ids.numel()
        self.pending[1] += tokens
        if labels is not None:
            self.pending[2] += int((labels[..., 1:] != -100).sum())
        return args, kwargs

    def begin(self) -> None:
        self.began = self._now()

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def step_end(self, step: int, first_step: int) -> None:
        now = self._now()
        if self.first_step_seconds is None and self.began is not None:
            self.first_step_seconds = now - self.began
        if self.last is not None and not self.dirty and step - first_step >= self.warmup:
            t = self.totals
            t["timed_steps"] += 1
            t["timed_seconds"] += now - self.last
            t["positions"] += self.pending[0]
            t["tokens"] += self.pending[1]
            t["trained_tokens"] += self.pending[2]
        self.pending = [0, 0, 0]
        self.dirty = False
        self.last = self._now()

    def metrics(self) -> dict[str, Any]:
        t, s = self.totals, self.totals["timed_seconds"]
        return {
            "timed_steps": t["timed_steps"], "timed_seconds": s, "timed_positions": t["positions"],
            "timed_tokens": t["tokens"], "timed_trained_tokens": t["trained_tokens"],
            "tokens_per_second": t["tokens"] / s if s else None,
            "trained_tokens_per_second": t["trained_tokens"] / s if s else None,
            "batch_padding_fraction": 1 - t["tokens"] / t["positions"] if t["positions"] else None,
            "first_step_seconds": self.first_step_seconds,
            # What the first step cost beyond a timed one: compilation (and the allocator's and kernels' first
            # use, which an uncompiled run pays too: compare with compile off).
            "compile_seconds": max(self.first_step_seconds - s / t["timed_steps"], 0.0)
            if self.first_step_seconds is not None and t["timed_steps"] else None,
        }


def make_callbacks(train: TrainConfig, has_validation: bool, clock: StepClock | None = None):
    from transformers import EarlyStoppingCallback, TrainerCallback

    class Reporter(TrainerCallback):
        """Progress and log lines for the parent; optional test hook that dies right after a checkpoint."""

        def __init__(self):
            self.kill_after = int(os.environ.get("CPT_TEST_KILL_AFTER_SAVE_STEP", "0"))
            self.started = time.monotonic()
            self.tokens_at_begin = 0
            self.first_step: int | None = None  # the first optimizer step this attempt ran (resume: checkpoint + 1)

        def on_train_begin(self, args, state, control, **kw):
            self.started = time.monotonic()
            self.tokens_at_begin = state.num_input_tokens_seen  # > 0 when resuming
            if clock is not None:
                clock.begin()
            if state.is_world_process_zero:
                emit("begin", step=state.global_step, max_steps=state.max_steps)

        def on_step_end(self, args, state, control, **kw):
            if self.first_step is None:
                self.first_step = state.global_step
            if clock is not None:
                clock.step_end(state.global_step, self.first_step)
            if state.is_world_process_zero:
                emit("progress", step=state.global_step, max_steps=state.max_steps,
                     seconds=round(time.monotonic() - self.started, 2))

        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs:
                emit("log", step=state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))})

        def on_evaluate(self, args, state, control, **kw):
            if clock is not None:
                clock.dirty = True

        def on_save(self, args, state, control, **kw):
            if clock is not None:
                clock.dirty = True
            if self.kill_after and state.global_step >= self.kill_after:
                emit("killed", step=state.global_step)
                os.kill(os.getpid(), signal.SIGKILL)

    callbacks = [Reporter()]  # first: run() reads tokens_at_begin from it
    if has_validation and train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=train.early_stopping_patience))
    return callbacks


def decay_steps(train: TrainConfig, trainer) -> int:
    """`train.decay_ratio` of the run's optimizer steps (at least 1)."""
    import math

    if train.max_steps > 0:
        total = train.max_steps
    else:
        per_epoch = max(math.ceil(len(trainer.get_train_dataloader()) / train.gradient_accumulation_steps), 1)
        total = math.ceil(per_epoch * train.num_train_epochs)
    return max(1, round(train.decay_ratio * total))


def push_checkpoint(root: ArtifactsRoot, work_rel: str, checkpoint: Path, tensorboard: Path) -> None:
    """Copy a finished checkpoint (marker last) and the TensorBoard logs so far to the root's store, then drop
    the older checkpoints there: a training killed on this host resumes on another from the newest one. A
    local root has no store: nothing is copied."""
    remote = f"{work_rel}/checkpoints/{checkpoint.name}"
    # The marker, written last, is the checkpoint's manifest: every file with its size and digest, checked by
    # the host that resumes from it (a checkpoint is trusted no more than any other stored bytes).
    files = {p.relative_to(checkpoint).as_posix(): [p.stat().st_size, hash_file(p)]
             for p in sorted(checkpoint.rglob("*")) if p.is_file()}
    root.upload_dir(checkpoint, remote, marker=json.dumps({"files": files}).encode())
    if tensorboard.is_dir():
        root.upload_dir(tensorboard, f"{work_rel}/tensorboard")
    for name in {n.split("/", 1)[0] for n in root.remote_files(f"{work_rel}/checkpoints")} - {checkpoint.name}:
        root.remove_remote(f"{work_rel}/checkpoints/{name}")


def pull_checkpoint(root: ArtifactsRoot, work_rel: str, checkpoints: Path, tensorboard: Path,
                    warn=print) -> str | None:
    """Bring the store's newest complete checkpoint (and the logs that go with it) here, unless this host has
    one as new; returns its name (None on a local root)."""
    listing = root.remote_files(f"{work_rel}/checkpoints")
    done = [n.split("/", 1)[0] for n in listing if n.endswith(f"/{MANIFEST}")]
    steps = sorted((int(n.rsplit("-", 1)[-1]), n) for n in done if n.rsplit("-", 1)[-1].isdigit())
    if not steps:
        return None
    step, name = steps[-1]
    local = last_complete_checkpoint(checkpoints)
    if local is not None and int(local.name.rsplit("-", 1)[-1]) >= step:
        return None
    tmp = checkpoints / f".{name}.part"
    shutil.rmtree(tmp, ignore_errors=True)
    remote = f"{work_rel}/checkpoints/{name}"
    root.download_dir(remote, tmp)
    why = checkpoint_damage(tmp, root.read_remote(f"{remote}/{MANIFEST}"))
    if why is not None:  # never resumed from: dropped there, and training goes on from what this host has
        warn(f"train: the stored {name} is damaged ({why}); not resumed from it, and removed from the store")
        shutil.rmtree(tmp, ignore_errors=True)
        root.remove_remote(remote)
        return None
    shutil.rmtree(checkpoints / name, ignore_errors=True)
    os.replace(tmp, checkpoints / name)
    root.download_dir(f"{work_rel}/tensorboard", tensorboard)
    return name


def checkpoint_damage(folder: Path, marker: bytes | None) -> str | None:
    """Why a downloaded checkpoint does not match the manifest its marker holds (a file missing, extra, of
    another size or content), or None."""
    try:
        files = safe_files(json.loads(marker or b"")["files"])
    except (ValueError, KeyError, TypeError):
        return "its manifest is missing or unreadable"
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    if present != set(files):
        return f"its files are not the ones its manifest lists ({sorted(present ^ set(files))[:3]})"
    for name, (size, digest) in files.items():
        if (folder / name).stat().st_size != size or hash_file(folder / name) != digest:
            return f"{name} does not have the content it was saved with"
    return None


def safe_files(files: dict) -> dict:
    for name in files:
        safe_relpath(name)
    return files


def checkpoint_mirror(spec: TrainSpec):
    """A callback that sends every checkpoint to the root's store (rank 0 only; nothing on a local root), or None
    for a training outside any root."""
    if spec.artifacts is None:
        return None
    from transformers import TrainerCallback

    root = open_root(spec.artifacts)

    class CheckpointMirror(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                push_checkpoint(root, spec.work_rel, Path(args.output_dir) / f"checkpoint-{state.global_step}",
                                Path(spec.tensorboard_dir))

    return CheckpointMirror()


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint a killed attempt finished writing. The Trainer writes trainer_state.json last, so
    a checkpoint without a readable one was cut short (a SIGKILL mid-save): it is removed, not resumed from."""
    import shutil

    complete = []
    for d in checkpoints.glob("checkpoint-*") if checkpoints.is_dir() else []:
        try:
            step = int(d.name.split("-")[-1])
            json.loads((d / "trainer_state.json").read_text())
            complete.append((step, d))
        except (ValueError, OSError):
            shutil.rmtree(d, ignore_errors=True)
    return max(complete)[1] if complete else None


def plot_loss_curve(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    val = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot(*zip(*train), label="train loss", color="#4c72b0")
    if val:
        ax.plot(*zip(*val), label="validation loss", color="#dd8452", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Continued pretraining loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def tied_weights_not_saved(model) -> None:
    """Tied embeddings (the tiny model, Gemma): `lm_head.weight` is `embed_tokens.weight`, so save_pretrained
    leaves it out of the checkpoint. Loading the best checkpoint at the end, the Trainer then warned "There were
    missing keys in the checkpoint model loaded: ['lm_head.weight']" on every training, harmless but alarming.
    Naming the tied copies as keys not saved is what the Trainer checks for: it re-ties them instead of warning.
    Nothing saved changes (those keys were left out already)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # {target: source}, empty when nothing is tied
    if tied:
        model._keys_to_ignore_on_save = set(model._keys_to_ignore_on_save or ()) | set(tied)


def run(spec: TrainSpec) -> None:
    import torch
    from accelerate import PartialState
    from datasets import disable_caching, load_from_disk
    from trl import SFTConfig, SFTTrainer

    train, model_cfg = spec.train, spec.model
    # cpu=True without a GPU, as the Trainer's use_cpu will ask too: several CPU processes (train.num_processes)
    # join over gloo.
    state = PartialState(cpu=not torch.cuda.is_available())
    device = state.device.type
    out_dir, checkpoints = Path(spec.output_dir), Path(spec.checkpoint_dir)

    tok = load_tokenizer_with_pad(spec.model_location, model_cfg.trust_remote_code)
    model = load_pretrained(spec.model_location, model_cfg, device)
    tied_weights_not_saved(model)
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
        activation_checkpointing=checkpointing,  # transformers 5's name for gradient checkpointing
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
        report_to=["tensorboard"],
        seed=train.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device == "cpu",
        dataloader_num_workers=train.dataloader_num_workers,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        save_only_model=False,
    )
    clock = StepClock()
    callbacks = make_callbacks(train, has_validation, clock)
    reporter = callbacks[0]
    mirror = checkpoint_mirror(spec)
    if mirror is not None:  # before the Reporter: a checkpoint is in the store before anything else happens
        callbacks.insert(0, mirror)
    trainer = SFTTrainer(
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
    if state.is_main_process:
        last_complete_checkpoint(checkpoints)  # clears cut-short checkpoints before any process looks
    state.wait_for_everyone()
    resume = last_complete_checkpoint(checkpoints)
    if state.is_main_process:
        emit("start", device=device, dtype=str(dtype).removeprefix("torch."), optim=optim,
             resume_from=Path(resume).name if resume else None, train_rows=len(data["train"]),
             validation_rows=len(data["validation"]), packed_length=static, compile=train.compile, **padding)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - started

    wrote = []
    if state.is_main_process:
        model_dir = out_dir / "model"
        trainer.save_model(str(model_dir))  # the best model when early stopping / load_best_model_at_end
        tok.save_pretrained(str(model_dir))
        history = trainer.state.log_history
        (out_dir / "log_history.json").write_text(json.dumps(history, indent=1))
        plot_loss_curve(history, out_dir / "loss_curve.png")
        evals = [h["eval_loss"] for h in history if "eval_loss" in h]
        trained_tokens = trainer.state.num_input_tokens_seen - reporter.tokens_at_begin
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
            **padding,
        }
        metrics.update(rank=state.process_index, world_size=state.num_processes,
                       global_batch_rows=train.per_device_train_batch_size * train.gradient_accumulation_steps
                       * state.num_processes)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        wrote = sorted(p.name for p in out_dir.iterdir())
    # Every process says what it trained on and what it wrote (only the main process writes outputs).
    emit("rank_done", rank=state.process_index, world_size=state.num_processes, steps=trainer.state.global_step,
         wrote=wrote, **clock.forwards)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    run(TrainSpec.read(argv[0]))


if __name__ == "__main__":
    main()
