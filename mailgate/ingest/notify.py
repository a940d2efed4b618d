"""Notices as outbox rows, written in the transaction of the change that caused them.

Templates get a whitelisted context built here (`ticket_context`,
`message_context`): public fields only, so an internal note cannot reach a
requester's template by any path. Automatic mail passes the loop guard: no
more than the configured number per recipient per hour and per day, never to
our own addresses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import bindparam, case, func, insert
from sqlmodel import Session, select

from mailgate.domain import base_address, mailbox_of, tagged_subject
from mailgate.outbox import OutgoingFile, enqueue
from mailgate.runtime import Runtime
from mailgate.store.engine import as_utc, insert_object, is_history, iso, now_for
from mailgate.store.tables import Attachment, AutoReplyLog, Contact, Message, Outbox, Participant, Ticket

log = logging.getLogger(__name__)


# Built once (see pipeline: building a statement costs more than running it).
_INSERT_AUTO_REPLY = insert(AutoReplyLog.__table__)  # type: ignore[attr-defined]
_THREAD_IDS = select(Message.message_id).where(
    Message.ticket_id == bindparam("ticket"), Message.message_id.is_not(None),  # type: ignore[union-attr]
    Message.kind != "internal").order_by(Message.id)  # type: ignore[arg-type]
# What a requester or CC has seen of the thread: the mail they wrote or were sent (To, Cc:
# a colleague copied on the requester's mail has it), and what we sent them. Not the mail of
# another ticket's requester merged into this one, which they never had. Never an agent's
# own mail to us: its Message-ID names the agent's mail host, and the customer never
# received that message (they got our copy, in the outbox).
_REQUESTER_THREAD_IDS = select(Message.message_id, Message.created_at).where(
    Message.ticket_id == bindparam("ticket"), Message.message_id.is_not(None),  # type: ignore[union-attr]
    Message.kind != "internal", Message.author_agent.is_(None),  # type: ignore[union-attr]
    Message.direction == "in",  # what we sent them comes from the outbox: never shadow or failed mail
    (Message.from_addr == bindparam("to"))
    | ("," + Message.to_addrs + ",").like("%," + bindparam("to_pattern") + ",%", escape="\\"))
# Only mail sent to this recipient: each copy has its own Message-ID, and naming one sent to
# another would let a CC forge a delivery report that flags the requester's address.
_SENT_TO_RECIPIENT = select(Outbox.message_id, Outbox.created_at).where(
    Outbox.ticket_id == bindparam("ticket"), Outbox.template.startswith("requester/"),  # type: ignore[attr-defined]
    Outbox.recipients == bindparam("to"), Outbox.state.not_in(("shadow", "failed")))  # type: ignore[attr-defined]
_BOUNCED_AT = select(Contact.bounced_at).where(Contact.email == bindparam("email"),
                                               Contact.bounced_at.is_not(None))  # type: ignore[union-attr]
_AUTO_REPLIES_SINCE = select(
    func.count(), func.coalesce(func.sum(case((AutoReplyLog.sent_at > bindparam("hour_ago"), 1), else_=0)), 0),
).where(AutoReplyLog.recipient == bindparam("recipient"), AutoReplyLog.sent_at > bindparam("day_ago"))
# The screen verdict of an address's latest message on a ticket, auto-replies and bounces
# left out (a requester's out-of-office reply does not make them a list).
_LATEST_SCREEN_KIND = select(Message.screen_kind).where(
    Message.ticket_id == bindparam("ticket"), Message.direction == "in",
    Message.from_addr == bindparam("address"),
    Message.screen_kind.is_(None) | Message.screen_kind.in_(("list", "bulk")),  # type: ignore[union-attr]
).order_by(Message.id.desc()).limit(1)  # type: ignore[union-attr]
_ATTACHMENTS = select(Attachment.filename, Attachment.content_type, Attachment.size).where(
    Attachment.message_id == bindparam("message")).order_by(Attachment.id)
_PARTICIPANTS_IN_ROLE = select(Participant.email).where(
    Participant.ticket_id == bindparam("ticket"), Participant.role == bindparam("role"))


def ticket_context(rt: Runtime, session: Session, ticket: Ticket) -> dict[str, Any]:
    # Deliberately not views.ticket_summary: that is the operator's JSON and may grow fields;
    # this is the whitelist a (possibly site-edited) template may see, nothing internal.
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


# A notice to agents carries at most this much of the message's text: one 25 MB mail made a
# 30 MB notice per agent (over most relays' limits, so nobody was told) and an outbox of
# agents x its size. Answers to requesters are never cut.
NOTICE_TEXT_MAX_CHARS = 64_000


def _notice_text(text: str, ticket_number: int | None) -> str:
    if len(text) <= NOTICE_TEXT_MAX_CHARS:
        return text
    cut = text.rfind("\n", 0, NOTICE_TEXT_MAX_CHARS)
    cut = cut if cut > NOTICE_TEXT_MAX_CHARS // 2 else NOTICE_TEXT_MAX_CHARS
    return (f"{text[:cut]}\n\n[... {len(text) - cut} more characters: mailgate tickets show "
            f"{ticket_number if ticket_number is not None else ''}]")


def message_context(session: Session, message: Message, *, for_agents: bool = False) -> dict[str, Any]:
    """for_agents: the text cut to NOTICE_TEXT_MAX_CHARS."""
    # The attachments, so that an agent working by mail knows a screenshot or a log is there.
    attachments = session.exec(_ATTACHMENTS, params={"message": message.id}).all() if message.id else []
    text = _notice_text(message.text, message.ticket_id) if for_agents else message.text
    return {"from": message.from_addr, "from_name": message.from_name, "text": text,
            "subject": message.subject, "created_at": iso(message.created_at),
            "attachments": [{"filename": name, "content_type": ctype, "size": size, "size_text": _size_text(size)}
                            for name, ctype, size in attachments]}


def _size_text(size: int) -> str:
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def helpdesk_context(rt: Runtime, ticket: Ticket | None = None) -> dict[str, Any]:
    """address: the one mail about `ticket` comes from (queue_address)."""
    hd = rt.settings.helpdesk
    return {"name": hd.name, "address": queue_address(rt, ticket), "subject_tag": hd.subject_tag,
            "ratings": list(hd.ratings)}


def thread_ids(session: Session, ticket: Ticket) -> list[str]:
    """Message-IDs for References in mail to agents: the ticket's first message and its
    latest ones."""
    ids = session.exec(_THREAD_IDS, params={"ticket": ticket.number}).all()
    return first_and_latest([i for i in ids if i])


def requester_thread_ids(session: Session, ticket: Ticket, recipient: str) -> list[str]:
    """thread_ids for mail to a requester or CC: only mail they have seen."""
    return first_and_latest(seen_by(session, ticket, recipient))


def seen_by(session: Session, ticket: Ticket, recipient: str) -> list[str]:
    """The Message-IDs of the ticket's mail that `recipient` has, oldest first (see
    _REQUESTER_THREAD_IDS and _SENT_TO_RECIPIENT)."""
    pattern = recipient.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    rows = [*session.exec(_REQUESTER_THREAD_IDS, params={"ticket": ticket.number, "to": recipient,
                                                          "to_pattern": pattern}).all(),
            *session.exec(_SENT_TO_RECIPIENT, params={"ticket": ticket.number, "to": recipient}).all()]
    rows.sort(key=lambda row: as_utc(row[1]))
    return list(dict.fromkeys(message_id for message_id, _ in rows if message_id))


def first_and_latest(ids: list[str]) -> list[str]:
    return ids[:1] + ids[-8:] if len(ids) > 9 else ids


def queue_address(rt: Runtime, ticket: Ticket | None) -> str:
    """The address mail about a ticket comes from: its queue's (the support address the
    customer wrote to), or the main support address."""
    hd = rt.settings.helpdesk
    return ticket.queue if ticket is not None and ticket.queue in hd.queues else hd.address


def loop_guard_allows(rt: Runtime, session: Session, recipient: str) -> bool:
    hd = rt.settings.helpdesk
    if base_address(recipient) in hd.all_addresses or recipient.split("@")[0] in ("mailer-daemon", "postmaster"):
        return False
    now = now_for(session)
    hour_ago = now - timedelta(hours=1)
    # Counted per mailbox: carol+1@ to carol+25@ reach one person, and a forged From
    # with a new +tag each time must not multiply what she gets.
    last_day, last_hour = session.exec(_AUTO_REPLIES_SINCE, params={
        "recipient": mailbox_of(recipient), "day_ago": now - timedelta(days=1), "hour_ago": hour_ago}).one()
    return last_hour < hd.auto_reply_limit_per_hour and last_day < hd.auto_reply_limit_per_day


class PrivacyError(RuntimeError):
    """A requester-facing template was about to receive an internal message."""


def is_requester_template(template: str) -> bool:
    return template.startswith("requester/")


def status_template(rt: Runtime, status: str) -> str:
    """`requester/status-<name>` if the site or package has one, else `requester/status`."""
    name = f"requester/status-{status}"
    if rt.renderer.exists(f"{name}.subject.j2") and rt.renderer.exists(f"{name}.txt.j2"):
        return name
    return "requester/status"


def wrote_as_person(session: Session, ticket: Ticket, address: str) -> bool:
    """False when `address` last wrote on `ticket` as a list or as bulk mail: such mail opens
    a ticket but gets no automatic mail (RFC 3834, DESIGN.md section 4), also later, when
    the ticket changes status, until a person writes from that address on the ticket."""
    kind = session.exec(_LATEST_SCREEN_KIND, params={"ticket": ticket.number, "address": address}).first()
    return kind is None


def status_changed(rt: Runtime, session: Session, ticket: Ticket, old_status: str,
                   hits: list[dict[str, Any]] | None = None) -> None:
    """Tell the requester, if the new status says so; the one rule for mail, CLI and jobs."""
    status = rt.settings.helpdesk.status(ticket.status)
    if status is None or not status.notify_requester or ticket.from_spam or ticket.merged_into:
        return
    requester = session.get(Contact, ticket.requester_id)
    if requester is not None and requester.email and wrote_as_person(session, ticket, requester.email):
        send(rt, session, ticket=ticket, template=status_template(rt, ticket.status), to=requester.email,
             extra={"old_status": old_status}, record_kind="system", hits=hits)


def send(rt: Runtime, session: Session, *, ticket: Ticket | None, template: str, to: str,
         extra: dict[str, Any] | None = None, message: Message | None = None,
         in_reply_to: str | None = None, automatic: bool = True, from_name: str | None = None,
         record_kind: str | None = None, hits: list[dict[str, Any]] | None = None,
         reply_base: str | None = None, guard: bool | None = None,
         references: Sequence[str] | None = None, reply_number: int | None = None,
         files: Sequence[OutgoingFile] = ()) -> int | None:
    """Queue one mail about `ticket` (None: about no ticket) to `to`; its outbox row id,
    or None if the loop guard held it back.

    record_kind: also keep it as a ticket message. reply_base: the address whose
    plus form goes into Reply-To instead of the support address (the comment
    address for notes, so that answering a note is a note again). guard: apply the
    per-recipient loop guard (default: to automatic mail for anyone but an agent).
    references: the ticket's thread_ids, when the caller already has them. reply_number:
    see outbox.compose.
    """
    if is_requester_template(template) and message is not None and message.kind != "public":
        # Defence in depth: callers only ever pass public messages here; if one ever
        # does not, fail the transaction loudly rather than mail a note to a customer.
        raise PrivacyError(f"{template}: refusing to render a {message.kind} message for {to}")
    # Mail imported as history is never sent (shadow rows): no loop to guard against.
    guarded = (guard if guard is not None else automatic and rt.settings.agent(to) is None) and not is_history(
        session)
    if guarded and not loop_guard_allows(rt, session, to):
        log.warning("ticket %s: loop guard holds back %s to %s", ticket.number if ticket else "-", template, to)
        if hits is not None:
            hits.append({"step": "notify", "hit": True, "reason": f"loop guard: no {template} to {to}"})
        return None
    if guarded and (bounced_at := session.exec(_BOUNCED_AT, params={"email": to}).first()) is not None:
        log.info("ticket %s: %s to %s held back: the address bounced", ticket.number if ticket else "-",
                 template, to)
        if hits is not None:
            hits.append({"step": "notify", "hit": True,
                         "reason": f"no {template} to {to}: mail to it bounced at {iso(bounced_at)}"})
        return None
    hd = rt.settings.helpdesk
    context = {
        "helpdesk": helpdesk_context(rt, ticket),
        "ticket": ticket_context(rt, session, ticket) if ticket is not None else None,
        "message": message_context(session, message, for_agents=not is_requester_template(template))
        if message else None,
        "tagged_subject": tagged_subject(hd.subject_tag, ticket.number or 0, ticket.subject)
        if ticket is not None else "",
        **(extra or {}),
    }
    number = ticket.number if ticket is not None else None
    if references is None and ticket is not None:
        references = (requester_thread_ids(session, ticket, to) if is_requester_template(template)
                      else thread_ids(session, ticket))
    sender = queue_address(rt, ticket)
    outbox_id, mail = enqueue(session, rt.settings, rt.renderer, template=template, to=to, context=context,
                              ticket_number=number, in_reply_to=in_reply_to, references=references or (),
                              automatic=automatic, from_name=from_name, reply_base=reply_base,
                              reply_number=reply_number, files=files, sender=sender)
    if guarded:
        # Appended with Core, like the outbox row: only ever counted, never an object.
        session.connection().execute(_INSERT_AUTO_REPLY, {"recipient": mailbox_of(to), "sent_at": now_for(session)})
    if record_kind is not None and ticket is not None:
        insert_object(session, Message(
            ticket_id=ticket.number, outbox_id=outbox_id, kind=record_kind, direction="out",
            from_addr=sender, from_name=from_name or hd.name,
            to_addrs=to, subject=mail.subject, text=mail.text, full_text=mail.text,
            message_id=mail.message_id, in_reply_to=in_reply_to, created_at=now_for(session),
        ))
    return outbox_id


def requester_and_cc(session: Session, ticket: Ticket) -> list[str]:
    requester = session.get(Contact, ticket.requester_id)
    out = [requester.email] if requester and requester.email else []
    out += session.exec(_PARTICIPANTS_IN_ROLE, params={"ticket": ticket.number, "role": "cc"}).all()
    return list(dict.fromkeys(out))


def ticket_agents(rt: Runtime, session: Session, ticket: Ticket, *,
                  unowned: Sequence[str] = ()) -> list[str]:
    """Owner and assistants who are agents still; without any, `unowned` (the queue's group,
    see apply). Someone removed from [[agents]] keeps the field until it is changed, but no
    customer mail: it went to them alone, and no agent heard of it."""
    out: list[str] = [ticket.owner] if ticket.owner else []
    out += session.exec(_PARTICIPANTS_IN_ROLE, params={"ticket": ticket.number, "role": "assistant"}).all()
    out = [a for a in out if rt.settings.agent(a) is not None]
    if not out:
        out = list(unowned)
    return list(dict.fromkeys(out))


def notify_agents(rt: Runtime, session: Session, ticket: Ticket, template: str, recipients: Iterable[str],
                  *, message: Message | None, exclude: str | None = None,
                  extra: dict[str, Any] | None = None, reply_base: str | None = None) -> None:
    """One notice per agent; each carries a Reply-To token valid for that agent alone."""
    agents = [a for a in dict.fromkeys(recipients) if a != exclude]
    references = thread_ids(session, ticket) if agents else ()  # one query, not one per agent
    for agent in agents:
        send(rt, session, ticket=ticket, template=template, to=agent, message=message,
             in_reply_to=message.message_id if message else None, extra=extra,
             reply_base=reply_base, references=references)
