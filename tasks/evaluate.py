"""evaluate-base and evaluate: perplexity on the validation chunks (labels honoured: overlap context is not
scored), optional perplexity on a general corpus (forgetting), and seeded generations, before and after.

The base model's evaluation is its own cached stage keyed by the base model, the evaluation data and the
evaluation settings, so changing `train.*` re-evaluates only the trained model.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core.config import ChunkConfig, CorpusConfig, EvaluateConfig, ModelConfig
from tasks.core.manifest import Fingerprint, StageOutput
from tasks.core.report import markdown_artifact, markdown_table, table_artifact
from tasks.core.root import ArtifactsRoot
from tasks.core.stage import Build, stage

if TYPE_CHECKING:
    from tasks.chunk import Chunks
    from tasks.train import Trained

EVAL_FILE = "eval.json"


# ------------------------------------------------------------------------------------ pure functions


def validation_rows(chunks_dir: Path, limit: int | None) -> list[dict[str, Any]]:
    """The first `limit` validation chunks with their labels (derived: the chunks store where training starts)."""
    from datasets import load_from_disk

    from tasks.arrow import with_labels

    ds = load_from_disk(str(chunks_dir))["validation"].select_columns(["input_ids", "trained_from"])
    if len(ds) == 0:
        return []
    rows = ds.with_format("arrow")[: len(ds) if limit is None else min(limit, len(ds))]
    return with_labels(rows).to_pylist()


def general_rows(paths: list[str], tokenizer_dir: str, chunk: ChunkConfig, limit: int | None) -> list[dict]:
    """The general corpus read, tokenized and chunked exactly like the training data (in memory: it is small)."""
    import pyarrow as pa

    from tasks.arrow import token_type, with_labels
    from tasks.chunk import chunk_batch
    from tasks.load import Record, read_corpus_file, resolve_corpus_files
    from tasks.tokenize import encode_batch, load_tokenizer, special_tokens

    cfg = CorpusConfig(paths=paths, on_bad_record="skip")
    texts = [r.text for f in resolve_corpus_files(cfg) for r in read_corpus_file(f, cfg)
             if isinstance(r, Record) and r.text.strip()]
    tok = load_tokenizer(tokenizer_dir)
    sp = special_tokens(tok)
    ids = encode_batch(tok, texts, sp["eos_id"], ids_type=token_type(sp["id_limit"]))
    rows = chunk_batch(pa.array([str(i) for i in range(len(texts))]), ids, chunk, sp["bos_id"])
    out = with_labels(rows).to_pylist()
    return out[:limit] if limit is not None else out


def evaluate_model(location: str, model_cfg: ModelConfig, cfg: EvaluateConfig, val: list[dict],
                   general: list[dict] | None) -> dict[str, Any]:
    from tasks.ml.modeling import generate, load_model, load_tokenizer_with_pad, perplexity, release

    tok = load_tokenizer_with_pad(location, model_cfg.trust_remote_code)
    model = load_model(location, model_cfg)
    try:
        result = {
            "validation": perplexity(model, val, cfg.batch_size, tok.pad_token_id),
            "general": perplexity(model, general, cfg.batch_size, tok.pad_token_id) if general else None,
            "generations": generate(model, tok, cfg.prompts, cfg.generation) if cfg.prompts else [],
        }
    finally:
        release(model)
    return result


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

    return {
        "perplexity": {"validation": pair("validation"), "general": pair("general")},
        "generations": [{"prompt": p, "before": b, "after": a}
                        for p, b, a in zip(prompts, before["generations"], after["generations"])],
    }


def comparison_markdown(doc: dict[str, Any]) -> str:
    rows = []
    for name, v in doc["perplexity"].items():
        if v is not None:
            change = f"{v['relative_change']:+.1%}" if v["relative_change"] is not None else ""
            rows.append({"metric": f"perplexity ({name})", "before": round(v["before"], 3),
                         "after": round(v["after"], 3), "change": change})
    md = "# Before / after\n\n" + markdown_table(rows) + "\n"
    if doc["generations"]:
        gens = [{"prompt": g["prompt"].replace("\n", " "), "before": g["before"].replace("\n", " "),
                 "after": g["after"].replace("\n", " ")} for g in doc["generations"]]
        md += "\n## Generations\n\n" + markdown_table(gens) + "\n"
    return md


# --------------------------------------------------------------------------------------- the tasks


def _inputs(cfg: EvaluateConfig, chunk: ChunkConfig, chunks: Chunks, root: ArtifactsRoot, tokenizer_dir: str):
    val = validation_rows(chunks.dataset_dir(root), cfg.max_eval_rows)
    general = general_rows(cfg.general_corpus, tokenizer_dir, chunk, cfg.max_eval_rows) if cfg.general_corpus else None
    return val, general


class Evaluation(StageOutput):
    """evaluate-base's and evaluate's output: `eval.json` (perplexities and generations; evaluate's holds both
    before and after) and, for evaluate, `eval.md`, the before/after table."""

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
        return [(logging.INFO, f"validation perplexity {_num(c['validation_perplexity_before'])} → "
                               f"{_num(c['validation_perplexity_after'])} ({change})")]


@stage("evaluate-base", version=1, output=Evaluation, libraries=["transformers", "torch", "datasets"])
def evaluate_base(build: Build, evaluate: EvaluateConfig, model: ModelConfig, base_model: Fingerprint,
                  chunk: ChunkConfig, chunks: Chunks, general_corpus: Fingerprint | None):
    val, general = _inputs(evaluate, chunk, chunks, build.root, base_model.location)
    result = evaluate_model(base_model.location, model, evaluate, val, general)
    (build.tmp / EVAL_FILE).write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return {"validation_perplexity": result["validation"]["perplexity"],
            "general_perplexity": (result["general"] or {}).get("perplexity")}, {}


@stage("evaluate", version=1, output=Evaluation, libraries=["transformers", "torch", "datasets"])
def evaluate(build: Build, evaluate: EvaluateConfig, model: ModelConfig, trained: Trained, chunk: ChunkConfig,
             chunks: Chunks, general_corpus: Fingerprint | None, base_eval: Evaluation):
    model_dir = str(trained.verified_model_dir(build.root))
    val, general = _inputs(evaluate, chunk, chunks, build.root, model_dir)
    after = evaluate_model(model_dir, model, evaluate, val, general)
    doc = comparison(base_eval.read(build.root), after, evaluate.prompts)
    (build.tmp / EVAL_FILE).write_text(json.dumps(doc, indent=2, ensure_ascii=False))
    (build.tmp / "eval.md").write_text(comparison_markdown(doc))
    v = doc["perplexity"]["validation"]
    g = doc["perplexity"]["general"] or {}
    return {"validation_perplexity_before": v["before"], "validation_perplexity_after": v["after"],
            "validation_relative_change": v["relative_change"], "general_perplexity_before": g.get("before"),
            "general_perplexity_after": g.get("after")}, {}


def _num(x: Any) -> str:
    """A perplexity for a log line: NaN/inf/None (a diverged model) must not break the line."""
    return f"{x:.3f}" if isinstance(x, (int, float)) else str(x)


def show(out: Evaluation, root: ArtifactsRoot) -> None:
    doc = out.read(root)
    markdown_artifact(out.markdown(root), "eval-before-after", "Perplexity and generations, before/after")
    table_artifact([{"metric": f"perplexity ({k})", **v} for k, v in doc["perplexity"].items() if v],
                   "eval-perplexity", "Perplexity before and after training")
