"""IMAP poller against a real Dovecot (tests/imapserver.py); no mock servers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import select

from mailgate.config import ImapAccount
from mailgate.store.blobs import BlobStore
from mailgate.store.engine import make_engine, session_scope, utcnow
from mailgate.store.migrate import upgrade
from mailgate.store.tables import ImapState, Inbound
from mailgate.transport import imap
from mailgate.transport.imap import (
    ImapError,
    ImapPoller,
    _Session,
    check_login,
    imap_health,
    mailbox_name,
    parse_bodies,
    uid_set,
)

if TYPE_CHECKING:
    from tests.imapserver import Dovecot

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]
POISON = b"X-Test-Poison: yes"


def message(i: int, *, poison: bool = False, pad: int = 0, tag: str = "t") -> bytes:
    headers = [f"From: customer{i}@example.org", "To: support@example.com",
               f"Subject: help request {tag}{i}", f"Message-ID: <{tag}{i}.{time.time_ns()}@example.org>",
               "Date: Mon, 01 Jan 2024 10:00:00 +0000"]
    if poison:
        headers.append(POISON.decode())
    body = f"Please help with problem {tag}{i}.\r\n" + ("x" * 76 + "\r\n") * (pad // 78)
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode()


class Pipeline:
    """Stands in for the ingest pipeline: 'dead' for poison mail, else 'ticket'."""

    def __init__(self, engine: Engine, blobs: BlobStore) -> None:
        self.engine, self.blobs = engine, blobs
        self.calls: list[int] = []

    async def __call__(self, inbound_id: int) -> str:
        self.calls.append(inbound_id)
        with session_scope(self.engine) as s:
            row = s.get(Inbound, inbound_id)
            assert row is not None
            outcome = "dead" if POISON in self.blobs.get(row.raw_sha256) else "ticket"
            row.state, row.outcome = ("dead" if outcome == "dead" else "done"), outcome
            s.add(row)
        return outcome


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    eng = make_engine("sqlite:///" + str(tmp_path / "mailgate.db"))
    upgrade(eng)
    return eng


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "raw")


@pytest.fixture
def pipeline(engine: Engine, blobs: BlobStore) -> Pipeline:
    return Pipeline(engine, blobs)


def rows(engine: Engine) -> list[Inbound]:
    with session_scope(engine) as s:
        return list(s.exec(select(Inbound).order_by(Inbound.id)).all())  # type: ignore[arg-type]


def stored_uids(engine: Engine) -> list[int]:
    return sorted(int((r.source_key or "").rsplit(":", 1)[1]) for r in rows(engine))


def state(engine: Engine, name: str) -> ImapState:
    with session_scope(engine) as s:
        row = s.exec(select(ImapState).where(ImapState.account == name)).first()
        assert row is not None
        return row


async def wait_until(cond: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# --------------------------------------------------------------- unit-level


def test_uid_set_compacts_runs() -> None:
    assert uid_set([5, 1, 2, 3, 9, 10, 7]) == "1:3,5,7,9:10"
    assert uid_set([4]) == "4"


def test_mailbox_names_in_modified_utf7() -> None:
    # RFC 3501 5.1.3's own example, and names our users have
    assert mailbox_name("~peter/mail/台北/日本語") == "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
    assert mailbox_name("Entwürfe") == "Entw&APw-rfe"
    assert mailbox_name("Käsitelty") == "K&AOQ-sitelty"
    assert mailbox_name("Входящие") == "&BBIERQQ+BDQETwRJBDgENQ-"
    assert mailbox_name("R&D") == "R&-D"
    assert mailbox_name("Sent Items") == "Sent Items"


def test_parse_bodies_handles_uid_after_literal_and_unsolicited_fetch() -> None:
    lines: list[bytes | bytearray] = [
        b"1 FETCH (FLAGS (\\Seen))",
        b"2 FETCH (UID 7 BODY[] {3}", bytearray(b"abc"), b")",
        b"3 FETCH (BODY[] {2}", bytearray(b"de"), b" UID 9)",
        b"Fetch completed.",
    ]
    assert parse_bodies(lines) == {7: b"abc", 9: b"de"}


# ------------------------------------------------------------ against Dovecot


def test_n_messages_become_n_rows_and_are_moved(dovecot: Dovecot, imap_user: str, engine: Engine,
                                                blobs: BlobStore, pipeline: Pipeline) -> None:
    n = 23
    for i in range(n):
        dovecot.append(imap_user, message(i))
    account = dovecot.account(imap_user, batch_size=5)
    poller = ImapPoller(account, engine, blobs, process=pipeline)

    assert asyncio.run(poller.poll_once()) == n
    got = rows(engine)
    assert len(got) == n
    assert len({r.source_key for r in got}) == n
    assert {r.queue for r in got} == {"support@example.com"}
    assert {r.source for r in got} == {"imap"}
    assert len(pipeline.calls) == n
    assert dovecot.count(imap_user, "INBOX") == 0
    assert dovecot.count(imap_user, "Processed") == n
    assert state(engine, imap_user).last_uid == n

    assert asyncio.run(poller.poll_once()) == 0
    assert len(rows(engine)) == n
    assert len(pipeline.calls) == n


@pytest.mark.parametrize("answer", ["no body", "NO"])
def test_a_body_missing_from_the_fetch_reply_is_never_passed_over(
        answer: str, dovecot: Dovecot, imap_user: str, engine: Engine, blobs: BlobStore,
        pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    # Some servers answer a FETCH without one message's body (OK, or a partial NO) when they
    # cannot read it. The other messages go on; that one stays where it is, is tried again,
    # and last_uid never moves past it, so that a restart tries it again too.
    from mailgate.transport.imap import ImapRefused

    for i in range(6):
        dovecot.append(imap_user, message(i))
    real_bodies = _Session.bodies
    broken = {2}

    async def bodies_without_broken(self: _Session, uids: list[int]) -> dict[int, bytes]:
        if answer == "NO" and broken & set(uids):
            raise ImapRefused("UID FETCH BODY.PEEK[] failed: NO [SERVERBUG] Internal error")
        got = await real_bodies(self, uids)
        return {uid: raw for uid, raw in got.items() if uid not in broken}

    monkeypatch.setattr(_Session, "bodies", bodies_without_broken)
    account = dovecot.account(imap_user, batch_size=2, poll_seconds=0.1)
    poller = ImapPoller(account, engine, blobs, process=pipeline)
    assert asyncio.run(poller.poll_once()) == 5
    assert stored_uids(engine) == [1, 3, 4, 5, 6]
    assert dovecot.uids(imap_user) == [2]
    st = state(engine, imap_user)
    assert st.last_uid == 1
    assert "UID 2" in (st.last_error or "")
    assert ("no body" if answer == "no body" else "SERVERBUG") in (st.last_error or "")

    broken.clear()
    time.sleep(0.2)  # its retry is due poll_seconds after it failed
    assert asyncio.run(poller.poll_once()) == 1
    assert stored_uids(engine) == [1, 2, 3, 4, 5, 6]
    assert dovecot.count(imap_user, "INBOX") == 0 and dovecot.count(imap_user, "Processed") == 6
    assert state(engine, imap_user).last_uid == 6


def _maildir_files(dovecot: Dovecot, user: str) -> list[Path]:
    maildir = dovecot.root / "home" / user / "Maildir"
    return [p for sub in ("new", "cur") if (maildir / sub).is_dir() for p in (maildir / sub).iterdir()]


def _take_read_permission(dovecot: Dovecot, user: str, needle: bytes) -> Callable[[], None]:
    """Make one message's file unreadable for the server (a restore with wrong owners, a bad
    disk block): Dovecot still lists it and knows its size (from the file name), but hangs up
    on FETCH BODY[] ("BYE FETCH failed: Internal error occurred"). Returns the undo."""
    # Dovecot stores the lines with LF endings.
    [path] = [p for p in _maildir_files(dovecot, user) if needle in p.read_bytes().replace(b"\r\n", b"\n")]
    base, mode = path.name.split(":")[0], path.stat().st_mode & 0o777
    path.chmod(0)

    def restore() -> None:
        # Dovecot moves new/ to cur/ and appends ":2,<flags>" to the name; the base stays.
        [now] = [p for p in _maildir_files(dovecot, user) if p.name.split(":")[0] == base]
        now.chmod(mode)

    return restore


def test_a_message_the_server_cannot_return_does_not_block_the_others(
        dovecot: Dovecot, imap_user: str, engine: Engine, blobs: BlobStore, pipeline: Pipeline,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(1, 7):
        dovecot.append(imap_user, message(i))
    restore = _take_read_permission(dovecot, imap_user, b"Subject: help request t2\n")
    account = dovecot.account(imap_user, batch_size=10, poll_seconds=0.2)
    poller = ImapPoller(account, engine, blobs, process=pipeline)

    with caplog.at_level(logging.ERROR, logger="mailgate.transport.imap"):
        assert asyncio.run(poller.poll_once()) == 5
    assert stored_uids(engine) == [1, 3, 4, 5, 6]
    assert len(pipeline.calls) == 5
    assert dovecot.count(imap_user, "Processed") == 5
    assert dovecot.uids(imap_user) == [2]  # left where it was: not moved, not flagged
    assert "\\Seen" not in dovecot.flags(imap_user)[2]
    st = state(engine, imap_user)
    assert st.last_uid == 1  # never past the message that waits
    assert "UID 2" in (st.last_error or "") and "FETCH failed" in (st.last_error or "")
    assert any("UID 2" in r.getMessage() and "FETCH failed" in r.getMessage()
               for r in caplog.records if r.levelno == logging.ERROR)
    [health] = imap_health(engine, [account], utcnow())
    assert health["ok"] and "UID 2" in (health["warning"] or "")

    # Still unreadable: only that message is tried again, and the others are not fetched again.
    fetched = _spy_on_bodies(monkeypatch)
    time.sleep(0.3)  # its retry is due poll_seconds after it failed
    assert asyncio.run(poller.poll_once()) == 0
    assert fetched == [[2]]
    assert dovecot.uids(imap_user) == [2] and state(engine, imap_user).last_uid == 1

    # Readable again: the next try stores it, and last_uid catches up.
    restore()
    time.sleep(0.5)  # the second retry waits twice as long
    assert asyncio.run(poller.poll_once()) == 1
    assert stored_uids(engine) == [1, 2, 3, 4, 5, 6]
    assert len(pipeline.calls) == 6
    assert dovecot.count(imap_user, "INBOX") == 0 and dovecot.count(imap_user, "Processed") == 6
    st = state(engine, imap_user)
    assert (st.last_uid, st.last_error) == (6, None)
    [health] = imap_health(engine, [account], utcnow())
    assert health["ok"] and health["warning"] is None


def test_a_folder_that_refuses_the_move_does_not_stop_new_mail(
        dovecot: Dovecot, imap_user: str, engine: Engine, blobs: BlobStore, pipeline: Pipeline) -> None:
    """Filing is not spooling: a Processed folder the server cannot write to (NO on MOVE)
    used to end every pass at the first batch, so mail past the look-ahead never came in."""
    for i in range(4):
        dovecot.append(imap_user, message(i))
    dovecot.create_folder(imap_user, "Processed", "Failed")
    processed = dovecot.root / "home" / imap_user / "Maildir" / ".Processed"
    modes = {d: d.stat().st_mode & 0o777 for d in (processed, *(processed / s for s in ("tmp", "new", "cur")))}
    for d in modes:
        d.chmod(0o555)
    poller = ImapPoller(dovecot.account(imap_user, batch_size=2, poll_seconds=0.1), engine, blobs,
                        process=pipeline)
    account = poller.account
    assert asyncio.run(poller.poll_once()) == 4
    st = state(engine, imap_user)
    assert st.last_uid == 0 and "could not be filed" in (st.last_error or "")
    [health] = imap_health(engine, [account], utcnow())
    assert "could not be filed" in (health["warning"] or "")  # doctor says so while passes succeed
    for i in range(4, 10):  # more than the look-ahead of batches
        dovecot.append(imap_user, message(i))
    time.sleep(0.2)
    assert asyncio.run(poller.poll_once()) == 6
    assert stored_uids(engine) == list(range(1, 11)) and len(pipeline.calls) == 10
    assert dovecot.count(imap_user, "INBOX") == 10 and state(engine, imap_user).last_uid == 0

    for d, mode in modes.items():
        d.chmod(mode)
    time.sleep(1.0)  # the retries back off: 0.1 s, 0.2 s, ...
    assert asyncio.run(poller.poll_once()) == 0  # filed from the spool, nothing fetched again
    assert dovecot.count(imap_user, "INBOX") == 0 and dovecot.count(imap_user, "Processed") == 10
    assert len(pipeline.calls) == 10 and state(engine, imap_user).last_uid == 10
    [health] = imap_health(engine, [account], utcnow())
    assert health["ok"] and health["warning"] is None


def _spy_on_bodies(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The UIDs of each body FETCH from now on."""
    real_bodies = _Session.bodies
    fetched: list[list[int]] = []

    async def spy(self: _Session, uids: list[int]) -> dict[int, bytes]:
        fetched.append(list(uids))
        return await real_bodies(self, uids)

    monkeypatch.setattr(_Session, "bodies", spy)
    return fetched


def test_after_a_restart_only_the_message_left_behind_is_fetched_again(
        dovecot: Dovecot, imap_user: str, engine: Engine, blobs: BlobStore, pipeline: Pipeline,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # after = seen keeps every message in INBOX, so the search from last_uid (stopped below
    # the unreadable one) finds the stored ones again: they are recognised, not fetched.
    for i in range(1, 7):
        dovecot.append(imap_user, message(i))
    restore = _take_read_permission(dovecot, imap_user, b"Subject: help request t2\n")
    account = dovecot.account(imap_user, after="seen")
    fetched = _spy_on_bodies(monkeypatch)
    poller = ImapPoller(account, engine, blobs, process=pipeline)
    assert asyncio.run(poller.poll_once()) == 5
    assert state(engine, imap_user).last_uid == 1
    fetched.clear()
    assert asyncio.run(poller.poll_once()) == 0  # its retry is not due yet; nothing else is new
    assert fetched == []

    restarted = ImapPoller(account, engine, blobs, process=pipeline)
    assert asyncio.run(restarted.poll_once()) == 0
    assert fetched == [[2]]
    flags = dovecot.flags(imap_user)
    assert [u for u, f in sorted(flags.items()) if "\\Seen" in f] == [1, 3, 4, 5, 6]

    restore()
    fetched.clear()
    assert asyncio.run(ImapPoller(account, engine, blobs, process=pipeline).poll_once()) == 1
    assert fetched == [[2]]
    assert stored_uids(engine) == [1, 2, 3, 4, 5, 6] and len(pipeline.calls) == 6
    assert state(engine, imap_user).last_uid == 6
    assert all("\\Seen" in f for f in dovecot.flags(imap_user).values())


def test_without_process_callback_still_moves(dovecot: Dovecot, imap_user: str, engine: Engine,
                                              blobs: BlobStore) -> None:
    for i in range(3):
        dovecot.append(imap_user, message(i))
    poller = ImapPoller(dovecot.account(imap_user, move_to="Done Mail"), engine, blobs)
    assert asyncio.run(poller.poll_once()) == 3
    assert dovecot.count(imap_user, "Done Mail") == 3
    assert {r.state for r in rows(engine)} == {"queued"}


def test_non_ascii_folders(dovecot: Dovecot, imap_user: str, engine: Engine, blobs: BlobStore) -> None:
    # doveadm takes UTF-8 names and stores them as IMAP's modified UTF-7: the poller must
    # find the same folders by their Unicode names from the config.
    dovecot.create_folder(imap_user, "Входящие")
    for i in range(3):
        dovecot.doveadm("save", "-u", imap_user, "-m", "Входящие", input=message(i))
    account = dovecot.account(imap_user, folder="Входящие", move_to="Käsitelty", failed_folder="Fehlgeschlagen & Co")
    assert asyncio.run(ImapPoller(account, engine, blobs).poll_once()) == 3
    assert len(rows(engine)) == 3
    assert dovecot.message_count(imap_user, "Käsitelty") == 3
    assert dovecot.message_count(imap_user, "Входящие") == 0
    assert "Fehlgeschlagen & Co" in dovecot.doveadm("mailbox", "list", "-u", imap_user)


def test_message_appended_while_idle_is_picked_up(dovecot: Dovecot, imap_user: str,
                                                  engine: Engine, blobs: BlobStore,
                                                  pipeline: Pipeline) -> None:
    # poll_seconds is far above the wait below: only IDLE can deliver in time.
    account = dovecot.account(imap_user, poll_seconds=120.0)
    health: list[dict[str, Any]] = []
    poller = ImapPoller(account, engine, blobs, process=pipeline,
                        on_health=lambda _name, h: health.append(h))

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(poller.run(stop))
        await wait_until(lambda: any(h["ok"] for h in health), what="first pass")
        await asyncio.sleep(0.3)  # let it enter IDLE
        dovecot.append(imap_user, message(1))
        await wait_until(lambda: len(rows(engine)) == 1, timeout=10, what="IDLE pickup")
        await wait_until(lambda: dovecot.count(imap_user, "Processed") == 1, what="move")
        stop.set()
        await asyncio.wait_for(task, 10)

    asyncio.run(scenario())
    assert len(rows(engine)) == 1
    assert pipeline.calls == [rows(engine)[0].id]


_KILL_SCRIPT = textwrap.dedent("""
    import asyncio, os, signal, sys
    from pathlib import Path
    from mailgate.config import ImapAccount
    from mailgate.store.blobs import BlobStore
    from mailgate.store.engine import make_engine
    from mailgate.transport.imap import ImapPoller
    db, raw, host, port, user, kill_after = sys.argv[1:7]
    engine = make_engine("sqlite:///" + db)
    calls = 0
    async def process(inbound_id):
        global calls
        calls += 1
        if calls == int(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)  # after the commit, before the move
        return "ticket"
    account = ImapAccount(name=user, host=host, port=int(port), tls="none", username=user,
                          password="secret", queue="support@example.com", batch_size=4)
    asyncio.run(ImapPoller(account, engine, BlobStore(Path(raw)), process=process).poll_once())
""")


def test_kill_9_mid_batch_then_restart_gives_exactly_n(dovecot: Dovecot, imap_user: str,
                                                       engine: Engine, blobs: BlobStore,
                                                       tmp_path: Path, pipeline: Pipeline) -> None:
    # Batches of 4, stored up to two ahead of filing (LOOKAHEAD_BATCHES): the first two
    # are accepted (8 rows), and the process dies on the second's 2nd outcome, while it
    # fetches the third: after the commits, before any move.
    n, kill_after = 10, 6
    stored_at_kill = 8
    for i in range(n):
        dovecot.append(imap_user, message(i))
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(tmp_path / "mailgate.db"),
                           str(tmp_path / "raw"), dovecot.host, str(dovecot.port), imap_user,
                           str(kill_after)], cwd=REPO, capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    assert len(rows(engine)) == stored_at_kill
    assert dovecot.count(imap_user, "Processed") == 0
    assert dovecot.count(imap_user, "INBOX") == n

    account = dovecot.account(imap_user, batch_size=4)
    accepted = asyncio.run(ImapPoller(account, engine, blobs, process=pipeline).poll_once())
    assert accepted == n - stored_at_kill  # the other two of the dead batch are recognised
    assert len(rows(engine)) == n
    assert len({r.source_key for r in rows(engine)}) == n
    assert dovecot.count(imap_user, "INBOX") == 0
    assert dovecot.count(imap_user, "Processed") == n


def test_cancel_mid_batch_then_new_poller_gives_exactly_n(dovecot: Dovecot, imap_user: str,
                                                          engine: Engine, blobs: BlobStore) -> None:
    n = 8
    for i in range(n):
        dovecot.append(imap_user, message(i))
    account = dovecot.account(imap_user, batch_size=8)

    async def scenario() -> None:
        seen = 0
        started = asyncio.Event()

        async def slow(_inbound_id: int) -> str:
            nonlocal seen
            seen += 1
            if seen == 3:
                started.set()
                await asyncio.sleep(60)
            return "ticket"

        task = asyncio.create_task(ImapPoller(account, engine, blobs, process=slow)
                                   .run(asyncio.Event()))
        await asyncio.wait_for(started.wait(), 15)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The batch was accepted whole before its outcomes were awaited: all 8 are stored,
        # none moved. The next poller recognises every one and moves them, storing nothing twice.
        assert len(rows(engine)) == n
        assert dovecot.count(imap_user, "Processed") == 0
        assert await ImapPoller(account, engine, blobs).poll_once() == 0

    asyncio.run(scenario())
    assert len(rows(engine)) == n
    assert dovecot.count(imap_user, "Processed") == n


def test_reconnects_after_dovecot_restart(dovecot: Dovecot, imap_user: str, engine: Engine,
                                          blobs: BlobStore, pipeline: Pipeline) -> None:
    account = dovecot.account(imap_user, poll_seconds=2.0)
    health: list[dict[str, Any]] = []
    poller = ImapPoller(account, engine, blobs, process=pipeline, backoff_initial=0.2,
                        backoff_max=1.0, on_health=lambda _n, h: health.append(h))

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(poller.run(stop))
        for i in range(3):
            dovecot.append(imap_user, message(i))
        await wait_until(lambda: len(rows(engine)) == 3, what="first messages")
        await asyncio.to_thread(dovecot.stop)
        await wait_until(lambda: any(not h["ok"] for h in health), what="error reported")
        await asyncio.to_thread(dovecot.start)
        for i in range(3, 5):
            await asyncio.to_thread(dovecot.append, imap_user, message(i))
        await wait_until(lambda: len(rows(engine)) == 5, what="messages after restart")
        await wait_until(lambda: health[-1]["ok"], what="health ok again")
        stop.set()
        await asyncio.wait_for(task, 10)

    try:
        asyncio.run(scenario())
    finally:
        if not dovecot.running:
            dovecot.start()
    assert len(rows(engine)) == 5
    assert dovecot.count(imap_user, "Processed") == 5
    assert state(engine, imap_user).last_error  # the outage was recorded


def test_uidvalidity_change_rescans_without_duplicates(dovecot: Dovecot, imap_user: str,
                                                       engine: Engine, blobs: BlobStore,
                                                       pipeline: Pipeline) -> None:
    # after = seen keeps processed mail in INBOX, so a rescan really sees it again.
    for i in range(4):
        dovecot.append(imap_user, message(i))
    account = dovecot.account(imap_user, after="seen")
    poller = ImapPoller(account, engine, blobs, process=pipeline)
    assert asyncio.run(poller.poll_once()) == 4
    assert all("\\Seen" in f for f in dovecot.flags(imap_user).values())
    old = state(engine, imap_user).uidvalidity

    dovecot.set_uidvalidity(imap_user, 4242)
    dovecot.append(imap_user, message(99))
    assert asyncio.run(poller.poll_once()) == 1
    assert len(rows(engine)) == 5
    assert len(pipeline.calls) == 5
    st = state(engine, imap_user)
    assert (old, st.uidvalidity, st.last_uid) == (old, 4242, 5)
    assert old != 4242
    assert dovecot.count(imap_user) == 5
    assert asyncio.run(poller.poll_once()) == 0


def test_poison_message_goes_to_failed_and_is_not_fetched_again(
        dovecot: Dovecot, imap_user: str, engine: Engine, blobs: BlobStore,
        pipeline: Pipeline) -> None:
    dovecot.append(imap_user, message(1))
    dovecot.append(imap_user, message(2, poison=True))
    dovecot.append(imap_user, message(3))
    poller = ImapPoller(dovecot.account(imap_user), engine, blobs, process=pipeline)
    assert asyncio.run(poller.poll_once()) == 3
    assert dovecot.count(imap_user, "Failed") == 1
    assert dovecot.count(imap_user, "Processed") == 2
    assert dovecot.count(imap_user, "INBOX") == 0
    assert asyncio.run(poller.poll_once()) == 0
    assert len(pipeline.calls) == 3
    assert [r.state for r in rows(engine)] == ["done", "dead", "done"]


def test_large_batches_are_split_so_aioimaplib_does_not_overflow(dovecot: Dovecot, imap_user: str) -> None:
    # aioimaplib recurses once per response line of a read: ~1000 size lines
    # in one reply used to raise RecursionError and drop the connection.
    from mailgate.transport.imap import _Session

    n = 1100
    dovecot.append_many(imap_user, [f"Subject: {i}\r\n\r\n{i}\r\n".encode() for i in range(n)])

    async def scenario() -> tuple[int, int, int]:
        session = _Session(dovecot.account(imap_user, batch_size=5000))
        try:
            await session.open()
            await session.select("INBOX", readonly=True)
            uids = await session.search_new(0)
            return len(uids), len(await session.sizes(uids)), len(await session.bodies(uids))
        finally:
            await session.close()

    assert asyncio.run(scenario()) == (n, n, n)


def test_two_mailboxes_feed_two_queues_and_a_broken_one_does_not_stop_them(
        dovecot: Dovecot, engine: Engine, blobs: BlobStore, pipeline: Pipeline) -> None:
    sales, billing = dovecot.new_user(), dovecot.new_user()
    for i in range(3):
        dovecot.append(sales, message(i, tag="s"))
    for i in range(2):
        dovecot.append(billing, message(i, tag="b"))
    accounts = [dovecot.account(sales, queue="sales@example.com"),
                dovecot.account(billing, queue="billing@example.com"),
                dovecot.account(billing, name="broken", password="wrong")]

    async def scenario() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(ImapPoller(a, engine, blobs, process=pipeline,
                                                backoff_initial=0.2).run(stop))
                 for a in accounts]
        await wait_until(lambda: len(rows(engine)) == 5, what="both mailboxes")
        await wait_until(lambda: _has_error(engine, "broken"), what="broken mailbox error")
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)

    asyncio.run(scenario())
    by_queue: dict[str, int] = {}
    for r in rows(engine):
        by_queue[r.queue or ""] = by_queue.get(r.queue or "", 0) + 1
    assert by_queue == {"sales@example.com": 3, "billing@example.com": 2}
    assert dovecot.count(sales, "Processed") == 3
    assert dovecot.count(billing, "Processed") == 2
    assert "login as" in (state(engine, "broken").last_error or "")


def _has_error(engine: Engine, name: str) -> bool:
    with session_scope(engine) as s:
        row = s.exec(select(ImapState).where(ImapState.account == name)).first()
        return row is not None and bool(row.last_error)


@pytest.mark.parametrize("mode", ["starttls", "ssl"])
def test_tls_logins(mode: str, dovecot: Dovecot, imap_user: str, engine: Engine,
                    blobs: BlobStore) -> None:
    port = dovecot.ssl_port if mode == "ssl" else dovecot.port
    account = dovecot.account(imap_user, tls=mode, port=port)
    assert check_login(account) == ""
    dovecot.append(imap_user, message(1))
    assert asyncio.run(ImapPoller(account, engine, blobs).poll_once()) == 1
    assert dovecot.count(imap_user, "Processed") == 1

    untrusted = dovecot.account(imap_user, tls=mode, port=port, ca_file=None)
    assert "CERTIFICATE_VERIFY_FAILED" in check_login(untrusted)


def test_check_login_reports_bad_password(dovecot: Dovecot, imap_user: str) -> None:
    err = check_login(dovecot.account(imap_user, password="nope"))
    assert err.startswith(f"imap {imap_user}: login as {imap_user} failed: NO")


def test_oversize_message_left_in_place_and_reported_once(
        dovecot: Dovecot, imap_user: str, engine: Engine, blobs: BlobStore,
        caplog: pytest.LogCaptureFixture) -> None:
    dovecot.append(imap_user, message(1))
    big_uid = dovecot.append(imap_user, message(2, pad=6000))
    dovecot.append(imap_user, message(3))
    poller = ImapPoller(dovecot.account(imap_user, max_message_bytes=3000), engine, blobs)
    with caplog.at_level(logging.ERROR, logger="mailgate.transport.imap"):
        assert asyncio.run(poller.poll_once()) == 2
        assert asyncio.run(poller.poll_once()) == 0
    assert dovecot.uids(imap_user) == [big_uid]
    assert dovecot.count(imap_user, "Processed") == 2
    assert len(rows(engine)) == 2
    assert f"UID {big_uid}" in (state(engine, imap_user).last_error or "")
    reports = [r for r in caplog.records if "over max_message_bytes" in r.getMessage()]
    assert len(reports) == 1
    assert "\\Seen" not in dovecot.flags(imap_user)[big_uid]  # never fetched, not even partly
    # Neither stored nor a dead letter: doctor warns until someone takes it out of the folder,
    # whatever else is reported meanwhile, and about each such message.
    second_big = dovecot.append(imap_user, message(4, pad=6000))
    assert asyncio.run(poller.poll_once()) == 0  # passes go on around them, the warning stays
    poller._record(None, "ConnectionRefusedError: a later failure")

    def warning() -> str | None:
        return imap_health(engine, [poller.account], utcnow())[0]["warning"]

    assert f"2 message(s) over max_message_bytes (3000) wait in INBOX, never fetched (UIDs {big_uid}, " \
           f"{second_big})" in (warning() or "")
    with contextlib.closing(dovecot.connect(imap_user)) as client:
        client.select("INBOX")
        client.uid("STORE", str(big_uid), "+FLAGS", "(\\Deleted)")
        client.expunge()
    asyncio.run(poller.poll_once())
    assert f"1 message(s) over max_message_bytes (3000) wait in INBOX, never fetched (UIDs {second_big})" \
        in (warning() or "")


def test_shadow_mode_leaves_mailbox_untouched(dovecot: Dovecot, imap_user: str, engine: Engine,
                                              blobs: BlobStore, pipeline: Pipeline) -> None:
    for i in range(3):
        dovecot.append(imap_user, message(i))
    before = dovecot.flags(imap_user)
    poller = ImapPoller(dovecot.account(imap_user, shadow=True), engine, blobs, process=pipeline)
    assert asyncio.run(poller.poll_once()) == 3
    assert asyncio.run(poller.poll_once()) == 0
    dovecot.append(imap_user, message(3))
    assert asyncio.run(poller.poll_once()) == 1
    assert len(rows(engine)) == 4
    assert len(pipeline.calls) == 4
    assert dovecot.count(imap_user) == 4
    after = dovecot.flags(imap_user)
    assert {u: after[u] for u in before} == before
    assert dovecot.folders(imap_user) == ["INBOX"]


def test_password_command_and_failing_oauth2_command(dovecot: Dovecot, imap_user: str,
                                                     engine: Engine, blobs: BlobStore) -> None:
    dovecot.append(imap_user, message(1))
    ok = dovecot.account(imap_user, password=None, password_command="printf '%s\\n' secret")
    assert asyncio.run(ImapPoller(ok, engine, blobs).poll_once()) == 1

    bad = dovecot.account(imap_user, name="oauth", password=None,
                          oauth2_token_command="sh -c 'echo refresh token expired >&2; exit 3'")
    health: list[dict[str, Any]] = []
    poller = ImapPoller(bad, engine, blobs, on_health=lambda _n, h: health.append(h))
    with pytest.raises(ImapError, match="oauth2_token_command failed: refresh token expired"):
        asyncio.run(poller.poll_once())
    assert health[-1]["last_error"] == "oauth2_token_command failed: refresh token expired"
    [report] = imap_health(engine, [bad], utcnow())
    assert report["warning"] and "refresh token expired" in report["warning"]


def test_imap_health_warns_when_unreachable_too_long(dovecot: Dovecot, imap_user: str,
                                                     engine: Engine, blobs: BlobStore) -> None:
    dovecot.append(imap_user, message(1))
    account = dovecot.account(imap_user, unreachable_warning_minutes=30)
    other = dovecot.account("never-polled")
    asyncio.run(ImapPoller(account, engine, blobs).poll_once())
    now = utcnow()
    fresh, never = imap_health(engine, [account, other], now)
    assert (fresh["ok"], fresh["warning"], fresh["last_uid"]) == (True, None, 1)
    assert (never["ok"], never["warning"], never["last_ok_at"]) == (False, None, None)
    [stale] = imap_health(engine, [account], now + timedelta(minutes=45))
    assert stale["warning"] == f"imap {imap_user}: no successful fetch for 45 minutes"


def test_unreachable_mailbox_logs_a_warning(engine: Engine, blobs: BlobStore,
                                            caplog: pytest.LogCaptureFixture) -> None:
    dead = ImapAccount(name="dead", host="127.0.0.1", port=1, tls="none", username="x",
                       password="x", queue="support@example.com",
                       unreachable_warning_minutes=0.0001)
    poller = ImapPoller(dead, engine, blobs, backoff_initial=0.05, backoff_max=0.1)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(poller.run(stop))
        await wait_until(lambda: any(r.levelno == logging.WARNING for r in caplog.records),
                         timeout=5, what="warning")
        stop.set()
        await asyncio.wait_for(task, 5)

    with caplog.at_level(logging.WARNING, logger="mailgate.transport.imap"):
        asyncio.run(scenario())
    assert any("not reachable for" in r.getMessage() for r in caplog.records)
    assert state(engine, "dead").last_ok_at is None


def test_a_long_unfiled_report_still_names_its_highest_uid(engine: Engine, blobs: BlobStore) -> None:
    """last_error keeps 2000 characters: the UID that doctor's warning and last_uid wait on
    must not be in the part cut off when the server refused a long, gappy set of UIDs."""
    account = ImapAccount(name="box", host="127.0.0.1", port=1, tls="none", username="x",
                          password="x", queue="support@example.com")
    poller = ImapPoller(account, engine, blobs)
    poller._record(utcnow(), None)  # passes succeed: only a waiting UID makes a warning
    uids = list(range(1, 3001, 2))
    asyncio.run(poller._report_unfiled(uids, "NO [SERVERBUG] Internal error"))
    assert len(state(engine, "box").last_error or "") == 2000
    [health] = imap_health(engine, [account], utcnow())
    assert "stored mail up to UID 2999 in INBOX could not be filed" in (health["warning"] or "")


# ------------------------------------------------- the daemon (`mailgate run`)


def _daemon_config(workdir: Path, dovecot: Dovecot, user: str, **keys: object) -> Path:
    from tests.conftest import write_config

    values: dict[str, object] = dict(name="inbox", host=dovecot.host, port=dovecot.port, tls="none",
                                     username=user, password=dovecot.password, poll_seconds=30.0,
                                     batch_size=5)
    values.update(keys)
    body = "\n".join(f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {str(v).lower()}"
                     for k, v in values.items())
    return write_config(workdir, extra="[[imap]]\n" + body.replace("'", '"') + "\n")


def _inbound_count(config: Path) -> int:
    import sqlite3

    try:
        con = sqlite3.connect(config.parent / "mailgate.db", timeout=5)
        try:
            return int(con.execute("select count(*) from inbound").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def test_daemon_turns_imap_mail_into_tickets(dovecot: Dovecot, imap_user: str,
                                             workdir: Path) -> None:
    from tests.conftest import start_daemon, wait_until

    n = 6
    config = _daemon_config(workdir, dovecot, imap_user)
    daemon = start_daemon(config)
    try:
        for i in range(n):
            dovecot.append(imap_user, message(i, tag="d"))
        wait_until(lambda: len(daemon.tickets()) >= n, timeout=30)
        wait_until(lambda: dovecot.count(imap_user, "Processed") == n, timeout=30)
        time.sleep(0.5)  # a surplus ticket would show up now
        tickets = daemon.tickets()
    finally:
        daemon.stop()
    assert len(tickets) == n
    assert dovecot.count(imap_user, "INBOX") == 0
    assert _inbound_count(config) == n


def test_a_note_bccd_to_an_imap_mailbox_of_the_comment_address_stays_internal(
        dovecot: Dovecot, imap_user: str, workdir: Path) -> None:
    """The account's queue is the envelope recipient, as for `ingest --queue`: a host that
    adds no Delivered-To leaves nothing else saying the note went to the comment address,
    and it was sent to the customer as an answer."""
    from tests.conftest import cli, cli_json, mail, start_daemon, wait_until, write_config

    config = write_config(workdir, helpdesk_extra='trusted_authserv_ids = ["mx.example.com"]', extra=(
        f'[[imap]]\nname = "comments"\nhost = "{dovecot.host}"\nport = {dovecot.port}\ntls = "none"\n'
        f'username = "{imap_user}"\npassword = "{dovecot.password}"\nqueue = "support-comment@example.com"\n'
        'poll_seconds = 1.0\n'))
    cli(config, "ingest", input=mail(subject="Printer on fire").as_bytes())
    note = mail(sender="Alice <alice@example.com>", to="alice@example.com", subject="Re: [EXAMPLE #1] Printer on fire",
                body="Internal: NOTE-MARKER owes us three invoices.",
                headers={"Authentication-Results": "mx.example.com; dkim=pass header.d=example.com"})
    daemon = start_daemon(config)
    try:
        dovecot.append(imap_user, note.as_bytes())
        wait_until(lambda: dovecot.count(imap_user, "Processed") == 1, timeout=30)
        daemon.wait_idle()
    finally:
        daemon.stop()
    messages = cli_json(config, "tickets", "show", "1")["messages"]
    assert [m["kind"] for m in messages if "NOTE-MARKER" in m["text"]] == ["internal"]
    assert [r["template"] for r in cli_json(config, "outbox", "list") if r["to"] == "carol@customer.org"] == [
        "requester/created"]


def test_daemon_shadow_mode_tickets_but_sends_nothing(dovecot: Dovecot, imap_user: str,
                                                      workdir: Path) -> None:
    from tests.conftest import cli_json, start_daemon, wait_until

    n = 3
    config = _daemon_config(workdir, dovecot, imap_user, shadow=True)
    for i in range(n):
        dovecot.append(imap_user, message(i, tag="s"))
    daemon = start_daemon(config)
    try:
        wait_until(lambda: len(daemon.tickets()) >= n, timeout=30)
        daemon.wait_idle()
        time.sleep(0.5)
        tickets = daemon.tickets()
        outbox = cli_json(config, "outbox", "list")
    finally:
        daemon.stop()
    assert len(tickets) == n
    assert dovecot.count(imap_user, "INBOX") == n  # the mailbox is untouched
    assert len(outbox) == 3 * n and {r["state"] for r in outbox} == {"shadow"}  # kept, never sent
    assert daemon.sent() == []


def test_daemon_kill_9_mid_batch_then_restart_gives_exactly_n_tickets(
        dovecot: Dovecot, imap_user: str, workdir: Path) -> None:
    import signal as _signal

    from tests.conftest import start_daemon, wait_until

    n = 40
    dovecot.append_many(imap_user, [message(i, tag="k") for i in range(n)])
    config = _daemon_config(workdir, dovecot, imap_user)
    daemon = start_daemon(config)
    try:
        wait_until(lambda: _inbound_count(config) >= 7, timeout=30, interval=0.01)
    finally:
        assert daemon.stop(_signal.SIGKILL) == -9
    assert _inbound_count(config) < n, "too fast to kill mid-way; raise n"

    daemon = start_daemon(config)
    try:
        # The poller moves a message only after processing it, so once all are
        # moved every ticket that will come from them exists.
        wait_until(lambda: dovecot.count(imap_user, "Processed") == n, timeout=60)
        time.sleep(0.5)
        tickets = daemon.tickets()
    finally:
        daemon.stop()
    assert len(tickets) == n
    assert _inbound_count(config) == n
    assert dovecot.count(imap_user, "INBOX") == 0


class _StallingProxy:
    """Between the poller and Dovecot: from the first client bytes holding `stall_on` on,
    nothing more is passed either way and the sockets stay open (a hung server, or a
    network that drops packets silently)."""

    def __init__(self, target_port: int, stall_on: bytes) -> None:
        self.target_port, self.stall_on, self.stalled = target_port, stall_on, False

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, from_client: bool) -> None:
            while data := await r.read(65536):
                self.stalled = self.stalled or (from_client and self.stall_on in data)
                if not self.stalled:
                    w.write(data)
                    await w.drain()

        await asyncio.gather(pipe(client_r, server_w, True), pipe(server_r, client_w, False),
                             return_exceptions=True)


@pytest.mark.parametrize(("after", "stall_on"), [("move", b"UID MOVE"), ("seen", b"UID STORE")])
def test_a_server_that_stalls_on_the_after_action_times_out(
        dovecot: Dovecot, imap_user: str, engine: Engine, blobs: BlobStore, monkeypatch: pytest.MonkeyPatch,
        after: str, stall_on: bytes) -> None:
    """aioimaplib gives MOVE, STORE, COPY and EXPUNGE no time limit: the pass hung for good,
    reporting nothing, its lease renewed so that no other instance took the mailbox over."""
    monkeypatch.setattr(imap._Session.__init__, "__defaults__", (2.0,))  # COMMAND_TIMEOUT, scaled down
    dovecot.append(imap_user, message(1))

    async def poll_through_stalling_proxy() -> BaseException | None:
        proxy = _StallingProxy(dovecot.port, stall_on)
        port = await proxy.start()
        try:
            poller = ImapPoller(dovecot.account(imap_user, port=port, after=after), engine, blobs)
            task = asyncio.ensure_future(poller.poll_once())
            done, _ = await asyncio.wait({task}, timeout=30)
            assert done, "the pass still hangs"
            return task.exception()
        finally:
            proxy.server.close()

    error = asyncio.run(poll_through_stalling_proxy())
    assert isinstance(error, imap.ImapError) and "timed out" in str(error)
    assert stored_uids(engine) == [1]  # stored before the after-action: filed on the next pass


def test_the_daemon_poller_ends_the_oversize_warning_on_its_open_connection(
        dovecot: Dovecot, imap_user: str, engine: Engine, blobs: BlobStore) -> None:
    """run() keeps one connection for pass after pass: the check is made each pass, not at
    connecting only (which could be days away)."""
    big = dovecot.append(imap_user, message(1, pad=6000))
    account = dovecot.account(imap_user, max_message_bytes=3000, poll_seconds=0.5)
    poller = ImapPoller(account, engine, blobs)

    def warning() -> str | None:
        return imap_health(engine, [account], utcnow())[0]["warning"]

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(poller.run(stop))
        try:
            await wait_until(lambda: bool(warning()), what="the oversize warning")
            with contextlib.closing(dovecot.connect(imap_user)) as client:
                client.select("INBOX")
                client.uid("STORE", str(big), "+FLAGS", "(\\Deleted)")
                client.expunge()
            await wait_until(lambda: warning() is None, what="the warning to end")
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    asyncio.run(scenario())
