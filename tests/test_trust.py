"""Stored bytes are data, never code or paths: what a bucket (or anyone with write access to it) holds cannot run
code, write outside the mirror, or be reused when it is not what was published; a lock holder whose lease ran
out publishes nothing. The store here is a real S3-compatible server on 127.0.0.1 (tests/conftest.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from helpers import S3_KEY, S3_SECRET, new_bucket, s3_env


@pytest.fixture
def store_root(monkeypatch, tmp_path, s3_endpoint):
    """`host(name)` opens the same bucket as another host would (its own mirror under its own scratch)."""
    for k, v in s3_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    url = f"s3://{new_bucket(s3_endpoint)}/team"

    def host(name: str):
        from tasks.core.root import open_root

        monkeypatch.setenv("CPT_SCRATCH", str(tmp_path / f"host-{name}"))
        return open_root(url)

    return host


def build_text(text: str, calls: list | None = None):
    def build(tmp: Path):
        if calls is not None:
            calls.append(text)
        (tmp / "data.txt").write_text(text)
        return {"n": 1}, {}
    return build


# ------------------------------------------------------------------------------------------ records


def test_a_planted_pickle_record_is_never_deserialised(tmp_path):
    """A result record naming the pickle serializer (its payload would create a file when unpickled) sits where
    Prefect looks for the key's record: the lookup replaces it from the verified manifest before Prefect reads."""
    import base64
    import pickle

    from tasks.core.root import open_root
    from tasks.core.stage import StageOutput, write_record

    root = open_root(tmp_path / "artifacts")
    out, _ = root.publish("unit", "unit-k1", build_text("hello"))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    record = root.records_dir / "unit-k1"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"metadata": {"storage_key": str(record), "expiration": None,
                                               "serializer": {"type": "pickle", "picklelib": "pickle"},
                                               "prefect_version": "3.9.1", "storage_block_id": None},
                                  "result": base64.b64encode(pickle.dumps(Payload())).decode()}))
    write_record(record, StageOutput(**out.model_dump()))
    doc = json.loads(record.read_text())
    assert doc["metadata"]["serializer"]["type"] == "cpt-manifest"  # tasks/core/records.py
    from prefect._internal.result_records import ResultRecord

    assert ResultRecord.deserialize(record.read_bytes()).result == StageOutput(**out.model_dump())
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ names


@pytest.mark.slow
def test_a_manifest_whose_names_leave_the_entry_is_damage_never_a_write_outside(store_root, tmp_path):
    a = store_root("a")
    a.publish("unit", "unit-k1", build_text("alpha"))
    fs = a.store.fs
    manifest = json.loads(fs.cat_file(a.store.remote("cache/unit/unit-k1/_COMPLETE")))
    escape = "../../../../escaped.txt"
    manifest["files"][escape] = 5
    manifest["digests"][escape] = "0" * 32
    import contextlib

    with contextlib.suppress(OSError):  # some servers (SeaweedFS) refuse such a key; the manifest alone is the attack
        fs.pipe_file(f"{a.store.base}/cache/unit/unit-k1/{escape}", b"owned")  # Store.remote refuses the name
    fs.pipe_file(a.store.remote("cache/unit/unit-k1/_COMPLETE"), json.dumps(manifest).encode())

    from tasks.core.manifest import StageOutput

    with pytest.raises(ValueError, match="inside its folder"):  # the manifest itself is refused, not just its files
        StageOutput.model_validate_json(json.dumps(manifest))
    b = store_root("b")
    assert b.published("unit", "unit-k1") is None  # the manifest does not parse: not complete
    calls: list = []
    out, built = b.publish("unit", "unit-k1", build_text("alpha", calls))
    assert built and calls == ["alpha"] and "escaped.txt" not in json.dumps(out.files)
    assert not list(tmp_path.rglob("escaped.txt"))


# ------------------------------------------------------------------------------------------ digests


@pytest.mark.slow
def test_a_stored_file_with_one_byte_changed_is_discarded_and_rebuilt(store_root):
    a = store_root("a")
    a.publish("unit", "unit-k1", build_text("0123456789"))
    fs = a.store.fs
    fs.pipe_file(a.store.remote("cache/unit/unit-k1/data.txt"), b"0123456789".replace(b"5", b"X"))  # same size
    b = store_root("b")
    assert b.complete("unit", "unit-k1")  # by sizes the store looks complete
    calls: list = []
    out, built = b.publish("unit", "unit-k1", build_text("0123456789", calls))
    assert built and calls == ["0123456789"], "the damaged copy was reused"
    assert (out.dir(b) / "data.txt").read_text() == "0123456789"
    assert fs.cat_file(a.store.remote("cache/unit/unit-k1/data.txt")) == b"0123456789"  # re-uploaded whole


@pytest.mark.slow
def test_a_reader_of_a_damaged_entry_gets_a_clear_error_and_the_next_lookup_misses(store_root):
    from tasks.core.root import EntryUnavailable

    a = store_root("a")
    out, _ = a.publish("unit", "unit-k1", build_text("0123456789"))
    a.store.fs.pipe_file(a.store.remote("cache/unit/unit-k1/data.txt"), b"9876543210")
    b = store_root("b")
    with pytest.raises(EntryUnavailable, match="next run rebuilds it"):
        out.dir(b)
    assert not b.complete("unit", "unit-k1")


def test_a_checkpoint_is_resumed_only_when_its_files_match_its_manifest(tmp_path):
    from tasks.core.manifest import hash_file
    from tasks.ml.checkpoints import checkpoint_damage

    ckpt = tmp_path / "checkpoint-6"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights" * 10)
    (ckpt / "trainer_state.json").write_text("{}")
    marker = json.dumps({"files": {p.name: [p.stat().st_size, hash_file(p)] for p in ckpt.iterdir()}}).encode()
    assert checkpoint_damage(ckpt, marker) is None
    assert "manifest is missing" in checkpoint_damage(ckpt, b"{}")
    (ckpt / "model.safetensors").write_bytes(b"weighTs" * 10)  # same size
    assert "does not have the content" in checkpoint_damage(ckpt, marker)
    bad = json.dumps({"files": {"../../x": [1, "0"]}}).encode()
    assert "unreadable" in checkpoint_damage(ckpt, bad)


def test_push_and_evaluate_read_a_model_only_when_its_files_are_the_trained_ones(tmp_path):
    from tasks.core.root import open_root
    from tasks.ml.modeling import model_digest
    from tasks.train import ModelDamaged, Trained

    root = open_root(tmp_path / "artifacts")

    def build(tmp: Path):
        (tmp / "model").mkdir()
        (tmp / "model" / "model.safetensors").write_bytes(b"trained weights")
        return {}, {"model_digest": model_digest(tmp / "model"), "model_dir": "model"}

    out, _ = root.publish("train", "train-k", build)
    trained = Trained(**out.model_dump())
    assert trained.verified_model_dir(root) == trained.model_dir(root)
    (trained.model_dir(root) / "model.safetensors").write_bytes(b"trained WEIGHTS")  # same size
    with pytest.raises(ModelDamaged, match="not the ones trained"):
        trained.verified_model_dir(root)
    assert not root.complete("train", "train-k")  # discarded: the next run retrains


# ------------------------------------------------------------------------------------------ the lock


@pytest.mark.slow
def test_a_holder_that_cannot_renew_publishes_nothing_and_deletes_nothing_of_the_next(store_root, monkeypatch):
    from tasks.core.objectstore import LockLost

    monkeypatch.setenv("CPT_STORE_LEASE_SECONDS", "1.5")
    a = store_root("a")
    store = a.store
    lock = store.lock("cache/unit/unit-k1")
    assert lock.acquire()
    real = store.fs.pipe_file

    def failing(path, value, **kw):  # an expired session token: every renewal fails
        if "/locks/" in path:
            raise PermissionError("ExpiredToken")
        return real(path, value, **kw)

    monkeypatch.setattr(store.fs, "pipe_file", failing)
    time.sleep(2.0)
    with pytest.raises(LockLost, match="lapsed|ran out"):
        lock.check()
    monkeypatch.setattr(store.fs, "pipe_file", real)
    # Another host takes the key once the lease is over and uploads; the first holder's upload must not touch it.
    b = store_root("b")
    other = b.store.lock("cache/unit/unit-k1")
    assert other.acquire()
    real(b.store.remote("cache/unit/unit-k1/data.txt"), b"newer holder")
    local = a.local / "cache" / "unit" / "tmp-entry"
    local.mkdir(parents=True)
    (local / "data.txt").write_text("stale")
    from tasks.core.manifest import StageOutput

    manifest = StageOutput(stage="unit", key="unit-k1", path="cache/unit/unit-k1", files={"data.txt": 5})
    with pytest.raises(LockLost):
        store.upload_entry("cache/unit/unit-k1", local, manifest, lock)
    assert b.store.fs.cat_file(b.store.remote("cache/unit/unit-k1/data.txt")) == b"newer holder"
    assert not b.store.fs.exists(b.store.remote("cache/unit/unit-k1/_COMPLETE"))
    other.release()
    lock.release()


@pytest.mark.slow
def test_a_build_whose_lease_lapses_stops_and_publishes_nothing(store_root, monkeypatch):
    """An expired session token during a long build: the holder stops at its next check, installs nothing
    locally and uploads nothing, and the key stays free for the next run to build."""
    from tasks.core import fence
    from tasks.core.objectstore import LockLost

    monkeypatch.setenv("CPT_STORE_LEASE_SECONDS", "1.5")
    root = store_root("a")
    store = root.store
    real = store.fs.pipe_file
    checks = []

    def long_build(tmp):
        (tmp / "data.txt").write_text("partial")
        # Renewals start failing once the build runs (the lock itself was taken with a good token).
        monkeypatch.setattr(store.fs, "pipe_file",
                            lambda path, value, **kw: (_ for _ in ()).throw(PermissionError("ExpiredToken"))
                            if "/locks/" in path else real(path, value, **kw))
        started = time.monotonic()
        while time.monotonic() - started < 30:
            checks.append(time.monotonic() - started)
            fence.check()
            time.sleep(0.05)
        return {"n": 1}, {}

    started = time.monotonic()
    with pytest.raises(LockLost, match="lapsed"):
        root.publish("unit", "unit-lapse", long_build)
    took = time.monotonic() - started
    assert took < 5, f"the build ran {took:.1f} s after its 1.5 s lease lapsed"
    monkeypatch.setattr(store.fs, "pipe_file", real)
    assert store.complete("cache/unit/unit-lapse") is None
    assert not (root.local / "cache" / "unit" / "unit-lapse").exists()


@pytest.mark.slow  # a stand-in training child process
def test_a_training_child_is_killed_when_the_lease_is_lost():
    """The train stage waits on a child for hours: losing the fence kills its whole process group at once and
    the stage says why (LockLost), not 'training failed'."""
    import logging
    import sys
    import threading

    from tasks.core.fence import Fence, LockLost, fenced
    from tasks.train import run_child

    f = Fence("unit")
    threading.Timer(0.5, f.lose, args=("store: the lease of unit lapsed",)).start()
    started = time.monotonic()
    with fenced(f), pytest.raises(LockLost, match="lapsed"):
        run_child([sys.executable, "-c", "import time; print('training', flush=True); time.sleep(60)"],
                  lambda msg: None, logging.getLogger("test"))
    assert time.monotonic() - started < 10


def test_a_lost_enclosing_fence_stops_the_pieces_built_inside_it():
    from tasks.core.config.data import RuntimeConfig
    from tasks.core.fanout import map_pieces
    from tasks.core.fence import Fence, LockLost, fenced

    outer, done = Fence("stage"), []

    def piece(i):
        done.append(i)
        if i == 1:
            outer.lose("store: the lease of stage lapsed")
        return i

    with fenced(outer), pytest.raises(LockLost):
        map_pieces(piece, [{"i": i} for i in range(5)], RuntimeConfig(), "unit")
    assert done == [0, 1]


@pytest.mark.slow
def test_a_holder_whose_renewals_fail_deletes_nothing_even_before_its_lease_ends(store_root, monkeypatch):
    """Deleting leftovers needs the lease to outlast the deletes: with a third of it or less left (renewals
    failing), the publisher stops before touching what may soon be a newer holder's objects."""
    from tasks.core.manifest import StageOutput
    from tasks.core.objectstore import LockLost

    monkeypatch.setenv("CPT_STORE_LEASE_SECONDS", "30")
    root = store_root("a")
    store = root.store
    rel = "cache/unit/unit-margin"
    store.fs.pipe_file(store.remote(f"{rel}/old.txt"), b"leftover")
    lock = store.lock(rel)
    assert lock.acquire()
    lock._stop.set()  # no renewal thread: the lease is what was last granted
    lock.valid_until = time.time() + 5  # 5 s of 30 left: renewals have been failing for 25 s
    local = root.local / "cache" / "unit" / "tmp-margin"
    local.mkdir(parents=True)
    (local / "data.txt").write_text("new")
    manifest = StageOutput(stage="unit", key="unit-margin", path=rel, files={"data.txt": 3})
    with pytest.raises(LockLost, match="about to"):
        store.upload_entry(rel, local, manifest, lock)
    assert store.fs.cat_file(store.remote(f"{rel}/old.txt")) == b"leftover"
    lock.release()


@pytest.mark.slow
def test_acquiring_times_out_naming_the_holder_and_an_unparsable_lock_expires_after_one_lease(store_root,
                                                                                               monkeypatch):
    from tasks.core.objectstore import Lock, LockTimeout

    # A lease of 3 s (renewed every 1 s) outlives the 1.5 s wait even on a busy machine; at 1 s, renewals
    # delayed by load let the waiter take the lock.
    monkeypatch.setenv("CPT_STORE_LEASE_SECONDS", "3.0")
    a = store_root("a")
    held = a.store.lock("k")
    assert held.acquire()
    b = store_root("b")
    with pytest.raises(LockTimeout, match=held.owner.split(":")[0]):
        Lock(b.store, "k", timeout=1.5).acquire(poll=0.2)
    held.release()
    # A body that never parses (a writer that died mid-write, or garbage) is taken over after one lease.
    b.store.fs.pipe_file(b.store.remote("locks/j/g-00000001"), b"{not json")
    started = time.monotonic()
    taker = Lock(b.store, "j", timeout=30)
    assert taker.acquire(poll=0.2)
    assert time.monotonic() - started >= 2.7
    taker.release()


def test_names_that_leave_their_folder_are_refused():
    from tasks.core.manifest import safe_relpath

    for good in ("a.txt", "model/model.safetensors", "cache/train/train-k"):
        assert safe_relpath(good) == good
    for bad in ("", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a\\b", "a\x00b"):
        with pytest.raises(ValueError):
            safe_relpath(bad)


@pytest.mark.slow
def test_the_store_server_refuses_a_second_create(s3_endpoint, monkeypatch, tmp_path):
    """The locks rest on the S3 `If-None-Match: *` put (s3fs's `mode="create"`): the server must refuse a create
    of a key that exists, as FileExistsError (what Lock.acquire catches), and let one of racing creators win."""
    import threading

    import s3fs

    fs = s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, client_kwargs={"endpoint_url": s3_endpoint},
                           skip_instance_cache=True)
    bucket = new_bucket(s3_endpoint)
    fs.pipe_file(f"{bucket}/once", b"a", mode="create")
    with pytest.raises(OSError) as second:
        fs.pipe_file(f"{bucket}/once", b"b", mode="create")
    assert fs.cat_file(f"{bucket}/once") == b"a"

    outcomes: list = [None] * 8
    start = threading.Barrier(len(outcomes))

    def create(i: int) -> None:
        start.wait()
        try:
            fs.pipe_file(f"{bucket}/raced", str(i).encode(), mode="create")
            outcomes[i] = "won"
        except Exception as e:  # noqa: BLE001  (what each loser got is asserted below)
            outcomes[i] = e

    threads = [threading.Thread(target=create, args=(i,)) for i in range(len(outcomes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, o in enumerate(outcomes) if o == "won"]
    assert len(winners) == 1, outcomes
    assert fs.cat_file(f"{bucket}/raced") == str(winners[0]).encode()
    # s3fs says FileExistsError only for a 412 whose error names `<Condition>If-None-Match</Condition>` (as AWS
    # does); SeaweedFS's bare 412 is a plain OSError. Lock.acquire takes either for a lost race: racing holders
    # of one lock, exactly one wins and none crashes.
    refusals = [second.value] + [o for o in outcomes if o != "won"]
    assert all(isinstance(e, OSError) for e in refusals), [repr(e) for e in refusals]
    from tasks.core.objectstore import Store

    for k, v in s3_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    store = Store(f"s3://{bucket}/p", tmp_path)
    got: list = [None] * 6
    go = threading.Barrier(len(got))

    def take(i: int) -> None:
        go.wait()
        try:
            got[i] = store.lock("race").acquire(wait=False)
        except Exception as e:  # noqa: BLE001
            got[i] = e
    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(got))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(repr, got)) == sorted(["True"] + ["False"] * (len(got) - 1)), got


@pytest.mark.parametrize("name", ["", "a/b", "a\\b", "..", ".hidden", "a\x00b"])
def test_a_line_name_is_one_folder_name(name):
    from tasks.line.lines import state_file

    with pytest.raises(ValueError, match="not a valid line name"):
        state_file(name)
