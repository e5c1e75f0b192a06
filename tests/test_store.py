"""The artifacts root in an object store: a real S3-compatible server (moto's standalone server) on 127.0.0.1,
and "hosts" that are local mirrors in separate scratch folders ($CPT_SCRATCH), as two containers would be."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from helpers import ROOT, S3_KEY, S3_SECRET, s3_env, sample_texts, write_jsonl
from helpers import run_flow

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]
DATA_STAGES = ["load", "shuffle", "tokenize", "token-stats", "chunk"]


class Hosts:
    """Switches this process between hosts (scratch folders) sharing one bucket."""

    def __init__(self, monkeypatch, tmp_path: Path, endpoint: str):
        self.monkeypatch, self.tmp_path, self.endpoint = monkeypatch, tmp_path, endpoint
        self.env = s3_env(endpoint)  # the session's secret is new each session: no summary may show it
        for k, v in self.env.items():
            monkeypatch.setenv(k, v)
        self.bucket = f"cpt-{uuid.uuid4().hex[:12]}"
        self.url = f"s3://{self.bucket}/team/cpt"
        self.fs.mkdir(self.bucket)
        self.use("a")

    @property
    def fs(self):
        import s3fs

        # The test's own view of the bucket, whatever the environment the code under test gets.
        return s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, client_kwargs={"endpoint_url": self.endpoint},
                                 skip_instance_cache=True, use_listings_cache=False)

    def scratch(self, name: str) -> Path:
        return self.tmp_path / f"host-{name}"

    def use(self, name: str):
        """Be host `name` from now on; returns the store root as that host opens it."""
        self.monkeypatch.setenv("CPT_SCRATCH", str(self.scratch(name)))
        from tasks.core.root import open_root

        return open_root(self.url)

    def objects(self, under: str = "") -> list[str]:
        base = f"{self.bucket}/team/cpt/{under}".rstrip("/")
        try:
            # An emptied folder may stay listed as its bare prefix (SeaweedFS): it holds no object.
            return sorted(p[len(base) + 1:] for p in self.fs.find(base) if p[len(base) + 1:])
        except FileNotFoundError:
            return []


@pytest.fixture
def hosts(monkeypatch, tmp_path, s3_endpoint):
    return Hosts(monkeypatch, tmp_path, s3_endpoint)


@pytest.fixture
def config(tmp_path, tiny_model):
    texts = sample_texts(80)
    write_jsonl(tmp_path / "corpus" / "part-1.jsonl", [{"content": t} for t in texts[:50]])
    write_jsonl(tmp_path / "corpus" / "part-2.jsonl", [{"content": t} for t in texts[50:]])
    return {"corpus": {"paths": [str(tmp_path / "corpus")]}, "model": {"id": str(tiny_model)},
            "split": {"validation_fraction": 0.1}, "chunk": {"max_seq_length": 64, "overlap": 16}}


def run(config, url, until="chunk", **overrides):
    """test_flow's run on a store URL, with each stage's whole summary entry by name."""
    _, summary = run_flow(config, url, until, **overrides)
    return {s["name"]: s for s in summary["stages"]}, summary


def test_cold_run_then_a_fresh_host_finds_every_stage_cached_and_fetches_only_what_it_reads(config, hosts):
    first, summary = run(config, hosts.url)
    assert {n: s["state"] for n, s in first.items()} == dict.fromkeys(DATA_STAGES, "Completed")
    assert summary["store"] == hosts.url
    for name, s in first.items():  # published: manifest and Prefect record in the store
        assert f"cache/{name}/{s['key']}/_COMPLETE" in hosts.objects()
        assert not any(o.startswith("cache/_records/") for o in hosts.objects())  # records never travel
        assert s["output"] == f"{hosts.url}/cache/{name}/{s['key']}"
    assert f"runs/{summary['flow_run']}/summary.json" in hosts.objects()

    b = hosts.use("b")  # a fresh container: nothing local
    again, _ = run(config, hosts.url)
    assert {n: s["state"] for n, s in again.items()} == dict.fromkeys(DATA_STAGES, "Cached")
    assert [s["key"] for s in again.values()] == [s["key"] for s in first.values()]
    # A cached run reads nothing of the entries but what it shows (token-stats' histogram and table).
    assert not (b.local / "cache" / "chunk").exists() and not (b.local / "cache" / "tokenize").exists()

    # A change on host b reruns chunk, which reads the tokenize entry (and its per-file pieces) host a built.
    changed, _ = run(config, hosts.url, chunk__max_seq_length=48)
    assert {n: s["state"] for n, s in changed.items()} == {
        "load": "Cached", "shuffle": "Cached", "tokenize": "Cached", "token-stats": "Completed", "chunk": "Completed"}
    assert changed["chunk"]["built"] and changed["chunk"]["counts"]["train_chunks"] > first["chunk"]["counts"]["train_chunks"]
    assert (b.local / "cache" / "tokenize" / first["tokenize"]["key"] / "_COMPLETE").is_file()
    # No credential ever reaches the summary.
    assert hosts.env["AWS_SECRET_ACCESS_KEY"] not in json.dumps(summary)


def test_a_deleted_object_in_the_store_is_a_miss(config, hosts):
    first, _ = run(config, hosts.url)
    chunk = f"cache/chunk/{first['chunk']['key']}"
    data = next(n for n in hosts.objects(chunk) if n.endswith(".arrow"))
    hosts.fs.rm_file(f"{hosts.bucket}/team/cpt/{chunk}/{data}")

    hosts.use("c")  # another host: the entry is incomplete, so chunk is rebuilt there and published whole
    states, _ = run(config, hosts.url)
    assert {n: s["state"] for n, s in states.items()} == {**dict.fromkeys(DATA_STAGES, "Cached"),
                                                          "chunk": "Completed"}
    assert states["chunk"]["built"] and data in hosts.objects(chunk)

    # The host that built it still has a verified copy: the same miss there re-uploads it, builds nothing.
    hosts.fs.rm_file(f"{hosts.bucket}/team/cpt/{chunk}/{data}")
    hosts.use("a")
    states, _ = run(config, hosts.url)
    assert states["chunk"]["state"] == "Completed" and not states["chunk"]["built"]
    assert data in hosts.objects(chunk)


CONCURRENT = textwrap.dedent("""
    import json, sys, time
    import tasks.core.objectstore as store
    upload = store.Store.upload_entry

    def slow_upload(self, *args, **kwargs):  # widen the window in which the other host could build it too
        time.sleep(1.0)
        return upload(self, *args, **kwargs)

    store.Store.upload_entry = slow_upload
    from flows.continued_pretraining import continued_pretraining
    from tasks.core.config.tree import validate_config

    summary = continued_pretraining(config=validate_config(json.loads(sys.argv[1])), artifacts=sys.argv[2],
                                    until="chunk")
    print("SUMMARY " + json.dumps(summary["stages"]))
""")


def test_two_hosts_started_together_build_each_key_once(config, hosts):
    from prefect.settings import get_current_settings

    env = {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url),
           "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, json.dumps(config), hosts.url],
                              env={**env, "CPT_SCRATCH": str(hosts.scratch(name))}, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for name in "xy"]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    runs = [json.loads(next(line for line in o.splitlines() if line.startswith("SUMMARY "))[8:]) for o in outputs]
    for x, y in zip(*runs):
        assert x["key"] == y["key"]
        assert [x["built"], y["built"]].count(True) == 1, (x["name"], x["built"], y["built"])
    # They did race: at least one of them found a key locked by the other and waited for its upload.
    assert any("is being built by" in o for o in outputs), outputs


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import tasks.core.objectstore as store
    from tasks.core.root import open_root

    init = store.Store.__init__

    def init_and_die_before_the_manifest(self, *args, **kwargs):
        init(self, *args, **kwargs)
        pipe = self.fs.pipe_file

        def pipe_file(path, value, **kw):
            if path.endswith("/_COMPLETE"):
                os.kill(os.getpid(), signal.SIGKILL)
            return pipe(path, value, **kw)

        self.fs.pipe_file = pipe_file

    store.Store.__init__ = init_and_die_before_the_manifest

    def build(tmp):
        (tmp / "a.txt").write_text("alpha")
        (tmp / "left-by-the-killed-writer.txt").write_text("only this writer made me")
        return {"n": 1}, {}

    open_root(sys.argv[1]).publish("unit", "unit-k1", build)
""")


def test_a_writer_killed_mid_publish_leaves_nothing_trusted_and_its_leftovers_are_cleaned(hosts, monkeypatch):
    monkeypatch.setenv("CPT_STORE_LEASE_SECONDS", "3")
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, hosts.url], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "CPT_SCRATCH": str(hosts.scratch("k"))})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    entry = "cache/unit/unit-k1"
    assert hosts.objects(entry) == ["a.txt", "left-by-the-killed-writer.txt"]  # files up, manifest never written
    assert hosts.objects("locks/cache/unit/unit-k1")  # and its lock is still there, held by a dead process

    root = hosts.use("b")
    assert not root.complete("unit", "unit-k1")

    def build(tmp):
        (tmp / "a.txt").write_text("alpha")
        return {"n": 1}, {}

    import threading

    result = []
    started = time.monotonic()
    worker = threading.Thread(target=lambda: result.append(root.publish("unit", "unit-k1", build)), daemon=True)
    worker.start()
    worker.join(60)  # a lock that never frees fails here instead of hanging the suite
    assert result, "the dead writer's lock was never taken over"
    out, built = result[0]
    assert built and out.files == {"a.txt": 5}
    # It waited for the dead writer's lease to run out, then took the lock (no local lock was involved: another
    # host), deleted the leftovers and published.
    assert time.monotonic() - started >= 1.0
    assert hosts.objects(entry) == ["_COMPLETE", "a.txt"]
    assert hosts.use("c").complete("unit", "unit-k1")


def test_line_state_is_shared_through_the_store(hosts, tmp_path):
    from tasks.line import lines

    drops = [tmp_path / f"drop-{i}" for i in range(3)]
    for d in drops:
        write_jsonl(d / "part.jsonl", [{"content": "x"}])
    lines.announce(hosts.use("a"), "nightly", drops[0])
    lines.announce(hosts.use("b"), "nightly", drops[1])  # reads a's state from the store, adds to it
    lines.remove(hosts.use("a"), "nightly", drops[0])
    lines.announce(hosts.use("c"), "nightly", drops[2])
    state = lines.read_line(hosts.use("a"), "nightly")
    assert [(Path(d.path).name, d.status) for d in state.drops] == [
        ("drop-0", "removed"), ("drop-1", "pending"), ("drop-2", "pending")]
    assert "state/lines/nightly.json" in hosts.objects()


def test_credentials_and_endpoint_from_a_prefect_secret_block(hosts, monkeypatch, config, tmp_path):
    from prefect.blocks.system import Secret

    from tasks.core.objectstore import Store

    secret = S3_SECRET  # the server's (it checks signatures); the environment's is removed below
    Secret(value={"key": S3_KEY, "secret": secret,
                  "client_kwargs": {"endpoint_url": hosts.env["AWS_ENDPOINT_URL"], "region_name": "us-east-1"}}
           ).save(f"store-{hosts.bucket}", overwrite=True)
    monkeypatch.setenv("CPT_STORE_BLOCK", f"store-{hosts.bucket}")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: only the block can work
    hosts.use("blocked")
    stages, summary = run(config, hosts.url, until="load")
    assert stages["load"]["state"] == "Completed"
    assert f"cache/load/{stages['load']['key']}/_COMPLETE" in hosts.objects()
    assert secret not in json.dumps(summary)

    # The training child reaches the store through the same block: its first checkpoint is there when it dies.
    monkeypatch.setenv("CPT_TEST_KILL_AFTER_SAVE_STEP", "2")
    from tasks.train import TrainingFailed

    with pytest.raises(TrainingFailed):
        run(config, hosts.url, until="train", train__max_steps=4, train__save_steps=2, train__eval_steps=2,
            train__per_device_train_batch_size=8)
    assert any(o.endswith("/checkpoints/checkpoint-2/_COMPLETE") for o in hosts.objects("work/train"))

    # Without the block the store is configured by the environment alone, and each part of it is what it holds.
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    monkeypatch.delenv("CPT_STORE_BLOCK")
    for name, value in (("AWS_SHARED_CREDENTIALS_FILE", tmp_path / "none"), ("AWS_CONFIG_FILE", tmp_path / "none"),
                        ("AWS_EC2_METADATA_DISABLED", "true")):  # no credentials from anywhere but the environment
        monkeypatch.setenv(name, str(value))
    # Credentials: the environment has none (removed above), and the block's are not taken.
    with pytest.raises(NoCredentialsError, match="^Unable to locate credentials$"):
        Store(hosts.url, hosts.scratch("x")).fs.ls(hosts.bucket)
    # Endpoint: given good credentials, the request goes to the environment's endpoint, where nothing listens.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    dead = re.escape('Could not connect to the endpoint URL: "http://127.0.0.1:9/')
    with pytest.raises(EndpointConnectionError, match=f"^{dead}"):
        Store(hosts.url, hosts.scratch("y")).fs.ls(hosts.bucket)


def test_a_training_killed_on_one_host_resumes_on_another(hosts, config, monkeypatch):
    from tasks.train import TrainingFailed

    config = {**config, "chunk": {"max_seq_length": 96, "overlap": 16},
              "train": {"max_steps": 12, "per_device_train_batch_size": 8, "learning_rate": 3e-3,
                        "warmup_ratio": 0.0, "logging_steps": 2, "eval_steps": 3, "save_steps": 6,
                        "packing": True}}
    monkeypatch.setenv("CPT_TEST_KILL_AFTER_SAVE_STEP", "6")
    with pytest.raises(TrainingFailed, match="killed by signal 9|exit status"):
        run(config, hosts.url, until="train")
    work = [o for o in hosts.objects("work/train")]
    assert any(o.endswith("/checkpoints/checkpoint-6/_COMPLETE") for o in work), work
    assert any("/tensorboard/" in o for o in work)

    monkeypatch.delenv("CPT_TEST_KILL_AFTER_SAVE_STEP")
    b = hosts.use("b")  # the killed host is gone; another takes the run
    stages, _ = run(config, hosts.url, until="train")
    t = stages["train"]["counts"]
    assert stages["train"]["state"] == "Completed" and t["resumed_from"] == "checkpoint-6"
    assert t["first_step"] == 7 and t["global_step"] == 12  # continued, not restarted
    entry = f"cache/train/{stages['train']['key']}"
    assert {"_COMPLETE", "model/model.safetensors", "metrics.json"} <= set(hosts.objects(entry))
    assert any(o.startswith("tensorboard/") for o in hosts.objects(entry))
    assert not hosts.objects("work/train")  # the checkpoints go once the model is published
    assert not list((b.local / "work" / "train").glob("*/checkpoints/checkpoint-*"))


def test_cache_verify_checks_the_store_and_discards_an_upload_cut_short(hosts, monkeypatch):
    """`cpt cache verify` on a store root: a prefix without a manifest (a writer killed mid-upload that nobody
    rebuilt), a published entry missing a file, a flipped byte (--full); --discard deletes them."""
    root = hosts.use("a")

    def build(text):
        def b(tmp):
            (tmp / "data.txt").write_text(text)
            return {}, {}
        return b

    root.publish("unit", "unit-good", build("good"))
    root.publish("unit", "unit-gone", build("gone"))
    root.publish("unit", "unit-flip", build("flip"))
    base = f"{hosts.bucket}/team/cpt/cache/unit"
    hosts.fs.pipe_file(f"{base}/unit-cut/data.txt", b"half an upload")  # files, never a manifest
    hosts.fs.rm_file(f"{base}/unit-gone/data.txt")
    hosts.fs.pipe_file(f"{base}/unit-flip/data.txt", b"flop")  # same size, other bytes
    hosts.fs.pipe_file(f"{hosts.bucket}/team/cpt/cache/_records/unit-gone", b"{}")  # its Prefect record

    def verify(*flags):
        return subprocess.run([sys.executable, "-m", "flows.cli", "cache", "verify", *flags, "--artifacts", hosts.url],
                              cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "CPT_SCRATCH": str(hosts.scratch("v"))})

    out = verify()
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"{hosts.url}/cache/unit/unit-cut: no manifest" in out.stdout
    assert f"{hosts.url}/cache/unit/unit-gone: data.txt is missing" in out.stdout
    assert "unit-flip" not in out.stdout and "unit-good" not in out.stdout  # sizes agree
    out = verify("--full")
    assert f"{hosts.url}/cache/unit/unit-flip: data.txt does not have the content" in out.stdout
    assert "unit-good" not in out.stdout
    out = verify("--full", "--discard")
    assert out.returncode == 0 and out.stdout.count("discarded") == 3, out.stdout
    assert hosts.objects("cache/unit") == ["unit-good/_COMPLETE", "unit-good/data.txt"]
    assert "unit-gone" not in hosts.objects("cache/_records")  # a rerun is not told it is Cached
    assert verify("--full").returncode == 0


def test_a_training_line_runs_from_any_host_through_the_store(hosts, tiny_model, tmp_path):
    """The nightly service across containers: a line trained on host a; a drop (outside the corpus paths)
    retrained on host b reads only the drop and is gated against a's promoted model; host c finds nothing to
    do; `cpt drops` on a laptop (host d) lists the line."""
    from flows.cli import main
    from flows.retrain import retrain
    from tasks.core.config.tree import validate_config

    old = time.time() - 3600
    texts = sample_texts(160)
    corpus = write_jsonl(tmp_path / "corpus" / "part-0.jsonl", [{"content": t} for t in texts[:120]])
    drop = write_jsonl(tmp_path / "incoming" / "2026-11-26" / "a.jsonl", [{"content": t} for t in texts[120:]])
    for f in (corpus, drop):
        os.utime(f, (old, old))
    config = validate_config({
        "corpus": {"paths": [str(corpus.parent)]}, "model": {"id": str(tiny_model)},
        "split": {"validation_fraction": 0.1}, "chunk": {"max_seq_length": 96, "overlap": 16},
        "train": {"max_steps": 2, "per_device_train_batch_size": 8, "eval_steps": 2, "save_steps": 2,
                  "early_stopping_patience": None},
        "evaluate": {"max_eval_rows": 8}, "push": {"name": "line-model"}})

    def retrain_on(host, **kw):
        hosts.use(host)
        return retrain(config=config, line="nightly", settle_seconds=60, artifacts=hosts.url, **kw)

    first = retrain_on("a")
    assert first["trained"] and first["promoted"]
    second = retrain_on("b", drop=str(drop.parent))
    stages = {s["name"]: s for s in second["pipeline"]["stages"]}
    assert second["trained"] and [d["status"] for d in second["drops"]] == ["active"]
    assert stages["load"]["counts"]["files_read"] == 1  # the drop; the corpus file's pieces came from the store
    assert stages["tokenize"]["counts"]["files_cached"] == 1
    assert second["pipeline"]["gate"]["reference"] == "promoted"  # against the model host a promoted
    assert "evaluate-reference" in stages
    third = retrain_on("c")
    assert not third["trained"] and third["reason"] == "unchanged"
    hosts.use("d")
    assert main(["drops", "--line", "nightly", "--artifacts", hosts.url]) == 0
