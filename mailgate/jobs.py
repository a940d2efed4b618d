"""Scheduled passes. Each takes a lease first, so with several daemon
instances on one database a pass runs on one of them at a time."""

from __future__ import annotations

import logging
from datetime import timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import or_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from mailgate.runtime import Runtime
from mailgate.spool import holder_is_dead
from mailgate.store.engine import as_utc, session_scope, utcnow
from mailgate.store.tables import Attachment, Inbound, Lease, Message, Ticket

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


def purge_quarantine(rt: Runtime) -> int:
    """Quarantined messages older than spam.retention_days are dropped from the listing, and
    their raw bytes from the blob store unless another row still names the same content."""
    cutoff = utcnow() - timedelta(days=rt.settings.spam.retention_days)
    with session_scope(rt.engine) as session:
        expired = session.exec(select(Inbound.id, Inbound.raw_sha256).where(
            Inbound.outcome == "quarantined", Inbound.received_at < cutoff)).all()
        if not expired:
            return 0
        # Still quarantined: a release between the SELECT and here keeps its row and bytes
        # (PostgreSQL runs the two at once; the raw file of a released row is named below).
        purged = session.exec(update(Inbound).where(  # type: ignore[call-overload]
            Inbound.id.in_([i for i, _ in expired]), Inbound.outcome == "quarantined")  # type: ignore[union-attr]
            .values(outcome="purged")).rowcount
    digests = sorted({d for _, d in expired})
    removed = 0
    for start in range(0, len(digests), 500):
        chunk = digests[start:start + 500]
        with session_scope(rt.engine) as session:
            named = set(session.exec(select(Inbound.raw_sha256).where(
                Inbound.raw_sha256.in_(chunk),  # type: ignore[attr-defined]
                or_(Inbound.outcome.is_(None), Inbound.outcome != "purged"))).all())  # type: ignore[union-attr]
            named |= set(session.exec(select(Message.raw_sha256).where(Message.raw_sha256.in_(chunk))).all())  # type: ignore[union-attr]
            named |= set(session.exec(select(Attachment.sha256).where(Attachment.sha256.in_(chunk))).all())  # type: ignore[attr-defined]
        removed += sum(rt.blobs.remove_if_idle(d, BLOB_IDLE_SECONDS) for d in chunk if d not in named)
    log.info("purged %d quarantined message(s), %d raw file(s) removed", purged, removed)
    return purged


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
)


def run_job(rt: Runtime, holder: str, name: str) -> None:
    for job_name, func, every in JOBS:
        if job_name != name:
            continue
        if not take_lease(rt, f"job:{name}", holder, every):
            return
        try:
            n = func(rt)
            if n:
                log.info("job %s: %d", name, n)
        except Exception:
            log.exception("job %s failed", name)


def start_scheduler(rt: Runtime, holder: str) -> AsyncIOScheduler:
    scheduler = AsyncIOScheduler(timezone="UTC")
    for name, _func, every in JOBS:
        scheduler.add_job(run_job, "interval", args=(rt, holder, name), seconds=every.total_seconds(),
                          id=name, max_instances=1, coalesce=True)
    scheduler.start()
    return scheduler
