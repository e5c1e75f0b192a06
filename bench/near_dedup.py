"""Near-duplicate removal and decontamination, measured: quality against a brute-force ground truth, and cost
against the load stage's.

Corpus: the first --docs documents of ../shared/corpora/ko_transport_bills.jsonl + python_docs.jsonl, cut into
--files files. Planted near-duplicates go into one more file, the drop (+1 file): copies of --planted corpus
documents with one edit each, of several kinds and sizes — a new date line, other line wrapping, a header and
footer, typos fixed (a few characters), a sentence or a paragraph-sized run deleted, and heavy rewrites that
must NOT match — plus new documents. Ground truth: the same greedy choice the pipeline makes (documents visited
by age, then doc_id; one is removed when a kept one is at Jaccard ≥ threshold), on the exact Jaccard of the same
shingle sets computed for every pair (a sparse product); precision and recall of the removed documents.

Cost: load (`load.fn`, in process) cold on an empty artifacts root, near-dedup off (the baseline) and on (pairs
repeated, the median), then the +1 file drop; near-dedup's own seconds (signatures + LSH) timed inside it, in
wall and CPU seconds, and the whole on − off difference. Also: signature backends
(rensa, datasketch) on the same texts, and the LSH rebuild from cached signatures (what a persistent per-line
index would save).

Memory at line scale (`--line-docs`): the LSH over a synthetic line of that many documents' signatures (and a
quarter as many, for the growth a document), in fresh processes, as load hands the pieces over (the Arrow id
column, the signatures memory-mapped) and held in memory (ids as Python strings, signatures read).

Decontamination: paragraphs of ../shared/corpora/ko_law.jsonl (the held-out text) and English sentences planted
inside --planted training documents; how many are found, and how many clean documents are matched.

    .venv/bin/python -m bench.near_dedup [--docs 3000] [--files 8] [--planted 300] [--repeat 3] [--line-docs N]
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from bench.common import CORPORA, argument_parser, require, write_jsonl


def corpus_texts(corpora: Path, limit: int) -> list[str]:
    texts = []
    for name in ("ko_transport_bills.jsonl", "python_docs.jsonl"):
        for line in (corpora / name).read_text(encoding="utf-8").splitlines():
            t = json.loads(line).get("content") or ""
            if t.strip():
                texts.append(t)
    rng = random.Random(0)
    rng.shuffle(texts)
    return texts[:limit]


def edit(text: str, kind: str, rng: random.Random) -> str:
    """One re-export of `text`; "rewrite" replaces half of it (a different document, not a near-duplicate)."""
    n = len(text)
    if kind == "date":
        return f"{rng.randint(2020, 2027)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}\n" + text
    if kind == "wrap":
        return "\n".join(textwrap.wrap(text, rng.randint(30, 90)))
    if kind == "header":
        return f"[재배포 {rng.randint(1, 999)}호] 자료 제공: 국회 의안정보시스템\n\n{text}\n\n— 끝 —"
    if kind == "typos":
        chars = list(text)
        for i in rng.sample(range(n), min(n, max(1, n // 200))):
            chars[i] = rng.choice("가나다라마바사abcdefg")
        return "".join(chars)
    if kind == "cut_small":  # a sentence-sized run (2%) deleted
        k = max(1, n // 50)
        s = rng.randrange(max(n - k, 1))
        return text[:s] + text[s + k:]
    if kind == "cut_large":  # a paragraph-sized run (8%) deleted
        k = max(1, n // 12)
        s = rng.randrange(max(n - k, 1))
        return text[:s] + text[s + k:]
    if kind == "rewrite":
        half = n // 2
        return text[:half] + "".join(rng.choice("가나다라마바사아자차카타파하 ") for _ in range(n - half))
    raise ValueError(kind)


# One cold load in a fresh process: argv = corpus folder, artifacts root, near-dedup on; prints CPU seconds.
FRESH = """
import json, sys, time
import tasks.load as L
import tasks.data.files as F
from tasks.core.config.data import CorpusConfig, NearDedupConfig
spent = {"near_cpu": 0.0}
real = L.near_dedup_rows  # load's own name for it: what its stage calls
def timed(*a, **k):
    c = time.process_time()
    try:
        return real(*a, **k)
    finally:
        spent["near_cpu"] += time.process_time() - c
L.near_dedup_rows = timed
cfg = CorpusConfig(paths=[sys.argv[1]], near_dedup=NearDedupConfig(enabled=sys.argv[3] == "True"))
t0 = time.process_time()  # load's own imports are the stage's whichever the setting: left out
L.load.fn(**L.load_inputs(cfg, F.fingerprint_corpus(cfg)), artifacts=sys.argv[2])
print(json.dumps({"cpu": time.process_time() - t0, **spent}))
"""

KINDS = ("date", "wrap", "header", "typos", "cut_small", "cut_large", "rewrite")

# The LSH over a line of argv[1] documents in a fresh process: 8 pieces of random signatures (a tenth of pieces
# 1-7 near copies of piece 0's rows, 5% of their values changed), load's 16-hex-digit ids. argv[2] "mapped": as
# load hands them over (the Arrow id column, signatures memory-mapped); "held": the ids as Python strings and
# the signatures read into memory, what the pieces hold when nothing is mapped. Prints seconds and the peak
# anonymous memory (RssAnon, sampled every 10 ms) over the process's before the call.
LINE = """
import json, sys, tempfile, threading, time
import numpy as np, pyarrow as pa
from tasks.data import contamination as ct, minhash as mh, shingles as sh
from tasks.data import near_pass as npass
n, how = int(sys.argv[1]), sys.argv[2]
rng, tmp, parts = np.random.default_rng(0), tempfile.mkdtemp(), []
for p in range(8):
    sig = rng.integers(0, 2 ** 32, size=(n // 8, 128), dtype=np.uint32)
    if p:
        k = n // 80
        src = np.load(f"{tmp}/0.npy")[:k]
        flip = rng.random(src.shape) < 0.05
        src[flip] = rng.integers(0, 2 ** 32, size=int(flip.sum()), dtype=np.uint32)
        sig[:k] = src
    np.save(f"{tmp}/{p}.npy", sig)
    ids = pa.array([f"{x:016x}" for x in rng.integers(0, 2 ** 63, size=n // 8)])
    with pa.OSFile(f"{tmp}/{p}.arrow", "wb") as f, pa.ipc.new_file(f, pa.schema([("doc_id", pa.string())])) as w:
        w.write_table(pa.table({"doc_id": ids}))
    del sig, ids
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]) * 1024
base, peak, done = rss(), [0], []
def sample():
    while not done:
        peak[0] = max(peak[0], rss())
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
tables = [pa.ipc.open_file(pa.memory_map(f"{tmp}/{p}.arrow")).read_all() for p in range(8)]
if how == "mapped":
    parts = [(tb.column("doc_id"), np.load(f"{tmp}/{p}.npy", mmap_mode="r")) for p, tb in enumerate(tables)]
else:
    parts = [(tb.column("doc_id").to_pylist(), np.load(f"{tmp}/{p}.npy")) for p, tb in enumerate(tables)]
found = npass.near_duplicates(parts, list(range(8)), 0.8, 128)
seconds = time.perf_counter() - t
done.append(1)
time.sleep(0.02)
print(json.dumps({"seconds": seconds, "peak": max(peak[0], rss()) - base, "found": len(found)}))
"""


def ground_truth(texts: list[str], order: list[int], threshold: float, n: int):
    """Per document in `order`: removed (bool) by the greedy choice on exact Jaccard of the shingle sets."""
    import numpy as np
    from scipy import sparse

    from tasks.data.shingles import shingles

    vocab: dict[str, int] = {}
    rows, cols = [], []
    for i, t in enumerate(texts):
        for s in shingles(t, n):
            rows.append(i)
            cols.append(vocab.setdefault(s, len(vocab)))
    x = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(texts), len(vocab)))
    sizes = np.asarray(x.sum(axis=1)).ravel()
    inter = (x @ x.T).toarray()
    jac = inter / (sizes[:, None] + sizes[None, :] - inter)
    kept: list[int] = []
    removed = {}
    for i in order:
        removed[i] = bool(kept) and float(jac[i, kept].max()) >= threshold
        if not removed[i]:
            kept.append(i)
    return removed, jac


def main() -> None:
    parser = argument_parser(__spec__, __doc__)
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--planted", type=int, default=300)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--repeat", type=int, default=3, help="cold load pairs (off, on) to take the median of")
    parser.add_argument("--corpora", type=Path, default=CORPORA, help="folder of the shared corpora")
    parser.add_argument("--line-docs", type=int, default=400_000,
                        help="documents of the synthetic line whose LSH memory is measured (0: skip)")
    args = parser.parse_args()
    corpora = args.corpora
    require(corpora / "ko_transport_bills.jsonl", corpora / "python_docs.jsonl", corpora / "ko_law.jsonl")

    import numpy as np

    import tasks.load as load_module
    from tasks.data import contamination as ct, minhash as mh, shingles as sh
    from tasks.data import near_pass as npass
    from tasks.core.config.data import CorpusConfig, DecontaminateConfig, NearDedupConfig
    from tasks.data.files import fingerprint_corpus
    from tasks.data.records import doc_id_of
    from tasks.load import load, load_inputs
    from tasks.data.contamination import ContaminationIndex, _units
    from tasks.shuffle import decontaminate

    rng = random.Random(1)
    texts = corpus_texts(corpora, args.docs)
    picked = rng.sample(range(len(texts)), args.planted)
    planted = [edit(texts[i], KINDS[k % len(KINDS)], rng) for k, i in enumerate(picked)]
    new_docs = [f"새 문서 {k}: " + "".join(rng.choice("가나다라마바사아자차카타파하 ") for _ in range(400))
                            for k in range(args.planted // 3)]
    cfg_nd = NearDedupConfig(enabled=True, threshold=args.threshold)

    # --- quality: the pipeline's functions against the brute-force truth, on the same shingles
    everything = texts + planted + new_docs
    ranks = [0] * len(texts) + [1] * (len(planted) + len(new_docs))
    ids = [doc_id_of(t) for t in everything]
    order = sorted(range(len(everything)), key=lambda i: (ranks[i], ids[i]))
    # Exact copies are the exact dedup's: left out of both sides, as the pipeline does.
    seen, unique_order = set(), []
    for i in order:
        if ids[i] not in seen:
            seen.add(ids[i])
            unique_order.append(i)
    t0 = time.perf_counter()
    truth, jac = ground_truth(everything, unique_order, args.threshold, cfg_nd.shingle_chars)
    brute = time.perf_counter() - t0
    sig_time = {}
    for backend in ("rensa", "datasketch"):
        t0 = time.perf_counter()
        sigs = mh.signatures(everything, cfg_nd.num_perm, cfg_nd.shingle_chars, cfg_nd.seed, backend)
        sig_time[backend] = time.perf_counter() - t0
        if backend == mh.BACKEND:
            chosen = sigs
    sigs = chosen
    base, drop = (ids[:len(texts)], sigs[:len(texts)]), (ids[len(texts):], sigs[len(texts):])
    t0 = time.perf_counter()
    split = len(texts)
    found = npass.near_duplicates([base, drop], [0, 1], args.threshold, cfg_nd.num_perm,
                               lambda p, r: everything[r if p == 0 else split + r], cfg_nd.shingle_chars)
    estimate_only = npass.near_duplicates([base, drop], [0, 1], args.threshold, cfg_nd.num_perm)
    lsh = time.perf_counter() - t0
    row_of = {ids[i]: i for i in unique_order}
    predicted = {row_of[d.doc_id] for d in found}
    true_removed = {i for i, r in truth.items() if r}
    tp = len(predicted & true_removed)
    recall = tp / max(len(true_removed), 1)
    precision = tp / max(len(predicted), 1)
    est = {row_of[d.doc_id] for d in estimate_only}
    pair_ok = sum(jac[row_of[d.doc_id], row_of[d.kept_doc_id]] >= args.threshold for d in found) / max(len(found), 1)
    print(f"corpus: {len(texts)} documents (+ drop: {len(planted)} planted edits, {len(new_docs)} new), "
          f"threshold {args.threshold}, num_perm {cfg_nd.num_perm}, {cfg_nd.shingle_chars}-char shingles")
    print(f"ground truth (brute force, {len(unique_order)}² pairs, {brute:.1f}s): {len(true_removed)} to remove")
    print(f"near-dedup removes {len(predicted)}: recall {recall:.3f}, precision {precision:.3f} "
          f"(pairs reported at true J ≥ threshold: {pair_ok:.3f})")
    print(f"on the MinHash estimate alone (no exact check): recall {len(est & true_removed) / max(len(true_removed), 1):.3f}, "
          f"precision {len(est & true_removed) / max(len(est), 1):.3f}")
    for kind in KINDS:
        rows = [len(texts) + k for k in range(len(planted)) if KINDS[k % len(KINDS)] == kind]
        js = [float(jac[r, picked[k]]) for k, r in zip([k for k in range(len(planted))
                                                        if KINDS[k % len(KINDS)] == kind], rows)]
        caught = sum(r in predicted for r in rows)
        print(f"  {kind:9s}: {caught}/{len(rows)} removed, true J median {np.median(js):.3f} "
              f"(should go: {sum(r in true_removed for r in rows)})")
    print(f"signatures of {len(everything)} documents: rensa {sig_time['rensa']:.2f}s, "
          f"datasketch {sig_time['datasketch']:.2f}s (×{sig_time['datasketch'] / sig_time['rensa']:.1f})")
    print(f"LSH rebuilt from signatures + queried: {lsh:.2f}s (a persistent per-line index would save at most this)")

    # --- cost in the load stage: cold (off = baseline, on), then +1 file drop
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = -(-len(texts) // args.files)
        for f in range(args.files):
            write_jsonl(tmp / "corpus" / f"part-{f:03d}.jsonl", texts[f * size:(f + 1) * size])
        write_jsonl(tmp / "drop" / "d.jsonl", planted + new_docs)
        spent = {"near": 0.0, "near_cpu": 0.0}
        real = load_module.near_dedup_rows

        def timed_rows(*a, **k):
            t, c = time.perf_counter(), time.process_time()
            try:
                return real(*a, **k)
            finally:
                spent["near"] += time.perf_counter() - t
                spent["near_cpu"] += time.process_time() - c

        load_module.near_dedup_rows = timed_rows

        def run(root: Path, paths: list[Path], enabled: bool):
            cfg = CorpusConfig(paths=[str(p) for p in paths], near_dedup=cfg_nd.model_copy(update={"enabled": enabled}))
            sources = fingerprint_corpus(cfg)
            spent.update(near=0.0, near_cpu=0.0)
            t, c = time.perf_counter(), time.process_time()
            out = load.fn(**load_inputs(cfg, sources), artifacts=str(root))
            return out, time.perf_counter() - t, time.process_time() - c, spent["near"], spent["near_cpu"]

        # One-time costs (imports, the first publish) are neither side's: a warm-up on one small file.
        write_jsonl(tmp / "warm" / "w.jsonl", texts[:20])
        run(tmp / "warm-root", [tmp / "warm"], True)
        # Cold pairs (off, then on) on fresh roots, --repeat times: on a shared machine one pair can be off by
        # half. CPU seconds (the process's, all threads) beside wall seconds: they vary less with the load of
        # other processes.
        wall, cpu, diff = [], [], []
        for k in range(args.repeat):
            _, cold_off, cpu_off, _, _ = run(tmp / f"off-{k}", [tmp / "corpus"], False)
            _, cold_on, cpu_on, near_cold, near_cpu = run(tmp / f"on-{k}", [tmp / "corpus"], True)
            wall.append(near_cold / cold_off)
            cpu.append(near_cpu / cpu_off)
            diff.append((cpu_on - cpu_off) / cpu_off)
            print(f"  cold pair {k + 1}: load off {cold_off:.2f}s ({cpu_off:.2f}s CPU); on {cold_on:.2f}s, of which "
                  f"near-dedup {near_cold:.2f}s ({near_cpu:.2f}s CPU)")
        med = lambda v: float(np.median(v))  # noqa: E731
        print(f"near-dedup / cold load (near-dedup off), median of {args.repeat}: {med(wall):.2f}× wall, "
              f"{med(cpu):.2f}× CPU; whole load on − off: {med(diff):.2f}× CPU (goal ≤ 0.5)")
        _, drop_off, _, _, _ = run(tmp / "off-0", [tmp / "corpus", tmp / "drop"], False)
        out, drop_on, _, near_drop, _ = run(tmp / "on-0", [tmp / "corpus", tmp / "drop"], True)
        print(f"load +1 file drop: off {drop_off:.2f}s; on {drop_on:.2f}s, of which near-dedup {near_drop:.2f}s "
              f"= {near_drop / cold_off:.2f}× the cold baseline; near_duplicates {out.counts['near_duplicates']}")
        # What a run pays in a fresh process, imports included (the warm-up above leaves them out).
        fresh = {on: json.loads(subprocess.run(
            [sys.executable, "-c", FRESH, str(tmp / "corpus"), str(tmp / f"fresh-{on}"), str(on)],
            capture_output=True, text=True, check=True).stdout.splitlines()[-1]) for on in (False, True)}
        print(f"a fresh process's cold load: off {fresh[False]['cpu']:.2f}s CPU; on, near-dedup "
              f"{fresh[True]['near_cpu']:.2f}s CPU = {fresh[True]['near_cpu'] / fresh[False]['cpu']:.2f}× (the "
              "imports it needs included)")

    # --- memory at line scale: the LSH over many documents, as load hands the pieces over and held in memory
    if args.line_docs:
        runs = {}
        for how in ("held", "mapped"):
            for n in (args.line_docs // 4, args.line_docs):
                runs[how, n] = json.loads(subprocess.run([sys.executable, "-c", LINE, str(n), how], capture_output=True,
                                                         text=True, check=True).stdout.splitlines()[-1])
        small, big = args.line_docs // 4, args.line_docs
        slope = {how: (runs[how, big]["peak"] - runs[how, small]["peak"]) / (big - small) for how in ("held", "mapped")}
        for how in ("held", "mapped"):
            r = runs[how, big]
            print(f"LSH over a line of {big:,} documents, {how}: {r['seconds']:.2f}s, peak {r['peak'] / 2 ** 20:.0f} "
                  f"MiB, {slope[how]:.0f} bytes a document more ({r['found']:,} near copies found)")
        print(f"  as load hands it over / held in memory: memory a document {slope['mapped'] / slope['held']:.2f}×, "
              f"seconds {runs['mapped', big]['seconds'] / runs['held', big]['seconds']:.2f}× (a signature is 512 "
              "bytes)")

    # --- decontamination: held-out paragraphs planted in training documents
    law = [json.loads(x)["content"] for x in (corpora / "ko_law.jsonl").read_text(encoding="utf-8").splitlines()]
    english = ["The committee shall review every amendment before the final vote is taken by the full assembly "
               "of members present.", "A function returns None when it reaches the end of its body without "
               "executing a return statement of any kind."]
    held = [(t, "evaluate.general_corpus") for t in law] + [(t, "evaluate.general_corpus") for t in english]
    long_law = [t for t in law if len(" ".join(t.split())) >= 150]
    train = list(texts)
    dirty = set()
    for k, i in enumerate(rng.sample(range(len(train)), min(args.planted, len(train)))):
        if k % 5 == 4:
            span = english[k % 2]
        else:
            src = long_law[k % len(long_law)]  # spans of the configured length or more: shorter is no match
            start = rng.randrange(max(len(src) - 120, 1))
            span = src[start:start + 120]
        cut = rng.randrange(len(train[i]) + 1)
        train[i] = train[i][:cut] + "\n" + span + "\n" + train[i][cut:]
        dirty.add(i)
    t0 = time.perf_counter()
    keep, matched = decontaminate(np.arange(len(train)), train.__getitem__, np.array([], dtype=np.int64), held,
                                  DecontaminateConfig(enabled=True))
    seconds = time.perf_counter() - t0
    removed = set(range(len(train))) - set(keep.tolist())
    print(f"decontamination: {len(removed & dirty)}/{len(dirty)} planted found, {len(removed - dirty)} of "
          f"{len(train) - len(dirty)} clean documents matched, {seconds:.2f}s for {len(train)} documents "
          f"against {len(held)} held-out texts ({matched})")
    index = ContaminationIndex(50 // 2 * 2, 50)
    for t, src in held:
        index.add(t, src)
    for i in sorted(removed - dirty)[:2]:  # what a clean document shares with the held-out text
        unit, units = _units(train[i])
        g = index.g[unit]
        for p in range(0, len(units) - g + 1, g):
            gram = units[p:p + g] if isinstance(units, str) else " ".join(units[p:p + g])
            if index.match(gram) is not None:
                print(f"  clean document {i} shares e.g. {gram!r}")
                break


if __name__ == "__main__":
    main()
