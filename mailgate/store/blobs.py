"""Content-addressed files under data_dir: raw messages and attachments.

A blob is written to a temporary file, fsynced, renamed into place and its
directory fsynced, all before the database commit that names it. Names come
only from the sha256 of the content: nothing a sender wrote becomes a path.

Blobs are shared by content, so one is removed (`remove_if_idle`) only when no
row names it and it was not stored again lately: `put` of content that is
already there refreshes the file's mtime under a shared lock, and removal
checks the mtime under the exclusive lock, so a message accepted while the
purge runs never loses its bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError("not a sha256 hex digest")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        target = self.path_for(digest)
        if target.exists() and target.stat().st_size == len(data):
            with self._lock(fcntl.LOCK_SH):
                try:
                    os.utime(target)  # in use again: remove_if_idle leaves it alone
                    return digest
                except FileNotFoundError:
                    pass  # removed just now: write it again below
        if not target.parent.is_dir():
            # New shard directories: their own entries must be durable too.
            target.parent.mkdir(parents=True, exist_ok=True)
            _fsync_dir(target.parent.parent)
            _fsync_dir(self.root)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)
        return digest

    def get(self, sha256: str) -> bytes:
        return self.path_for(sha256).read_bytes()

    def remove_if_idle(self, sha256: str, idle_seconds: float) -> bool:
        """Delete a blob the caller found unreferenced, unless it was stored or reused
        within `idle_seconds` (a message being accepted right now). True if removed."""
        target = self.path_for(sha256)
        with self._lock(fcntl.LOCK_EX):
            try:
                if target.stat().st_mtime > time.time() - idle_seconds:
                    return False
                target.unlink()
            except FileNotFoundError:
                return False
        return True

    @contextlib.contextmanager
    def _lock(self, mode: int) -> Iterator[None]:
        # Beside the tree, not in it: every file under root is a blob named by its sha256.
        self.root.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root.with_name(self.root.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # releases the lock



def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
