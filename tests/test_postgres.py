"""Several daemon instances on one PostgreSQL database: nothing processed or sent twice.

Needs MAILGATE_TEST_POSTGRES_URL (CI sets it), e.g.
postgresql+psycopg://postgres@127.0.0.1:5432/test. Each test makes its own database.
"""

from __future__ import annotations

import itertools
import os
import string
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    cli,
    cli_json,
    free_port,
    mail,
    need,
    query_json,
    sent_messages,
    start_daemon,
    ticket_with_first_message,
    wait_until,
    write_config,
)
from tests.test_loop_guard_e2e import check_new_ticket_cap_per_mailbox

pytestmark = pytest.mark.e2e


@pytest.fixture
def pg_url() -> Iterator[str]:
    base = os.environ.get("MAILGATE_TEST_POSTGRES_URL")
    need(bool(base), "MAILGATE_TEST_POSTGRES_URL is not set")
    import sqlalchemy

    name = f"mg_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sqlalchemy.exc.OperationalError as exc:
        need(False, f"PostgreSQL not reachable at {base}: {exc.orig}")
    url = base.rsplit("/", 1)[0] + "/" + name
    yield url
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def test_two_instances_share_the_work_exactly_once(pg_url: str, workdir: Path) -> None:
    # Two daemons as on two machines: one database, a shared data_dir (raw mail must be
    # readable by whichever instance claims it), one outgoing maildir, two listeners.
    shared = workdir / "shared"
    cfg_a = write_config(workdir / "a", database=pg_url, outbound=f"maildir:{shared}/sent")
    cfg_b = write_config(workdir / "b", database=pg_url, outbound=f"maildir:{shared}/sent")
    for cfg in (cfg_a, cfg_b):
        cfg.write_text(cfg.read_text().replace('data_dir = "data"', f'data_dir = "{shared}/data"'))
    cli(cfg_a, "db", "upgrade")
    a = start_daemon(cfg_a)
    b = start_daemon(cfg_b, port=None)
    try:
        n = 40
        errors: list[BaseException] = []

        def send(daemon, start: int) -> None:  # type: ignore[no-untyped-def]
            try:
                for i in range(start, n, 2):
                    daemon.send(mail(sender=f"user{i}@customer{i}.org", subject=f"Problem {i}",
                                     message_id=f"<p{i}@customer.org>"))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=send, args=(d, s)) for d, s in ((a, 0), (b, 1))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        maildir = shared / "sent"
        # each ticket: one confirmation + one notice to each of the two agents
        wait_until(lambda: len(sent_messages(maildir)) >= 3 * n, timeout=90)
        tickets = cli_json(cfg_a, "tickets", "list")
        assert len(tickets) == n
        assert sorted(t["subject"] for t in tickets) == sorted(f"Problem {i}" for i in range(n))
        out = cli_json(cfg_a, "outbox", "list", "--limit", "1000")
        assert len(out) == 3 * n and all(r["state"] == "sent" for r in out)
        sent = sent_messages(maildir)
        ids = [m["Message-ID"] for m in sent]
        assert len(ids) == 3 * n and len(set(ids)) == 3 * n  # nothing sent twice
        # the same message delivered to both instances is still one ticket
        twice = mail(sender="dup@customer.org", subject="Twice", message_id="<twice@customer.org>")
        a.send(twice)
        b.send(twice)
        wait_until(lambda: len(query_json(cfg_a, "tickets", "list", "--requester", "dup@customer.org")) == 1)
        wait_until(lambda: len(query_json(cfg_a, "tickets", "list")) == n + 1)
    finally:
        a.stop()
        b.stop()


def test_import_and_tickets_on_postgres(pg_url: str, workdir: Path) -> None:
    cfg = write_config(workdir, database=pg_url, smtp_port=free_port())
    proc = cli(cfg, "ingest", input=mail(subject="on postgres").as_bytes())
    number = int(proc.stdout.decode().strip())
    shown = cli_json(cfg, "tickets", "show", str(number))
    assert shown["subject"] == "on postgres" and shown["created_at"].endswith("Z")
    assert [m["kind"] for m in shown["messages"]] == ["public", "system"]


def test_the_new_ticket_cap_counts_plus_addresses_on_postgres(pg_url: str, workdir: Path) -> None:
    # The count is a LIKE with an ESCAPE clause: the same matches on both databases.
    check_new_ticket_cap_per_mailbox(write_config(
        workdir, database=pg_url, smtp_port=free_port(), helpdesk_extra="new_tickets_per_sender_per_hour = 2"))


def test_a_release_during_the_purge_keeps_the_message(pg_url: str, workdir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL runs a release between the purge's SELECT and its UPDATE (SQLite's
    BEGIN IMMEDIATE serialises them). The released row must keep its outcome and raw bytes,
    and become a ticket."""
    from datetime import timedelta

    from mailgate import jobs
    from mailgate.config import load_settings
    from mailgate.ingest.pipeline import run_one
    from mailgate.quarantine import release
    from mailgate.runtime import Runtime
    from mailgate.store import migrate
    from mailgate.store.engine import session_scope, utcnow
    from mailgate.store.tables import Inbound

    rt = Runtime.build(load_settings(write_config(workdir, database=pg_url, spam_enabled=True)))
    migrate.upgrade(rt.engine)
    raw = mail(subject="false positive", body="Please call me about my order.").as_bytes()
    digest = rt.blobs.put(raw)
    with session_scope(rt.engine) as session:
        row = Inbound(source="smtp", raw_sha256=digest, received_at=utcnow() - timedelta(days=40),
                      state="done", outcome="quarantined", spam_score=0.95, subject="false positive")
        session.add(row)
        session.flush()
        inbound_id = row.id
    assert inbound_id is not None

    real_update = jobs.update
    released: list[bool] = []

    def release_first(*args: object, **kwargs: object) -> object:
        released.append(release(rt, inbound_id).ok)  # another session, committed before the UPDATE
        return real_update(*args, **kwargs)

    monkeypatch.setattr(jobs, "update", release_first)
    monkeypatch.setattr(jobs, "BLOB_IDLE_SECONDS", 0)  # the file is new; would be old after 40 days
    assert jobs.purge_quarantine(rt) == 0
    assert released == [True]
    assert rt.blobs.get(digest) == raw
    result = run_one(rt, "test-worker", only_id=inbound_id)
    assert result is not None and result.ticket_number is not None
    with session_scope(rt.engine) as session:
        assert session.get(Inbound, inbound_id).outcome == "ticket"  # type: ignore[union-attr]


def test_imap_positions_up_to_2_to_the_32_fit_on_postgres(pg_url: str) -> None:
    """UIDVALIDITY and UIDs are 32-bit unsigned (RFC 3501): 4294967295 did not fit an integer."""
    from sqlmodel import select

    from mailgate.store import migrate
    from mailgate.store.engine import make_engine, session_scope
    from mailgate.store.tables import ImapState

    engine = make_engine(pg_url)
    migrate.upgrade(engine, "0004")
    migrate.upgrade(engine)  # from a database made before
    with session_scope(engine) as session:
        session.add(ImapState(account="inbox", uidvalidity=2**32 - 1, last_uid=2**32 - 1))
    with session_scope(engine) as session:
        row = session.exec(select(ImapState)).one()
        assert (row.uidvalidity, row.last_uid) == (2**32 - 1, 2**32 - 1)
    engine.dispose()


def test_a_row_another_instance_takes_over_is_not_failed_for_its_deadline(pg_url: str) -> None:
    """Between the deadline check's SELECT and its UPDATE, another instance takes over a
    stale claim (PostgreSQL, READ COMMITTED): the row is theirs to send and record; failing
    it here would record a failure for mail that may be on its way."""
    from datetime import timedelta

    from sqlalchemy import event, update

    from mailgate import outbox
    from mailgate.store import migrate
    from mailgate.store.engine import make_engine, session_scope, utcnow
    from mailgate.store.tables import Outbox

    engine = make_engine(pg_url)
    migrate.upgrade(engine)
    now = utcnow()
    with session_scope(engine) as session:
        row = Outbox(message_id="late@example.com", template="t", mail_from="support@example.com",
                     recipients="a@example.org", raw=b"x", state="sending", attempts=1, claimed_by="dead",
                     next_attempt_at=now - outbox.STALE_SENDING - timedelta(minutes=1),
                     deadline=now - outbox.DEADLINE_GRACE - timedelta(minutes=1), created_at=now)
        session.add(row)
        session.flush()
        row_id = row.id
    assert row_id is not None

    taken: list[int] = []
    other_instance = make_engine(pg_url)

    def take_over_after_the_select(conn: object, cursor: object, statement: str, *args: object) -> None:
        if taken or not (statement.startswith("SELECT") and "%(stale)s" in statement):
            return
        with session_scope(other_instance) as other:  # its claim, committed before our UPDATE
            taken.append(other.connection().execute(update(Outbox).where(Outbox.id == row_id).values(
                claimed_by="other", next_attempt_at=utcnow(), attempts=Outbox.attempts + 1)).rowcount)

    event.listen(engine, "after_cursor_execute", take_over_after_the_select)
    outbox.claim_due(engine, "this")
    assert taken == [1]
    with session_scope(engine) as session:
        after = session.get(Outbox, row_id)
        assert after is not None
        assert (after.state, after.claimed_by, after.attempts) == ("sending", "other", 2)
    engine.dispose()
    other_instance.dispose()


def test_a_copy_of_held_spam_accepted_during_the_purge_is_no_copy_left_behind(
        pg_url: str, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The purge holds the Message-IDs' locks that step_dedupe takes: a copy being processed
    meanwhile waits, then finds its mail purged and is no copy. Without that it could read
    the mail as held before the purge committed, and commit as a `duplicate` after the
    purge had looked for copies: kept for good, raw bytes and all."""
    from datetime import timedelta

    from mailgate import jobs, spool
    from mailgate.config import load_settings
    from mailgate.ingest.pipeline import run_one
    from mailgate.runtime import Runtime
    from mailgate.store import migrate
    from mailgate.store.engine import session_scope, utcnow
    from mailgate.store.tables import Inbound

    rt = Runtime.build(load_settings(write_config(workdir, database=pg_url, spam_enabled=True)))
    migrate.upgrade(rt.engine)
    raw = mail(subject="Cheap pills", message_id="<s1@spam.example>").as_bytes()
    with session_scope(rt.engine) as session:
        session.add(Inbound(source="smtp", raw_sha256=rt.blobs.put(raw), received_at=utcnow() - timedelta(days=40),
                            state="done", outcome="quarantined", message_id_header="s1@spam.example",
                            body_hash=spool.body_hash(raw)))
    copy = spool.accept(rt.engine, rt.blobs, b"Received: from x by y; later\r\n" + raw, source="smtp")
    real_lock = jobs.lock_message_ids
    waiting: list[bool] = []
    processing: list[threading.Thread] = []

    def copy_arrives_meanwhile(session: object, engine: object, mids: list[str]) -> None:
        real_lock(session, engine, mids)  # type: ignore[arg-type]
        worker = threading.Thread(target=run_one, args=(rt, "other-worker"), kwargs={"only_id": copy.inbound_id})
        worker.start()
        worker.join(2)
        waiting.append(worker.is_alive())  # at the Message-ID's lock, until the purge commits
        processing.append(worker)

    monkeypatch.setattr(jobs, "lock_message_ids", copy_arrives_meanwhile)
    assert jobs.purge_quarantine(rt) == 1
    processing[0].join(60)
    assert waiting == [True] and not processing[0].is_alive()
    with session_scope(rt.engine) as session:
        row = session.get(Inbound, copy.inbound_id)
        assert row is not None and row.state == "done" and row.outcome not in ("duplicate", None)
        assert rt.blobs.path_for(row.raw_sha256).exists()  # what it became keeps its bytes


def test_a_purge_that_fails_midway_leaves_no_raw_file_behind(
        pg_url: str, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks commit one by one, and no later run finds a purged row again: the files of
    the chunks done must go before a later one fails (here at a Message-ID lock that an
    ingest holds past lock_timeout)."""
    from datetime import timedelta

    from sqlalchemy import text

    from mailgate import jobs, spool
    from mailgate.config import load_settings
    from mailgate.runtime import Runtime
    from mailgate.store import migrate
    from mailgate.store.engine import make_engine, session_scope, utcnow
    from mailgate.store.tables import Inbound

    rt = Runtime.build(load_settings(write_config(workdir, database=pg_url, spam_enabled=True)))
    migrate.upgrade(rt.engine)
    object.__setattr__(rt, "engine", make_engine(pg_url, busy_timeout=1))  # lock_timeout 1 s
    monkeypatch.setattr(jobs, "PURGE_CHUNK", 2)
    long_ago = utcnow().timestamp() - 40 * 86400
    digests = []
    with session_scope(rt.engine) as session:
        for i in range(4):
            raw = mail(subject=f"spam {i}", message_id=f"<s{i}@spam.example>").as_bytes()
            digests.append(rt.blobs.put(raw))
            os.utime(rt.blobs.path_for(digests[-1]), (long_ago, long_ago))
            session.add(Inbound(source="smtp", raw_sha256=digests[-1], received_at=utcnow() - timedelta(days=40),
                                state="done", outcome="quarantined", message_id_header=f"s{i}@spam.example",
                                body_hash=spool.body_hash(raw)))
    ingest = make_engine(pg_url)
    with ingest.connect() as other, other.begin():  # a slow ingest of the mail in the second chunk
        other.execute(text("SELECT pg_advisory_xact_lock(hashtextextended('s3@spam.example', 0))"))
        with pytest.raises(Exception, match="lock timeout"):
            jobs.purge_quarantine(rt)
        assert [rt.blobs.path_for(d).exists() for d in digests] == [False, False, True, True]
    assert jobs.purge_quarantine(rt) == 2
    assert not any(rt.blobs.path_for(d).exists() for d in digests)
    ingest.dispose()
    rt.engine.dispose()


def test_a_purge_backlog_over_the_parameter_limit(pg_url: str, workdir: Path) -> None:
    """psycopg takes at most 65,535 parameters a statement: a backlog of more (a daemon down
    for weeks, retention_days lowered) failed every hourly run, and so never shrank."""
    from datetime import timedelta

    from sqlalchemy import insert

    from mailgate import jobs
    from mailgate.config import load_settings
    from mailgate.runtime import Runtime
    from mailgate.store import migrate
    from mailgate.store.engine import session_scope, utcnow
    from mailgate.store.tables import Inbound

    rt = Runtime.build(load_settings(write_config(workdir, database=pg_url, spam_enabled=True)))
    migrate.upgrade(rt.engine)
    old, n = utcnow() - timedelta(days=31), 66_000
    with session_scope(rt.engine) as session:
        session.connection().execute(insert(Inbound.__table__), [  # type: ignore[attr-defined]
            {"source": "smtp", "raw_sha256": f"{i:064x}", "received_at": old, "state": "done",
             "outcome": "quarantined", "message_id_header": f"m{i}@spam.example", "body_hash": "h", "size": 1,
             "attempts": 0, "envelope_to": ""} for i in range(n)])
        session.connection().exec_driver_sql("ANALYZE inbound")  # as autovacuum would have by then
    assert jobs.purge_quarantine(rt) == n


def test_two_instances_send_one_quarantine_digest(pg_url: str, workdir: Path) -> None:
    from sqlmodel import select

    from mailgate import jobs
    from mailgate.config import load_settings
    from mailgate.runtime import Runtime
    from mailgate.store import migrate
    from mailgate.store.engine import session_scope, utcnow
    from mailgate.store.tables import Inbound, Outbox

    rt = Runtime.build(load_settings(write_config(workdir, database=pg_url, spam_enabled=True)))
    migrate.upgrade(rt.engine)
    with session_scope(rt.engine) as session:
        for i in range(5):
            session.add(Inbound(source="smtp", raw_sha256="0" * 64, received_at=utcnow(), state="done",
                                outcome="quarantined", spam_score=0.95, subject=f"held {i}"))
    start = threading.Barrier(4)

    def instance(holder: str) -> None:
        start.wait()
        jobs.run_job(rt, holder, "quarantine-digest")

    threads = [threading.Thread(target=instance, args=(f"host{i}:1",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with session_scope(rt.engine) as session:
        digests = session.exec(select(Outbox).where(Outbox.template == jobs.DIGEST_TEMPLATE)).all()
        assert [d.recipients for d in digests] == ["alice@example.com"]
        assert all(r.reported_at is not None for r in session.exec(select(Inbound)).all())


def test_two_instances_reopening_a_spam_ticket_teach_the_filter_once(pg_url: str, workdir: Path) -> None:
    from sqlmodel import select

    from mailgate.admin import update_ticket
    from mailgate.config import load_settings
    from mailgate.ingest.apply import add_event
    from mailgate.runtime import Runtime
    from mailgate.store import migrate
    from mailgate.store.engine import session_scope
    from mailgate.store.tables import Event, Ticket

    settings = load_settings(write_config(workdir, database=pg_url, spam_enabled=True))
    rt = Runtime.build(settings)
    migrate.upgrade(rt.engine)
    number = ticket_with_first_message(rt, mail().as_bytes(), status="closed", from_spam=True)
    with session_scope(rt.engine) as session:
        add_event(session, session.get(Ticket, number), "alice@example.com", "spam", None, "learned")  # type: ignore[arg-type]
    lessons: list[bool] = []
    instances = [Runtime.build(settings) for _ in range(4)]  # as on four machines: own engines
    start = threading.Barrier(len(instances))

    def reopen(instance: Runtime) -> None:
        instance.learn_spam = lambda raw, is_spam: lessons.append(is_spam) or True  # type: ignore[method-assign]
        start.wait()
        update_ticket(instance, number, status="open", actor="cli")

    threads = [threading.Thread(target=reopen, args=(i,)) for i in instances]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert lessons == [False]
    with session_scope(rt.engine) as session:
        undone = session.exec(select(Event).where(Event.ticket_id == number, Event.action == "not spam")).all()
        assert len(undone) == 1 and session.get(Ticket, number).from_spam is False  # type: ignore[union-attr]


def test_hostile_values_become_tickets_or_dead_letters_on_postgres(pg_url: str, workdir: Path) -> None:
    """PostgreSQL refuses NUL in text and numbers beyond its 32-bit integer; neither may
    turn a message into a failure that is retried instead of a ticket or a dead letter."""
    cfg = write_config(workdir, database=pg_url, smtp_port=free_port())
    two_froms = (b"From: x <a\x00b@cust.example>\r\nFrom: y@cust.example\r\nTo: support@example.com\r\n"
                 b"Subject: two froms\r\nMessage-ID: <nul\x00@cust.example>\r\n\r\nbody\r\n")
    proc = cli(cfg, "ingest", input=two_froms, check=False)
    assert proc.returncode == 65, proc.stderr
    (dead,) = cli_json(cfg, "deadletter", "list")
    assert "more than one From header" in dead["reason"] and "\x00" not in dead["from"]

    # 70,000 ids in References and In-Reply-To: a query with one parameter per id failed
    # (PostgreSQL takes 65,535), as a lost connection would, so it was postponed forever.
    alphabet = string.ascii_letters + string.digits
    ids = "".join(f"<{a}{b}{c}>" for a, b, c in itertools.islice(itertools.product(alphabet, repeat=3), 70_000))
    threads = (f"From: frank@cust.example\r\nTo: support@example.com\r\nSubject: many ids\r\n"
               f"References: {ids[:250_000]}\r\nIn-Reply-To: {ids[250_000:]}\r\n"  # each under 256 KB
               "Message-ID: <many@cust.example>\r\n\r\nhello\r\n").encode()
    proc = cli(cfg, "ingest", input=threads, check=False)
    assert proc.returncode == 0 and proc.stdout.strip().isdigit(), proc.stderr

    huge = mail(sender="erin@cust.example", to="support+99999999999-abcdabcdabcd@example.com",
                subject="Re: [EXAMPLE #999999999999] hello")
    proc = cli(cfg, "ingest", input=bytes(huge), check=False)
    assert proc.returncode == 0, proc.stderr
    shown = cli_json(cfg, "tickets", "show", proc.stdout.decode().strip())
    assert shown["requester"] == "erin@cust.example"
