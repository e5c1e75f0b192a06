"""What the training child reports while it trains: the step clock (tokens/s, padding, compile seconds), the
trainer's callbacks (early stopping, progress events to the parent), the decay steps of a warmup-stable-decay
schedule, and the loss curve plot."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tasks.core.config.model import TrainConfig
from tasks.ml.static_batches import NUM_PADDING

MESSAGE_PREFIX = "@@cpt "


def emit(event: str, **data: Any) -> None:
    # One write of the whole line: print() writes the text and its newline separately, and with several ranks
    # on one pipe another rank's line could land between them.
    sys.stdout.write(MESSAGE_PREFIX + json.dumps({"event": event, **data}) + "\n")
    sys.stdout.flush()


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
