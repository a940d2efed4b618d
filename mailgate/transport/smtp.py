"""SMTP/LMTP listener on aiosmtpd. It moves bytes: policy lives in the pipeline.

Recipients are checked at RCPT (550 for addresses that are not ours), size at
MAIL and DATA (552), and 250 is answered only after the message is durably
stored (`spool.accept`, or the acceptance journal on SQLite).
Any failure answers 451 without internal detail: aiosmtpd's default for an
exception is a permanent "500 Error: (Class) text", which would bounce the
customer's mail and leak internals (threats.md 1-2).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailgate.domain import base_address

log = logging.getLogger(__name__)

# Postfix accepts lines over RFC 5321's 998 bytes, and real mail has them
# (24 of the 6,046 public corpus messages); refusing them would bounce real mail.
LONG_LINE_LIMIT = 1024 * 1024


class LenientSMTP(SMTP):
    line_length_limit = LONG_LINE_LIMIT


class LenientLMTP(LMTP):
    line_length_limit = LONG_LINE_LIMIT


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
        raw = envelope.original_content or b""
        queue = next((base_address(r) for r in envelope.rcpt_tos), None)
        try:
            queue_id = await self.accept(
                raw, source="lmtp" if self.lmtp else "smtp", queue=queue,
                envelope_from=envelope.mail_from or "", envelope_to=tuple(r.lower() for r in envelope.rcpt_tos))
        except Exception as exc:  # SpoolError, or anything unexpected: the sender retries
            log.error("DATA from %s not stored: %s", envelope.mail_from, exc)
            reply = "451 4.3.0 Temporary failure, please try again later"
        else:
            if self.on_accepted is not None:
                self.on_accepted()
            reply = f"250 2.0.0 OK queued as {queue_id}"
        if self.lmtp:
            # LMTP answers DATA once per accepted recipient (RFC 2033 4.2).
            return "\r\n".join([reply] * max(1, len(envelope.rcpt_tos)))
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
