"""Files a run writes whole or not at all, with the permissions every output gets.

A kill (or a full disk) in the middle of a write leaves the old file or the new one, never half
of one: the content goes to ``NAME.tmp``, is flushed to disk, and is then renamed over ``NAME``.
"""

from __future__ import annotations

import errno
import json
import os

import xxhash

from utils.errors import UsageError


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # the errors of a full disk (or quota)


def output_mode() -> int:
    """The mode of a new file under this process's umask (0644 under the common 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def new_digest():
    """The checksum every content check uses: xxh3-128 (several GB/s; it catches rot and edits, it is no seal)."""
    return xxhash.xxh3_128()


def file_digest(path: str, flush: bool = False) -> tuple[str, int]:
    """The digest of a file's bytes and its size, read once in 8 MiB pieces; with ``flush``, the file
    is also flushed to disk in that pass."""
    digest, size = new_digest(), 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
            size += len(chunk)
        if flush:
            os.fsync(f.fileno())
    return digest.hexdigest(), size


class DigestingWriter:
    """A file opened for writing that takes ``file_digest``'s digest and size of the bytes as they go through.

    For writers that take a file object (``torch.save``, pyarrow's): the digest costs no second read.
    """

    def __init__(self, path: str):
        self._file = open(path, "wb")
        self._digest, self.size = new_digest(), 0

    def write(self, data) -> int:
        self._digest.update(data)
        self.size += memoryview(data).nbytes
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()

    @property
    def closed(self) -> bool:  # pyarrow's writers ask before they write
        return self._file.closed

    def result(self) -> tuple[str, int]:
        return self._digest.hexdigest(), self.size

    def __enter__(self) -> DigestingWriter:
        return self

    def __exit__(self, *error) -> None:
        self._file.close()


def fsync(path: str) -> None:
    """Flush a file (or a folder's entries, after a rename into it) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str, text: str) -> None:
    """Replace ``path`` with ``text``, whole."""
    staging = path + ".tmp"
    try:
        with open(staging, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(staging, output_mode())
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)  # a full disk must not leave the half-written copy behind
        raise


def write_json(path: str, data) -> None:
    """Replace ``path`` with ``data`` as indented JSON, whole."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str):
    """The JSON content of ``path``; None when the file does not exist."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is not valid JSON ({err})") from None
