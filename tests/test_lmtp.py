"""LMTP replies after DATA: one per accepted recipient, refusals included (RFC 2033 4.2).

The listener runs in this process on a thread of its own, with an `accept` that records
what it is given, and a raw socket speaks to it: smtplib.LMTP reads one reply after DATA,
so it could not show a missing or an extra one.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from mailgate.transport.smtp import LONG_LINE_LIMIT, IngestHandler, start_server

OURS = ["support@example.com", "sales@example.com"]
MESSAGE = b"From: carol@customer.org\r\nSubject: hello\r\nMessage-ID: <m1@customer.org>\r\n\r\nHi.\r\n"


class Listener:
    def __init__(self, port: int, server: Any = None, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.port = port
        self.accepted: list[dict[str, Any]] = []
        self.server = server  # mailgate.transport.smtp.Listener
        self.loop = loop

    def start_closing(self, grace_seconds: float) -> Any:
        """Begin the listener's stop on its loop; a future of its end."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(self.server.close(grace_seconds), self.loop)


@contextmanager
def listener(*, lmtp: bool, max_message_bytes: int = 20000,
             on_accepted: Any = None) -> Iterator[Listener]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    box: list[Listener] = []

    async def accept(raw: bytes, **kw: Any) -> str:
        box[0].accepted.append({"raw": raw, **kw})
        return f"q{len(box[0].accepted)}"

    handler = IngestHandler(accept, OURS, lmtp=lmtp, on_accepted=on_accepted)
    server = asyncio.run_coroutine_threadsafe(
        start_server(handler, "127.0.0.1", 0, hostname="help.example.com",
                     max_message_bytes=max_message_bytes), loop).result(10)
    box.append(Listener(server.sockets[0].getsockname()[1], server, loop))

    async def stop() -> None:  # on the loop's thread: asyncio objects are not thread-safe
        await server.close(0)

    try:
        yield box[0]
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


class Client:
    """A line-level client: `reply()` reads one whole (possibly multi-line) reply."""

    def __init__(self, port: int) -> None:
        # Short timeout: a reply that never comes fails the test in seconds, not minutes.
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.f = self.sock.makefile("rwb")
        self.greeting = self.reply()
        assert self.greeting.startswith(b"220")

    def reply(self) -> bytes:
        lines = [self.f.readline()]
        while lines[-1][3:4] == b"-":
            lines.append(self.f.readline())
        assert lines[-1].endswith(b"\r\n"), lines
        return lines[-1].rstrip(b"\r\n")

    def say(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def send(self, data: bytes) -> None:
        self.f.write(data)
        self.f.flush()

    def envelope(self, greeting: bytes, recipients: list[bytes]) -> None:
        assert self.say(greeting).startswith(b"250")
        assert self.say(b"MAIL FROM:<carol@customer.org>").startswith(b"250")
        for r in recipients:
            self.say(b"RCPT TO:<" + r + b">")
        assert self.say(b"DATA").startswith(b"354")

    def in_step(self) -> None:
        """The next replies answer NOOP and RSET: no reply of the last DATA is left over."""
        assert self.say(b"NOOP") in (b"250 OK", b"250 2.0.0 OK")  # SMTP, LMTP
        assert self.say(b"RSET") in (b"250 OK", b"250 2.0.0 OK")

    def close(self) -> None:
        self.f.close()
        self.sock.close()


@pytest.fixture
def lmtp() -> Iterator[Listener]:
    with listener(lmtp=True) as it:
        yield it


def big_message() -> bytes:
    return MESSAGE + (b"y" * 70 + b"\r\n") * 400  # about 29 kB, over the 20 kB limit


def test_oversized_data_to_two_recipients_gets_two_552_and_the_session_goes_on(lmtp: Listener) -> None:
    c = Client(lmtp.port)
    c.envelope(b"LHLO mx.example.com", [b"support@example.com", b"sales@example.com"])
    c.send(big_message() + b".\r\n")
    assert c.reply() == b"552 5.3.4 Error: Too much mail data"
    assert c.reply() == b"552 5.3.4 Error: Too much mail data"
    c.in_step()
    # The same connection still delivers, again once per recipient.
    c.envelope(b"LHLO mx.example.com", [b"support@example.com", b"sales@example.com"])
    c.send(MESSAGE + b".\r\n")
    assert c.reply() == c.reply() == b"250 2.0.0 OK queued as q1"
    c.in_step()
    assert c.say(b"QUIT").startswith(b"221")
    c.close()
    assert [a["envelope_to"] for a in lmtp.accepted] == [("support@example.com", "sales@example.com")]


def test_a_too_long_line_to_two_recipients_gets_two_500_and_the_session_goes_on() -> None:
    # Above the line limit but under the size limit, so aiosmtpd refuses for the line.
    with listener(lmtp=True, max_message_bytes=4 * LONG_LINE_LIMIT) as it:
        c = Client(it.port)
        c.envelope(b"LHLO mx.example.com", [b"support@example.com", b"sales+x@example.com"])
        c.send(MESSAGE + b"z" * (LONG_LINE_LIMIT + 10) + b"\r\n.\r\n")
        first, second = c.reply(), c.reply()
        assert first == second and first.startswith(b"500 5.5.2 Line too long")
        c.in_step()
        c.close()
        assert it.accepted == []


def test_one_accepted_recipient_gets_one_reply(lmtp: Listener) -> None:
    c = Client(lmtp.port)
    # A refused RCPT is owed no reply after DATA: only the accepted one is.
    c.envelope(b"LHLO mx.example.com", [b"nobody@example.com", b"support@example.com"])
    c.send(big_message() + b".\r\n")
    assert c.reply() == b"552 5.3.4 Error: Too much mail data"
    c.in_step()
    c.close()
    # And smtplib.LMTP, which reads one reply after DATA, sees the refusal and stays in step.
    # (mail/rcpt/data by hand: sendmail would declare SIZE= and be refused at MAIL.)
    with smtplib.LMTP("127.0.0.1", lmtp.port) as client:
        client.ehlo()
        assert client.mail("carol@customer.org")[0] == client.rcpt("support@example.com")[0] == 250
        assert client.data(big_message()) == (552, b"5.3.4 Error: Too much mail data")
        assert client.noop() == (250, b"2.0.0 OK")
        assert client.mail("carol@customer.org")[0] == client.rcpt("support@example.com")[0] == 250
        assert client.data(MESSAGE)[0] == 250
        assert client.noop() == (250, b"2.0.0 OK")
    assert len(lmtp.accepted) == 1


def test_refusals_before_354_stay_single(lmtp: Listener) -> None:
    c = Client(lmtp.port)
    assert c.say(b"LHLO mx.example.com").startswith(b"250")
    assert c.say(b"MAIL FROM:<carol@customer.org>").startswith(b"250")
    assert c.say(b"DATA") == b"503 5.5.1 Error: need RCPT command"
    assert c.say(b"RCPT TO:<support@example.com>").startswith(b"250")
    assert c.say(b"RCPT TO:<sales@example.com>").startswith(b"250")
    assert c.say(b"DATA now") == b"501 5.5.4 Syntax: DATA"
    c.in_step()
    c.close()


def test_an_exception_after_data_answers_451_per_recipient() -> None:
    def boom() -> None:
        raise RuntimeError("internal detail")

    # on_accepted raising escapes handle_DATA: aiosmtpd answers with handle_exception's 451.
    with listener(lmtp=True, on_accepted=boom) as it:
        c = Client(it.port)
        c.envelope(b"LHLO mx.example.com", [b"support@example.com", b"sales@example.com"])
        c.send(MESSAGE + b".\r\n")
        assert c.reply() == c.reply() == b"451 4.3.0 Temporary failure, please try again later"
        c.in_step()
        c.close()


def test_smtp_mode_answers_data_once() -> None:
    with listener(lmtp=False) as it:
        c = Client(it.port)
        c.envelope(b"EHLO mx.example.com", [b"support@example.com", b"sales@example.com"])
        c.send(big_message() + b".\r\n")
        assert c.reply() == b"552 Error: Too much mail data"
        c.in_step()  # the reply after 552 is NOOP's: nothing was repeated
        c.envelope(b"EHLO mx.example.com", [b"support@example.com", b"sales@example.com"])
        c.send(MESSAGE + b".\r\n")
        assert c.reply() == b"250 2.0.0 OK queued as q1"
        c.in_step()
        c.close()
        with smtplib.SMTP("127.0.0.1", it.port) as client:
            client.ehlo()
            client.mail("carol@customer.org")
            client.rcpt("support@example.com")
            client.rcpt("sales@example.com")
            assert client.data(big_message()) == (552, b"Error: Too much mail data")
            assert client.noop() == (250, b"OK")
        assert [a["source"] for a in it.accepted] == ["smtp"]


@pytest.mark.parametrize("lmtp_mode", [True, False])
def test_a_stop_ends_idle_sessions_with_421_and_lets_a_message_under_way_finish(lmtp_mode: bool) -> None:
    """From Python 3.12 on, Server.wait_closed() waits for every client: one idle client (a
    cached LMTP connection) held the daemon's stop until systemd killed it."""
    greeting = b"LHLO mx.example.com" if lmtp_mode else b"EHLO mx.example.com"
    with listener(lmtp=lmtp_mode) as it:
        idle, sending = Client(it.port), Client(it.port)
        assert idle.say(greeting).startswith(b"250")
        sending.envelope(greeting, [b"support@example.com"])
        sending.send(MESSAGE[:40])
        closing = it.start_closing(grace_seconds=10)
        assert idle.reply() == b"421 4.3.2 Service shutting down"
        assert idle.f.readline() == b""  # and closed
        sending.send(MESSAGE[40:] + b".\r\n")  # still within the grace: it is taken
        assert sending.reply() == b"250 2.0.0 OK queued as q1"
        assert sending.reply() == b"421 4.3.2 Service shutting down"
        closing.result(10)
        assert len(it.accepted) == 1
        for c in (idle, sending):
            c.close()


def test_a_message_not_finished_within_the_grace_is_cut_off_with_421() -> None:
    with listener(lmtp=True) as it:
        slow = Client(it.port)
        slow.envelope(b"LHLO mx.example.com", [b"support@example.com"])
        slow.send(MESSAGE[:40])
        it.start_closing(grace_seconds=0.3).result(10)
        assert slow.reply() == b"421 4.3.2 Service shutting down"
        slow.close()
        assert it.accepted == []


def test_lhlo_lists_pipelining_and_enhanced_status_codes_and_every_reply_has_one(lmtp: Listener) -> None:
    """RFC 2033 section 5: an LMTP server MUST implement both; RFC 2034: a code on every
    2xx, 4xx and 5xx reply but the greeting and the LHLO reply."""
    c = Client(lmtp.port)
    assert c.greeting == b"220 help.example.com mailgate ESMTP"  # no enhanced code here
    c.send(b"LHLO mx.example.com\r\n")
    lines = [c.f.readline().rstrip(b"\r\n")]
    while lines[-1][3:4] == b"-":
        lines.append(c.f.readline().rstrip(b"\r\n"))
    assert b"250-PIPELINING" in lines and b"250-ENHANCEDSTATUSCODES" in lines and lines[-1] == b"250 HELP"
    # Pipelined: one write, the replies in order, each with its code.
    c.send(b"MAIL FROM:<carol@customer.org>\r\nRCPT TO:<nobody@example.com>\r\n"
           b"RCPT TO:<support@example.com>\r\nDATA\r\n")
    assert c.reply() == b"250 2.0.0 OK"
    assert c.reply().startswith(b"550 5.1.1 ")
    assert c.reply().startswith(b"250 2.")
    assert c.reply().startswith(b"354 ")  # an intermediate reply: no enhanced code
    c.send(MESSAGE + b".\r\n")
    assert c.reply() == b"250 2.0.0 OK queued as q1"
    assert c.say(b"HELO x").startswith(b"500 5.5.2 ")
    assert c.say(b"QUIT").startswith(b"221 2.0.0 ")
    c.close()


def test_a_slow_but_steady_data_transfer_is_not_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The session timeout is an idle timeout: aiosmtpd restarted it only at a command, and a
    DATA transfer longer than it was dropped (25 MB below 85 kB/s) whatever arrived."""
    import time

    from mailgate.transport import smtp

    monkeypatch.setattr(smtp, "SESSION_TIMEOUT_SECONDS", 1.0)
    with listener(lmtp=False) as it:
        client = Client(it.port)
        client.envelope(b"EHLO client.example", [b"support@example.com"])
        client.send(MESSAGE)
        for _ in range(6):  # 2.4 s of DATA, more than twice the timeout, a line each 0.4 s
            time.sleep(0.4)
            client.send(b"more of the message\r\n")
        assert client.say(b".").startswith(b"250")
        assert len(it.accepted) == 1 and it.accepted[0]["raw"].count(b"more of the message") == 6
        time.sleep(1.5)  # silent: then it is cut off
        with pytest.raises((OSError, AssertionError)):
            client.say(b"NOOP")
        client.close()
