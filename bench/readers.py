"""Load's readers at growing corpus sizes: seconds and peak anonymous memory per format, as ratios against the
smallest size (linear time: the seconds ratio follows the size ratio; flat memory: the memory ratio stays near
1), with the old whole-file readers as a baseline where they are cheap enough to run.

Corpus: the documents of ../shared/corpora/*.jsonl repeated until a size is reached, each copy tagged
(`[copy N]` prepended) so no document is a duplicate, written as .jsonl, a .json array (indented: one element
spans lines, as exports write them), .csv, .parquet, and .txt (one document a file, so many files).

Each reading runs in a fresh child process that only iterates `tasks.data.readers.read_corpus_file` (the records, no
piece written) while a thread samples RssAnon in /proc/self/status every 5 ms: "peak anon" is that sampled
maximum less the value before reading (resident anonymous memory: the heap, not the page cache of the file).
A second run of the same reading under tracemalloc gives "Python's own peak": the most the Python objects took
at once (what the reader holds), without the memory the C allocators keep after it was freed, which RssAnon
still counts.

Also, on the real corpora: JSON-lines parsing throughput of json, orjson and msgspec (the parser load uses is
the fastest that gives the same objects), and the JSON array reader against ijson (yajl2_c) where installed.

    .venv/bin/python -m bench.readers [--sizes 20 80 320] [--formats jsonl json csv parquet txt]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import CORPORA, ROOT, argument_parser

FORMATS = ("jsonl", "json", "csv", "parquet", "txt")


def source_texts() -> list[str]:
    texts = []
    for f in sorted(CORPORA.glob("*.jsonl")):
        with open(f, encoding="utf-8") as lines:
            texts += [json.loads(line)["content"] for line in lines if line.strip()]
    if not texts:
        sys.exit(f"no corpus under {CORPORA}: this benchmark needs ../shared/corpora beside the checkout")
    return texts


def tagged(texts: list[str], size: int):
    """Documents of about `size` UTF-8 bytes in all: `texts` over and over, each copy tagged."""
    total, copy = 0, 0
    while total < size:
        for t in texts:
            doc = f"[copy {copy}] {t}"
            total += len(doc.encode()) + 16
            yield doc
            if total >= size:
                return
        copy += 1


def write_corpus(fmt: str, texts: list[str], size: int, folder: Path) -> Path:
    """The corpus of `size` bytes in one format; a folder of files for txt, one file otherwise."""
    docs = tagged(texts, size)
    if fmt == "txt":
        out = folder / "txt"
        out.mkdir(parents=True)
        for i, doc in enumerate(docs):
            (out / f"{i:07d}.txt").write_text(doc, encoding="utf-8")
        return out
    path = folder / f"corpus.{fmt}"
    if fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({"content": doc}, ensure_ascii=False) + "\n")
    elif fmt == "json":
        with open(path, "w", encoding="utf-8") as f:
            f.write("[\n")
            for i, doc in enumerate(docs):
                f.write((",\n" if i else "") + json.dumps({"id": i, "content": doc}, ensure_ascii=False, indent=1))
            f.write("\n]\n")
    elif fmt == "csv":
        import csv

        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "content"])
            for i, doc in enumerate(docs):
                w.writerow([i, doc])
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        with pq.ParquetWriter(path, pa.schema([("content", pa.string())])) as w:
            batch = []
            for doc in docs:
                batch.append(doc)
                if len(batch) == 2000:
                    w.write_table(pa.table({"content": batch}))
                    batch = []
            if batch:
                w.write_table(pa.table({"content": batch}))
    return path


def corpus_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size


# --- the child: one reading, its seconds and peak anonymous memory ------------------------------------------

CHILD = r"""
import json, sys, threading, time
from pathlib import Path

def rss_anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0

which, path = sys.argv[1], Path(sys.argv[2])
from tasks.core.config.data import CorpusConfig
import tasks.data.readers as load
import bench.readers as bench
import pyarrow.parquet  # imported before the baseline: its allocator's pools are not the reader's memory
cfg = CorpusConfig(paths=[str(path)], on_bad_record="skip")
files = sorted(path.iterdir()) if path.is_dir() else [path]
base, peak, done = rss_anon(), [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss_anon())
        time.sleep(0.005)

traced = sys.argv[3] == "traced"
if traced:
    import tracemalloc
    tracemalloc.start()
t = threading.Thread(target=sample, daemon=True)
t.start()
start = time.perf_counter()
records = rejects = 0
for f in files:
    items = load.read_corpus_file(f, cfg) if which == "new" else bench.old_reader(f)
    for item in items:
        if isinstance(item, load.Reject):
            rejects += 1
        else:
            records += 1
seconds = time.perf_counter() - start
done.set(); t.join()
peak[0] = max(peak[0], rss_anon())
py_peak = tracemalloc.get_traced_memory()[1] if traced else 0
print(json.dumps({"seconds": seconds, "peak_anon": peak[0] - base, "records": records, "rejects": rejects,
                  "py_peak": py_peak}))
"""


def measure(which: str, path: Path, timeout: float, traced: bool = False) -> dict | None:
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, which, str(path), "traced" if traced else "-"], cwd=ROOT, capture_output=True,
                             text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return None
    if out.returncode:
        sys.exit(f"reading {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the old readers (before streaming): whole file in memory; a JSON array's lines found by rescanning ---------

def old_reader(path: Path):
    """What load did before: the file read whole; JSON lines split into a list; a JSON array parsed element by
    element with each element's line counted from the file's start (quadratic). Only jsonl and json."""
    from tasks.core.config.data import CorpusConfig
    from tasks.data.records import Record, Reject, _text_of

    cfg = CorpusConfig()
    data = path.read_bytes()
    if path.suffix == ".jsonl":
        for lineno, raw in enumerate(data.split(b"\n"), start=1):
            if raw.strip():
                text, _ = _text_of(json.loads(raw.decode("utf-8")), cfg)
                yield Record(f"{path}:{lineno}", text)
        return
    text = data.decode("utf-8")
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    while True:
        while text[pos] in " \t\r\n,":
            pos += 1
        if text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        obj, pos = decoder.raw_decode(text, pos)
        t, reason = _text_of(obj, cfg)
        yield Record(f"{path}:{line}", t) if reason is None else Reject(f"{path}:{line}", reason, "")


# --- parsers on the real corpora ----------------------------------------------------------------------------

def parser_throughput() -> list[str]:
    import orjson

    lines = [raw for f in sorted(CORPORA.glob("*.jsonl")) for raw in f.read_bytes().split(b"\n") if raw.strip()]
    mb = sum(map(len, lines)) / 1e6
    parsers = {"json": lambda b: json.loads(b.decode("utf-8")), "orjson": orjson.loads}
    try:
        import msgspec

        parsers["msgspec"] = msgspec.json.Decoder().decode
    except ImportError:
        pass
    expected = [json.loads(b) for b in lines]
    rows, base = [], None
    for name, parse in parsers.items():
        best = min(_timed(lambda: [parse(b) for b in lines]) for _ in range(3))
        same = [parse(b) for b in lines] == expected
        base = base or best
        rows.append(f"  {name:8s} {mb / best:7.0f} MB/s  ×{base / best:.2f} of json  same objects: {same}")
    if "msgspec" not in parsers:
        rows.append("  msgspec  not installed (pip install msgspec to compare)")
    return rows


def array_against_ijson(path: Path) -> list[str]:
    try:
        import ijson
    except ImportError:
        return ["  ijson not installed (pip install ijson to compare)"]
    with open(path, "rb") as f:
        ij = _timed(lambda: sum(1 for _ in ijson.items(f, "item")))
    from tasks.core.config.data import CorpusConfig
    from tasks.data.readers import read_corpus_file

    ours = _timed(lambda: sum(1 for _ in read_corpus_file(path, CorpusConfig())))
    mb = path.stat().st_size / 1e6
    return [f"  ijson ({ijson.backend}) items only, no line numbers: {mb / ij:6.1f} MB/s",
            f"  load's window reader, records with their lines:   {mb / ours:6.1f} MB/s (×{ij / ours:.2f} of ijson)"]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argument_parser(__spec__, __doc__)
    ap.add_argument("--sizes", type=float, nargs="+", default=[20, 80, 320], help="corpus sizes in MB")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--old-up-to", type=float, default=25, help="run the old readers up to this size (MB)")
    args = ap.parse_args()
    texts = source_texts()
    print("JSON-lines parsers on ../shared/corpora/*.jsonl:")
    print("\n".join(parser_throughput()))
    for fmt in args.formats:
        print(f"\n{fmt}: size MB, records, seconds, MB/s, peak anon MB; ratios against the smallest size")
        first = None
        for size in args.sizes:
            with tempfile.TemporaryDirectory() as d:
                path = write_corpus(fmt, texts, int(size * 1e6), Path(d))
                nbytes = corpus_bytes(path)
                r = measure("new", path, 600)
                r["py_peak"] = measure("new", path, 600, traced=True)["py_peak"]
                first = first or (nbytes, r)
                size_x, time_x = nbytes / first[0], r["seconds"] / first[1]["seconds"]
                mem_x = r["peak_anon"] / max(first[1]["peak_anon"], 1)
                print(f"  {nbytes / 1e6:7.1f} {r['records']:8d} {r['seconds']:7.2f} s {nbytes / 1e6 / r['seconds']:6.1f}"
                      f" {r['peak_anon'] / 1e6:7.1f}   size ×{size_x:.1f}  seconds ×{time_x:.2f} "
                      f"(×{time_x / size_x:.2f} of proportional)  memory ×{mem_x:.2f}; Python's own peak "
                      f"{r['py_peak'] / 1e6:.1f} MB ×{r['py_peak'] / max(first[1]['py_peak'], 1):.2f}"
                      + (f"  [rejects {r['rejects']}]" if r["rejects"] else ""))
                if fmt in ("jsonl", "json") and size <= args.old_up_to:
                    old = measure("old", path, 300)
                    if old is None:
                        print("  old reader: over 300 s, stopped")
                    else:
                        print(f"  old reader at {nbytes / 1e6:.1f} MB: {old['seconds']:.2f} s, peak anon "
                              f"{old['peak_anon'] / 1e6:.1f} MB  (new: ×{old['seconds'] / r['seconds']:.1f} "
                              f"faster, ×{old['peak_anon'] / max(r['peak_anon'], 1):.1f} less memory)")
                if fmt == "json" and size == args.sizes[0]:
                    print("\n".join(array_against_ijson(path)))


if __name__ == "__main__":
    main()
