"""Read messages from an mbox file, a maildir, or a folder of one-message files."""

from __future__ import annotations

import mailbox
from collections.abc import Iterator
from pathlib import Path


def _is_maildir(path: Path) -> bool:
    return path.is_dir() and (path / "cur").is_dir() and (path / "new").is_dir()


def iter_messages(path: Path) -> Iterator[tuple[str, bytes]]:
    """(stable key, raw bytes) for each message; the key makes re-imports idempotent."""
    path = path.resolve()
    if _is_maildir(path):
        md = mailbox.Maildir(str(path), factory=None, create=False)
        for key in sorted(md.iterkeys()):
            with md.get_file(key) as fh:
                yield f"maildir:{path}:{key}", fh.read()
    elif path.is_dir():
        for file in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
            yield f"file:{file}", file.read_bytes()
    else:
        with open(path, "rb") as fh:
            head = fh.read(5)
        if head != b"From ":
            yield f"file:{path}", path.read_bytes()
            return
        box = mailbox.mbox(str(path), factory=None, create=False)
        for i, key in enumerate(box.iterkeys()):
            # get_bytes drops the mbox 'From ' line and undoes >From quoting
            yield f"mbox:{path}:{i}", box.get_bytes(key)
