"""train: continued pretraining of the base model on the chunk stage's output, in an `accelerate launch` child.

The child (tasks/train_worker.py) checkpoints into `artifacts/work/train/<key>/checkpoints`: a killed attempt
of the same key resumes from its last checkpoint (global step continues) instead of starting over. Its
`@@cpt` lines become Prefect progress and log lines; everything else it prints is logged as is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from tasks import modeling
from tasks.cache import Fingerprint, StageOutput, current_key, publish, stage_task
from tasks.config import ChunkConfig, ModelConfig, TrainConfig
from tasks.report import Progress, markdown_artifact, markdown_table, png_data_uri, run_logger, table_artifact
from tasks.train_worker import MESSAGE_PREFIX

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class TrainingFailed(RuntimeError):
    pass


def work_dir(artifacts: str | Path, key: str) -> Path:
    return Path(artifacts) / "work" / "train" / key


def launch_command(spec_path: Path, num_processes: int, device: str, accelerate_config: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    if accelerate_config:  # the user's file decides the distributed setup (FSDP, DeepSpeed, …)
        cmd += ["--config_file", accelerate_config]
    else:
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if device == "cpu":
            cmd += ["--cpu", "--num_cpu_threads_per_process", str(os.cpu_count() or 1)]
        elif num_processes > 1:
            cmd.append("--multi_gpu")
    return [*cmd, "-m", "tasks.train_worker", str(spec_path)]


def run_child(cmd: list[str], on_message, log) -> None:
    """Run the training child, streaming its output; raise TrainingFailed with its last lines on failure."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    tail: deque[str] = deque(maxlen=40)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(MESSAGE_PREFIX):
                on_message(json.loads(line[len(MESSAGE_PREFIX):]))
            elif line.strip():
                tail.append(line)
                log.info("%s", line)
        rc = proc.wait()
    finally:
        if proc.poll() is None:  # the flow was cancelled or crashed: do not leave a GPU job behind
            proc.kill()
            proc.wait()
    if rc != 0:
        how = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
        raise TrainingFailed(f"training process failed ({how}); last lines:\n" + "\n".join(tail))


def train_model(spec: dict[str, Any], num_processes: int, log=None, progress_desc: str = "train") -> dict:
    """Run one training attempt described by `spec` (see train_worker.run); returns the child's metrics."""
    from tasks.modeling import device_type

    log = log or run_logger()
    device = device_type()
    out = Path(spec["output_dir"])
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
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
        elif event == "start":
            if msg.get("resume_from"):
                log.info("train: resuming from %s of a previous attempt", msg["resume_from"])
            log.info("train: %s", ", ".join(f"{k}={v}" for k, v in msg.items()))
        elif event == "log":
            log.info("train: %s", "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in msg.items()))

    try:
        run_child(launch_command(spec_path, num_processes, device, spec["train"].get("accelerate_config")),
                  on_message, log)
    finally:
        if state["progress"] is not None:
            state["progress"].close()
    return json.loads((out / "metrics.json").read_text())


def source_tokens(chunks: StageOutput) -> dict[str, Any]:
    """Trained (labelled) tokens per source: the mix stage's counts with replay, else all domain."""
    c = chunks.counts
    if "replay_trained_tokens" in c:
        return {k: c[k] for k in ("domain_trained_tokens", "replay_trained_tokens", "replay_share")}
    return {"domain_trained_tokens": c.get("train_trained_tokens"), "replay_trained_tokens": 0, "replay_share": 0.0}


@stage_task("train", version=1, code=[train_model, launch_command, run_child, source_tokens, "tasks.train_worker",
                                     modeling.load_pretrained, modeling.choose_dtype, modeling.choose_attention,
                                     modeling.load_tokenizer_with_pad],
            libraries=["transformers", "trl", "torch", "accelerate", "datasets"])
def train(train: TrainConfig, model: ModelConfig, base_model: Fingerprint, chunk: ChunkConfig,
          chunks: StageOutput, artifacts: str, parent: dict[str, Any] | None = None) -> StageOutput:
    """`base_model` is the model training starts from (the base, or the last promoted model with train.init:
    last_promoted); `parent` describes it for the lineage and is not part of the key (its digest is)."""
    key = current_key("train", {"train": train, "model": model, "base_model": base_model, "chunk": chunk,
                                "chunks": chunks})
    work = work_dir(artifacts, key)
    log = run_logger()
    parent = parent or {"kind": "base", "id": model.id, "digest": base_model.digest}

    def build(tmp: Path):
        from tasks.promotion import model_digest, without_location

        spec = {
            "model_location": base_model.location,
            "model": model.model_dump(mode="json"),
            "train": train.model_dump(mode="json"),
            "max_seq_length": chunk.max_seq_length,
            "chunks_dir": str(chunks.dir(artifacts)),
            "output_dir": str(tmp),
            "checkpoint_dir": str(work / "checkpoints"),
            "tensorboard_dir": str(tmp / "tensorboard"),
        }
        metrics = train_model(spec, train.num_processes, log)
        counts = {k: metrics[k] for k in ("global_step", "max_steps", "train_loss", "first_loss", "last_loss",
                                          "best_eval_loss", "stopped_early", "padding_fraction",
                                          "tokens_per_second", "trained_tokens_per_second", "resumed_from", "first_step",
                                          "seconds")}
        if metrics.get("peak_memory_bytes"):
            counts["peak_memory_gib"] = round(metrics["peak_memory_bytes"] / 2**30, 2)
        counts.update(source_tokens(chunks))
        counts["parent"] = "base model" if parent["kind"] == "base" else f"promoted {parent['digest'][:16]}"
        return counts, {"device": metrics["device"], "dtype": metrics["dtype"], "optim": metrics["optim"],
                        "model_dir": "model", "tensorboard": "tensorboard",
                        "model_digest": model_digest(tmp / "model"),
                        "parent": without_location(parent)}

    out = publish(artifacts, "train", key, build)
    # The model is in the published output; checkpoints only served a resume of this key.
    shutil.rmtree(work, ignore_errors=True)
    out_dir = out.dir(artifacts)
    c = out.counts
    log.info("train: %s steps from the %s, loss %s → %s, best validation loss %s; TensorBoard logs in %s",
             c["global_step"], c["parent"], _num(c["first_loss"]), _num(c["last_loss"]), _num(c["best_eval_loss"]),
             out_dir / "tensorboard")
    if c.get("replay_trained_tokens"):
        log.info("train: %d domain + %d replay trained tokens (replay share %.4f)", c["domain_trained_tokens"],
                 c["replay_trained_tokens"], c["replay_share"])
    return out


def _num(x: Any) -> str:
    """A loss for a log line: NaN/inf/None (a diverged run) must not break the line."""
    return f"{x:.4f}" if isinstance(x, (int, float)) else str(x)


def show(out: StageOutput, artifacts: str) -> None:
    out_dir = out.dir(artifacts)
    rows = [{"metric": k, "value": v} for k, v in out.counts.items()]
    table_artifact(rows, "train-metrics", "Training metrics")
    markdown_artifact(
        f"# Loss curve\n\n![loss curve]({png_data_uri(out_dir / 'loss_curve.png')})\n\n{markdown_table(rows)}\n\n"
        f"TensorBoard: `tensorboard --logdir {out_dir / 'tensorboard'}`\n",
        "train-loss-curve", "Training and validation loss",
    )
