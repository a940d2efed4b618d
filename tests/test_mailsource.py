"""Reading mbox, maildir and folders of messages for `mailgate import`."""

from __future__ import annotations

import mailbox
from pathlib import Path

from mailgate.mailsource import delivery_order, iter_messages


def test_maildir_names_sort_in_delivery_order() -> None:
    # Microseconds are not zero-padded: as text, M100000 sorts before M99999.
    names = ["1795787979.M999999P1Q3.vm", "1795787979.M100000P1Q2.vm", "1795787979.M99999P1Q1.vm",
             "1795787978.M5P7Q9.vm,S=1024:2,S", "1795787979.4242.oldhost"]
    assert sorted(names, key=delivery_order) == [
        "1795787978.M5P7Q9.vm,S=1024:2,S", "1795787979.4242.oldhost", "1795787979.M99999P1Q1.vm",
        "1795787979.M100000P1Q2.vm", "1795787979.M999999P1Q3.vm"]


def test_maildir_is_read_in_delivery_order(tmp_path: Path) -> None:
    root = tmp_path / "box"
    box = mailbox.Maildir(str(root), create=True)
    for i in range(12):
        box.add(f"Subject: {i}\n\nbody {i}\n".encode())
    box.close()
    subjects = [raw.split(b"\n", 1)[0] for _, raw in iter_messages(root)]
    assert subjects == [f"Subject: {i}".encode() for i in range(12)]
