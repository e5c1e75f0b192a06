"""evaluate-base and evaluate: perplexity on the validation chunks (labels honoured: overlap context is not
scored), optional perplexity on a general corpus (forgetting), seeded generations and lm-evaluation-harness
tasks (evaluate.tasks: the numbers others report, with their standard errors), before and after.

The base model's evaluation is its own cached stage keyed by the base model, the evaluation data and the
evaluation settings, so changing `train.*` re-evaluates only the trained model.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core.config.base import ConfigError
from tasks.core.config.data import ChunkConfig, CorpusConfig
from tasks.core.config.model import EvaluateConfig, ModelConfig
from tasks.core.config.task_files import local_task_data, local_task_files, task_path_like
from tasks.core.manifest import Fingerprint, NoMeta, StageOutput, combine_digests, hash_file
from tasks.core.report import markdown_artifact, markdown_table, table_artifact
from tasks.core.root import ArtifactsRoot
from tasks.core.stage import Build, stage

if TYPE_CHECKING:
    from tasks.chunk import Chunks
    from tasks.data.windows import WindowPlan
    from tasks.train import Trained

EVAL_FILE = "eval.json"


# ------------------------------------------------------------------------------------ pure functions


def validation_rows(chunks: Chunks, root: ArtifactsRoot, limit: int | None) -> list[dict[str, Any]]:
    """The first `limit` validation chunks with their labels (derived: the chunks store where training starts)."""
    return chunks.labelled(root, "validation", limit).to_pylist()


def general_rows(paths: list[str], tokenizer_dir: str, plan: WindowPlan, limit: int | None) -> list[dict]:
    """The general corpus read, tokenized and chunked exactly like the training data (the chunk output's own window
    plan; in memory: it is small)."""
    import pyarrow as pa

    from tasks.data.arrow import token_type, with_labels
    from tasks.data.windows import chunk_batch
    from tasks.data.files import resolve_corpus_files
    from tasks.data.readers import read_corpus_file
    from tasks.data.records import Record
    from tasks.tokenize import encode_batch, load_tokenizer, special_tokens

    cfg = CorpusConfig(paths=paths, on_bad_record="skip")
    texts = [r.text for f in resolve_corpus_files(cfg) for r in read_corpus_file(f, cfg)
             if isinstance(r, Record) and r.text.strip()]
    tok = load_tokenizer(tokenizer_dir)
    sp = special_tokens(tok)
    ids = encode_batch(tok, texts, sp["eos_id"], ids_type=token_type(sp["id_limit"]))
    rows = chunk_batch(pa.array([str(i) for i in range(len(texts))]), ids, plan, sp["bos_id"])
    out = with_labels(rows).to_pylist()
    return out[:limit] if limit is not None else out


def evaluate_model(location: str, model_cfg: ModelConfig, cfg: EvaluateConfig, val: list[dict],
                   general: list[dict] | None, sources: dict[str, list[dict] | None] | None = None) -> dict[str, Any]:
    """Perplexities, generations and tasks of the model at `location`. `sources`: each training source's validation
    rows (None: the rows of `val`, the first source's, measured once)."""
    from tasks.ml.modeling import cpu_threads, generate, load_model, load_tokenizer_with_pad, perplexity, release

    tok = load_tokenizer_with_pad(location, model_cfg.trust_remote_code)
    model = load_model(location, model_cfg)
    try:
        with cpu_threads(model_cfg.cpu_threads):  # a tiny model runs faster on one thread (model.cpu_threads)
            result = {
                "validation": perplexity(model, val, cfg.batch_size, tok.pad_token_id),
                "general": perplexity(model, general, cfg.batch_size, tok.pad_token_id) if general else None,
                "generations": generate(model, tok, cfg.prompts, cfg.generation) if cfg.prompts else [],
            }
            if sources:
                result["sources"] = {name: result["validation"] if rows is None else
                                     perplexity(model, rows, cfg.batch_size, tok.pad_token_id)
                                     for name, rows in sources.items()}
            if cfg.tasks:
                started = time.perf_counter()
                result["tasks"] = run_tasks(model, tok, cfg)
                result["task_seconds"] = round(time.perf_counter() - started, 3)
    finally:
        release(model)
    return result


# ------------------------------------------------------------------------ lm-evaluation-harness tasks


def task_fingerprint(cfg: EvaluateConfig) -> Fingerprint | None:
    """What the task results depend on besides the model and the settings: the local task YAMLs and the data
    files they read (by content), the harness's version (its registry tasks and their prompts) and the revision
    of each dataset a registry task reads (tasks.ml.lm_tasks.registry_revisions)."""
    if not cfg.tasks:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        harness = version("lm-eval")
    except PackageNotFoundError:
        raise ConfigError("evaluate.tasks: lm-evaluation-harness is not installed (pip install lm-eval==0.4.13)") from None
    parts = [("lm-eval", harness)]
    for entry in cfg.tasks:
        if task_path_like(entry):
            for y in local_task_files(Path(entry).expanduser()):
                parts.append((f"{entry}:{y.name}", hash_file(y)))
                parts += [(f"{entry}:{y.name}:data:{d}", hash_file(d)) for d in local_task_data(y)]
    registry = [entry for entry in cfg.tasks if not task_path_like(entry)]
    if registry:
        from tasks.ml.lm_tasks import registry_revisions

        parts += [(f"dataset:{name}", revision) for name, revision in registry_revisions(registry)]
    return Fingerprint(kind="tasks", digest=combine_digests(parts), location=",".join(cfg.tasks))


def run_tasks(model, tok, cfg: EvaluateConfig) -> dict[str, Any]:
    """evaluate.tasks on the loaded `model` (no second load): {task: {"metrics": {metric: {value, stderr}},
    "examples": n, "num_fewshot": k}}, plus the harness version under "_harness"."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from tasks.ml.lm_tasks import configured_tasks

    # lm-eval sees the registry and the configured task files alone, from a private folder (tasks/ml/lm_tasks.py).
    with configured_tasks(cfg.tasks) as (manager, names):
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=cfg.task_batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=cfg.task_limit,
                                      num_fewshot=cfg.num_fewshot, log_samples=False, random_seed=0,
                                      numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    return task_results(out)


def task_results(out: dict[str, Any]) -> dict[str, Any]:
    """simple_evaluate's results as {task: {metrics: {metric: {value, stderr}}, examples, num_fewshot}}; a metric
    is named as lm-eval names it less a `none` filter (`acc`, `exact_match,strict-match`)."""
    tasks: dict[str, Any] = {}
    for task, res in out["results"].items():
        metrics: dict[str, Any] = {}
        for key, value in res.items():
            if "," not in key or "_stderr," in key:
                continue
            name, filt = key.split(",", 1)
            stderr = res.get(f"{name}_stderr,{filt}")
            metrics[name if filt == "none" else key] = {
                "value": _number(value), "stderr": _number(stderr)}
        samples = (out.get("n-samples") or {}).get(task) or {}
        tasks[task] = {"metrics": metrics, "examples": samples.get("effective"),
                       "num_fewshot": (out.get("n-shot") or {}).get(task)}
    return tasks


def _number(x: Any) -> float | None:
    """lm-eval writes "N/A" for an unknown stderr; JSON has no NaN: a non-number is None."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def task_comparison(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    """{task: {metric: {before, after, stderr_before, stderr_after, examples}}}, before = the base model."""
    before, after = before or {}, after or {}
    doc: dict[str, Any] = {}
    for task in sorted(set(before) | set(after)):
        b, a = before.get(task) or {}, after.get(task) or {}
        metrics = {}
        for m in sorted(set(b.get("metrics", {})) | set(a.get("metrics", {}))):
            bm, am = b.get("metrics", {}).get(m) or {}, a.get("metrics", {}).get(m) or {}
            metrics[m] = {"before": bm.get("value"), "after": am.get("value"), "stderr_before": bm.get("stderr"),
                          "stderr_after": am.get("stderr"), "examples": a.get("examples", b.get("examples"))}
        doc[task] = metrics
    return doc


def task_rows(tasks: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task and metric: before, after ± stderr, change, examples (the tables and the card)."""
    def fmt(v, se=None):
        if v is None:
            return "missing"
        return f"{v:.4f}" + (f" ± {se:.4f}" if se is not None else "")

    rows = []
    for task, metrics in tasks.items():
        for m, v in metrics.items():
            change = (f"{v['after'] - v['before']:+.4f}" if v["after"] is not None and v["before"] is not None
                      else "")
            rows.append({"task": task, "metric": m, "before": fmt(v["before"], v.get("stderr_before")),
                         "after": fmt(v["after"], v.get("stderr_after")), "change": change,
                         "examples": v.get("examples")})
    return rows


# --------------------------------------------------------------- a local multiple-choice task from text


def cloze_items(texts: list[str], n: int | None = None, choices: int = 4, seed: int = 0) -> list[dict[str, Any]]:
    """A cloze multiple-choice set from documents: the context is a document's first sentence, the choices its
    own second sentence and second sentences of `choices - 1` other documents (shuffled, seeded); a model that
    knows the domain's text prefers the document's own continuation."""
    split = []
    for t in texts:
        parts = [p.strip() for p in t.replace("\n", " ").split(". ") if p.strip()]
        if len(parts) >= 2:
            split.append((parts[0] + ".", parts[1].rstrip(".") + "."))
    rng = random.Random(seed)
    items = []
    for i, (context, own) in enumerate(split):
        pool = [c for j, (_, c) in enumerate(split) if j != i and c != own]
        if len(set(pool)) < choices - 1:
            continue
        options = [own, *rng.sample(sorted(set(pool)), choices - 1)]
        rng.shuffle(options)
        items.append({"context": context, "choices": options, "label": options.index(own)})
        if n is not None and len(items) >= n:
            break
    return items


CLOZE_YAML = """# A cloze multiple-choice task cpt wrote from its own text ({source}); lm-eval reads the JSON lines below.
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_cloze_task(texts: list[str], folder: Path, name: str, data_path: str | None = None,
                     n: int | None = None, seed: int = 0, source: str = "text") -> Path:
    """`folder/<name>.yaml` + `folder/<name>.jsonl`: the cloze task as lm-eval reads it. `data_path` is how the
    YAML names the JSONL (lm-eval resolves it against the working directory; default: its absolute path)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in cloze_items(texts, n, seed=seed)),
                    encoding="utf-8")
    yaml_file = folder / f"{name}.yaml"
    yaml_file.write_text(CLOZE_YAML.format(name=name, data=data_path or str(data.resolve()), source=source),
                         encoding="utf-8")
    return yaml_file


def relative_change(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or before == 0:
        return None
    return (after - before) / before


def comparison(before: dict[str, Any], after: dict[str, Any], prompts: list[str]) -> dict[str, Any]:
    """The eval.json document: perplexity before/after and prompt | before | after."""
    def pair(name):
        if before.get(name) is None or after.get(name) is None:
            return None
        b, a = before[name]["perplexity"], after[name]["perplexity"]
        return {"before": b, "after": a, "relative_change": relative_change(b, a),
                "tokens": after[name]["tokens"]}

    def source_pair(name):
        b, a = (before.get("sources") or {}).get(name), after["sources"][name]
        return None if b is None else {"before": b["perplexity"], "after": a["perplexity"],
                                       "relative_change": relative_change(b["perplexity"], a["perplexity"]),
                                       "tokens": a["tokens"]}

    doc = {
        "perplexity": {"validation": pair("validation"), "general": pair("general")},
        "generations": [{"prompt": p, "before": b, "after": a}
                        for p, b, a in zip(prompts, before["generations"], after["generations"])],
    }
    if after.get("sources"):  # each training source's validation set
        doc["sources"] = {name: source_pair(name) for name in after["sources"]}
    if "tasks" in after or "tasks" in before:
        doc["tasks"] = task_comparison(before.get("tasks"), after.get("tasks"))
        doc["task_seconds"] = after.get("task_seconds")
    return doc


def perplexity_pairs(doc: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """Every before/after perplexity of an eval.json: validation, general, then one per source (`source <name>`)."""
    return {**doc["perplexity"], **{f"source {k}": v for k, v in (doc.get("sources") or {}).items()}}


def comparison_markdown(doc: dict[str, Any]) -> str:
    rows = []
    for name, v in perplexity_pairs(doc).items():
        if v is not None:
            change = f"{v['relative_change']:+.1%}" if v["relative_change"] is not None else ""
            rows.append({"metric": f"perplexity ({name})", "before": round(v["before"], 3),
                         "after": round(v["after"], 3), "change": change})
    md = "# Before / after\n\n" + markdown_table(rows) + "\n"
    if doc.get("tasks"):
        md += ("\n## Tasks (lm-evaluation-harness; value ± standard error)\n\n"
               + markdown_table(task_rows(doc["tasks"])) + "\n")
    if doc["generations"]:
        gens = [{"prompt": g["prompt"].replace("\n", " "), "before": g["before"].replace("\n", " "),
                 "after": g["after"].replace("\n", " ")} for g in doc["generations"]]
        md += "\n## Generations\n\n" + markdown_table(gens) + "\n"
    return md


# --------------------------------------------------------------------------------------- the tasks


def _inputs(cfg: EvaluateConfig, chunk: ChunkConfig, chunks: Chunks, root: ArtifactsRoot, tokenizer_dir: str,
            sources: dict[str, Chunks] | None = None):
    val = validation_rows(chunks, root, cfg.max_eval_rows)
    general = (general_rows(cfg.general_corpus, tokenizer_dir, chunks.plan(), cfg.max_eval_rows)
               if cfg.general_corpus else None)
    # Each source's own validation rows; the first source's are `val` (None: measured once).
    per_source = {name: None if c.key == chunks.key else validation_rows(c, root, cfg.max_eval_rows)
                  for name, c in (sources or {}).items()}
    return val, general, per_source


def _source_counts(result: dict[str, Any]) -> dict[str, Any]:
    return {"sources": {k: v["perplexity"] for k, v in result["sources"].items()}} if result.get("sources") else {}


class Evaluation(StageOutput):
    """evaluate-base's and evaluate's output: `eval.json` (perplexities and generations; evaluate's holds both
    before and after) and, for evaluate, `eval.md`, the before/after table."""

    meta: NoMeta = NoMeta()

    def eval_file(self, root: ArtifactsRoot) -> Path:
        return self.dir(root) / EVAL_FILE

    def read(self, root: ArtifactsRoot) -> dict[str, Any]:
        return json.loads(self.eval_file(root).read_text())

    def markdown(self, root: ArtifactsRoot) -> str:
        return (self.dir(root) / "eval.md").read_text(encoding="utf-8")

    def links(self, root: ArtifactsRoot) -> dict[str, str]:
        md = self.dir(root) / "eval.md"
        return {"eval table": str(md)} if md.is_file() else {}

    def summary(self, root: ArtifactsRoot) -> list[tuple[int, str]]:
        c = self.counts
        if "validation_perplexity" in c:
            return [(logging.INFO, f"validation perplexity {_num(c['validation_perplexity'])}")]
        change = c["validation_relative_change"]
        change = f"{change:+.1%}" if isinstance(change, float) and math.isfinite(change) else change
        lines = [(logging.INFO, f"validation perplexity {_num(c['validation_perplexity_before'])} → "
                                f"{_num(c['validation_perplexity_after'])} ({change})")]
        if c.get("sources"):
            lines.append((logging.INFO, "per source: " + "; ".join(
                f"{name} {_num((v or {}).get('before'))} → {_num((v or {}).get('after'))}"
                for name, v in c["sources"].items())))
        return lines

    def show(self, root: ArtifactsRoot) -> None:
        if self.stage == "evaluate":  # the before/after table; a reference's own numbers are in the gate's
            show(self, root)  # the module's `show` below: its tables and plots


def _task_counts(result: dict[str, Any]) -> dict[str, Any]:
    """The task numbers in a stage's counts (the run summary carries them): {task/metric: value} and seconds."""
    if "tasks" not in result:
        return {}
    values = {f"{t}/{m}": v["value"] for t, r in result["tasks"].items() for m, v in r["metrics"].items()}
    examples = {t: r.get("examples") for t, r in result["tasks"].items()}
    return {"tasks": values, "task_examples": examples, "task_seconds": result["task_seconds"]}


# `task_files` is the content of the local task files and the harness version (task_fingerprint): in the key,
# so editing a task YAML or its data re-evaluates; None when evaluate.tasks is empty.
@stage("evaluate-base", version=2, output=Evaluation, libraries=["transformers", "torch", "datasets"])
def evaluate_base(build: Build, evaluate: EvaluateConfig, model: ModelConfig, base_model: Fingerprint,
                  chunk: ChunkConfig, chunks: Chunks, general_corpus: Fingerprint | None,
                  task_files: Fingerprint | None = None, sources: dict[str, Chunks] | None = None):
    """`sources`: every training source with a validation set, by name (the first source's chunks are `chunks`)."""
    val, general, per_source = _inputs(evaluate, chunk, chunks, build.root, base_model.location, sources)
    result = evaluate_model(base_model.location, model, evaluate, val, general, per_source)
    (build.tmp / EVAL_FILE).write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return {"validation_perplexity": result["validation"]["perplexity"],
            "general_perplexity": (result["general"] or {}).get("perplexity"), **_source_counts(result),
            **_task_counts(result)}, {}


@stage("evaluate", version=2, output=Evaluation, libraries=["transformers", "torch", "datasets"])
def evaluate(build: Build, evaluate: EvaluateConfig, model: ModelConfig, trained: Trained, chunk: ChunkConfig,
             chunks: Chunks, general_corpus: Fingerprint | None, base_eval: Evaluation,
             task_files: Fingerprint | None = None, sources: dict[str, Chunks] | None = None):
    model_dir = str(trained.verified_model_dir(build.root))
    val, general, per_source = _inputs(evaluate, chunk, chunks, build.root, model_dir, sources)
    after = evaluate_model(model_dir, model, evaluate, val, general, per_source)
    doc = comparison(base_eval.read(build.root), after, evaluate.prompts)
    (build.tmp / EVAL_FILE).write_text(json.dumps(doc, indent=2, ensure_ascii=False))
    (build.tmp / "eval.md").write_text(comparison_markdown(doc))
    # train.report_to: the numbers and the table go to the training's tracker run too (never fatal).
    from tasks.core.tracking import log_evaluation

    log_evaluation(trained.key, doc, comparison_markdown(doc), evaluation_rows(doc), build.log)
    v = doc["perplexity"]["validation"]
    g = doc["perplexity"]["general"] or {}
    return {"validation_perplexity_before": v["before"], "validation_perplexity_after": v["after"],
            "validation_relative_change": v["relative_change"], "general_perplexity_before": g.get("before"),
            "general_perplexity_after": g.get("after"), **_task_counts(after),
            **({"sources": {k: v and {x: v[x] for x in ("before", "after", "relative_change")}
                            for k, v in doc["sources"].items()}} if doc.get("sources") else {})}, {}


def evaluation_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The before/after table as rows (metric, before, after, change): perplexities (each source's too), then task
    metrics."""
    rows = [{"metric": f"perplexity ({k})", "before": v["before"], "after": v["after"],
             "change": v["relative_change"]} for k, v in perplexity_pairs(doc).items() if v]
    for task, metrics in (doc.get("tasks") or {}).items():
        rows += [{"metric": f"{task}/{m}", "before": v["before"], "after": v["after"],
                  "change": None if v["after"] is None or v["before"] is None else v["after"] - v["before"]}
                 for m, v in metrics.items()]
    return rows


def _num(x: Any) -> str:
    """A perplexity for a log line: NaN/inf/None (a diverged model) must not break the line."""
    return f"{x:.3f}" if isinstance(x, (int, float)) else str(x)


def show(out: Evaluation, root: ArtifactsRoot) -> None:
    if out.stage != "evaluate":  # evaluate-base's eval.json is one model's numbers: the before/after is evaluate's
        return
    doc = out.read(root)
    if "validation_perplexity" in out.counts:  # one model's evaluation (the base's): there is no before/after yet
        ppl = {k: (doc.get(k) or {}).get("perplexity") for k in ("validation", "general")}
        gens = [{"generation": str(g).replace("\n", " ")} for g in doc.get("generations", [])]
        markdown_artifact(f"# The base model, before training\n\n"
                          f"{markdown_table([{'perplexity': k, 'value': v} for k, v in ppl.items() if v is not None])}"
                          + (f"\n\n## Generations\n\n{markdown_table(gens)}\n" if gens else "\n"),
                          "eval-base", "The base model's perplexity and generations, before training")
        return
    markdown_artifact(out.markdown(root), "eval-before-after", "Perplexity and generations, before/after")
    table_artifact([{"metric": f"perplexity ({k})", **v} for k, v in perplexity_pairs(doc).items() if v],
                   "eval-perplexity", "Perplexity before and after training (each training source's too)")
    if doc.get("tasks"):
        table_artifact(task_rows(doc["tasks"]), "eval-tasks",
                       "lm-evaluation-harness tasks before and after training (value ± standard error)")
