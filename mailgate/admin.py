"""Changes made from the CLI: the same rules and notices as by mail, actor 'cli'."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlmodel import Session

from mailgate.ingest import notify
from mailgate.ingest.apply import (
    add_event,
    add_helper,
    change_field,
    change_owner,
    change_status,
    unowned_recipients,
)
from mailgate.runtime import Runtime
from mailgate.store.engine import session_scope, utcnow
from mailgate.store.tables import Message, Ticket

log = logging.getLogger(__name__)


def update_ticket(rt: Runtime, number: int, *, status: str | None = None, priority: str | None = None,
                  category: str | None = None, owner: str | None = None, assist: str | None = None,
                  tier: str | None = None, actor: str = "cli") -> dict[str, Any]:
    s = rt.settings
    if status is not None and s.helpdesk.status(status) is None:
        raise ValueError(f"--status: unknown status {status!r}; one of "
                         + ", ".join(x.name for x in s.helpdesk.statuses))
    if priority is not None and priority not in s.helpdesk.priorities:
        raise ValueError(f"--priority: one of {', '.join(s.helpdesk.priorities)}")
    if category is not None and s.helpdesk.categories and category not in s.helpdesk.categories:
        raise ValueError(f"--category: one of {', '.join(s.helpdesk.categories)}")
    for flag, email in (("--owner", owner), ("--assist", assist)):
        if email is not None and email != "" and s.agent(email) is None:
            raise ValueError(f"{flag}: {email} is not a configured agent")
    if tier is not None and tier not in [t.name for t in s.sla.tiers]:
        raise ValueError(f"--tier: one of {', '.join(t.name for t in s.sla.tiers)}")
    changes: list[str] = []
    lesson: Callable[[], bool] | None = None
    with session_scope(rt.engine) as session:
        only_closing = (status is not None and s.helpdesk.status(status).kind in ("solved", "closed")  # type: ignore[union-attr]
                        and (priority, category, owner, assist, tier) == (None,) * 5)
        ticket = _live_ticket(session, number, may_close=only_closing)
        if status is not None:
            lines, lesson, tell_old = change_status(rt, session, ticket, status, actor)
            changes += lines
            if tell_old is not None:
                notify.status_changed(rt, session, ticket, tell_old)
        for field, value in (("priority", priority), ("category", category), ("tier", tier)):
            if value is not None and (line := change_field(rt, session, ticket, field, value, actor)):
                changes.append(line)
        previous = ticket.owner
        if owner is not None and (line := change_owner(session, ticket, owner.lower() or None, actor)):
            changes.append(line)
            if ticket.owner:
                # The template tells owner from assistant: `role` is part of its context.
                notify.notify_agents(rt, session, ticket, "agent/assigned", [ticket.owner], message=None,
                                     extra={"by": actor, "role": "owner"})
            if previous and previous != ticket.owner and s.agent(previous) is not None:
                notify.notify_agents(rt, session, ticket, "agent/assigned", [previous], message=None,
                                     extra={"by": actor, "role": "former owner"})
        if assist and (line := add_helper(session, ticket, assist.lower(), "assistant", actor)):
            changes.append(line)
            # As `#assist` by mail does: the new assistant hears of it.
            notify.notify_agents(rt, session, ticket, "agent/assigned", [assist.lower()], message=None,
                                 extra={"by": actor, "role": "assistant"})
        ticket.updated_at = utcnow()
        session.add(ticket)
    if lesson is not None:
        try:
            lesson()
        except Exception as exc:  # the reopening is committed; the model must not undo it
            log.error("ticket #%s reopened but not learned as ham: %s: %s", number, type(exc).__name__, exc)
    return {"number": number, "changes": changes}


def _live_ticket(session: Session, number: int, *, may_close: bool = False) -> Ticket:
    """The ticket to change; not one merged into another, which lives on there (its mail
    goes there, and a status or note on it would be seen by nobody). may_close: the change
    only closes it, which one reopened by an earlier version needs (listed nowhere else,
    and counted as its owner's open work)."""
    ticket = session.get(Ticket, number)
    if ticket is None:
        raise ValueError(f"no ticket #{number}")
    if ticket.merged_into is not None and not may_close:
        raise ValueError(f"#{number} was merged into #{ticket.merged_into}: change that one")
    return ticket


def add_note(rt: Runtime, number: int, text: str, author: str) -> None:
    with session_scope(rt.engine) as session:
        ticket = _live_ticket(session, number)
        message = Message(ticket_id=number, kind="internal", direction="in", from_addr=author,
                          from_name=author, subject=ticket.subject, text=text.strip(), full_text=text,
                          author_agent=author if rt.settings.agent(author) else None, created_at=utcnow())
        session.add(message)
        add_event(session, ticket, author, "note", None, None)
        # Told as a note written by mail is: owner and assistants, or the group of an unowned
        # ticket; Reply-To is the comment address, so an answer to it is a note again.
        notify.notify_agents(rt, session, ticket, "agent/note",
                             notify.ticket_agents(rt, session, ticket,
                                                  unowned=unowned_recipients(rt, session, ticket)),
                             message=message, exclude=author, reply_base=rt.settings.helpdesk.comment_address)
