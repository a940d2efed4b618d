"""Tests for mailgate.ingest.screen: auto-replies, bounces, lists and bulk mail."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgate.ingest.parse import ParsedMessage, parse_message
from mailgate.ingest.screen import ScreenVerdict, screen_message

FIXTURES = Path(__file__).parent / "fixtures"


def mail(extra_headers: str = "", subject: str = "Printer problem", sender: str = "") -> ParsedMessage:
    headers = (
        f"From: {sender or 'Jane <jane@example.org>'}\nTo: support@example.com\n"
        f"Subject: {subject}\nMessage-ID: <m1@example.org>\n"
        "Date: Tue, 05 Mar 2024 10:12:00 +0000\n" + extra_headers
    )
    raw = headers.strip("\n") + "\n\nHello\n"
    return parse_message(raw.replace("\n", "\r\n").encode("utf-8"))


def test_person() -> None:
    verdict = screen_message(mail(), envelope_from="jane@example.org")
    assert verdict == ScreenVerdict(None, "")
    assert verdict.may_answer
    assert not verdict.is_automatic


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("Auto-Submitted: auto-replied", "Auto-Submitted: auto-replied"),
        ("Auto-Submitted: auto-generated (vacation)", "Auto-Submitted: auto-generated"),
        ("X-Autoreply: yes", "X-Autoreply"),
        ("X-Autorespond: Out of office", "X-Autorespond"),
        ("Precedence: auto_reply", "Precedence: auto_reply"),
    ],
)
def test_auto_reply_headers(header: str, reason: str) -> None:
    verdict = screen_message(mail(header + "\n"), envelope_from="jane@example.org")
    assert verdict.kind == "auto_reply"
    assert verdict.reason == reason
    assert not verdict.may_answer
    assert verdict.is_automatic


def test_auto_submitted_no_is_a_person() -> None:
    assert screen_message(mail("Auto-Submitted: no\n"), envelope_from="j@x.example").kind is None


@pytest.mark.parametrize(
    "subject",
    [
        "Out of Office: [EXAMPLE #7] Printer",
        "Automatic reply: [EXAMPLE #7] Printer",
        "Auto: [EXAMPLE #7] Printer",
        "Abwesenheitsnotiz: [EXAMPLE #7] Drucker",
        "Automatische Antwort: [EXAMPLE #7] Drucker",
        "Automaattinen vastaus: [EXAMPLE #7] Tulostin",
        "Poissa: [EXAMPLE #7] Tulostin",
        "=?utf-8?b?0JDQstGC0L7QvNCw0YLQuNGH0LXRgdC60LjQuSDQvtGC0LLQtdGC?=: [EXAMPLE #7]",
        "=?utf-8?q?R=C3=A9ponse_automatique?= : [EXAMPLE #7] Imprimante",
    ],
)
def test_out_of_office_subjects(subject: str) -> None:
    verdict = screen_message(mail(subject=subject), envelope_from="jane@example.org")
    assert verdict.kind == "auto_reply"
    assert verdict.reason == "out-of-office subject"


def test_ordinary_subjects_are_not_out_of_office() -> None:
    for subject in ("Automation question", "Office printer out of toner", "Re: Autocad licence"):
        assert screen_message(mail(subject=subject), envelope_from="j@x.example").kind is None


def test_rfc3464_bounce() -> None:
    msg = parse_message((FIXTURES / "dsn_rfc3464.eml").read_bytes())
    verdict = screen_message(msg, envelope_from="")
    assert verdict == ScreenVerdict("bounce", "RFC 3464 DSN")
    assert verdict.is_automatic


def test_mailer_daemon_sender_is_a_bounce() -> None:
    msg = mail(subject="failure notice", sender="MAILER-DAEMON@mx.example.net")
    assert screen_message(msg, envelope_from=None) == ScreenVerdict("bounce", "mailer-daemon sender")
    msg = mail(subject="Delivery problem", sender="postmaster@mx.example.net")
    assert screen_message(msg, envelope_from=None).kind == "bounce"


def test_null_sender_with_bounce_subject_is_a_bounce() -> None:
    msg = mail(subject="Undelivered Mail Returned to Sender", sender="system@mx.example.net")
    assert screen_message(msg, envelope_from="") == ScreenVerdict("bounce", "null Return-Path")


def test_null_sender_otherwise_is_an_auto_reply() -> None:
    for envelope in ("", "<>"):
        verdict = screen_message(mail(), envelope_from=envelope)
        assert verdict == ScreenVerdict("auto_reply", "null Return-Path")


def test_return_path_header_stands_in_without_envelope() -> None:
    msg = mail("Return-Path: <>\n")
    assert screen_message(msg, envelope_from=None).kind == "auto_reply"
    # With a real envelope, a (forgeable) Return-Path header does not override it.
    assert screen_message(msg, envelope_from="jane@example.org").kind is None


def test_list_mail() -> None:
    msg = mail("List-Id: Printer fans <printers.lists.example.org>\nPrecedence: bulk\n")
    verdict = screen_message(msg, envelope_from="bounces@lists.example.org")
    assert verdict == ScreenVerdict("list", "List-Id present")
    assert not verdict.may_answer
    assert not verdict.is_automatic
    msg = mail("List-Unsubscribe: <mailto:leave@lists.example.org>\n")
    assert screen_message(msg, envelope_from=None).reason == "List-Unsubscribe present"
    msg = mail("Precedence: list\n")
    assert screen_message(msg, envelope_from=None) == ScreenVerdict("list", "Precedence: list")


@pytest.mark.parametrize("value", ["bulk", "junk", "BULK (newsletter)"])
def test_precedence_bulk(value: str) -> None:
    verdict = screen_message(mail(f"Precedence: {value}\n"), envelope_from="news@example.org")
    assert verdict.kind == "bulk"
    assert verdict.reason == f"Precedence: {value.split()[0].lower()}"
    assert not verdict.may_answer
    assert not verdict.is_automatic


def test_duplicate_precedence_cannot_hide_bulk() -> None:
    msg = mail("Precedence: first-class\nPrecedence: bulk\n")
    assert screen_message(msg, envelope_from=None).kind == "bulk"


@pytest.mark.parametrize("value", ["All", "OOF, AutoReply", "oof"])
def test_auto_response_suppress_is_bulk(value: str) -> None:
    verdict = screen_message(mail(f"X-Auto-Response-Suppress: {value}\n"), envelope_from="app@example.org")
    assert verdict == ScreenVerdict("bulk", "X-Auto-Response-Suppress")


def test_auto_response_suppress_receipts_only_is_a_person() -> None:
    msg = mail("X-Auto-Response-Suppress: DR, RN, NRN\n")
    assert screen_message(msg, envelope_from="jane@example.org").kind is None


def test_order_bounce_before_auto_reply_before_list() -> None:
    msg = mail(
        "Auto-Submitted: auto-replied\nList-Id: <x.example.org>\n",
        sender="mailer-daemon@mx.example.net",
    )
    assert screen_message(msg, envelope_from="").kind == "bounce"
    msg = mail("Auto-Submitted: auto-replied\nList-Id: <x.example.org>\nPrecedence: bulk\n")
    assert screen_message(msg, envelope_from="x@example.org").kind == "auto_reply"
