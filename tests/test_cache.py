import multiprocessing
import os
import signal
import subprocess
import time
from pathlib import Path
import sys

import pytest

from tasks.core.config.data import ChunkConfig
from tasks.core.keys import register_code_version, stage_key
from tasks.core.manifest import MANIFEST, StageOutput, read_manifest
from tasks.core.root import ArtifactsRoot, open_root


def publish(root, stage, key, build) -> StageOutput:
    return open_root(root).publish(stage, key, build)[0]


def is_complete(root, stage, key) -> bool:
    return open_root(root).complete(stage, key)


def cache_dir(root, stage, key):
    return open_root(root).cache_dir(stage, key)


def _unit_a(x):
    return x + 1


def _unit_b(x):
    return x * 2


def test_key_depends_on_config_upstream_key_and_code_not_on_location():
    register_code_version("unit", 1, [_unit_a], [])
    up = StageOutput(stage="a", key="a-1", path="cache/a/a-1", counts={"n": 1})
    base = stage_key("unit", {"cfg": ChunkConfig(), "up": up})
    # An upstream manifest contributes its key only: counts/paths are derived from it.
    moved = up.model_copy(update={"path": "other", "counts": {"n": 2}})
    assert base == stage_key("unit", {"cfg": ChunkConfig(), "up": moved})
    assert base != stage_key("unit", {"cfg": ChunkConfig(overlap=1), "up": up})
    assert base != stage_key("unit", {"cfg": ChunkConfig(), "up": up.model_copy(update={"key": "a-2"})})
    register_code_version("unit", 1, [_unit_a, _unit_b], [])  # another function computes the output now
    assert base != stage_key("unit", {"cfg": ChunkConfig(), "up": up})
    register_code_version("unit", 2, [_unit_a], [])  # an explicit bump
    assert base != stage_key("unit", {"cfg": ChunkConfig(), "up": up})
    register_code_version("unit", 1, [_unit_a], [])
    assert base == stage_key("unit", {"cfg": ChunkConfig(), "up": up})


def test_publish_is_atomic_and_records_a_manifest(tmp_path):
    def build(d):
        (d / "data.txt").write_text("hello")
        return {"rows": 1}, {"note": "x"}

    out = publish(tmp_path, "s", "s-k", build)
    root = open_root(tmp_path)
    assert out.counts == {"rows": 1} and out.dir(root) == cache_dir(tmp_path, "s", "s-k")
    assert read_manifest(out.dir(root)) == out
    assert sorted(p.name for p in (tmp_path / "cache" / "s").iterdir()) == [".lock-s-k", "s-k"]


def test_failed_build_leaves_nothing(tmp_path):
    def build(d):
        (d / "partial.txt").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        publish(tmp_path, "s", "s-k", build)
    assert [p.name for p in (tmp_path / "cache" / "s").iterdir()] == [".lock-s-k"]
    assert not is_complete(tmp_path, "s", "s-k")


def test_directory_without_manifest_is_replaced(tmp_path):
    debris = cache_dir(tmp_path, "s", "s-k")
    debris.mkdir(parents=True)
    (debris / "half-written").write_text("?")
    assert not is_complete(tmp_path, "s", "s-k")
    out = publish(tmp_path, "s", "s-k", lambda d: ((d / "ok").write_text("1") and {}, {}))
    root = open_root(tmp_path)
    assert (out.dir(root) / "ok").exists() and not (out.dir(root) / "half-written").exists()


def test_a_truncated_file_or_a_lost_piece_makes_an_entry_a_miss_that_is_rebuilt(tmp_path):
    built = []

    def piece(d):
        built.append("piece")
        (d / "tokens.arrow").write_bytes(b"x" * 100)
        return {}, {}

    p = publish(tmp_path, "p", "p-1", piece)
    whole = publish(tmp_path, "s", "s-1", lambda d: ((d / "a").write_text("1"), {}, {}, {"deps": [p.path]})[1:])
    assert whole.files == {"a": 1} and p.files == {"tokens.arrow": 100}
    assert is_complete(tmp_path, "s", "s-1") and is_complete(tmp_path, "p", "p-1")
    with open(p.dir(open_root(tmp_path)) / "tokens.arrow", "r+b") as f:
        f.truncate(50)  # the manifest is intact, the file is not
    assert not is_complete(tmp_path, "p", "p-1")
    assert not is_complete(tmp_path, "s", "s-1")  # it refers to the damaged piece
    publish(tmp_path, "p", "p-1", piece)
    assert built == ["piece", "piece"] and is_complete(tmp_path, "s", "s-1")
    (whole.dir(open_root(tmp_path)) / "a").unlink()
    assert not is_complete(tmp_path, "s", "s-1")


def _blocked_on_flock(path: Path) -> bool:
    """Whether someone waits in the kernel for a flock on `path` (/proc/locks lists waiters with `->`)."""
    inode = os.stat(path).st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and "FLOCK" in fields:
            device_inode = next(f for f in fields if f.count(":") == 2)
            if int(device_inode.rsplit(":", 1)[1]) == inode:
                return True
    return False


def test_two_builders_racing_for_one_key_build_once_and_both_get_that_output(tmp_path):
    """Two threads (each with its own flock, as two processes would hold) start publishing one key together. The
    one that gets the lock builds, and finishes only once the other is seen waiting for the lock in the kernel, so
    the two really contend; the waiter then takes the published output instead of building."""
    import threading

    start = threading.Barrier(2)
    builds = []
    stop = threading.Event()  # set if the test gives up, so no thread is left waiting
    lock_file = tmp_path / "cache" / "s" / ".lock-s-k"

    def build(d):
        builds.append(threading.current_thread().name)
        # Wait for the other builder: blocked on the lock (the lock works) or here too (it does not).
        while not (_blocked_on_flock(lock_file) or len(builds) > 1 or stop.is_set()):
            time.sleep(0.01)
        (d / "data").write_text(threading.current_thread().name)
        return {"who": threading.current_thread().name}, {}

    results, errors = {}, []

    def builder():
        try:
            start.wait(timeout=30)
            results[threading.current_thread().name] = publish(tmp_path, "s", "s-k", build)
        except BaseException as e:  # noqa: BLE001  reported below
            errors.append(e)

    threads = [threading.Thread(target=builder, name=name) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    stop.set()  # a hang is reported by the asserts below, not waited out
    for t in threads:
        t.join(timeout=10)
    assert len(builds) == 1, f"both built: {builds} ({errors})"  # one build; the other waited on the lock
    assert not errors and not any(t.is_alive() for t in threads), (errors, threads)
    assert results["a"] == results["b"] and results["a"].counts == {"who": builds[0]}
    assert (results["a"].dir(open_root(tmp_path)) / "data").read_text() == builds[0]


@pytest.mark.slow  # a child process, for the pid of a process that has exited
def test_temp_dirs_of_killed_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stage_root = tmp_path / "cache" / "s"
    stale = stage_root / f".tmp-s-k-{dead}-abcd1234"
    live = stage_root / f".tmp-s-k-{os.getppid()}-abcd1234"  # a running process (our parent) is building
    for d in (stale, live):
        d.mkdir(parents=True)
        (d / "partial").write_text("x")
    publish(tmp_path, "s", "s-k", lambda d: ({}, {}))
    assert not stale.exists() and live.exists()
    assert (stage_root / "s-k" / MANIFEST).exists()


def _slow_build(log_path, seconds):
    def build(d):
        with open(log_path, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(seconds)
        (d / "data").write_text("x")
        return {"pid": os.getpid()}, {}
    return build


def _publish_in_child(root, log_path, seconds, queue):
    queue.put(publish(root, "s", "s-k", _slow_build(log_path, seconds)).counts["pid"])


@pytest.mark.slow  # two builder processes
def test_concurrent_runs_of_one_key_build_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    log = tmp_path / "builds.log"
    procs = [ctx.Process(target=_publish_in_child, args=(tmp_path, log, 1.0, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert len(log.read_text().splitlines()) == 1  # one build; the other run waited and took its output
    assert results[0] == results[1]


@pytest.mark.slow  # a builder process, killed
def test_a_killed_builder_blocks_nothing(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    log = tmp_path / "builds.log"
    queue = ctx.Queue()
    child = ctx.Process(target=_publish_in_child, args=(tmp_path, log, 60.0, queue))
    child.start()
    deadline = time.monotonic() + 30
    while not log.exists() and time.monotonic() < deadline:  # wait until it holds the lock and is building
        time.sleep(0.05)
    assert log.exists(), "the child never started building"
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    out = publish(tmp_path, "s", "s-k", lambda d: ({"who": "next run"}, {}))
    assert out.counts == {"who": "next run"}
    assert [p.name for p in (tmp_path / "cache" / "s").iterdir() if p.name.startswith(".tmp-")] == []


def test_digest_memo_reads_an_unchanged_file_once_and_a_changed_one_again(tmp_path, monkeypatch):
    import tasks.core.manifest as cache

    f = tmp_path / "big.bin"
    f.write_bytes(b"a" * 1000)
    reads = []
    real = cache.hash_file
    monkeypatch.setattr(cache, "hash_file", lambda p, *a: reads.append(p) or real(p, *a))
    first = cache.DigestMemo(open_root(tmp_path))
    d1 = first.digest(f)
    first.save()
    again = cache.DigestMemo(open_root(tmp_path))  # a later run
    assert again.digest(f) == d1 and len(reads) == 1
    f.write_bytes(b"b" * 1000)  # same size: the mtime moves
    assert again.digest(f) != d1 and len(reads) == 2


@pytest.mark.slow  # `cpt cache verify` in a child process
def test_cache_verify_finds_a_flipped_byte_by_digest_and_a_truncated_file_by_size(tmp_path):
    import subprocess
    import sys

    root = tmp_path / "artifacts"

    def build(tmp):
        (tmp / "data.bin").write_bytes(b"0123456789" * 100)
        return {}, {}

    a = publish(root, "stage-a", "stage-a-1", build)
    b = publish(root, "stage-b", "stage-b-1", build)
    assert read_manifest(a.dir(open_root(root))).digests["data.bin"]
    probe = ("import sys; from flows.cli import main; rc = main(sys.argv[1:]); "
             "heavy = [m for m in ('prefect', 'torch', 'transformers', 'datasets') if m in sys.modules]; "
             "print('HEAVY', heavy); sys.exit(rc)")

    def verify(*flags):
        return subprocess.run([sys.executable, "-c", probe, "cache", "verify", *flags, "--artifacts", str(root)],
                              cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)

    out = verify("--full")
    assert out.returncode == 0 and "2 entries checked by sizes and contents: 0 damaged" in out.stdout
    assert "HEAVY []" in out.stdout
    with open(a.dir(open_root(root)) / "data.bin", "r+b") as f:  # same size, one byte changed
        f.seek(500)
        f.write(b"X")
    (b.dir(open_root(root)) / "data.bin").write_bytes(b"short")
    out = verify()
    assert out.returncode == 1 and "damaged: cache/stage-b/stage-b-1: data.bin has 5 bytes" in out.stdout
    assert "stage-a" not in out.stdout  # a flipped byte keeps the size: only --full sees it
    out = verify("--full")
    assert out.returncode == 1 and "damaged: cache/stage-a/stage-a-1: data.bin does not have the content" in out.stdout
    out = verify("--full", "--discard")
    assert out.returncode == 0 and out.stdout.count("discarded") == 2
    assert not a.dir(open_root(root)).exists() and not b.dir(open_root(root)).exists()
    assert verify("--full").stdout.startswith("0 entries checked")


class _Thing(StageOutput):
    def thing_file(self, artifacts):
        return self.dir(artifacts) / "thing.txt"

    def summary(self, artifacts):
        import logging

        return [(logging.INFO, f"{self.counts['n']} things")]


def test_the_stage_decorator_keys_every_argument_and_returns_its_typed_manifest(tmp_path, caplog):
    """The body is the work alone: the decorator binds the call (defaults included) into the key, builds in a
    temp dir, publishes, returns the producer's manifest type and logs its summary on every call."""
    import logging

    from tasks.core.stage import Build, stage

    built = []

    @stage("unit-thing", version=1, output=_Thing)
    def thing(build: Build, n: int, label: str = "x"):
        built.append(build.key)
        assert build.tmp.name.startswith(".tmp-") and not (build.tmp / "thing.txt").exists()
        (build.tmp / "thing.txt").write_text(label * n)
        return {"n": n}, {}

    logger = logging.getLogger("cpt")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="cpt"):
            a = thing.fn(n=2, artifacts=open_root(tmp_path))
    finally:
        logger.removeHandler(caplog.handler)
    root = open_root(tmp_path)
    assert isinstance(a, _Thing) and a.thing_file(root).read_text() == "xx"
    assert "unit-thing: 2 things" in caplog.text
    b = thing.fn(n=2, label="y", artifacts=root)  # a defaulted argument is keyed too
    assert b.key != a.key and b.thing_file(root).read_text() == "yy"
    assert thing.fn(n=2, label="x", artifacts=str(tmp_path / ".." / tmp_path.name)) == a  # published: not rebuilt
    assert built == [a.key, b.key]
    with pytest.raises(TypeError):
        thing.fn(n=2, artifacts=root, colour="red")  # an argument the body does not take


def test_an_artifacts_url_is_a_store_never_a_local_folder_named_after_its_scheme(tmp_path, monkeypatch):
    from tasks.core.config.base import ConfigError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CPT_SCRATCH", str(tmp_path / "scratch"))
    root = open_root("s3://bucket/some/prefix")
    assert root.local == (tmp_path / "scratch" / "s3" / "bucket" / "some" / "prefix").resolve()
    assert root.url == "s3://bucket/some/prefix" and open_root(tmp_path).url is None
    assert not (tmp_path / "s3:").exists()
    with pytest.raises(ConfigError, match=r"--artifacts: 'nosuch://b/p': nosuch:// is not a storage fsspec knows"):
        open_root("nosuch://b/p")
    monkeypatch.setenv("CPT_ARTIFACTS", "gs://b/p")  # gcsfs is not installed here
    with pytest.raises(ConfigError, match=r"CPT_ARTIFACTS: 'gs://b/p' needs a library that is not installed"):
        open_root()
    with pytest.raises(ConfigError, match="needs a bucket"):
        open_root("s3://")
    assert open_root(f"file://{tmp_path}").local == tmp_path.resolve()
    assert open_root("rel").local == tmp_path.resolve() / "rel"


def test_a_root_travels_as_its_url_or_path_and_is_opened_again_on_the_other_side(tmp_path, monkeypatch):
    """Pickled to a worker (Dask, a process pool) a root is reopened there: a store root keeps its URL and takes
    the mirror of the host it lands on (its own $CPT_SCRATCH), never the sender's path."""
    import pickle

    monkeypatch.setenv("CPT_SCRATCH", str(tmp_path / "here"))
    local, store = open_root(tmp_path / "a"), open_root("s3://bucket/p")
    assert pickle.loads(pickle.dumps(local)) == local and type(pickle.loads(pickle.dumps(local))) is ArtifactsRoot
    blob = pickle.dumps(store)
    monkeypatch.setenv("CPT_SCRATCH", str(tmp_path / "there"))
    moved = pickle.loads(blob)
    assert moved.url == "s3://bucket/p" and moved.local == (tmp_path / "there" / "s3" / "bucket" / "p").resolve()


def test_exclusive_lets_one_holder_in_at_a_time_and_the_second_waits(tmp_path):
    import threading

    root = open_root(tmp_path)
    order = []
    entered = threading.Event()

    def first():
        with root.exclusive("state/lines/l.run"):
            entered.set()
            time.sleep(1.0)
            order.append("first out")

    t = threading.Thread(target=first)
    t.start()
    entered.wait(10)
    started = time.monotonic()
    with root.exclusive("state/lines/l.run"):
        order.append("second in")
    t.join()
    assert order == ["first out", "second in"] and time.monotonic() - started >= 0.5
