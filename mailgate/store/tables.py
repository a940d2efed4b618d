"""Database tables (SQLModel). Schema changes go through Alembic migrations.

Times are aware UTC datetimes (SQLModel stores them as UTC on SQLite and as
timestamptz on PostgreSQL).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Index, LargeBinary, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


class Contact(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(index=True, unique=True, max_length=320)
    # domain.mailbox_of(email): carol@ and carol+tag@ share one; the new-ticket cap counts it.
    mailbox: str = Field(default="", max_length=320, index=True)
    name: str = Field(default="", max_length=200)
    tier: str | None = Field(default=None, max_length=50)
    created_at: datetime
    # A delivery report said mail to this address failed; cleared when they write again.
    # Automatic mail to them waits till then (threats.md 16: a DSN flags the address).
    bounced_at: datetime | None = None


class Ticket(SQLModel, table=True):
    number: int | None = Field(default=None, primary_key=True)
    subject: str = Field(default="", sa_column_kwargs={"nullable": False}, sa_type=Text)
    requester_id: int = Field(foreign_key="contact.id", index=True)
    queue: str = Field(max_length=320, index=True)
    category: str | None = Field(default=None, max_length=100, index=True)
    priority: str = Field(default="normal", max_length=30, index=True)
    status: str = Field(default="new", max_length=50, index=True)
    status_kind: str = Field(default="new", max_length=10, index=True)
    owner: str | None = Field(default=None, max_length=320, index=True)
    tier: str = Field(default="customer", max_length=50)
    created_at: datetime = Field(index=True)
    updated_at: datetime
    first_response_due: datetime | None = None
    resolution_due: datetime | None = None
    first_responded_at: datetime | None = None
    last_public_in_at: datetime | None = None  # requester's last message
    last_public_out_at: datetime | None = None  # our last public answer
    solved_at: datetime | None = None
    closed_at: datetime | None = None
    sla_paused_at: datetime | None = None
    escalation_level: int = 0
    rating: str | None = Field(default=None, max_length=20)
    merged_into: int | None = Field(default=None)  # ticket number
    from_spam: bool = False


class Participant(SQLModel, table=True):
    """CC participants and assistants of a ticket (role cc | assistant)."""

    __table_args__ = (UniqueConstraint("ticket_id", "email", "role"),)
    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.number", index=True)
    email: str = Field(max_length=320)
    role: str = Field(max_length=20)


class Message(SQLModel, table=True):
    __table_args__ = (Index("ix_message_msgid_hash", "message_id", "body_hash"),)
    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int | None = Field(default=None, foreign_key="ticket.number", index=True)
    inbound_id: int | None = Field(default=None, foreign_key="inbound.id", index=True)
    outbox_id: int | None = Field(default=None, index=True)
    kind: str = Field(max_length=10)  # public | internal | system | auto
    direction: str = Field(max_length=3)  # in | out
    from_addr: str = Field(default="", max_length=320)
    from_name: str = Field(default="", max_length=200)
    to_addrs: str = Field(default="", sa_type=Text)  # comma separated
    subject: str = Field(default="", sa_type=Text)
    text: str = Field(default="", sa_type=Text)  # visible text
    full_text: str = Field(default="", sa_type=Text)  # text before quote stripping
    html: str | None = Field(default=None, sa_type=Text)  # sanitised
    message_id: str | None = Field(default=None, max_length=998, index=True)
    in_reply_to: str | None = Field(default=None, sa_type=Text)
    body_hash: str | None = Field(default=None, max_length=64)
    raw_sha256: str | None = Field(default=None, max_length=64)
    author_agent: str | None = Field(default=None, max_length=320)
    rule_hits: str = Field(default="[]", sa_type=Text)  # JSON list of {step, hit, reason}
    screen_kind: str | None = Field(default=None, max_length=20)
    spam_score: float | None = None
    created_at: datetime = Field(index=True)


class Attachment(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    message_id: int = Field(foreign_key="message.id", index=True)
    filename: str = Field(max_length=255)
    content_type: str = Field(max_length=255)
    size: int
    sha256: str = Field(max_length=64)
    content_id: str | None = Field(default=None, max_length=998)
    inline: bool = False


class Event(SQLModel, table=True):
    """Audit trail: every change to a ticket, who made it and why."""

    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.number", index=True)
    created_at: datetime
    actor: str = Field(max_length=320)  # an email, 'system' or 'cli'
    action: str = Field(max_length=50)  # created, status, priority, owner, ...
    old: str | None = Field(default=None, sa_type=Text)
    new: str | None = Field(default=None, sa_type=Text)
    detail: str | None = Field(default=None, sa_type=Text)


class Inbound(SQLModel, table=True):
    """The spool: one row per accepted message, raw bytes on disk by sha256.

    state: queued -> processing -> done | dead. outcome says what became of it
    (ticket, reply, screened, quarantined, duplicate, released).
    """

    __table_args__ = (Index("ix_inbound_state_next", "state", "next_attempt_at"),)
    id: int | None = Field(default=None, primary_key=True)
    source: str = Field(max_length=20)  # smtp | lmtp | imap | ingest | import (as history) | backfill (import --notify)
    source_key: str | None = Field(default=None, max_length=500, unique=True)
    envelope_from: str | None = Field(default=None, max_length=998)
    envelope_to: str = Field(default="", sa_type=Text)  # comma separated
    queue: str | None = Field(default=None, max_length=320)
    raw_sha256: str = Field(max_length=64, index=True)
    size: int = 0
    state: str = Field(default="queued", max_length=12)
    outcome: str | None = Field(default=None, max_length=20, index=True)
    attempts: int = 0
    next_attempt_at: datetime | None = None
    claimed_by: str | None = Field(default=None, max_length=100)
    claimed_at: datetime | None = None
    last_error: str | None = Field(default=None, sa_type=Text)
    received_at: datetime = Field(index=True)
    processed_at: datetime | None = None
    ticket_number: int | None = None
    message_id_header: str | None = Field(default=None, max_length=998, index=True)
    body_hash: str | None = Field(default=None, max_length=64)
    subject: str | None = Field(default=None, sa_type=Text)
    from_addr: str | None = Field(default=None, max_length=320)
    spam_score: float | None = None
    rule_hits: str = Field(default="[]", sa_type=Text)
    reported_at: datetime | None = None  # a quarantined message, listed in a quarantine digest


class Outbox(SQLModel, table=True):
    __table_args__ = (Index("ix_outbox_state_next", "state", "next_attempt_at"),)
    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int | None = Field(default=None, foreign_key="ticket.number", index=True)
    message_id: str = Field(max_length=998, unique=True)
    template: str = Field(max_length=100)
    mail_from: str = Field(max_length=320)  # envelope sender
    recipients: str = Field(sa_type=Text)  # comma separated envelope recipients
    raw: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    state: str = Field(default="queued", max_length=10)  # queued | sending | sent | failed
    attempts: int = 0
    next_attempt_at: datetime
    deadline: datetime
    last_error: str | None = Field(default=None, sa_type=Text)
    created_at: datetime = Field(index=True)
    sent_at: datetime | None = None
    claimed_by: str | None = Field(default=None, max_length=100)


class ImapState(SQLModel, table=True):
    """Per-mailbox position and health of the IMAP poller."""

    id: int | None = Field(default=None, primary_key=True)
    account: str = Field(max_length=320, unique=True)
    # IMAP's UIDVALIDITY and UIDs run to 2^32 - 1: over PostgreSQL's integer (2^31 - 1).
    uidvalidity: int | None = Field(default=None, sa_type=BigInteger)
    last_uid: int = Field(default=0, sa_type=BigInteger)
    last_ok_at: datetime | None = None
    last_error: str | None = Field(default=None, sa_type=Text)
    last_error_at: datetime | None = None
    # Messages over max_message_bytes left in the folder, as JSON [[uidvalidity, uid, size], ...]:
    # a doctor warning until they are gone from it.
    oversize: str | None = Field(default=None, sa_type=Text)


class Lease(SQLModel, table=True):
    """A named lease so that only one daemon instance runs a job or poller at a time."""

    name: str = Field(primary_key=True, max_length=200)
    holder: str = Field(max_length=200)
    expires_at: datetime


class AutoReplyLog(SQLModel, table=True):
    """Automatic mail sent per recipient: the loop guard counts these."""

    id: int | None = Field(default=None, primary_key=True)
    recipient: str = Field(max_length=320, index=True)
    sent_at: datetime = Field(index=True)
