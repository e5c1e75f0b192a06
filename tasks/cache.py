"""Content-addressed stage outputs and the Prefect cache policy that keys them.

A stage's key = its name + its code version (an explicit per-stage version, the source of the functions that
compute its output, and the versions of the libraries that shape it; see `register_code_version`) + its inputs,
where an upstream `StageOutput` contributes only its content digest (else its key) and a `Fingerprint` only its
content digest. Nothing else — not the run id, not the flow parameters —
so a change reruns exactly the stages downstream of it.

Outputs live at `<artifacts>/cache/<stage>/<key>/`, built in a `.tmp-*` sibling and moved into place with
`os.replace` once the manifest (`_COMPLETE`) is written inside it: a directory without the manifest is never
read. The Prefect result record (what makes a task "Cached") lives in `<artifacts>/cache/_records/<key>`;
the policy deletes a record whose output is gone, so a deleted or half-written output is a cache miss.

On an object-store root (`s3://…`, tasks/store.py) the artifacts root is this host's mirror of the store: the
store decides what is complete, entries are uploaded manifest-last under a lease lock of conditional creates and
fetched on first read, and the Prefect records and state files are copied both ways.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import inspect
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

MANIFEST = "_COMPLETE"
RECORDS_DIR = "_records"
_TMP_PREFIX = ".tmp-"


class Fingerprint(BaseModel):
    """Content identity of something read from outside the cache (corpus files, a tokenizer)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: str
    digest: str
    # Where the content was found; not part of any key, so moving a corpus does not invalidate it.
    location: str = ""
    items: list[dict[str, Any]] = []

    def key_material(self) -> dict[str, Any]:
        return {"kind": self.kind, "digest": self.digest}


class StageOutput(BaseModel):
    """The small manifest stages pass to each other: where the output is and what it holds."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    stage: str
    key: str
    path: str  # relative to the artifacts root, so the root can move with its cache
    counts: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    # What downstream keys see instead of `key` when set: an identity of the output's content that leaves out
    # what does not reach the stages below (the load stage's provenance paths), so moving a corpus keeps them
    # Cached.
    content: str = ""
    # Other cache entries this output refers to (relative paths): it is complete only while they are.
    deps: list[str] = []
    # Every file of the entry with its size, checked on read: a truncated or deleted file is a miss.
    files: dict[str, int] = {}
    # Every file's content digest (blake2b-128), checked by `cpt cache verify --full`.
    digests: dict[str, str] = {}

    def dir(self, artifacts: str | Path) -> Path:
        """The entry's folder, complete: on an object-store root it is fetched into this host's mirror first."""
        return local_entry(artifacts, self.path)

    def location(self, artifacts: str | Path) -> str:
        """Where the entry lives, for a log line: the store URL, else the local folder. Fetches nothing."""
        url = store_url(artifacts)
        return f"{url}/{self.path}" if url else str(Path(artifacts) / self.path)

    def file(self, artifacts: str | Path, name: str) -> Path:
        """One file of the entry; on an object-store root only that file is fetched (a report reads a small
        file of an entry whose model it does not need)."""
        path = Path(artifacts) / self.path / name
        if not path.is_file():
            from tasks.store import store_for

            store = store_for(artifacts)
            if store is not None:
                store.fetch_entry(self.path, only=[name])
        return path

    def summary(self, artifacts: str) -> list[tuple[int, str]]:
        """(logging level, line) pairs the stage decorator logs after every call, computed or cached. Typed
        manifests say what their stage produced."""
        return []

    def links(self, artifacts: str) -> dict[str, str]:
        """What a user opens of this output (name -> how), for the run summary and the CLI."""
        return {}

    def key_material(self) -> dict[str, Any]:
        return {"stage": self.stage, "content": self.content} if self.content else {"stage": self.stage,
                                                                                      "key": self.key}


# ---------------------------------------------------------------------------------------------- keys


def artifacts_root(explicit: str | Path | None = None) -> Path:
    """The local artifacts root: `explicit`, else $CPT_ARTIFACTS, else ./artifacts. A `file://` URL is its path.
    An object-store URL (`s3://bucket/prefix`, `gs://…`, any fsspec URL) is the store; what is returned is this
    host's mirror of it (tasks/store.py), through which every stage reads and publishes."""
    value = str(explicit or os.environ.get("CPT_ARTIFACTS") or "artifacts")
    from tasks.store import check_url, open_root, split_url

    url = split_url(value)
    if url is not None:
        if url[0] != "file":
            check_url(value, "--artifacts" if explicit else "CPT_ARTIFACTS")
            return open_root(value)
        value = url[1]
    return Path(value).resolve()


def store_url(artifacts: str | Path) -> str | None:
    """The object-store URL a local root mirrors, None for a local root."""
    from tasks.store import store_for

    store = store_for(artifacts)
    return store.url if store else None


def cache_dir(artifacts: str | Path, stage: str, key: str) -> Path:
    return Path(artifacts) / "cache" / stage / key


def records_dir(artifacts: str | Path) -> Path:
    return Path(artifacts) / "cache" / RECORDS_DIR


# Per stage: (explicit version, the code that computes its output, libraries). Resolved into a digest on first
# use, so a stage can name functions defined below its task.
_CODE_SPECS: dict[str, tuple[int, tuple, tuple[str, ...]]] = {}
_CODE_VERSIONS: dict[str, str] = {}
# Parameters that say where to write (artifacts) or describe inputs already keyed by content, for logs and the
# model card: train's `parent` (its digest is `base_model`), push's `base_model_id` (a path or hub id: the model
# is keyed by digest) and `lineage` (drawn from push's keyed inputs, plus paths).
KEY_EXCLUDED = frozenset({"artifacts", "parent", "base_model_id", "lineage", "runtime"})


def register_code_version(stage: str, version: int, code: list, libraries: list[str] = ()) -> None:
    """Declare what a stage's code version is made of: its explicit `version` (bump it when the output changes
    for the same inputs: tests/test_golden.py fails until you do), the source of `code` (the functions and
    classes that compute the output, a module for a whole program such as the training child,
    "module:qualname" for one defined later, or "@stage" for another stage's code reused whole), and the
    versions of `libraries` that shape the output. Nothing else: a docstring edit in the config, the cache or
    the report modules leaves every key as it was."""
    _CODE_SPECS[stage] = (version, tuple(code), tuple(libraries))
    _CODE_VERSIONS.pop(stage, None)


def _resolve(item):
    if isinstance(item, str):
        module, _, qualname = item.partition(":")
        obj = importlib.import_module(module)
        for part in qualname.split(".") if qualname else []:
            obj = getattr(obj, part)
        return obj
    return item


def code_version(stage: str) -> str:
    if stage in _CODE_VERSIONS:
        return _CODE_VERSIONS[stage]
    if stage not in _CODE_SPECS:
        return "unregistered"
    version, code, libraries = _CODE_SPECS[stage]
    h = hashlib.sha256(f"{stage}@{version}".encode())
    for item in code:
        h.update(b"\0")
        if isinstance(item, str) and item.startswith("@"):  # another stage's code, reused whole
            h.update(code_version(item[1:]).encode())
        else:
            h.update(inspect.getsource(_resolve(item)).encode())
    for lib in libraries:
        h.update(f"{lib}=={importlib.metadata.version(lib)}".encode())
    _CODE_VERSIONS[stage] = h.hexdigest()[:16]
    return _CODE_VERSIONS[stage]


def stage_version(stage: str) -> int:
    """The explicit version a stage declares."""
    return _CODE_SPECS[stage][0]


def _canonical(value: Any) -> Any:
    if isinstance(value, (StageOutput, Fingerprint)):
        return value.key_material()
    if isinstance(value, BaseModel):  # a config section: its key material (less output-neutral fields)
        return value.key_material() if hasattr(value, "key_material") else value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def stage_key(stage: str, inputs: dict[str, Any]) -> str:
    payload = {
        "stage": stage,
        "code": code_version(stage),
        "inputs": {k: _canonical(v) for k, v in sorted(inputs.items()) if k not in KEY_EXCLUDED},
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:24]}"


# ------------------------------------------------------------------------------------ atomic outputs


def read_manifest(directory: Path) -> StageOutput | None:
    try:
        return StageOutput.model_validate_json((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def damage(directory: Path, manifest: StageOutput, artifacts: Path) -> str | None:
    """Why a published entry cannot be trusted (a file missing or of another size, a referenced entry gone),
    or None. Sizes only: a stat per file, cheap enough for every cache lookup."""
    for name, size in manifest.files.items():
        try:
            actual = (directory / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, the manifest says {size}"
    for dep in manifest.deps:
        dep_manifest = read_manifest(artifacts / dep)
        if dep_manifest is None:
            return f"it refers to {dep}, which is gone"
        why = damage(artifacts / dep, dep_manifest, artifacts)
        if why is not None:
            return f"it refers to {dep}, where {why}"
    return None


def content_damage(directory: Path, manifest: StageOutput) -> str | None:
    """`damage` by content: a file whose digest is not the one recorded at publish (a flipped bit keeps the
    size). Reads every byte: for `cpt cache verify --full`, not for every lookup."""
    for name, digest in manifest.digests.items():
        try:
            actual = hash_file(directory / name)
        except OSError:
            return f"{name} is missing"
        if actual != digest:
            return f"{name} does not have the content it was published with"
    return None


def verify_entries(artifacts: str | Path, full: bool = False, discard: bool = False):
    """Every published entry of the cache: yields (entry path, why it is damaged or None). Sizes (and the
    entries it refers to) always, contents too with `full`. With `discard`, a damaged entry is removed with its
    result record, so the next run rebuilds it."""
    artifacts = Path(artifacts)
    for manifest_file in sorted((artifacts / "cache").glob(f"*/*/{MANIFEST}")):
        entry = manifest_file.parent
        manifest = read_manifest(entry)
        if manifest is None:
            why = "its manifest is unreadable"
        else:
            why = damage(entry, manifest, artifacts) or (content_damage(entry, manifest) if full else None)
        if why is not None and discard:
            discard_entry(artifacts, entry)
        yield entry, why


def discard_entry(artifacts: Path, entry: Path) -> None:
    """Remove a damaged entry: moved aside first (one rename), so no reader sees it half-deleted."""
    remove_entry_dir(entry)
    discard_record(artifacts, entry.name)


def remove_entry_dir(entry: Path) -> None:
    """Delete an entry's folder: renamed aside first, so no reader sees it half-deleted, under a temp-build name
    of its key, so what a crash mid-delete leaves is removed by the next build of that key."""
    trash = entry.parent / f"{_TMP_PREFIX}{entry.name}-{os.getpid()}-trash-{uuid.uuid4().hex[:8]}"
    os.replace(entry, trash)
    shutil.rmtree(trash, ignore_errors=True)


def verified_manifest(directory: Path, artifacts: Path, quiet: bool = False) -> StageOutput | None:
    """The manifest of a complete, undamaged entry, else None (and a damaged entry is logged by name)."""
    manifest = read_manifest(directory)
    if manifest is None:
        return None
    why = damage(directory, manifest, artifacts)
    if why is not None:
        if quiet:
            return None
        from tasks.report import run_logger

        run_logger().warning("cache: %s is damaged (%s); rebuilding it", directory, why)
        return None
    return manifest


def is_complete(artifacts: str | Path, stage: str, key: str) -> bool:
    """Complete here; on an object-store root, complete in the store (the truth every host shares: a local copy
    the store lacks is uploaded by the rerun this miss causes)."""
    from tasks.store import store_for

    store = store_for(artifacts)
    if store is not None:
        return store.complete(f"cache/{stage}/{key}") is not None
    return verified_manifest(cache_dir(artifacts, stage, key), Path(artifacts)) is not None


def local_entry(artifacts: str | Path, rel: str) -> Path:
    """`<artifacts>/<rel>`, fetched from the store into this host's mirror when it is not complete here."""
    directory = Path(artifacts) / rel
    from tasks.store import store_for

    store = store_for(artifacts)
    if store is not None and verified_manifest(directory, Path(artifacts), quiet=True) is None:
        with key_lock(_lock_dir(directory), directory.name):
            if verified_manifest(directory, Path(artifacts), quiet=True) is None:
                store.fetch_entry(rel)
    return directory


def _lock_dir(directory: Path) -> Path:
    directory.parent.mkdir(parents=True, exist_ok=True)
    return directory.parent


def discard_record(artifacts: str | Path, key: str) -> None:
    """Drop the Prefect result record of `key` (here, and in the store for an object-store root)."""
    with contextlib.suppress(OSError):
        (records_dir(artifacts) / key).unlink()
    from tasks.store import store_for

    store = store_for(artifacts)
    if store is not None:
        with contextlib.suppress(FileNotFoundError):
            store.fs.rm_file(store.remote(f"cache/{RECORDS_DIR}/{key}"))


def share_record(artifacts: str | Path, key: str) -> None:
    """On an object-store root, copy the Prefect result record of `key` (what makes a task Cached) to the
    store once Prefect has written it here, so every host sees the stage as Cached. Prefect keeps records where
    its result storage says, and a remote one must be a block saved server-side (with whatever credentials it
    holds); copying the file keeps the credentials in the environment."""
    from tasks.store import store_for

    store = store_for(artifacts)
    local = records_dir(artifacts) / key
    if store is not None and local.is_file() and not store.fs.exists(store.remote(f"cache/{RECORDS_DIR}/{key}")):
        store.put(local, f"cache/{RECORDS_DIR}/{key}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_builds(stage_root: Path, key: str) -> int:
    """Temp dirs of this key left by processes that no longer exist (SIGKILL, OOM, power loss)."""
    removed = 0
    if not stage_root.is_dir():
        return 0
    for d in stage_root.glob(f"{_TMP_PREFIX}{key}-*"):
        try:
            pid = int(d.name[len(_TMP_PREFIX) + len(key) + 1 :].split("-", 1)[0])
        except ValueError:
            pid = -1
        if pid == os.getpid() or pid < 0 or not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
    return removed


@contextlib.contextmanager
def key_lock(stage_root: Path, key: str):
    """An exclusive lock per stage key across processes. flock is released by the kernel when its holder dies,
    so a SIGKILLed run never leaves a lock that blocks the next one (the empty lock file stays, harmlessly)."""
    import fcntl

    fd = os.open(stage_root / f".lock-{key}", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def publish(
    artifacts: str | Path,
    stage: str,
    key: str,
    build: Callable[[Path], tuple[dict[str, Any], dict[str, Any]]],
) -> StageOutput:
    """Run `build(tmp_dir) -> (counts, meta)` and move its directory into place atomically.

    Builds of one key are serialised across processes: a second run (a manual run beside a scheduled one)
    waits, then takes the output the first one published instead of computing it again. On any exception the
    temp dir is removed and nothing is published.
    """
    return _publish(artifacts, stage, key, build)[0]


def _publish(artifacts: str | Path, stage: str, key: str, build) -> tuple[StageOutput, bool]:
    """`publish`, also saying whether this call built the output (True) or found it published (False)."""
    artifacts = Path(artifacts)
    final = cache_dir(artifacts, stage, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    from tasks.store import store_for

    store = store_for(artifacts)
    with key_lock(final.parent, key):
        existing = verified_manifest(final, artifacts)
        if store is None:
            if existing is not None:
                return existing, False
            return _build_and_publish(artifacts, final, stage, key, build), True
        return _publish_in_store(store, artifacts, final, stage, key, build, existing)


def _publish_in_store(store, artifacts: Path, final: Path, stage: str, key: str, build,
                      existing: StageOutput | None) -> tuple[StageOutput, bool]:
    """The object-store path of `_publish` (the local key lock held): the store decides. A complete entry there
    is fetched; else one host takes the key's lock and builds, others wait and fetch what it publishes."""
    rel = final.relative_to(artifacts).as_posix()
    if existing is not None:
        if store.complete(rel) is None:  # published here, never uploaded (killed in between), or deleted there
            with store.lock(rel, done=lambda: store.complete(rel) is not None) as held:
                if held:
                    store.upload_entry(rel, final, existing)
        return existing, False
    while True:
        fetched = store.fetch_entry(rel)
        if fetched is not None:
            return fetched, False
        with store.lock(rel, done=lambda: store.complete(rel) is not None) as held:
            if held:
                manifest = _build_and_publish(artifacts, final, stage, key, build)
                store.upload_entry(rel, final, manifest)
                return manifest, True
        # Another host published it while we waited: loop to fetch it (or build, if it was deleted meanwhile).


# The build scope: pieces built under the same scope count as "read in this run" wherever they were built
# (the retrain flow's drop gate builds the drop's pieces, and the pipeline it then runs reuses them).
_SCOPE: contextvars.ContextVar[str | None] = contextvars.ContextVar("cpt_build_scope", default=None)


def current_scope() -> str | None:
    return _SCOPE.get()


@contextlib.contextmanager
def build_scope(scope: str | None = None):
    """Open a build scope unless one is open already (a pipeline run inside a retrain run joins it)."""
    if _SCOPE.get() is not None:
        yield _SCOPE.get()
        return
    token = _SCOPE.set(scope or uuid.uuid4().hex)
    try:
        yield _SCOPE.get()
    finally:
        _SCOPE.reset(token)


def publish_piece(artifacts: str | Path, stage: str, key: str, build, progress=None,
                  size: int = 0) -> tuple[StageOutput, bool]:
    """`publish` for one per-file piece of a stage; returns (output, reused), where reused means built before
    this run (this build scope). A reused piece advances `progress` by `size` at once, so the bar counts the
    whole corpus either way."""
    scope = _SCOPE.get()

    def scoped_build(tmp: Path):
        counts, meta = build(tmp)
        return counts, {**meta, "scope": scope} if scope else meta

    out, built = _publish(artifacts, stage, key, scoped_build)
    reused = not built and not (scope is not None and out.meta.get("scope") == scope)
    if not built and progress is not None:
        progress.update(size)
    return out, reused


# Counts that say how an output was built (what was reused from the cache), not what it holds.
PROVENANCE_COUNTS = frozenset({"files_read", "files_tokenized", "files_cached", "files_chunked", "files_measured"})
# Manifest fields that say where something is (they follow the key), not what it holds.
LOCATION_FIELDS = frozenset({"key", "path", "scope"})


def _without_locations(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_locations(v) for k, v in value.items() if k not in LOCATION_FIELDS}
    if isinstance(value, list):
        return [_without_locations(v) for v in value]
    return value


def content_digest(digests: dict[str, str], counts: dict[str, Any], meta: dict[str, Any], deps: list[str],
                   artifacts: Path) -> str:
    """What an output holds, whatever key built it: its files' digests, the content of the entries it refers
    to, its counts and meta less provenance and locations. Downstream keys use this instead of the key, so a
    stage that reruns (a code version bump, a changed setting that turns out not to matter) and yields the same
    content leaves everything below it Cached: early cut-off."""
    parts = [(f"file:{name}", digest) for name, digest in sorted(digests.items())]
    for dep in deps:
        manifest = read_manifest(artifacts / dep)
        parts.append(("dep", (manifest.content or manifest.key) if manifest else dep))
    parts.append(("counts", json.dumps({k: v for k, v in counts.items() if k not in PROVENANCE_COUNTS},
                                       sort_keys=True, default=str)))
    parts.append(("meta", json.dumps(_without_locations(meta), sort_keys=True, default=str)))
    return f"c-{combine_digests(parts)}"


def _build_and_publish(artifacts: Path, final: Path, stage: str, key: str, build) -> StageOutput:
    remove_stale_builds(final.parent, key)
    tmp = final.parent / f"{_TMP_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        result = build(tmp)
        counts, meta = result[:2]
        extra = result[2] if len(result) > 2 else {}  # content / deps, for outputs that have them
        paths = [f for f in sorted(tmp.rglob("*")) if f.is_file()]
        files = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in paths}
        digests = {f.relative_to(tmp).as_posix(): hash_file(f) for f in paths}
        if "content" not in extra:
            extra = {**extra, "content": content_digest(digests, counts, meta, extra.get("deps", []), artifacts)}
        manifest = StageOutput(
            stage=stage, key=key, path=final.relative_to(artifacts).as_posix(), counts=counts, meta=meta,
            files=files, digests=digests, **extra,
        )
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2), encoding="utf-8")
        if final.exists():
            # A directory without a manifest is debris (a partial copy, a deleted marker): move it away
            # first, because os.replace cannot overwrite a non-empty directory.
            remove_entry_dir(final)
        os.replace(tmp, final)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------- cache policy


def _fetch_record(artifacts: str | Path, key: str) -> None:
    """The store's record of a complete entry, copied here when this host has none (see `share_record`)."""
    from tasks.store import store_for

    store = store_for(artifacts)
    local = records_dir(artifacts) / key
    if store is not None and not local.is_file():
        store.get(f"cache/{RECORDS_DIR}/{key}", local)


def _make_policy_class():
    from prefect.cache_policies import CachePolicy

    class StageCachePolicy(CachePolicy):
        """Key = `stage_key(task name, inputs)`; a record whose output is missing is dropped first."""

        def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
            stage = task_ctx.task.name
            key = stage_key(stage, inputs)
            artifacts = inputs.get("artifacts")
            if artifacts is not None and not is_complete(artifacts, stage, key):
                # Missing, half-written or damaged (a file or a referenced piece gone): a miss, rebuilt.
                discard_record(artifacts, key)
            elif artifacts is not None:
                _fetch_record(artifacts, key)
            return key

    return StageCachePolicy


@functools.cache
def stage_cache_policy():
    return _make_policy_class()()


def current_key(stage: str, inputs: dict[str, Any]) -> str:
    """The key of the running task: Prefect's transaction key under the engine, else computed (task.fn)."""
    try:
        from prefect.transactions import get_transaction

        txn = get_transaction()
    except ImportError:  # pragma: no cover
        txn = None
    if txn is not None and txn.key and txn.key.startswith(f"{stage}-"):
        return txn.key
    return stage_key(stage, inputs)


_BUILT: dict[str, bool] = {}


def was_built(key: str) -> bool:
    """Whether the last call of the stage with this key in this process built its output (False: it was taken
    from the cache, the store, or another run that built it meanwhile)."""
    return _BUILT.pop(key, False)


@dataclasses.dataclass
class Build:
    """What a stage body gets besides its inputs: the temp dir to write its output into, where the cache is,
    its key, and a logger. `on_published` registers what to do once the output is in place (never on a failed
    build: a train work dir must survive a failed publish to be resumed)."""

    tmp: Path
    artifacts: Path
    key: str
    log: Any
    published: list = dataclasses.field(default_factory=list)

    def on_published(self, fn: Callable[[StageOutput], None]) -> None:
        self.published.append(fn)


def stage(name: str, *, version: int, output: type[StageOutput] = StageOutput, code: list = (),
          libraries: list[str] = (), **task_kwargs):
    """The one place that owns a stage's plumbing. The body is the work alone:

        @stage("shuffle", version=1, output=Split, code=[split_documents, ...])
        def shuffle(build: Build, shuffle: ShuffleConfig, split: SplitConfig, docs: Docs):
            ...write into build.tmp...
            return counts, meta            # (+ a dict with `deps` / `content` for outputs that have them)

    The decorator makes it a Prefect task whose parameters are the body's (less `build`) plus `artifacts`; binds
    the call's arguments (defaults applied) and computes the key once from all of them, so no input can be left
    out of it; builds in a temp dir and publishes atomically (or takes the output another process published);
    returns the producer's typed manifest (`output`) and logs its `summary()`.
    """

    def deco(body):
        body_sig = inspect.signature(body)
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in body_sig.parameters.values()
                  if p.name != "build"]
        params.append(inspect.Parameter("artifacts", inspect.Parameter.KEYWORD_ONLY, annotation=str))
        signature = body_sig.replace(parameters=params, return_annotation=output)

        @functools.wraps(body)
        def run(**kwargs) -> StageOutput:
            bound = signature.bind(**kwargs)
            bound.apply_defaults()
            inputs = dict(bound.arguments)
            artifacts = Path(inputs.pop("artifacts"))
            key = current_key(name, inputs)
            from tasks.report import run_logger

            log = run_logger()
            callbacks: list = []

            def build(tmp: Path):
                # On an object-store root an input another host built (or a Cached one) may not be here yet.
                for value in inputs.values():
                    if isinstance(value, StageOutput):
                        local_entry(artifacts, value.path)
                return body(Build(tmp=tmp, artifacts=artifacts, key=key, log=log, published=callbacks), **inputs)

            published, built = _publish(artifacts, name, key, build)
            _BUILT[key] = built
            out = output(**published.model_dump())
            for fn in callbacks:
                fn(out)
            for level, line in out.summary(str(artifacts)):
                log.log(level, "%s: %s", name, line)
            return out

        run.__signature__ = signature
        register_code_version(name, version, [body, *code], list(libraries))
        try:
            from prefect import task
        except ImportError:
            # A machine with the training stack but no orchestrator (a bare GPU box running bench/gpu_check.py):
            # the stage's functions import and run; there is no task to schedule. Flows import Prefect
            # themselves, so a missing install still fails loudly where it matters.
            return run
        # The stage cache policy keys the task; its result (the manifest) is kept as JSON.
        return task(name=name, cache_policy=stage_cache_policy(), persist_result=True, result_serializer="json",
                    **task_kwargs)(run)

    return deco


# ------------------------------------------------------------------------------------- state files


@contextlib.contextmanager
def locked_state(path: Path, read: Callable[[], BaseModel], root: Path | None = None):
    """Lock `path`, yield `read()`, and write it back atomically (temp file + rename) when the block ends
    without error: a killed writer leaves the old state or the new one, and concurrent writers lose nothing.
    flock is released by the kernel if the holder dies. On an object-store `root` the store's lease lock is
    taken as well (writers on other hosts), the state is read from the store and written back to it."""
    import fcntl

    from tasks.store import store_for

    store = store_for(root) if root is not None else None
    rel = path.relative_to(root).as_posix() if store is not None else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.stem}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with store.lock(rel) if store is not None else contextlib.nullcontext():
            if store is not None:
                store.get(rel, path)
            state = read()
            yield state
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
            tmp.write_text(state.model_dump_json(indent=2), encoding="utf-8")
            if store is not None:
                store.put(tmp, rel)
            os.replace(tmp, path)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def fetch_state(root: str | Path, path: Path) -> None:
    """Bring a state file of an object-store root up to date from the store (removed here if gone there)."""
    from tasks.store import store_for

    store = store_for(root)
    if store is not None:
        store.get(path.relative_to(root).as_posix(), path)


def save_file(root: str | Path, path: Path) -> None:
    """Copy a file written under the root (a run summary) to the store, on an object-store root."""
    from tasks.store import store_for

    store = store_for(root)
    if store is not None:
        store.put(path, path.relative_to(root).as_posix())


# ------------------------------------------------------------------------------------- fingerprints


def hash_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class DigestMemo:
    """Content digests of files, remembered by (size, mtime_ns, inode) in `<artifacts>/cache/_digests.json`:
    a rerun over an unchanged multi-GB corpus or model does not read it again, and any write to a file
    (which moves its mtime or size) makes it hashed anew — the rule make and rsync use."""

    def __init__(self, artifacts: str | Path):
        self.path = Path(artifacts) / "cache" / "_digests.json"
        try:
            self.entries: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.changed = False

    def digest(self, path: str | Path) -> str:
        path = Path(path).resolve()
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = self.entries.get(str(path))
        if entry and entry[:3] == stamp:
            return entry[3]
        value = hash_file(path)
        self.entries[str(path)] = [*stamp, value]
        self.changed = True
        return value

    def save(self) -> None:
        if not self.changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.entries))
        os.replace(tmp, self.path)  # concurrent runs may lose each other's entries, never corrupt the file
        self.changed = False


def combine_digests(parts: list[tuple[str, str]]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, digest in parts:
        h.update(name.encode())
        h.update(b"\0")
        h.update(digest.encode())
        h.update(b"\n")
    return h.hexdigest()
