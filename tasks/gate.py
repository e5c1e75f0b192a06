"""gate: the promotion decision between evaluate and push. The new model is compared, on the same validation
chunks, with the reference — the lineage's last promoted model, or the base model when there is none — and,
when a general corpus is set, with the base model's general-text perplexity (forgetting). A model that fails
is not pushed; a diverged one (a loss or perplexity that is NaN, infinite or missing) is refused, never a crash.
"""

from __future__ import annotations

import json
import logging
import math
from typing import TYPE_CHECKING, Any, Literal

from tasks.core.config import GateConfig
from tasks.core.manifest import StageOutput
from tasks.core.report import markdown_artifact, markdown_table
from tasks.core.root import ArtifactsRoot
from tasks.core.stage import Build, stage

if TYPE_CHECKING:
    from tasks.evaluate import Evaluation
    from tasks.train import Trained

GATE_FILE = "gate.json"


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def decide(cfg: GateConfig, new: dict[str, Any], reference: dict[str, Any], base: dict[str, Any],
           training: dict[str, Any], reference_name: str) -> dict[str, Any]:
    """The decision as {promoted, reason, checks}. `new`, `reference`, `base`: {validation, general} perplexities
    (general may be None); `training`: the train stage's losses."""
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, value: Any, limit: Any, why: str) -> None:
        checks.append({"check": name, "passed": ok, "value": value, "limit": limit, "why": why})

    losses = {k: training.get(k) for k in ("train_loss", "last_loss", "best_eval_loss") if k in training}
    bad = [k for k, v in losses.items() if v is not None and not finite(v)]
    if "train_loss" in losses and losses["train_loss"] is None:
        bad.append("train_loss")
    if not finite(new.get("validation")):
        bad.append("validation perplexity")
    if new.get("general") is not None and not finite(new["general"]):
        bad.append("general perplexity")
    check("finite", not bad, ", ".join(bad) or "all finite", "finite", "a diverged model is never promoted")
    if bad:
        return {"promoted": False, "reason": f"diverged: {', '.join(bad)} not finite", "checks": checks}

    ref = reference.get("validation")
    limit = ref * (1 + cfg.max_validation_increase) if finite(ref) else math.inf
    check("validation perplexity", new["validation"] <= limit, new["validation"], limit,
          f"at most {reference_name}'s {ref if ref is None else round(ref, 4)} "
          f"+ {cfg.max_validation_increase:.0%}")
    if base.get("general") is not None and new.get("general") is not None:
        glimit = base["general"] * (1 + cfg.max_general_increase)
        check("general perplexity", new["general"] <= glimit, new["general"], glimit,
              f"at most the base model's {base['general']:.4g} + {cfg.max_general_increase:.0%}")
    failed = [c for c in checks if not c["passed"]]
    if failed:
        reason = "; ".join(f"{c['check']} {c['value']:.4g} > {c['limit']:.4g} ({c['why']})" for c in failed)
        return {"promoted": False, "reason": f"worse: {reason}", "checks": checks}
    change = (new["validation"] - ref) / ref if finite(ref) and ref else None
    return {"promoted": True, "checks": checks,
            "reason": f"validation perplexity {new['validation']:.4g} vs {reference_name} {ref:.4g}"
                      + (f" ({change:+.1%})" if change is not None else "")}


def perplexities(eval_doc: dict[str, Any]) -> dict[str, Any]:
    """{validation, general} from an evaluate-base eval.json ({"validation": {"perplexity"}, "general": ...})."""
    return {k: (eval_doc.get(k) or {}).get("perplexity") for k in ("validation", "general")}


class Decision(StageOutput):
    """gate's output: `gate.json`, the decision (promoted, reason, every check with its value and limit)."""

    def read(self, root: ArtifactsRoot) -> dict[str, Any]:
        return json.loads((self.dir(root) / GATE_FILE).read_text())

    @property
    def promoted(self) -> bool:
        return bool(self.counts["promoted"])

    def summary(self, root: ArtifactsRoot) -> list[tuple[int, str]]:
        if self.promoted:
            return [(logging.INFO, f"promoted: {self.counts['reason']}")]
        return [(logging.WARNING, f"refused, not pushed: {self.counts['reason']}")]


@stage("gate", version=1, output=Decision)
def gate(build: Build, gate: GateConfig, evaluation: Evaluation, reference_eval: Evaluation, base_eval: Evaluation,
         trained: Trained, reference_kind: Literal["base", "promoted"]):
    c = evaluation.counts
    new = {"validation": c.get("validation_perplexity_after"), "general": c.get("general_perplexity_after")}
    ref = perplexities(reference_eval.read(build.root))
    base = perplexities(base_eval.read(build.root))
    name = "the last promoted model" if reference_kind == "promoted" else "the base model"
    decision = decide(gate, new, ref, base, trained.counts, name)
    doc = {**decision, "reference": reference_kind, "new": new, "reference_perplexity": ref, "base_perplexity": base}
    (build.tmp / GATE_FILE).write_text(json.dumps(doc, indent=2, default=str))
    return {"promoted": decision["promoted"], "reason": decision["reason"], "reference": reference_kind,
            "validation_perplexity": new["validation"], "reference_validation_perplexity": ref["validation"],
            "general_perplexity": new["general"], "base_general_perplexity": base["general"]}, {}


def show(out: Decision, root: ArtifactsRoot) -> None:
    """The decision as a Prefect artifact, every run (a cached gate does not re-create its artifact)."""
    doc = out.read(root)
    verdict = "promoted" if doc["promoted"] else "refused"
    rows = [{"check": c["check"], "passed": c["passed"], "value": c["value"], "limit": c["limit"], "rule": c["why"]}
            for c in doc["checks"]]
    markdown_artifact(f"# Promotion gate: {verdict}\n\n{doc['reason']}\n\nReference: {doc['reference']} model.\n\n"
                      f"{markdown_table(rows)}\n", "gate", "Whether this run's model is pushed, and why")
