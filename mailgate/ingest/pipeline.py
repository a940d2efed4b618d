"""The ingest pipeline: one message, one transaction, steps run from a table.

Each step is a small function over the Context; it records what it found in
`ctx.hits` (kept with the message as rule_hits). Outcomes that end the work
early (duplicate, screened, quarantined) are `Stop` exceptions that the driver
catches; `UnusableMessage` from parsing makes a dead letter at once; any other
exception is retried by the spool and in the end kept as a dead letter.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.header import decode_header, make_header
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import parseaddr
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlmodel import Session, select

from mailgate import domain, spool
from mailgate.config import Agent
from mailgate.ingest import apply
from mailgate.ingest.commands import ParsedCommands, parse_commands
from mailgate.ingest.identify import (
    Identity,
    dmarc_failed,
    identify_agent,
    rewritten_by_own_list,
    sender_behind_own_list,
    spf_pass,
)
from mailgate.ingest.parse import ParsedMessage, UnusableMessage, parse_message
from mailgate.ingest.replytext import visible_reply_text
from mailgate.ingest.route import RouteDecision, RouteFacts, decide_route
from mailgate.ingest.screen import ScreenVerdict, screen_message
from mailgate.ingest.stop import Stop
from mailgate.runtime import Runtime
from mailgate.store.engine import as_utc, is_history, lock_message_ids, session_scope, utcnow
from mailgate.store.tables import Contact, Inbound, Message, Outbox, Ticket

if TYPE_CHECKING:
    from mailgate.ingest.ahead import ParseAhead
    from mailgate.spamfilter import SpamScore

log = logging.getLogger(__name__)


@dataclass
class Context:
    rt: Runtime
    session: Session
    inbound: Inbound
    raw: bytes
    now: datetime
    prepared: Prepared | None = None
    parsed: ParsedMessage | None = None
    verdict: ScreenVerdict | None = None
    sender: str = ""
    sender_name: str = ""
    recipients: tuple[str, ...] = ()
    to_comment_address: bool = False
    token_ticket: int | None = None
    bad_token_ticket: int | None = None
    # Our MTA's trusted Authentication-Results say the From domain disowns this mail (DMARC
    # fail): the From is forged, and being that address proves nothing (identify.dmarc_failed).
    from_forged: str | None = None
    via_own_group: bool = False  # From rewritten to our address by our own group
    # A reply token of the quarantine list, valid for the sender: proof for #release only.
    quarantine_token: bool = False
    release_only: bool = False  # the agent is proven by that token: nothing but #release applies
    agent: Agent | None = None  # a verified agent
    identity: Identity | None = None
    spam_score: float | None = None
    # Scored as spam, but let through by spam.min_known_words: ticketed, never answered by
    # itself (a confirmation to a spammer is backscatter).
    unsure_spam: bool = False
    decision: RouteDecision | None = None
    ticket: Ticket | None = None
    merged_from: int | None = None  # the ticket the route named, merged into ctx.ticket
    visible_text: str = ""
    commands: ParsedCommands | None = None
    body_hash: str = ""
    outcome: str = "ticket"
    effects: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    after_commit: list[Callable[[], object]] = field(default_factory=list)
    stored: list[Message] = field(default_factory=list)  # the messages this mail became
    hits: list[dict[str, Any]] = field(default_factory=list)

    def hit(self, step: str, hit: bool, reason: str) -> None:
        self.hits.append({"step": step, "hit": hit, "reason": reason})

    @property
    def msg(self) -> ParsedMessage:
        assert self.parsed is not None
        return self.parsed


# --- steps ------------------------------------------------------------------------

@dataclass(frozen=True)
class Prepared:
    """The pure, costly part of the work, done before the transaction (and, on SQLite, the
    database's single write lock) is taken: parsing and spam scoring."""

    parsed: ParsedMessage
    body_hash: str
    spam: SpamScore | None  # None: the filter is off


def prepare(rt: Runtime, raw: bytes) -> Prepared:
    parsed = parse_message(raw)  # UnusableMessage propagates: a dead letter at once
    model = rt.spam_model()
    spam = rt.settings.spam
    score = (model.score_bytes(raw, spam.threshold, parsed.mime, min_known_words=spam.min_known_words)
             if model is not None else None)
    return Prepared(parsed=parsed, body_hash=spool.body_hash(raw), spam=score)


def step_parse(ctx: Context) -> None:
    if ctx.prepared is None:
        ctx.prepared = prepare(ctx.rt, ctx.raw)
    ctx.parsed = ctx.prepared.parsed
    ctx.body_hash = ctx.prepared.body_hash
    detail = f"{len(ctx.msg.attachments)} attachment(s)"
    if ctx.msg.defects:
        detail += "; repaired: " + "; ".join(ctx.msg.defects[:5])
    ctx.hit("parse", bool(ctx.msg.defects), detail)


# The message path's queries are built once: building a statement costs SQLAlchemy more than
# SQLite needs to run it (0.14 against 0.10 ms per query here, bench/worker_steps.py).
# When a message is tried again after the database, not the message, failed.
DATABASE_RETRY = timedelta(seconds=30)
# References a reply is routed by: the newest ones (RFC 5322 3.6.4 lets clients trim the list).
MAX_THREAD_IDS = 100
_INBOUND_BY_MESSAGE_ID = select(Inbound.id, Inbound.body_hash, Inbound.state, Inbound.outcome,
                               Inbound.ticket_number).where(Inbound.message_id_header == bindparam("mid"))
_TICKET_OF_UNBLOCKED_REQUESTER = select(Ticket.number).join(Contact, Contact.id == Ticket.requester_id).where(
    Contact.email == bindparam("email"), Ticket.from_spam == False).limit(1)  # noqa: E712
_TICKETS_BY_MESSAGE_IDS = select(Message.message_id, Message.ticket_id).where(
    Message.message_id.in_(bindparam("ids", expanding=True)), Message.ticket_id.is_not(None))  # type: ignore[union-attr]
_MESSAGE = Message.__table__  # type: ignore[attr-defined]
_SET_RULE_HITS = update(_MESSAGE).where(_MESSAGE.c.id == bindparam("message")).values(
    rule_hits=bindparam("rule_hits"))
_OUTBOX_RECIPIENTS = select(Outbox.recipients).where(Outbox.message_id == bindparam("mid"))
_FIRST_MESSAGE_SOURCE = select(Inbound.source).join(Message, Message.inbound_id == Inbound.id).where(
    Message.ticket_id == bindparam("ticket")).order_by(Message.id).limit(1)


def step_dedupe(ctx: Context) -> None:
    mid = ctx.msg.message_id
    if not mid:
        ctx.hit("dedupe", False, "no Message-ID")
        return
    # Two instances may hold the same message at once (sent to both): serialised on its
    # Message-ID, the second one sees the first one's outcome.
    lock_message_ids(ctx.session, ctx.rt.engine, [mid])
    # Message-ID alone is not enough: an attacker could reuse one to suppress a real mail.
    # Only the Message-ID goes to the database, so that its index is used: with the other
    # conditions SQLite chose the state index and read every done row (slower each day).
    # A purged copy is no earlier delivery: nothing of it is left to find or release.
    earlier = next(((i, number) for i, body_hash, state, outcome, number in ctx.session.exec(
        _INBOUND_BY_MESSAGE_ID, params={"mid": mid}).all()
        if body_hash == ctx.body_hash and state == "done" and outcome not in ("duplicate", "purged")
        and i != ctx.inbound.id), None)
    if earlier is not None:
        # The ticket the first copy landed on: `mailgate ingest` prints it for a redelivery too.
        ctx.ticket = ctx.session.get(Ticket, earlier[1]) if earlier[1] is not None else None
        raise Stop("duplicate", f"same Message-ID and body as inbound {earlier[0]}")
    ctx.hit("dedupe", False, "first time seen")


def step_screen(ctx: Context) -> None:
    ctx.verdict = screen_message(ctx.msg, envelope_from=ctx.inbound.envelope_from,
                                 own_addresses=ctx.rt.settings.helpdesk.all_addresses)
    ctx.hit("screen", ctx.verdict.kind is not None, ctx.verdict.reason or "written by a person")


def _take_sender_behind_own_group(ctx: Context) -> None:
    """The person behind a From our own group rewrote to our address (docs/parsing.md), as
    the sender, where that is safe."""
    hd = ctx.rt.settings.helpdesk
    original_from_present = bool(ctx.msg.header_all("x-original-from"))
    # Also where nobody can be named behind it: such mail is no mail of ours all the same.
    ctx.via_own_group = rewritten_by_own_list(
        ctx.msg.from_addr, ctx.msg.from_name, original_from_present=original_from_present,
        own_addresses=hd.all_addresses)
    behind = sender_behind_own_list(ctx.msg.from_addr, ctx.msg.from_name, ctx.msg.original_from,
                                    ctx.msg.reply_to, hd.all_addresses,
                                    original_from_present=original_from_present)
    if behind is None:
        return
    if hd.trusted_authserv_ids and spf_pass(
            ctx.msg.header_all("authentication-results"), hd.trusted_authserv_ids,
            ctx.msg.from_addr.rpartition("@")[2]) is None:
        # Where our MTA authenticates mail, the rewrite must be provably our group's: an
        # SPF pass for our own domain (the group's bounce address). Anyone can write our
        # address in From, or replay a DKIM-signed mail of ours with X-Original-From
        # added, and the person named behind it would escape the DMARC check of their
        # own From and the spam filter as a known requester.
        ctx.hit("sender", False, f"From our address without a trusted SPF pass for it: {behind[1]} "
                                 "not taken as the sender")
    elif ctx.rt.settings.agent(behind[1]) is None:
        ctx.sender_name, ctx.sender = behind
        ctx.hit("sender", True, f"From rewritten to our address by our own group: the sender is {behind[1]}")
    else:
        # An agent's address there proves nothing (the group signs for our domain), and an
        # agent's mail needs proof: left as mail from our own address.
        ctx.hit("sender", False, f"From rewritten by our own group for agent {behind[1]}: not taken")


def step_identify(ctx: Context) -> None:
    hd = ctx.rt.settings.helpdesk
    ctx.sender = ctx.msg.from_addr or (ctx.inbound.envelope_from or "").lower()
    ctx.sender_name = ctx.msg.from_name
    _take_sender_behind_own_group(ctx)
    envelope = tuple(a for a in ctx.inbound.envelope_to.split(",") if a)
    ctx.recipients = tuple(dict.fromkeys(
        a.lower() for a in (*envelope, *ctx.msg.delivered_to, *ctx.msg.to, *ctx.msg.cc)))
    for addr in ctx.recipients:
        if domain.base_address(addr) == hd.comment_address:
            ctx.to_comment_address = True
        plus = domain.parse_plus_address(addr)
        if plus is None or plus[0] not in hd.all_addresses:
            continue
        _, number, token = plus
        if number == domain.QUARANTINE_REPLY_NUMBER:
            # Not a ticket's token: it proves a reply to the quarantine list, and is read as
            # proof only for a #release in it (step_commands), never for a ticket.
            ctx.quarantine_token = domain.token_is_valid(hd.secret_key, number, ctx.sender, token)
            continue
        if domain.token_is_valid(hd.secret_key, number, ctx.sender, token):
            ctx.token_ticket = number
        else:
            ctx.bad_token_ticket = number
    ctx.from_forged = dmarc_failed(ctx.msg.header_all("authentication-results"), hd.trusted_authserv_ids,
                                   ctx.sender.rpartition("@")[2])
    ctx.identity = identify_agent(
        sender=ctx.sender, agent_emails=[a.email for a in ctx.rt.settings.agents],
        token_valid_for_sender=ctx.token_ticket is not None,
        auth_results=ctx.msg.header_all("authentication-results"),
        trusted_ids=hd.trusted_authserv_ids)
    if ctx.identity is not None and ctx.identity.verified:
        ctx.agent = ctx.rt.settings.agent(ctx.sender)
    ctx.hit("identify", ctx.identity is not None,
            ctx.identity.how if ctx.identity else f"sender {ctx.sender or 'unknown'}")


def _known_correspondent(ctx: Context) -> bool:
    if ctx.agent is not None:
        return True
    if ctx.quarantine_token:
        # A reply to the quarantine list quotes spam and must not be held itself. The token
        # is made only for the list's recipients, so no stranger can present one.
        return True
    if ctx.token_ticket is not None:
        ticket = ctx.session.get(Ticket, ctx.token_ticket)
        # After an agent's #spam the token the spammer got in the confirmation vouches for
        # nothing: the reply is scored like a stranger's mail.
        if ticket is not None and not ticket.from_spam:
            return True
    if ctx.session.exec(_TICKET_OF_UNBLOCKED_REQUESTER, params={"email": ctx.sender}).first() is None:
        return False
    # A From header is all it takes to be a past requester; where our MTA says the From
    # domain disowns this mail, it is scored like a stranger's.
    if ctx.from_forged:
        ctx.hit("spam", False, f"sender has tickets, but {ctx.from_forged}: scored")
        return False
    return True


def step_spam(ctx: Context) -> None:
    assert ctx.verdict is not None
    if ctx.verdict.is_automatic:
        ctx.hit("spam", False, "automatic mail: not scored")
        return
    if ctx.inbound.outcome == spool.RELEASED:  # set by quarantine.take_out, kept until finish
        ctx.spam_score = ctx.inbound.spam_score
        score = "" if ctx.spam_score is None else f" (spam score was {ctx.spam_score:.3f})"
        ctx.hit("spam", False, f"released from quarantine{score}: not filtered")
        return
    assert ctx.prepared is not None
    spam = ctx.prepared.spam
    if _known_correspondent(ctx):
        # Scored anyway in prepare(): kept, so that agents see what the filter thought.
        ctx.spam_score = spam.score if spam is not None else None
        score = "" if spam is None else f" (spam score {spam.score:.3f})"
        ctx.hit("spam", False, f"known requester or agent: never filtered{score}")
        return
    if spam is None:
        ctx.hit("spam", False, "spam filter off")
        return
    ctx.spam_score = spam.score
    settings = ctx.rt.settings.spam
    if spam.is_spam:
        raise Stop("quarantined", f"spam score {spam.score:.3f} >= {settings.threshold}")
    if spam.score >= settings.threshold:
        ctx.unsure_spam = True
        ctx.hit("spam", False, f"spam score {spam.score:.3f}, but the model knows only "
                               f"{spam.known_words:.1%} of its words (spam.min_known_words "
                               f"{settings.min_known_words:.1%}): not held, and no confirmation is sent")
        return
    ctx.hit("spam", False, f"spam score {spam.score:.3f}")


def _ticket_numbers_for_ids(session: Session, ids: list[str]) -> list[int]:
    if not ids:
        return []
    found: dict[str, int] = {}
    for mid, t in session.exec(_TICKETS_BY_MESSAGE_IDS, params={"ids": ids}).all():
        found[mid] = t  # type: ignore[index,assignment]
    return [found[i] for i in reversed(ids) if i in found]


def step_route(ctx: Context) -> None:
    hd = ctx.rt.settings.helpdesk
    if is_history(ctx.session) and ctx.msg.message_id and ctx.session.exec(
            _OUTBOX_RECIPIENTS, params={"mid": ctx.msg.message_id}).first() is not None:
        # A copy of mail we sent (an archived answer, a notice in an agent's mailbox): it
        # was recorded when it was sent, and as an answer it would be recorded twice.
        raise Stop("screened", f"a copy of mail mailgate sent (<{ctx.msg.message_id}>): recorded when it was sent")
    # The newest ids only: a thread never needs more, and tens of thousands of forged ones
    # made a query with more parameters than a database takes.
    refs = list(dict.fromkeys([*ctx.msg.references[-MAX_THREAD_IDS:], *ctx.msg.in_reply_to[-10:]]))
    # Our Message-IDs carry an HMAC (unforgeable) and each was sent to one recipient: naming
    # one we sent to the sender is evidence like a reply token. One we sent to someone else
    # (a forwarded notice) counts only if the sender belongs to the ticket, like a stored id.
    ours: list[int] = []
    ours_elsewhere: list[int] = []
    for r in reversed(refs):
        number = domain.ticket_from_our_message_id(hd.secret_key, r)
        if number:
            sent_to = ctx.session.exec(_OUTBOX_RECIPIENTS, params={"mid": r}).first() or ""
            (ours if ctx.sender and ctx.sender in sent_to.split(",") else ours_elsewhere).append(number)
    stored = ours_elsewhere + _ticket_numbers_for_ids(ctx.session, [r for r in refs if not r.startswith("mg.")])
    tag = domain.ticket_from_subject(hd.subject_tag, ctx.msg.subject)
    candidates = {t for t in (ctx.token_ticket, ctx.bad_token_ticket, tag, *ours, *stored) if t}
    existing: set[int] = set()
    members: dict[int, frozenset[str]] = {}
    for number in candidates:
        ticket = ctx.session.get(Ticket, number)
        if ticket is None:
            continue
        existing.add(number)
        belongs = apply.ticket_members(ctx.session, ticket)
        if (ctx.identity is not None and not ctx.identity.verified) or ctx.from_forged:
            # An agent's address without proof is a stranger's (DESIGN 3): owning or
            # assisting the ticket must not let a forged From write into it. Nor may a From
            # our MTA found forged pass for the requester's.
            belongs.discard(ctx.sender)
        members[number] = frozenset(belongs)
    facts = RouteFacts(
        sender=ctx.sender, sender_is_verified_agent=ctx.agent is not None,
        token_ticket=ctx.token_ticket, bad_token_ticket=ctx.bad_token_ticket,
        our_reference_tickets=tuple(ours), stored_reference_tickets=tuple(stored),
        tag_ticket=tag, members=members, existing=frozenset(existing),
        answerable_in_history=_answerable_in_history(ctx, existing),
        automatic=ctx.verdict is not None and ctx.verdict.is_automatic)
    ctx.decision = decide_route(facts)
    ctx.ticket = apply.ticket_after_merges(ctx.session, ctx.decision.ticket)
    reason = ctx.decision.reason
    if ctx.ticket is not None and ctx.ticket.number != ctx.decision.ticket:
        ctx.merged_from = ctx.decision.ticket
        reason += f"; #{ctx.decision.ticket} was merged into #{ctx.ticket.number}"
    ctx.hit("route", ctx.ticket is not None, reason)
    if ctx.decision.hijack_of is not None:
        log.warning("%s: %s", ctx.msg.message_id, reason)


def _answerable_in_history(ctx: Context, tickets: set[int]) -> frozenset[int]:
    """The tickets that staff mail imported as history may join as an answer on record.

    The mail has no proof of identity, so only where little can go wrong: not mail our MTA
    found forged or our own group passed on (a stranger's, with our address in From); and
    only tickets opened by such an import, no later than the mail's date (an import must
    not answer a live ticket, or date an answer before its question)."""
    if not is_history(ctx.session) or ctx.from_forged or ctx.via_own_group or not ctx.sender:
        return frozenset()
    unverified_agent = ctx.identity is not None and not ctx.identity.verified
    if not unverified_agent and domain.base_address(ctx.sender) not in ctx.rt.settings.helpdesk.all_addresses:
        return frozenset()
    answerable = set()
    for number in tickets:
        ticket = ctx.session.get(Ticket, number)
        source = ctx.session.exec(_FIRST_MESSAGE_SOURCE, params={"ticket": number}).first()
        if ticket is not None and source == spool.HISTORY_IMPORT and as_utc(ticket.created_at) <= as_utc(ctx.now):
            answerable.add(number)
    return frozenset(answerable)


def step_commands(ctx: Context) -> None:
    if ctx.identity is None and ctx.ticket is None:
        # Neither an agent's address nor a reply: a new ticket keeps the whole text, and
        # quote stripping (about a millisecond) is not needed.
        ctx.hit("commands", False, "not a verified agent's own mail: no commands read")
        return
    # An agent's reply in which nothing of their own is found is not sent whole: the whole
    # text would mail the quoted notice (its ticket data, its help) or the signature on.
    # A requester forwarding a vendor's mail wants it read: forwarded parts are kept for them.
    ctx.visible_text = visible_reply_text(ctx.msg.text, whole_if_empty=ctx.agent is None,
                                          keep_forwarded=ctx.agent is None)
    parsed = parse_commands(ctx.visible_text)
    looks_like_commands = parsed.commands or parsed.errors
    if (ctx.quarantine_token and ctx.identity is not None and ctx.ticket is None
            and (ctx.verdict is None or ctx.verdict.kind is None)):
        # An agent's reply to the quarantine list: read for #release and nothing else
        # (apply.open_on_behalf refuses any other command, and a reply without one).
        if not ctx.identity.verified:
            ctx.identity = Identity(True, "reply token of the quarantine list (#release only)")
        ctx.agent = ctx.rt.settings.agent(ctx.sender)
        ctx.release_only = True
    elif ctx.identity is not None and not ctx.identity.verified and looks_like_commands:
        ctx.hit("commands", True, "commands from an unverified agent address: ignored")
        ctx.effects.append(("spoofed_commands", {"agent": ctx.sender}))
        return
    if ctx.agent is None or (ctx.verdict is not None and ctx.verdict.kind is not None):
        ctx.hit("commands", False, "not a verified agent's own mail: no commands read")
        return
    ctx.commands = parsed
    names = " ".join("#" + c.name for c in ctx.commands.commands) or "none"
    ctx.hit("commands", bool(ctx.commands.commands), f"commands: {names}")


def step_apply(ctx: Context) -> None:
    apply.apply_message(ctx)


def step_notify(ctx: Context) -> None:
    apply.send_effects(ctx)


STEPS: tuple[tuple[str, Callable[[Context], None]], ...] = (
    ("parse", step_parse),
    ("dedupe", step_dedupe),
    ("screen", step_screen),
    ("identify", step_identify),
    ("spam", step_spam),
    ("route", step_route),
    ("commands", step_commands),
    ("apply", step_apply),
    ("notify", step_notify),
)


# --- driver -------------------------------------------------------------------------

class ParseTimeout(BrokenProcessPool):
    """A parse-ahead helper spent longer than helpdesk.parse_timeout_seconds on one
    message. Parsing is meant to be linear in the message's size, so the helper is taken
    as stuck: the message's attempt is counted with this reason, and the work process kills
    its helpers and restarts, as when a helper dies (mailgate.worker)."""


def _prepared_ahead(ahead: Future[Prepared], timeout: float) -> Prepared:
    try:
        return ahead.result(timeout=timeout)
    except TimeoutError:
        raise ParseTimeout(f"parsing took longer than {timeout:g} s (helpdesk.parse_timeout_seconds)") from None


@dataclass(frozen=True)
class Result:
    inbound_id: int
    outcome: str  # ticket | reply | note | screened | quarantined | duplicate | dead | retry | lost
    ticket_number: int | None = None
    reason: str = ""


def process_claimed(rt: Runtime, inbound: Inbound, ahead: Future[Prepared] | None = None) -> Result:
    """Run every step for one claimed inbound row, in one transaction. ahead: its
    prepare() under way in a parse-ahead helper (see mailgate.ingest.ahead)."""
    raw = rt.blobs.get(inbound.raw_sha256)
    prepared = (_prepared_ahead(ahead, rt.settings.helpdesk.parse_timeout_seconds) if ahead is not None
                else prepare(rt, raw))
    with session_scope(rt.engine) as session:
        history = inbound.source == spool.HISTORY_IMPORT
        session.info["shadow"] = history or from_shadow_mailbox(rt, inbound)
        now = utcnow()
        if history:
            now = session.info["as_of"] = written_at(prepared.parsed, now)
        ctx = Context(rt=rt, session=session, inbound=inbound, raw=raw, now=now, prepared=prepared)
        reason = ""
        try:
            for _name, step in STEPS:
                step(ctx)
        except Stop as stop:
            ctx.hit("stop", True, stop.reason)
            ctx.outcome, reason = stop.outcome, stop.reason
        hits = json.dumps(ctx.hits)
        if ctx.stored:  # completed with the hits of the steps after store_message
            session.connection().execute(_SET_RULE_HITS, [
                {"message": message.id, "rule_hits": hits} for message in ctx.stored])
        number = ctx.ticket.number if ctx.ticket is not None else None
        msg = ctx.parsed
        spool.finish(
            session, inbound, outcome=ctx.outcome, ticket_number=number,
            rule_hits=hits, spam_score=ctx.spam_score, body_hash=ctx.body_hash,
            message_id_header=msg.message_id if msg else None,
            subject=msg.subject[:1000] if msg else None, from_addr=ctx.sender or None,
        )
    for action in ctx.after_commit:  # the spam filter's lessons
        try:
            if action() is False:
                log.error("inbound %s: the spam filter learned nothing: its model is missing or was refused",
                          inbound.id)
        except Exception:  # the message itself is done; a failed side task must not redo it
            log.exception("inbound %s: after-commit action failed", inbound.id)
    log.info("%s: inbound %s -> %s%s", (msg.message_id if msg else None) or "<no id>", inbound.id,
             ctx.outcome, f" #{number}" if number else "")
    return Result(inbound.id or 0, ctx.outcome, number, reason)


# Dates before this are a broken clock or a missing Date read as the epoch.
_EARLIEST_DATE = datetime(1990, 1, 1, tzinfo=UTC)


def written_at(parsed: ParsedMessage, now: datetime) -> datetime:
    """When a message imported as history was written: its Date, in UTC, never later than
    now; now where it has none or an impossible one."""
    date = parsed.date
    if date is None:
        return now
    date = date.astimezone(UTC) if date.tzinfo is not None else date.replace(tzinfo=UTC)
    return date if _EARLIEST_DATE <= date <= now else now


def from_shadow_mailbox(rt: Runtime, inbound: Inbound) -> bool:
    """Was this fetched from an IMAP account in shadow mode? (source_key imap:NAME:...)"""
    key = inbound.source_key or ""
    return inbound.source == "imap" and any(a.shadow and key.startswith(f"imap:{a.name}:") for a in rt.settings.imap)


def run_one(rt: Runtime, worker: str, *, only_id: int | None = None) -> Result | None:
    """Claim and process one inbound message. Never raises for a bad message."""
    inbound = spool.claim(rt.engine, worker, max_attempts=rt.settings.helpdesk.max_attempts, only_id=only_id)
    return process_one(rt, inbound) if inbound is not None else None


def run_batch(rt: Runtime, worker: str, limit: int = 10, ahead: ParseAhead | None = None) -> list[Result]:
    """Claim up to `limit` messages in one commit, then process each in its own transaction
    (with `ahead`, the helpers parse the batch while the first ones are applied)."""
    rows = spool.claim_batch(rt.engine, worker, max_attempts=rt.settings.helpdesk.max_attempts, limit=limit)
    try:
        futures = ahead.submit(rows) if ahead is not None and rows else {}
    except BrokenProcessPool:
        # A helper died while idle: nothing of this batch was parsed, so it is not their
        # failure (the work process restarts; mailgate.worker).
        _give_back(rt, worker, rows)
        raise
    results: list[Result] = []
    try:
        for inbound in rows:
            results.append(process_one(rt, inbound, futures.get(inbound.id or 0)))
        return results
    except ParseTimeout:
        # The rest of the batch waited behind the stuck message, unparsed (the crash path
        # would count their attempts, not knowing which message it was).
        _give_back(rt, worker, rows[len(results) + 1:])
        raise
    finally:
        for future in futures.values():  # a helper died: do not leave work queued for it
            future.cancel()


def _give_back(rt: Runtime, worker: str, rows: list[Inbound]) -> None:
    """Give back these claims with their attempts, never raising: the broken pool that
    caused it must reach the worker, which restarts the work process."""
    try:
        spool.give_back_claims(rt.engine, worker, ids=[r.id for r in rows if r.id is not None])
    except Exception:
        log.exception("claims of inbound %s not given back: the restart releases them, attempts counted",
                      ", ".join(str(r.id) for r in rows))


def process_one(rt: Runtime, inbound: Inbound, ahead: Future[Prepared] | None = None) -> Result:
    """Process a claimed row; any failure is recorded on the row (retry or dead letter).

    A parse-ahead helper that died is not the message's failure as far as we know: it
    propagates, and the work process restarts (mailgate.worker).
    """
    assert inbound.id is not None
    max_attempts = rt.settings.helpdesk.max_attempts
    try:
        return process_claimed(rt, inbound, ahead)
    except ParseTimeout as exc:
        # Re-raised whatever the bookkeeping does: only the exit kills the stuck helper, and
        # a database error in its place would keep the next batch waiting behind it.
        try:
            dead = spool.fail(rt.engine, inbound.id, str(exc), max_attempts=max_attempts,
                              **header_summary(rt, inbound))
            log.error("inbound %s: %s (%s)", inbound.id, exc, "dead letter" if dead else "will retry")
        except Exception:
            log.exception("inbound %s: %s, and recording it failed", inbound.id, exc)
        raise exc from None
    except BrokenProcessPool:
        raise
    except spool.ClaimLost as exc:
        # Rolled back: the worker that claimed it again owns it now, and recording a
        # failure here would undo that worker's claim.
        log.warning("%s: nothing of this attempt was kept", exc)
        return Result(inbound.id, "lost", reason=str(exc))
    except UnusableMessage as exc:
        spool.fail(rt.engine, inbound.id, f"unusable message: {exc}", max_attempts=max_attempts,
                   permanent=True, **header_summary(rt, inbound))
        log.error("inbound %s: dead letter: unusable message: %s", inbound.id, exc)
        return Result(inbound.id, "dead", reason=f"unusable message: {exc}")
    except (OperationalError, InterfaceError) as exc:
        if not database_unavailable(exc):
            return _failed(rt, inbound, exc)
        # A locked, restarting or unreachable database is not this message's failure. If
        # the database is still gone, postponing fails too: the worker gives back its
        # claims once the database answers again (mailgate.worker).
        spool.postpone(rt.engine, inbound.id, traceback.format_exc(), DATABASE_RETRY)
        reason = f"{type(exc).__name__}: {str(exc.orig).splitlines()[0][:200] if str(exc.orig) else ''}"
        log.warning("inbound %s: database unavailable, retried in %ss: %s", inbound.id,
                    DATABASE_RETRY.total_seconds(), reason)
        return Result(inbound.id, "retry", reason=reason)
    except Exception as exc:
        return _failed(rt, inbound, exc)


def _failed(rt: Runtime, inbound: Inbound, exc: Exception) -> Result:
    assert inbound.id is not None
    dead = spool.fail(rt.engine, inbound.id, traceback.format_exc(), max_attempts=rt.settings.helpdesk.max_attempts,
                      **header_summary(rt, inbound))
    log.exception("inbound %s: processing failed (%s)", inbound.id, "dead letter" if dead else "will retry")
    return Result(inbound.id, "dead" if dead else "retry", reason=f"{type(exc).__name__}: {exc}")


# SQLSTATEs of a database that is unreachable, shutting down or busy, not of a bad value:
# connection exceptions (class 08), serialization failure, deadlock, lock not available,
# admin/crash shutdown, cannot connect now, too many connections.
_UNAVAILABLE_SQLSTATES = frozenset({"08000", "08001", "08003", "08004", "08006", "40001", "40P01", "55P03",
                                    "57P01", "57P02", "57P03", "53300"})
_SQLITE_UNAVAILABLE = ("database is locked", "database table is locked", "disk i/o error",
                       "unable to open database")


def database_unavailable(exc: OperationalError | InterfaceError) -> bool:
    """Whether the database, not the message, failed. psycopg raises OperationalError for a
    lost connection and for a query with too many parameters alike, so the type alone does
    not tell (a message naming 70,000 References must end as a dead letter)."""
    if exc.connection_invalidated:
        return True
    state = getattr(exc.orig, "sqlstate", None)
    if state:
        return state in _UNAVAILABLE_SQLSTATES
    text = str(exc.orig).lower()
    return any(marker in text for marker in _SQLITE_UNAVAILABLE)


def header_summary(rt: Runtime, inbound: Inbound) -> dict[str, str | None]:
    """From, Subject and Message-ID for the dead-letter list, read leniently from the first
    64 KB (the full parse may be what failed); empty where even that fails."""
    try:
        head = rt.blobs.get(inbound.raw_sha256)[:65536]
        msg = BytesHeaderParser(policy=compat32).parsebytes(head)
        subject = str(make_header(decode_header(msg.get("subject", ""))))
        # one_line: no NUL (PostgreSQL refuses it in text, and the dead letter with it) or
        # other controls reach the row or the listing.
        return {"from_addr": domain.one_line(parseaddr(msg.get("from", ""))[1], 320) or None,
                "subject": domain.one_line(subject, 1000) or None,
                "message_id_header": domain.one_line(str(msg.get("message-id") or ""), 1000).strip("<>")[:998]
                or None}
    except Exception:  # a summary is a courtesy: never let it hide the real failure
        return {}
