"""The one open of a corpus file: every reader gets the file from here, once.

`open_regular(path, digest)` opens the file at `path` — a real path, as the listing resolved it or a drop's
identity recorded it — walking its folders from `/` without following a symlink at any step (O_NOFOLLOW on
every component, so a folder swapped for a symlink since it was listed is refused, not followed), checks that
what it opened is a regular file (not a FIFO, a device, a /proc file), and hands back a buffered binary file
that hashes what is read from it (blake2b-128, the corpus fingerprint's digest). `VerifiedFile.finish()` hashes
what the reader left unread and raises FileChanged when the bytes are not the ones `digest` names: the content
a piece is built from is exactly the content that was listed, fingerprinted and gated, or nothing is published.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import stat
from pathlib import Path

from tasks.data.records import BadRecordError

_PSEUDO = ("/proc", "/sys")


class FileChanged(BadRecordError):
    """A file whose bytes are not the ones it was listed (and gated) with."""


@functools.cache
def pseudo_devices() -> frozenset[int]:
    """The devices of /proc and /sys (files there are not corpus text), looked up once per process."""
    out = set()
    for folder in _PSEUDO:
        try:
            out.add(os.stat(folder).st_dev)
        except OSError:
            pass
    return frozenset(out)


def open_fd(path: str | Path) -> int:
    """A read-only descriptor of the regular file at the absolute `path`, no symlink followed at any of its
    components (OSError: ELOOP or ENOTDIR where one is a symlink, or what it is when it is not a regular file)."""
    path = os.fspath(path)
    if not os.path.isabs(path):
        raise ValueError(f"{path}: an absolute path is needed")
    parts = [p for p in path.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise ValueError(f"{path}: not a file's real path")
    directory = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=directory)
            os.close(directory)
            directory = child
        # O_NONBLOCK: opening a FIFO does not wait for a writer; the fstat below refuses it.
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=directory)
    finally:
        os.close(directory)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path}: not a regular file")
        if st.st_dev in pseudo_devices():
            raise OSError(f"{path}: a /proc or /sys file, not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _HashingRaw(io.RawIOBase):
    """The descriptor as a raw stream that hashes every byte read in file order. A read back at offset 0 starts
    the hash again (a reader that looks at the start, then parses from it: what it parses is what is hashed);
    bytes read out of order (a parquet footer) are not hashed while read: `rest()` hashes from where the
    in-order reading stopped, so the digest is always of the whole file."""

    def __init__(self, fd: int, path: str):
        super().__init__()
        self.fd, self.path = fd, path
        self.hash = hashlib.blake2b(digest_size=16)
        self.hashed = 0  # bytes [0, hashed) are in `hash`

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def readinto(self, buffer) -> int:
        at = os.lseek(self.fd, 0, os.SEEK_CUR)
        n = os.readv(self.fd, [buffer])
        if n:
            if at == 0 and self.hashed:
                self.hash, self.hashed = hashlib.blake2b(digest_size=16), 0
            if at == self.hashed:
                self.hash.update(memoryview(buffer)[:n])
                self.hashed += n
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return os.lseek(self.fd, offset, whence)

    def tell(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_CUR)

    def rest(self) -> str:
        """The digest of the whole file: what was read in order, then what was not, read now (same file)."""
        while block := os.pread(self.fd, 1 << 20, self.hashed):
            self.hash.update(block)
            self.hashed += len(block)
        return self.hash.hexdigest()

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


class VerifiedFile(io.BufferedReader):
    """A corpus file opened once (`open_regular`), hashing what its reader reads."""

    def __init__(self, raw: _HashingRaw, digest: str | None):
        super().__init__(raw, buffer_size=1 << 20)
        self.expected = digest

    def finish(self) -> str:
        """The file's digest; FileChanged when it is not the expected one."""
        digest = self.raw.rest()
        if self.expected is not None and digest != self.expected:
            raise FileChanged(f"{self.raw.path}: its content is not the one it was listed and gated with (it "
                              "changed since); nothing of it is used: the next run looks at it again")
        return digest


def open_regular(path: str | Path, digest: str | None = None) -> VerifiedFile:
    """The one open of a corpus file (see the module's docstring)."""
    path = os.fspath(path)
    return VerifiedFile(_HashingRaw(open_fd(path), path), digest)
