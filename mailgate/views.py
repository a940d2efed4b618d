"""Read side: ticket filters and the JSON shapes of DESIGN.md section 6."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import or_
from sqlmodel import Session, col, select

from mailgate.store.engine import as_utc, iso, utcnow
from mailgate.store.tables import Attachment, Contact, Event, Message, Participant, Ticket

SORT_FIELDS = ("number", "created_at", "updated_at", "priority", "status", "resolution_due",
               "first_response_due", "owner")
# The keys of ticket_summary, in order: what `tickets list --columns` may name.
SUMMARY_FIELDS = ("number", "subject", "status", "status_kind", "priority", "category", "queue", "requester",
                  "participants", "owner", "assistants", "tier", "created_at", "updated_at", "first_response_due",
                  "resolution_due", "first_responded_at", "overdue", "answered", "escalation_level", "rating",
                  "merged_into", "from_spam")
PRIORITY_ORDER = {"urgent": 0, "high": 1, "normal": 2, "low": 3}


@dataclass(frozen=True)
class TicketFilter:
    status: str | None = None
    open: bool = False
    closed: bool = False
    overdue: bool = False
    owner: str | None = None
    queue: str | None = None
    priority: str | None = None
    category: str | None = None
    requester: str | None = None
    since: datetime | None = None
    text: str | None = None


def is_overdue(ticket: Ticket, now: datetime) -> bool:
    if ticket.status_kind in ("solved", "closed") or ticket.sla_paused_at is not None:
        return False
    if ticket.first_responded_at is None and ticket.first_response_due and as_utc(ticket.first_response_due) < now:
        return True
    return bool(ticket.resolution_due and as_utc(ticket.resolution_due) < now)


def list_tickets(session: Session, f: TicketFilter, sort: str = "number",
                 priorities: Sequence[str] = ()) -> list[Ticket]:
    """priorities: helpdesk.priorities, least urgent first (--sort priority puts the most
    urgent first); the default four when not given."""
    # A merged ticket lives on in the one it went into: listed only among closed tickets.
    shown = Ticket.merged_into.is_(None)  # type: ignore[union-attr]
    if f.closed or f.status:
        shown = shown | col(Ticket.status_kind).in_(("solved", "closed"))
    query = select(Ticket).where(shown)
    if f.status:
        query = query.where(Ticket.status == f.status)
    if f.open:
        query = query.where(col(Ticket.status_kind).in_(("new", "open", "pending")))
    if f.closed:
        query = query.where(col(Ticket.status_kind).in_(("solved", "closed")))
    if f.owner:
        query = query.where(Ticket.owner == f.owner.lower())
    if f.queue:
        query = query.where(Ticket.queue == f.queue.lower())
    if f.priority:
        query = query.where(Ticket.priority == f.priority)
    if f.category:
        query = query.where(Ticket.category == f.category)
    if f.requester:
        query = query.join(Contact, Contact.id == Ticket.requester_id).where(  # type: ignore[arg-type]
            Contact.email == f.requester.lower())
    if f.since:
        query = query.where(Ticket.created_at >= f.since)
    if f.text:
        # The words as typed: '%' and '_' are not wildcards ("100%" must not match everything).
        escaped = f.text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        like = f"%{escaped}%"
        sub = select(Message.ticket_id).where(or_(col(Message.text).ilike(like, escape="\\"),
                                                  col(Message.subject).ilike(like, escape="\\")),
                                              Message.kind != "internal")
        query = query.where(or_(col(Ticket.subject).ilike(like, escape="\\"), col(Ticket.number).in_(sub)))
    tickets = list(session.exec(query).all())
    now = utcnow()
    if f.overdue:
        tickets = [t for t in tickets if is_overdue(t, now)]
    far = datetime.max.replace(tzinfo=now.tzinfo)
    rank = {p: i for i, p in enumerate(reversed(priorities))} if priorities else PRIORITY_ORDER

    def key(t: Ticket) -> Any:
        if sort == "priority":
            return (rank.get(t.priority, len(rank)), t.number)
        value = getattr(t, sort)
        if isinstance(value, datetime):
            return as_utc(value)
        if value is None:
            return far if sort.endswith("_due") else ""
        return value

    return sorted(tickets, key=key)


def ticket_summary(session: Session, ticket: Ticket, now: datetime | None = None) -> dict[str, Any]:
    now = now or utcnow()
    requester = session.get(Contact, ticket.requester_id)
    parts = session.exec(select(Participant).where(Participant.ticket_id == ticket.number)).all()
    return {
        "number": ticket.number,
        "subject": ticket.subject,
        "status": ticket.status,
        "status_kind": ticket.status_kind,
        "priority": ticket.priority,
        "category": ticket.category,
        "queue": ticket.queue,
        "requester": requester.email if requester else None,
        "participants": sorted(p.email for p in parts if p.role == "cc"),
        "owner": ticket.owner,
        "assistants": sorted(p.email for p in parts if p.role == "assistant"),
        "tier": ticket.tier,
        "created_at": iso(ticket.created_at),
        "updated_at": iso(ticket.updated_at),
        "first_response_due": iso(ticket.first_response_due),
        "resolution_due": iso(ticket.resolution_due),
        "first_responded_at": iso(ticket.first_responded_at),
        "overdue": is_overdue(ticket, now),
        "answered": ticket.last_public_out_at is not None and (
            ticket.last_public_in_at is None or ticket.last_public_out_at >= ticket.last_public_in_at),
        "escalation_level": ticket.escalation_level,
        "rating": ticket.rating,
        "merged_into": ticket.merged_into,
        "from_spam": ticket.from_spam,  # closed with #spam; reopening it undoes that
    }


def message_json(session: Session, m: Message) -> dict[str, Any]:
    atts = session.exec(select(Attachment).where(Attachment.message_id == m.id).order_by(Attachment.id)).all()
    return {
        "id": m.id,
        "kind": m.kind,
        "direction": m.direction,
        "from": m.from_addr,
        "from_name": m.from_name,
        "to": [a for a in m.to_addrs.split(",") if a],
        "subject": m.subject,
        "text": m.text,
        "message_id": m.message_id,
        "created_at": iso(m.created_at),
        "author_agent": m.author_agent,
        "spam_score": m.spam_score,
        "rule_hits": json.loads(m.rule_hits or "[]"),
        "attachments": [{"filename": a.filename, "content_type": a.content_type, "size": a.size,
                         "sha256": a.sha256, "inline": a.inline} for a in atts],
    }


def ticket_detail(session: Session, ticket: Ticket) -> dict[str, Any]:
    data = ticket_summary(session, ticket)
    messages = session.exec(select(Message).where(Message.ticket_id == ticket.number)
                            .order_by(Message.created_at, Message.id)).all()  # type: ignore[arg-type]
    data["messages"] = [message_json(session, m) for m in messages]
    events = session.exec(select(Event).where(Event.ticket_id == ticket.number).order_by(Event.id)).all()  # type: ignore[arg-type]
    data["events"] = [{"at": iso(e.created_at), "actor": e.actor, "action": e.action, "old": e.old,
                       "new": e.new, "detail": e.detail} for e in events]
    return data


def stop_reason(rule_hits: str | None) -> str:
    """Why the pipeline stopped with a message (screened, quarantined, ...): the reason of
    the last "stop" step in its rule hits, '' when there is none or the JSON is damaged."""
    try:
        hits = json.loads(rule_hits or "[]")
    except ValueError:
        return ""
    if not isinstance(hits, list):
        return ""
    return next((str(h.get("reason", "")) for h in reversed(hits) if isinstance(h, dict) and h.get("step") == "stop"),
                "")
