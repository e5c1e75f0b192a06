"""Does the data path scale? `cpt run --until chunk` on one generated JSON-lines file per size (and the largest
size again as many files), with the flow process and all its children sampled for anonymous memory.

Corpus: the documents of ../shared/corpora/*.jsonl repeated until the size is reached, every copy tagged
(`[copy k]` in front of its text), so no document is an exact duplicate of another: every document has size / 20 MB
near-copies (about 7 at 150 MB, 29 at 600 MB), as boilerplate pages, re-exports and templated records do in real
corpora. Near-dedup is on, as a user has it (--near-dedup off: each copy is kept and tokenized); its seconds
(signatures, band keys and the pass, inside load: load's meta) are printed against the rest of load + tokenize
(goal ≤ 0.5). Tokenizer:
a byte-level BPE trained here on every 4th of those documents (`--vocab`, default 16k; `--vocab 70000` or more
makes the ids uint32, as a 262k vocabulary does), with a tiny model beside it so `model.id` is a model dir;
nothing is downloaded. Chunking 1000/500 as the seed's.

Prints per size and stage (load, shuffle, tokenize, token-stats, chunk): seconds (the run summary's), peak
anonymous memory (RssAnon of the flow process plus its descendants, summed, sampled every --interval s,
attributed to the stage whose run interval holds the sample) and artifact bytes (the stage's cache entries and
its per-file pieces; a hard-linked file counted once). The baseline, measured in this same script: the Rust
tokenizer's `encode_batch_fast` alone on each size's text (its first `--raw-sample` bytes, 600 MB: the
corpus repeats the same documents; batches of 1,000 documents, the clock around the calls only), in text bytes per second, run just before that size's flow (on a shared machine, other load
moves both). Ratios: data-stage throughput / raw encode throughput (goal ≥ 0.8),
peak memory of the largest size / the smallest against their corpus ratio (goal ≤ 1.5 while the corpus
grows 16×), seconds against proportional (goal ≤ 1.15), artifact bytes / corpus bytes (goal ≤ 4).

    .venv/bin/python -m bench.scale [--sizes 150MB,600MB,2400MB] [--files 64] [--vocab 16000]
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

from bench.common import CORPORA, CPT, DATA_STAGES, ROOT, argument_parser, quiet_env

UNITS = {"KB": 1e3, "MB": 1e6, "GB": 1e9}
# Cache folders of a stage's own entries and of its per-file pieces.
STAGE_DIRS = {"load": ("load", "load-file"), "shuffle": ("shuffle",), "tokenize": ("tokenize", "tokenize-file"),
              "token-stats": ("token-stats", "token-stats-part"), "chunk": ("chunk", "chunk-part")}


def parse_size(text: str) -> int:
    text = text.strip().upper()
    for unit, factor in UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def source_texts(corpora: Path) -> list[str]:
    texts = []
    for path in sorted(corpora.glob("*.jsonl")):
        with path.open(encoding="utf-8") as f:
            texts += [json.loads(line)["content"] for line in f if line.strip()]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise SystemExit(f"{corpora}: no JSON-lines corpus with a `content` field (pass --corpora)")
    return texts


def write_corpus(texts: list[str], size: int, out: Path, files: int = 1) -> tuple[int, int]:
    """`size` bytes of tagged copies of `texts` as JSON lines: one file `out`, or `files` files in the folder
    `out`, written as they are made (never held whole). Returns (bytes, documents)."""
    if files > 1:
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"part-{i:03d}.jsonl" for i in range(files)]
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        paths = [out]
    per_file = size / len(paths)
    written = docs = copy = 0
    handles = iter(paths)
    f = open(next(handles), "wb")
    in_file = 0
    try:
        while written < size:
            for text in texts:
                line = (json.dumps({"content": f"[copy {copy}] {text}"}, ensure_ascii=False) + "\n").encode()
                if in_file >= per_file:
                    f.close()
                    f = open(next(handles), "wb")
                    in_file = 0
                f.write(line)
                written += len(line)
                in_file += len(line)
                docs += 1
                if written >= size:
                    break
            copy += 1
    finally:
        f.close()
    return written, docs


def corpus_batches(path: Path, batch: int = 1000, limit: int | None = None):
    """The corpus's texts in batches of `batch`, in file order, stopping after about `limit` bytes of lines."""
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    texts, read = [], 0
    for p in files:
        with p.open(encoding="utf-8") as f:
            for line in f:
                texts.append(json.loads(line)["content"])
                read += len(line.encode())
                if len(texts) == batch or (limit and read >= limit):
                    yield texts
                    texts = []
                if limit and read >= limit:
                    return
    if texts:
        yield texts


def raw_encode(tokenizer_json: Path, corpus: Path, limit: int | None = None) -> tuple[float, int, int]:
    """The baseline: `encode_batch_fast` alone over the corpus (its first `limit` bytes). Returns (seconds in the
    calls, bytes, tokens)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_truncation()
    tok.no_padding()
    seconds, nbytes, tokens = 0.0, 0, 0
    for texts in corpus_batches(corpus, limit=limit):
        nbytes += sum(len(t.encode()) for t in texts)
        t0 = time.perf_counter()
        encodings = tok.encode_batch_fast(texts, add_special_tokens=False)
        seconds += time.perf_counter() - t0
        tokens += sum(len(e.ids) for e in encodings)
    return seconds, nbytes, tokens


# ------------------------------------------------------------------------------------------- memory sampling


def _ppid_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d))
    return children


def rss_anon_tree(pid: int) -> int:
    """RssAnon (bytes) of `pid` and all its descendants, summed."""
    children = _ppid_map()
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
    return total


class Sampler(threading.Thread):
    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []  # (wall clock time, bytes)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.time(), rss_anon_tree(self.pid)))
            self.done.wait(self.interval)


# --------------------------------------------------------------------------------------------- one flow run


def unique_bytes(folders: list[Path], seen: set[tuple[int, int]]) -> int:
    total = 0
    for folder in folders:
        for p in folder.rglob("*") if folder.is_dir() else []:
            if p.is_file():
                st = p.stat()
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_size
    return total


def run_flow(corpus: Path, model: Path, work: Path, interval: float, env: dict, near_dedup: bool = True) -> dict:
    import yaml

    artifacts = work / "artifacts"
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump({"corpus": {"paths": [str(corpus)], "near_dedup": {"enabled": near_dedup}},
                                      "model": {"id": str(model)}, "chunk": {"max_seq_length": 1000, "overlap": 500}}))
    summary = work / "summary.json"
    started = time.time()
    proc = subprocess.Popen([CPT, "run", "--config", str(config), "--until", "chunk", "--artifacts", str(artifacts),
                             "--summary", str(summary)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    sampler = Sampler(proc.pid, interval)
    sampler.start()
    out, _ = proc.communicate()
    sampler.done.set()
    sampler.join()
    wall = time.time() - started
    if proc.returncode:
        raise SystemExit(f"cpt run failed:\n{out[-4000:]}")
    stages = {s["name"]: s for s in json.loads(summary.read_text())["stages"]}
    seen: set[tuple[int, int]] = set()
    rows = {}
    # Pieces first: an output that hard-links its pieces' files (load's, mix's validation windows) is counted once.
    for name in DATA_STAGES:
        s = stages[name]
        end = _entry_time(Path(s["output"]))
        window = [b for t, b in sampler.samples if end - s["seconds"] - interval <= t <= end + interval]
        dirs = [artifacts / "cache" / d for d in reversed(STAGE_DIRS[name])]
        rows[name] = {"seconds": s["seconds"], "peak_anon": max(window, default=0),
                      "bytes": unique_bytes(dirs, seen)}
    before = [b for t, b in sampler.samples
              if t < _entry_time(Path(stages["load"]["output"])) - stages["load"]["seconds"]]
    return {"stages": rows, "peak_anon": max((b for _, b in sampler.samples), default=0),
            "startup_peak_anon": max(before, default=0), "wall": wall,
            "data_seconds": sum(r["seconds"] for r in rows.values()),
            "artifact_bytes": sum(r["bytes"] for r in rows.values()),
            "tokens": stages["tokenize"]["counts"].get("tokens"),
            "near_dedup_seconds": (_meta(Path(stages["load"]["output"])).get("near_dedup_pass") or {}).get("seconds"),
            "kept": stages["load"]["counts"].get("documents"),
            "token_type": _meta(Path(stages["tokenize"]["output"])).get("token_type", "int32")}


def _meta(entry: Path) -> dict:
    from tasks.core.manifest import MANIFEST

    try:
        return json.loads((entry / MANIFEST).read_text()).get("meta", {})
    except (OSError, ValueError):
        return {}


def _entry_time(entry: Path) -> float:
    """When a stage's entry was published: its newest file's mtime (the manifest, written last)."""
    times = [p.stat().st_mtime for p in entry.rglob("*") if p.is_file()] if entry.is_dir() else []
    return max(times, default=entry.stat().st_mtime if entry.exists() else time.time())


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    ap = argument_parser(__spec__, __doc__)
    ap.add_argument("--sizes", default="150MB,600MB,2400MB", help="corpus sizes, one file each (e.g. 10MB,40MB)")
    ap.add_argument("--files", type=int, default=64, help="also run the largest size cut into this many files "
                                                           "(0: not)")
    ap.add_argument("--vocab", type=int, default=16_000, help="BPE vocabulary trained here (> 65,536: uint32 ids)")
    ap.add_argument("--corpora", type=Path, default=CORPORA, help="folder of *.jsonl documents to repeat")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between memory samples")
    ap.add_argument("--near-dedup", choices=("on", "off"), default="on", help="near-dedup in load (default on)")
    ap.add_argument("--work", type=Path, default=ROOT / "artifacts" / "bench" / "scale",
                    help="scratch folder (corpora, artifacts roots); each size's is removed after its run")
    ap.add_argument("--keep", action="store_true", help="keep every size's corpus and artifacts")
    ap.add_argument("--raw-sample", default="600MB",
                    help="the baseline encodes at most this much of each size's text (its first documents: the "
                         "generated corpus repeats the same documents, so its rate is the whole's; 0: all)")
    args = ap.parse_args()
    import shutil

    from tasks.ml.tiny_model import build_tiny_model

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    texts = source_texts(args.corpora)
    model = args.work / f"model-bpe{args.vocab}"
    if not (model / "tokenizer.json").is_file():
        build_tiny_model(model, texts[::4], vocab_size=args.vocab)
    env = quiet_env(PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
                    HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="true",
                    CPT_CACHE_HOME=str(args.work / "user-cache"))
    vocab = json.loads((model / "tokenizer.json").read_text())["model"]["vocab"]
    print(f"tokenizer: byte-level BPE trained here, {len(vocab):,} entries; chunk 1000/500; {os.cpu_count()} cores; "
          f"memory sampled every {args.interval} s (RssAnon, flow process + children)")

    runs = [(size, 1) for size in sizes] + ([(sizes[-1], args.files)] if args.files > 1 else [])
    results, raw = [], None
    for size, files in runs:
        work = args.work / f"{size}-{files}"
        shutil.rmtree(work, ignore_errors=True)
        corpus = work / ("corpus" if files > 1 else "corpus.jsonl")
        nbytes, docs = write_corpus(texts, size, corpus, files)
        if files == 1 or raw is None:  # the many-files run holds the same text as the largest single file
            seconds, raw_bytes, raw_tokens = raw_encode(model / "tokenizer.json", corpus,
                                                        parse_size(args.raw_sample) or None)
            raw = {"seconds": seconds, "bytes": raw_bytes, "tokens": raw_tokens, "bps": raw_bytes / seconds}
        r = run_flow(corpus, model, work, args.interval, env, args.near_dedup == "on")
        r.update(size=nbytes, docs=docs, files=files)
        results.append(r)
        print(f"\n{nbytes / 1e6:,.1f} MB, {docs:,} documents, {files} file(s), {r['tokens']:,} tokens "
              f"({r['token_type']}); process wall {r['wall']:.1f} s, peak anonymous memory {mib(r['peak_anon'])} "
              f"(before the first stage {mib(r['startup_peak_anon'])})")
        print(f"  baseline on this text: encode_batch_fast alone {raw['seconds']:.2f} s, {raw['bps'] / 1e6:.2f} MB/s, "
              f"{raw['tokens']:,} tokens in its first {raw['bytes'] / 1e6:,.0f} MB")
        print(f"  {'stage':<12} {'seconds':>9} {'peak anon':>11} {'artifact bytes':>16} {'× corpus':>9}")
        for name, s in r["stages"].items():
            print(f"  {name:<12} {s['seconds']:>9.2f} {mib(s['peak_anon']):>11} {s['bytes']:>16,} "
                  f"{s['bytes'] / nbytes:>9.2f}")
        if r["near_dedup_seconds"] is not None:
            nd = r["near_dedup_seconds"]
            rest = r["stages"]["load"]["seconds"] - nd + r["stages"]["tokenize"]["seconds"]
            print(f"  near-dedup {nd:.2f} s inside load ({r['kept']:,} of {docs:,} documents kept, ~{size / 20e6:.0f} "
                  f"near-copies each): {nd / rest:.2f}× the rest of load + tokenize ({rest:.2f} s; goal ≤ 0.5)")
        through = nbytes / r["data_seconds"]
        print(f"  {'data stages':<12} {r['data_seconds']:>9.2f} {'':>11} {r['artifact_bytes']:>16,} "
              f"{r['artifact_bytes'] / nbytes:>9.2f}")
        print(f"  throughput {through / 1e6:.2f} MB/s = {through / raw['bps']:.2f}× raw encode_batch_fast "
              f"(goal ≥ 0.8); artifacts {r['artifact_bytes'] / nbytes:.2f}× the corpus (goal ≤ 4)")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    singles = [r for r in results if r["files"] == 1]
    if len(singles) > 1:
        a, b = singles[0], singles[-1]
        grow = b["size"] / a["size"]
        print(f"\nsmallest → largest single file: corpus ×{grow:.1f}; peak anonymous memory "
              f"×{b['peak_anon'] / a['peak_anon']:.2f} (goal ≤ 1.5); data-stage seconds "
              f"×{b['data_seconds'] / a['data_seconds']:.2f} = {b['data_seconds'] / a['data_seconds'] / grow:.2f}× "
              f"proportional (goal ≤ 1.15; with near-dedup, ×{b['data_seconds'] / a['data_seconds']:.2f} against "
              f"≤ {1.15 * grow:.1f})")
        if a.get("near_dedup_seconds") and b.get("near_dedup_seconds"):
            print(f"  near-dedup seconds ×{b['near_dedup_seconds'] / a['near_dedup_seconds']:.2f} for corpus "
                  f"×{grow:.1f}")
        for name in DATA_STAGES:
            sa, sb = a["stages"][name], b["stages"][name]
            print(f"  {name:<12} memory ×{sb['peak_anon'] / max(sa['peak_anon'], 1):.2f}, seconds "
                  f"{sb['seconds'] / max(sa['seconds'], 1e-9) / grow:.2f}× proportional")
    if len(results) > len(singles):
        m, s = results[-1], singles[-1]
        print(f"\n{m['files']} files against one file of {s['size'] / 1e6:,.0f} MB: data-stage seconds "
              f"×{m['data_seconds'] / s['data_seconds']:.2f}, peak anonymous memory "
              f"×{m['peak_anon'] / s['peak_anon']:.2f}")


if __name__ == "__main__":
    main()
