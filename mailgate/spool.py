"""The inbound spool: accept, claim, finish, fail and requeue messages.

Transports hand their bytes to `accept`, which writes them durably (blob
fsynced, then the inbound row committed) before the transport acknowledges
(SMTP on SQLite goes through mailgate.journal first, which ends here too).
Workers `claim` a row (attempts counted at claim time, so a message that kills
the process still uses up its tries), work on it in their own transaction and
`finish` it there; on an exception the driver calls `fail`, which retries with
backoff and after the last attempt keeps the row as a dead letter with its
traceback.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import bindparam, case, or_, true, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from mailgate.domain import envelope_text
from mailgate.store.blobs import BlobStore
from mailgate.store.engine import as_utc, due_ids, session_scope, utcnow
from mailgate.store.tables import Inbound

log = logging.getLogger(__name__)

# The outcome of a message released from the quarantine until the pipeline finishes it
# (mailgate.quarantine.release; the spam step lets it through).
RELEASED = "released"

# A claim older than this belongs to a worker that died; the row is taken again.
STALE_CLAIM = timedelta(minutes=10)
# Inbound.source of `mailgate import` without --notify: old mail brought in as history,
# processed without sending anything and dated by its Date header (pipeline.written_at).
HISTORY_IMPORT = "import"
RETRY_DELAYS = (timedelta(seconds=5), timedelta(seconds=30), timedelta(minutes=2),
                timedelta(minutes=10), timedelta(minutes=30))


class SpoolError(Exception):
    """The message could not be stored: the transport must answer temporary failure."""


@dataclass(frozen=True)
class Accepted:
    inbound_id: int
    duplicate: bool  # the same source_key was accepted before
    claimed: Inbound | None = None  # stored already claimed for processing (accept_batch claimed_by)


class ClaimLost(Exception):
    """The row being finished was claimed again by another worker (see finish)."""


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def holder_is_dead(holder: str | None) -> bool:
    """True if `holder` (a worker_id) is a process on this host that no longer runs."""
    if not holder:
        return False
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's worker: only its claim age can tell
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def release_dead_claims(engine: Engine) -> int:
    """At start: rows left 'processing' by a killed worker on this host go back to the queue
    now rather than after STALE_CLAIM. Their attempt already counts."""
    released = 0
    with session_scope(engine) as session:
        for row in session.exec(select(Inbound).where(Inbound.state == "processing")).all():
            if holder_is_dead(row.claimed_by):
                row.state, row.claimed_by = "queued", None
                session.add(row)
                released += 1
    if released:
        log.warning("%d message(s) left in processing by a killed worker were queued again", released)
    return released


def give_back_claims(engine: Engine, worker: str, ids: Sequence[int] | None = None) -> int:
    """Rows this worker holds in 'processing' (of `ids`, if given) go back to the queue with
    their attempt given back: its pass failed on the database (a lock, an outage), or on a
    parse helper, not on the messages."""
    if ids is not None and not ids:
        return 0
    only = Inbound.id.in_(ids) if ids is not None else true()  # type: ignore[union-attr]
    with session_scope(engine) as session:
        given = session.exec(update(Inbound).where(  # type: ignore[call-overload]
            only, Inbound.state == "processing", Inbound.claimed_by == worker).values(
            state="queued", claimed_by=None, next_attempt_at=utcnow(),
            attempts=case((Inbound.attempts > 0, Inbound.attempts - 1), else_=0)))
        return int(given.rowcount or 0)


def body_hash(raw: bytes) -> str:
    """Hash of the body after the header block: re-deliveries differ only in headers."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = raw.find(sep)
        if i >= 0:
            body = raw[i + len(sep):]
            break
    else:
        body = b""
    normalised = b"\n".join(line.rstrip() for line in body.replace(b"\r\n", b"\n").split(b"\n"))
    return hashlib.sha256(normalised.strip()).hexdigest()


def accept(engine: Engine, blobs: BlobStore, raw: bytes, *, source: str,
           queue: str | None = None, envelope_from: str | None = None,
           envelope_to: tuple[str, ...] = (), source_key: str | None = None) -> Accepted:
    """Store the raw bytes durably. Raises SpoolError if that was not possible."""
    try:
        digest = blobs.put(raw)
        with session_scope(engine) as session:
            if source_key is not None:
                existing = session.exec(select(Inbound.id).where(Inbound.source_key == source_key)).first()
                if existing is not None:
                    return Accepted(existing, duplicate=True)
            row = Inbound(
                source=source, source_key=source_key,
                envelope_from=envelope_text(envelope_from) if envelope_from is not None else None,
                envelope_to=",".join(envelope_text(t) for t in envelope_to),
                queue=envelope_text(queue) if queue is not None else None, raw_sha256=digest,
                size=len(raw), received_at=utcnow(),
            )
            session.add(row)
            session.flush()
            assert row.id is not None
            return Accepted(row.id, duplicate=False)
    except IntegrityError:
        # Two pollers raced on the same source_key: the other one stored it.
        with session_scope(engine) as session:
            existing = session.exec(select(Inbound.id).where(Inbound.source_key == source_key)).first()
        if existing is not None:
            return Accepted(existing, duplicate=True)
        raise SpoolError("could not store message") from None
    except Exception as exc:
        log.error("spool accept failed: %s: %s", type(exc).__name__, exc)
        raise SpoolError("could not store message") from exc


def accept_batch(engine: Engine, blobs: BlobStore, items: Sequence[tuple[str, bytes]], *, source: str,
                 queue: str | None = None, claimed_by: str | None = None) -> list[Accepted]:
    """`accept` for several keyed messages (an IMAP batch: (source_key, raw) each) in one
    commit: on SQLite a poller that committed per message waited for the database's write
    lock once per message behind the work process. All or nothing; raises SpoolError.

    claimed_by (a worker_id): new rows are stored already claimed by it, as `claim` would,
    so that it processes them in order (`mailgate import`) and a daemon's worker does not
    take some of them first. Messages stored one at a time after a key conflict are not.

    queue (an IMAP account's, `import --queue`) is also each message's envelope recipient,
    as `ingest --queue` stores it: a mailbox that only the comment address reaches gets
    notes Bcc'd to it, and without a Delivered-To header nothing else says they were."""
    if not items:
        return []
    envelope_to = envelope_text(queue) if queue is not None else ""
    now = utcnow()
    claim: dict[str, object] = {} if claimed_by is None else {
        "state": "processing", "claimed_by": claimed_by, "claimed_at": now, "next_attempt_at": now, "attempts": 1}
    try:
        digests = blobs.put_many([raw for _, raw in items])
        with session_scope(engine) as session:
            keys = [key for key, _ in items]
            existing = dict(session.exec(select(Inbound.source_key, Inbound.id).where(
                Inbound.source_key.in_(keys))).all())  # type: ignore[union-attr]
            rows: list[Inbound | int] = []
            for (key, raw), digest in zip(items, digests, strict=True):
                if key in existing:
                    rows.append(existing[key])
                    continue
                row = Inbound(source=source, source_key=key, envelope_to=envelope_to, queue=queue,
                              raw_sha256=digest, size=len(raw), received_at=now, **claim)
                session.add(row)
                rows.append(row)
            session.flush()
            return [Accepted(r, duplicate=True) if isinstance(r, int)
                    else Accepted(r.id or 0, duplicate=False, claimed=r if claimed_by else None) for r in rows]
    except IntegrityError:
        # Another instance's poller stored some of them meanwhile: one at a time, it sorts out.
        return [accept(engine, blobs, raw, source=source, queue=queue, source_key=key,
                       envelope_to=(queue,) if queue is not None else ()) for key, raw in items]
    except Exception as exc:
        log.error("spool accept failed: %s: %s", type(exc).__name__, exc)
        raise SpoolError("could not store message") from exc


def claim(engine: Engine, worker: str, *, max_attempts: int, only_id: int | None = None) -> Inbound | None:
    """Take one due inbound row for processing, or None if there is none."""
    rows = claim_batch(engine, worker, max_attempts=max_attempts, limit=1, only_id=only_id)
    return rows[0] if rows else None


def claim_batch(engine: Engine, worker: str, *, max_attempts: int, limit: int,
                only_id: int | None = None) -> list[Inbound]:
    """Take up to `limit` due rows in one commit (a deep queue costs one claim per batch).
    Only rows never tried before are batched; a row tried before is claimed alone."""
    now = utcnow()
    claimed: list[Inbound] = []
    with session_scope(engine) as session:
        cut = now - STALE_CLAIM
        only = (Inbound.id == only_id) if only_id is not None else true()
        ids = due_ids(session, engine, Inbound.id, [  # type: ignore[arg-type]
            only & (Inbound.state == "queued") & or_(Inbound.next_attempt_at.is_(None),  # type: ignore[union-attr]
                                                     Inbound.next_attempt_at <= now),  # type: ignore[operator]
            # A claim sets next_attempt_at to its time; None: claimed by an older version.
            only & (Inbound.state == "processing") & or_(Inbound.next_attempt_at.is_(None),  # type: ignore[union-attr]
                                                         Inbound.next_attempt_at <= cut),  # type: ignore[operator]
        ], limit)
        rows = list(session.exec(select(Inbound).where(Inbound.id.in_(ids))  # type: ignore[union-attr]
                                 .order_by(Inbound.id)).all()) if ids else []  # type: ignore[arg-type]
        rows = [r for r in rows if r.state == "queued" or r.next_attempt_at is not None
                or (r.claimed_at is not None and as_utc(r.claimed_at) < cut)]
        # A row tried before (perhaps a worker died on it) is claimed alone, so that if it
        # kills the worker again it does not take the attempts of nine innocent messages with it.
        tried_before = bool(rows) and rows[0].attempts > 0
        rows = rows[:1] if tried_before else [r for r in rows if r.attempts == 0]
        for row in rows:
            if row.attempts >= max_attempts:
                # It was claimed max_attempts times and never finished: the process died
                # on it each time. Keep it aside instead of crashing again.
                row.state = "dead"
                row.outcome = dead_outcome(row.outcome)
                row.last_error = (row.last_error or "") + (
                    f"\nworker died while processing it {row.attempts} times")
                log.error("inbound %s: dead letter after %s attempts", row.id, row.attempts)
            else:
                row.state = "processing"
                row.claimed_by = worker
                row.claimed_at = row.next_attempt_at = now
                row.attempts += 1
                claimed.append(row)
            session.add(row)
    return claimed


def dead_outcome(outcome: str | None) -> str:
    """A dead letter's outcome: 'dead', except that a message released from the quarantine
    stays 'released'. That mark is all that keeps the spam step from holding it again when
    it is retried (`deadletter retry`), and a message held again would be purged by the
    date it was first received, unlisted."""
    return RELEASED if outcome == RELEASED else "dead"


_INBOUND = Inbound.__table__  # type: ignore[attr-defined]
# Built once: building and compiling an UPDATE cost more than SQLite took to run it.
_FINISH = update(_INBOUND).where(
    _INBOUND.c.id == bindparam("inbound_id"), _INBOUND.c.state == "processing",
    _INBOUND.c.claimed_by == bindparam("claim_holder"), _INBOUND.c.attempts == bindparam("claim_attempts"),
).values(
    state="done", last_error=None, **{name: bindparam(name) for name in (
        "outcome", "ticket_number", "processed_at", "rule_hits", "spam_score", "body_hash",
        "message_id_header", "subject", "from_addr")})


def finish(session: Session, inbound: Inbound, *, outcome: str, ticket_number: int | None = None,
           rule_hits: str = "[]", spam_score: float | None = None, body_hash: str | None = None,
           message_id_header: str | None = None, subject: str | None = None,
           from_addr: str | None = None) -> None:
    """Mark done inside the processing transaction, so the outcome and its effects commit together.

    Raises ClaimLost, and so rolls the effects back, where the row is no longer this claim's:
    processing outlasted STALE_CLAIM and another worker claimed it again."""
    # One UPDATE: the claimed row belongs to the claim's session, and loading it again here
    # would cost a SELECT per message. A Core statement: the ORM's bulk UPDATE machinery
    # costs several times what SQLite does, and no object in this session is this row.
    done = session.connection().execute(_FINISH, {
        "inbound_id": inbound.id, "claim_holder": inbound.claimed_by, "claim_attempts": inbound.attempts,
        "outcome": outcome, "ticket_number": ticket_number,
        "processed_at": utcnow(), "rule_hits": rule_hits, "spam_score": spam_score, "body_hash": body_hash,
        "message_id_header": message_id_header, "subject": subject, "from_addr": from_addr})
    if done.rowcount != 1:
        raise ClaimLost(f"inbound {inbound.id} was claimed again by another worker while this one processed it")


def _stored_error(error: str) -> str:
    """The end of a failure's text, as a row keeps it: a traceback can quote the message's
    bytes, and PostgreSQL text cannot hold NUL."""
    return error[-20000:].replace("\x00", "\\x00")


def fail(engine: Engine, inbound_id: int, error: str, *, max_attempts: int,
         permanent: bool = False, **fields: object) -> bool:
    """Record a failed attempt (and header fields for the listing). True if now a dead letter."""
    with session_scope(engine) as session:
        row = session.get(Inbound, inbound_id)
        if row is None:
            return False
        row.last_error = _stored_error(error)
        for key, value in fields.items():
            setattr(row, key, value)
        if permanent or row.attempts >= max_attempts:
            row.state = "dead"
            row.outcome = dead_outcome(row.outcome)
        else:
            row.state = "queued"
            delay = RETRY_DELAYS[min(row.attempts - 1, len(RETRY_DELAYS) - 1)]
            row.next_attempt_at = utcnow() + delay
        row.claimed_by = None
        session.add(row)
        return row.state == "dead"


def postpone(engine: Engine, inbound_id: int, error: str, delay: timedelta) -> None:
    """The database, not the message, failed (locked, restarting, unreachable): queue the
    row again in `delay` and give back the attempt its claim counted, so that an outage
    never turns healthy mail into dead letters."""
    with session_scope(engine) as session:
        row = session.get(Inbound, inbound_id)
        if row is None:
            return
        row.last_error = _stored_error(error)
        row.state, row.claimed_by = "queued", None
        row.attempts = max(0, row.attempts - 1)
        row.next_attempt_at = utcnow() + delay
        session.add(row)


def requeue(engine: Engine, ids: list[int] | None = None) -> list[int]:
    """Put dead letters back in the queue with fresh attempts (all of them if ids is None);
    the ids of those requeued."""
    with session_scope(engine) as session:
        query = select(Inbound.id).where(Inbound.state == "dead")
        stmt = update(Inbound).where(Inbound.state == "dead")  # type: ignore[arg-type]
        if ids:
            # Only the ids named; all of them otherwise, by state alone: a list of every dead
            # id would pass PostgreSQL's 65,535 parameters.
            query = query.where(Inbound.id.in_(ids))  # type: ignore[union-attr]
            stmt = stmt.where(Inbound.id.in_(ids))  # type: ignore[union-attr]
        dead = [i for i in session.exec(query).all() if i is not None]
        session.exec(stmt.values(  # type: ignore[call-overload]
            state="queued", attempts=0, next_attempt_at=None, claimed_by=None,
            outcome=case((Inbound.outcome == RELEASED, RELEASED), else_=None)))
        return dead


def state_of(engine: Engine, inbound_id: int) -> tuple[str | None, str | None]:
    with session_scope(engine) as session:
        row = session.get(Inbound, inbound_id)
        return (row.state, row.outcome) if row else (None, None)


def progress_of(engine: Engine, ids: list[int]) -> dict[int, tuple[str, str | None, bool]]:
    """(state, outcome, retry scheduled) for each of these inbound rows, in one query."""
    with session_scope(engine) as session:
        rows = session.exec(select(Inbound.id, Inbound.state, Inbound.outcome, Inbound.attempts,
                                   Inbound.next_attempt_at).where(Inbound.id.in_(ids))).all()  # type: ignore[union-attr]
    return {i: (state, outcome, attempts > 0 and nxt is not None) for i, state, outcome, attempts, nxt in rows}
