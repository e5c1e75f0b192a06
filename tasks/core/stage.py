"""The stage decorator and the Prefect cache policy that keys it: the one place that owns a stage's plumbing.

A stage body is its work alone: it gets a `Build` (the temp folder to write into, the root, its key, a
logger) and its inputs, writes its files and returns its counts and meta. `@stage` makes it a Prefect task,
binds the call (defaults included) into the key, builds in a temp folder and publishes atomically through the
root, returns the producer's typed manifest and logs its summary. Per-file pieces of a stage publish through
`publish_piece`, under the same rules.

Prefect decides "Cached" by a result record named by the key existing in result storage. The policy below
computes that key and drops a record whose output is missing, half-written or damaged, so such an output is a
cache miss, never a crash or a wrong result.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.core import fence
from tasks.core.paths import temp_beside
from tasks.core.keys import register_code_version, stage_key
from tasks.core.manifest import Piece, StageOutput, as_output, register_output
from tasks.core.root import ArtifactsRoot, open_root
from tasks.core.scope import current_scope, note_piece, taking_pieces

ROOT_PARAMETER = "artifacts"  # every stage task's own parameter: the root, part of no key

def with_pieces(result: tuple, taken: list[str]) -> tuple:
    """A body's (counts, meta[, extra]) with `pieces`: what it took that its `deps` do not already name."""
    extra = dict(result[2]) if len(result) > 2 else {}
    pieces = sorted(set(taken) - set(extra.get("deps", [])))
    if pieces:
        extra["pieces"] = pieces
    return (*result[:2], extra) if extra else tuple(result[:2])


def publish_piece(root: ArtifactsRoot, stage: str, key: str, build, progress=None,
                  size: int = 0, output: type[StageOutput] = Piece) -> tuple[StageOutput, bool]:
    """Publish one per-file piece of a stage; returns (output, reused), where reused means built before this
    run (this build scope). A reused piece advances `progress` by `size` at once, so the bar counts the whole
    corpus either way. `output`: the piece's manifest type (its meta typed; `Piece` holds the scope alone)."""
    register_output(stage, output)
    scope = current_scope()

    def scoped_build(tmp: Path):
        counts, meta = build(tmp)
        return counts, {**meta, "scope": scope} if scope else meta

    out, built = root.publish(stage, key, scoped_build)
    note_piece(out.path)  # the stage building now names it in its manifest: GC keeps it with the stage's output
    reused = not built and not (scope is not None and getattr(out.meta, "scope", None) == scope)
    if not built and progress is not None:
        progress.update(size)
    return out, reused


# ------------------------------------------------------------------------------------- cache policy


def _make_policy_class():
    from prefect.cache_policies import CachePolicy

    class StageCachePolicy(CachePolicy):
        """Key = `stage_key(task name, inputs)`; a record whose output is missing is dropped first."""

        def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
            stage = task_ctx.task.name
            inputs = dict(inputs)
            root = inputs.pop(ROOT_PARAMETER, None)
            key = stage_key(stage, inputs)
            if root is not None:
                root = open_root(root)
                manifest = root.published(stage, key)
                if manifest is None:
                    # Missing, half-written or damaged (a file or a referenced piece gone): a miss, rebuilt.
                    root.discard_record(key)
                else:
                    write_record(root.records_dir / key, manifest)
            return key

    return StageCachePolicy


@functools.cache
def manifest_serializer():
    """The result serializer of every stage task (tasks/core/records.py says why it is not Prefect's JSON one)."""
    from tasks.core.records import ManifestSerializer

    return ManifestSerializer()


def write_record(path: Path, output: StageOutput) -> None:
    """The Prefect result record of a published entry, written from its verified manifest with the manifest
    serializer: what makes the task Cached is derived from bytes this host checked, never read from a record
    someone else wrote (Prefect would deserialise it with whatever serializer it names, pickle included), and
    reading it back builds nothing but the stage's own manifest type. A record that was there and said
    something else is replaced, and the replacement logged with its key."""
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata

    record = ResultRecord(metadata=ResultRecordMetadata(storage_key=str(path), expiration=None,
                                                        serializer=manifest_serializer()), result=output)
    data = record.serialize()
    try:
        current = path.read_bytes()
    except OSError:
        current = None
    if current is not None and _same_record(current, data):
        return  # the record Prefect wrote when it built the entry, or the one this host wrote before
    if current is not None:
        from tasks.core.report import run_logger

        run_logger().warning("cache: the Prefect record of %s is not the one its manifest gives; replaced it "
                             "(a record is never deserialised as it was found)", path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _same_record(found: bytes, expected: bytes) -> bool:
    """Whether a record says what the manifest says, read as plain JSON (no object hook, no import)."""
    import json

    try:
        a, b = json.loads(found), json.loads(expected)
        return (a["metadata"]["serializer"] == b["metadata"]["serializer"]
                and a["metadata"].get("storage_key") == b["metadata"].get("storage_key")
                and json.loads(a["result"]) == json.loads(b["result"]))
    except (ValueError, KeyError, TypeError):
        return False


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
    """What a stage body gets besides its inputs: the temp dir to write its output into, the artifacts root,
    its key, and a logger. `on_published` registers what to do once the output is in place (never on a failed
    build: a train work dir must survive a failed publish to be resumed)."""

    tmp: Path
    root: ArtifactsRoot
    key: str
    log: Any
    published: list = dataclasses.field(default_factory=list)

    def on_published(self, fn: Callable[[StageOutput], None]) -> None:
        self.published.append(fn)

    def check(self) -> None:
        """Raise LockLost if the lock this output is built under was lost (its store lease lapsed): a long
        body calls it where stopping is cheap."""
        fence.check()

    def on_lost(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call `fn` (e.g. a child process's kill) as soon as that lock is lost; returns the unregister call."""
        return fence.current().on_lost(fn)


def _call_name(stage: str) -> str:
    """How this call of `stage` is named in its log lines: the label a second use of a stage runs under (the
    flow's `task_run_name`, e.g. evaluate-reference for evaluate-base on the last promoted model), else the stage."""
    try:
        from prefect.context import TaskRunContext
    except ImportError:  # pragma: no cover  (no orchestrator: see `stage`)
        return stage
    ctx = TaskRunContext.get()
    if ctx is None or not getattr(ctx.task, "task_run_name", None):
        return stage
    return ctx.task_run.name


def stage(name: str, *, version: int, output: type[StageOutput] = StageOutput, code: list = (),
          libraries: list[str] = (), key_exclude: set[str] | frozenset[str] = frozenset(), **task_kwargs):
    """Declare a stage. The body is the work alone:

        @stage("shuffle", version=1, output=Split, libraries=["numpy"])
        def shuffle(build: Build, shuffle: ShuffleConfig, split: SplitConfig, docs: Docs):
            ...write into build.tmp...
            return counts, meta            # (+ a dict with `deps` / `content` for outputs that have them)

    The decorator makes it a Prefect task whose parameters are the body's (less `build`) plus `artifacts`, the
    root; binds the call's arguments (defaults applied) and computes the key once from all of them but
    `key_exclude` (inputs that say where something is, or describe an input keyed by content), so no input can
    be left out of it by accident; builds in a temp dir and publishes atomically (or takes the output another
    process published); returns the producer's typed manifest (`output`) and logs its `summary()`.

    The code version is read from the body and what it reaches (tasks/core/keys.py); `code` adds what no name
    in it leads to (a module run as a child process); `libraries` are the packages whose versions shape the
    output.
    """

    def deco(body):
        body_sig = inspect.signature(body)
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in body_sig.parameters.values()
                  if p.name != "build"]
        unknown = set(key_exclude) - {p.name for p in params}
        if unknown:
            raise TypeError(f"stage {name!r}: key_exclude names no parameter: {sorted(unknown)}")
        params.append(inspect.Parameter(ROOT_PARAMETER, inspect.Parameter.KEYWORD_ONLY, annotation=ArtifactsRoot))
        signature = body_sig.replace(parameters=params, return_annotation=output)

        @functools.wraps(body)
        def run(**kwargs) -> StageOutput:
            bound = signature.bind(**kwargs)
            bound.apply_defaults()
            inputs = dict(bound.arguments)
            root = open_root(inputs.pop(ROOT_PARAMETER))
            key = current_key(name, inputs)
            from tasks.core.report import run_logger

            log = run_logger()
            callbacks: list = []

            def build(tmp: Path):
                # On an object-store root an input another host built (or a Cached one) may not be here yet.
                for value in inputs.values():
                    if isinstance(value, StageOutput):
                        value.dir(root)
                with taking_pieces() as taken:
                    result = body(Build(tmp=tmp, root=root, key=key, log=log, published=callbacks), **inputs)
                return with_pieces(result, taken)

            published, built = root.publish(name, key, build)
            _BUILT[key] = built
            out = as_output(published, output)
            for fn in callbacks:
                fn(out)
            shown = _call_name(name)
            for level, line in out.summary(root):
                log.log(level, "%s: %s", shown, line)
            return out

        run.__signature__ = signature
        register_output(name, output)
        register_code_version(name, version, [body, output, *code], list(libraries), key_exclude)
        try:
            from prefect import task
        except ImportError:
            # A machine with the training stack but no orchestrator (a bare GPU box running python -m bench.gpu_check):
            # the stage's functions import and run; there is no task to schedule. Flows import Prefect
            # themselves, so a missing install still fails loudly where it matters.
            return run
        # The stage cache policy keys the task; its result (the manifest) is kept as the manifest's own JSON.
        return task(name=name, cache_policy=stage_cache_policy(), persist_result=True,
                    result_serializer=manifest_serializer(), **task_kwargs)(run)

    return deco
