"""The spool and the acceptance journal, without sockets."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from sqlmodel import select

from mailgate import spool
from mailgate.config import load_settings
from mailgate.journal import AcceptJournal
from mailgate.runtime import Runtime
from mailgate.store import migrate
from mailgate.store.engine import session_scope, utcnow
from mailgate.store.tables import Inbound
from tests.conftest import mail, write_config


@pytest.fixture
def rt(workdir: Path) -> Runtime:
    runtime = Runtime.build(load_settings(write_config(workdir)))
    migrate.upgrade(runtime.engine)
    return runtime


def accept_n(rt: Runtime, n: int) -> list[int]:
    return [spool.accept(rt.spool_engine, rt.blobs, mail(subject=f"m{i}").as_bytes(), source="ingest").inbound_id
            for i in range(n)]


def set_attempts(rt: Runtime, inbound_id: int, attempts: int) -> None:
    with session_scope(rt.engine) as session:
        row = session.get(Inbound, inbound_id)
        assert row is not None
        row.attempts = attempts
        session.add(row)


def test_accept_is_idempotent_per_source_key(rt: Runtime) -> None:
    raw = mail().as_bytes()
    first = spool.accept(rt.spool_engine, rt.blobs, raw, source="imap", source_key="imap:a:1:7")
    again = spool.accept(rt.spool_engine, rt.blobs, raw, source="imap", source_key="imap:a:1:7")
    assert (first.duplicate, again.duplicate) == (False, True)
    assert first.inbound_id == again.inbound_id
    assert rt.blobs.get(_sha(rt, first.inbound_id)) == raw


def _sha(rt: Runtime, inbound_id: int) -> str:
    with session_scope(rt.engine) as session:
        row = session.get(Inbound, inbound_id)
        assert row is not None
        return row.raw_sha256


def test_batches_take_only_fresh_rows_and_a_retried_row_goes_alone(rt: Runtime) -> None:
    ids = accept_n(rt, 5)
    set_attempts(rt, ids[0], 1)  # say a worker died holding it
    alone = spool.claim_batch(rt.engine, "w:1", max_attempts=5, limit=10)
    assert [r.id for r in alone] == [ids[0]]
    rest = spool.claim_batch(rt.engine, "w:1", max_attempts=5, limit=10)
    assert [r.id for r in rest] == ids[1:]
    assert all(r.attempts == 1 and r.state == "processing" for r in rest)
    assert spool.claim_batch(rt.engine, "w:1", max_attempts=5, limit=10) == []


def test_a_row_claimed_max_attempts_times_becomes_a_dead_letter(rt: Runtime) -> None:
    (only,) = accept_n(rt, 1)
    set_attempts(rt, only, 5)
    assert spool.claim_batch(rt.engine, "w:1", max_attempts=5, limit=10) == []
    assert spool.state_of(rt.engine, only) == ("dead", "dead")
    assert spool.requeue(rt.engine, [only]) == [only]
    assert spool.state_of(rt.engine, only) == ("queued", None)


def test_claims_of_a_dead_process_on_this_host_are_released(rt: Runtime) -> None:
    a, b = accept_n(rt, 2)
    spool.claim_batch(rt.engine, f"{socket.gethostname()}:999999999", max_attempts=5, limit=1)
    spool.claim_batch(rt.engine, spool.worker_id(), max_attempts=5, limit=1)  # alive: ourselves
    assert spool.release_dead_claims(rt.engine) == 1
    assert spool.state_of(rt.engine, a)[0] == "queued"
    assert spool.state_of(rt.engine, b)[0] == "processing"


def test_fail_retries_then_keeps_a_dead_letter_with_its_reason(rt: Runtime) -> None:
    (only,) = accept_n(rt, 1)
    row = spool.claim(rt.engine, "w:1", max_attempts=2)
    assert row is not None
    assert spool.fail(rt.engine, only, "boom 1", max_attempts=2) is False
    assert spool.state_of(rt.engine, only) == ("queued", None)
    set_attempts(rt, only, 2)
    assert spool.fail(rt.engine, only, "boom 2", max_attempts=2, subject="s") is True
    with session_scope(rt.engine) as session:
        dead = session.get(Inbound, only)
        assert dead is not None and dead.state == "dead" and dead.last_error == "boom 2" and dead.subject == "s"


def journal_row(journal: AcceptJournal, subject: str) -> str:
    key, row = journal.row_for(mail(subject=subject).as_bytes(), source="smtp", queue="support@example.com",
                               envelope_from="carol@customer.org", envelope_to=("support@example.com",))
    assert journal.write_rows([row]) == [None]
    return key


def test_journal_drain_moves_each_row_once_even_after_a_crash_between_commits(rt: Runtime, workdir: Path) -> None:
    journal = AcceptJournal(workdir / "data" / "accept-journal.db", rt.blobs)
    keys = [journal_row(journal, f"j{i}") for i in range(3)]
    # A crash after the inbound commit but before the journal delete: the rows are in both.
    with session_scope(rt.engine) as session:
        session.add(Inbound(source="smtp", source_key=keys[0], raw_sha256="0" * 64, received_at=utcnow()))
    assert journal.drain(rt.spool_engine) == 3
    assert journal.pending() == 0
    assert journal.drain(rt.spool_engine) == 0
    with session_scope(rt.engine) as session:
        found = session.exec(select(Inbound.source_key)).all()
    assert sorted(found) == sorted(keys)  # three rows, none twice
    journal.close()


def test_accept_batch_is_one_commit_that_recognises_keys_it_has(rt: Runtime) -> None:
    raws = [mail(subject=f"b{i}").as_bytes() for i in range(3)]
    first = spool.accept_batch(rt.spool_engine, rt.blobs, [("imap:a:1:1", raws[0])], source="imap",
                               queue="support@example.com")
    assert [a.duplicate for a in first] == [False]
    both = spool.accept_batch(rt.spool_engine, rt.blobs, [(f"imap:a:1:{i + 1}", raw) for i, raw in enumerate(raws)],
                              source="imap", queue="support@example.com")
    assert [a.duplicate for a in both] == [True, False, False]
    assert both[0].inbound_id == first[0].inbound_id
    with session_scope(rt.engine) as session:
        rows = session.exec(select(Inbound).order_by(Inbound.id)).all()  # type: ignore[arg-type]
        assert [r.source_key for r in rows] == ["imap:a:1:1", "imap:a:1:2", "imap:a:1:3"]
        assert [r.id for r in rows] == [a.inbound_id for a in both]
        assert [rt.blobs.get(r.raw_sha256) for r in rows] == raws
        assert {r.queue for r in rows} == {"support@example.com"} and {r.state for r in rows} == {"queued"}


def test_accept_batch_stores_none_of_the_batch_when_one_cannot_be_kept(
        rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailgate.store.blobs import FilesystemSync

    def broken_sync(self: FilesystemSync) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(FilesystemSync, "sync", broken_sync)
    with pytest.raises(spool.SpoolError):
        spool.accept_batch(rt.spool_engine, rt.blobs, [("imap:a:1:1", b"x"), ("imap:a:1:2", b"y")], source="imap")
    with session_scope(rt.engine) as session:
        assert session.exec(select(Inbound)).all() == []
    assert [p for p in rt.blobs.root.rglob("*") if p.is_file()] == []  # no temporary file left behind


def test_put_many_stores_each_content_once_and_reuses_what_is_there(rt: Runtime) -> None:
    old = rt.blobs.put(b"already here")
    digests = rt.blobs.put_many([b"one", b"already here", b"two", b"one"])
    assert digests[1] == old and digests[0] == digests[3]
    assert [rt.blobs.get(d) for d in digests] == [b"one", b"already here", b"two", b"one"]
    files = sorted(p.name for p in rt.blobs.root.rglob("*") if p.is_file())
    assert files == sorted(set(digests))  # named by content, no temporary file left


def test_journal_sessions_that_arrive_together_share_a_commit(rt: Runtime, workdir: Path) -> None:
    import asyncio

    from mailgate.journal import GroupCommit

    journal = AcceptJournal(workdir / "data" / "accept-journal.db", rt.blobs)
    commits: list[int] = []
    real_write = journal.write_rows

    def counting_write(rows: list[tuple[object, ...]]) -> list[Exception | None]:
        commits.append(len(rows))
        return real_write(rows)

    journal.write_rows = counting_write  # type: ignore[method-assign]
    group = GroupCommit(journal)

    async def six_sessions() -> list[str]:
        # All six reach the end of DATA before the first commit's thread has run.
        return await asyncio.gather(*(group.accept(
            mail(subject=f"g{i}").as_bytes(), source="smtp", queue="support@example.com",
            envelope_from="carol@customer.org", envelope_to=("support@example.com",)) for i in range(6)))

    keys = asyncio.run(six_sessions())
    assert commits == [6] and len(set(keys)) == 6 and journal.pending() == 6
    assert journal.drain(rt.spool_engine) == 6
    with session_scope(rt.engine) as session:
        rows = session.exec(select(Inbound)).all()
    assert sorted(r.source_key for r in rows) == sorted(keys)
    assert sorted(rt.blobs.get(r.raw_sha256).split(b"Subject: ")[1][:2] for r in rows) == [
        b"g0", b"g1", b"g2", b"g3", b"g4", b"g5"]
    journal.close()


def test_a_row_the_journal_refuses_fails_alone_not_its_whole_group(rt: Runtime, workdir: Path) -> None:
    import asyncio

    from mailgate.journal import GroupCommit

    journal = AcceptJournal(workdir / "data" / "accept-journal.db", rt.blobs)
    taken = journal_row(journal, "first")
    _, row = journal.row_for(b"abc", source="smtp", queue=None, envelope_from=None, envelope_to=())
    errors = journal.write_rows([row, (taken, *row[1:]), ("smtp:other", *row[1:])])
    assert [e is None for e in errors] == [True, False, True]  # the duplicate key only
    assert journal.pending() == 3
    # A value SQLite refuses (a lone surrogate) is that row's error, not its group's.
    _, ok = journal.row_for(b"ok", source="smtp", queue=None, envelope_from="a@x.org", envelope_to=())
    _, bad = journal.row_for(b"bad", source="smtp", queue=None, envelope_from="b\udcff@x.org", envelope_to=())
    assert [e is None for e in journal.write_rows([ok, bad])] == [True, False]
    assert journal.pending() == 4

    async def refused() -> None:  # through the listener's path: a SpoolError, no detail
        import sqlite3

        group = GroupCommit(journal)
        journal._conn.execute("PRAGMA busy_timeout=0")
        other = sqlite3.connect(journal.path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")  # another process holds the journal
        try:
            with pytest.raises(spool.SpoolError):
                await group.accept(b"x", source="smtp", queue=None, envelope_from=None, envelope_to=())
        finally:
            other.execute("ROLLBACK")
            other.close()

    asyncio.run(refused())
    assert journal.pending() == 4
    journal.close()


def test_a_journal_row_written_by_an_older_version_still_moves(rt: Runtime, workdir: Path) -> None:
    import sqlite3

    path = workdir / "data" / "accept-journal.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = mail(subject="before the upgrade").as_bytes()
    digest = rt.blobs.put(raw)  # older versions put the bytes in the blob store at once
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE journal (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, raw_sha256 TEXT NOT NULL,"
                " size INTEGER NOT NULL, source TEXT NOT NULL, queue TEXT, envelope_from TEXT,"
                " envelope_to TEXT NOT NULL, received_at TEXT NOT NULL)")
    con.execute("INSERT INTO journal (key, raw_sha256, size, source, envelope_to, received_at)"
                " VALUES ('smtp:old', ?, ?, 'smtp', 'support@example.com', '2026-01-01T00:00:00+00:00')",
                (digest, len(raw)))
    con.commit()
    con.close()
    journal = AcceptJournal(path, rt.blobs)
    new_key = journal_row(journal, "after the upgrade")
    assert journal.drain(rt.spool_engine) == 2
    with session_scope(rt.engine) as session:
        rows = {r.source_key: r for r in session.exec(select(Inbound)).all()}
    assert rows["smtp:old"].raw_sha256 == digest
    assert b"after the upgrade" in rt.blobs.get(rows[new_key].raw_sha256)
    journal.close()


def test_envelope_text_a_database_refuses_is_stored_cleaned(rt: Runtime) -> None:
    accepted = spool.accept(rt.spool_engine, rt.blobs, b"Subject: x\r\n\r\nhi\r\n", source="smtp",
                            envelope_from="b\udcffd\x00@x.org", envelope_to=("support+\udcff@example.com",))
    with session_scope(rt.engine) as session:
        row = session.get(Inbound, accepted.inbound_id)
        assert row is not None
        assert (row.envelope_from, row.envelope_to) == ("b\ufffdd@x.org", "support+\ufffd@example.com")


def test_a_locked_database_postpones_the_message_without_counting_the_attempt(workdir: Path) -> None:
    """With a database locked longer than busy_timeout while a message is processed, a
    healthy message went to the dead letters after max_attempts tries."""
    import sqlite3
    import threading

    from mailgate.ingest.pipeline import process_one

    config = write_config(workdir, helpdesk_extra="max_attempts = 1")
    config.write_text(config.read_text().replace("[database]\n", "[database]\nbusy_timeout_seconds = 0.5\n"))
    rt = Runtime.build(load_settings(config))
    migrate.upgrade(rt.engine)
    (inbound_id,) = accept_n(rt, 1)
    inbound = spool.claim(rt.engine, "w", max_attempts=1)
    assert inbound is not None
    other = sqlite3.connect(workdir / "mailgate.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another writer (a CLI command, a backup) for 0.8 s
    release = threading.Timer(0.8, lambda: other.execute("ROLLBACK"))
    release.start()
    try:
        result = process_one(rt, inbound)
    finally:
        release.join()
        other.close()
    assert result.outcome == "retry" and "locked" in (result.reason or "")
    with session_scope(rt.engine) as session:
        row = session.get(Inbound, inbound_id)
        assert row is not None
        assert (row.state, row.attempts) == ("queued", 0)


def test_a_pass_that_fails_on_the_database_gives_its_claims_back(rt: Runtime) -> None:
    """The rest of a failed batch stayed claimed for the stale-claim timeout (10 minutes),
    each with an attempt counted; a few short outages made dead letters of them."""
    import asyncio

    from sqlalchemy.exc import OperationalError

    from mailgate.worker import IngestWorker

    ids = accept_n(rt, 3)
    worker = IngestWorker(rt, "host:1")
    stop = asyncio.Event()
    passes: list[int] = []

    def next_messages() -> list:
        passes.append(1)
        if len(passes) == 1:
            assert len(spool.claim_batch(rt.engine, "host:1", max_attempts=5, limit=10)) == 3
            raise OperationalError("BEGIN", {}, Exception("database is locked"))
        stop.set()
        return []

    worker.next_messages = next_messages  # type: ignore[method-assign]
    asyncio.run(worker.process_spool(stop, None))
    with session_scope(rt.engine) as session:
        rows = [session.get(Inbound, i) for i in ids]
        assert [(r.state, r.attempts, r.claimed_by) for r in rows if r] == [("queued", 0, None)] * 3

    # Any other failure of a pass keeps the claims (stale after 10 minutes, attempts counted):
    # a message that breaks recording its own failure must still end as a dead letter.
    stop.clear()
    passes.clear()

    def failing_otherwise() -> list:
        passes.append(1)
        if len(passes) == 1:
            spool.claim_batch(rt.engine, "host:1", max_attempts=5, limit=10)
            raise ValueError("a bug")
        stop.set()
        return []

    worker.next_messages = failing_otherwise  # type: ignore[method-assign]
    asyncio.run(worker.process_spool(stop, None))
    with session_scope(rt.engine) as session:
        assert {(r.state, r.attempts) for i in ids if (r := session.get(Inbound, i))} == {("processing", 1)}


def test_only_errors_of_an_unavailable_database_postpone_a_message() -> None:
    from sqlalchemy.exc import OperationalError

    from mailgate.ingest.pipeline import database_unavailable

    class PgError(Exception):
        def __init__(self, text: str, sqlstate: str | None) -> None:
            super().__init__(text)
            self.sqlstate = sqlstate

    def err(orig: Exception, invalidated: bool = False) -> OperationalError:
        return OperationalError("SELECT 1", {}, orig, connection_invalidated=invalidated)

    assert database_unavailable(err(Exception("database is locked")))
    assert database_unavailable(err(PgError("server closed the connection", None), invalidated=True))
    assert database_unavailable(err(PgError("canceling statement due to lock timeout", "55P03")))
    assert database_unavailable(err(PgError("terminating connection due to administrator command", "57P01")))
    # psycopg's own OperationalError for a query the message made too large: the message's failure
    assert not database_unavailable(err(PgError("number of parameters must be between 0 and 65535", None)))
    assert not database_unavailable(err(Exception("too many SQL variables")))


def test_a_claim_that_went_stale_while_processing_keeps_nothing(rt: Runtime) -> None:
    """Processing outlasted STALE_CLAIM and another worker took the row: the first one's
    ticket and outcome roll back, and the second worker's claim stands."""
    from mailgate.ingest.pipeline import process_one
    from mailgate.store.tables import Ticket

    (inbound_id,) = accept_n(rt, 1)
    slow = spool.claim(rt.engine, "slow:1", max_attempts=5)
    assert slow is not None
    with session_scope(rt.engine) as session:  # ten minutes and more pass
        row = session.get(Inbound, inbound_id)
        assert row is not None
        row.claimed_at = row.next_attempt_at = utcnow() - spool.STALE_CLAIM - spool.timedelta(seconds=1)
        session.add(row)
    fresh = spool.claim(rt.engine, "fresh:2", max_attempts=5)
    assert fresh is not None and fresh.id == inbound_id

    result = process_one(rt, slow)

    assert result.outcome == "lost"
    with session_scope(rt.engine) as session:
        row = session.get(Inbound, inbound_id)
        assert row is not None
        assert (row.state, row.claimed_by, row.attempts, row.outcome) == ("processing", "fresh:2", 2, None)
        assert session.exec(select(Ticket)).all() == []
    assert process_one(rt, fresh).outcome == "ticket"


def test_a_batch_that_finds_the_parse_pool_broken_gives_back_only_its_own_claims(
        rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    # A helper died while idle: nothing of the new batch was parsed, so its attempts come
    # back. Rows an earlier failed pass kept on purpose (they may be what broke it) keep theirs.
    from concurrent.futures.process import BrokenProcessPool

    from mailgate.ingest import pipeline

    kept = accept_n(rt, 1)
    spool.claim_batch(rt.engine, "host:1", max_attempts=5, limit=10)
    fresh = accept_n(rt, 2)

    class BrokenPool:
        def submit(self, rows: list) -> dict:
            raise BrokenProcessPool("a helper died")

    with pytest.raises(BrokenProcessPool):
        pipeline.run_batch(rt, "host:1", ahead=BrokenPool())  # type: ignore[arg-type]
    with session_scope(rt.engine) as session:
        states = {i: (r.state, r.attempts) for i in kept + fresh if (r := session.get(Inbound, i))}
    assert states == {kept[0]: ("processing", 1), fresh[0]: ("queued", 0), fresh[1]: ("queued", 0)}

    # And if giving back fails on the database, the broken pool still reaches the worker.
    def locked(*args: object, **kwargs: object) -> int:
        raise RuntimeError("database is locked")

    monkeypatch.setattr(spool, "give_back_claims", locked)
    with pytest.raises(BrokenProcessPool):
        pipeline.run_batch(rt, "host:1", ahead=BrokenPool())  # type: ignore[arg-type]


def test_a_parse_timeout_mid_batch_gives_back_only_the_rows_behind_it(
        rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses
    from concurrent.futures import Future

    from mailgate.ingest import pipeline

    ids = accept_n(rt, 4)
    monkeypatch.setattr(rt, "settings", dataclasses.replace(
        rt.settings, helpdesk=dataclasses.replace(rt.settings.helpdesk, parse_timeout_seconds=0.2)))

    class StuckOnTheSecond:
        def submit(self, rows: list) -> dict:
            futures: dict = {}
            for position, row in enumerate(rows):
                futures[row.id] = Future()
                if position == 0:  # parsed; the helper then hangs on the second
                    futures[row.id].set_result(pipeline.prepare(rt, rt.blobs.get(row.raw_sha256)))
            return futures

    with pytest.raises(pipeline.ParseTimeout):
        pipeline.run_batch(rt, "host:1", ahead=StuckOnTheSecond())  # type: ignore[arg-type]
    with session_scope(rt.engine) as session:
        rows = [session.get(Inbound, i) for i in ids]
        states = [(r.state, r.attempts) for r in rows if r]
        assert "parsing took longer than 0.2 s" in (rows[1].last_error or "")  # type: ignore[union-attr]
    assert states == [("done", 1), ("queued", 1), ("queued", 0), ("queued", 0)]
