"""Apply a routed message to the store: tickets, messages, commands, events.

Every change writes an Event (the audit trail). Notices are not sent here:
`apply_message` records effects on the context and `send_effects` turns them
into outbox rows, in the same transaction.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn

from sqlalchemy import bindparam, case, func, insert, update
from sqlmodel import Session, col, select

from mailgate.config import AssignmentRule, StatusDef
from mailgate.domain import (
    QUARANTINE_REPLY_NUMBER,
    base_address,
    is_bounce_address,
    mailbox_of,
    one_line,
    wire_address,
)
from mailgate.ingest import notify
from mailgate.ingest.commands import CommandRules, ParsedCommands, find_choice, merge_target, validate
from mailgate.ingest.identify import from_authenticated
from mailgate.ingest.screen import BULK, LIST
from mailgate.ingest.stop import Stop
from mailgate.outbox import OutgoingFile
from mailgate.quarantine import learn_released, take_out
from mailgate.runtime import Runtime
from mailgate.sla import add_business_time, business_time_between, tier_for_address
from mailgate.store.engine import as_utc, insert_object, is_history, now_for
from mailgate.store.tables import (
    Attachment,
    Contact,
    Event,
    Inbound,
    Message,
    Outbox,
    Participant,
    Ticket,
)

if TYPE_CHECKING:
    from mailgate.ingest.pipeline import Context

log = logging.getLogger(__name__)

MAX_CC_FROM_HEADERS = 10  # a requester's Cc list, not a mailing list


# --- small store helpers -------------------------------------------------------------

# Built once (see pipeline: building a statement costs more than running it).
_INSERT_EVENT = insert(Event.__table__)  # type: ignore[attr-defined]
# An image the agent's client put inline is sent with the answer from this size on: a
# pasted screenshot is larger, a signature's logo or an icon smaller.
INLINE_IMAGE_SENT_FROM = 10 * 1024
# Files sent with one answer, to each recipient: base64 makes 7 MB about 9.6 MB, under the
# 10 MB a relay often takes (Postfix's message_size_limit is 10,240,000).
ANSWER_FILES_MAX_BYTES = 7 * 1024 * 1024
# Parts of the agent's mail that are no file of theirs: an S/MIME or PGP signature over
# their mail (sent on, it signs nothing), the headers of a returned message, and Outlook's
# winmail.dat, which holds the whole mail (the quoted notice, the signature) beside the
# files parse_message takes out of it, which do go on.
NOT_SENT_ON = frozenset({"application/pkcs7-signature", "application/x-pkcs7-signature",
                         "application/pgp-signature", "text/rfc822-headers",
                         "application/ms-tnef", "application/vnd.ms-tnef"})
_INSERT_PARTICIPANT = insert(Participant.__table__)  # type: ignore[attr-defined]
_PARTICIPANT_EXISTS = select(Participant.id).where(
    Participant.ticket_id == bindparam("ticket"), Participant.email == bindparam("email"),
    Participant.role == bindparam("role")).limit(1)
_PARTICIPANT_EMAILS = select(Participant.email).where(Participant.ticket_id == bindparam("ticket"))
_CONTACT_BY_EMAIL = select(Contact).where(Contact.email == bindparam("email"))
_CONTACT_TABLE = Contact.__table__  # type: ignore[attr-defined]
_MARK_BOUNCED = update(_CONTACT_TABLE).where(_CONTACT_TABLE.c.email == bindparam("address")).values(
    bounced_at=bindparam("at"))
_CLEAR_BOUNCED = update(_CONTACT_TABLE).where(
    _CONTACT_TABLE.c.email == bindparam("address"), _CONTACT_TABLE.c.bounced_at.is_not(None)).values(bounced_at=None)
_TICKETS_OPENED_BY_MAILBOX_SINCE = select(func.count()).select_from(Ticket).join(
    Contact, Contact.id == Ticket.requester_id).where(
    Contact.mailbox == bindparam("mailbox"), Ticket.created_at > bindparam("since"))


def add_event(session: Session, ticket: Ticket, actor: str, action: str, old: Any = None,
              new: Any = None, detail: str | None = None) -> None:
    """Append to the audit trail (the ticket must be flushed: it needs its number).

    A Core INSERT on the session's connection, in its transaction: events are only ever
    appended, never read back as objects, and an ORM object cost five times the row.
    """
    session.connection().execute(_INSERT_EVENT, {
        "ticket_id": ticket.number, "created_at": now_for(session), "actor": actor, "action": action,
        "old": None if old is None else str(old), "new": None if new is None else str(new), "detail": detail})


def ticket_members(session: Session, ticket: Ticket) -> set[str]:
    """Addresses that may write into the ticket: requester, CCs, assistants, owner."""
    out = set(session.exec(_PARTICIPANT_EMAILS, params={"ticket": ticket.number}).all())
    requester = session.get(Contact, ticket.requester_id)
    if requester is not None:
        out.add(requester.email)
    if ticket.owner:
        out.add(ticket.owner)
    return out


def contact_for(rt: Runtime, session: Session, email: str, name: str = "") -> Contact:
    contact = session.exec(_CONTACT_BY_EMAIL, params={"email": email}).first()
    if contact is None:
        contact = Contact(email=email, mailbox=mailbox_of(email), name=name[:200], created_at=now_for(session))
        insert_object(session, contact)
    elif name and not contact.name:
        contact.name = name[:200]
        session.add(contact)
    return contact


def first_status(rt: Runtime, kind: str) -> StatusDef:
    return next(s for s in rt.settings.helpdesk.statuses if s.kind == kind)


def store_message(ctx: Context, ticket: Ticket | None, *, kind: str, direction: str, text: str,
                  author_agent: str | None = None) -> Message:
    msg = ctx.msg
    # An agent appears under the name configured for them, not whatever their client says.
    from_name = ctx.agent.name if author_agent and ctx.agent is not None else ctx.sender_name
    message = Message(
        ticket_id=ticket.number if ticket else None, inbound_id=ctx.inbound.id, kind=kind,
        direction=direction, from_addr=ctx.sender, from_name=from_name[:200],
        to_addrs=",".join(ctx.recipients), subject=msg.subject, text=text, full_text=msg.text,
        html=msg.html, message_id=msg.message_id, in_reply_to=" ".join(msg.in_reply_to) or None,
        body_hash=ctx.body_hash, raw_sha256=ctx.inbound.raw_sha256, author_agent=author_agent,
        screen_kind=ctx.verdict.kind if ctx.verdict else None, spam_score=ctx.spam_score,
        created_at=ctx.now,
    )
    insert_object(ctx.session, message)  # its rule_hits are written when the pipeline ends
    ctx.stored.append(message)
    if (direction == "in" and ctx.sender and not (ctx.verdict and ctx.verdict.is_automatic)
            and not is_history(ctx.session)):
        # They wrote, so the address works again: automatic mail to it resumes. Not old mail
        # imported as history: it says nothing of the address today.
        ctx.session.connection().execute(_CLEAR_BOUNCED, {"address": ctx.sender})
    for att in msg.attachments:
        digest = ctx.rt.blobs.put(att.data)
        ctx.session.add(Attachment(
            message_id=message.id, filename=att.filename[:255], content_type=att.content_type[:255],
            size=len(att.data), sha256=digest, content_id=att.content_id, inline=att.inline))
    return message


# --- status, priority and SLA -----------------------------------------------------------

def set_due_times(rt: Runtime, ticket: Ticket) -> None:
    due = rt.due_times(ticket.tier, ticket.priority, as_utc(ticket.created_at))
    if due is not None:
        ticket.first_response_due, ticket.resolution_due = due


def retarget_due_times(rt: Runtime, session: Session, ticket: Ticket) -> None:
    """New targets after a priority or tier change, keeping the time the ticket spent
    pending: the new base (created + new target) is moved by each past pause as the clock
    moved it when the pause ended, on the new tier's calendar. Recomputing from created_at
    alone made a ticket that waited a week for its customer overdue at once."""
    created = as_utc(ticket.created_at)
    base = rt.due_times(ticket.tier, ticket.priority, created)
    if base is None:
        return
    cal = rt.calendar(ticket.tier)
    spans = pending_spans(rt, session, ticket)
    if spans is None:
        return  # keep the due times it has rather than forget pauses
    answered = as_utc(ticket.first_responded_at) if ticket.first_responded_at else None
    moved: list[datetime] = []
    for which, due in enumerate(base):
        for paused_at, resumed_at in spans:
            if which == 0 and answered is not None and paused_at >= answered:
                break  # set_status stops moving the first-response due once it is met
            if due > paused_at:  # a due time already passed at the pause stays passed
                due = add_business_time(cal, resumed_at, business_time_between(cal, paused_at, due))
        moved.append(due)
    ticket.first_response_due, ticket.resolution_due = moved


def pending_spans(rt: Runtime, session: Session, ticket: Ticket) -> list[tuple[datetime, datetime]] | None:
    """The ticket's finished pauses (pending from, until), from its status events; a pause
    still going on is left to set_status, which moves the due times when it ends. None when
    an event names a status whose kind is not known (renamed before events kept kinds)."""
    kinds = {st.name: st.kind for st in rt.settings.helpdesk.statuses}
    spans: list[tuple[datetime, datetime]] = []
    start: datetime | None = None
    for at, new, detail in session.exec(select(Event.created_at, Event.new, Event.detail).where(
            Event.ticket_id == ticket.number, Event.action == "status").order_by(Event.id)).all():  # type: ignore[arg-type]
        kind = (detail or "").rpartition("-> ")[2] or kinds.get(new or "")
        if kind is None:
            return None  # a status neither recorded with its kind nor configured: unknown pauses
        pending = kind == "pending"
        if pending and start is None:
            start = as_utc(at)
        elif not pending and start is not None:
            spans.append((start, as_utc(at)))
            start = None
    return spans


def set_status(rt: Runtime, session: Session, ticket: Ticket, name: str, actor: str) -> str | None:
    """Change the status; returns the old name, or None if nothing changed."""
    status = rt.settings.helpdesk.status(name)
    assert status is not None
    if status.name == ticket.status:
        return None
    old, old_kind = ticket.status, ticket.status_kind
    now = now_for(session)
    ticket.status, ticket.status_kind = status.name, status.kind
    if status.kind == "pending" and old_kind != "pending":
        ticket.sla_paused_at = now  # waiting for the customer: the clock stops
    elif old_kind == "pending" and status.kind != "pending" and ticket.sla_paused_at is not None:
        # The clock resumes with the business time that was left when it stopped, not the
        # wall-clock pause: a pause over a weekend must not eat the Monday.
        cal = rt.calendar(ticket.tier)
        paused_at = as_utc(ticket.sla_paused_at)

        def resumed(due: datetime) -> datetime:
            if as_utc(due) <= paused_at:
                return due  # already breached when it paused: it stays breached
            return add_business_time(cal, now, business_time_between(cal, paused_at, as_utc(due)))

        if ticket.first_response_due and ticket.first_responded_at is None:
            ticket.first_response_due = resumed(ticket.first_response_due)
        if ticket.resolution_due:
            ticket.resolution_due = resumed(ticket.resolution_due)
        ticket.sla_paused_at = None
    if status.kind == "solved":
        ticket.solved_at = now
    if status.kind == "closed":
        ticket.closed_at = now
    if status.kind in ("new", "open", "pending"):
        ticket.solved_at = ticket.closed_at = None
    ticket.updated_at = now
    # The kinds too: a status renamed in the config later must not lose the pauses that
    # retarget_due_times replays from these events.
    add_event(session, ticket, actor, "status", old, status.name, f"{old_kind} -> {status.kind}")
    return old


def change_status(rt: Runtime, session: Session, ticket: Ticket, name: str,
                  actor: str) -> tuple[list[str], Callable[[], bool] | None, str | None]:
    """Set the status, as mail and CLI both do: the change lines; the deferred spam-filter
    lesson when the new status undoes a #spam (see unmark_spam); and the old status to tell
    the requester about (None when unchanged, or when the ticket was closed as spam: they
    never heard of that close)."""
    was_spam = ticket.from_spam
    old = set_status(rt, session, ticket, name, actor)
    if old is None:
        return [], None, None
    lines = [f"status: {old} -> {name}"]
    if not was_spam:
        return lines, None, old
    lesson = None
    if ticket.status_kind != "closed":
        line, lesson = unmark_spam(rt, session, ticket, actor)
        if line is not None:
            lines.append(line)
    return lines, lesson, None


def change_field(rt: Runtime, session: Session, ticket: Ticket, field: str, value: str,
                 actor: str) -> str | None:
    """Set the ticket's priority, category or tier, with its event and new due times;
    the change line, or None if it already had that value. Mail and CLI both call this."""
    old = getattr(ticket, field)
    if old == value:
        return None
    setattr(ticket, field, value)
    add_event(session, ticket, actor, field, old, value)
    if field in ("priority", "tier"):
        retarget_due_times(rt, session, ticket)
    return f"{field}: {old or '-'} -> {value}"


def change_owner(session: Session, ticket: Ticket, owner: str | None, actor: str,
                 why: str | None = None) -> str | None:
    """Give the ticket to `owner` (None: nobody); the change line, or None if unchanged."""
    if owner == ticket.owner:
        return None
    old, ticket.owner = ticket.owner, owner
    add_event(session, ticket, actor, "owner", old, owner, why)
    return f"owner: {old or 'nobody'} -> {owner or 'nobody'}" + (f" ({why})" if why else "")


def add_helper(session: Session, ticket: Ticket, email: str, role: str, actor: str) -> str | None:
    """Add an assistant or a CC; the change line, or None if they are one already."""
    if not add_participant(session, ticket, email, role):
        return None
    add_event(session, ticket, actor, role, None, email)
    return f"{role} added: {email}"


def matching_rule(rules: Sequence[AssignmentRule], *, category: str | None, queue: str, sender: str,
                  subject: str) -> tuple[int, AssignmentRule] | None:
    """The first rule whose every given condition holds (first match wins)."""
    subject = subject.lower()
    sender_domain = sender.rpartition("@")[2].lower()
    for i, rule in enumerate(rules):
        if rule.category and (category or "").casefold() != rule.category.casefold():
            continue
        if rule.queue and rule.queue.lower() != queue.lower():
            continue
        if rule.sender_domain and not (sender_domain == rule.sender_domain
                                       or sender_domain.endswith("." + rule.sender_domain)):
            continue
        if rule.subject_keywords and not any(k in subject for k in rule.subject_keywords):
            continue
        return i, rule
    return None


def _rule_for(rt: Runtime, session: Session, ticket: Ticket) -> tuple[int, AssignmentRule] | None:
    requester = session.get(Contact, ticket.requester_id)
    return matching_rule(rt.settings.assignment, category=ticket.category, queue=ticket.queue,
                         sender=requester.email if requester else "", subject=ticket.subject)


def pick_owner(rt: Runtime, session: Session, ticket: Ticket) -> tuple[str | None, str | None]:
    """(owner, why) by the assignment rules; owner None if no rule assigns one.

    Round-robin state is the rule's own last assignment (its Event), so manual
    reassignments and other rules do not skip or repeat anyone in the rotation.
    """
    found = _rule_for(rt, session, ticket)
    if found is None:
        return None, None
    index, rule = found
    why = f"assignment[{index}]"
    if not rule.target.startswith("group:"):
        return rule.target, why
    members = [a.email for a in rt.settings.group_members(rule.target[6:])]
    if not members or rule.strategy == "notify":
        return None, why
    if rule.strategy == "least-open":
        def open_count(email: str) -> int:
            return session.exec(select(func.count()).select_from(Ticket).where(
                # (not yet inserted, the new ticket has no number: IS NOT NULL leaves none out)
                Ticket.owner == email, Ticket.number != ticket.number, Ticket.merged_into.is_(None),  # type: ignore[union-attr]
                Ticket.status_kind.in_(("new", "open", "pending")))).one()  # type: ignore[attr-defined]
        return min(members, key=lambda e: (open_count(e), members.index(e))), why
    last = session.exec(select(Event.new).where(
        Event.action == "owner", Event.actor == "system", Event.detail == why)
        .order_by(Event.id.desc()).limit(1)).first()  # type: ignore[union-attr]
    return (members[(members.index(last) + 1) % len(members)] if last in members else members[0]), why


def unowned_recipients(rt: Runtime, session: Session, ticket: Ticket) -> list[str]:
    """Who hears about a ticket nobody owns: the group its rule names, else the group a
    rule names for its queue, else every agent."""
    found = _rule_for(rt, session, ticket)
    candidates = [found[1]] if found else []
    candidates += [r for r in rt.settings.assignment if r.queue and r.queue.lower() == ticket.queue.lower()]
    for rule in candidates:
        if rule.target.startswith("group:"):
            members = [a.email for a in rt.settings.group_members(rule.target[6:])]
            if members:
                return members
    return [a.email for a in rt.settings.agents]


def create_ticket(ctx: Context, *, requester: str, requester_name: str, subject: str,
                  actor: str, owner: str | None = None) -> Ticket:
    rt, session = ctx.rt, ctx.session
    contact = contact_for(rt, session, requester, requester_name)
    now = ctx.now
    hd = rt.settings.helpdesk
    queues = [a for a in hd.all_addresses if a != hd.comment_address]  # the comment address is no queue
    given = ctx.inbound.queue if ctx.inbound.queue in queues else None
    queue = given or next((a for a in (base_address(r) for r in ctx.recipients) if a in queues), hd.address)
    new = first_status(rt, "new")
    ticket = Ticket(
        subject=subject[:998] or "(no subject)", requester_id=contact.id, queue=queue,  # type: ignore[arg-type]
        priority=rt.settings.helpdesk.default_priority, status=new.name, status_kind=new.kind,
        tier=contact.tier or tier_for_address(requester, rt.settings.sla.tier_rules,
                                              rt.settings.sla.default_tier),
        created_at=now, updated_at=now, last_public_in_at=now,
    )
    # Owner and due times before the INSERT, so that the row is written once.
    why = None
    if owner is None:
        owner, why = pick_owner(rt, session, ticket)
    ticket.owner = owner
    set_due_times(rt, ticket)
    insert_object(session, ticket)
    add_event(session, ticket, actor, "created", None, ticket.status, f"via {ctx.inbound.source}")
    if ticket.owner:
        add_event(session, ticket, "system" if why else actor, "owner", None, ticket.owner, why)
    return ticket


def new_tickets_from_mailbox_last_hour(session: Session, sender: str, now: datetime) -> int:
    """Tickets opened in the last hour by the sender's mailbox: carol@ and every carol+tag@
    count together, so a forged From with a new +tag each time cannot multiply the cap."""
    params = {"mailbox": mailbox_of(sender), "since": now - timedelta(hours=1)}
    return session.exec(_TICKETS_OPENED_BY_MAILBOX_SINCE, params=params).one()


# --- the message, by who sent it ----------------------------------------------------------

def apply_message(ctx: Context) -> None:
    verdict = ctx.verdict
    assert verdict is not None
    if ctx.msg.is_dsn:
        record_bounce(ctx)
    # Auto-replies and bounces read no commands and change nothing; list or bulk headers
    # on forged agent mail must not buy it a ticket in the agent's name.
    if not verdict.is_automatic and _spoofed_agent(ctx):
        refuse_spoofed(ctx)
    if ctx.ticket is None:
        new_ticket_from_message(ctx)
        return
    ctx.ticket.updated_at = ctx.now
    if verdict.kind is not None:
        # Automatic mail (out-of-office, bounce, list) on a ticket: kept, never answered,
        # and it changes no state.
        store_message(ctx, ctx.ticket, kind="auto", direction="in", text=ctx.msg.text)
        ctx.outcome = "reply"
        return
    if ctx.agent is not None:
        agent_message(ctx)
        return
    if ctx.decision is not None and ctx.decision.answer_on_record:
        answer_on_record(ctx)
        return
    if ctx.ticket.from_spam:
        # An agent judged this ticket spam: whatever its sender writes next is kept on it
        # for the record, but it does not reopen the ticket or reach anyone (OTRS's junk queue).
        store_message(ctx, ctx.ticket, kind="public", direction="in", text=ctx.visible_text)
        ctx.hit("spam", False, "reply to a ticket closed as spam: kept on it, not reopened, nobody told")
        ctx.outcome = "reply"
        return
    requester_message(ctx)


def answer_on_record(ctx: Context) -> None:
    """Imported history: an answer the staff sent straight to the customer back then. It
    joins the ticket as a public answer of its date, sends nothing (it was delivered then)
    and runs no commands (it has no proof of identity)."""
    ticket = ctx.ticket
    assert ticket is not None
    agent = ctx.rt.settings.agent(ctx.sender)
    store_message(ctx, ticket, kind="public", direction="out", text=ctx.visible_text,
                  author_agent=agent.email if agent is not None else None)
    ctx.outcome = "reply"
    if ticket.from_spam:
        return  # kept for the record; an answer to spam is no first response
    if ticket.first_responded_at is None:
        ticket.first_responded_at = ctx.now
    ticket.last_public_out_at = ctx.now
    if ticket.status_kind == "new":
        set_status(ctx.rt, ctx.session, ticket, first_status(ctx.rt, "open").name, ctx.sender)


def _spoofed_agent(ctx: Context) -> bool:
    """An agent's address without proof, trying to act as the agent (#commands or a note)."""
    if ctx.identity is None or ctx.identity.verified:
        return False
    return ctx.to_comment_address or any(name == "spoofed_commands" for name, _ in ctx.effects)


def refuse_spoofed(ctx: Context) -> None:
    """Apply nothing, keep the message as screened (listable), and warn the real agent.

    Handling it as a stranger's mail instead would write the forged text into the
    agent's own tickets (the owner is a member) or open a ticket in the agent's name.
    """
    agent = ctx.rt.settings.agent(ctx.sender)
    assert agent is not None and ctx.identity is not None
    ctx.effects[:] = [e for e in ctx.effects if e[0] != "spoofed_commands"]
    what = "a note to the comment address" if ctx.to_comment_address else "#commands"
    log.warning("%s: %s from %s without proof of identity: refused", ctx.msg.message_id, what, ctx.sender)
    notify.send(ctx.rt, ctx.session, ticket=ctx.ticket, template="agent/spoofed", to=agent.email,
                extra={"sender": ctx.sender, "subject": ctx.msg.subject, "what": what,
                       "message_id": ctx.msg.message_id or ""},
                guard=True)  # forged mail must not become a way to flood an agent
    raise Stop("screened", f"{what} from agent address {ctx.sender}: {ctx.identity.how}; "
                           "nothing applied, agent warned")


def add_ccs_from_headers(ctx: Context, ticket: Ticket, *, first_message: bool = False) -> None:
    """People the requester copied on their mail become CC participants,
    so they get the public answers, as the requester would expect of a reply-all.

    On a reply, only where the mail proves it is the requester's: its reply token, one of
    our Message-IDs sent to them, or our MTA's DKIM/SPF/DMARC pass for their domain. A From and
    a subject tag are anyone's to write, and a forger's CC would get every later answer.
    The first message needs none: whoever writes it is the requester of a new ticket."""
    s = ctx.rt.settings
    own = set(s.helpdesk.all_addresses)
    requester = ctx.session.get(Contact, ticket.requester_id)
    if requester is None or ctx.sender != requester.email or ctx.from_forged:
        # Only the requester widens the audience; a CC or a forwarded-to reader may not, nor
        # a mail in the requester's name that our MTA found forged (DMARC fail).
        return
    skip = {ctx.sender, requester.email}
    copied = [a for a in dict.fromkeys(a.lower() for a in (*ctx.msg.to, *ctx.msg.cc))
              if a not in skip and base_address(a) not in own and s.agent(a) is None and "@" in a]
    if not copied:
        return
    if not first_message and not (ctx.decision is not None and ctx.decision.proven) and not from_authenticated(
            ctx.msg.header_all("authentication-results"), s.helpdesk.trusted_authserv_ids,
            ctx.sender.rpartition("@")[2]):
        ctx.hit("cc", False, f"{len(copied)} copied address(es) not added: no reply token, Message-ID of ours "
                             "or trusted DKIM/SPF/DMARC pass shows the requester sent this")
        return
    added = 0
    for addr in copied:
        if added >= MAX_CC_FROM_HEADERS:
            ctx.hit("cc", True, f"more than {MAX_CC_FROM_HEADERS} copied addresses: the rest ignored")
            break
        if add_participant(ctx.session, ticket, addr, "cc"):
            add_event(ctx.session, ticket, ctx.sender, "cc", None, addr, "copied on the requester's mail")
            added += 1


def new_ticket_from_message(ctx: Context) -> None:
    verdict = ctx.verdict
    assert verdict is not None
    if verdict.is_automatic:
        raise Stop("screened", f"{verdict.reason}; matches no ticket")
    if not ctx.sender:
        raise Stop("screened", "no sender address")
    if base_address(ctx.sender) in ctx.rt.settings.helpdesk.all_addresses:
        # Our own mail come back (a list, a forward rule) or a forgery: a ticket whose requester
        # is the help desk itself would send its answers to us.
        raise Stop("screened", f"from our own address {ctx.sender}; matches no ticket")
    if ctx.agent is not None and ctx.commands is not None and (
            ctx.commands.commands or ctx.commands.errors or ctx.release_only):
        open_on_behalf(ctx)
        return
    if ctx.quarantine_token and ctx.agent is None:
        refuse_list_reply_from_non_agent(ctx)
    cap = ctx.rt.settings.helpdesk.new_tickets_per_sender_per_hour
    # Not for mail imported as history: the cap guards against a live flood, and an old
    # mailbox holds what the operator chose to bring in (screening it would lose tickets).
    if not is_history(ctx.session) and new_tickets_from_mailbox_last_hour(ctx.session, ctx.sender, ctx.now) >= cap:
        raise Stop("screened", f"{mailbox_of(ctx.sender)} opened {cap} tickets in the last hour: rate limit")
    ticket = create_ticket(ctx, requester=ctx.sender, requester_name=ctx.sender_name,
                           subject=ctx.msg.subject, actor=ctx.sender)
    ctx.ticket = ticket
    kind = "auto" if verdict.kind is not None else "public"
    message = store_message(ctx, ticket, kind=kind, direction="in", text=ctx.msg.text)
    if verdict.kind is None:
        add_ccs_from_headers(ctx, ticket, first_message=True)
    assert ctx.decision is not None
    ctx.effects.append(("new_ticket", {
        "message": message, "confirm": verdict.may_answer and not ctx.unsure_spam,
        "hijack_of": ctx.decision.hijack_of}))
    ctx.outcome = "ticket"


def requester_message(ctx: Context) -> None:
    ticket = ctx.ticket
    assert ticket is not None
    rt = ctx.rt
    lines = ctx.visible_text.strip().split("\n", 1)
    rating = lines[0].strip().rstrip(".!")
    requester = ctx.session.get(Contact, ticket.requester_id)
    if (ticket.status_kind == "solved" and rating in rt.settings.helpdesk.ratings
            and requester is not None and ctx.sender == requester.email):  # not a CC's
        old = ticket.rating
        ticket.rating = rating
        add_event(ctx.session, ticket, ctx.sender, "rating", old, rating)
        ratings = rt.settings.helpdesk.ratings
        if len(lines) == 1 or not lines[1].strip():
            store_message(ctx, ticket, kind="public", direction="in", text=ctx.visible_text)
            ctx.outcome = "reply"
            return
        if ratings.index(rating) >= len(ratings) // 2:
            # "5" and "thanks!": rated, the ticket stays solved, and its agents read the words.
            message = store_message(ctx, ticket, kind="public", direction="in", text=ctx.visible_text)
            ticket.last_public_in_at = ctx.now
            ctx.effects.append(("requester_reply", {"message": message}))
            ctx.outcome = "reply"
            return
        # "1" and "it is broken again" (the worse half of helpdesk.ratings, listed worst
        # first): rated, and a reply like any other, which reopens the ticket.
    message = store_message(ctx, ticket, kind="public", direction="in", text=ctx.visible_text)
    add_ccs_from_headers(ctx, ticket)
    ticket.last_public_in_at = ctx.now
    if ticket.status_kind in ("pending", "solved", "closed"):
        set_status(rt, ctx.session, ticket, first_status(rt, "open").name, ctx.sender)
    ctx.effects.append(("requester_reply", {"message": message}))
    ctx.outcome = "reply"


def open_on_behalf(ctx: Context) -> None:
    """A verified agent's mail with commands and no ticket: #requester opens one for a customer."""
    agent = ctx.agent
    cmds = ctx.commands
    assert agent is not None and cmds is not None
    errors = validate(cmds, command_rules(ctx, None), has_ticket=False)
    requester = cmds.get("requester")
    if ctx.release_only:
        # Proven by the quarantine list's token, which vouches for #release and nothing more.
        other = [c.line for c in cmds.commands if c.name != "release"]
        if other:
            errors = [f"{other[0]}: only #release is read in a reply to the quarantine list"]
        elif not cmds.commands and not errors:
            errors = ["no #release line at the top of your reply: nothing was released "
                      "(write #release and the ids from the list)"]
    elif not errors and requester is None and not cmds.has("release"):
        errors = ["this message names no ticket: reply to a notice, or use #requester EMAIL to open one"]
    if errors:
        # There is no ticket to keep the words on: the mail stays listable as screened.
        notify.send(ctx.rt, ctx.session, ticket=None, template="agent/result", to=agent.email,
                    in_reply_to=ctx.msg.message_id, reply_number=_release_reply_number(ctx),
                    extra={"errors": errors, "changes": [], "collision": None, "subject": ctx.msg.subject})
        raise Stop("screened", "agent commands without a ticket refused: " + "; ".join(errors))
    if cmds.has("release"):
        release_by_mail(ctx)
    assert requester is not None
    ticket = create_ticket(ctx, requester=requester.arg.lower(), requester_name="",
                           subject=ctx.msg.subject, actor=agent.email, owner=agent.email)
    ctx.ticket = ticket
    agent_message(ctx, validated=True)


def refuse_list_reply_from_non_agent(ctx: Context) -> NoReturn:
    """A reply to the quarantine list from a spam.digest_to address that is no agent: it
    quotes held mail, so it must not become a ticket, and only an admin may release."""
    notify.send(ctx.rt, ctx.session, ticket=None, template="agent/result", to=ctx.sender,
                in_reply_to=ctx.msg.message_id, reply_number=QUARANTINE_REPLY_NUMBER,
                extra={"errors": [f"{one_line(ctx.sender, 320)} is not an agent of this help desk: only "
                                  "an agent with role admin can release held mail (#release, or "
                                  "`mailgate spam quarantine release ID` on the server)"],
                       "changes": [], "collision": None, "subject": ctx.msg.subject})
    raise Stop("screened", f"reply to the quarantine list from {ctx.sender}, who is not an agent")


def _release_reply_number(ctx: Context) -> int | None:
    """A result about #release carries the quarantine list's token: the admin may correct
    the command by replying to it."""
    cmds = ctx.commands
    if ctx.release_only or (cmds is not None and cmds.has("release")):
        return QUARANTINE_REPLY_NUMBER
    return None


def release_by_mail(ctx: Context) -> NoReturn:
    """An admin's reply to the quarantine digest: #release IDS. Each message is released as by
    `spam quarantine release` (queued to become a ticket, learned as ham once this commits);
    the admin gets the result, and the reply itself is kept as screened."""
    agent, cmds = ctx.agent, ctx.commands
    assert agent is not None and cmds is not None
    ids = cmds.ids_to_release()
    changes: list[str] = []
    not_done: list[str] = []
    released: dict[int, str] = {}
    for inbound_id in ids:
        row, why_not = take_out(ctx.session, ctx.rt.blobs, inbound_id)
        if row is None:  # validated a moment ago: released by someone else since, or damaged
            not_done.append(f"#{inbound_id}: {why_not}")
            continue
        changes.append(f"released #{inbound_id} from {one_line(row.from_addr or '', 320) or 'an unknown sender'} "
                       f"({one_line(row.subject or '', 80) or 'no subject'}): it becomes a ticket as usual, "
                       "and the spam filter learns it as ham")
        released[inbound_id] = row.raw_sha256
    if released:  # one lesson and one save of the model for the whole list
        ctx.after_commit.append(lambda: learn_released(ctx.rt, released))
    notify.send(ctx.rt, ctx.session, ticket=None, template="agent/result", to=agent.email,
                in_reply_to=ctx.msg.message_id, reply_number=QUARANTINE_REPLY_NUMBER,
                extra={"errors": [], "changes": changes, "not_done": not_done, "collision": None,
                       "subject": ctx.msg.subject})
    raise Stop("screened", f"{agent.email}: #release {' '.join(map(str, ids))}")


def command_rules(ctx: Context, ticket: Ticket | None) -> CommandRules:
    s = ctx.rt.settings
    session = ctx.session
    assert ctx.agent is not None
    canned = sorted(n[len("canned/"):-len(".txt.j2")] for n in ctx.rt.renderer.env.list_templates()
                    if n.startswith("canned/") and n.endswith(".txt.j2"))
    cmds = ctx.commands
    merge_targets: set[int] = set()
    for c in cmds.commands if cmds else ():
        number = merge_target(c.arg) if c.name == "merge" else None
        if number is not None:
            target = session.get(Ticket, number)
            # Not into a closed or solved ticket, nor spam: the merged requester's next mail
            # would land there unseen (a spam ticket also has the spammer as its requester).
            if (target is not None and target.merged_into is None and not target.from_spam
                    and target.status_kind not in ("solved", "closed")):
                merge_targets.add(target.number)  # type: ignore[arg-type]
    asked = cmds.ids_to_release() if cmds else []
    held = session.exec(select(Inbound.id).where(
        Inbound.id.in_(asked), Inbound.outcome == "quarantined")).all() if asked else []  # type: ignore[union-attr]
    ccs = session.exec(select(Participant.email).where(
        Participant.ticket_id == ticket.number, Participant.role == "cc")).all() if ticket else []
    return CommandRules(
        statuses=[st.name for st in s.helpdesk.statuses], priorities=list(s.helpdesk.priorities),
        categories=list(s.helpdesk.categories), tiers=[t.name for t in s.sla.tiers],
        agents=[a.email for a in s.agents], canned=canned, author=ctx.agent.email,
        author_is_admin=ctx.agent.role == "admin", owner=ticket.owner if ticket else None,
        ticket=ticket.number if ticket else None, merge_targets=frozenset(merge_targets),
        own_addresses=frozenset(s.helpdesk.all_addresses), ccs=frozenset(ccs),
        quarantined=frozenset(i for i in held if i is not None))


def render_canned(ctx: Context, ticket: Ticket, cmds: ParsedCommands) -> tuple[dict[str, str], list[str]]:
    """Every canned answer the message asks for, rendered before anything changes, so a
    broken template is an error reply and not a half-applied message."""
    out: dict[str, str] = {}
    errors: list[str] = []
    agent = ctx.agent
    assert agent is not None
    for c in cmds.commands:
        if c.name != "canned" or c.arg in out:
            continue
        try:
            out[c.arg] = ctx.rt.renderer.render_text(f"canned/{c.arg}.txt.j2", {
                "ticket": notify.ticket_context(ctx.rt, ctx.session, ticket),
                "helpdesk": notify.helpdesk_context(ctx.rt, ticket),
                "agent": {"name": agent.name, "email": agent.email}}).strip("\n")
        except Exception as exc:  # an operator's template: report it, do not crash the message
            errors.append(f"{c.line}: the canned answer failed to render: {type(exc).__name__}: {exc}")
    return out, errors


def agent_message(ctx: Context, *, validated: bool = False) -> None:
    ticket, agent = ctx.ticket, ctx.agent
    assert ticket is not None and agent is not None
    cmds = ctx.commands or ParsedCommands((), ctx.visible_text, ())
    if ctx.merged_from is not None and not ctx.to_comment_address and (cmds.commands or cmds.body.strip()):
        # A reply to a notice of a ticket merged since: its words were for that ticket's
        # requester, and its commands for that ticket. The surviving ticket has other
        # participants (another requester, the CCs of both), so nothing is sent or changed.
        store_message(ctx, ticket, kind="internal", direction="in", text=ctx.visible_text,
                      author_agent=agent.email)
        ctx.effects.append(("result", {"errors": [
            f"#{ctx.merged_from} was merged into #{ticket.number}: nothing was sent and no command applied; "
            f"your words are kept as an internal note on #{ticket.number}. Its mail goes to "
            + ", ".join(notify.requester_and_cc(ctx.session, ticket))
            + f"; to answer them, reply to a mail of #{ticket.number}"], "changes": []}))
        ctx.outcome = "note"
        return
    errors = [] if validated else validate(cmds, command_rules(ctx, ticket), has_ticket=True)
    canned: dict[str, str] = {}
    if not errors:
        canned, errors = render_canned(ctx, ticket, cmds)
    if errors:
        # Nothing changes and nobody but the agent is mailed; the words are kept as internal.
        store_message(ctx, ticket, kind="internal", direction="in", text=ctx.visible_text,
                      author_agent=agent.email)
        ctx.effects.append(("result", {"errors": errors, "changes": []}))
        ctx.outcome = "note"
        return
    collision = collision_notice(ctx, ticket)
    changes, body = apply_commands(ctx, ticket, cmds, canned)
    ticket = ctx.ticket  # after #merge the conversation continues on the surviving ticket
    assert ticket is not None
    is_note = ctx.to_comment_address or cmds.has("note") or cmds.has("spam")
    if is_note or not body.strip():
        collision = None  # it says the reply was delivered as well: a note is delivered to nobody
        message = store_message(ctx, ticket, kind="internal", direction="in", text=body,
                                author_agent=agent.email)
        if body.strip() and not cmds.has("spam"):
            ctx.effects.append(("note", {"message": message}))
            changes.append("internal note stored (not sent to the requester)")
        elif not is_note and not cmds.commands:
            # Only the quoted notice (or our tag) under a signature: sending the whole text on
            # would mail the notice to the customer. One result.
            changes.append("nothing was sent to the requester: mailgate found no text of yours in this "
                           "reply (all of it looked like a quote, a forwarded message or a signature); "
                           "it is kept as an internal note. Write your answer above any quote or signature")
            ctx.effects.append(("result", {"errors": [], "changes": changes, "collision": collision}))
            ctx.outcome = "note"
            return
        ctx.outcome = "note"
    else:
        message = store_message(ctx, ticket, kind="public", direction="out", text=body,
                                author_agent=agent.email)
        if ticket.first_responded_at is None:
            ticket.first_responded_at = ctx.now
        ticket.last_public_out_at = ctx.now
        if ticket.status_kind == "new" and not cmds.has("status"):
            set_status(ctx.rt, ctx.session, ticket, first_status(ctx.rt, "open").name, agent.email)
        ctx.effects.append(("answer", {"message": message}))
        ctx.effects.sort(key=lambda effect: effect[0] == "status")  # stable: the answer goes out first
        changes.append("answer sent to " + ", ".join(notify.requester_and_cc(ctx.session, ticket)))
        ctx.outcome = "reply"
    if cmds.commands or collision:
        ctx.effects.append(("result", {"errors": [], "changes": changes, "collision": collision}))


def collision_notice(ctx: Context, ticket: Ticket) -> str | None:
    """If another agent answered after the mail this agent replied to, say who and when."""
    assert ctx.agent is not None
    replied_to = [*ctx.msg.in_reply_to, *reversed(ctx.msg.references)]
    seen_at = None
    for mid in replied_to:
        row = ctx.session.exec(select(Outbox.created_at).where(Outbox.message_id == mid)).first()
        if row is None:
            row = ctx.session.exec(select(Message.created_at).where(Message.message_id == mid)).first()
        if row is not None:
            seen_at = row
            break
    if seen_at is None:
        return None
    later = ctx.session.exec(select(Message).where(
        Message.ticket_id == ticket.number, Message.kind == "public", Message.direction == "out",
        Message.author_agent.is_not(None), Message.author_agent != ctx.agent.email,  # type: ignore[union-attr]
        Message.created_at > seen_at).order_by(Message.created_at)).first()  # type: ignore[arg-type]
    if later is None:
        return None
    name = later.from_name or later.author_agent
    return (f"{name} <{later.author_agent}> answered the requester at "
            f"{as_utc(later.created_at):%Y-%m-%d %H:%M} UTC, after the message you "
            "replied to. Your reply was delivered as well.")


def apply_commands(ctx: Context, ticket: Ticket, cmds: ParsedCommands,
                   canned: dict[str, str]) -> tuple[list[str], str]:
    """Apply validated commands; returns the change lines and the text to send or keep."""
    rt, session = ctx.rt, ctx.session
    hd = rt.settings.helpdesk
    agent = ctx.agent
    assert agent is not None
    actor = agent.email
    changes: list[str] = []
    body = cmds.body
    top_canned: list[str] = []
    # #merge first: every other command of the message then acts on the surviving ticket.
    for c in sorted(cmds.commands, key=lambda c: c.name != "merge"):
        if c.name == "status":
            name = find_choice(c.arg, [st.name for st in hd.statuses]) or c.arg
            lines, lesson, tell_old = change_status(rt, session, ticket, name, actor)
            changes += lines or [f"status: {name} (unchanged)"]
            if lesson is not None:
                ctx.after_commit.append(lesson)
            status = hd.status(name)
            if tell_old is not None and status and status.notify_requester:
                ctx.effects.append(("status", {"old": tell_old}))
        elif c.name in ("priority", "category", "tier"):
            choices = {"priority": hd.priorities, "category": hd.categories,
                       "tier": [t.name for t in rt.settings.sla.tiers]}[c.name]
            value = find_choice(c.arg, choices) or (c.arg.lower() if c.name == "priority" else c.arg)
            line = change_field(rt, session, ticket, c.name, value, actor)
            changes.append(line or f"{c.name}: {value} (unchanged)")
            if c.name == "category" and ticket.owner is None and not cmds.has("assign"):
                # A category known only now may be what an assignment rule waits for.
                owner, why = pick_owner(rt, session, ticket)
                if owner and (line := change_owner(session, ticket, owner, "system", why)):
                    changes.append(line)
                    if owner != actor:
                        ctx.effects.append(("assigned", {"to": owner, "by": actor, "role": "owner"}))
        elif c.name == "assign":
            target = actor if c.arg.lower() == "me" else c.arg.lower()
            previous = ticket.owner
            line = change_owner(session, ticket, target, actor)
            changes.append(line or f"owner: {target} (unchanged)")
            if line and target != actor:
                ctx.effects.append(("assigned", {"to": target, "by": actor, "role": "owner"}))
            if line and previous and previous not in (actor, target) and rt.settings.agent(previous):
                # DESIGN.md section 3: reassignment is a notice; the agent who lost the ticket
                # must not go on thinking it is theirs.
                ctx.effects.append(("assigned", {"to": previous, "by": actor, "role": "former owner"}))
        elif c.name in ("assist", "cc"):
            role = "assistant" if c.name == "assist" else "cc"
            email = c.arg.lower()
            line = add_helper(session, ticket, email, role, actor)
            changes.append(line or f"{role} {email} (already there)")
            if line and role == "assistant" and email != actor:
                ctx.effects.append(("assigned", {"to": email, "by": actor, "role": "assistant"}))
        elif c.name == "uncc":
            email = c.arg.lower()
            for p in session.exec(select(Participant).where(
                    Participant.ticket_id == ticket.number, Participant.email == email,
                    Participant.role == "cc")).all():
                session.delete(p)
            add_event(session, ticket, actor, "cc removed", email, None)
            changes.append(f"cc removed: {email}")
        elif c.name == "canned":
            text = canned[c.arg]
            if c.inline:
                # A function replacement: the canned text is not a regex template.
                body = re.sub(rf"(?im)^[ \t]*#canned[ \t]+{re.escape(c.arg)}[ \t]*$",
                              lambda _m, t=text: t, body, count=1)
            else:
                top_canned.append(text)
            changes.append(f"canned answer {c.arg} inserted")
        elif c.name == "merge":
            source, target = ticket.number, merge_target(c.arg)
            assert target is not None  # validate() refused the commands otherwise
            ticket = merge_tickets(ctx, ticket, target)
            changes.append(f"merged #{source} into #{ticket.number}")
        elif c.name == "spam":
            changes.append(mark_spam(ctx, ticket))
        elif c.name == "requester":
            pass  # handled by open_on_behalf before we get here
    if top_canned:
        # The commands stand at the top, so that is where their canned answers go.
        body = "\n\n".join([*top_canned, body] if body.strip() else top_canned)
    ticket.updated_at = ctx.now
    return changes, body


def add_participant(session: Session, ticket: Ticket, email: str, role: str) -> bool:
    """Add a CC or assistant unless they are one already; True if added. Participants are
    only ever read by queries, so a Core INSERT (a Cc list costs one per address)."""
    key = {"ticket": ticket.number, "email": email, "role": role}
    if session.exec(_PARTICIPANT_EXISTS, params=key).first() is not None:
        return False
    session.connection().execute(_INSERT_PARTICIPANT, {"ticket_id": ticket.number, "email": email, "role": role})
    return True


def merge_tickets(ctx: Context, source: Ticket, target_number: int) -> Ticket:
    """Move the source's history, people and requester into the target; the source is closed
    and remembers the target, so later replies to it (tag, token, references) land there."""
    session = ctx.session
    target = session.get(Ticket, target_number)
    if target is None or target.number == source.number:  # validate() makes this unreachable
        raise ValueError(f"cannot merge #{source.number} into #{target_number}")
    actor = ctx.agent.email if ctx.agent else "system"
    told = notify.requester_and_cc(session, source)
    for m in session.exec(select(Message).where(Message.ticket_id == source.number)).all():
        m.ticket_id = target.number
        session.add(m)
    for p in session.exec(select(Participant).where(Participant.ticket_id == source.number)).all():
        add_participant(session, target, p.email, p.role)
    requester = session.get(Contact, source.requester_id)
    if requester is not None and source.requester_id != target.requester_id:
        add_participant(session, target, requester.email, "cc")
    source.merged_into = target.number
    set_status(ctx.rt, session, source, first_status(ctx.rt, "closed").name, actor)
    add_event(session, source, actor, "merged", None, target.number)
    add_event(session, target, actor, "merged from", None, source.number)
    ctx.effects.append(("merged", {"source": source.number, "source_subject": source.subject, "to": told}))
    ctx.ticket = target  # the agent's own message lands on the surviving ticket
    return target


def first_inbound_message(session: Session, ticket: Ticket) -> Message | None:
    """The ticket's first message with raw bytes: the one #spam and its undoing teach."""
    return session.exec(select(Message).where(
        Message.ticket_id == ticket.number, Message.direction == "in",
        Message.raw_sha256.is_not(None)).order_by(Message.id)).first()  # type: ignore[union-attr,arg-type]


def teach_filter(rt: Runtime, session: Session, ticket: Ticket,
                 is_spam: bool) -> tuple[Callable[[], bool] | None, str]:
    """The deferred lesson about the ticket's first message (None: nothing to teach) and what
    the change line says of it. Run it only once the change is committed: a rolled-back,
    retried transaction must not teach the filter the same message twice. The model itself
    remembers what feedback taught it (SpamModel.learn_bytes), so an undo moves exactly
    that lesson, and only if it was ever learned."""
    kind = "spam" if is_spam else "ham"
    # With [spam] enabled = false there is no model: the status change still works.
    model = rt.spam_model()
    if model is None:
        return None, "spam filter off: nothing learned"
    first = first_inbound_message(session, ticket)
    if first is None or not first.raw_sha256:
        return None, "no incoming message to learn from"
    raw = rt.blobs.get(first.raw_sha256)
    # The lesson runs in any case: learn_spam reads the model file under its lock, and this
    # process's copy may be older than what another instance taught since.
    if model.taught_as(raw) is is_spam:
        # Taught so before, and not undone since (the filter was off when it was undone).
        said = f"the spam filter already counts its first message as {kind}"
    else:
        said = "the spam filter learned its first message" + ("" if is_spam else " as ham")
    return (lambda: rt.learn_spam(raw, is_spam)), said


def _set_from_spam(session: Session, ticket: Ticket, value: bool) -> bool:
    """Flip the ticket's spam mark if it is not so already; False if it was. One conditional
    UPDATE: two agents (or an agent and the CLI) on two instances flip it, and teach, once."""
    changed = session.exec(update(Ticket).where(  # type: ignore[call-overload]
        Ticket.number == ticket.number, Ticket.from_spam == (not value)).values(from_spam=value))
    return bool(changed.rowcount)


def mark_spam(ctx: Context, ticket: Ticket) -> str:
    """Close as spam and teach the filter the ticket's first message; the change line."""
    if not _set_from_spam(ctx.session, ticket, True):
        # Both agents got the new-ticket notice: the second #spam must not count it twice.
        return "already marked as spam: nothing learned again"
    lesson, said = teach_filter(ctx.rt, ctx.session, ticket, True)
    if lesson is not None:
        ctx.after_commit.append(lesson)
    actor = ctx.agent.email if ctx.agent else "system"
    set_status(ctx.rt, ctx.session, ticket, first_status(ctx.rt, "closed").name, actor)
    add_event(ctx.session, ticket, actor, "spam", None, "learned" if lesson else "closed")
    return "marked as spam and closed; " + said


def unmark_spam(rt: Runtime, session: Session, ticket: Ticket,
                actor: str) -> tuple[str | None, Callable[[], bool] | None]:
    """A ticket closed as spam was reopened: it was not spam after all. Its requester counts
    as known again; the filter learns its first message as ham instead of spam. The change
    line (None if another agent undid it first) and the deferred lesson (see teach_filter)."""
    if not _set_from_spam(session, ticket, False):
        return None, None
    lesson, said = teach_filter(rt, session, ticket, False)
    add_event(session, ticket, actor, "not spam", None, "learned" if lesson else "kept")
    return "no longer marked as spam; " + said, lesson


def ticket_after_merges(session: Session, number: int | None) -> Ticket | None:
    """The ticket that mail for #number goes to: the one it was merged into, if it was."""
    seen: set[int] = set()
    while number is not None and number not in seen:
        seen.add(number)
        ticket = session.get(Ticket, number)
        if ticket is None or ticket.merged_into is None:
            return ticket
        number = ticket.merged_into
    return None


def record_bounce(ctx: Context) -> None:
    """A DSN about a mail we sent: mark that outbox row failed and note it on its ticket.

    Only a report that some recipient failed counts: "delayed", "delivered", "relayed" and
    "expanded" reports say the mail is still on its way or arrived. Only a row already
    sent can bounce; a report naming a queued one is forged (a requester knows the
    Message-IDs of what we mailed them) and must not cancel it. A mail sent with its own
    envelope sender (outbound.verp) bounces only by a report addressed to that sender: its
    Message-ID is known to everyone its recipient replied to, the sender only to the
    recipient's mailbox."""
    failed = ctx.msg.dsn_failed_recipients
    for mid in ctx.msg.dsn_original_message_ids:
        row = ctx.session.exec(select(Outbox).where(Outbox.message_id == mid)).first()
        if row is None:
            continue
        verp = is_bounce_address(row.mail_from)
        if (verp or ctx.rt.settings.outbound.verp) and not (verp and row.mail_from.lower() in ctx.recipients):
            # Not the address itself in the reason: it is kept on the report, where staff can
            # read it, and it must stay known only to the recipient's mailbox. A mail sent
            # before verp was turned on has no such address, and after that no proof at all.
            why = ("the report is not addressed to its envelope sender" if verp
                   else "it was sent before outbound.verp was turned on")
            ctx.hit("bounce", False, f"<{mid}>: outbox {row.id}: {why}: no proof that it bounced")
            continue
        if not failed or row.state != "sent":
            why = "no failed recipient in the report" if not failed else f"outbox {row.id} is {row.state}"
            ctx.hit("bounce", False, f"<{mid}>: {why}")
            continue
        row.state = "failed"
        recipients = ", ".join(failed)
        row.last_error = f"bounced: {recipients}"
        ctx.session.add(row)
        # Only the row's own recipients: a report may name any address, and one flagged by
        # mistake would get no more confirmations or notices. Never an agent's: their notices
        # and warnings are not for the loop guard to hold.
        # A report names the address as it was sent: an internationalised domain as its A-label.
        as_stored = {form: r for r in row.recipients.split(",") for form in (r, wire_address(r))}
        for address in {as_stored[f] for f in failed if f in as_stored}:
            if ctx.rt.settings.agent(address) is None:
                ctx.session.connection().execute(_MARK_BOUNCED, {"address": address, "at": ctx.now})
        ctx.hit("bounce", True, f"outbox {row.id} <{mid}> bounced for {recipients}")
        if row.ticket_id is not None:
            ticket = ticket_after_merges(ctx.session, row.ticket_id)
            if ticket is not None:
                add_event(ctx.session, ticket, "system", "bounce", None, recipients,
                          f"our message <{mid}> bounced")
                if ctx.ticket is None:
                    ctx.ticket = ticket


# --- effects -> outbox rows ------------------------------------------------------------------

def send_effects(ctx: Context) -> None:
    ticket = ctx.ticket
    if ticket is None:
        return
    rt, session = ctx.rt, ctx.session
    hd = rt.settings.helpdesk
    for name, data in ctx.effects:
        message: Message | None = data.get("message")
        if name == "new_ticket":
            if data["confirm"]:
                hijack = data.get("hijack_of")
                notify.send(rt, session, ticket=ticket, template="requester/created", to=ctx.sender,
                            message=message, in_reply_to=ctx.msg.message_id, record_kind="system",
                            extra={"hijack_notice": hijack}, hits=ctx.hits)
            if ticket.owner:
                recipients = [ticket.owner]
            elif hd.notify_group_on_new:
                recipients = unowned_recipients(rt, session, ticket)
            else:
                recipients = []
            notify.notify_agents(rt, session, ticket, "agent/new_ticket", recipients, message=message,
                                 exclude=ctx.sender)
        elif name == "requester_reply":
            notify.notify_agents(rt, session, ticket, "agent/requester_reply",
                                 notify.ticket_agents(rt, session, ticket,
                                                      unowned=unowned_recipients(rt, session, ticket)),
                                 message=message)
        elif name == "answer":
            assert message is not None and ctx.agent is not None
            # The mail answered: the requester's latest, which they have for sure; where they
            # wrote none as a person (list or bulk mail opened the ticket, or an agent did), the
            # list or bulk mail that opened it, never an out-of-office or bounce; else, as on a
            # ticket merged into this one, the latest of anyone else but an agent (see
            # notify.requester_thread_ids).
            requester = session.get(Contact, ticket.requester_id)
            from_requester = Message.from_addr == (requester.email if requester is not None else "")
            public = Message.kind == "public"
            last_in = session.exec(select(Message.message_id).where(
                Message.ticket_id == ticket.number, Message.direction == "in",
                Message.message_id.is_not(None),  # type: ignore[union-attr]
                public | (from_requester & col(Message.screen_kind).in_((LIST, BULK))),
                Message.author_agent.is_(None)).order_by(  # type: ignore[union-attr]
                case((from_requester, 0), else_=1), case((public, 0), else_=1),
                case((public, -Message.id), else_=Message.id))).first()  # type: ignore[operator]
            # The agent's files go on with the answer, and so do inline images of some size (a
            # screenshot pasted into the text) but not small ones (a signature's logo, icons).
            # Never attached mail: a client set to attach the original would send our notice,
            # with its ticket data, to the customer.
            files = [OutgoingFile(a.filename, a.content_type, a.data) for a in ctx.msg.attachments
                     if (not a.inline or len(a.data) >= INLINE_IMAGE_SENT_FROM)
                     and not a.content_type.startswith("message/") and a.content_type not in NOT_SENT_ON
                     and a.filename.lower() != "winmail.dat"]
            size = sum(len(f.data) for f in files)
            left_out: list[str] = []
            if size > ANSWER_FILES_MAX_BYTES:
                # Each recipient's copy is an outbox row of its own: keep them small, and say so.
                files = []
                left_out.append(f"answer sent without its files: {math.ceil(size / 2**20 * 100) / 100:.2f} MB is "
                                f"over the {ANSWER_FILES_MAX_BYTES / 2**20:.0f} MB mailgate sends with an answer; "
                                "share them another way")
            if any(d.startswith(("winmail.dat not unpacked", "winmail.dat could not be decoded"))
                   for d in ctx.msg.defects):
                left_out.append("winmail.dat was not sent on: mailgate could not unpack the files in it, and it "
                                "holds your whole mail, the quoted notice too; attach the files again as ordinary "
                                "attachments (in Outlook, send as HTML or plain text, not Rich Text)")
            if left_out:
                notify.send(rt, session, ticket=ticket, template="agent/result", to=ctx.agent.email,
                            in_reply_to=ctx.msg.message_id, extra={
                                "errors": [], "collision": None, "subject": ctx.msg.subject, "changes": left_out})
            for to in notify.requester_and_cc(session, ticket):
                # Only mail they have: a requester merged in from another ticket never had
                # this one's requester's mail, nor its Message-ID (References still thread it).
                seen = notify.seen_by(session, ticket, to)
                notify.send(rt, session, ticket=ticket, template="requester/answer", to=to,
                            message=message, in_reply_to=last_in if last_in in seen else None,
                            references=notify.first_and_latest(seen), automatic=False,
                            from_name=f"{ctx.agent.name} via {hd.name}", files=files)
        elif name == "note":
            # Reply-To is the comment address: answering a note is a note again, so the
            # note quoted in that answer cannot reach the requester by a slip of the client.
            notify.notify_agents(rt, session, ticket, "agent/note",
                                 notify.ticket_agents(rt, session, ticket,
                                                      unowned=unowned_recipients(rt, session, ticket)),
                                 message=message, exclude=ctx.sender, reply_base=hd.comment_address)
        elif name == "status":
            notify.status_changed(rt, session, ticket, data["old"], hits=ctx.hits)
        elif name == "merged":
            for to in data["to"]:
                if not notify.wrote_as_person(session, ticket, to):
                    continue
                notify.send(rt, session, ticket=ticket, template="requester/merged", to=to,
                            extra={"merged_from": data["source"], "merged_subject": data["source_subject"]},
                            record_kind="system", hits=ctx.hits)
        elif name == "assigned":
            notify.notify_agents(rt, session, ticket, "agent/assigned", [data["to"]], message=None,
                                 extra={"by": data["by"], "role": data.get("role", "owner")})
        elif name == "result":
            assert ctx.agent is not None
            # The result of a note answers to the comment address: a reply to it, such as a
            # second thought on the note, must be a note again, never mail to the requester.
            # Not other results kept as notes (refused commands, commands alone, a ticket
            # merged since): a reply to those is the agent's answer, sent on.
            wrote_note = ctx.to_comment_address or (ctx.commands is not None and ctx.commands.has("note"))
            notify.send(rt, session, ticket=ticket, template="agent/result", to=ctx.agent.email,
                        in_reply_to=ctx.msg.message_id,
                        reply_base=hd.comment_address if wrote_note else None,
                        extra={"errors": data["errors"], "changes": data["changes"],
                               "collision": data.get("collision"), "subject": ctx.msg.subject})
