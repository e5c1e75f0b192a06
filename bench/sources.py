"""Many sources and a stable line (issue 32): three named sources against today's two-source replay, and a line of
drops trained with `train.schedule: stable_anneal` against today's re-warm on every run.

0. A small base (a tiny Llama, BPE 4k, built here) is pretrained with `cpt run` on general Korean text
   (../shared/corpora/ko_transport_bills.jsonl less every 20th bill) and English code/docs (the first
   `--code-docs` documents of ../shared/corpora/python_docs.jsonl less every 10th), as bench.forgetting does.
   The 20th bills and the 10th code documents are held out: never pretrained on, never trained on, never replayed.
1. Part A, the same base continued on the domain (../shared/corpora/ko_law.jsonl, 10% validation) two ways, the
   same optimizer steps, batch and trained tokens (the domain read once is 60% of them):
   - replay (today): `corpus` = the domain, `replay` = the general and code text at `replay.fraction` 0.4 (drawn
     from the pool in proportion to its size: what each got within the 40% is not chosen);
   - sources: `sources` domain 0.6, general_ko 0.25, code 0.15 (each with its own validation split).
   Per run: domain validation perplexity and general perplexity on the held-out bills (`evaluate.general_corpus`)
   from its eval.json, code perplexity on the held-out code documents (a second `cpt run --until evaluate` of the
   same config with `evaluate.general_corpus` the code: every stage before evaluate-base Cached), the accuracies of
   bench.forgetting's two multiple-choice clozes (lm-evaluation-harness, evaluate's tasks), the gate's decision
   with its defaults, the shares asked and got (mix's counts), and the sources run's per-source perplexities
   (eval.json `sources`: each source's own validation split).
2. Part B, a line (`cpt retrain --line`, `train.init: last_promoted`) on the three sources from the same base: the
   domain split into a base (the rest) and `--drops` drops of 15 documents, one announced per run (`--drop`); once
   with `train.schedule: stable_anneal` (the first run warms up, every run trains at the peak rate from the line's
   last stable model, 80% of the steps, and releases a 20% linear decay branch from it) and once with today's
   default (every run warms up and decays (cosine) from the last promoted model), the same steps a run. The gate
   lets every run through (max_validation_increase and max_general_increase 10). Per run: the release's domain
   validation perplexity (the line's validation split, growing with the drops: the same documents in both modes
   at a run), general perplexity on the held-out bills, the gate's decision and the `cpt retrain` process's seconds.

Every run is a fresh `cpt run`/`cpt retrain` process on this machine's CPU; nothing is downloaded.

    .venv/bin/python -m bench.sources [--base-steps 100] [--steps 20] [--line-steps 10] [--drops 5] [--general-docs 2000] [--parts AB]

The defaults took ~14 min (base) + ~9 min (part A) + ~3 min a part B run (10 runs) at nice 10 on a 2-core
machine shared with a CI run (2026-12-07): over the ~25 min aimed at (not measured on a quiet machine); scale up with --base-steps 400
--steps 40 --line-steps 30 --general-docs 0 (bench.forgetting's sizes).
"""

from __future__ import annotations

import copy
import json
import os
import random
import tempfile
import time
from pathlib import Path

from bench.common import CORPORA, CPT, argument_parser, quiet_env, require, timed, write_jsonl
from bench.forgetting import cpt_run, normalised, task_accuracy

WEIGHTS = {"domain": 0.6, "general_ko": 0.25, "code": 0.15}
DROP_DOCS = 15
CHUNK = {"max_seq_length": 256, "overlap": 32}
TRAIN = {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 1, "warmup_ratio": 0.05,
         "logging_steps": 25, "eval_steps": 50, "save_steps": 50, "early_stopping_patience": None,
         "lr_scheduler_type": "cosine"}


def retrain(config: dict, folder: Path, artifacts: Path, line: str, drop: Path) -> tuple[dict, float]:
    """`cpt retrain --line line --drop drop` of `config` in a fresh process: its summary and its wall seconds."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config, allow_unicode=True))
    summary = folder / "summary.json"
    wall = timed([CPT, "retrain", "-c", str(cfg_path), "--line", line, "--artifacts", str(artifacts), "--summary",
                  str(summary), "--drop", str(drop)], quiet_env())
    return json.loads(summary.read_text()), wall


def settled(folder: Path) -> Path:
    """A drop's files an hour old: its producer is done with them (drops.settle_seconds)."""
    old = time.time() - 3600
    for p in [folder, *folder.rglob("*")]:
        os.utime(p, (old, old))
    return folder


def stages_of(summary: dict) -> dict[str, dict]:
    return {s["name"]: s for s in summary["stages"]}


def eval_doc(stage: dict) -> dict:
    """The evaluate stage's eval.json (the run's own record of before/after)."""
    return json.loads((Path(stage["output"]) / "eval.json").read_text())


def sources_config(d: Path, domain: list[str] | Path, validation: dict[str, float]) -> list[dict]:
    paths = {"domain": domain, "general_ko": d / "general", "code": d / "code"}
    return [{"name": n, "paths": [str(paths[n])], "weight": w, "validation_fraction": validation[n]}
            for n, w in WEIGHTS.items()]


def part_a_configs(d: Path, base_dir: Path, common: dict, tasks: list[str], eval_rows: int) -> dict[str, dict]:
    """Part A's two runs: today's corpus + replay of the general and code text at 1 - the domain's weight, and
    the three sources at WEIGHTS; the same steps, batch, split and evaluation."""
    evaluate = {"general_corpus": [str(d / "held_out" / "general")], "max_eval_rows": eval_rows,
                "tasks": tasks, "num_fewshot": 0}
    fraction = round(1 - WEIGHTS["domain"], 6)
    arms = {
        "replay": {**common, "corpus": {"paths": [str(d / "domain")]},
                   "replay": {"paths": [str(d / "general"), str(d / "code")], "fraction": fraction}},
        "sources": {**common, "sources": sources_config(d, d / "domain",
                                                        {"domain": 0.1, "general_ko": 0.02, "code": 0.1})},
    }
    return {name: {**cfg, "model": {"id": str(base_dir)}, "evaluate": evaluate, "push": {"name": f"a-{name}"}}
            for name, cfg in arms.items()}


def line_config(mode: str, d: Path, base_dir: Path, common: dict, line_steps: int, eval_rows: int) -> dict:
    """Part B's line: the three sources, the drops joining the domain, `mode` (standard: every run warms up and
    decays from the last promoted model; stable_anneal), a gate every run may pass."""
    train = {**common["train"], "max_steps": line_steps, "init": "last_promoted"}
    if mode == "stable_anneal":
        train.update({"schedule": "stable_anneal", "anneal": "decay", "anneal_ratio": 0.2})
    return {**common, "train": train, "model": {"id": str(base_dir)},
            "sources": sources_config(d, d / "line", {"domain": 0.1, "general_ko": 0.02, "code": 0.0}),
            "drops": {"source": "domain"},
            "evaluate": {"general_corpus": [str(d / "held_out" / "general")], "max_eval_rows": eval_rows},
            "gate": {"max_validation_increase": 10.0, "max_general_increase": 10.0},
            "push": {"name": f"line-{mode}"}}


def common_settings(steps: int, lr: float) -> dict:
    """What every continued run shares: bench.forgetting's chunking and batch, `steps` at peak rate `lr` (cosine)."""
    return {"split": {"validation_fraction": 0.1}, "chunk": CHUNK,
            "train": {**TRAIN, "max_steps": steps, "learning_rate": lr}}


def part_a(args, d: Path, artifacts: Path, base_dir: Path, common: dict, tasks: list[str]) -> list[dict]:
    rows = []
    for name, cfg in part_a_configs(d, base_dir, common, tasks, args.eval_rows).items():
        folder = d / f"a-{name}"
        folder.mkdir()
        summary, wall = cpt_run(cfg, folder, artifacts)
        # The held-out code documents through the same evaluate: every stage up to evaluate-base is Cached.
        probe = copy.deepcopy(cfg)
        probe["evaluate"] = {"general_corpus": [str(d / "held_out" / "code")], "max_eval_rows": args.eval_rows}
        (folder / "code").mkdir()
        code_summary, code_wall = cpt_run(probe, folder / "code", artifacts, until="evaluate")
        rows.append(part_a_row(name, summary, code_summary, wall + code_wall))
    return rows


def part_a_row(name: str, summary: dict, code_summary: dict, wall: float) -> dict:
    """One part A run's row from its `cpt run` summary and its code probe's (their eval.json files)."""
    st = stages_of(summary)
    doc = eval_doc(st["evaluate"])
    code = eval_doc(stages_of(code_summary)["evaluate"])["perplexity"]["general"]
    acc = {"before": st["evaluate-base"]["counts"].get("tasks", {}), "after": st["evaluate"]["counts"].get("tasks", {})}
    mixed = st["mix"]["counts"]
    if name == "replay":
        shares = {"domain": (WEIGHTS["domain"], 1 - mixed["replay_share"]),
                  "replay (general+code)": (mixed["replay_fraction_asked"], mixed["replay_share"])}
    else:
        shares = {n: (w, mixed[f"{n}_share"]) for n, w in WEIGHTS.items()}
    gate = summary.get("gate") or {}
    return {"arm": name, "wall": wall, "train_steps": st["train"]["counts"].get("global_step"),
            "trained_tokens": mixed.get("train_trained_tokens") or (mixed["domain_trained_tokens"]
                                                                    + mixed["replay_trained_tokens"]),
            "mix": mixed, "shares": shares,
            "domain": doc["perplexity"]["validation"], "general": doc["perplexity"]["general"], "code": code,
            "per_source": doc.get("sources") or {},
            "domain_acc": task_accuracy(acc, "domain_cloze"), "general_acc": task_accuracy(acc, "general_cloze"),
            "gate": "promoted" if gate.get("promoted") else f"refused: {gate.get('reason', '')}"}


def part_b_row(k: int, summary: dict, wall: float) -> dict:
    """Run k (from 0) of a part B line from its `cpt retrain` summary (the pipeline's eval.json)."""
    pipeline = summary.get("pipeline") or {}
    if not summary.get("trained") or not pipeline:
        return {"run": k + 1, "wall": wall, "error": f"{summary.get('reason')}: "
                f"{summary.get('error') or summary.get('files') or summary.get('gate_reason', '')}"}
    st = stages_of(pipeline)
    doc = eval_doc(st["evaluate"])
    return {"run": k + 1, "wall": wall, "domain": doc["perplexity"]["validation"],
            "general": doc["perplexity"]["general"],
            "steps": st["train"]["counts"].get("global_step", 0)
            + (st.get("anneal", {}).get("counts", {}).get("global_step") or 0),
            "parent": st["train"]["counts"].get("parent"),
            "promoted": summary.get("promoted"), "gate_reason": summary.get("gate_reason", "")}


def part_b(args, d: Path, base_dir: Path, common: dict, line_docs: list[str], drops: list[Path]) -> dict:
    write_jsonl(d / "line" / "domain.jsonl", line_docs)
    for folder in ("line", "general", "code"):  # a line's files written a moment ago are still being written
        settled(d / folder)
    modes = {"standard": [], "stable_anneal": []}
    # Drop by drop, the two lines in turn: both see the machine's load of that moment, and a run cut short keeps
    # whole rows. Each line has its own root: both pay the same cold first run.
    for k, drop in enumerate(drops):
        for mode, runs in modes.items():
            cfg = line_config(mode, d, base_dir, common, args.line_steps, args.eval_rows)
            summary, wall = retrain(cfg, d / f"b-{mode}" / f"run-{k}", d / f"b-{mode}" / "artifacts",
                                    f"bench-{mode}", drop)
            runs.append(part_b_row(k, summary, wall))
    return modes


def main() -> None:
    ap = argument_parser(__spec__, __doc__)
    ap.add_argument("--base-steps", type=int, default=100, help="optimizer steps pretraining the base")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps of each part A run")
    ap.add_argument("--line-steps", type=int, default=10, help="optimizer steps of each part B run (a release)")
    ap.add_argument("--drops", type=int, default=5, help="drops of the part B line, one a run")
    ap.add_argument("--lr", type=float, default=1.5e-4, help="peak learning rate of the continued runs")
    ap.add_argument("--code-docs", type=int, default=44, help="python_docs documents used (every 10th held out)")
    ap.add_argument("--general-docs", type=int, default=2000, help="bills used, the first ones (0: all 5,447)")
    ap.add_argument("--task-limit", type=int, default=60, help="questions per multiple-choice task")
    ap.add_argument("--eval-rows", type=int, default=100, help="evaluate.max_eval_rows")
    ap.add_argument("--parts", default="AB", help="A, B or AB")
    ap.add_argument("--base", help="a base model folder an earlier run of this script pretrained (same data flags; "
                    "copy artifacts/models/base out of its temporary folder): no pretraining")
    args = ap.parse_args()
    general_src, domain_src, code_src = (CORPORA / f for f in ("ko_transport_bills.jsonl", "ko_law.jsonl",
                                                                 "python_docs.jsonl"))
    require(general_src, domain_src, code_src)
    from tasks.ml.tiny_model import build_tiny_model, read_texts

    general, domain = read_texts(general_src), read_texts(domain_src)
    general = general[:args.general_docs or None]
    code_all = read_texts(code_src)[:args.code_docs]
    pretrain = [t for i, t in enumerate(general) if i % 20]
    code = [t for i, t in enumerate(code_all) if i % 10]
    # Held out means never seen (bench.forgetting's rule): compared by normalised text.
    seen = {normalised(t) for t in pretrain + domain + code}
    held_general = [t for t in general[::20] if normalised(t) not in seen]
    held_code = [t for t in code_all[::10] if normalised(t) not in seen]
    # Part B: the domain in a seeded order, the last drops x 15 documents as drops, the rest the line's base text.
    shuffled = domain[:]
    random.Random(0).shuffle(shuffled)
    n_line = len(shuffled) - args.drops * DROP_DOCS
    line_docs, drop_docs = shuffled[:n_line], shuffled[n_line:]

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        artifacts = d / "artifacts"
        build_tiny_model(d / "init", pretrain[::4] + domain + code, vocab_size=4000, hidden_size=128, layers=4)
        write_jsonl(d / "general" / "pretrain.jsonl", pretrain)
        write_jsonl(d / "code" / "python_docs.jsonl", code)
        write_jsonl(d / "held_out" / "general" / "bills.jsonl", held_general)
        write_jsonl(d / "held_out" / "code" / "python_docs.jsonl", held_code)
        write_jsonl(d / "domain" / "ko_law.jsonl", domain)
        drops = []
        for k in range(args.drops):
            drops.append(settled(write_jsonl(d / "drops" / f"drop-{k + 1}" / "law.jsonl",
                                             drop_docs[k * DROP_DOCS:(k + 1) * DROP_DOCS]).parent))
        from tasks.evaluate import write_cloze_task

        tasks = [str(write_cloze_task(domain, d / "tasks", "domain_cloze", n=args.task_limit, source="ko_law")),
                 str(write_cloze_task(held_general, d / "tasks", "general_cloze", n=args.task_limit,
                                      source="held-out bills"))]
        base_cfg = {"corpus": {"paths": [str(d / "general"), str(d / "code")]}, "model": {"id": str(d / "init")},
                    "split": {"validation_fraction": 0.01}, "chunk": CHUNK,
                    "train": {**TRAIN, "max_steps": args.base_steps, "learning_rate": 3e-3},
                    "evaluate": {"max_eval_rows": 64}, "push": {"name": "base"}}
        if args.base:  # a base this script pretrained before, with the same data flags (its tokenizer beside it)
            base_dir, base_wall = Path(args.base).resolve(), 0.0
        else:
            (d / "base_run").mkdir()
            _, base_wall = cpt_run(base_cfg, d / "base_run", artifacts)
            base_dir = artifacts / "models" / "base"
        common = common_settings(args.steps, args.lr)
        # Each part's table as soon as it is measured (a long run cut short keeps what it finished).
        print(f"base: tiny Llama (4 layers, hidden 128, BPE 4k) pretrained {args.base_steps} steps (lr 3e-3) on "
              f"{len(pretrain)} general bills (the first {len(general)} of ko_transport_bills less every 20th) + "
              f"{len(code)} python_docs documents ({base_wall:.0f} s); held out, never trained on: "
              f"{len(held_general)} bills, {len(held_code)} code documents; domain ko_law ({len(domain)} documents); "
              f"batch 16 x 256 tokens, lr {args.lr:g}; {os.cpu_count()} cores", flush=True)
        if "A" in args.parts:
            print_part_a(args, part_a(args, d, artifacts, base_dir, common, tasks))
            print(end="", flush=True)
        if "B" in args.parts:
            print_part_b(args, part_b(args, d, base_dir, common, line_docs, drops), len(line_docs))
    print(f"\nwhole script {time.perf_counter() - started:.0f} s")

def _ratio(x: float | None, y: float | None) -> str:
    return "-" if x is None or y is None or not y else f"{x / y:.3f}"


def _pair(p: tuple[float | None, float | None]) -> str:
    return " → ".join("-" if x is None else f"{x:.2f}" for x in p)


def print_part_a(args, rows: list[dict]) -> None:
    print(f"\nPart A: {args.steps} steps each from the same base; domain ko_law 10% validation; general = held-out "
          f"bills, code = held-out python_docs (evaluate.general_corpus); clozes of {args.task_limit} questions "
          f"(chance 0.25)")
    print(f"{'arm':>8} {'tokens':>7} {'steps':>5} {'domain ppl':>17} {'x':>6} {'general ppl':>17} {'x':>6} "
          f"{'code ppl':>17} {'x':>6} {'domain acc':>12} {'general acc':>12} {'wall s':>6}  gate")
    for r in rows:
        cells = []
        for k in ("domain", "general", "code"):
            v = r[k]
            cells.append(f"{v['before']:7.2f} → {v['after']:7.2f} {_ratio(v['after'], v['before']):>6}")
        print(f"{r['arm']:>8} {r['trained_tokens']:7d} {r['train_steps'] or 0:5d} {' '.join(cells)} "
              f"{_pair(r['domain_acc']):>12} {_pair(r['general_acc']):>12} {r['wall']:6.0f}  {r['gate']}")
    by = {r["arm"]: r for r in rows}
    if {"replay", "sources"} <= set(by):
        s, p = by["sources"], by["replay"]
        print("sources / replay, after: " + ", ".join(
            f"{k} ppl {_ratio(s[k]['after'], p[k]['after'])}" for k in ("domain", "general", "code")))
        for r in rows:
            print(f"shares asked → got ({r['arm']}): " + ", ".join(f"{n} {a:.3f} → {g:.4f}"
                                                                    for n, (a, g) in r["shares"].items()))
        if s["per_source"]:
            print("sources run, each source's own validation split (eval.json sources): " + ", ".join(
                f"{n} {v['before']:.2f} → {v['after']:.2f} (x{_ratio(v['after'], v['before'])})"
                for n, v in s["per_source"].items() if v))


def print_part_b(args, modes: dict, n_line: int) -> None:
    print(f"\nPart B: a line of {args.drops} drops of {DROP_DOCS} ko_law documents onto {n_line} (one `cpt retrain "
          f"--drop` a run, {args.line_steps} steps a run); domain = the line's validation split at that run (the "
          "same documents in both modes), general = held-out bills; gate: every run may pass")
    print(f"{'run':>3} {'domain ppl standard':>20} {'stable_anneal':>14} {'x':>6} {'general standard':>17} "
          f"{'stable_anneal':>14} {'x':>6} {'wall s std':>10} {'stable':>7} {'x':>6}")
    std, sta = modes.get("standard", []), modes.get("stable_anneal", [])
    for r, s in zip(std, sta):
        if "error" in r or "error" in s:
            print(f"{r['run']:>3} standard: {r.get('error', 'ok')}; stable_anneal: {s.get('error', 'ok')}")
            continue
        print(f"{r['run']:>3} {r['domain']['after']:20.2f} {s['domain']['after']:14.2f} "
              f"{_ratio(s['domain']['after'], r['domain']['after']):>6} {r['general']['after']:17.2f} "
              f"{s['general']['after']:14.2f} {_ratio(s['general']['after'], r['general']['after']):>6} "
              f"{r['wall']:10.0f} {s['wall']:7.0f} {_ratio(s['wall'], r['wall']):>6}")
    for mode, runs in modes.items():
        print(f"{mode}: " + "; ".join(
            f"run {r['run']} " + (r["error"] if "error" in r else
                                  f"{r['steps']} steps, {'released' if r['promoted'] else 'refused: ' + r['gate_reason']}"
                                  + (f", from {r['parent']}" if r.get("parent") else ""))
            for r in runs))


if __name__ == "__main__":
    main()
