"""train: continued pretraining of the base model on the chunk stage's output, in an `accelerate launch` child.

The child (tasks/train_worker.py) checkpoints into `artifacts/work/train/<key>/checkpoints`: a killed attempt
of the same key resumes from its last checkpoint (global step continues) instead of starting over. Its
`@@cpt` lines become Prefect progress and log lines; everything else it prints is logged as is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tasks.core import fence
from tasks.core.config.data import ChunkConfig
from tasks.core.config.model import ModelConfig, TrainConfig
from tasks.core.manifest import Fingerprint, OutputMeta, StageOutput
from tasks.core.report import Progress, image_data_uri, markdown_artifact, markdown_table, run_logger, table_artifact
from tasks.core.root import ArtifactsRoot
from tasks.core.stage import Build, stage
from tasks.ml import train_worker
from tasks.ml.adapters import ADAPTER_DIR
from tasks.ml.checkpoints import pull_checkpoint
from tasks.ml.clock import MESSAGE_PREFIX
from tasks.ml.spec import TrainSpec

if TYPE_CHECKING:
    from tasks.chunk import Chunks

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class TrainingFailed(RuntimeError):
    pass


class ModelDamaged(RuntimeError):
    """A train entry's model files are not the ones its manifest's model digest names."""


def work_rel(key: str) -> str:
    """A key's work folder (checkpoints kept across attempts), relative to the root."""
    return f"work/train/{key}"


def launch_command(spec_path: Path, num_processes: int, device: str, accelerate_config: str | None = None,
                   cpu_threads: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    if accelerate_config:  # the user's file decides the distributed setup (FSDP, DeepSpeed, …)
        cmd += ["--config_file", accelerate_config]
    else:
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if device == "cpu" and num_processes == 1:
            cmd += ["--cpu", "--num_cpu_threads_per_process", str(cpu_threads or os.cpu_count() or 1)]
        elif num_processes > 1:
            # accelerate's `--cpu` runs one process whatever `--num_processes` says; its multi-process launcher
            # (torchrun) starts them, and the worker's PartialState(cpu=True) joins them over gloo on CPU.
            # A port of its own: torchrun's default (29500) is shared by every training on the host, and a second
            # one would join the first's rendezvous (seen here: a hang, or a rank failing at start).
            cmd += ["--multi_gpu", "--main_process_port", str(free_port())]
    return [*cmd, "-m", "tasks.ml.train_worker", str(spec_path)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_child(cmd: list[str], on_message, log) -> None:
    """Run the training child, streaming its output; raise TrainingFailed with its last lines on failure."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    if os.environ.get("CPT_STORE_BLOCK"):
        # The child loads the store's Secret block from the server this run talks to, a temporary one included.
        from prefect.settings import get_current_settings

        if get_current_settings().api.url:
            env["PREFECT_API_URL"] = str(get_current_settings().api.url)
    tail: deque[str] = deque(maxlen=40)
    # Its own process group, so stopping it stops every rank accelerate started, not only the launcher.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
                            start_new_session=True)

    def stop() -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    # A store lease that lapses mid-training (an expired session token): another host may be training this
    # key now, so this one stops at once rather than spending hours on an output it may not publish.
    forget = fence.current().on_lost(stop)
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            head, *messages = line.split(MESSAGE_PREFIX)
            if head.strip():
                tail.append(head)
                log.info("%s", head)
            for text in messages:  # several ranks share the pipe: a line may hold more than one message
                try:
                    message = json.loads(text)
                except ValueError:
                    tail.append(text)
                    log.info("%s", text)
                    continue
                on_message(message)
        rc = proc.wait()
    finally:
        forget()
        if proc.poll() is None:  # the flow was cancelled or crashed: do not leave a GPU job behind
            stop()
            proc.wait()
    fence.check()  # killed because the lease was lost: say that, not "training failed"
    if rc != 0:
        how = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
        raise TrainingFailed(f"training process failed ({how}); last lines:\n" + "\n".join(tail))


def train_model(spec: TrainSpec, num_processes: int, log=None, progress_desc: str = "train") -> dict:
    """Run one training attempt described by `spec` (see train_worker.run); returns the child's metrics."""
    from tasks.ml.modeling import device_type

    log = log or run_logger()
    device = device_type()
    spec = TrainSpec.model_validate(spec)  # a dict from a benchmark or a test is checked like the stage's own
    out = Path(spec.output_dir)
    spec_path = spec.write(out / "spec.json")
    state: dict[str, Any] = {"progress": None}

    def on_message(msg: dict[str, Any]) -> None:
        event = msg.pop("event")
        if event in ("begin", "progress"):
            if state["progress"] is None:
                state["progress"] = Progress(msg["max_steps"], progress_desc, unit="step", every=5.0)
                state["progress"].update(msg["step"])
            else:
                state["progress"].update(msg["step"] - state["progress"].done)
        elif event == "setting_off":
            log.warning("train: %s: %s", msg["setting"], msg["reason"])
        elif event == "optimizer_fallback":
            log.warning("train: optimizer %s → %s (%s)", msg["requested"], msg["used"], msg["reason"])
        elif event == "rank_done":
            state.setdefault("ranks", []).append(msg)
        elif event == "start":
            if msg.get("resume_from"):
                log.info("train: resuming from %s of a previous attempt", msg["resume_from"])
            log.info("train: %s", ", ".join(f"{k}={v}" for k, v in msg.items()))
        elif event == "log":
            log.info("train: %s", "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in msg.items()))

    try:
        run_child(launch_command(spec_path, num_processes, device, spec.train.accelerate_config,
                                 spec.model.cpu_threads), on_message, log)
    finally:
        if state["progress"] is not None:
            state["progress"].close()
            log.info("%s", state["progress"].final())
    metrics = json.loads((out / "metrics.json").read_text())
    # What each process did (every rank reports; rank 0 alone writes the outputs), in rank order.
    metrics["ranks"] = sorted(state.get("ranks", []), key=lambda r: r["rank"])
    return metrics


def source_tokens(chunks: StageOutput) -> dict[str, Any]:
    """Trained (labelled) tokens per source: the mix stage's counts with replay (or every source's, with
    mix-sources), else all domain."""
    c = chunks.counts
    sources = getattr(chunks.meta, "sources", None)  # mix-sources' table (tasks.mix.MixedSourcesMeta)
    if sources:
        return {"source_trained_tokens": {t["source"]: t["trained_tokens"] for t in sources},
                "source_shares": {t["source"]: round(t["share"], 6) for t in sources}}
    if "replay_trained_tokens" in c:
        return {k: c[k] for k in ("domain_trained_tokens", "replay_trained_tokens", "replay_share")}
    return {"domain_trained_tokens": c.get("train_trained_tokens"), "replay_trained_tokens": 0, "replay_share": 0.0}


class TrainMeta(OutputMeta):
    model_digest: str  # of the model's files (tasks.ml.modeling.model_digest), checked before it is read
    device: str = ""
    dtype: str = ""
    optim: str = ""
    model_dir: Literal["model"] = "model"
    tensorboard: Literal["tensorboard"] = "tensorboard"
    parent: dict[str, Any] = {}  # the model it started from: kind, id, digest (a description, never opened)
    # lora/qlora: the adapter alone (push.adapter_only), in the fixed folder ADAPTER_DIR, and its digest
    adapter_dir: Literal["adapter"] | None = None
    adapter_digest: str | None = None


class Trained(StageOutput):
    """train's output: `model/` (weights and tokenizer, the best checkpoint with early stopping),
    `metrics.json`, `log_history.json`, `loss_curve.png`, `tensorboard/`."""

    meta: TrainMeta

    def model_dir(self, root: ArtifactsRoot) -> Path:
        return self.dir(root) / "model"

    def verified_model_dir(self, root: ArtifactsRoot) -> Path:
        """`model_dir`, after checking its files against the digest recorded when it was trained: a model whose
        bytes changed since (the same sizes, other weights) is never evaluated or released. On a mismatch the
        entry is discarded, so the next run retrains, and ModelDamaged says so."""
        from tasks.ml.modeling import model_digest

        model = self.model_dir(root)
        found = model_digest(model)
        if found != self.model_digest:
            root.discard_entry(root.path(self.path))
            raise ModelDamaged(f"{self.location(root)}: the model's files are not the ones trained (digest {found[:16]}, "
                               f"recorded {self.model_digest[:16]}); the entry is discarded: run again to retrain")
        return model

    def verified_adapter_dir(self, root: ArtifactsRoot) -> Path:
        """The adapter of a lora/qlora training (push.adapter_only), checked against its recorded digest like the
        model."""
        from tasks.ml.modeling import model_digest

        if self.meta.adapter_digest is None:
            raise ModelDamaged(f"{self.location(root)}: this training has no adapter (train.method full)")
        adapter = self.dir(root) / ADAPTER_DIR  # a name of this code, never one read from a stored manifest
        found = model_digest(adapter)
        if found != self.meta.adapter_digest:
            root.discard_entry(root.path(self.path))
            raise ModelDamaged(f"{self.location(root)}: the adapter's files are not the ones trained (digest "
                               f"{found[:16]}, recorded {self.meta.adapter_digest[:16]}); the entry is discarded: "
                               "run again to retrain")
        return adapter

    @property
    def model_rel(self) -> str:
        """The model folder relative to the root (how a promotion record names it)."""
        return f"{self.path}/model"

    def tensorboard_dir(self, root: ArtifactsRoot) -> str:
        """Where TensorBoard reads the logs: the local folder, or the store's URL (TensorBoard reads fsspec
        URLs), so naming it fetches nothing."""
        return f"{self.location(root)}/tensorboard"

    def loss_curve(self, root: ArtifactsRoot) -> Path:
        return self.file(root, "loss_curve.png")

    def links(self, root: ArtifactsRoot) -> dict[str, str]:
        return {"loss curve": str(self.loss_curve(root)),
                "TensorBoard": f"tensorboard --logdir {self.tensorboard_dir(root)}"}

    @property
    def model_digest(self) -> str:
        return self.meta.model_digest

    def summary(self, root: ArtifactsRoot) -> list[tuple[int, str]]:
        c = self.counts
        steps = (f"{c['global_step']} steps" if not c.get("stopped_early") else
                 f"stopped early at step {c['global_step']} of {c.get('max_steps', '?')} (validation loss no better "
                 "for train.early_stopping_patience evaluations; the best checkpoint is kept)")
        lines = [(logging.INFO, f"{steps} from the {c['parent']}, loss {_num(c['first_loss'])} → "
                                f"{_num(c['last_loss'])}, best validation loss {_num(c['best_eval_loss'])}; "
                                f"TensorBoard logs in {self.tensorboard_dir(root)}")]
        if c.get("replay_trained_tokens"):
            lines.append((logging.INFO, f"{c['domain_trained_tokens']} domain + {c['replay_trained_tokens']} replay "
                                        f"trained tokens (replay share {c['replay_share']:.4f})"))
        return lines

    def show(self, root: ArtifactsRoot) -> None:
        show(self, root)  # the module's `show` below: its tables and plots


def validation_layout(chunks: StageOutput, eval_weights: dict[str, float] | None
                      ) -> tuple[list[tuple[str, int, int]], dict[str, float]]:
    """Where each source's validation rows are in the mixed chunks (mix-sources' `sources`), and each one's weight
    in the validation loss: its configured eval_weight, else the share of the trained tokens it got."""
    table = getattr(chunks.meta, "sources", None) or []
    layout = [(t["source"], *t["validation_rows"]) for t in table if t["validation_rows"][1] > t["validation_rows"][0]]
    weights = {name: (eval_weights or {}).get(name, next(t["share"] for t in table if t["source"] == name))
               for name, _, _ in layout}
    return (layout, weights) if len(layout) > 1 else ([], {})


def run_attempt(build: Build, train: TrainConfig, model: ModelConfig, start: Fingerprint, chunk: ChunkConfig,
                chunks: Chunks, phase: str = "standard", warmup: bool = True, decay_steps: int | None = None,
                eval_weights: dict[str, float] | None = None) -> dict[str, Any]:
    """One training child from the model at `start` on `chunks` (train and anneal): its checkpoints in the key's
    work folder (a killed attempt resumes from its last; on a store root from another host's), the model and the
    logs in the entry's temp folder. Returns the child's metrics."""
    from tasks.core import tracking
    from tasks.ml.preflight import refuse_on_this_machine

    refuse_on_this_machine(train)  # qlora without CUDA: said here, not after the child loaded the model
    rel = work_rel(build.key)
    work = build.root.path(rel)
    # An attempt killed on another host may have left its newest checkpoint in the store (none on a local root).
    (work / "checkpoints").mkdir(parents=True, exist_ok=True)
    pulled = pull_checkpoint(build.root, rel, work / "checkpoints", build.tmp / "tensorboard", build.log.warning)
    if pulled:
        build.log.info("train: took %s of an earlier attempt from %s", pulled, build.root.location(rel))
    # The rows are gathered from the chunks' windows into the token pieces once, here, for every rank (about the
    # time the child took to derive labels from stored rows: bench/windows.py); removed with the work folder.
    data = work / "data"
    shutil.rmtree(data, ignore_errors=True)
    chunks.write_training_set(build.root, data)
    layout, weights = validation_layout(chunks, eval_weights)
    spec = TrainSpec(model_location=start.location, model=model, train=train,
                     max_seq_length=chunk.max_seq_length, chunks_dir=str(data),
                     output_dir=str(build.tmp), checkpoint_dir=str(work / "checkpoints"),
                     tensorboard_dir=str(build.tmp / "tensorboard"), artifacts=build.root.spec, work_rel=rel,
                     tracker=tracking.tracker_run(build.key) if set(train.report_to) - {"tensorboard"} else None,
                     phase=phase, warmup=warmup, decay_steps=decay_steps, validation_sources=layout,
                     eval_weights=weights)
    metrics = train_model(spec, train.num_processes, build.log)
    # The model is in the published output; checkpoints only served a resume of this key.
    build.on_published(lambda out: shutil.rmtree(work, ignore_errors=True))
    build.on_published(lambda out: build.root.remove_remote(rel))
    return metrics


def attempt_outputs(build: Build, train: TrainConfig, metrics: dict[str, Any], chunks: StageOutput
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The counts and meta of a training's entry, from its child's metrics."""
    from tasks.ml.modeling import model_digest

    counts = {k: metrics[k] for k in ("global_step", "max_steps", "train_loss", "first_loss", "last_loss",
                                      "best_eval_loss", "stopped_early", "padding_fraction",
                                      "tokens_per_second", "trained_tokens_per_second", "resumed_from", "first_step",
                                      "seconds", "batch_padding_fraction", "packed_length", "compile",
                                      "first_step_seconds", "compile_seconds", "phase", "run_steps")}
    if metrics.get("peak_memory_bytes"):
        counts["peak_memory_gib"] = round(metrics["peak_memory_bytes"] / 2**30, 2)
    counts["method"], counts["sharding"] = train.method, train.sharding
    for k in ("parameters", "trainable_parameters", "trainable_embedding_parameters"):
        if k in metrics:
            counts[k] = metrics[k]
    if any(v is not None for v in metrics.get("source_eval_losses", {}).values()):
        counts["source_eval_losses"] = metrics["source_eval_losses"]
    counts.update(source_tokens(chunks))
    meta = {"device": metrics["device"], "dtype": metrics["dtype"], "optim": metrics["optim"],
            "model_dir": "model", "tensorboard": "tensorboard", "model_digest": model_digest(build.tmp / "model")}
    if train.method != "full":  # the merged model is `model/`; the adapter alone is kept for push.adapter_only
        meta.update(adapter_dir=ADAPTER_DIR, adapter_digest=model_digest(build.tmp / ADAPTER_DIR))
    return counts, meta


def parent_name(parent: dict[str, Any]) -> str:
    return "base model" if parent["kind"] == "base" else f"{parent['kind']} {parent['digest'][:16]}"


@stage("train", version=1, output=Trained, code=[train_worker], key_exclude={"parent"},
       libraries=["transformers", "trl", "torch", "accelerate", "datasets"])
def train(build: Build, train: TrainConfig, model: ModelConfig, base_model: Fingerprint, chunk: ChunkConfig,
          chunks: Chunks, parent: dict[str, Any] | None = None, warm_start: bool | None = None,
          eval_weights: dict[str, float] | None = None):
    """`base_model` is the model training starts from (the base, the last promoted model with train.init:
    last_promoted, or the line's stable model with train.schedule: stable_anneal); `parent` describes it for the
    lineage and is not part of the key (its digest is). With stable_anneal this is the stable phase: `warm_start`
    says whether it warms up (the line's first run) or starts at the peak rate. `eval_weights`: the configured
    weights of the sources' validation losses."""
    from tasks.ml.modeling import without_location

    parent = parent or {"kind": "base", "id": model.id, "digest": base_model.digest}
    stable = train.schedule == "stable_anneal"
    metrics = run_attempt(build, train, model, base_model, chunk, chunks, "stable" if stable else "standard",
                          bool(warm_start) if stable else True, eval_weights=eval_weights)
    counts, meta = attempt_outputs(build, train, metrics, chunks)
    counts["parent"] = parent_name(parent)
    if stable:
        counts["warmed_up"] = bool(warm_start)
    meta["parent"] = without_location(parent)
    return counts, meta


# ------------------------------------------------------------------------------------------ anneal
# The release of a stable line (train.schedule: stable_anneal), made from the stable model the train stage left,
# which stays the line's parent and is never released:
# - decay (train.anneal): a branch that continues the stable model with the learning rate falling linearly to 0
#   over `anneal_ratio` of the run's steps (the stable phase trained the rest), on the anneal mixture
#   (anneal.sources) or the run's own, in another seeded order: a training child like train's (checkpoints, resume,
#   the best model);
# - average: the mean of the line's last `anneal_checkpoints` stable models, this run's first (checkpoint averaging
#   along the constant-rate line, as Megatron-LM's checkpoint merging), no training.
# Its output is a train-like entry (`model/`, its digest): evaluate, the gate and push read it as they read train's.


class AnnealMeta(TrainMeta):
    stable: dict[str, str]  # the stable model the release came from: digest, train_key


class Annealed(Trained):
    """anneal's output: `model/` (the release), and for a decay branch its training's files; `meta.stable` is the
    stable model it came from."""

    meta: AnnealMeta

    def summary(self, root: ArtifactsRoot) -> list[tuple[int, str]]:
        c = self.counts
        if c["anneal"] == "average":
            return [(logging.INFO, f"release: the average of {c['averaged_models']} stable models of the line "
                                   f"(this run's {self.meta.stable['digest'][:16]} and {c['averaged_models'] - 1} "
                                   "before it)")]
        return [(logging.INFO, f"release: {c['global_step']} decay steps from the stable model "
                               f"{self.meta.stable['digest'][:16]}, loss {c['first_loss']} → {c['last_loss']}, best "
                               f"validation loss {c['best_eval_loss']}")]

    def show(self, root: ArtifactsRoot) -> None:
        if self.counts["anneal"] == "decay":
            super().show(root)


@stage("anneal", version=1, output=Annealed, code=[train_worker],
       libraries=["transformers", "trl", "torch", "accelerate", "datasets", "safetensors"])
def anneal(build: Build, train: TrainConfig, model: ModelConfig, stable: Trained, chunk: ChunkConfig,
           chunks: Chunks, eval_weights: dict[str, float] | None = None, previous: list[Fingerprint] | None = None):
    """`stable`: this run's stable phase; `chunks`: the decay branch's data (anneal.sources' mix, or the run's);
    `previous`: with average, the line's stable models before this one, newest first (their digests are keyed)."""
    from tasks.ml.modeling import model_digest
    from tasks.ml.schedule import average_models, decay_length

    stable_dir = stable.verified_model_dir(build.root)
    meta_stable = {"digest": stable.model_digest, "train_key": stable.key}
    if train.anneal == "average":
        chosen = [stable_dir, *[Path(p.location) for p in (previous or [])[: train.anneal_checkpoints - 1]]]
        for fp, folder in zip(previous or [], chosen[1:]):
            if model_digest(folder) != fp.digest:
                raise ValueError(f"anneal: the stable model {fp.digest[:16]} at {folder} is not the one recorded")
        counts = {"anneal": "average", **average_models(chosen, build.tmp / "model"),
                  "averaged": [stable.model_digest, *[p.digest for p in (previous or [])[: len(chosen) - 1]]]}
        (build.tmp / "anneal.json").write_text(json.dumps(counts, indent=2))
        meta = {"model_dir": "model", "model_digest": model_digest(build.tmp / "model"), "stable": meta_stable,
                "parent": stable.meta.parent}
        return counts, meta
    start = Fingerprint(kind="model", digest=stable.model_digest, location=str(stable_dir))
    metrics = run_attempt(build, train, model, start, chunk, chunks, "decay",
                          decay_steps=decay_length(train, stable.counts["run_steps"]), eval_weights=eval_weights)
    counts, meta = attempt_outputs(build, train, metrics, chunks)
    counts.update(anneal="decay", parent=f"stable {stable.model_digest[:16]}")
    meta.update(stable=meta_stable, parent=stable.meta.parent)
    return counts, meta


def _num(x: Any) -> str:
    """A loss for a log line: NaN/inf/None (a diverged run) must not break the line."""
    return f"{x:.4f}" if isinstance(x, (int, float)) else str(x)


def show(out: Trained, root: ArtifactsRoot) -> None:
    rows = [{"metric": k, "value": v} for k, v in out.counts.items()]
    table_artifact(rows, "train-metrics", "Training metrics")
    markdown_artifact(
        f"# Loss curve\n\n![loss curve]({image_data_uri(out.loss_curve(root))})\n\n{markdown_table(rows)}\n\n"
        f"TensorBoard: `tensorboard --logdir {out.tensorboard_dir(root)}`\n",
        "train-loss-curve", "Training and validation loss",
    )
