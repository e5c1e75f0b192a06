"""train.report_to (infrastructure: what a run is reported to shapes no output, so no code version counts this module): the experiment trackers a team already uses (TensorBoard, MLflow, Weights & Biases, Trackio).

The training child logs through transformers' own callbacks (report_to), its run named after the Prefect flow
run and tagged with the line, the drop, the train key and the flow run's URL (`TrackerRun`, built by the train
stage). Evaluate's numbers and the gate's decision are added to the same run from the flow's process
(`log_evaluation`, `log_gate`): MLflow's run is found by its `cpt.train_key` tag, W&B's id is derived from the
train key, Trackio's run is the one named after the flow run.

Every setting and credential comes from the environment, as each library reads it (MLFLOW_TRACKING_URI,
MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN, MLFLOW_EXPERIMENT_NAME; WANDB_API_KEY, WANDB_MODE, WANDB_PROJECT,
WANDB_DIR; TRACKIO_PROJECT, HF_TOKEN): none is in a config, a spec, a tag or a log line. The libraries are imported
only here and in the child, only when named in report_to. TensorBoard's logs are always in the train entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_PROJECT = "cpt"
EXTERNAL = ("mlflow", "wandb", "trackio")


class TrackerRun(BaseModel):
    """Who the training's run is: its name and tags (what the train stage knows of the flow run)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="The Prefect flow run's name.")
    train_key: str
    tags: dict[str, str] = Field(default_factory=dict, description="line, drop, train key, Prefect URL, ...")


def current_flow_run() -> dict[str, Any]:
    """What prefect.runtime knows of the run this code is in: name, URL, line, drop (the parent retrain run's
    `drop` parameter, when there is one), and the config's train.report_to. Empty outside a flow run."""
    try:
        from prefect.runtime import flow_run
    except ImportError:  # pragma: no cover
        return {}
    if not flow_run.id:
        return {}
    params = dict(flow_run.parameters or {})
    out = {"name": flow_run.name, "id": str(flow_run.id), "url": flow_run.ui_url, "line": params.get("line"),
           "drop": params.get("drop"), "report_to": _report_to(params.get("config"))}
    if out["drop"] is None and flow_run.parent_flow_run_id:
        out["drop"] = _parent_parameter("drop")
    return out


def _report_to(config: Any) -> list[str] | None:
    if config is None:
        return None
    train = config.get("train") if isinstance(config, dict) else getattr(config, "train", None)
    if train is None:
        return None
    return list(train.get("report_to", []) if isinstance(train, dict) else train.report_to)


def _parent_parameter(name: str) -> Any:
    """A parameter of the flow run that started this one (retrain → continued-pretraining), or None."""
    try:
        from prefect.client.orchestration import get_client
        from prefect.runtime import flow_run

        parent_id = flow_run.parent_flow_run_id
        if not parent_id:
            return None
        with get_client(sync_client=True) as client:
            return (client.read_flow_run(parent_id).parameters or {}).get(name)
    except Exception:  # noqa: BLE001  (a tag, never a reason to fail a training)
        return None


def tracker_run(train_key: str, flow: dict[str, Any] | None = None) -> TrackerRun:
    flow = current_flow_run() if flow is None else flow
    tags = {"cpt.train_key": train_key}
    for k in ("line", "drop", "url", "id"):
        if flow.get(k):
            tags[f"cpt.{'prefect_url' if k == 'url' else 'flow_run_id' if k == 'id' else k}"] = str(flow[k])
    return TrackerRun(name=flow.get("name") or train_key, train_key=train_key, tags=tags)


def wandb_run_id(train_key: str) -> str:
    """W&B's run id of a training: derived from its key, so evaluate and the gate reach the same run."""
    return "cpt-" + hashlib.sha256(train_key.encode()).hexdigest()[:16]


def project() -> str:
    return os.environ.get("CPT_TRACKER_PROJECT", DEFAULT_PROJECT)


def child_environment(report_to: list[str], run: TrackerRun | None) -> dict[str, str]:
    """Environment variables the child sets before transformers' callbacks read them (names and tags only)."""
    env: dict[str, str] = {}
    if run is None:
        return env
    if "mlflow" in report_to:
        env["MLFLOW_TAGS"] = json.dumps(run.tags)
        env.setdefault("MLFLOW_EXPERIMENT_NAME", os.environ.get("MLFLOW_EXPERIMENT_NAME", project()))
    if "wandb" in report_to:
        env["WANDB_RUN_ID"] = wandb_run_id(run.train_key)
        env["WANDB_RESUME"] = "allow"  # a resumed attempt continues the run
        env["WANDB_PROJECT"] = os.environ.get("WANDB_PROJECT", project())
        # W&B's tags are plain strings: key=value
        env["WANDB_TAGS"] = ",".join(f"{k.removeprefix('cpt.')}={v}"[:64] for k, v in run.tags.items())
    if "trackio" in report_to:
        env["TRACKIO_PROJECT"] = os.environ.get("TRACKIO_PROJECT", project())
    return env


# ------------------------------------------------------------------------- from the flow's process


def _targets(report_to: list[str] | None) -> list[str]:
    if report_to is None:
        report_to = (current_flow_run().get("report_to") or [])
    return [t for t in report_to if t in EXTERNAL]


def _mlflow_run(client, train_key: str):
    experiment = client.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME", project()))
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`cpt.train_key` = '{train_key}'",
                              max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def log_to_runs(train_key: str, metrics: dict[str, float], texts: dict[str, str], tables: dict[str, list[dict]],
                tags: dict[str, str], report_to: list[str] | None = None, log=None) -> list[str]:
    """Add numbers, files, tables and tags to the training's run in every tracker of report_to (default: the
    flow run's config); returns the trackers written to. A tracker that fails is logged, never fatal: the
    evaluation and the gate's decision are already in the artifacts."""
    done = []
    for tracker in _targets(report_to):
        try:
            {"mlflow": _to_mlflow, "wandb": _to_wandb, "trackio": _to_trackio}[tracker](
                train_key, metrics, texts, tables, tags)
            done.append(tracker)
        except Exception as e:  # noqa: BLE001
            if log is not None:
                log.warning("report_to: could not log to %s (%s)", tracker, type(e).__name__)
    return done


def _to_mlflow(train_key, metrics, texts, tables, tags) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()  # MLFLOW_TRACKING_URI and credentials from the environment
    run = _mlflow_run(client, train_key)
    if run is None:
        raise LookupError(f"no MLflow run tagged cpt.train_key={train_key}")
    run_id = run.info.run_id
    for k, v in metrics.items():
        client.log_metric(run_id, k, v)
    for name, text in texts.items():
        client.log_text(run_id, text, name)
    for name, rows in tables.items():
        client.log_table(run_id, {k: [r.get(k) for r in rows] for k in (rows[0] if rows else {})}, name)
    for k, v in tags.items():
        client.set_tag(run_id, k, v)


def _to_wandb(train_key, metrics, texts, tables, tags) -> None:
    import wandb

    run = wandb.init(id=wandb_run_id(train_key), resume="allow", project=os.environ.get("WANDB_PROJECT", project()),
                     reinit="create_new")
    try:
        run.log({**metrics, **{name: wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
                               for name, rows in tables.items() if rows}})
        for k, v in {**tags, **{n: t for n, t in texts.items() if len(t) < 4096}}.items():
            run.summary[k] = v
    finally:
        run.finish()


def _to_trackio(train_key, metrics, texts, tables, tags) -> None:
    import trackio

    name = current_flow_run().get("name") or train_key
    trackio.init(project=os.environ.get("TRACKIO_PROJECT", project()), name=name, resume="allow")
    try:
        trackio.log({**metrics, **{f"tag/{k}": v for k, v in tags.items()}})
    finally:
        trackio.finish()


def log_evaluation(train_key: str, doc: dict[str, Any], markdown: str, rows: list[dict], log=None,
                   report_to: list[str] | None = None) -> list[str]:
    """evaluate's numbers (perplexity before/after, task metrics) and its table, into the training's run."""
    metrics = {}
    for name, v in (doc.get("perplexity") or {}).items():
        if v:
            metrics.update({f"eval/{name}_perplexity_before": v["before"], f"eval/{name}_perplexity_after": v["after"]})
    for task, ms in (doc.get("tasks") or {}).items():
        for metric, v in ms.items():
            if v.get("after") is not None:
                metrics[f"eval/{task}/{metric}"] = v["after"]
    metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    return log_to_runs(train_key, metrics, {"eval.md": markdown, "eval.json": json.dumps(doc, indent=1)},
                       {"eval_table.json": rows}, {}, report_to, log)


def log_gate(train_key: str, decision: dict[str, Any], log=None, report_to: list[str] | None = None) -> list[str]:
    """The gate's decision (promoted or refused, why, every check) into the training's run."""
    return log_to_runs(train_key, {"gate/promoted": float(bool(decision["promoted"]))},
                       {"gate.json": json.dumps(decision, indent=1, default=str)},
                       {}, {"cpt.gate": "promoted" if decision["promoted"] else "refused",
                            "cpt.gate_reason": str(decision["reason"])[:500]}, report_to, log)
