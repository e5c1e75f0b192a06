"""held-out: the evaluation text training must not contain, gathered in one place for shuffle's
decontamination (shuffle.decontaminate): evaluate.general_corpus (through load), the documents of the evaluation
tasks (evaluate.tasks) and, for the replay text (which reaches training through mix), the domain's validation
split.

A task's documents: a local task YAML that reads local data files (`dataset_kwargs.data_files`) is read from
them (every record, whatever the split: few-shot examples are evaluation text too), without lm-eval; a registry
task (or a YAML that names no local file) through lm-eval's TaskManager and its `eval_docs`, from the datasets
cache: nothing is downloaded here, and a task whose data is not at hand is reported as not checked (a warning
naming it), never a failure. A document's text is its string fields in order (question, passage, choices),
joined, so a span that runs from a question into its answer is found too.

The output's content is the digest of the texts and their sources, so shuffle reruns only when the held-out
text itself changes (not when a task's metric or prompt template does).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from tasks.core.config.task_files import local_task_data, local_task_files, read_task_yaml, task_path_like
from tasks.core.manifest import Fingerprint
from tasks.core.root import ArtifactsRoot
from tasks.core.stage import Build, stage
from tasks.data.arrow import read_arrow
from tasks.data.held_out_text import HELD_OUT_FILE, HeldOut, gather

if TYPE_CHECKING:
    from tasks.load import Docs
    from tasks.shuffle import Split


_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}  # datasets builders that read data_files only


def doc_text(doc: Any) -> str:
    """The string fields of a task document (nested lists and mappings too), in order, one a line."""
    out: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, str):
            if v.strip():
                out.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(doc)
    return "\n".join(out)


def local_task_docs(yaml_file: Path) -> tuple[str, list[Path]] | None:
    """(the task's name, its local data files) when the YAML reads local files with a builder that needs
    nothing else (`dataset_path: json` ...); None when it must be resolved by lm-eval."""
    doc = read_task_yaml(yaml_file)
    files = local_task_data(yaml_file)
    if not isinstance(doc.get("task"), str) or doc.get("dataset_path") not in _LOCAL_BUILDERS or not files:
        return None
    return doc["task"], files


def read_data_file(path: Path, builder: str) -> Iterator[Any]:
    """Records of a local task data file, read the way the datasets builder named in the YAML would."""
    from datasets import load_dataset

    yield from load_dataset(builder, data_files=str(path), split="train")


def task_texts(tasks: list[str]) -> tuple[list[tuple[str, Iterable[str]]], dict[str, str]]:
    """[(task name, its documents' texts)] of evaluate.tasks, and {task: why not checked} for those whose data is
    not at hand (lm-eval could not load them offline)."""
    found: list[tuple[str, Iterable[str]]] = []
    registry, include = [], []
    for entry in tasks:
        if not task_path_like(entry):
            registry.append(entry)
            continue
        path = Path(entry).expanduser()
        for y in local_task_files(path):
            local = local_task_docs(y)
            if local is not None:
                name, files = local
                builder = read_task_yaml(y)["dataset_path"]
                found.append((name, (doc_text(r) for f in files for r in read_data_file(f, builder))))
            elif isinstance(read_task_yaml(y).get("task"), str):
                registry.append(read_task_yaml(y)["task"])
                include.append(str(y.resolve()))
    not_checked: dict[str, str] = {}
    if registry:
        found_registry, not_checked = registry_task_texts(list(dict.fromkeys(registry)), list(dict.fromkeys(include)))
        found += found_registry
    return found, not_checked


def registry_task_texts(names: list[str], include: list[str]) -> tuple[list[tuple[str, list[str]]], dict[str, str]]:
    """Through lm-eval's TaskManager, offline (HF_DATASETS_OFFLINE: the datasets cache or nothing): every leaf
    task's eval_docs; a task that fails to load is not checked, with the reason."""
    try:
        import lm_eval.tasks  # noqa: F401
    except ImportError as e:
        return [], {n: f"lm-eval is not importable: {e}" for n in names}
    from tasks.ml.lm_tasks import configured_tasks

    found, not_checked = [], {}
    # `include`: the configured task entries (files or folders) whose YAMLs name no local data: lm-eval sees them
    # from a private folder only (tasks/ml/lm_tasks.py), never the folder they sit in.
    with offline(), configured_tasks(include) as (manager, _):
        for name in names:
            try:
                leaves = manager.load([name])["tasks"]
                for leaf, task in leaves.items():
                    found.append((leaf, [doc_text(d) for d in task.eval_docs]))
            except Exception as e:  # lm-eval raises what datasets raises (ConnectionError offline, ...)
                not_checked[name] = f"{type(e).__name__}: {str(e)[:200]}"
    return found, not_checked


@contextlib.contextmanager
def offline():
    """The Hub clients offline for the block (they read HF_HUB_OFFLINE once, at import: their module flags are
    what counts), then as they were: only what the datasets cache holds is read."""
    import datasets.config
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def doc_texts(docs: Docs | None, root: ArtifactsRoot, rows: pa.Table | None = None) -> Iterator[str]:
    if docs is None:
        return
    read = docs.text_reader(root, rows)
    n = len(rows) if rows is not None else docs.index(root, ["part"]).num_rows
    for i in range(n):
        yield read(i)


# `tasks` names the tasks (registry names are keyed only here); `task_files` is the content of the local task
# files and the harness version (evaluate.task_fingerprint).
@stage("held-out", version=1, output=HeldOut, libraries=["pyarrow", "datasets"])
def held_out(build: Build, general: Docs | None, tasks: list[str], task_files: Fingerprint | None,
             validation: Split | None = None, docs: Docs | None = None, base: HeldOut | None = None):
    """`base`: held-out text gathered already (the domain's, for the replay text: its tasks are not read
    again); `validation` with the `docs` it was split from: the domain's validation split."""
    found, not_checked = task_texts(tasks)
    if base is not None:
        not_checked = {**base.meta.tasks_not_checked, **not_checked}
    split_rows = read_arrow(validation.split_file(build.root, "validation")) if validation is not None else None

    def rows() -> Iterator[tuple[str, str]]:
        if base is not None:
            yield from base.texts(build.root)
        if split_rows is not None:
            yield from ((t, "validation split") for t in doc_texts(docs, build.root, split_rows))
        yield from ((t, "evaluate.general_corpus") for t in doc_texts(general, build.root))
        for name, texts in found:
            yield from ((t, f"evaluate.tasks {name}") for t in texts)

    per_source, content = gather(rows(), build.tmp / HELD_OUT_FILE)
    counts = {"documents": sum(per_source.values()), "tasks_not_checked": len(not_checked),
              **{"documents_from_" + re.sub(r"[^0-9A-Za-z]+", "_", k).strip("_"): v for k, v in per_source.items()}}
    return counts, {"tasks_not_checked": not_checked}, {"content": content}
