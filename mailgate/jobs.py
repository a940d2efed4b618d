"""Scheduled passes. Each takes a lease first, so with several daemon
instances on one database a pass runs on one of them at a time."""

from __future__ import annotations

import logging
import random
from datetime import timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import func, or_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from mailgate.domain import QUARANTINE_REPLY_NUMBER, one_line
from mailgate.runtime import Runtime
from mailgate.spool import holder_is_dead
from mailgate.store.engine import as_utc, iso, lock_message_ids, session_scope, utcnow
from mailgate.store.tables import Attachment, Inbound, Lease, Message, Outbox, Ticket

log = logging.getLogger(__name__)


def take_lease(rt: Runtime, name: str, holder: str, ttl: timedelta) -> bool:
    """True if `holder` now holds the lease `name` (fresh, renewed, or taken over after expiry)."""
    now = utcnow()
    try:
        with session_scope(rt.engine) as session:
            lease = session.get(Lease, name, with_for_update=True)
            if lease is None:
                session.add(Lease(name=name, holder=holder, expires_at=now + ttl))
                return True
            if lease.holder != holder and as_utc(lease.expires_at) > now and not holder_is_dead(lease.holder):
                return False
            lease.holder, lease.expires_at = holder, now + ttl
            session.add(lease)
            return True
    except IntegrityError:  # another instance inserted it first
        return False


def drop_lease(rt: Runtime, name: str, holder: str) -> None:
    """On a clean stop, so that another instance (or our restart) need not wait for expiry."""
    with session_scope(rt.engine) as session:
        lease = session.get(Lease, name)
        if lease is not None and lease.holder == holder:
            session.delete(lease)


# A blob stored or reused this recently may belong to a message still being accepted.
BLOB_IDLE_SECONDS = 3600.0


PURGE_CHUNK = 500  # rows per transaction: a backlog of any size, under every parameter limit


def purge_quarantine(rt: Runtime) -> int:
    """Quarantined messages older than spam.retention_days are dropped from the listing, and
    their raw bytes from the blob store unless another row still names the same content.
    So are later deliveries of them (`duplicate`): the listener writes a Received line
    into each, so each has a raw file of its own, which retention must not outlive."""
    cutoff = utcnow() - timedelta(days=rt.settings.spam.retention_days)
    with session_scope(rt.engine) as session:
        expired = list(session.exec(select(Inbound.id).where(
            Inbound.outcome == "quarantined", Inbound.received_at < cutoff)).all())
    purged = copies = removed = 0
    for start in range(0, len(expired), PURGE_CHUNK):
        with session_scope(rt.engine) as session:
            ids = expired[start:start + PURGE_CHUNK]
            # Still quarantined: a release between the SELECT and here keeps its row and bytes
            # (PostgreSQL runs the two at once; the raw file of a released row is named below).
            session.exec(update(Inbound).where(  # type: ignore[call-overload]
                Inbound.id.in_(ids), Inbound.outcome == "quarantined").values(outcome="purged"))  # type: ignore[union-attr]
            held = session.exec(select(Inbound.id, Inbound.raw_sha256, Inbound.message_id_header,
                                       Inbound.body_hash).where(
                Inbound.id.in_(ids), Inbound.outcome == "purged")).all()  # type: ignore[union-attr]
            copied = _purge_copies(rt, session, {(mid, body) for _, _, mid, body in held if mid})
        # Each chunk's files once it is committed: a later chunk that fails (a lock timeout,
        # a stop) must not leave them behind, as no later run finds purged rows again.
        removed += _remove_unnamed_files(rt, {digest for _, digest, *_ in (*held, *copied)})
        purged += len(held)
        copies += len(copied)
    if purged or copies:
        log.info("purged %d quarantined message(s) and %d later copies of them, %d raw file(s) removed",
                 purged, copies, removed)
    return purged


def _remove_unnamed_files(rt: Runtime, digests: set[str]) -> int:
    """Remove the raw files that no row needs any more; how many were removed."""
    removed = 0
    ordered = sorted(digests)
    for start in range(0, len(ordered), 500):
        chunk = ordered[start:start + 500]
        with session_scope(rt.engine) as session:
            named = set(session.exec(select(Inbound.raw_sha256).where(
                Inbound.raw_sha256.in_(chunk),  # type: ignore[attr-defined]
                # A copy ('duplicate') of mail no longer held does not keep its bytes alive.
                or_(Inbound.outcome.is_(None),
                    Inbound.outcome.not_in(("purged", "duplicate"))))).all())  # type: ignore[union-attr]
            named |= set(session.exec(select(Message.raw_sha256).where(Message.raw_sha256.in_(chunk))).all())  # type: ignore[union-attr]
            named |= set(session.exec(select(Attachment.sha256).where(Attachment.sha256.in_(chunk))).all())  # type: ignore[attr-defined]
        removed += sum(rt.blobs.remove_if_idle(d, BLOB_IDLE_SECONDS) for d in chunk if d not in named)
    return removed


def _purge_copies(rt: Runtime, session: Session, mails: set[tuple[str, str | None]]) -> list[tuple[int, str]]:
    """Mark purged the `duplicate` rows of mails (Message-ID, body hash) being purged in this
    transaction; their (row, raw file). Under the Message-IDs' locks (step_dedupe takes them
    too), so a copy being accepted meanwhile is either committed before this reads, or sees
    its mail purged and is no copy (dedupe skips purged rows)."""
    mids = sorted({mid for mid, _ in mails})
    lock_message_ids(session, rt.engine, mids)
    copies = [(i, digest) for i, digest, mid, body in session.exec(
        select(Inbound.id, Inbound.raw_sha256, Inbound.message_id_header, Inbound.body_hash).where(
            Inbound.message_id_header.in_(mids), Inbound.outcome == "duplicate")).all()  # type: ignore[union-attr]
        if (mid, body) in mails]
    for start in range(0, len(copies), PURGE_CHUNK):
        session.exec(update(Inbound).where(  # type: ignore[call-overload]
            Inbound.id.in_([i for i, _ in copies[start:start + PURGE_CHUNK]]))  # type: ignore[union-attr]
            .values(outcome="purged"))
    return copies


FIRST_RUN_WITHIN = timedelta(minutes=5)
DIGEST_TEMPLATE = "agent/quarantine_digest"
DIGEST_LISTED = 200  # messages listed by name in one digest; the rest are counted
DIGEST_CHECK_EVERY = timedelta(minutes=15)


def send_quarantine_digest(rt: Runtime) -> int:
    """Mail the list of messages held since the last digest to spam.digest_to (default: the
    admins), at most once every spam.digest_hours; returns how many it reported.

    Without it a customer's mail held by mistake is seen only by someone who runs
    `spam quarantine list`, and is purged unseen after spam.retention_days. The lowest
    scores come first: that is where a mistake sits. Each message is reported once: the
    rows are marked in the transaction that queues the digest.
    """
    spam = rt.settings.spam
    recipients = rt.settings.quarantine_digest_to
    if not spam.digest_hours or not recipients:
        return 0
    from mailgate.ingest import notify

    now = utcnow()
    with session_scope(rt.engine) as session:
        last = session.exec(select(func.max(Outbox.created_at)).where(Outbox.template == DIGEST_TEMPLATE)).one()
        # Half a pass early counts as due: the last list was stamped a moment after its pass
        # began, and a strict "24 hours since" would slip by a pass every day.
        early = job_interval(rt, "quarantine-digest", DIGEST_CHECK_EVERY) / 2
        if last is not None and now - as_utc(last) < timedelta(hours=spam.digest_hours) - early:
            return 0
        unreported = session.exec(select(Inbound.id).where(
            Inbound.outcome == "quarantined", Inbound.reported_at.is_(None))  # type: ignore[union-attr]
            .order_by(Inbound.spam_score, Inbound.id)).all()
        if not unreported:
            return 0
        listed = session.exec(select(Inbound).where(
            Inbound.id.in_(unreported[:DIGEST_LISTED]))  # type: ignore[union-attr]
            .order_by(Inbound.spam_score, Inbound.id)).all()
        # Sender and subject are the spammer's text: no control or bidi character reaches the
        # admin's mail reader (a terminal one would act on an ESC).
        held = [{"id": r.id, "received_at": iso(r.received_at),
                 "from": one_line(r.from_addr or "", 320) or "(unknown sender)",
                 "subject": one_line(r.subject or "", 120) or "(no subject)",
                 "score": "-" if r.spam_score is None else f"{r.spam_score:.3f}"} for r in listed]
        for start in range(0, len(unreported), 500):
            session.exec(update(Inbound).where(  # type: ignore[call-overload]
                Inbound.id.in_(unreported[start:start + 500])).values(reported_at=now))  # type: ignore[union-attr]
        extra = {"held": held, "total": len(unreported), "more": len(unreported) - len(held),
                 "threshold": spam.threshold, "retention_days": spam.retention_days}
        for to in recipients:
            notify.send(rt, session, ticket=None, template=DIGEST_TEMPLATE, to=to, extra=extra, guard=False,
                        reply_number=QUARANTINE_REPLY_NUMBER)
    log.info("quarantine digest: %d message(s) to %s", len(unreported), ", ".join(recipients))
    return len(unreported)


def auto_close_solved(rt: Runtime) -> int:
    """Solved tickets close after sla.auto_close_solved_days, with the same notice as by hand."""
    from mailgate.ingest.apply import add_event, set_status
    from mailgate.ingest.notify import status_changed

    closed = next(s for s in rt.settings.helpdesk.statuses if s.kind == "closed")
    cutoff = utcnow() - timedelta(days=rt.settings.sla.auto_close_solved_days)
    n = 0
    with session_scope(rt.engine) as session:
        for ticket in session.exec(select(Ticket).where(
                Ticket.status_kind == "solved", Ticket.solved_at < cutoff)).all():  # type: ignore[operator]
            old = set_status(rt, session, ticket, closed.name, "system")
            if old is not None:
                add_event(session, ticket, "system", "auto-close", None, None,
                          f"solved for {rt.settings.sla.auto_close_solved_days:g} days")
                status_changed(rt, session, ticket, old)
                session.add(ticket)
                n += 1
    return n


JOBS = (
    ("purge-quarantine", purge_quarantine, timedelta(hours=1)),
    ("auto-close", auto_close_solved, timedelta(minutes=15)),
    # Looks every 15 minutes whether a digest is due (the last one is in the outbox), so a
    # daemon restarted more often than spam.digest_hours still sends it.
    ("quarantine-digest", send_quarantine_digest, DIGEST_CHECK_EVERY),
)


def job_interval(rt: Runtime, name: str, every: timedelta) -> timedelta:
    """How often the job runs: a digest due more often than every 15 minutes is looked for as often."""
    hours = rt.settings.spam.digest_hours
    if name == "quarantine-digest" and hours:
        return min(every, timedelta(hours=hours))
    return every


def run_job(rt: Runtime, holder: str, name: str) -> None:
    for job_name, job, every in JOBS:
        if job_name != name:
            continue
        if not take_lease(rt, f"job:{name}", holder, job_interval(rt, name, every)):
            return
        try:
            n = job(rt)
            if n:
                log.info("job %s: %d", name, n)
        except Exception:
            log.exception("job %s failed", name)


def start_scheduler(rt: Runtime, holder: str) -> AsyncIOScheduler:
    scheduler = AsyncIOScheduler(timezone="UTC")
    for name, _func, every in JOBS:
        interval = job_interval(rt, name, every)
        # The first run at most FIRST_RUN_WITHIN after start, not a whole interval later: a
        # daemon restarted more often than hourly never purged. A little spread, so that
        # instances started together do not all ask for the lease at once.
        first = utcnow() + min(interval, FIRST_RUN_WITHIN) + timedelta(seconds=random.uniform(0, 30))
        scheduler.add_job(run_job, "interval", args=(rt, holder, name), seconds=interval.total_seconds(),
                          id=name, max_instances=1, coalesce=True, next_run_time=first)
    scheduler.start()
    return scheduler
