"""Outgoing mail: composed and queued in the transaction that caused it, sent later.

`enqueue` renders a template into a complete message (its Message-ID fixed
now, so a crash between send and commit re-sends the same mail, never a
different one) and adds an outbox row to the caller's session. `OutboxSender`
claims due rows and delivers them to a maildir or an SMTP relay, with
exponential backoff until the row's deadline.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import logging
import os
import random
import re
import secrets
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.header import Header
from email.utils import format_datetime, formataddr
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import bindparam, func, insert, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from mailgate.config import Settings, valid_helo_name
from mailgate.domain import bounce_address, make_message_id, one_line, reply_address, wire_address
from mailgate.render import Renderer
from mailgate.store.blobs import FilesystemSync, can_sync_filesystem, fsync_dir
from mailgate.store.engine import as_utc, due_ids, session_scope, utcnow
from mailgate.store.tables import Event, Outbox

log = logging.getLogger(__name__)

# RFC 5321 4.5.3.2.6: wait 10 minutes for the reply to the final dot. A relay's content
# filter can take longer than a command's timeout, and giving up early is how one mail gets
# delivered again on every retry (RFC 1047). The same time covers sending the body.
DATA_TIMEOUT_SECONDS = 600.0
# Everything before DATA (connect, TLS, EHLO, STARTTLS, AUTH's tries, MAIL, RCPT) ends
# within this, whatever each step's own timeout: cut off there, the relay has nothing yet.
# DATA is never cut off (its replies have DATA_TIMEOUT_SECONDS each), and QUIT after it is
# given QUIT_SECONDS and its answer ignored: the relay has the mail by then.
BEFORE_DATA_SECONDS = 10 * 60
QUIT_SECONDS = 30.0
# Longer than the longest send of one row (10 + 2 x 10 minutes + QUIT): until then a row in
# `sending` is its sender's, and another must not send it again meanwhile.
STALE_SENDING = timedelta(minutes=45)
# A row is tried until its deadline, the last time at the deadline itself; one found unsent
# this long after it (the daemon or the relay was down) fails instead of going out late.
DEADLINE_GRACE = timedelta(minutes=5)
# A claim's rows are held in memory together: an answer with 7 MB of files to twenty
# recipients is twenty rows of ~10 MB each. A claim takes rows up to this size (at least one).
CLAIM_MAX_BYTES = 48 * 2**20
_INSERT_OUTBOX = insert(Outbox.__table__)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class OutgoingMail:
    """What the caller of enqueue keeps of a queued mail (the bytes are in the outbox row)."""

    message_id: str
    subject: str
    text: str


def _qp_part(subtype: str, text: str) -> bytes:
    """A text/SUBTYPE part in UTF-8, quoted-printable (readable in any mail source view, no
    line over 76): binascii's encoder in C, about ten times faster than email.quoprimime."""
    # A CR is allowed only before LF (RFC 5322 2.3): a lone one from a customer's text is a break.
    body = binascii.b2a_qp(text.replace("\r\n", "\n").replace("\r", "\n").encode("utf-8"), istext=True)
    return (f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
            "Content-Transfer-Encoding: quoted-printable\r\n\r\n").encode() + body.replace(b"\n", b"\r\n")


@dataclass(frozen=True)
class OutgoingFile:
    """A file sent on with a mail (an agent's attachment to their answer)."""

    filename: str
    content_type: str
    data: bytes


_MEDIA_TYPE_RE = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+")


def _file_part(f: OutgoingFile) -> bytes:
    """One attachment, base64 in lines of 76, its name RFC 2231-encoded when not ASCII (in
    continuations of at most 60 characters, so that no header line grows past 998)."""
    # RFC 6838's characters only: a parsed type may hold any Unicode letter ("image/pñg").
    ctype = f.content_type if _MEDIA_TYPE_RE.fullmatch(f.content_type) else "application/octet-stream"
    if ctype.startswith("text/"):
        # The charset parameter is not kept with a stored attachment. Text in UTF-8 (or
        # ASCII) says so; any other text goes as bytes, which a client saves unchanged,
        # instead of text/plain without a charset, which it would show as US-ASCII.
        try:
            f.data.decode("utf-8")
        except UnicodeDecodeError:
            ctype = "application/octet-stream"
        else:
            ctype += "; charset=utf-8"
    name = one_line(f.filename, 200).replace("\\", "_").replace('"', "_") or "attachment"
    if name.isascii() and len(name) <= 60 and not _ENCODED_WORD.search(name):
        param = f'filename="{name}"'
    else:
        # RFC 2231, also for an ASCII name that looks like an RFC 2047 word: readers decode
        # those in a quoted filename, into whatever the sender chose ("../x.sh").
        # Continuations of whole characters: one cut inside a character's %XX escapes
        # leaves undecodable bytes in each piece for a reader that decodes them one by one.
        pieces, piece = [], ""
        for char in name:
            escaped = quote(char, safe="")
            if piece and len(piece) + len(escaped) > 60:
                pieces.append(piece)
                piece = ""
            piece += escaped
        pieces.append(piece)
        param = ";\r\n ".join(f"filename*{i}*={'utf-8' + chr(39) * 2 if i == 0 else ''}{piece}"
                               for i, piece in enumerate(pieces))
    body = base64.encodebytes(f.data).replace(b"\n", b"\r\n")
    return (f"Content-Type: {ctype}\r\nContent-Transfer-Encoding: base64\r\n"
            f"Content-Disposition: attachment;\r\n {param}\r\n\r\n").encode() + body


def _mime_body(text: str, html: str | None, files: Sequence[OutgoingFile] = ()) -> bytes:
    """The MIME headers and body after our own headers: text, or text + HTML alternatives,
    and the files after them in a multipart/mixed."""
    if files:
        inner = _mime_body(text, html).removeprefix(b"MIME-Version: 1.0\r\n")
        boundary = f"=_mgm{uuid.uuid4().hex}"  # "=_" never occurs in base64 or quoted-printable
        parts = [inner, *(_file_part(f) for f in files)]
        return (f'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
                f"--{boundary}\r\n").encode() + f"\r\n--{boundary}\r\n".encode().join(parts) + (
                f"\r\n--{boundary}--\r\n").encode()
    if not html:
        return b"MIME-Version: 1.0\r\n" + _qp_part("plain", text)
    # "=_" never occurs in quoted-printable text, so the boundary cannot occur in the parts.
    boundary = f"=_mg{uuid.uuid4().hex}"
    return (f'MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n'
            f"--{boundary}\r\n").encode() + _qp_part("plain", text) + (
            f"\r\n--{boundary}\r\n").encode() + _qp_part("html", html) + f"\r\n--{boundary}--\r\n".encode()


# A Message-ID we may repeat in In-Reply-To/References: printable ASCII only, so a CR or LF in
# an id taken from inbound mail can never start a header of its own (header injection); and
# at most 250 characters, so that an id with no space to fold at keeps In-Reply-To under
# the 998 characters a line may have (RFC 5322 2.1.1). Real ones are under 100.
_MSGID_RE = re.compile(r"^[\x21-\x3b\x3d\x3f-\x7e]{1,250}\Z")
# Text a reader would decode as an RFC 2047 word (RFC 2047 section 2).
_ENCODED_WORD = re.compile(r"=\?[^?\s]*\?[bBqQ]\?")


def _header_text(value: str, name: str) -> str:
    """ASCII as is; anything else as RFC 2047 encoded words on folded lines of at most 76
    characters, the header's name included (RFC 2047 section 2). So is ASCII that holds an
    encoded word: a customer's subject that decoded to "=?utf-8?b?...?=" would be decoded
    again by every reader, into any text, CR LF and a Bcc header included."""
    if value.isascii() and not _ENCODED_WORD.search(value):
        return value
    return Header(value, "utf-8", maxlinelen=76, header_name=name).encode()


def _from_header(name: str, address: str) -> str:
    """The From value: a display name that is not ASCII in short encoded words, as Subject."""
    if name.isascii() and not _ENCODED_WORD.search(name):
        return formataddr((name, address))
    return f"{_header_text(name, 'From')} <{address}>"


def compose(settings: Settings, *, to: str, subject: str, text: str, html: str | None,
            message_id: str, ticket_number: int | None, in_reply_to: str | None = None,
            references: Sequence[str] = (), automatic: bool = True,
            from_name: str | None = None, cc: Sequence[str] = (), reply_base: str | None = None,
            reply_number: int | None = None, files: Sequence[OutgoingFile] = (),
            sender: str | None = None) -> bytes:
    """The wire bytes of one outgoing mail. sender: the From address (default the support
    address; a ticket's queue address, notify.queue_address). reply_base: whose plus form
    the Reply-To is (default the sender; the comment address for notes). reply_number: the
    number the Reply-To token is for, when the mail is about no ticket (the quarantine digest).

    Written directly rather than through the email package's generator (which cost about
    1 ms per mail, most of the work process's time for a notice): Message-ID, In-Reply-To
    and References stay on one unencoded line each (only Subject and the From display
    name are encoded), and the parts are quoted-printable UTF-8.
    """
    hd = settings.helpdesk
    sender = sender or hd.address
    headers: list[tuple[str, str]] = [
        ("From", _from_header(one_line(from_name or hd.name, 100), sender)),
        ("To", wire_address(to)),
    ]
    if cc:
        headers.append(("Cc", ", ".join(wire_address(a) for a in cc)))
    headers += [
        ("Subject", _header_text(one_line(subject, 250), "Subject")),
        ("Date", format_datetime(utcnow())),
        ("Message-ID", f"<{message_id}>"),
    ]
    token_number = ticket_number if ticket_number is not None else reply_number
    if token_number is not None:
        headers.append(("Reply-To", reply_address(reply_base or sender, hd.secret_key, token_number, to)))
    refs = [r for r in dict.fromkeys(references) if _MSGID_RE.match(r)][-10:]
    if in_reply_to and _MSGID_RE.match(in_reply_to):
        headers.append(("In-Reply-To", f"<{in_reply_to}>"))
        if in_reply_to not in refs:
            refs.append(in_reply_to)
    if refs:
        headers.append(("References", " ".join(f"<{r}>" for r in refs)))
    if automatic:
        # RFC 3834: anything we send by ourselves is marked, so other robots do not answer it;
        # "auto-replied" only where it answers a message, "auto-generated" for the rest
        # (status notices from the CLI or the scheduler, the quarantine digest).
        headers += [("Auto-Submitted", "auto-replied" if in_reply_to else "auto-generated"),
                    ("X-Auto-Response-Suppress", "All"), ("Precedence", "bulk")]
    if ticket_number is not None:
        headers.append(("X-Mailgate-Ticket", str(ticket_number)))
    # UTF-8 only where an address is not ASCII (RFC 6532; the relay is then asked for
    # SMTPUTF8): everything else is ASCII.
    return "".join(_header_line(name, value) for name, value in headers).encode("utf-8") + _mime_body(
        text, html, files)


def _header_line(name: str, value: str) -> str:
    """`Name: value` CRLF. A line break in the value is kept only as a fold (followed by a
    space, as Header.encode writes them); any other becomes a space, so no value can start
    a header of its own. A line over 998 characters is folded at a space."""
    if not value.isascii() and name not in ("To", "Cc"):
        value = _header_text(value, name)
    # To and Cc hold bare addresses (the recipient, the requester's CCs): one that is not
    # ASCII stays UTF-8 (RFC 6532). An RFC 2047 word is not allowed in an address, and
    # readers took it for a display name.
    lines = value.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    value = lines[0] + "".join(("\r\n" + ln) if ln[:1] in (" ", "\t") else (" " + ln) for ln in lines[1:])
    out: list[str] = []
    for line in f"{name}: {value}".split("\r\n"):
        while len(line) > 998 and (cut := line.rfind(" ", 1, 998)) > 0:
            out.append(line[:cut])
            line = line[cut:]
        out.append(line)
    return "\r\n".join(out) + "\r\n"


def enqueue(session: Session, settings: Settings, renderer: Renderer, *, template: str, to: str,
            context: dict[str, Any], ticket_number: int | None, in_reply_to: str | None = None,
            references: Sequence[str] = (), automatic: bool = True,
            from_name: str | None = None, reply_base: str | None = None,
            reply_number: int | None = None, files: Sequence[OutgoingFile] = (),
            sender: str | None = None) -> tuple[int, OutgoingMail]:
    """Render `template` for one recipient and queue it in the caller's transaction; returns
    the outbox row's id (sender: see compose). The row is written with a Core INSERT on the session's connection:
    it is never used as an object here, and an ORM object cost several times the row."""
    domain = settings.helpdesk.address.split("@", 1)[1]
    message_id = make_message_id(settings.helpdesk.secret_key, domain, ticket_number)
    rendered = renderer.render_mail(template, {**context, "recipient": to})
    raw = compose(settings, to=to, subject=rendered.subject, text=rendered.text, html=rendered.html,
                  message_id=message_id, ticket_number=ticket_number, in_reply_to=in_reply_to,
                  references=references, automatic=automatic, from_name=from_name, reply_base=reply_base,
                  reply_number=reply_number, files=files, sender=sender)
    mail_from = sender or settings.helpdesk.address
    if settings.outbound.verp:
        mail_from = bounce_address(mail_from, secrets.token_hex(8))
    now = utcnow()
    inserted = session.connection().execute(_INSERT_OUTBOX, {
        "ticket_id": ticket_number, "message_id": message_id, "template": template,
        "mail_from": mail_from, "recipients": to, "raw": raw,
        # An IMAP account in shadow mode (trialled beside the old system) sends nothing:
        # its mail is kept for inspection in `mailgate outbox list` and never claimed.
        "state": "shadow" if session.info.get("shadow") else "queued", "attempts": 0,
        "next_attempt_at": now, "deadline": now + timedelta(hours=settings.outbound.deadline_hours),
        "created_at": now,
    })
    return inserted.inserted_primary_key[0], OutgoingMail(message_id=message_id, subject=rendered.subject,
                                                          text=rendered.text)


# --- delivery ------------------------------------------------------------------

class DeliveryError(Exception):
    def __init__(self, message: str, *, permanent: bool = False) -> None:
        # A relay's reply is read with surrogateescape (a Latin-1 "Empf\xe4nger"), and a
        # database cannot store lone surrogates or NUL: the row would stay claimed.
        super().__init__(message.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00"))
        self.permanent = permanent


def _maildir_name(row: ClaimedMail) -> str:
    # Derived from the row, so that a retry overwrites instead of adding a second copy.
    return f"{int(row.created_at.timestamp())}.M{row.id}.{socket.gethostname().replace('/', '_')}"


def _write_maildir_file(path: Path, row: ClaimedMail, *, fsync: bool) -> None:
    with open(path, "wb") as fh:
        fh.write(f"Return-Path: <{row.mail_from}>\r\n".encode())
        fh.write(f"Delivered-To: {row.recipients}\r\n".encode())
        fh.write(row.raw)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def deliver_batch_to_maildir(maildir: Path, rows: Sequence[ClaimedMail]) -> list[DeliveryError | None]:
    """Every row as a file in new/ (written to tmp/, renamed into new/): with one thread
    hand-off and two syncfs(2) calls for the batch instead of an fsync per mail, as
    BlobStore.put_many. A row that cannot be written fails alone; anything else fails the
    batch, and every row is retried."""
    try:
        return _deliver_batch(maildir, rows)
    except Exception as exc:  # the maildir cannot be created, a sync failed...
        error = DeliveryError(f"{type(exc).__name__}: {exc}")
        return [error] * len(rows)


def _deliver_batch(maildir: Path, rows: Sequence[ClaimedMail]) -> list[DeliveryError | None]:
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    batched = can_sync_filesystem()
    results: list[DeliveryError | None] = []
    written: list[str] = []
    with FilesystemSync(maildir) if batched else contextlib.nullcontext() as filesystem:
        try:
            for row in rows:
                name = _maildir_name(row)
                try:
                    _write_maildir_file(maildir / "tmp" / name, row, fsync=not batched)
                except OSError as exc:
                    with contextlib.suppress(OSError):  # a partial file; not what stood in the way
                        (maildir / "tmp" / name).unlink(missing_ok=True)
                    results.append(DeliveryError(f"{type(exc).__name__}: {exc}"))
                    continue
                results.append(None)
                written.append(name)
            if filesystem is not None:
                filesystem.sync()  # the mail, before its name is in new/
            while written:
                os.replace(maildir / "tmp" / written[0], maildir / "new" / written[0])
                written.pop(0)
            if filesystem is not None:
                filesystem.sync()
            else:
                fsync_dir(maildir / "new")
        finally:
            for name in written:  # not delivered: retried under the same name
                (maildir / "tmp" / name).unlink(missing_ok=True)
    return results


@dataclass
class RelayAttempt:
    """How far one send got: from DATA on, the relay may have the mail, and a send cut off
    there (the daemon stopping) must not go again before STALE_SENDING (RFC 1047)."""

    data_started: bool = False


@functools.cache
def _relay_class() -> type:
    import aiosmtplib  # only to send by SMTP

    class Relay(aiosmtplib.SMTP):
        """aiosmtplib's client with RFC 5321's time for DATA; every other command keeps
        outbound.timeout_seconds. before_data: the limit on the steps before DATA, lifted
        when DATA starts."""

        before_data: asyncio.Timeout | None = None
        attempt: RelayAttempt | None = None

        async def data(self, message: str | bytes, /, **_: Any) -> Any:
            if self.before_data is not None:
                if self.before_data.expired():
                    # Due in the same loop pass as RCPT's reply (3.11's wait_for can swallow
                    # its cancel): too late, and DATA has not gone out.
                    raise TimeoutError("the steps before DATA took too long")
                self.before_data.reschedule(None)
            if self.attempt is not None:
                self.attempt.data_started = True
            return await super().data(message, timeout=DATA_TIMEOUT_SECONDS)

    return Relay


def helo_name(settings: Settings) -> str:
    """The name we give in EHLO: outbound.helo_name, else smtp.hostname if it is a domain
    (it has a dot), else this host's FQDN. Relays refuse a name without a dot, and in a
    container the FQDN is often "localhost": `mailgate doctor` warns of that."""
    if settings.outbound.helo_name:
        return settings.outbound.helo_name
    # smtp.hostname is only our greeting's text: any words, any letters.
    if "." in settings.smtp.hostname and valid_helo_name(settings.smtp.hostname):
        return settings.smtp.hostname
    return _fqdn()


@functools.cache
def _fqdn() -> str:
    return socket.getfqdn()  # a DNS lookup: once a process


async def deliver_by_smtp(settings: Settings, row: ClaimedMail, attempt: RelayAttempt | None = None) -> None:
    import aiosmtplib

    ob = settings.outbound
    scheme, rest = ob.url.split("://", 1)
    host, _, port = rest.rstrip("/").partition(":")
    # The row keeps the address as the customer wrote it (bounces and threading compare it);
    # the envelope has its domain as an A-label where that makes it ASCII.
    recipients = [wire_address(r) for r in row.recipients.split(",")]
    # RFC 6531: an address that is not ASCII needs SMTPUTF8 (aiosmtplib asks only when told).
    needs_utf8 = not (row.mail_from.isascii() and all(r.isascii() for r in recipients))
    client = _relay_class()(
        hostname=host, port=int(port or (465 if scheme == "smtps" else 25)),
        use_tls=scheme == "smtps", start_tls=ob.starttls,  # false: plain SMTP (a local relay); true: required
        username=ob.user, password=ob.password, timeout=ob.timeout_seconds,
        cert_bundle=str(ob.ca_file) if ob.ca_file else None, local_hostname=helo_name(settings),
    )
    try:
        async with asyncio.timeout(BEFORE_DATA_SECONDS) as before_data:
            client.before_data = before_data
            client.attempt = attempt
            await client.connect()
            try:
                await client.sendmail(row.mail_from, recipients, row.raw,
                                      mail_options=["SMTPUTF8"] if needs_utf8 else None)
            except BaseException:
                client.close()
                raise
    except aiosmtplib.SMTPRecipientsRefused as exc:
        permanent = all(_refuses_this_recipient(r.code, r.message) for r in exc.recipients)
        raise DeliveryError(f"recipients refused: {exc}", permanent=permanent) from exc
    except aiosmtplib.SMTPNotSupported as exc:
        # The relay has no SMTPUTF8 for an address that needs it: this mail cannot go there.
        raise DeliveryError(f"{type(exc).__name__}: {exc}", permanent=needs_utf8) from exc
    except aiosmtplib.SMTPResponseException as exc:
        raise DeliveryError(f"{exc.code} {exc.message}", permanent=_refuses_this_mail(exc)) from exc
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
        raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc
    # Delivered, and the caller records it now: QUIT goes on by itself, since how the relay
    # takes it (or a stop of the daemon meanwhile) is no reason to send the mail again. A
    # relay that never answers QUIT would pile up open connections, one per mail, until the
    # daemon ran out of file descriptors: past a few, the connection is just closed.
    if len(_saying_goodbye) >= MAX_WAITING_QUITS:
        client.close()
        return
    goodbye = asyncio.get_running_loop().create_task(_say_goodbye(client))
    _saying_goodbye.add(goodbye)
    goodbye.add_done_callback(_saying_goodbye.discard)


MAX_WAITING_QUITS = 8
_saying_goodbye: set[asyncio.Task[None]] = set()  # referenced until done (asyncio keeps weak ones)


async def _say_goodbye(client: Any) -> None:
    try:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.quit(), QUIT_SECONDS)
    finally:
        client.close()


# A refusal at RCPT that is about our session, not the recipient: Postfix's "554 5.7.1
# Relay access denied", Exchange's "550 5.7.1 Unable to relay" and "530 5.7.0
# Authentication required" when the relay wants AUTH.
_SESSION_REFUSAL_AT_RCPT = re.compile(
    r"relay(ing)? (access )?(denied|not permitted)|unable to relay|authentication required", re.IGNORECASE)


def _refuses_this_recipient(code: int, message: str) -> bool:
    """A 5xx at RCPT fails the mail for good, unless it refuses the relay's use by us."""
    return code >= 500 and code != 530 and not _SESSION_REFUSAL_AT_RCPT.search(message)


def _refuses_this_mail(exc: Exception) -> bool:
    """A 5xx reply that refuses this mail (its recipient, size or content) fails it for good.
    One that refuses our session (EHLO, STARTTLS, AUTH: 530 "must issue STARTTLS first",
    535) or our own sender address is the relay's setup, which the operator fixes: every
    mail would fail with it, so it is retried until the deadline like a 4xx."""
    import aiosmtplib

    code = getattr(exc, "code", 0)
    if code < 500:
        return False
    if isinstance(exc, aiosmtplib.SMTPDataError):
        return True
    if isinstance(exc, aiosmtplib.SMTPSenderRefused):
        return code == 552  # the declared SIZE is too large for the relay
    return False


def retry_delay(settings: Settings, attempts: int) -> timedelta:
    ob = settings.outbound
    base = min(ob.retry_max_seconds, ob.retry_base_seconds * (2 ** max(0, attempts - 1)))
    return timedelta(seconds=base * random.uniform(0.8, 1.2))


@dataclass(frozen=True)
class ClaimedMail:
    """What the sender needs of a claimed outbox row (plain data: the claim and the results
    are Core statements, as the ORM's unit of work cost more than the delivery itself)."""

    id: int
    message_id: str
    mail_from: str
    recipients: str
    raw: bytes
    created_at: datetime
    attempts: int


_OUTBOX = Outbox.__table__  # type: ignore[attr-defined]
_CLAIM_OUTBOX = update(_OUTBOX).where(_OUTBOX.c.id.in_(bindparam("ids", expanding=True))).values(
    state="sending", claimed_by=bindparam("worker"), next_attempt_at=bindparam("now"),
    attempts=_OUTBOX.c.attempts + 1)
_CLAIMED_MAIL = select(_OUTBOX.c.id, _OUTBOX.c.message_id, _OUTBOX.c.mail_from, _OUTBOX.c.recipients,
                       _OUTBOX.c.raw, _OUTBOX.c.created_at, _OUTBOX.c.attempts).where(
    _OUTBOX.c.id.in_(bindparam("ids", expanding=True))).order_by(_OUTBOX.c.id)
# Only rows this sender still holds: one another sender took over as stale is theirs.
_MARK_SENT = update(_OUTBOX).where(
    _OUTBOX.c.id.in_(bindparam("ids", expanding=True)), _OUTBOX.c.state == "sending",
    _OUTBOX.c.claimed_by == bindparam("worker")).values(state="sent", sent_at=bindparam("now"), last_error=None)
# Renews the claim of the next row of a batch just before it is sent (send_due).
_RENEW_CLAIM = update(_OUTBOX).where(
    _OUTBOX.c.id == bindparam("row_id"), _OUTBOX.c.state == "sending",
    _OUTBOX.c.claimed_by == bindparam("worker")).values(next_attempt_at=bindparam("now"))


# A claimed row never offered to the relay: due again now, and its claim was no attempt.
_RELEASE_CLAIM = update(_OUTBOX).where(
    _OUTBOX.c.id.in_(bindparam("ids", expanding=True)), _OUTBOX.c.state == "sending",
    _OUTBOX.c.claimed_by == bindparam("worker")).values(
    state="queued", next_attempt_at=bindparam("now"), attempts=_OUTBOX.c.attempts - 1)


_ROW_SIZES = select(_OUTBOX.c.id, func.length(_OUTBOX.c.raw)).where(
    _OUTBOX.c.id.in_(bindparam("ids", expanding=True))).order_by(_OUTBOX.c.id)


def _within_claim_size(sizes: Sequence[tuple[int, int]]) -> list[int]:
    """The first ids (in order) whose mail fits in CLAIM_MAX_BYTES together; at least one."""
    kept: list[int] = []
    total = 0
    for row_id, size in sizes:
        total += size or 0
        if kept and total > CLAIM_MAX_BYTES:
            break
        kept.append(row_id)
    return kept


def _record_failure(session: Session, row: Outbox, now: datetime, error: str) -> None:
    """Agents see on the ticket that a mail never reached its recipient."""
    if row.ticket_id is not None:
        session.add(Event(ticket_id=row.ticket_id, created_at=now, actor="system",
                          action="delivery failed", new=row.recipients,
                          detail=f"{row.template} <{row.message_id}>: {error[:500]}"))


# Each the claim's own condition plus the deadline, so that the (state, next_attempt_at)
# index finds the few rows: an OR of the two states, or the state alone, read the whole
# table on every pass. (A queued row is due by its deadline: record_results caps it.)
_QUEUED_PAST_DEADLINE = select(Outbox).where(
    Outbox.state == "queued", Outbox.next_attempt_at <= bindparam("now"),  # type: ignore[operator]
    Outbox.deadline < bindparam("expired"))  # type: ignore[arg-type]
_STALE_PAST_DEADLINE = select(Outbox).where(
    Outbox.state == "sending", Outbox.next_attempt_at <= bindparam("stale"),  # type: ignore[operator]
    Outbox.deadline < bindparam("expired"))  # type: ignore[arg-type]
# Unless another sender claimed it meanwhile (a claim counts an attempt; a stale row
# stays `sending` when taken over): then it is theirs to send and record.
_FAIL_IF_UNCHANGED = update(_OUTBOX).where(
    _OUTBOX.c.id == bindparam("row_id"), _OUTBOX.c.state == bindparam("was"),
    _OUTBOX.c.attempts == bindparam("attempts_seen")).values(state="failed", last_error=bindparam("error"))


def _fail_past_deadline(session: Session, now: datetime, limit: int) -> None:
    """Rows whose deadline passed while nothing sent them (the daemon or the relay was
    down) fail, as a mail server returns mail it could not deliver in time: a
    confirmation or a status notice days late says what is no longer true.
    `mailgate outbox retry` sends one anyway."""
    params = {"now": now, "stale": now - STALE_SENDING, "expired": now - DEADLINE_GRACE}
    rows = [*session.exec(_QUEUED_PAST_DEADLINE.limit(limit), params=params).all(),
            *session.exec(_STALE_PAST_DEADLINE.limit(limit), params=params).all()]
    for row in rows:
        error = f"deadline passed before it could be sent (queued {row.created_at:%Y-%m-%d %H:%M} UTC)"
        # Only if no other sender changed it meanwhile: one event per failure.
        if session.connection().execute(_FAIL_IF_UNCHANGED, {
                "row_id": row.id, "was": row.state, "attempts_seen": row.attempts, "error": error}).rowcount:
            log.error("outbox %s <%s>: failed for good: %s", row.id, row.message_id, error)
            _record_failure(session, row, now, error)


def claim_due(engine: Engine, worker: str, limit: int = 20) -> list[ClaimedMail]:
    now = utcnow()
    with session_scope(engine) as session:
        _fail_past_deadline(session, now, limit)
        in_time = Outbox.deadline >= now - DEADLINE_GRACE  # the rest fails in later passes, never goes late
        ids = due_ids(session, engine, Outbox.id, [  # type: ignore[arg-type]
            (Outbox.state == "queued") & (Outbox.next_attempt_at <= now) & in_time,  # type: ignore[operator]
            # a sender died between claim and result: send again (same Message-ID)
            (Outbox.state == "sending") & (Outbox.next_attempt_at <= now - STALE_SENDING)  # type: ignore[operator]
            & in_time,
        ], limit)
        if not ids:
            return []
        connection = session.connection()
        ids = _within_claim_size(connection.execute(_ROW_SIZES, {"ids": ids}).all())
        connection.execute(_CLAIM_OUTBOX, {"ids": ids, "worker": worker, "now": now})
        return [ClaimedMail(*row) for row in connection.execute(_CLAIMED_MAIL, {"ids": ids})]


def record_results(engine: Engine, settings: Settings, results: Sequence[tuple[int, DeliveryError | None]],
                   worker: str, *, renew: int | None = None, untried: Sequence[int] = ()) -> bool:
    """One transaction: each row sent, retried later, or failed for good. A failure for
    good is also recorded on the row's ticket, so that agents see that an answer never
    reached its recipient. renew: a row whose claim to renew in the same transaction (the
    next one to send); whether this sender still holds it. untried: claimed rows that were
    never offered to the relay, queued again as they were."""
    with session_scope(engine) as session:
        now = utcnow()
        if untried:
            session.connection().execute(_RELEASE_CLAIM, {"ids": list(untried), "worker": worker, "now": now})
        held = renew is not None and bool(session.connection().execute(
            _RENEW_CLAIM, {"row_id": renew, "worker": worker, "now": now}).rowcount)
        sent = [row_id for row_id, error in results if error is None]
        if sent:  # the usual case, one statement for the pass
            session.connection().execute(_MARK_SENT, {"ids": sent, "now": now, "worker": worker})
        for row_id, error in results:
            if error is None:
                continue
            row = session.get(Outbox, row_id)
            if row is None or row.state != "sending" or row.claimed_by != worker:
                continue
            row.last_error = str(error)[:2000]
            deadline = as_utc(row.deadline)
            if error.permanent or row.attempts >= settings.outbound.max_attempts or now >= deadline:
                row.state = "failed"
                log.error("outbox %s <%s>: failed for good: %s", row.id, row.message_id, error)
                _record_failure(session, row, now, str(error))
            else:
                # The last try is at the deadline itself, not one backoff step before it.
                row.state, row.next_attempt_at = "queued", min(now + retry_delay(settings, row.attempts), deadline)
                log.warning("outbox %s <%s>: will retry: %s", row.id, row.message_id, error)
            session.add(row)
    return held


async def send_one(settings: Settings, row: ClaimedMail, attempt: RelayAttempt | None = None) -> DeliveryError | None:
    try:
        await deliver_by_smtp(settings, row, attempt)
    except DeliveryError as exc:
        return exc
    except Exception as exc:  # recorded per row: one odd failure must not void the batch's results
        return DeliveryError(f"{type(exc).__name__}: {exc}")
    return None


async def send_due(engine: Engine, settings: Settings, worker: str, *, until: float | None = None) -> int:
    """One pass: claim what is due and try each once. Returns the number sent. until: the
    event loop time after which no further mail is begun (the daemon is stopping)."""
    claiming = asyncio.ensure_future(asyncio.to_thread(claim_due, engine, worker))
    try:
        rows = await asyncio.shield(claiming)
    except asyncio.CancelledError:
        # The claim commits in its thread all the same: hand its rows back, untried, rather
        # than leave them claimed until STALE_SENDING.
        claimed = await claiming
        if claimed:
            await asyncio.to_thread(record_results, engine, settings, [], worker,
                                    untried=[row.id for row in claimed])
        raise
    if not rows:
        return 0
    if settings.outbound.scheme == "maildir":
        # A batch of files takes milliseconds: finished and recorded even when cancelled.
        delivering = asyncio.ensure_future(
            asyncio.to_thread(deliver_batch_to_maildir, settings.outbound.maildir, rows))
        try:
            errors = await asyncio.shield(delivering)
        except asyncio.CancelledError:
            errors = await delivering
            await asyncio.to_thread(record_results, engine, settings,
                                    list(zip((row.id for row in rows), errors, strict=True)), worker)
            raise
        results = list(zip((row.id for row in rows), errors, strict=True))
        await asyncio.to_thread(record_results, engine, settings, results, worker)
        return sum(error is None for error in errors)
    # One mail at a time, each claim renewed just before and its result recorded just
    # after (one transaction does both): a batch on a slow relay can outlast STALE_SENDING,
    # and another sender must not take over a row this one is still to send, or has sent
    # and not yet recorded.
    # Whatever ends the pass (the stop's time running out cancels it), what was sent is
    # recorded and what the relay never got is handed back at once, not left claimed
    # until STALE_SENDING.
    sent = 0
    done: list[tuple[int, DeliveryError | None]] = []
    untried = {row.id for row in rows}
    loop = asyncio.get_running_loop()
    try:
        for row in rows:
            if until is not None and loop.time() >= until:
                break
            held = await asyncio.to_thread(record_results, engine, settings, done, worker, renew=row.id)
            done = []
            if not held:
                untried.discard(row.id)
                continue
            attempt = RelayAttempt()
            try:
                error = await send_one(settings, row, attempt)
            finally:
                if attempt.data_started:  # the relay may have it: never sent twice at once
                    untried.discard(row.id)
            untried.discard(row.id)
            done = [(row.id, error)]
            sent += error is None
    finally:
        if done or untried:
            await asyncio.shield(asyncio.to_thread(record_results, engine, settings, done, worker,
                                                   untried=sorted(untried)))
    return sent


class OutboxSender:
    def __init__(self, engine: Engine, settings: Settings, worker: str) -> None:
        self.engine = engine
        self.settings = settings
        self.worker = worker
        self.wake = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                sent = await send_due(self.engine, self.settings, self.worker)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox pass failed")
                sent = 0
            if sent:
                continue
            self.wake.clear()
            waits = [asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(stop.wait())]
            await asyncio.wait(waits, timeout=self.settings.outbound.poll_seconds,
                               return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()

    async def drain(self, seconds: float) -> None:
        """At shutdown: send what is due now, pass after pass, until nothing is left to try
        or no mail is begun after `seconds` (the caller cancels one still going later)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while loop.time() < until and await send_due(self.engine, self.settings, self.worker, until=until):
            pass


def retry_failed(engine: Engine, ids: Sequence[int] | None = None, deadline_hours: float = 24.0) -> list[int]:
    """`mailgate outbox retry`: failed rows get a fresh deadline (outbound.deadline_hours) and
    go again; the ids of those queued again."""
    now = utcnow()
    with session_scope(engine) as session:
        query = select(Outbox).where(Outbox.state == "failed")
        if ids:
            query = query.where(Outbox.id.in_(list(ids)))  # type: ignore[union-attr]
        rows = session.exec(query).all()
        for row in rows:
            row.state, row.attempts, row.next_attempt_at = "queued", 0, now
            row.deadline = now + timedelta(hours=deadline_hours)
            session.add(row)
        return [row.id for row in rows if row.id is not None]

