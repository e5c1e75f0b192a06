"""Where this user's and this host's own files go (outside any artifacts root)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def user_cache_dir() -> Path:
    """Facts about inputs that hold under any artifacts root (a tokenizer's profile is a function of its files
    and the library versions): $CPT_CACHE_HOME, else $XDG_CACHE_HOME/cpt, else ~/.cache/cpt."""
    explicit = os.environ.get("CPT_CACHE_HOME")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cpt"


def scratch_home() -> Path:
    """Where this host keeps its mirrors of object-store roots: $CPT_SCRATCH, else <user cache>/scratch."""
    explicit = os.environ.get("CPT_SCRATCH")
    if explicit:
        return Path(explicit).resolve()
    return (user_cache_dir() / "scratch").resolve()


def temp_beside(path: Path, suffix: str = ".tmp", name: str | None = None) -> Path:
    """A hidden temporary name beside `path` for writing it atomically (write, then `os.replace`): unique to this
    call, not only to this process, so two threads of one process (a task runner's, a lease renewer's) writing the
    same file never write into one temporary file."""
    return path.with_name(f".{name or path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")
