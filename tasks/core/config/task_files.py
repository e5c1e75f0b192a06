"""Local lm-eval task files named in `evaluate.tasks`: told apart from registry names, and read as data (a
`!function` tag names code: read as None here, never run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


"""The one typed config tree of cpt: a section per stage.

The same `CptConfig` is the flow's parameter (Prefect renders it as a form), loads from YAML and takes
`--set section.field=value` overrides. Only pydantic and yaml are imported here so config checks are instant.
"""


def task_path_like(name: str) -> bool:
    """A local task (a path) rather than a registry name: registry names hold no '/' and no YAML suffix."""
    return "/" in name or "\\" in name or name.endswith((".yaml", ".yml")) or Path(name).expanduser().exists()


def local_task_files(path: Path) -> list[Path]:
    """A local task's YAML files (the file, or every YAML under the folder), sorted."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml"))


class _TaskYamlLoader(yaml.SafeLoader):
    """lm-eval's `!function` tags name code: read here as data (None), never run."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def read_task_yaml(yaml_file: Path) -> dict[str, Any]:
    """A local lm-eval task YAML as a mapping ({} when it is not one)."""
    try:
        doc = yaml.load(yaml_file.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)
    except yaml.YAMLError as e:
        raise ValueError(f"{yaml_file}: not valid YAML: {e}") from None
    return doc if isinstance(doc, dict) else {}


def local_task_data(yaml_file: Path) -> list[Path]:
    """The local data files a task YAML reads (`dataset_kwargs.data_files`), as written (against the cwd)."""
    files = (read_task_yaml(yaml_file).get("dataset_kwargs") or {}).get("data_files") or {}
    values = files.values() if isinstance(files, dict) else [files]
    out: list[Path] = []
    for v in values:
        out += [Path(x).expanduser() for x in (v if isinstance(v, list) else [v]) if isinstance(x, str)]
    return out


def local_task_problems(path: Path) -> list[str]:
    yamls = local_task_files(path)
    if not yamls:
        return [f"{path} holds no task YAML file"]
    return [f"{y}: its data file {d} does not exist (data_files resolve against the working directory)"
            for y in yamls for d in local_task_data(y) if not d.is_file()]
