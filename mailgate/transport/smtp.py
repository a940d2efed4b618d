"""SMTP/LMTP listener on aiosmtpd. It moves bytes: policy lives in the pipeline.

Recipients are checked at RCPT (550 for addresses that are not ours), size at
MAIL and DATA (552), and 250 is answered only after the message is durably
stored (`spool.accept`, or the acceptance journal on SQLite). In LMTP mode every
reply after DATA's final dot, refusals included, comes once per accepted recipient.
Any failure answers 451 without internal detail: aiosmtpd's default for an
exception is a permanent "500 Error: (Class) text", which would bounce the
customer's mail and leak internals (threats.md 1-2).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from email.utils import format_datetime
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailgate.domain import base_address, envelope_text

log = logging.getLogger(__name__)

# Postfix accepts lines over RFC 5321's 998 bytes, and real mail has them
# (24 of the 6,046 public corpus messages); refusing them would bounce real mail.
LONG_LINE_LIMIT = 1024 * 1024


# A client silent this long is disconnected (aiosmtpd's default, Postfix's smtpd_timeout).
SESSION_TIMEOUT_SECONDS = 300.0


class _TrackedSession:
    """A session the Listener can find at shutdown (it leaves the set when its connection
    ends)."""

    sessions: set[Any] | None = None
    envelope: Envelope | None
    transport: Any

    def data_received(self, data: bytes) -> None:
        # aiosmtpd restarts its idle timeout only when a command arrives, so a message whose
        # DATA took longer than SESSION_TIMEOUT_SECONDS, however steadily its bytes came (25 MB
        # below 85 kB/s), was cut off and never stored. Any bytes show the client is there.
        self._reset_timeout()  # type: ignore[attr-defined]
        super().data_received(data)  # type: ignore[misc]

    def connection_lost(self, error: Exception | None) -> None:
        if self.sessions is not None:
            self.sessions.discard(self)
        super().connection_lost(error)  # type: ignore[misc]

    @property
    def in_transaction(self) -> bool:
        """Between MAIL and the reply to DATA: a message may be under way."""
        return self.envelope is not None and self.envelope.mail_from is not None


class LenientSMTP(_TrackedSession, SMTP):
    line_length_limit = LONG_LINE_LIMIT


# RFC 2033 section 5: an LMTP server MUST implement PIPELINING and ENHANCEDSTATUSCODES.
# aiosmtpd's own replies carry no enhanced code (RFC 3463); these are the ones it sends.
_ENHANCED_CODE = re.compile(r"^[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}(\s|$)")
_ENHANCED_FOR = {"500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
                 "552": "5.3.4", "553": "5.1.3", "555": "5.5.4"}


def with_enhanced_code(reply: str) -> str:
    """A 2xx, 4xx or 5xx reply line with an enhanced status code: its own, or the one for
    aiosmtpd's reply, or the class's X.0.0."""
    code = reply[:3]
    if not code.isdigit() or code[0] not in "245" or _ENHANCED_CODE.match(reply):
        return reply
    enhanced = _ENHANCED_FOR.get(code, f"{code[0]}.0.0")
    return f"{reply[:4]}{enhanced} {reply[4:]}".rstrip()


class LenientLMTP(_TrackedSession, LMTP):
    line_length_limit = LONG_LINE_LIMIT
    # Replies owed for the DATA under way: set when 354 goes out, paid by the next reply.
    _owed_after_data = 0
    _answering_lhlo = False
    _greeted = False

    async def smtp_LHLO(self, arg: str) -> None:
        self._answering_lhlo = True
        try:
            await super().smtp_LHLO(arg)
        finally:
            self._answering_lhlo = False

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, bytes):  # aiosmtpd pushes text; nothing of ours pushes bytes
            await self._push_lmtp(status)
        elif not self._greeted:
            # The greeting is `220 <domain>` and has no enhanced code (RFC 2034 3).
            self._greeted = True
            await self._push_lmtp(status)
        elif self._answering_lhlo:
            # The LHLO reply lists extensions and carries no enhanced codes (RFC 2034 3).
            if status == "250 HELP":
                await self._push_lmtp("250-PIPELINING")
                await self._push_lmtp("250-ENHANCEDSTATUSCODES")
            await self._push_lmtp(status)
        else:
            await self._push_lmtp(with_enhanced_code(status))

    async def _push_lmtp(self, status: str | bytes) -> None:
        """After the final dot, answer once per accepted recipient (RFC 2033 4.2).

        aiosmtpd's smtp_DATA reads to the dot and then refuses by itself with one
        reply (552 too much mail data, 500 line too long, 500 strict ASCII); so does
        the 451 of handle_exception. A client such as Postfix waits for the missing
        replies until it times out and defers the mail for days instead of bouncing
        it. Every reply that ends DATA, the handler's 250/451 too, goes through
        push, so repeating it here covers all of them without copying smtp_DATA.
        Replies before 354 (503 no RCPT, 501 syntax) stay single, as RFC 2033 says.
        """
        owed, self._owed_after_data = self._owed_after_data, 0
        if owed > 1:
            status = (b"\r\n".join([status] * owed) if isinstance(status, bytes)
                      else "\r\n".join([status] * owed))
        elif status[:4] == ("354 " if isinstance(status, str) else b"354 "):
            assert self.envelope is not None
            self._owed_after_data = len(self.envelope.rcpt_tos)
        await super().push(status)


# What may appear of a client's HELO in our Received line: anything else
# (spaces, parentheses, semicolons, CR/LF) could forge the line's structure.
_RE_HELO_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
# A recipient keeps everything but what could end the clause or the line (SMTPUTF8
# addresses stay UTF-8, RFC 6532; domain literals keep their brackets).
_RE_ADDRESS_UNSAFE = re.compile(r"[\x00-\x20\x7f()<>;,\"\\]")


def _address_literal(host: Any) -> str | None:
    """RFC 5321 address literal: [192.0.2.1] or [IPv6:2001:db8::1]; None if host is no address."""
    try:
        ip = ipaddress.ip_address(str(host))
    except ValueError:
        return None
    return f"[IPv6:{ip.compressed}]" if ip.version == 6 else f"[{ip}]"


def trace_header(*, helo: str | None, peer: Any, hostname: str, protocol: str,
                 recipients: Sequence[str], now: datetime) -> bytes:
    """The Received line an SMTP server MUST prepend (RFC 5321 4.4), folded, CRLF-ended.

    protocol: the RFC 3848 keyword (SMTP, ESMTP, ESMTPS, LMTP). No reverse-DNS
    lookup: the MTA in front does that, and a listener must not wait on DNS.
    `for` names the recipient only when there is one, so that Bcc recipients
    do not learn of each other.
    """
    client = _RE_HELO_UNSAFE.sub("", helo or "")[:255] or "unknown"
    client = _address_literal(client.strip("[]")) or client  # a bare "HELO ::1"
    host = peer[0] if isinstance(peer, tuple) and peer else None
    address = _address_literal(host) or "[unknown]"  # a Unix socket, a test transport
    lines = [f"Received: from {client} ({address})",
             f"\tby {_RE_HELO_UNSAFE.sub('', hostname)[:255]} (mailgate) with {protocol}"]
    if len(recipients) == 1:
        lines.append(f"\tfor <{_RE_ADDRESS_UNSAFE.sub('', recipients[0])[:320]}>")
    lines[-1] += f"; {format_datetime(now)}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")


# await accept(raw, source=, queue=, envelope_from=, envelope_to=) -> a queue id; raises on failure.
AcceptFn = Callable[..., Awaitable[str]]


class IngestHandler:
    def __init__(self, accept: AcceptFn, addresses: Sequence[str], *, lmtp: bool = False,
                 on_accepted: Callable[[], None] | None = None) -> None:
        self.accept = accept
        self.addresses = frozenset(a.lower() for a in addresses)
        self.lmtp = lmtp
        self.on_accepted = on_accepted

    def is_ours(self, address: str) -> bool:
        return base_address(address) in self.addresses

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if not self.is_ours(address):
            return "550 5.1.1 No such recipient here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.lmtp:
            protocol = "LMTP"
        else:
            protocol = ("ESMTP" if session.extended_smtp else "SMTP") + ("S" if session.ssl else "")
        trace = trace_header(helo=session.host_name, peer=session.peer, hostname=server.hostname,
                             protocol=protocol, recipients=envelope.rcpt_tos, now=datetime.now().astimezone())
        raw = trace + (envelope.original_content or b"")
        recipients = tuple(envelope_text(r).lower() for r in envelope.rcpt_tos)
        queue = next((base_address(r) for r in recipients), None)
        try:
            queue_id = await self.accept(
                raw, source="lmtp" if self.lmtp else "smtp", queue=queue,
                envelope_from=envelope_text(envelope.mail_from or ""), envelope_to=recipients)
        except Exception as exc:  # SpoolError, or anything unexpected: the sender retries
            log.error("DATA from %s not stored: %s", envelope.mail_from, exc)
            reply = "451 4.3.0 Temporary failure, please try again later"
        else:
            if self.on_accepted is not None:
                self.on_accepted()
            reply = f"250 2.0.0 OK queued as {queue_id}"
        # One reply: in LMTP mode LenientLMTP.push repeats it per accepted recipient.
        return reply

    async def handle_exception(self, error: Exception) -> str:
        log.error("SMTP session error: %s: %s", type(error).__name__, error)
        return "451 4.3.0 Temporary failure, please try again later"


class Listener:
    """The listening socket and its sessions, so that a stop ends them itself: from
    Python 3.12 on, Server.wait_closed() waits for every client, and an idle one (Postfix
    keeps LMTP connections cached) held `mailgate run` until systemd killed it."""

    def __init__(self, server: asyncio.base_events.Server, sessions: set[Any]) -> None:
        self.server = server
        self.sessions = sessions

    @property
    def sockets(self) -> Sequence[Any]:
        return self.server.sockets

    async def close(self, grace_seconds: float) -> None:
        """Stop listening and end every session with 421 (RFC 5321 3.8): an idle one at
        once, one with a message under way once its DATA is answered, or after
        grace_seconds. aiosmtpd answers DATA right after it resets the envelope, with no
        wait between, so a 421 can never come before a message's own reply."""
        self.server.close()
        loop = asyncio.get_running_loop()
        until = loop.time() + grace_seconds
        while open_sessions := [s for s in self.sessions if s.transport is not None and not s.transport.is_closing()]:
            for session in open_sessions:
                if not session.in_transaction or loop.time() >= until:
                    _end_session(session)
            await asyncio.sleep(0.05)
        try:
            await asyncio.wait_for(self.server.wait_closed(), 5)
        except TimeoutError:
            log.warning("SMTP connections still open after stop: %d", len(self.sessions))


def _end_session(session: Any) -> None:
    session.transport.write(b"421 4.3.2 Service shutting down\r\n")
    session.transport.close()


async def start_server(handler: IngestHandler, host: str, port: int, *, hostname: str,
                       max_message_bytes: int) -> Listener:
    loop = asyncio.get_running_loop()
    protocol = LenientLMTP if handler.lmtp else LenientSMTP
    sessions: set[Any] = set()

    def factory() -> SMTP:
        session = protocol(handler, hostname=hostname, data_size_limit=max_message_bytes,
                           enable_SMTPUTF8=True, decode_data=False, ident="mailgate ESMTP",
                           timeout=SESSION_TIMEOUT_SECONDS)
        session.sessions = sessions
        sessions.add(session)
        return session

    server = await loop.create_server(factory, host=host, port=port, reuse_address=True)
    return Listener(server, sessions)
