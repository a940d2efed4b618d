"""Outgoing mail: the composed bytes, and delivery through an SMTP relay with retries."""

from __future__ import annotations

import asyncio
import contextlib
import mailbox
import re
import sqlite3
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from email import message_from_bytes, message_from_string, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from mailgate import outbox
from mailgate.config import Settings, load_settings, settings_from_dict
from mailgate.domain import parse_plus_address, token_is_valid
from mailgate.outbox import ClaimedMail, DeliveryError, compose, deliver_by_smtp, record_results, retry_delay
from mailgate.runtime import Runtime
from mailgate.store.engine import utcnow
from mailgate.store.tables import Outbox
from tests.conftest import (
    CaptureRelay,
    cli,
    cli_json,
    free_port,
    mail,
    query_json,
    start_daemon,
    wait_until,
    write_config,
)

SECRET = "test-secret-key-0123456789"


def settings(outbound: dict[str, Any] | None = None, base: Path = Path("/nonexistent")) -> Settings:
    return settings_from_dict({
        "database": {"url": "sqlite:///mailgate.db"},
        "outbound": outbound or {"url": "maildir:sent"},
        "helpdesk": {"address": "support@example.com", "comment_address": "support-comment@example.com",
                     "subject_tag": "EXAMPLE", "secret_key": SECRET, "data_dir": "data",
                     "name": "Example Support"},
    }, base=base)


def composed(**kw: Any) -> tuple[bytes, EmailMessage]:
    args: dict[str, Any] = {"to": "carol@customer.org", "subject": "[EXAMPLE #7] Printer on fire",
                            "text": "Hello\n", "html": None, "message_id": "mg.7.abc@example.com",
                            "ticket_number": 7}
    args.update(kw)
    raw = compose(settings(), **args)
    return raw, message_from_bytes(raw, policy=policy.default)  # type: ignore[return-value]


def header_lines(raw: bytes) -> list[str]:
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    return head.split("\r\n")


# --- compose ------------------------------------------------------------------------------

def test_ids_on_one_unencoded_line() -> None:
    refs = [f"ref{i}.{'x' * 60}@customer.org" for i in range(6)]
    raw, msg = composed(in_reply_to="orig.123@customer.org", references=refs)
    lines = header_lines(raw)
    assert "Message-ID: <mg.7.abc@example.com>" in lines
    assert "In-Reply-To: <orig.123@customer.org>" in lines
    refs_line = next(line for line in lines if line.startswith("References: "))
    # Never folded, even at ~450 characters, and the message replied to comes last.
    assert refs_line == "References: " + " ".join(f"<{r}>" for r in [*refs, "orig.123@customer.org"])
    assert not any(line.startswith((" ", "\t")) for line in lines)
    assert b"=?" not in raw.split(b"\r\n\r\n", 1)[0].replace(b"Subject", b"")  # nothing encoded
    assert msg["Message-ID"] == "<mg.7.abc@example.com>"


def test_references_keep_the_last_ten() -> None:
    raw, msg = composed(references=[f"r{i}@x" for i in range(15)], in_reply_to="r14@x")
    assert msg["References"] == " ".join(f"<r{i}@x>" for i in range(5, 15))


def test_every_line_ends_crlf_and_is_short() -> None:
    raw, _ = composed(text="line\n" * 5 + "é" * 3000, html="<p>" + "ü" * 3000 + "</p>")
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    assert raw.isascii()  # quoted-printable bodies, encoded subject


def test_non_ascii_subject_is_rfc2047() -> None:
    raw, msg = composed(subject="[EXAMPLE #7] Drucker brennt: Größe ß — 火事")
    subject_line = next(line for line in header_lines(raw) if line.startswith("Subject: "))
    assert subject_line.startswith("Subject: =?utf-8?")
    assert msg["Subject"] == "[EXAMPLE #7] Drucker brennt: Größe ß — 火事"
    ascii_raw, ascii_msg = composed(subject="[EXAMPLE #7] plain")
    assert "Subject: [EXAMPLE #7] plain" in header_lines(ascii_raw)


@pytest.mark.parametrize("subject", ["Hi\r\nBcc: x@evil.example", "Hi\nBcc: x@evil.example", "Hi\rBcc: x@evil.example",
                                     "Hï\r\nBcc: x@evil.example", "Hi\u2028Bcc: x@evil.example"])
def test_crlf_in_subject_cannot_inject_a_header(subject: str) -> None:
    raw, msg = composed(subject=subject)
    assert msg["Bcc"] is None
    assert not any(line.lower().startswith("bcc:") for line in header_lines(raw))
    assert "Bcc: x@evil.example" in msg["Subject"]  # kept as text on the one Subject line
    assert sum(line.startswith("Subject:") for line in header_lines(raw)) == 1


def test_crlf_in_ids_and_display_name_cannot_inject() -> None:
    raw, msg = composed(in_reply_to="a@b\r\nBcc: x@evil.example", references=["c@d\nBcc:x@evil.example", "ok@x"],
                        from_name="Support\r\nBcc: x@evil.example")
    assert msg["Bcc"] is None
    assert msg["In-Reply-To"] is None
    assert msg["References"] == "<ok@x>"
    assert not any(line.lower().startswith("bcc:") for line in header_lines(raw))


def test_a_line_break_in_any_header_value_cannot_start_a_header() -> None:
    raw, msg = composed(to="carol@customer.org\r\nBcc: x@evil.example", cc=["dan@customer.org\nBcc: y@evil.example"])
    assert msg["Bcc"] is None
    assert not any(line.lower().startswith("bcc:") for line in header_lines(raw))


def test_a_references_line_over_998_characters_is_folded_between_ids() -> None:
    refs = [f"r{i}.{'x' * 180}@customer.org" for i in range(10)]
    raw, msg = composed(references=refs)
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    assert msg["References"].split() == [f"<{r}>" for r in refs]


def test_ascii_that_readers_would_decode_as_an_encoded_word_is_encoded() -> None:
    # A customer's subject "=?utf-8?b?<that>?=" decodes once, on intake, to the literal text
    # below; written as is, every reader would decode it again, into CR LF and a Bcc.
    lookalike = "Invoice =?utf-8?b?SW52b2ljZQ0KQmNjOiBhdHRhY2tlckBldmlsLm9yZw==?="
    raw, msg = composed(subject=f"[EXAMPLE #7] {lookalike}", from_name=lookalike)
    assert msg["Subject"] == f"[EXAMPLE #7] {lookalike}"  # read back as the literal text
    assert next(line for line in header_lines(raw) if line.startswith("From: ")).startswith("From: =?utf-8?")
    assert "\n" not in msg["From"].addresses[0].display_name
    assert msg["Bcc"] is None and b"\r\nBcc" not in raw


def test_a_message_id_too_long_for_a_line_is_not_repeated() -> None:
    raw, msg = composed(in_reply_to="a" * 1200 + "@customer.org", references=["b" * 300 + "@x", "ok@x"])
    assert msg["In-Reply-To"] is None and msg["References"] == "<ok@x>"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def test_a_lone_cr_in_the_text_is_a_line_break_on_the_wire() -> None:
    raw, msg = composed(text="A\rsmuggle\r.\r\nend\n", html="<p>x\ry</p>")
    assert b"\r" not in raw.replace(b"\r\n", b"")
    assert msg.get_body(("plain",)).get_content().replace("\r\n", "\n") == "A\nsmuggle\n.\nend\n"


@pytest.mark.parametrize("to", ["d\xe4ni\xa6l@customer.org", "josé@exämple.org"])
def test_a_non_ascii_recipient_is_written_as_utf8(to: str) -> None:
    # RFC 6532: an address that is not ASCII stays UTF-8 (the relay is asked for SMTPUTF8);
    # as an RFC 2047 word it was no address at all, and readers took it for a name.
    raw, _ = composed(to=to)
    assert f"\r\nTo: {to}\r\n".encode() in raw
    msg = message_from_string(raw.decode("utf-8"), policy=policy.default)  # a reader of RFC 6532 mail
    assert msg["To"].addresses[0].addr_spec == to and msg["Message-ID"] == "<mg.7.abc@example.com>"
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert [line for line in head.split(b"\r\n") if not line.isascii()] == [f"To: {to}".encode()]


def test_a_long_non_ascii_subject_is_folded_into_short_encoded_words() -> None:
    subject = "[EXAMPLE #7] " + "Größe ß Drucker brennt " * 9
    raw, msg = composed(subject=subject)
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    words = [w for w in head.replace("\r\n", " ").split() if w.startswith("=?")]
    assert len(words) > 3 and max(len(w) for w in words) <= 75  # RFC 2047 section 2
    assert max(len(line) for line in head.split("\r\n") if "=?" in line) <= 76
    assert msg["Subject"] == " ".join(subject.split())
    raw, msg = composed(from_name="Jürgen Müller-Lüdenscheidt via Société Générale Support Désk")
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    from_lines = head[head.index("From:"):head.index("\r\nTo:")].split("\r\n")
    assert len(from_lines) == 2 and max(len(line) for line in from_lines) <= 76
    assert message_from_bytes(raw, policy=policy.compat32)["From"].endswith("<support@example.com>")


def test_multipart_text_and_html() -> None:
    raw, msg = composed(text="Hello Carol\n", html="<p>Hello <b>Carol</b></p>")
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    assert msg.get_body(("plain",)).get_content().rstrip() == "Hello Carol"  # type: ignore[union-attr]
    assert msg.get_body(("html",)).get_content().rstrip() == "<p>Hello <b>Carol</b></p>"  # type: ignore[union-attr]
    _, plain = composed(html=None)
    assert plain.get_content_type() == "text/plain" and plain.get_content_charset() == "utf-8"


def test_auto_submitted_only_when_automatic() -> None:
    _, auto = composed(automatic=True)
    assert auto["Auto-Submitted"] == "auto-generated"  # RFC 3834: not an answer to a message
    _, answer = composed(automatic=True, in_reply_to="c1@customer.org")
    assert answer["Auto-Submitted"] == "auto-replied"
    assert auto["X-Auto-Response-Suppress"] == "All" and auto["Precedence"] == "bulk"
    _, human = composed(automatic=False)
    assert human["Auto-Submitted"] is None and human["Precedence"] is None
    assert human["X-Auto-Response-Suppress"] is None


def test_reply_to_is_a_token_address_for_the_recipient() -> None:
    _, msg = composed(to="carol@customer.org", ticket_number=7)
    base, number, token = parse_plus_address(str(msg["Reply-To"]))  # type: ignore[misc]
    assert (base, number) == ("support@example.com", 7)
    assert token_is_valid(SECRET, 7, "carol@customer.org", token)
    assert not token_is_valid(SECRET, 7, "mallory@evil.example", token)
    assert msg["X-Mailgate-Ticket"] == "7"
    assert msg["From"] == "Example Support <support@example.com>"
    _, no_ticket = composed(ticket_number=None)
    assert no_ticket["Reply-To"] is None and no_ticket["X-Mailgate-Ticket"] is None


def test_retry_delay_grows_and_is_capped() -> None:
    s = settings({"url": "maildir:sent", "retry_base_seconds": 10, "retry_max_seconds": 100})
    for attempts, base in ((1, 10), (2, 20), (3, 40), (4, 80), (5, 100), (20, 100)):
        d = retry_delay(s, attempts)
        assert timedelta(seconds=base * 0.8) <= d <= timedelta(seconds=base * 1.2)


# --- record_results: retry, permanent failure, deadline -------------------------------------

@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Any]:
    from sqlmodel import SQLModel

    from mailgate.store.engine import make_engine

    e = make_engine(f"sqlite:///{tmp_path / 'o.db'}")
    SQLModel.metadata.create_all(e)
    yield e
    e.dispose()


def _row(engine: Any, *, attempts: int = 1, deadline_in: timedelta = timedelta(hours=1), claimed_by: str = "w",
         state: str = "sending", raw: bytes = b"x") -> int:
    import secrets

    from mailgate.store.engine import session_scope

    now = utcnow()
    with session_scope(engine) as session:
        row = Outbox(message_id=f"{secrets.token_hex(4)}@x", template="t", mail_from="support@example.com",
                     recipients="a@b", raw=raw,
                     state=state, attempts=attempts, next_attempt_at=now, deadline=now + deadline_in,
                     created_at=now, claimed_by=claimed_by)
        session.add(row)
        session.flush()
        assert row.id is not None
        return row.id


def _state(engine: Any, row_id: int) -> tuple[str, int, str | None]:
    from mailgate.store.engine import session_scope

    with session_scope(engine) as session:
        row = session.get(Outbox, row_id)
        assert row is not None
        return row.state, row.attempts, row.last_error


def test_record_results(engine: Any) -> None:
    s = settings({"url": "smtp://relay", "retry_base_seconds": 60, "max_attempts": 3})
    ok, soft, hard, late, expired, spent = (
        _row(engine), _row(engine), _row(engine), _row(engine, deadline_in=timedelta(seconds=30)),
        _row(engine, deadline_in=timedelta(seconds=-1)), _row(engine, attempts=3))
    taken_over = _row(engine, claimed_by="other")  # re-claimed as stale by another sender: theirs
    record_results(engine, s, [(taken_over, None), (taken_over, DeliveryError("550 no", permanent=True))], "w")
    assert _state(engine, taken_over) == ("sending", 1, None)
    record_results(engine, s, [
        (ok, None), (soft, DeliveryError("451 4.3.0 try later")),
        (hard, DeliveryError("550 5.1.1 no such user", permanent=True)),
        (late, DeliveryError("451 4.3.0 try later")),  # the next try (~60 s) would be after the deadline
        (expired, DeliveryError("451 4.3.0 try later")),
        (spent, DeliveryError("451 4.3.0 try later")),  # third attempt of three
    ], "w")
    assert _state(engine, ok) == ("sent", 1, None)
    assert _state(engine, soft) == ("queued", 1, "451 4.3.0 try later")
    assert _state(engine, hard) == ("failed", 1, "550 5.1.1 no such user")
    assert _state(engine, late) == ("queued", 1, "451 4.3.0 try later")  # one last try, at the deadline
    assert _state(engine, expired) == ("failed", 1, "451 4.3.0 try later")
    assert _state(engine, spent) == ("failed", 3, "451 4.3.0 try later")
    from mailgate.store.engine import session_scope

    with session_scope(engine) as session:
        row = session.get(Outbox, late)
        assert row is not None and row.next_attempt_at == row.deadline


def test_a_row_whose_deadline_passed_unsent_fails_and_is_not_sent(engine: Any) -> None:
    """The daemon or the relay was down past a row's deadline: a confirmation days late says
    what is no longer true. Failed as a mail server returns what it could not deliver in time."""
    long_ago = -outbox.DEADLINE_GRACE - timedelta(minutes=1)
    stale = utcnow() - outbox.STALE_SENDING - timedelta(minutes=1)
    expired = [_row(engine, state="queued", deadline_in=long_ago) for _ in range(25)]  # over one pass's 20
    expired_claim = _row(engine, state="sending", deadline_in=long_ago)  # its sender died
    last_try = _row(engine, state="queued", deadline_in=timedelta(seconds=-1))  # scheduled at the deadline
    due = _row(engine, state="queued")
    from sqlalchemy import update

    from mailgate.store.engine import session_scope

    with session_scope(engine) as session:
        session.exec(update(Outbox).where(Outbox.id == expired_claim).values(next_attempt_at=stale))
    assert [m.id for m in outbox.claim_due(engine, "w")] == [last_try, due]
    assert [m.id for m in outbox.claim_due(engine, "w")] == []  # the rest of the expired: failed, not sent
    for row_id in (*expired, expired_claim):
        state, _, error = _state(engine, row_id)
        assert state == "failed" and error is not None and error.startswith("deadline passed before it could be sent")


def test_a_claim_holds_rows_up_to_a_size_and_always_one(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Twenty recipients of an answer with 7 MB of files are twenty rows of ~10 MB: held in
    memory together, one claim would take ~200 MB."""
    monkeypatch.setattr(outbox, "CLAIM_MAX_BYTES", 1000)
    small = [_row(engine, state="queued", raw=b"x" * 400) for _ in range(3)]
    big = _row(engine, state="queued", raw=b"x" * 5000)
    after = _row(engine, state="queued", raw=b"x" * 10)
    claims = [[m.id for m in outbox.claim_due(engine, "w")] for _ in range(4)]
    assert claims == [small[:2], small[2:], [big], [after]]
    assert [_state(engine, i)[0] for i in (*small, big, after)] == ["sending"] * 5


# --- delivery from a running daemon to the capture relay ----------------------------------------

def outbox_rows(config: Path) -> list[dict[str, Any]]:
    con = sqlite3.connect(config.parent / "mailgate.db", timeout=10)
    try:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute(
            "select id, state, attempts, last_error, recipients, mail_from, message_id from outbox order by id")]
    finally:
        con.close()


def test_delivery_retry_then_sent_once_and_permanent_failure(workdir: Path, relay: CaptureRelay) -> None:
    # No agents: each new ticket sends exactly one mail, the requester's confirmation.
    config = write_config(workdir, outbound=f"smtp://127.0.0.1:{relay.port}", agents="")
    relay.fail_with = "451 4.3.0 try again later"
    d = start_daemon(config)
    try:
        d.send(mail(subject="Retry me"))
        # Retried with backoff: still queued, attempts growing, the relay's answer kept.
        rows = wait_until(lambda: [r for r in outbox_rows(config) if r["attempts"] >= 2 and r["state"] == "queued"])
        assert rows[0]["last_error"].startswith("451")
        listed = cli_json(config, "outbox", "list")
        assert len(listed) == 1 and listed[0]["state"] in ("queued", "sending")
        assert listed[0]["attempts"] >= 2 and "451" in listed[0]["last_error"]
        assert relay.messages == []
        relay.fail_with = None
        wait_until(lambda: outbox_rows(config)[0]["state"] == "sent", timeout=30)
        d.wait_idle()
        assert len(relay.messages) == 1
        sender, rcpts, raw = relay.messages[0]
        assert sender == "support@example.com" and rcpts == ["carol@customer.org"]
        first = relay.parsed()[0]
        assert first["Message-ID"] == f"<{outbox_rows(config)[0]['message_id']}>"
        assert first["Subject"] == "[EXAMPLE #1] Retry me"
        assert outbox_rows(config)[0]["last_error"] is None

        # 550: failed at once, no retry; `outbox retry` sends it again once the relay accepts.
        relay.fail_with = "550 5.1.1 mailbox unavailable"
        d.send(mail(sender="dave@customer.org", subject="Refuse me"))
        wait_until(lambda: len(outbox_rows(config)) == 2 and outbox_rows(config)[1]["state"] == "failed")
        failed = outbox_rows(config)[1]
        assert failed["attempts"] == 1 and failed["last_error"].startswith("550")
        events = [e for e in cli_json(config, "tickets", "show", "2")["events"] if e["action"] == "delivery failed"]
        assert [e["new"] for e in events] == ["dave@customer.org"] and "550" in events[0]["detail"]
        assert [r["id"] for r in cli_json(config, "outbox", "list", "--state", "failed")] == [failed["id"]]
        relay.fail_with = None
        assert cli(config, "outbox", "retry").stdout.decode().strip() == "1 queued again"
        wait_until(lambda: outbox_rows(config)[1]["state"] == "sent")
        d.wait_idle()
        assert len(relay.messages) == 2
        assert relay.messages[1][1] == ["dave@customer.org"]
        assert [m["Subject"] for m in relay.parsed()] == ["[EXAMPLE #1] Retry me", "[EXAMPLE #2] Refuse me"]
        assert cli(config, "outbox", "retry").stdout.decode().strip() == "0 queued again"
    finally:
        assert d.stop() == 0


# --- STARTTLS and AUTH with a private CA ---------------------------------------------------------

class _TlsRelay:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.logins: list[str] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 OK"

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> Any:
        from aiosmtpd.smtp import AuthResult, LoginPassword

        ok = (isinstance(auth_data, LoginPassword) and auth_data.login == b"mailgate"
              and auth_data.password == b"s3cret")
        if ok:
            self.logins.append(auth_data.login.decode())
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535


@pytest.fixture
def tls_relay(tmp_path: Path) -> Iterator[tuple[_TlsRelay, int, Path]]:
    import trustme
    from aiosmtpd.controller import Controller

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    ca_file = tmp_path / "relay-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    handler = _TlsRelay()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, tls_context=ctx, require_starttls=True,
                            authenticator=handler.authenticate, auth_require_tls=True)
    controller.start()
    yield handler, port, ca_file
    controller.stop()


def _outbox_row() -> ClaimedMail:
    raw, _ = composed()
    return ClaimedMail(id=1, message_id="mg.7.abc@example.com", mail_from="support@example.com",
                       recipients="carol@customer.org", raw=raw, created_at=utcnow(), attempts=1)


def test_starttls_and_auth_with_configured_ca(tmp_path: Path, tls_relay: tuple[_TlsRelay, int, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from mailgate.doctor import _outbound

    monkeypatch.setattr(outbox, "_fqdn", lambda: "mailgate.example.net")

    handler, port, ca_file = tls_relay
    ob = {"url": f"smtp://127.0.0.1:{port}", "starttls": True, "user": "mailgate", "password": "s3cret",
          "ca_file": ca_file.name, "timeout_seconds": 10}
    s = settings(ob, base=tmp_path)  # ca_file relative to the config file's folder
    assert s.outbound.ca_file == ca_file
    asyncio.run(deliver_by_smtp(s, _outbox_row()))
    assert handler.logins == ["mailgate"]
    assert len(handler.messages) == 1
    sender, rcpts, raw = handler.messages[0]
    assert (sender, rcpts) == ("support@example.com", ["carol@customer.org"])
    assert b"Message-ID: <mg.7.abc@example.com>" in raw
    assert _outbound(s)["status"] == "ok"  # doctor trusts the same CA
    monkeypatch.setattr(outbox, "_fqdn", lambda: "localhost")  # as in many containers
    assert _outbound(s)["status"] == "warning" and "outbound.helo_name" in _outbound(s)["detail"]

    # Without the CA the certificate is not trusted: a temporary failure (the operator can fix it).
    untrusted = settings({k: v for k, v in ob.items() if k != "ca_file"}, base=tmp_path)
    with pytest.raises(DeliveryError) as exc:
        asyncio.run(deliver_by_smtp(untrusted, _outbox_row()))
    assert not exc.value.permanent
    assert "certificate" in str(exc.value).lower()
    assert _outbound(untrusted)["status"] == "error"

    # A wrong password is refused by the relay with 535.
    wrong = settings({**ob, "password": "nope"}, base=tmp_path)
    with pytest.raises(DeliveryError) as exc:
        asyncio.run(deliver_by_smtp(wrong, _outbox_row()))
    assert str(exc.value).startswith("535")
    assert not exc.value.permanent  # the relay's setup, not this mail: retried until the deadline
    assert len(handler.messages) == 1


def test_a_maildir_batch_lands_in_new_and_a_row_that_cannot_be_written_fails_alone(tmp_path: Path) -> None:
    from mailgate.outbox import _maildir_name, deliver_batch_to_maildir

    rows = [ClaimedMail(id=i, message_id=f"m{i}@x", mail_from="support@example.com", recipients=f"r{i}@customer.org",
                        raw=f"Subject: {i}\r\n\r\nbody {i}\r\n".encode(), created_at=utcnow(), attempts=1)
            for i in (1, 2, 3)]
    maildir = tmp_path / "sent"
    (maildir / "tmp" / _maildir_name(rows[1])).mkdir(parents=True)  # row 2's file cannot be written
    results = deliver_batch_to_maildir(maildir, rows)
    assert [r is None for r in results] == [True, False, True]
    assert isinstance(results[1], DeliveryError)
    delivered = sorted(p.read_bytes() for p in (maildir / "new").iterdir())
    assert len(delivered) == 2
    assert delivered[0].startswith(b"Return-Path: <support@example.com>\r\nDelivered-To: r1@customer.org\r\n")
    assert delivered[0].endswith(b"body 1\r\n") and delivered[1].endswith(b"body 3\r\n")
    assert [p.name for p in (maildir / "tmp").iterdir()] == [_maildir_name(rows[1])]  # only the obstacle
    # A retry of the whole batch overwrites instead of adding copies.
    (maildir / "tmp" / _maildir_name(rows[1])).rmdir()
    assert deliver_batch_to_maildir(maildir, rows) == [None, None, None]
    assert len(list((maildir / "new").iterdir())) == 3
    # A maildir that cannot be made at all: every row gets the error (and is retried).
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the maildir should be")
    errors = deliver_batch_to_maildir(blocked, rows)
    assert all(isinstance(e, DeliveryError) for e in errors) and len(errors) == 3


def delivery_report(message_id: str, action: str, status: str, attempt: int = 1, *,
                    recipient: str = "carol@customer.org", original: str | None = None) -> bytes:
    original_line = f"Original-Recipient: rfc822; {original}\r\n" if original else ""
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.customer.org>\r\nTo: support@example.com\r\n"
        f"Subject: Delivery Status Notification ({action})\r\nMessage-ID: <{attempt}.{action}.{message_id}>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        f"--b\r\nContent-Type: text/plain\r\n\r\nAbout your message to {recipient}.\r\n"
        "--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.customer.org\r\n\r\n"
        f"{original_line}Final-Recipient: rfc822; {recipient}\r\nAction: {action}\r\nStatus: {status}\r\n\r\n"
        "--b\r\nContent-Type: text/rfc822-headers\r\n\r\nFrom: support@example.com\r\n"
        f"To: carol@customer.org\r\nMessage-ID: <{message_id}>\r\n\r\n--b--\r\n"
    ).encode()


def test_only_a_failed_delivery_report_about_a_sent_mail_marks_it_bounced(workdir: Path) -> None:
    config = write_config(workdir)
    cli(config, "ingest", input=bytes(mail()))
    confirmation = next(r for r in cli_json(config, "outbox", "list") if r["template"] == "requester/created")

    def row() -> dict[str, Any]:
        return next(r for r in cli_json(config, "outbox", "list") if r["id"] == confirmation["id"])

    # Still queued: a report naming it is forged (its Message-ID is in what we mailed before).
    cli(config, "ingest", input=delivery_report(confirmation["message_id"], "failed", "5.1.1"))
    assert row()["state"] == "queued"
    with sqlite3.connect(workdir / "mailgate.db") as db:
        db.execute("UPDATE outbox SET state = 'sent' WHERE id = ?", (confirmation["id"],))
    for action, status in (("delayed", "4.4.1"), ("delivered", "2.0.0"), ("relayed", "2.0.0")):
        cli(config, "ingest", input=delivery_report(confirmation["message_id"], action, status))
    assert row()["state"] == "sent"
    assert not [e for e in cli_json(config, "tickets", "show", "1")["events"] if e["action"] == "bounce"]

    cli(config, "ingest", input=delivery_report(confirmation["message_id"], "failed", "5.1.1", attempt=2))
    assert (row()["state"], row()["last_error"]) == ("failed", "bounced: carol@customer.org")
    shown = cli_json(config, "tickets", "show", "1")
    assert [e["new"] for e in shown["events"] if e["action"] == "bounce"] == ["carol@customer.org"]
    # Its record says where it went, not that it opened a ticket.
    hits = {h["step"]: h["reason"] for h in shown["messages"][-1]["rule_hits"]}
    assert hits["route"] == "no ticket matched: automatic mail opens none"
    assert hits["bounce"].endswith("bounced for carol@customer.org")


def test_a_bounce_of_mail_about_a_merged_ticket_goes_to_the_ticket_it_went_into(workdir: Path) -> None:
    """As mail by tag or token does: the merged ticket is listed nowhere open, and its
    successor's agents would never see that the customer's address bounced."""
    config = write_config(workdir, helpdesk_extra='trusted_authserv_ids = ["mx.example.com"]')
    cli(config, "ingest", input=bytes(mail(sender="ivy@customer.org", subject="Login broken")))
    cli(config, "ingest", input=bytes(mail(subject="Quota")))
    [confirmation] = [r for r in cli_json(config, "outbox", "list")
                      if r["template"] == "requester/created" and r["ticket"] == 2]
    with sqlite3.connect(workdir / "mailgate.db") as db:
        db.execute("UPDATE outbox SET state = 'sent' WHERE id = ?", (confirmation["id"],))
    cli(config, "ingest", input=bytes(mail(
        sender="Alice <alice@example.com>", subject="[EXAMPLE #2] Quota", body="#merge 1",
        headers={"Authentication-Results": "mx.example.com; dkim=pass header.d=example.com"})))
    assert cli_json(config, "tickets", "show", "2")["merged_into"] == 1
    cli(config, "ingest", input=delivery_report(confirmation["message_id"], "failed", "5.1.1"))
    merged, kept = cli_json(config, "tickets", "show", "2"), cli_json(config, "tickets", "show", "1")
    assert [m for m in merged["messages"] if m["kind"] == "auto"] == []
    assert [e["new"] for e in kept["events"] if e["action"] == "bounce"] == ["carol@customer.org"]
    assert [m["kind"] for m in kept["messages"]][-1] == "auto"


def test_with_verp_only_a_report_to_the_mails_own_envelope_sender_bounces_it(workdir: Path,
                                                                             relay: CaptureRelay) -> None:
    """threats.md 16, the forged report: a CC learns the Message-ID of the requester's mail
    from her reply-all, and a report naming it and her address held back her notices. With
    outbound.verp each mail leaves with its own envelope sender, which only her mailbox saw."""
    config = write_config(workdir, outbound=f"smtp://127.0.0.1:{relay.port}", agents="")
    config.write_text(config.read_text().replace("poll_seconds = 0.2\n", "poll_seconds = 0.2\nverp = true\n", 1))
    d = start_daemon(config)
    try:
        d.send(mail())
        row = wait_until(lambda: [r for r in outbox_rows(config) if r["state"] == "sent"])[0]
        envelope_sender = relay.messages[0][0]
        assert envelope_sender == row["mail_from"]
        assert re.fullmatch(r"support\+bounce-[0-9a-f]{16}@example\.com", envelope_sender)
        assert relay.parsed()[0]["From"] == "Example Support <support@example.com>"  # the header is unchanged

        # The forged report, as the CC can write it: right Message-ID and recipient, sent to support@.
        d.send(delivery_report(row["message_id"], "failed", "5.1.1"))
        wait_until(lambda: query_json(config, "screened"))
        assert outbox_rows(config)[0]["state"] == "sent"
        with sqlite3.connect(workdir / "mailgate.db") as db:
            assert db.execute("SELECT bounced_at FROM contact WHERE email = 'carol@customer.org'").fetchone() == (None,)

        # The real one comes back to the envelope sender (here only in the envelope, as the MTA delivers it).
        d.send(delivery_report(row["message_id"], "failed", "5.1.1", attempt=2), recipients=[envelope_sender])
        wait_until(lambda: outbox_rows(config)[0]["state"] == "failed")
        assert outbox_rows(config)[0]["last_error"] == "bounced: carol@customer.org"
        with sqlite3.connect(workdir / "mailgate.db") as db:
            assert db.execute("SELECT bounced_at FROM contact WHERE email = 'carol@customer.org'").fetchone() != (None,)
    finally:
        d.stop()


def test_with_verp_a_report_proves_itself_by_its_to_header_through_ingest(workdir: Path) -> None:
    # Through a pipe or IMAP there may be no envelope: the report's To (or Delivered-To) names
    # the envelope sender, which a forger cannot know.
    config = write_config(workdir)
    config.write_text(config.read_text().replace("poll_seconds = 0.2\n", "poll_seconds = 0.2\nverp = true\n", 1))
    cli(config, "ingest", input=bytes(mail()))
    with sqlite3.connect(workdir / "mailgate.db") as db:
        db.execute("UPDATE outbox SET state = 'sent'")
        confirmation_id, message_id, envelope_sender = db.execute(
            "SELECT id, message_id, mail_from FROM outbox WHERE template = 'requester/created'").fetchone()

    def state() -> str:
        with sqlite3.connect(workdir / "mailgate.db") as db:
            return db.execute("SELECT state FROM outbox WHERE id = ?", (confirmation_id,)).fetchone()[0]

    forged = delivery_report(message_id, "failed", "5.1.1")
    cli(config, "ingest", input=forged)
    # Nor does another mail's envelope sender.
    cli(config, "ingest", input=delivery_report(message_id, "failed", "5.1.1", attempt=2).replace(
        b"To: support@example.com", b"To: support+bounce-0123456789abcdef@example.com"))
    assert state() == "sent"
    with sqlite3.connect(workdir / "mailgate.db") as db:
        # The refusal is explained on the report without the secret address itself.
        hits = " ".join(h for (h,) in db.execute("SELECT rule_hits FROM inbound"))
    assert "no proof that it bounced" in hits and envelope_sender not in hits
    cli(config, "ingest", input=delivery_report(message_id, "failed", "5.1.1", attempt=3).replace(
        b"To: support@example.com", f"To: {envelope_sender}".encode()))
    assert state() == "failed"


def test_mail_sent_before_verp_was_turned_on_no_longer_bounces_by_report(workdir: Path) -> None:
    # Its Message-ID may be known to a CC, and it has no envelope sender of its own to prove
    # a report by: once verp is on, no report about it counts.
    config = write_config(workdir)
    cli(config, "ingest", input=bytes(mail()))
    with sqlite3.connect(workdir / "mailgate.db") as db:
        db.execute("UPDATE outbox SET state = 'sent'")
        (message_id,) = db.execute("SELECT message_id FROM outbox WHERE template = 'requester/created'").fetchone()
    config.write_text(config.read_text().replace("poll_seconds = 0.2\n", "poll_seconds = 0.2\nverp = true\n", 1))
    cli(config, "ingest", input=delivery_report(message_id, "failed", "5.1.1"))
    with sqlite3.connect(workdir / "mailgate.db") as db:
        assert db.execute("SELECT state FROM outbox WHERE message_id = ?", (message_id,)).fetchone() == ("sent",)
        assert db.execute("SELECT bounced_at FROM contact WHERE email = 'carol@customer.org'").fetchone() == (None,)


def test_a_bounce_holds_automatic_mail_to_the_address_until_it_writes_again(workdir: Path) -> None:
    """threats.md 16: a DSN flags the address. Confirmations and status notices to a dead
    address only bounce again; an agent's answer still goes (a person chose to send it)."""
    config = write_config(workdir)
    cli(config, "ingest", input=bytes(mail()))
    confirmation = next(r for r in cli_json(config, "outbox", "list") if r["template"] == "requester/created")
    with sqlite3.connect(workdir / "mailgate.db") as db:
        db.execute("UPDATE outbox SET state = 'sent' WHERE id = ?", (confirmation["id"],))
    cli(config, "ingest", input=delivery_report(confirmation["message_id"], "failed", "5.1.1"))

    def templates_to_carol() -> list[str]:
        return [r["template"] for r in cli_json(config, "outbox", "list") if r["to"] == "carol@customer.org"]

    cli(config, "tickets", "update", "1", "--status", "pending")
    assert templates_to_carol() == ["requester/created"]  # no status notice to the dead address
    # Old mail of hers imported as history says nothing of her address today.
    box = mailbox.mbox(str(workdir / "old.mbox"))
    box.add(mail(subject="Old question", headers={"Date": "Mon, 06 Mar 2023 10:00:00 +0000"}).as_bytes())
    box.close()
    cli(config, "import", str(workdir / "old.mbox"))
    cli(config, "tickets", "update", "1", "--status", "open")
    assert [t for t in templates_to_carol() if t.startswith("requester/status")] == []
    # Nor does a report about an agent's notice flag the agent (their notices are not held),
    # nor one about a member of an alias we mailed (the alias took it for the others).
    with sqlite3.connect(workdir / "mailgate.db") as db:
        db.execute("INSERT INTO contact (email, name, created_at) VALUES ('alice@example.com', '', '2026-01-01')")
        db.execute("UPDATE outbox SET state = 'sent'")
    notice = next(r for r in cli_json(config, "outbox", "list") if r["to"] == "alice@example.com")
    cli(config, "ingest", input=delivery_report(notice["message_id"], "failed", "5.2.2",
                                                recipient="alice@example.com"))
    with sqlite3.connect(workdir / "mailgate.db") as db:
        assert db.execute("SELECT bounced_at FROM contact WHERE email = 'alice@example.com'").fetchone() == (None,)
    # Carol writes again (her mailbox works now): automatic mail to her resumes.
    cli(config, "ingest", input=bytes(mail(subject="Re: [EXAMPLE #1] Printer on fire", body="Fixed my mailbox.")))
    cli(config, "tickets", "update", "1", "--status", "solved")
    assert "requester/status-solved" in templates_to_carol()


def test_a_refusal_of_the_session_is_retried_and_one_of_the_mail_is_final(relay: CaptureRelay) -> None:
    s = settings({"url": f"smtp://127.0.0.1:{relay.port}", "timeout_seconds": 10})
    for refusal, permanent in (("530 5.7.0 Must issue a STARTTLS command first", False),  # at MAIL FROM
                               ("550 5.7.1 Sender address rejected: not owned by user", False),
                               ("552 5.3.4 Message size exceeds fixed limit", True)):
        relay.fail_mail_from = refusal
        with pytest.raises(DeliveryError) as exc:
            asyncio.run(deliver_by_smtp(s, _outbox_row()))
        assert (str(exc.value)[:3], exc.value.permanent) == (refusal[:3], permanent)
    relay.fail_mail_from = None
    for refusal, permanent in (("550 5.1.1 <carol@customer.org>: Recipient address rejected", True),
                               ("554 5.7.1 <carol@customer.org>: Relay access denied", False),  # wants AUTH
                               ("550 5.7.1 Unable to relay for carol@customer.org", False),  # Exchange
                               ("530 5.7.0 Authentication required", False)):
        relay.fail_rcpt = refusal
        with pytest.raises(DeliveryError) as exc:
            asyncio.run(deliver_by_smtp(s, _outbox_row()))
        assert exc.value.permanent == permanent, refusal
    relay.fail_rcpt, relay.fail_with = None, "554 5.7.1 Message rejected as spam"
    with pytest.raises(DeliveryError) as exc:
        asyncio.run(deliver_by_smtp(s, _outbox_row()))
    assert exc.value.permanent


def test_a_relay_reply_that_is_not_utf8_is_recorded(engine: Any) -> None:
    # aiosmtplib reads replies with surrogateescape; the row must still get its result.
    error = DeliveryError("550 5.1.1 Empf\udce4nger unbekannt\x00", permanent=True)
    row = _row(engine)
    record_results(engine, settings({"url": "smtp://relay"}), [(row, error)], "w")
    assert _state(engine, row) == ("failed", 1, "550 5.1.1 Empf\\udce4nger unbekannt\\x00")


def test_a_non_ascii_recipient_is_sent_with_smtputf8() -> None:
    from aiosmtpd.controller import Controller

    port = free_port()
    capture = CaptureRelay(port=port)
    controller = Controller(capture, hostname="127.0.0.1", port=port, enable_SMTPUTF8=True)
    controller.start()
    try:
        to = "josé@exämple.org"
        raw, _ = composed(to=to)
        row = ClaimedMail(id=1, message_id="mg.7.abc@example.com", mail_from="support@example.com",
                          recipients=to, raw=raw, created_at=utcnow(), attempts=1)
        asyncio.run(deliver_by_smtp(settings({"url": f"smtp://127.0.0.1:{port}", "timeout_seconds": 10}), row))
        assert [(sender, rcpts) for sender, rcpts, _ in capture.messages] == [("support@example.com", [to])]
    finally:
        controller.stop()
    # A relay without SMTPUTF8 can never take it: failed for good, not retried for a day.
    plain = CaptureRelay(port=free_port())
    controller = Controller(plain, hostname="127.0.0.1", port=plain.port, enable_SMTPUTF8=False)
    controller.start()
    try:
        with pytest.raises(DeliveryError) as exc:
            asyncio.run(deliver_by_smtp(settings({"url": f"smtp://127.0.0.1:{plain.port}"}), row))
        assert exc.value.permanent and "SMTPUTF8" in str(exc.value)
    finally:
        controller.stop()


def test_a_relay_slow_to_answer_the_final_dot_is_waited_for(relay: CaptureRelay) -> None:
    """RFC 5321 4.5.3.2.6: 10 minutes for the reply to DATA. Giving up after the command
    timeout while the relay's filter still works is how one mail is delivered on every try."""
    relay.data_seconds = 2.5
    s = settings({"url": f"smtp://127.0.0.1:{relay.port}", "timeout_seconds": 1})
    asyncio.run(deliver_by_smtp(s, _outbox_row()))  # no DeliveryError: it waited
    assert len(relay.messages) == 1


@dataclass
class _SlowRelay(CaptureRelay):
    """Slow at MAIL (before DATA: cut off there, nothing delivered) and at QUIT (after DATA:
    the mail is delivered, and that is what counts)."""

    mail_seconds: float = 0.0
    quit_seconds: float = 0.0

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        await asyncio.sleep(self.mail_seconds)
        return await super().handle_MAIL(server, session, envelope, address, mail_options)

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(self.quit_seconds)
        return "221 Bye"


@pytest.fixture
def slow_relay() -> Iterator[_SlowRelay]:
    from aiosmtpd.controller import Controller

    relay = _SlowRelay(port=free_port())
    controller = Controller(relay, hostname="127.0.0.1", port=relay.port)
    controller.start()
    yield relay
    controller.stop()


def test_one_send_is_cut_off_only_before_data(slow_relay: _SlowRelay, monkeypatch: pytest.MonkeyPatch) -> None:
    """A send must end before its claim goes stale, yet never be cut off while the relay,
    which may have the mail, answers DATA (RFC 1047)."""
    longest_send = outbox.BEFORE_DATA_SECONDS + 2 * outbox.DATA_TIMEOUT_SECONDS + outbox.QUIT_SECONDS
    assert outbox.STALE_SENDING.total_seconds() > longest_send
    monkeypatch.setattr(outbox, "BEFORE_DATA_SECONDS", 1.0)
    s = settings({"url": f"smtp://127.0.0.1:{slow_relay.port}", "timeout_seconds": 10})
    slow_relay.mail_seconds = 2.0  # each step in time, the steps before DATA too slow together
    with pytest.raises(DeliveryError) as exc:
        asyncio.run(deliver_by_smtp(s, _outbox_row()))
    assert "TimeoutError" in str(exc.value) and slow_relay.messages == []
    # DATA over that limit: waited for. QUIT hanging: the mail is delivered when DATA is
    # answered, and the caller has it to record at once (a stop of the daemon during a
    # slow QUIT left the row unrecorded, to be sent again).
    slow_relay.mail_seconds, slow_relay.data_seconds, slow_relay.quit_seconds = 0.0, 2.0, 60.0

    async def deliver_and_stop() -> None:
        await asyncio.wait_for(deliver_by_smtp(s, _outbox_row()), 10)  # returns, QUIT unanswered

    asyncio.run(deliver_and_stop())
    assert len(slow_relay.messages) == 1

    # A relay that never answers QUIT: a few connections wait for it, the rest are closed.
    async def deliver_many() -> int:
        for _ in range(outbox.MAX_WAITING_QUITS + 5):
            await deliver_by_smtp(s, _outbox_row())
        return len(outbox._saying_goodbye)

    slow_relay.data_seconds = 0.0
    assert asyncio.run(deliver_many()) == outbox.MAX_WAITING_QUITS
    assert len(slow_relay.messages) == 1 + outbox.MAX_WAITING_QUITS + 5


def test_data_after_the_before_data_limit_expired_is_a_timeout() -> None:
    """The limit can fire in the same loop pass as RCPT's reply, and Python 3.11's wait_for
    may swallow its cancel: DATA then starts on an expired limit. It must not go out, and
    the send is a timeout to retry (lifting the expired limit raised RuntimeError)."""
    relay = outbox._relay_class()(hostname="127.0.0.1", port=1)

    async def data_on_an_expired_limit() -> None:
        async with asyncio.timeout(0) as before_data:
            relay.before_data = before_data
            with contextlib.suppress(asyncio.CancelledError):  # swallowed, as 3.11's wait_for can
                await asyncio.sleep(1)
            assert before_data.expired()
            await relay.data(b"Subject: x\r\n\r\nnot sent\r\n")

    with pytest.raises(TimeoutError, match="before DATA"):
        asyncio.run(data_on_an_expired_limit())


def test_two_senders_on_a_slow_relay_send_each_mail_once(workdir: Path, relay: CaptureRelay,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that outlasts STALE_SENDING (scaled down here to 2 s, against 1 s per mail)
    while its sender is alive: the second sender takes over only what the first has not
    reached, never a mail the first is sending or has sent."""
    import mailgate.outbox
    from mailgate.outbox import send_due

    config = write_config(workdir, outbound=f"smtp://127.0.0.1:{relay.port}")
    for i in range(2):  # a confirmation and two agent notices each
        cli(config, "ingest", input=bytes(mail(sender=f"c{i}@customer.org", subject=f"slow {i}")))
    rt = Runtime.build(load_settings(config))
    monkeypatch.setattr(mailgate.outbox, "STALE_SENDING", timedelta(seconds=2))
    relay.data_seconds = 1.0

    async def two_senders() -> tuple[int, int]:
        first = asyncio.create_task(send_due(rt.engine, rt.settings, "instance-a"))
        await asyncio.sleep(2.5)
        second = await send_due(rt.engine, rt.settings, "instance-b")
        return await first, second

    sent_a, sent_b = asyncio.run(two_senders())
    ids = [m["Message-ID"] for m in relay.parsed()]
    assert len(ids) == 6 and len(set(ids)) == 6
    assert sent_a + sent_b == 6 and sent_b > 0
    assert {r["state"] for r in cli_json(config, "outbox", "list")} == {"sent"}


def test_files_go_in_a_multipart_mixed_after_the_text() -> None:
    from mailgate.outbox import OutgoingFile

    long_name = "日本語のファイル名" * 20 + ".pdf"  # 1,800 characters as one RFC 2231 value
    files = [OutgoingFile("log.txt", "text/plain", "Grüße\n".encode() * 5000),
             OutgoingFile('na"me\r\nX: y.pdf', "application/pdf; evil", b"%PDF"),
             OutgoingFile(long_name, "application/pdf", b"%PDF")]
    raw, msg = composed(html="<p>Hi</p>", files=files)
    assert msg.get_content_type() == "multipart/mixed"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["multipart/alternative", "text/plain",
                                                                "application/octet-stream", "application/pdf"]
    got = [(p.get_filename(), p.get_payload(decode=True)) for p in msg.iter_attachments()]
    assert got == [("log.txt", "Grüße\n".encode() * 5000), ("na_me X: y.pdf", b"%PDF"), (long_name, b"%PDF")]
    assert next(msg.iter_attachments()).get_content_charset() == "utf-8"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998 and b"\nX: y" not in raw


@pytest.mark.parametrize("name", ["отчёт по инциденту номер 12345 очень длинное имя файла.pdf",
                                  "=?utf-8?q?=2E=2E=2Fx=2Esh?=", "🙂" * 30 + ".png"])
def test_a_file_name_reads_back_as_written_with_no_defect(name: str) -> None:
    from mailgate.outbox import OutgoingFile

    _, msg = composed(files=[OutgoingFile(name, "application/pdf", b"%PDF")])
    part = next(msg.iter_attachments())
    assert part.get_filename() == name  # a lookalike encoded word is no "../x.sh"
    assert not part["Content-Disposition"].defects  # no continuation splits a character


def test_text_files_keep_their_bytes_and_types_are_ascii() -> None:
    """A stored attachment keeps no charset: Latin-1 text labelled text/plain would be read
    as US-ASCII, so it goes as bytes; a parsed type may hold any letter ("image/pñg")."""
    from mailgate.outbox import OutgoingFile

    latin1 = "Grüße aus Köln\n".encode("latin-1")
    raw, msg = composed(files=[OutgoingFile("notes.txt", "text/plain", latin1),
                               OutgoingFile("a.png", "image/pñg", b"\x89PNG"),
                               OutgoingFile("ascii.csv", "text/csv", b"a,b\n")])
    parts = list(msg.iter_attachments())
    assert [p.get_content_type() for p in parts] == ["application/octet-stream", "application/octet-stream",
                                                     "text/csv"]
    assert parts[0].get_payload(decode=True) == latin1 and parts[2].get_content_charset() == "utf-8"
    assert raw.isascii()


def test_an_idn_domain_goes_as_its_a_label_to_a_relay_without_smtputf8() -> None:
    from aiosmtpd.controller import Controller

    capture = CaptureRelay(port=free_port())
    controller = Controller(capture, hostname="127.0.0.1", port=capture.port, enable_SMTPUTF8=False)
    controller.start()
    try:
        to = "carol@bücher.de"
        raw, _ = composed(to=to)
        assert "\r\nTo: carol@xn--bcher-kva.de\r\n" in raw.decode("ascii")
        row = ClaimedMail(id=1, message_id="mg.7.abc@example.com", mail_from="support@example.com",
                          recipients=to, raw=raw, created_at=utcnow(), attempts=1)
        asyncio.run(deliver_by_smtp(settings({"url": f"smtp://127.0.0.1:{capture.port}", "timeout_seconds": 10}),
                                    row))
        assert [(sender, rcpts) for sender, rcpts, _ in capture.messages] == [
            ("support@example.com", ["carol@xn--bcher-kva.de"])]
    finally:
        controller.stop()


@dataclass
class _HeloRelay(CaptureRelay):
    helo_names: list[str] = field(default_factory=list)

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        self.helo_names.append(session.host_name)
        return await super().handle_MAIL(server, session, envelope, address, mail_options)


def test_the_ehlo_name_is_outbound_helo_name_else_a_dotted_smtp_hostname() -> None:
    """socket.getfqdn() is "localhost" in many containers, which relays refuse."""
    from aiosmtpd.controller import Controller

    from mailgate.outbox import helo_name

    relay = _HeloRelay(port=free_port())
    controller = Controller(relay, hostname="127.0.0.1", port=relay.port)
    controller.start()
    try:
        url = f"smtp://127.0.0.1:{relay.port}"
        asyncio.run(deliver_by_smtp(settings({"url": url, "helo_name": "mx1.example.com"}), _outbox_row()))
        dotted = settings_from_dict({**_base_config(), "outbound": {"url": url},
                                     "smtp": {"hostname": "helpdesk.example.com"}}, base=Path("/nonexistent"))
        asyncio.run(deliver_by_smtp(dotted, _outbox_row()))
        assert relay.helo_names == ["mx1.example.com", "helpdesk.example.com"]
        assert helo_name(settings({"url": url})) == outbox._fqdn()  # smtp.hostname "mailgate": no domain
        for greeting in ("Example Corp. Help Desk", "hilfe.bücher.example"):  # only our greeting's text
            words = settings_from_dict({**_base_config(), "outbound": {"url": url}, "smtp": {"hostname": greeting}},
                                       base=Path("/nonexistent"))
            assert helo_name(words) == outbox._fqdn()
    finally:
        controller.stop()


def _base_config() -> dict[str, Any]:
    return {"database": {"url": "sqlite:///mailgate.db"},
            "helpdesk": {"address": "support@example.com", "comment_address": "support-comment@example.com",
                         "subject_tag": "EXAMPLE", "secret_key": SECRET, "data_dir": "data"}}


def test_a_stop_hands_back_the_mail_the_relay_never_got(engine: Any, relay: CaptureRelay) -> None:
    """The stop's time runs out while the relay answers the first mail's DATA: that one may
    be delivered and stays claimed (never sent twice at once); the rest of the batch, which
    the relay never saw, is due again at once, its claim no attempt (it waited 45 minutes)."""
    raw, _ = composed()
    ids = [_row(engine, state="queued", attempts=0, raw=raw) for _ in range(3)]
    relay.data_seconds = 3.0
    s = settings({"url": f"smtp://127.0.0.1:{relay.port}", "timeout_seconds": 10})

    async def stop_during_data() -> None:
        sender = outbox.OutboxSender(engine, s, "w")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(sender.drain(0.5), 1.0)

    asyncio.run(stop_during_data())
    assert [_state(engine, i)[:2] for i in ids] == [("sending", 1), ("queued", 0), ("queued", 0)]
    assert [r.id for r in outbox.claim_due(engine, "next")] == ids[1:]

    # No mail is begun after the drain's time: the second row waits for the next start.
    for i in ids[1:]:
        _release(engine, i)
    relay.data_seconds = 0.6

    async def drain_in_time() -> None:
        await asyncio.wait_for(outbox.OutboxSender(engine, s, "w").drain(0.3), 5.0)

    asyncio.run(drain_in_time())
    assert [_state(engine, i)[:2] for i in ids[1:]] == [("sent", 1), ("queued", 0)]


def _release(engine: Any, row_id: int) -> None:
    from mailgate.store.engine import session_scope

    with session_scope(engine) as session:
        row = session.get(Outbox, row_id)
        assert row is not None
        row.state, row.attempts, row.next_attempt_at = "queued", 0, utcnow()
        session.add(row)


def test_a_report_naming_the_a_label_flags_the_address_as_the_customer_wrote_it(workdir: Path) -> None:
    """carol@bücher.de is sent to as carol@xn--bcher-kva.de, and a report names that form."""
    config = write_config(workdir)
    cli(config, "ingest", input=mail(sender="Carol <carol@bücher.de>").as_bytes(policy=policy.SMTPUTF8))
    confirmation = next(r for r in cli_json(config, "outbox", "list") if r["template"] == "requester/created")
    assert confirmation["to"] == "carol@bücher.de"
    with sqlite3.connect(workdir / "mailgate.db") as db:
        db.execute("UPDATE outbox SET state = 'sent' WHERE id = ?", (confirmation["id"],))
    cli(config, "ingest", input=delivery_report(confirmation["message_id"], "failed", "5.1.1",
                                                recipient="carol@xn--bcher-kva.de"))
    with sqlite3.connect(workdir / "mailgate.db") as db:
        flagged = db.execute("SELECT email FROM contact WHERE bounced_at IS NOT NULL").fetchall()
    assert flagged == [("carol@bücher.de",)]


def test_a_stop_during_the_claim_hands_the_claimed_rows_back(engine: Any, relay: CaptureRelay,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim commits in its thread even when the stop cancels the pass meanwhile (a
    database slow to answer at the stop): its rows sat claimed for 45 minutes."""
    import time

    raw, _ = composed()
    ids = [_row(engine, state="queued", attempts=0, raw=raw) for _ in range(3)]
    real_claim = outbox.claim_due

    def slow_claim(*args: Any, **kw: Any) -> Any:
        time.sleep(1.0)
        return real_claim(*args, **kw)

    monkeypatch.setattr(outbox, "claim_due", slow_claim)
    s = settings({"url": f"smtp://127.0.0.1:{relay.port}", "timeout_seconds": 10})

    async def stop_during_the_claim() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(outbox.OutboxSender(engine, s, "w").drain(0.4), 0.6)

    asyncio.run(stop_during_the_claim())
    assert [_state(engine, i)[:2] for i in ids] == [("queued", 0)] * 3
    assert relay.messages == []
