"""Cost of a corpus drop that adds one file to a line, against a cold run, as the user runs it: `cpt retrain` in a
fresh process each time, the drop in its own folder outside the corpus paths (where the on-drop deployment's
producer puts it), near-dedup on (the default).

Corpus, rich in near-duplicates: ../shared/corpora/ko_transport_bills.jsonl + python_docs.jsonl, every --every-th
document (2: ~3,000 documents, ~10 MB), and for two of every three a re-export (a new date line, other line
wrapping: J ≈ 0.8-0.95 with its original): about 40% of the documents are near-duplicates. 1/(N+1) of the
originals with their re-exports is the drop (one file: new to the line, so the gate passes it), the rest the line's
N files, shuffled (seed 0). Tokenizer and model: byte-level BPE
(8k) and a tiny Llama built here (training is 1 step: this measures the data path, not training).

Part 1, a line of N files: cold (an empty artifacts root, the line alone), +1 drop (`--drop <folder>`: the gate
profiles the drop, the pipeline runs), nothing changed (the nightly run right after: trains nothing). Measured:
the data stages' seconds (load … chunk, from the pipeline's run summary), the drop gate's, the process wall.
"Data-stage seconds" of a run, the goal's measure, are load … chunk **plus the drop gate's** (the gate reads,
signs and tokenizes the drop into the pieces the stages then reuse; without it the +1 run would hide the drop's own
work); a cold run has no drop (its gate seconds are 0). Goal: +1 file of N+1 ≤ 0.15 of cold. The pair (cold, +1)
is measured --pairs times (default 3), each on an artifacts root and Prefect state of its own, and the goal's ratio
is the median +1 over the median cold: on two cores one cold run's data stages move by a third from run to run
(tokenize 1.8-2.6 s on the same code), and a single pair's ratio moved with its cold run.

Part 2, the same one-file drop onto lines of 1×, 4× and 16× the size (--sizes: the line's documents as K tagged
copies, `[copy k] ` in front: every document a cluster of K near-copies, which near-dedup reduces to one): a cold
run of the line, then the drop. Measured: the drop run's load seconds (the stage's, from the run summary: reading
the drop's file is the gate's, so load assembles the line, signs nothing new and runs near-dedup's pass over the
drop's documents) and its gate seconds. Goal: the drop's load seconds within 1.5× of each other across sizes.
With --repeat R (default 3), R drops one after the other, each of other held-out documents (so the line is R - 1
slices smaller than without), and the median drop by its load seconds: one run's load of a tenth of a second
moves by half with the Prefect server's work beside it on two cores.

Also printed, measured here in fresh processes: per-process fixed costs both runs pay once (pyarrow's first array
imports pandas; the tokenizer's Rust backend loads), which no incremental design removes.

    .venv/bin/python -m bench.incremental_drop [--files 20] [--every 2] [--sizes 1,4,16] [--repeat 3] [--pairs 3]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

from bench.common import CORPORA, CPT, DATA_STAGES, argument_parser, quiet_env, require, timed, write_parts


def retrain(config: Path, artifacts: Path, summary: Path, drop: Path | None = None) -> tuple[dict, float]:
    """`cpt retrain` of the line in a fresh process (with `--drop`, if given): its summary and its wall seconds.
    Prefect's state (its database, which every run adds flow runs, task runs and events to) is the line's own,
    beside its artifacts: each line size starts from an empty one, so the last size measured does not pay for a
    database the others filled (a stage's seconds include its task run's calls to the server). Always a temporary
    server of its own: never one found running."""
    # CPT_FIND_MAKE_SERVER=0: a server someone left on port 4200 would otherwise serve every run (flows/local_server.py
    # uses a running `make server` first), with its own database, and the state would not be the line's.
    env = quiet_env(PREFECT_HOME=str(artifacts.parent / f"prefect-{artifacts.name}"), CPT_FIND_MAKE_SERVER="0")
    env.pop("PREFECT_API_URL", None)  # nor one this shell points at
    wall = timed([CPT, "retrain", "-c", str(config), "--line", "bench", "--artifacts", str(artifacts), "--summary",
                  str(summary)] + (["--drop", str(drop)] if drop else []), env)
    return json.loads(summary.read_text()), wall


def data_seconds(result: dict) -> float:
    stages = (result.get("pipeline") or {}).get("stages", [])
    return sum(s["seconds"] for s in stages if s["name"] in DATA_STAGES)


def fixed_costs(model: Path) -> dict[str, float]:
    """Seconds a fresh process spends, once, before its first data: pyarrow's first array (it imports pandas) and
    loading the tokenizer's Rust backend from tokenizer.json (best of 3 fresh processes each)."""
    probes = {
        "pyarrow's first array (imports pandas)": "import pyarrow as pa\nt = time.perf_counter()\npa.array([0])",
        "tokenizer backend load": "import tokenizers\nt = time.perf_counter()\n"
                                  f"tokenizers.Tokenizer.from_file({str(model / 'tokenizer.json')!r})",
    }
    out = {}
    for name, code in probes.items():
        runs = [float(subprocess.run([sys.executable, "-c", f"import time\n{code}\nprint(time.perf_counter() - t)"],
                                     capture_output=True, text=True, check=True).stdout) for _ in range(3)]
        out[name] = min(runs)
    return out


def reexport(text: str, i: int) -> str:
    """The same document exported again: a new date line and other line wrapping."""
    import textwrap

    return f"(2027-0{1 + i % 9}-1{i % 10} re-export)\n" + "\n".join(textwrap.wrap(text, 60 + i % 13))


def write_config(config: Path, corpus: Path, model: Path) -> None:
    import yaml

    config.write_text(yaml.safe_dump({
        "corpus": {"paths": [str(corpus)], "near_dedup": {"enabled": True}}, "model": {"id": str(model)},
        "split": {"validation_fraction": 0.05}, "chunk": {"max_seq_length": 1000, "overlap": 500},
        "train": {"max_steps": 1, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
                  "eval_steps": 1, "save_steps": 1, "early_stopping_patience": None},
        "evaluate": {"max_eval_rows": 4}, "push": {"name": "bench"},
    }))


def stage_seconds(result: dict, name: str) -> float:
    return sum(s["seconds"] for s in (result.get("pipeline") or {}).get("stages", []) if s["name"] == name)


def near_counts(result: dict) -> str:
    for s in (result.get("pipeline") or {}).get("stages", []):
        if s["name"] == "load":
            c = s.get("counts", {})
            return f"{c.get('documents', '?')} documents kept, {c.get('near_duplicates', '?')} near-duplicates removed"
    return ""


def main() -> None:
    ap = argument_parser(__spec__, __doc__)
    ap.add_argument("--files", type=int, default=20, help="N: files in the line before the drop")
    ap.add_argument("--every", type=int, default=2, help="keep every E-th document only (2: ~10 MB)")
    ap.add_argument("--sizes", default="1,4,16", help="line sizes for part 2, as tagged copies (1: part 1's line)")
    ap.add_argument("--repeat", type=int, default=3, help="part 2: drops per line size (each of other documents, "
                    "new to the line); the median of their load seconds is reported")
    ap.add_argument("--pairs", type=int, default=3, help="part 1: (cold, +1 drop) pairs, each on its own artifacts "
                    "root; the median of each is reported")
    args = ap.parse_args()
    sources = [CORPORA / "ko_transport_bills.jsonl", CORPORA / "python_docs.jsonl"]
    require(*sources)
    import random

    from tasks.ml.tiny_model import build_tiny_model, read_texts

    originals = [t for p in sources for t in read_texts(p)][::args.every]
    random.Random(0).shuffle(originals)
    n = args.files

    def with_reexports(docs: list[str]) -> list[str]:
        out = docs + [reexport(t, i) for i, t in enumerate(docs) if i % 3]
        random.Random(1).shuffle(out)
        return out

    # The drop's documents are new to the line (its re-exports are of its own documents): a drop the gate passes.
    cut = len(originals) // (n + 1)
    repeat = max(1, args.repeat)
    # --repeat R: R slices of the originals held out of the line, each a drop of its own (a drop of the same
    # documents tagged again would be a near-duplicate of the last, and the drop gate would refuse it).
    drops_docs = [with_reexports(originals[r * cut:(r + 1) * cut]) for r in range(repeat)]
    drop_docs, base_docs = drops_docs[0], with_reexports(originals[repeat * cut:])
    texts = drop_docs + base_docs
    sizes = [int(k) for k in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        build_tiny_model(d / "model", originals[::5], vocab_size=8000)
        fixed = fixed_costs(d / "model")
        drops = [d / "landing" / f"2026-11-{26 + r}" for r in range(repeat)]
        for r, folder in enumerate(drops):
            write_parts(drops_docs[r], folder, 1, settled=True)
        drop = drops[0]
        drop_bytes = sum(f.stat().st_size for f in drop.rglob("*.jsonl"))
        series = {}
        for k in sizes:
            line = base_docs if k == 1 else [f"[copy {c}] {t}" for t in base_docs for c in range(k)]
            write_parts(line, d / f"corpus-{k}", n, settled=True)
            config = d / f"line-{k}.yaml"
            write_config(config, d / f"corpus-{k}", d / "model")
            artifacts = d / f"artifacts-{k}"
            runs = {"cold": retrain(config, artifacts, d / f"cold-{k}.json"),
                    "+1 drop": retrain(config, artifacts, d / f"drop-{k}.json", drop)}
            if k == 1:
                runs["nothing changed"] = retrain(config, artifacts, d / f"again-{k}.json")
            for r in range(1, repeat):  # each onto the line as the drops before it left it
                runs[f"+1 drop {r + 1}"] = retrain(config, artifacts, d / f"drop-{k}-{r}.json", drops[r])
            if k == 1:  # part 1's pair again, each time from nothing: an artifacts root and Prefect state of its own
                for p in range(1, max(1, args.pairs)):
                    again = d / f"artifacts-{k}-pair-{p}"
                    runs[f"cold (pair {p + 1})"] = retrain(config, again, d / f"cold-{k}-{p}.json")
                    runs[f"+1 drop (pair {p + 1})"] = retrain(config, again, d / f"drop-{k}-pair-{p}.json", drop)
                    shutil.rmtree(again, ignore_errors=True)
                    shutil.rmtree(d / f"prefect-{again.name}", ignore_errors=True)
            corpus_bytes = sum(f.stat().st_size for f in (d / f"corpus-{k}").rglob("*.jsonl"))
            series[k] = (runs, corpus_bytes, len(line))
            shutil.rmtree(artifacts, ignore_errors=True)
            shutil.rmtree(d / f"prefect-{artifacts.name}", ignore_errors=True)
            shutil.rmtree(d / f"corpus-{k}", ignore_errors=True)
            cold_r, drop_r = runs["cold"][0], runs["+1 drop"][0]
            print(f"measured {k}x: {len(line)} documents, {corpus_bytes / 1e6:.1f} MB; cold data {data_seconds(cold_r):.2f} s "
                  f"(load {stage_seconds(cold_r, 'load'):.2f}); drop: load {stage_seconds(drop_r, 'load'):.2f} s, gate "
                  f"{drop_r['gate_seconds']:.2f} s, data {data_seconds(drop_r):.2f} s, trained {drop_r['trained']}",
                  flush=True)

    print(f"near-dedup on; corpus: ko_transport_bills + python_docs, every {args.every}th document, with re-exports "
          f"of 2 in 3 ({len(texts)} documents); drop: 1 file, {len(drop_docs)} documents ({drop_bytes / 1e6:.2f} "
          f"MB); tokenizer BPE 8k; chunk 1000/500; {os.cpu_count()} cores; each run a fresh `cpt retrain` process")
    if 1 in series:
        runs, corpus_bytes, docs = series[1]
        print(f"\npart 1: a line of {n} files ({docs} documents, {corpus_bytes / 1e6:.1f} MB), +1 drop "
              f"({drop_bytes / (corpus_bytes + drop_bytes):.1%} of the bytes after it)")
        print(f"{'run':16} {'trained':>8} {'data s':>8} {'gate s':>8} {'process s':>10}")
        for name, (result, wall) in runs.items():
            print(f"{name:16} {str(result['trained']):>8} {data_seconds(result):8.2f} {result['gate_seconds']:8.2f} "
                  f"{wall:10.2f}")
        for name in ("cold", "+1 drop"):
            stages = (runs[name][0].get("pipeline") or {}).get("stages", [])
            print(f"  {name} per data stage: " + ", ".join(f"{s['name']} {s['seconds']:.2f}" for s in stages
                                                          if s["name"] in DATA_STAGES) + f"; {near_counts(runs[name][0])}")
        def seconds(name: str) -> float:  # data stages + the drop gate (0 in a cold run)
            return data_seconds(runs[name][0]) + runs[name][0]["gate_seconds"]

        pairs = [(seconds(name), seconds(name.replace("cold", "+1 drop"))) for name in runs if name.startswith("cold")]
        cold, added = median(c for c, _ in pairs), median(a for _, a in pairs)
        stages_only = median([data_seconds(r) for name, (r, _) in runs.items()
                              if name == "+1 drop" or name.startswith("+1 drop (pair")])
        fixed_total = sum(fixed.values())
        print("per-process fixed costs (fresh processes, best of 3): " + ", ".join(
            f"{k} {v:.2f} s" for k, v in fixed.items()) + f"; together {fixed_total / cold:.3f} of the cold run")
        print("pairs (cold s, +1 s, ratio): " + "; ".join(f"{c:.2f}, {a:.2f}, {a / c:.3f}" for c, a in pairs))
        print(f"adding 1 file to {n}: data stages + gate = {added:.2f} s / cold {cold:.2f} s = {added / cold:.3f} "
              f"(goal <= 0.15; medians of {len(pairs)} pairs); the stages alone {stages_only / cold:.3f}; process wall "
              f"{runs['+1 drop'][1] / runs['cold'][1]:.3f} of cold; nothing changed: process wall "
              f"{runs['nothing changed'][1] / runs['cold'][1]:.3f} of cold")
    print(f"\npart 2: the same 1-file drop onto lines of {', '.join(f'{k}x' for k in sizes)} the size")
    print(f"{'line':>6} {'documents':>10} {'MB':>7} {'cold data s':>12} {'cold load s':>12} {'drop load s':>12} "
          f"{'drop gate s':>12} {'drop data+gate s':>17}")
    loads = []
    for k, (runs, corpus_bytes, docs) in series.items():
        cold_r = runs["cold"][0]
        dropped = sorted((r for name, (r, _) in runs.items() if name.startswith("+1 drop") and "(pair" not in name),
                         key=lambda r: stage_seconds(r, "load"))
        drop_r = dropped[len(dropped) // 2]  # the median drop by its load seconds (the upper of two)
        loads.append(stage_seconds(drop_r, "load"))
        print(f"{k:>5}x {docs:>10} {corpus_bytes / 1e6:>7.1f} {data_seconds(cold_r):>12.2f} "
              f"{stage_seconds(cold_r, 'load'):>12.2f} {loads[-1]:>12.3f} {drop_r['gate_seconds']:>12.2f} "
              f"{data_seconds(drop_r) + drop_r['gate_seconds']:>17.2f}   "
              + "; ".join(f"{stage_seconds(r, 'load'):.3f}" for r in dropped))
    if len(loads) > 1:
        print(f"the drop's load seconds, largest / smallest across line sizes: {max(loads) / max(min(loads), 1e-9):.2f} "
              f"(goal <= 1.5)")


if __name__ == "__main__":
    main()
