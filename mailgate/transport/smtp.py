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


class LenientSMTP(SMTP):
    line_length_limit = LONG_LINE_LIMIT


class LenientLMTP(LMTP):
    line_length_limit = LONG_LINE_LIMIT
    # Replies owed for the DATA under way: set when 354 goes out, paid by the next reply.
    _owed_after_data = 0

    async def push(self, status: str | bytes) -> None:
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


async def start_server(handler: IngestHandler, host: str, port: int, *, hostname: str,
                       max_message_bytes: int) -> asyncio.base_events.Server:
    loop = asyncio.get_running_loop()
    protocol = LenientLMTP if handler.lmtp else LenientSMTP

    def factory() -> SMTP:
        return protocol(handler, hostname=hostname, data_size_limit=max_message_bytes,
                        enable_SMTPUTF8=True, decode_data=False, ident="mailgate ESMTP")

    return await loop.create_server(factory, host=host, port=port, reuse_address=True)
