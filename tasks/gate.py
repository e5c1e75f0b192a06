"""gate: the promotion decision between evaluate and push. The new model is compared, on the same validation
chunks, with the reference — the lineage's last promoted model, or the base model when there is none — and,
when a general corpus is set, with the base model's general-text perplexity (forgetting). Only a model strictly
better than its reference is promoted (a tie is refused) unless `gate.max_validation_increase` explicitly accepts a
worse one, and — `gate.tasks` — only one whose downstream task metrics (lm-evaluation-harness, evaluate.tasks) fall
at most `max_drop` below the reference's: perplexity can fall while the model gets worse at the job. A model that fails is not pushed; a diverged one (a loss or perplexity that is NaN, infinite or missing)
is refused, never a crash, and so is one whose reference perplexity is missing or not finite.
"""

from __future__ import annotations

import json
import logging
import math
from typing import TYPE_CHECKING, Any, Literal

from tasks.core.config.model import GateConfig
from tasks.core.manifest import NoMeta, StageOutput
from tasks.core.report import markdown_artifact, markdown_table
from tasks.core.root import ArtifactsRoot
from tasks.core.stage import Build, stage

if TYPE_CHECKING:
    from tasks.evaluate import Evaluation
    from tasks.train import Trained

GATE_FILE = "gate.json"


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _shown(x: Any) -> str:
    return "missing" if x is None else str(x) if isinstance(x, (int, float)) else repr(x)


def _share(x: float) -> str:
    return f"{x * 100:.4g}%"


# A failed comparison, phrased as what the value was: the negation of the rule it had to meet.
_FAILED = {"<": ">=", "<=": ">", ">=": "<"}


def decide(cfg: GateConfig, new: dict[str, Any], reference: dict[str, Any], base: dict[str, Any],
           training: dict[str, Any], reference_name: str, general: bool | None = None,
           new_tasks: dict[str, dict[str, Any]] | None = None,
           reference_tasks: dict[str, dict[str, Any]] | None = None,
           sources: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The decision as {promoted, reason, checks}. `new`, `reference`, `base`: {validation, general} perplexities
    (general may be None); `training`: the train stage's losses. `general`: whether this run measures general-text
    perplexity (evaluate.general_corpus); None: when the new model's or the base model's general perplexity is
    given, so a NaN that came back from JSON as null never reads as "no general corpus".

    Promoted only when every number is finite, the references are measured (a missing or non-finite reference
    refuses: there is nothing to compare with), and the new model is strictly better than its reference —
    new < reference * (1 - min_improvement), a tie refused — or, with max_validation_increase > 0 (the user
    explicitly accepts a worse model; min_improvement is then 0), new <= reference * (1 + max_validation_increase).
    `new_tasks`, `reference_tasks`: {task: {metric: value}} for gate.tasks: new >= reference - max_drop, a missing
    or non-finite value on either side refusing, named. `sources`: {"new" | "reference" | "base": {source:
    perplexity}} for gate.sources: each source's limit a check of its own (`source_checks`).
    """
    if general is None:
        general = new.get("general") is not None or base.get("general") is not None
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, value: Any, limit: Any, why: str, op: str | None = None) -> None:
        checks.append({"check": name, "passed": ok, "value": value, "limit": limit, "why": why,
                       **({"op": op} if op else {})})

    losses = {k: training.get(k) for k in ("train_loss", "last_loss", "best_eval_loss") if k in training}
    bad = [k for k, v in losses.items() if v is not None and not finite(v)]
    if "train_loss" in losses and losses["train_loss"] is None:
        bad.append("train_loss")
    if not finite(new.get("validation")):
        bad.append("validation perplexity")
    if (general or new.get("general") is not None) and not finite(new.get("general")):
        bad.append("general perplexity")
    check("finite", not bad, ", ".join(bad) or "all finite", "finite", "a diverged model is never promoted")
    if bad:
        return {"promoted": False, "reason": f"diverged: {', '.join(bad)} not finite", "checks": checks}

    ref = reference.get("validation")
    unmeasured = [] if finite(ref) else [f"{reference_name}'s validation perplexity is {_shown(ref)}"]
    if general and not finite(base.get("general")):
        unmeasured.append(f"the base model's general perplexity is {_shown(base.get('general'))}")
    check("reference", not unmeasured, "; ".join(unmeasured) or "all finite", "finite",
          "a model is only compared with measured references")
    if unmeasured:
        return {"promoted": False, "reason": f"no reference: {'; '.join(unmeasured)}", "checks": checks}

    if cfg.max_validation_increase > 0:  # explicitly accepts a worse model (min_improvement is 0 then)
        limit = ref * (1 + cfg.max_validation_increase)
        check("validation perplexity", new["validation"] <= limit, new["validation"], limit,
              f"at most {reference_name}'s {ref:.4g} + {_share(cfg.max_validation_increase)}", "<=")
    else:  # strictly better: a tie is refused
        limit = ref * (1 - cfg.min_improvement)
        check("validation perplexity", new["validation"] < limit, new["validation"], limit,
              f"below {reference_name}'s {ref:.4g}"
              + (f" - {_share(cfg.min_improvement)}" if cfg.min_improvement else ""), "<")
    if general:
        glimit = base["general"] * (1 + cfg.max_general_increase)
        check("general perplexity", new["general"] <= glimit, new["general"], glimit,
              f"at most the base model's {base['general']:.4g} + {_share(cfg.max_general_increase)}", "<=")
    for t in cfg.tasks:
        v = ((new_tasks or {}).get(t.task) or {}).get(t.metric)
        r = ((reference_tasks or {}).get(t.task) or {}).get(t.metric)
        name, where = f"task {t.task} {t.metric}", {"task": t.task, "metric": t.metric}
        if not finite(v) or not finite(r):
            missing = [f"{who}'s is {_shown(x)}" for who, x in (("this model", v), (reference_name, r))
                       if not finite(x)]
            checks.append({"check": name, **where, "passed": False, "value": v, "limit": None,
                           "why": f"task {t.task!r} metric {t.metric!r} not measured: {', '.join(missing)}"})
            continue
        limit = r - t.max_drop
        checks.append({"check": name, **where, "passed": v >= limit, "value": v, "limit": limit, "op": ">=",
                       "why": f"at least {reference_name}'s {r:.4g}" + (f" - {t.max_drop:g}" if t.max_drop else "")})
    checks += source_checks(cfg, sources or {}, reference_name)
    failed = [c for c in checks if not c["passed"]]
    if failed:
        reason = "; ".join(f"{c['check']} {c['value']:.4g} {_FAILED[c['op']]} {c['limit']:.4g} ({c['why']})"
                           if "op" in c else c["why"] for c in failed)
        return {"promoted": False, "reason": f"worse: {reason}", "checks": checks}
    change = (new["validation"] - ref) / ref if ref else None
    return {"promoted": True, "checks": checks,
            "reason": f"validation perplexity {new['validation']:.4g} vs {reference_name} {ref:.4g}"
                      + (f" ({change:+.1%})" if change is not None else "")}


def source_checks(cfg: GateConfig, sources: dict[str, dict[str, Any]], reference_name: str) -> list[dict[str, Any]]:
    """One check per gate.sources limit: the source's validation perplexity strictly below its comparison model's
    (max_increase 0), or at most max_increase above it; a value missing or not finite on either side refuses."""
    out = []
    for limit in cfg.sources:
        against = reference_name if limit.against == "reference" else "the base model"
        v = (sources.get("new") or {}).get(limit.source)
        r = (sources.get(limit.against) or {}).get(limit.source)
        name, where = f"source {limit.source} perplexity", {"source": limit.source}
        if not finite(v) or not finite(r):
            missing = [f"{who}'s is {_shown(x)}" for who, x in (("this model", v), (against, r)) if not finite(x)]
            out.append({"check": name, **where, "passed": False, "value": v, "limit": None,
                        "why": f"source {limit.source!r} validation perplexity not measured: {', '.join(missing)}"})
        elif limit.max_increase > 0:
            bound = r * (1 + limit.max_increase)
            out.append({"check": name, **where, "passed": v <= bound, "value": v, "limit": bound, "op": "<=",
                        "why": f"at most {against}'s {r:.4g} + {_share(limit.max_increase)}"})
        else:
            out.append({"check": name, **where, "passed": v < r, "value": v, "limit": r, "op": "<",
                        "why": f"below {against}'s {r:.4g}"})
    return out


def source_perplexities(eval_doc: dict[str, Any]) -> dict[str, Any]:
    """{source: perplexity} of one model: an evaluate-base eval.json's, or the new model's from an evaluate one."""
    return {name: (v or {}).get("perplexity", (v or {}).get("after")) for name, v in (eval_doc.get("sources") or {}).items()}


def perplexities(eval_doc: dict[str, Any]) -> dict[str, Any]:
    """{validation, general} from an evaluate-base eval.json ({"validation": {"perplexity"}, "general": ...})."""
    return {k: (eval_doc.get(k) or {}).get("perplexity") for k in ("validation", "general")}


def task_values(eval_doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{task: {metric: value}} of one model: an evaluate-base eval.json's, or the new model's ("after") from an
    evaluate eval.json."""
    out: dict[str, dict[str, Any]] = {}
    for task, res in (eval_doc.get("tasks") or {}).items():
        if "metrics" in res:  # evaluate-base: one model
            out[task] = {m: v.get("value") for m, v in res["metrics"].items()}
        else:  # evaluate: before/after per metric
            out[task] = {m: v.get("after") for m, v in res.items()}
    return out


class Decision(StageOutput):
    """gate's output: `gate.json`, the decision (promoted, reason, every check with its value and limit)."""

    meta: NoMeta = NoMeta()

    def read(self, root: ArtifactsRoot) -> dict[str, Any]:
        return json.loads((self.dir(root) / GATE_FILE).read_text())

    @property
    def promoted(self) -> bool:
        return bool(self.counts["promoted"])

    def summary(self, root: ArtifactsRoot) -> list[tuple[int, str]]:
        if self.promoted:
            return [(logging.INFO, f"promoted: {self.counts['reason']}")]
        return [(logging.WARNING, f"refused, not pushed: {self.counts['reason']}")]

    def show(self, root: ArtifactsRoot) -> None:
        show(self, root)  # the module's `show` below: its tables and plots


@stage("gate", version=3, output=Decision)
def gate(build: Build, gate: GateConfig, evaluation: Evaluation, reference_eval: Evaluation, base_eval: Evaluation,
         trained: Trained, reference_kind: Literal["base", "promoted"]):
    c = evaluation.counts
    new = {"validation": c.get("validation_perplexity_after"), "general": c.get("general_perplexity_after")}
    ref = perplexities(reference_eval.read(build.root))
    base_doc = base_eval.read(build.root)
    base = perplexities(base_doc)
    name = "the last promoted model" if reference_kind == "promoted" else "the base model"
    # The base evaluation has a general section exactly when this run measures a general corpus.
    general = base_doc.get("general") is not None or new["general"] is not None
    new_doc, ref_doc = evaluation.read(build.root), reference_eval.read(build.root)
    new_tasks = task_values(new_doc) if gate.tasks else {}
    ref_tasks = task_values(ref_doc) if gate.tasks else {}
    sources = {"new": source_perplexities(new_doc), "reference": source_perplexities(ref_doc),
               "base": source_perplexities(base_doc)}
    decision = decide(gate, new, ref, base, trained.counts, name, general=general, new_tasks=new_tasks,
                      reference_tasks=ref_tasks, sources=sources)
    doc = {**decision, "reference": reference_kind, "new": new, "reference_perplexity": ref, "base_perplexity": base,
           **({"new_tasks": new_tasks, "reference_tasks": ref_tasks} if gate.tasks else {}),
           **({"source_perplexity": sources} if any(sources.values()) else {})}
    (build.tmp / GATE_FILE).write_text(json.dumps(doc, indent=2, default=str))
    from tasks.core.tracking import log_gate  # train.report_to: the decision joins the training's tracker run

    log_gate(trained.key, decision, build.log)
    checks = [{k: c.get(k) for k in ("check", "task", "metric", "source", "value", "limit", "passed") if k in c}
              for c in decision["checks"]]
    return {"promoted": decision["promoted"], "reason": decision["reason"], "reference": reference_kind,
            "validation_perplexity": new["validation"], "reference_validation_perplexity": ref["validation"],
            "general_perplexity": new["general"], "base_general_perplexity": base["general"], "checks": checks}, {}


def show(out: Decision, root: ArtifactsRoot, not_pushed: str | None = None) -> None:
    """The decision as a Prefect artifact, every run (a cached gate does not re-create its artifact); shown again
    as "promoted, not pushed: <why>" when the push of a promoted model failed."""
    doc = out.read(root)
    verdict = "promoted" if doc["promoted"] else "refused"
    if not_pushed:
        verdict = f"promoted, not pushed: {not_pushed}"
    rows = [{"check": c["check"], "passed": c["passed"], "value": c["value"], "limit": c["limit"], "rule": c["why"]}
            for c in doc["checks"]]
    markdown_artifact(f"# Promotion gate: {verdict}\n\n{doc['reason']}\n\nReference: {doc['reference']} model.\n\n"
                      f"{markdown_table(rows)}\n", "gate", "Whether this run's model is pushed, and why")
