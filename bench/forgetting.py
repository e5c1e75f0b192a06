"""Forgetting and replay: how much general ability continued pretraining costs, and how much replay buys back.

1. A small base model is pretrained (with cpt itself, `cpt run`) on general Korean text:
   ../shared/corpora/ko_transport_bills.jsonl (National Assembly bills: bill name + reasons), less every 20th
   document, which is held out as the general evaluation corpus (never trained on, never replayed).
2. That base is continued on the domain, ../shared/corpora/ko_law.jsonl (the Korean constitution, one article a
   document, and bills), with `replay.fraction` 0, 0.1 and 0.25 drawn from the base's own pretraining text,
   the same optimizer steps for each.
3. For each setting: domain validation perplexity and general (held-out) perplexity, base → continued, accuracy
   on two multiple-choice clozes (lm-evaluation-harness: one from the domain text, one from the held-out bills,
   which are disjoint by normalised text from everything pretrained or replayed), and the promotion gate's decision with its default rules (general perplexity may rise at most 10%).

Goal (issue): one setting reaches domain perplexity -30% or better with general perplexity +10% or less.
Every run is a fresh `cpt run` process on this machine's CPU; the tokenizer (byte-level BPE) and the model
(a small Llama) are built here, nothing is downloaded.

    .venv/bin/python -m bench.forgetting [--base-steps 400] [--steps 40] [--lr 1.5e-4] [--fractions 0,0.1,0.25,0.5]
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from bench.common import CORPORA, CPT, argument_parser, quiet_env, require, timed, write_jsonl


def cpt_run(config: dict, folder: Path, artifacts: Path, until: str | None = None) -> tuple[dict, float]:
    """`cpt run` of `config` (written to `folder`) in a fresh process (`--until` a stage, if given): its summary
    and its wall seconds."""
    import yaml

    cfg_path = folder / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config, allow_unicode=True))
    summary = folder / "summary.json"
    wall = timed([CPT, "run", "-c", str(cfg_path), "--artifacts", str(artifacts), "--summary", str(summary)]
                 + (["--until", until] if until else []), quiet_env())
    return json.loads(summary.read_text()), wall


def normalised(text: str) -> str:
    """Text compared for overlap: whitespace collapsed, case folded."""
    return " ".join(text.split()).casefold()


def task_accuracy(counts: dict, task: str) -> tuple[float | None, float | None]:
    """(before, after) accuracy of `task` from an evaluate-base's and an evaluate's counts."""
    return counts.get("before", {}).get(f"{task}/acc"), counts.get("after", {}).get(f"{task}/acc")


def main() -> None:
    ap = argument_parser(__spec__, __doc__)
    ap.add_argument("--base-steps", type=int, default=400, help="optimizer steps pretraining the base")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps of each continued run")
    ap.add_argument("--fractions", default="0,0.1,0.25,0.5")
    ap.add_argument("--lr", type=float, default=1.5e-4, help="peak learning rate of the continued runs")
    ap.add_argument("--task-limit", type=int, default=100, help="questions per multiple-choice task")
    args = ap.parse_args()
    general_src, domain_src = CORPORA / "ko_transport_bills.jsonl", CORPORA / "ko_law.jsonl"
    require(general_src, domain_src)
    from tasks.ml.tiny_model import build_tiny_model, read_texts

    general, domain = read_texts(general_src), read_texts(domain_src)
    pretrain = [t for i, t in enumerate(general) if i % 20]
    # Held out means never seen: a bill that is also a pretraining or domain document (the corpora repeat some,
    # exactly or up to spacing) is dropped from the held-out set, compared by normalised text.
    seen = {normalised(t) for t in pretrain + domain}
    candidates = general[::20]
    held_out = [t for t in candidates if normalised(t) not in seen]

    chunk = {"max_seq_length": 256, "overlap": 32}
    train = {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 1, "warmup_ratio": 0.05,
             "logging_steps": 25, "eval_steps": 50, "save_steps": 50, "early_stopping_patience": None,
             "lr_scheduler_type": "cosine"}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        artifacts = d / "artifacts"
        build_tiny_model(d / "init", pretrain[::4] + domain, vocab_size=4000, hidden_size=128, layers=4)
        write_jsonl(d / "general" / "pretrain.jsonl", pretrain)
        write_jsonl(d / "held_out" / "general.jsonl", held_out)
        write_jsonl(d / "domain" / "ko_law.jsonl", domain)
        # Multiple-choice clozes next to the perplexities: the domain's (its own text: what training taught) and
        # a general one from the held-out bills (never trained on: what it costs).
        from tasks.evaluate import write_cloze_task

        tasks = [str(write_cloze_task(domain, d / "tasks", "domain_cloze", n=args.task_limit, source="ko_law")),
                 str(write_cloze_task(held_out, d / "tasks", "general_cloze", n=args.task_limit,
                                      source="held-out bills"))]

        base_cfg = {"corpus": {"paths": [str(d / "general")]}, "model": {"id": str(d / "init")},
                    "split": {"validation_fraction": 0.01}, "chunk": chunk,
                    "train": {**train, "max_steps": args.base_steps, "learning_rate": 3e-3},
                    "evaluate": {"max_eval_rows": 64}, "push": {"name": "base"}}
        (d / "base_run").mkdir()
        _, base_wall = cpt_run(base_cfg, d / "base_run", artifacts)
        base_dir = artifacts / "models" / "base"

        rows = []
        for f in [float(x) for x in args.fractions.split(",")]:
            cfg = {"corpus": {"paths": [str(d / "domain")]}, "model": {"id": str(base_dir)},
                   "split": {"validation_fraction": 0.1}, "chunk": chunk,
                   "train": {**train, "max_steps": args.steps, "learning_rate": args.lr},
                   "replay": {"paths": [str(d / "general")], "fraction": f},
                   "evaluate": {"general_corpus": [str(d / "held_out")], "max_eval_rows": 200, "tasks": tasks,
                                "num_fewshot": 0},
                   "push": {"name": f"domain-replay-{f}"}}
            folder = d / f"run-{f}"
            folder.mkdir()
            summary, wall = cpt_run(cfg, folder, artifacts)
            stages = {s["name"]: s for s in summary["stages"]}
            e, t, g = stages["evaluate"]["counts"], stages["train"]["counts"], summary.get("gate", {})
            acc = {"before": stages["evaluate-base"]["counts"].get("tasks", {}), "after": e.get("tasks", {})}
            rows.append({"fraction": f, "replay_share": t["replay_share"],
                         "domain_before": e["validation_perplexity_before"], "domain_after": e["validation_perplexity_after"],
                         "general_before": e["general_perplexity_before"], "general_after": e["general_perplexity_after"],
                         "domain_acc": task_accuracy(acc, "domain_cloze"),
                         "general_acc": task_accuracy(acc, "general_cloze"),
                         "gate": "promoted" if g.get("promoted") else "refused", "wall": wall})

    print(f"base: tiny Llama (4 layers, hidden 128, BPE 4k) pretrained {args.base_steps} steps on "
          f"{len(pretrain)} general documents (ko_transport_bills less every 20th, {base_wall:.0f} s); domain: "
          f"ko_law ({len(domain)} documents, 10% validation); general perplexity on the {len(held_out)} held-out "
          f"bills ({len(candidates) - len(held_out)} of {len(candidates)} dropped: also trained on); "
          f"clozes of {args.task_limit} questions, 4 choices (chance 0.25); each continued run {args.steps} steps, batch 16 x 256 tokens, lr {args.lr:g} cosine; "
          f"{os.cpu_count()} cores")
    print(f"{'replay':>7} {'share':>7} {'domain ppl':>21} {'change':>8} {'general ppl':>21} {'change':>8} "
          f"{'domain acc':>13} {'general acc':>13} {'gate':>9} {'wall s':>7}")
    met = []
    for r in rows:
        dc = r["domain_after"] / r["domain_before"] - 1
        gc = r["general_after"] / r["general_before"] - 1
        if dc <= -0.30 and gc <= 0.10:
            met.append(r["fraction"])
        print(f"{r['fraction']:7.2f} {r['replay_share']:7.4f} {r['domain_before']:9.2f} → {r['domain_after']:9.2f} "
              f"{dc:+8.1%} {r['general_before']:9.2f} → {r['general_after']:9.2f} {gc:+8.1%} "
              f"{_pair(r['domain_acc']):>13} {_pair(r['general_acc']):>13} {r['gate']:>9} "
              f"{r['wall']:7.0f}")
    print(f"\ngoal (domain -30% or better with general +10% or less): "
          + (f"met with replay {', '.join(str(x) for x in met)}" if met else "not met by any setting"))


def _pair(p: tuple[float | None, float | None]) -> str:
    return " → ".join("-" if x is None else f"{x:.2f}" for x in p)


if __name__ == "__main__":
    main()
