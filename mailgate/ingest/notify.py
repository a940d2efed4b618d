"""Notices as outbox rows, written in the transaction of the change that caused them.

Templates get a whitelisted context built here (`ticket_context`,
`message_context`): public fields only, so an internal note cannot reach a
requester's template by any path. Automatic mail passes the loop guard: no
more than the configured number per recipient per hour and per day, never to
our own addresses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, select

from mailgate.domain import base_address, tagged_subject
from mailgate.outbox import enqueue
from mailgate.runtime import Runtime
from mailgate.store.engine import iso, utcnow
from mailgate.store.tables import AutoReplyLog, Contact, Message, Outbox, Participant, Ticket

log = logging.getLogger(__name__)


def ticket_context(rt: Runtime, session: Session, ticket: Ticket) -> dict[str, Any]:
    requester = session.get(Contact, ticket.requester_id)
    return {
        "number": ticket.number,
        "subject": ticket.subject,
        "status": ticket.status,
        "status_kind": ticket.status_kind,
        "priority": ticket.priority,
        "category": ticket.category,
        "queue": ticket.queue,
        "tier": ticket.tier,
        "owner": ticket.owner,
        "requester": requester.email if requester else "",
        "requester_name": requester.name if requester else "",
        "first_response_due": iso(ticket.first_response_due),
        "resolution_due": iso(ticket.resolution_due),
    }


def message_context(message: Message) -> dict[str, Any]:
    return {"from": message.from_addr, "from_name": message.from_name, "text": message.text,
            "subject": message.subject, "created_at": iso(message.created_at)}


def helpdesk_context(rt: Runtime) -> dict[str, Any]:
    hd = rt.settings.helpdesk
    return {"name": hd.name, "address": hd.address, "subject_tag": hd.subject_tag,
            "ratings": list(hd.ratings)}


def thread_ids(session: Session, ticket: Ticket) -> list[str]:
    """Message-IDs for References: the ticket's first message and its latest ones."""
    ids = session.exec(select(Message.message_id).where(
        Message.ticket_id == ticket.number, Message.message_id.is_not(None),  # type: ignore[union-attr]
        Message.kind != "internal").order_by(Message.id)).all()  # type: ignore[arg-type]
    ids = [i for i in ids if i]
    return ids[:1] + ids[-8:] if len(ids) > 9 else ids


def loop_guard_allows(rt: Runtime, session: Session, recipient: str) -> bool:
    hd = rt.settings.helpdesk
    if base_address(recipient) in hd.all_addresses or recipient.split("@")[0] in ("mailer-daemon", "postmaster"):
        return False
    now = utcnow()
    def sent_since(delta: timedelta) -> int:
        return session.exec(select(func.count()).select_from(AutoReplyLog).where(
            AutoReplyLog.recipient == recipient, AutoReplyLog.sent_at > now - delta)).one()
    if sent_since(timedelta(hours=1)) >= hd.auto_reply_limit_per_hour:
        return False
    return sent_since(timedelta(days=1)) < hd.auto_reply_limit_per_day


def send(rt: Runtime, session: Session, *, ticket: Ticket, template: str, to: str,
         extra: dict[str, Any] | None = None, message: Message | None = None,
         in_reply_to: str | None = None, automatic: bool = True, from_name: str | None = None,
         record_kind: str | None = None, hits: list[dict[str, Any]] | None = None) -> Outbox | None:
    """Queue one mail about `ticket` to `to`. record_kind: also keep it as a ticket message."""
    guarded = automatic and rt.settings.agent(to) is None  # agents' notices are not capped
    if guarded and not loop_guard_allows(rt, session, to):
        log.warning("ticket %s: loop guard holds back %s to %s", ticket.number, template, to)
        if hits is not None:
            hits.append({"step": "notify", "hit": True, "reason": f"loop guard: no {template} to {to}"})
        return None
    context = {
        "helpdesk": helpdesk_context(rt),
        "ticket": ticket_context(rt, session, ticket),
        "message": message_context(message) if message else None,
        "tagged_subject": tagged_subject(rt.settings.helpdesk.subject_tag, ticket.number or 0,
                                         ticket.subject),
        **(extra or {}),
    }
    row, mail = enqueue(session, rt.settings, rt.renderer, template=template, to=to, context=context,
                        ticket_number=ticket.number, in_reply_to=in_reply_to,
                        references=thread_ids(session, ticket), automatic=automatic,
                        from_name=from_name)
    session.flush()
    if guarded:
        session.add(AutoReplyLog(recipient=to, sent_at=utcnow()))
    if record_kind is not None:
        session.add(Message(
            ticket_id=ticket.number, outbox_id=row.id, kind=record_kind, direction="out",
            from_addr=rt.settings.helpdesk.address, from_name=from_name or rt.settings.helpdesk.name,
            to_addrs=to, subject=mail.subject, text=mail.text, full_text=mail.text,
            message_id=mail.message_id, in_reply_to=in_reply_to, created_at=utcnow(),
        ))
    return row


def requester_and_cc(session: Session, ticket: Ticket) -> list[str]:
    requester = session.get(Contact, ticket.requester_id)
    out = [requester.email] if requester and requester.email else []
    out += session.exec(select(Participant.email).where(
        Participant.ticket_id == ticket.number, Participant.role == "cc")).all()
    return list(dict.fromkeys(out))


def ticket_agents(rt: Runtime, session: Session, ticket: Ticket, *, everyone_if_unowned: bool) -> list[str]:
    """Owner and assistants; without an owner, the queue's group (or all agents)."""
    out: list[str] = [ticket.owner] if ticket.owner else []
    out += session.exec(select(Participant.email).where(
        Participant.ticket_id == ticket.number, Participant.role == "assistant")).all()
    if not out and everyone_if_unowned:
        out = [a.email for a in rt.settings.agents]
    return list(dict.fromkeys(out))


def notify_agents(rt: Runtime, session: Session, ticket: Ticket, template: str, recipients: Iterable[str],
                  *, message: Message | None, exclude: str | None = None,
                  extra: dict[str, Any] | None = None) -> None:
    for agent in recipients:
        if agent != exclude:
            send(rt, session, ticket=ticket, template=template, to=agent, message=message,
                 in_reply_to=message.message_id if message else None, extra=extra)
