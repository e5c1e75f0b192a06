"""Which files a corpus is: `corpus.paths` (files, globs, folders) less `corpus.exclude`, listed without
following a symlink out of the folder it was found in and without reading anything but regular files, and the
corpus's content fingerprint (the multiset of its files' digests, not their paths)."""

from __future__ import annotations

import glob
import os
import stat
from pathlib import Path

from tasks.core.config.base import ConfigError
from tasks.core.config.data import CorpusConfig
from tasks.core.manifest import Fingerprint, combine_digests, hash_file
from tasks.data.opening import pseudo_devices
from tasks.data.readers import supported_suffixes

GLOB_CHARS = "*?["
# Regular files on these are not files (procfs, sysfs): never read, even when a symlink leads there.


def is_glob(entry: str, p: Path) -> bool:
    """A path that exists is taken literally, even with `*?[` in its name; only one that does not is a glob."""
    return any(ch in entry for ch in GLOB_CHARS) and not os.path.lexists(p)


def _inside(p: Path, folder: Path) -> bool:
    return p == folder or folder in p.parents


def glob_base(pattern: Path) -> Path:
    """The folder a glob lists: its parts before the first one holding a wildcard."""
    parts = pattern.parts
    cut = next((i for i, part in enumerate(parts) if any(ch in part for ch in GLOB_CHARS)), len(parts))
    return Path(*parts[:cut]) if cut else Path(".")




def _not_readable(f: Path, folder: Path) -> str | None:
    """Why `f`, found under `folder` (resolved), is not read: a symlink whose target lies outside the folder (or
    nowhere), or anything but a regular file (FIFO, socket, device, a /proc or /sys file). None: read it."""
    try:
        if f.is_symlink():
            target = f.resolve(strict=True)
            if not _inside(target, folder):
                return "a symlink out of the folder"
        st = f.stat()
    except (OSError, RuntimeError):  # a broken symlink or a loop
        return "a broken symlink"
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a folder"
                if stat.S_ISDIR(st.st_mode) else "not a regular file")
        return f"{kind}, not a regular file"
    if st.st_dev in pseudo_devices():
        return "a /proc or /sys file, not a regular file"
    return None


def _walk(folder: Path, skipped: list[str]) -> list[Path]:
    """Supported files under `folder`, not following symlinks out of it: names starting with `.` and other
    formats are not corpus files (left alone); a symlink leading out of the folder, a broken one and anything
    but a regular file are skipped and named in `skipped`. A symlinked folder is never descended: one leading
    out is skipped, one inside is reached by its own path."""
    top = folder.resolve()
    files = []

    def unlistable(e: OSError) -> None:
        skipped.append(f"{e.filename}: cannot be listed ({e.strerror})")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unlistable):  # followlinks=False
        here = Path(dirpath)
        keep = []
        for name in sorted(dirnames):
            if name.startswith("."):
                continue
            sub = here / name
            if sub.is_symlink():
                if not _inside(sub.resolve(), top):
                    skipped.append(f"{sub}: a symlink out of the folder")
                continue
            keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            f = here / name
            if name.startswith(".") or f.suffix.lower() not in supported_suffixes():
                continue
            _take(f, top, files, skipped)
    return files


def _take(f: Path, top: Path, files: list[Path], skipped: list[str]) -> None:
    """`f` into `files` if it is a regular file inside `top`, else its name and why into `skipped`."""
    why = _not_readable(f, top)
    if why:
        skipped.append(f"{f}: {why}")
    else:
        files.append(f)


def _excluded(cfg: CorpusConfig, base: Path) -> tuple[set[Path], list[Path]]:
    """`corpus.exclude` as (files matched by its globs, folders and files named or matched). A path that exists
    is taken literally, even with `*?[` in its name."""
    files, roots = set(), []
    for entry in cfg.exclude:
        p = Path(entry).expanduser()
        p = p if p.is_absolute() else base / p
        if is_glob(entry, p):
            for m in glob.glob(str(p), recursive=True):
                (roots.append if os.path.isdir(m) else files.add)(Path(m).resolve())
        else:
            roots.append(p.resolve())
    return files, roots


def list_corpus_files(cfg: CorpusConfig, base: Path | None = None,
                      labels: list[str] | None = None) -> tuple[list[Path], list[str]]:
    """Expand `corpus.paths` (files, globs, folders) into a sorted, de-duplicated list of files, less those
    under `corpus.exclude`, and the files skipped (`path: why`). A path that exists is taken literally, even
    with `*?[` in its name. Only regular files are read, and no symlink is followed out of the folder (or the
    glob's folder) it was found in: such files are skipped and named. A file or symlink given directly is read
    as given. `labels` name the paths in errors (default `corpus.paths[i] ('entry')`)."""
    base = base or Path.cwd()
    found: dict[Path, None] = {}
    skipped: list[str] = []
    excluded_files, excluded_roots = _excluded(cfg, base)
    for i, entry in enumerate(cfg.paths):
        where = labels[i] if labels else f"corpus.paths[{i}] ({entry!r})"
        p = Path(entry).expanduser()
        p = p if p.is_absolute() else base / p
        before = len(skipped)
        if is_glob(entry, p):
            top = glob_base(p).resolve()
            files = []
            for m in sorted(glob.glob(str(p), recursive=True)):
                m = Path(m)
                if m.name.startswith(".") or m.is_dir():
                    continue
                _take(m, top, files, skipped)
            if not files:
                raise ConfigError(f"{where}: the glob matches no file" + _skipped_note(skipped[before:]))
        elif p.is_dir():
            files = _walk(p, skipped)
            if not files:
                raise ConfigError(f"{where}: the folder holds no {'/'.join(supported_suffixes())} file"
                                  + _skipped_note(skipped[before:]))
        elif p.is_file():
            if p.stat().st_dev in pseudo_devices():
                raise ConfigError(f"{where}: a /proc or /sys file, not a regular file")
            files = [p]  # given directly (a symlink too): the user's own choice
        elif p.exists():
            raise ConfigError(f"{where}: not a regular file or folder (a FIFO, socket or device)")
        else:
            raise ConfigError(f"{where}: no such file or folder")
        for f in files:
            if f.suffix.lower() not in supported_suffixes():
                raise ConfigError(
                    f"{where}: {f}: unsupported format {f.suffix or '(no extension)'}; "
                    f"use one of {', '.join(supported_suffixes())}"
                )
            r = f.resolve()
            if r not in excluded_files and not any(r == x or x in r.parents for x in excluded_roots):
                found[r] = None
    return sorted(found), skipped


def _skipped_note(skipped: list[str]) -> str:
    if not skipped:
        return ""
    return f" (skipped {len(skipped)}: {'; '.join(skipped[:5])}{'; …' if len(skipped) > 5 else ''})"


def resolve_corpus_files(cfg: CorpusConfig, base: Path | None = None) -> list[Path]:
    """`list_corpus_files`' files; the files it skipped are logged as a warning (nothing is left out silently)."""
    files, skipped = list_corpus_files(cfg, base)
    if skipped:
        from tasks.core.report import run_logger

        run_logger().warning("corpus: %d files skipped (only regular files are read, and no symlink out of "
                             "the folder it is in; list a target in corpus.paths to read it): %s", len(skipped),
                             "; ".join(skipped[:20]) + ("; …" if len(skipped) > 20 else ""))
    return files


def fingerprint_files(files: list[Path], digest=hash_file, location: str = "") -> Fingerprint:
    """Content fingerprint of a list of corpus files: the multiset of their digests, not their paths, so the
    same files in another folder (a moved corpus, a drop anywhere) have the same fingerprint."""
    items = [{"path": str(f), "digest": digest(f), "bytes": f.stat().st_size} for f in files]
    return Fingerprint(kind="corpus", digest=combine_digests([("file", d) for d in sorted(i["digest"] for i in items)]),
                       location=location, items=items)


def fingerprint_corpus(cfg: CorpusConfig, base: Path | None = None, digest=hash_file) -> Fingerprint:
    return fingerprint_files(resolve_corpus_files(cfg, base), digest, str(base or Path.cwd()))


def source_names(files: list[Path]) -> list[str]:
    """Short, stable names for sources: paths relative to the files' common folder."""
    if not files:
        return []
    common = Path(os.path.commonpath([str(f.parent) for f in files]))
    return [f.relative_to(common).as_posix() for f in files]


def path_ranks(corpus: CorpusConfig, files: list[str], base: Path | None = None) -> list[int]:
    """Per file, the index of the first `corpus.paths` entry that yields it: a line lists its configured corpus
    first and its drops in the order they joined, so a lower rank is a document the line had earlier."""
    rank: dict[str, int] = {}
    for i, entry in enumerate(corpus.paths):
        try:
            found, _ = list_corpus_files(corpus.model_copy(update={"paths": [entry]}), base)
        except ConfigError:
            continue
        for f in found:
            rank.setdefault(str(f), i)
    return [rank.get(str(Path(f).resolve()), len(corpus.paths)) for f in files]
