"""lm-evaluation-harness glue: a TaskManager that sees only the configured task files, and the dataset revisions
registry tasks read.

lm-eval 0.4.13 indexes every `*.yaml` under each folder of `include_path` (TaskIndex._iter_yaml_files: a
`**/*.yaml` glob) and a YAML's `!function` imports a `.py` file beside it (or any importable module) when the
task is built. A folder holding a configured task YAML may hold anything else — a drop of corpus files under
`data/drops/`, with a YAML of the same task name and a `helpers.py` — so lm-eval is never given that folder.
`configured_tasks` writes each configured YAML into a private temp folder, made self-contained (its `include`s
merged in as lm-eval merges them), its data files (`dataset_kwargs.data_files`) and the modules its `!function`
tags name (beside the YAML that names them) copied with it, and gives lm-eval only that folder: no other YAML,
of any folder, is ever indexed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tasks.core.config.task_files import local_task_files, task_path_like


class TaskFileError(ValueError):
    """A configured task YAML that cannot be made self-contained (an include or module outside its folder)."""


class _Function(str):
    """A `!function` tag's value, kept as such through a load and a dump."""


class _Loader(yaml.SafeLoader):
    pass


def _function(loader: yaml.SafeLoader, node: yaml.Node) -> _Function:
    return _Function(loader.construct_scalar(node))


def _other_tag(loader, suffix, node):
    raise yaml.constructor.ConstructorError(None, None, f"unsupported tag !{suffix} (only !function)", node.start_mark)


_Loader.add_constructor("!function", _function)
_Loader.add_multi_constructor("!", _other_tag)


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Function, lambda d, v: d.represent_scalar("!function", str(v)))


def _load(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], list[tuple[_Function, Path]]]:
    """A task YAML with its includes merged in (lm-eval's rule: the included keys, then the file's own win), and
    every `!function` in it with the folder of the YAML that names it."""
    path = path.resolve()
    if path in seen:
        raise TaskFileError(f"{path}: an include cycle")
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except (OSError, yaml.YAMLError) as e:
        raise TaskFileError(f"{path}: {e}") from None
    if not isinstance(cfg, dict):
        raise TaskFileError(f"{path}: not a task YAML (a mapping)")
    functions: list[tuple[_Function, Path]] = []

    def collect(value: Any) -> None:
        if isinstance(value, _Function):
            functions.append((value, path.parent))
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, list):
            for v in value:
                collect(v)

    collect(cfg)
    includes = cfg.pop("include", None)
    if includes is None:
        return cfg, functions
    merged: dict[str, Any] = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        target = Path(str(inc))
        target = target if target.is_absolute() else path.parent / target
        inc_cfg, inc_functions = _load(target, (*seen, path))
        inc_cfg.pop("task_list", None)
        merged.update(inc_cfg)
        functions += inc_functions
    merged.update(cfg)
    return merged, functions


def _data_files(cfg: dict[str, Any], into: Path, label: str) -> None:
    """`dataset_kwargs.data_files` (resolved against the working directory, as datasets does) copied into `into`
    and named there by absolute path."""
    kwargs = cfg.get("dataset_kwargs")
    if not isinstance(kwargs, dict) or not kwargs.get("data_files"):
        return
    n = 0

    def copy(value: Any) -> Any:
        nonlocal n
        if isinstance(value, str):
            src = Path(value).expanduser().resolve()
            if not src.is_file():
                raise TaskFileError(f"{label}: its data file {value} does not exist")
            n += 1
            dst = into / "data" / f"{n:03d}-{src.name}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            return str(dst)
        if isinstance(value, list):
            return [copy(v) for v in value]
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        return value

    cfg["dataset_kwargs"] = {**kwargs, "data_files": copy(kwargs["data_files"])}


def _modules(functions: list[tuple[_Function, Path]], into: Path, label: str) -> None:
    """The `.py` file each `!function module.fn` names beside the YAML that names it, copied into `into`. A
    function of an importable module (no such file) is left to lm-eval's import by name."""
    copied: dict[str, Path] = {}
    for value, folder in functions:
        module, _, _ = str(value).rpartition(".")
        if not module:
            continue
        rel = f"{module.replace('.', '/')}.py"
        src = (folder / rel).resolve()
        if not src.is_file():
            continue
        if rel in copied and copied[rel] != src:
            raise TaskFileError(f"{label}: two different {rel} are named by its !function tags")
        copied[rel] = src
        (into / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, into / rel)


def write_private_tasks(entries: list[str], into: Path) -> list[str]:
    """The local task YAMLs of `entries` (evaluate.tasks: paths, not registry names) written into `into`, each in
    a folder of its own with what it names (see the module's docstring); returns their task names."""
    names = []
    k = 0
    for entry in entries:
        if not task_path_like(entry):
            continue
        for source in local_task_files(Path(entry).expanduser()):
            if source.suffix not in (".yaml", ".yml"):
                continue
            k += 1
            folder = into / f"task-{k:03d}"
            folder.mkdir(parents=True)
            cfg, functions = _load(source)
            label = f"evaluate.tasks {entry}: {source}"
            _data_files(cfg, folder, label)
            _modules(functions, folder, label)
            # `.yaml`: the suffix lm-eval's index globs for (a `.yml` source is indexed too, as configured).
            (folder / f"{source.stem}.yaml").write_text(yaml.dump(cfg, Dumper=_Dumper, allow_unicode=True,
                                                                    sort_keys=False), encoding="utf-8")
            if isinstance(cfg.get("task"), str):
                names.append(cfg["task"])
            elif isinstance(cfg.get("group"), str):
                names.append(cfg["group"])
    return list(dict.fromkeys(names))


@contextlib.contextmanager
def configured_tasks(entries: list[str]) -> Iterator[tuple[Any, list[str]]]:
    """(lm-eval's TaskManager, the task names to ask it for) for evaluate.tasks: registry names as lm-eval ships
    them, local YAMLs from a private folder that is its only include_path, removed after the block."""
    from lm_eval.tasks import TaskManager

    registry = [e for e in entries if not task_path_like(e)]
    with tempfile.TemporaryDirectory(prefix="cpt-tasks-") as d:
        local = write_private_tasks(entries, Path(d))
        manager = TaskManager(include_path=[d] if local else None)
        yield manager, list(dict.fromkeys([*registry, *local]))


# ------------------------------------------------------------------------ registry dataset revisions


def _registry_index() -> dict[str, Any]:
    """{name: {"datasets": [[path, config, pinned revision]], "members": [names]}} of lm-eval's own tasks, built
    once per lm-eval version (its index parses every YAML it ships: seconds) and kept in the user's cache."""
    from importlib.metadata import version

    from tasks.core.paths import user_cache_dir

    cache = user_cache_dir() / f"lm-eval-{version('lm-eval')}-datasets.json"
    with contextlib.suppress(OSError, ValueError):
        return json.loads(cache.read_text())
    from lm_eval.tasks import TaskManager

    out: dict[str, Any] = {}
    for name, e in TaskManager().task_index.items():
        cfg = e.cfg or {}
        kwargs = cfg.get("dataset_kwargs") if isinstance(cfg.get("dataset_kwargs"), dict) else {}
        datasets = [[str(cfg["dataset_path"]), cfg.get("dataset_name"), kwargs.get("revision")]] \
            if isinstance(cfg.get("dataset_path"), str) else []
        members = [t if isinstance(t, str) else t.get("task") for t in cfg.get("task", [])] \
            if isinstance(cfg.get("task"), list) else sorted(e.tags) if e.tags and not cfg else []
        out[name] = {"datasets": datasets, "members": [m for m in members if isinstance(m, str)]}
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp")
        tmp.write_text(json.dumps(out))
        tmp.replace(cache)
    return out


def dataset_revision(path: str, pinned: str | None) -> str:
    """The revision a dataset is read at: the task's pinned one, else the snapshot the Hub cache holds (what an
    offline run reads), else the Hub's current head (one request, online), else "not at hand"."""
    if pinned:
        return f"pinned:{pinned}"
    import os

    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"datasets--{path.replace('/', '--')}" / "refs" / "main"
    with contextlib.suppress(OSError):
        return f"cached:{ref.read_text().strip()}"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True") and not constants.HF_HUB_OFFLINE:
        with contextlib.suppress(Exception):
            from huggingface_hub import HfApi

            return f"hub:{HfApi().dataset_info(path).sha}"
    return "not at hand"


def registry_revisions(names: list[str]) -> list[tuple[str, str]]:
    """(name:dataset[/config], revision) of every dataset the registry tasks `names` read (a group's members
    followed), for the evaluation's key: a dataset that moves to a new revision re-evaluates."""
    index = _registry_index()
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        entry = index.get(name) or {}
        for path, config, pinned in entry.get("datasets", []):
            out.append((f"{name}:{path}" + (f"/{config}" if config else ""), dataset_revision(path, pinned)))
        todo += entry.get("members", [])
    return sorted(out)
