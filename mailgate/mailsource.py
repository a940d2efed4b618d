"""Read messages from an mbox file, a maildir, or a folder of one-message files."""

from __future__ import annotations

import mailbox
import re
from collections.abc import Iterator
from pathlib import Path


def _is_maildir(path: Path) -> bool:
    return path.is_dir() and (path / "cur").is_dir() and (path / "new").is_dir()


_MAILDIR_NAME = re.compile(r"^(\d+)\.(?:M(\d+))?(?:P\d+)?(?:Q(\d+))?")


def delivery_order(key: str) -> tuple[int, int, int, str]:
    """Sort key for maildir names in delivery order. Names are "<seconds>.M<microseconds>P<pid>
    Q<counter>.<host>" (Python, Dovecot) or "<seconds>.<pid>.<host>" (older writers): the
    microseconds are not zero-padded, so sorting the names as text put M999 after M1000
    and replies before the messages they answer."""
    m = _MAILDIR_NAME.match(key)
    if m is None:
        return (0, 0, 0, key)
    return (int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0), key)


def iter_messages(path: Path) -> Iterator[tuple[str, bytes]]:
    """(stable key, raw bytes) for each message; the key makes re-imports idempotent."""
    path = path.resolve()
    if _is_maildir(path):
        md = mailbox.Maildir(str(path), factory=None, create=False)
        for key in sorted(md.iterkeys(), key=delivery_order):
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
            # get_bytes drops the mbox 'From ' line but keeps the '>From ' quoting of the body
            yield f"mbox:{path}:{i}", unquote_from(box.get_bytes(key))


_QUOTED_FROM = re.compile(rb"^>(>*From )", re.MULTILINE)


def unquote_from(raw: bytes) -> bytes:
    """Undo one level of mbox '>From ' quoting in the body (mboxrd; for mboxo the usual case).

    Writers quote body lines starting with 'From ' so that they do not split the file;
    without this, every such line would reach the ticket as '>From ...'.
    """
    ends = [(i, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (i := raw.find(sep)) >= 0]
    if not ends:
        return raw
    i, n = min(ends)
    return raw[: i + n] + _QUOTED_FROM.sub(rb"\1", raw[i + n:])
