"""Tests for mailgate.ingest.parse: decoding, sanitising, limits and hostile input."""

from __future__ import annotations

import os
import random
import struct
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailgate.ingest.parse import (
    ParsedMessage,
    UnusableMessage,
    parse_message,
    sanitize_filename,
)

FIXTURES = Path(__file__).parent / "fixtures"
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "spamassassin"


def fixture(name: str) -> ParsedMessage:
    return parse_message((FIXTURES / name).read_bytes())


def mail(headers: str, body: str = "Hello\n") -> bytes:
    return (headers.strip("\n") + "\n\n" + body).replace("\n", "\r\n").encode("utf-8")


BASIC = """From: "Doe, Jane" <Jane.Doe@Example.COM>
To: support@example.com, "Other" <other@example.com>
Cc: cc1@example.com
Reply-To: jane+replies@example.com
Delivered-To: support@example.com
X-Original-To: helpdesk@example.com
Subject: Printer on fire
Message-ID: <abc123@example.com>
In-Reply-To: <parent@example.com>
References: <root@example.com>
 <parent@example.com>
Date: Tue, 05 Mar 2024 10:12:00 +0100
"""


# --------------------------------------------------------------------------- headers


def test_basic_fields() -> None:
    msg = parse_message(mail(BASIC, "It is on fire.\n"))
    assert msg.message_id == "abc123@example.com"
    assert msg.from_addr == "jane.doe@example.com"
    assert msg.from_name == "Doe, Jane"
    assert msg.to == ("support@example.com", "other@example.com")
    assert msg.cc == ("cc1@example.com",)
    assert msg.reply_to == ("jane+replies@example.com",)
    assert msg.delivered_to == ("support@example.com", "helpdesk@example.com")
    assert msg.in_reply_to == ("parent@example.com",)
    assert msg.references == ("root@example.com", "parent@example.com")
    assert msg.date == datetime(2024, 3, 5, 9, 12, tzinfo=UTC)
    assert msg.text == "It is on fire."
    assert msg.html is None
    assert msg.attachments == ()
    assert msg.defects == ()
    assert not msg.is_dsn
    assert msg.header("SUBJECT") == "Printer on fire"
    assert msg.header("x-missing") is None
    assert msg.header_all("references") == ["<root@example.com> <parent@example.com>"]
    assert msg.headers[0] == ("from", '"Doe, Jane" <Jane.Doe@Example.COM>')


def test_missing_from_and_message_id_are_defects_not_failures() -> None:
    msg = parse_message(mail("Subject: hi\nDate: not a date at all"))
    assert msg.from_addr == ""
    assert msg.message_id is None
    assert msg.date is None
    assert any("missing From" in d for d in msg.defects)
    assert any("missing Message-ID" in d for d in msg.defects)
    assert any("Date" in d for d in msg.defects)


def test_strict_address_parsing_refuses_double_at() -> None:
    msg = parse_message(mail("From: a@evil@corp\nTo: x@y.example, b@evil@corp\nSubject: s"))
    assert msg.from_addr == ""
    assert msg.to == ("x@y.example",)
    assert any("a@evil@corp" in d for d in msg.defects)


def test_a_quoted_local_part_with_a_comma_or_space_is_no_address() -> None:
    """Recipients are comma-joined on the way out: the relay would get x, victim@elsewhere
    and y as recipients of a mail whose To shows one odd address."""
    raw = mail('From: "x,victim@elsewhere.example,y"@customer.org\n'
               'Cc: "a b"@customer.org, "ok.dot"@customer.org\nSubject: s')
    msg = parse_message(raw)
    assert msg.from_addr == ""
    assert msg.cc == ('"ok.dot"@customer.org',)
    assert any("victim@elsewhere.example" in d for d in msg.defects)


def test_encoded_display_name_cannot_inject_an_address() -> None:
    # The encoded word decodes to '<boss@corp>' but is a display name, never an address.
    raw = mail("From: =?utf-8?q?=3Cboss=40corp=3E?= <mallory@evil.example>\nSubject: s")
    msg = parse_message(raw)
    assert msg.from_addr == "mallory@evil.example"
    assert msg.from_name == "<boss@corp>"


def test_subject_with_encoded_crlf_is_one_line() -> None:
    raw = mail("From: a@b.example\nSubject: =?utf-8?q?hi=0D=0ABcc:_victim@x.example?=")
    msg = parse_message(raw)
    assert msg.subject == "hi Bcc: victim@x.example"
    assert "\n" not in msg.header("subject")  # type: ignore[operator]


def test_eight_bit_header_is_decoded_with_defect() -> None:
    raw = b"From: J\xc3\xbcrgen <j@example.de>\r\nSubject: Gr\xfc\xdfe\r\n\r\nx\r\n"
    msg = parse_message(raw)
    assert msg.from_name == "Jürgen"
    assert msg.subject == "Grüße"
    assert any("8-bit" in d for d in msg.defects)


def test_a_forwarded_address_that_failed_counts_as_the_address_we_mailed() -> None:
    """Postfix reports a virtual alias carol@ -> csmith@ whose mailbox is gone with both
    addresses: carol@ is what we mailed, and it is dead."""
    raw = (b"From: MAILER-DAEMON@mx.customer.org\r\nSubject: Undelivered\r\nMIME-Version: 1.0\r\n"
           b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
           b"--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx\r\n\r\n"
           b"Final-Recipient: rfc822; csmith@mail.customer.org\r\nOriginal-Recipient: rfc822;carol@customer.org\r\n"
           b"Action: failed\r\nStatus: 5.1.1\r\n\r\n"
           b"--b\r\nContent-Type: text/rfc822-headers\r\n\r\nMessage-ID: <m1@example.com>\r\n\r\n--b--\r\n")
    assert "carol@customer.org" in parse_message(raw).dsn_failed_recipients


def test_a_utf8_message_id_is_read_as_utf8() -> None:
    """RFC 6532: with SMTPUTF8 a Message-ID may hold UTF-8; it was stored as 'b\ufffd\ufffdcher'."""
    raw = ("From: j\u00fcrgen@b\u00fccher.de\r\nMessage-ID: <u1@b\u00fccher.de>\r\n"
           "In-Reply-To: <r1@b\u00fccher.de>\r\nSubject: s\r\n\r\nx\r\n").encode()
    msg = parse_message(raw)
    assert msg.message_id == "u1@b\u00fccher.de"
    assert msg.in_reply_to == ("r1@b\u00fccher.de",)


def test_a_message_id_with_a_quoted_local_part_is_read_whole() -> None:
    """It was read as `local"@c.org`, an id no one sent, which the confirmation then named."""
    msg = parse_message(b'From: a@c.org\r\nMessage-ID: <"quoted local"@c.org>\r\n'
                        b'References: <r1@c.org> <"x y"@c.org>\r\nSubject: s\r\n\r\nx\r\n')
    assert msg.message_id == '"quoted local"@c.org'
    assert msg.references == ("r1@c.org", '"x y"@c.org')
    bare = parse_message(b'From: a@c.org\r\nMessage-ID: "quoted local"@c.org\r\nSubject: s\r\n\r\nx\r\n')
    assert bare.message_id is None  # no id rather than half of one
    # Ids with a quoted pair or a stray quote, and no space, are read as they are.
    odd = parse_message(b'From: a@c.org\r\nMessage-ID: <"a\\"b"@host.example>\r\n'
                        b'References: <abc"def@host.example>\r\nSubject: s\r\n\r\nx\r\n')
    assert (odd.message_id, odd.references) == ('"a\\"b"@host.example', ('abc"def@host.example',))


def test_duplicate_subject_uses_first() -> None:
    msg = parse_message(mail("From: a@b.example\nSubject: first\nSubject: second"))
    assert msg.subject == "first"
    assert any("duplicate subject" in d for d in msg.defects)


def test_date_without_zone_is_utc_with_defect() -> None:
    msg = parse_message(mail("From: a@b.example\nDate: Thu, 22 Aug 2002 07:36:16"))
    assert msg.date == datetime(2002, 8, 22, 7, 36, 16, tzinfo=UTC)
    assert any("time zone" in d for d in msg.defects)


def test_long_lines_are_fine() -> None:
    body = "x" * 5000 + "\n"
    msg = parse_message(mail("From: a@b.example\nSubject: " + "s" * 3000, body))
    assert msg.text == "x" * 5000
    assert len(msg.subject) == 3000


def test_mbox_from_line_is_tolerated() -> None:
    raw = b"From someone@example.com Thu Aug 22 12:36:23 2002\n" + mail(BASIC)
    assert parse_message(raw).from_addr == "jane.doe@example.com"
    # The same mbox-saved mail sent by SMTP: the listener's Received line comes first.
    traced = b"Received: from client ([127.0.0.1])\r\n\tby h (mailgate) with ESMTP; Fri, 27 Nov 2026\r\n" + raw
    msg = parse_message(traced)
    assert (msg.from_addr, msg.subject) == (parse_message(raw).from_addr, parse_message(raw).subject)



def test_a_trace_line_over_garbage_is_still_unusable() -> None:
    trace = b"Received: from client ([127.0.0.1])\r\n\tby h (mailgate) with ESMTP; Fri, 27 Nov 2026\r\n"
    for garbage in (bytes(range(256)) * 4, b"Subject : hi\r\n\r\nbody\r\n", b"just some text\r\n"):
        with pytest.raises(UnusableMessage):
            parse_message(trace + garbage)


def test_nul_and_surrogates_never_reach_text() -> None:
    raw = mail("From: a@b.example\nContent-Type: text/plain; charset=utf-7", "a+2D3-b\x00c\n")
    msg = parse_message(raw)
    assert "\x00" not in msg.text
    msg.text.encode("utf-8")


# --------------------------------------------------------------------------- charsets


def test_folded_subject_with_mixed_and_unknown_charsets() -> None:
    msg = fixture("subject_folded_mixed.eml")
    assert msg.subject == "Grüße aus München and more text Café “quoted” €café"
    assert msg.text == "Body in an unknown charset: café"
    assert any("x-unknown" in d for d in msg.defects)


@pytest.mark.parametrize("charset", ["undefined", "idna", "punycode", "unicode_escape"])
def test_python_codecs_that_are_no_mail_charset_decode_as_unknown(charset: str) -> None:
    # "undefined" raises on any input and idna/punycode on errors="replace": each lost the
    # subject (the message failed) or the body or an attachment.
    raw = (f"From: =?{charset}?q?Ren=C3=A9?= <rene@example.com>\r\nTo: support@example.com\r\n"
           f"Subject: =?{charset}?q?Caf=C3=A9?=\r\nMessage-ID: <c@example.com>\r\n"
           "Content-Type: multipart/mixed; boundary=B\r\n\r\n"
           f"--B\r\nContent-Type: text/plain; charset={charset}\r\n\r\nCaf\u00e9 au lait\r\n"
           "--B\r\nContent-Type: application/pdf\r\n"
           f"Content-Disposition: attachment; filename*={charset}''bill%20%C3%A9.pdf\r\n\r\nxx\r\n--B--\r\n")
    msg = parse_message(raw.encode("utf-8"))
    assert (msg.subject, msg.from_name, msg.text.strip()) == ("Café", "René", "Café au lait")
    assert [a.content_type for a in msg.attachments] == ["application/pdf"]
    if charset != "unicode_escape":  # the stdlib reads that name itself (as Latin-1): kept, if not pretty
        assert msg.attachments[0].filename == "bill é.pdf"
    assert any(f"unknown charset '{charset}'" in d for d in msg.defects)


def test_a_nul_in_a_charset_name_is_an_unknown_charset() -> None:
    msg = parse_message(mail("From: a@example.com\nSubject: x\nContent-Type: text/plain; charset=\"utf\x00-8\"",
                             "Caf\u00e9"))
    assert msg.text.strip() == "Café"


def test_iso_2022_jp_subject_and_body() -> None:
    msg = fixture("subject_iso2022jp.eml")
    assert msg.subject == "会議の件について"
    assert msg.from_name == "山田"
    assert msg.text == "よろしくお願いします。"


def test_windows_1251_subject_and_body() -> None:
    msg = fixture("subject_windows1251.eml")
    assert msg.subject == "Проблема с входом"
    assert msg.from_name == "Иван Иванов"
    assert msg.text == "Не могу войти в систему."


def test_body_charset_lie_falls_back() -> None:
    raw = b"From: a@b.example\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\ncaf\xc3\xa9 and na\xefve\r\n"
    msg = parse_message(raw)
    assert "caf" in msg.text
    assert any("charset" in d for d in msg.defects)


# --------------------------------------------------------------------------- HTML


def test_html_only_is_sanitized_and_converted() -> None:
    msg = fixture("html_only.eml")
    assert msg.html is not None
    lowered = msg.html.lower()
    hostile = ("<script", "onclick", "onload", "onerror", "javascript:", "<svg", "<iframe", "alert")
    for bad in hostile:
        assert bad not in lowered
    assert 'href="https://example.org/help"' in msg.html
    assert "Hello support, my printer is broken." in msg.text
    assert "alert" not in msg.text


# --------------------------------------------------------------------------- attachments


def test_rfc2231_and_hostile_filenames() -> None:
    msg = fixture("attachments_hostile.eml")
    assert msg.text == "See attached."
    names = [a.filename for a in msg.attachments]
    assert names == ["Rechnung März 2024.pdf", "passwd", "x.exe", "evilnamefdp.exe"]
    assert msg.attachments[0].content_type == "application/pdf"
    assert msg.attachments[0].data == b"%PDF-1.4 fake"
    for name in names:
        assert "/" not in name and "\\" not in name and "\x00" not in name
        assert "\u202e" not in name


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\x.exe", "x.exe"),
        ("C:x.exe", "x.exe"),
        ("a\x00b.txt", "ab.txt"),
        ("invoice\u202eexe.pdf", "invoiceexe.pdf"),
        ("..", "attachment"),
        ("", "attachment"),
        (None, "attachment"),
        ("line\r\nbreak.txt", "linebreak.txt"),
    ],
)
def test_sanitize_filename(raw: str | None, expected: str) -> None:
    assert sanitize_filename(raw) == expected


def test_sanitize_filename_keeps_extension_when_truncating() -> None:
    name = sanitize_filename("a" * 500 + ".pdf")
    assert len(name) == 200
    assert name.endswith(".pdf")


def test_inline_cid_image() -> None:
    msg = fixture("inline_cid.eml")
    assert msg.text == "See the screenshot."
    assert msg.html is not None and 'src="cid:image001.png@01DA0000"' in msg.html
    first, second = msg.attachments
    assert first.content_id == "image001.png@01DA0000"
    assert first.inline is True
    assert first.data.startswith(b"\x89PNG")
    assert second.content_id == "other@01DA0000"
    assert second.inline is False


def test_forwarded_message_is_one_eml_attachment() -> None:
    msg = fixture("forwarded_rfc822.eml")
    assert msg.text == "Forwarding the customer's mail."
    assert len(msg.attachments) == 1
    att = msg.attachments[0]
    assert att.filename == "Invoice question €.eml"
    assert att.content_type == "message/rfc822"
    inner = parse_message(att.data)
    assert inner.message_id == "inner1@example.org"
    assert inner.text == "Why is my invoice so high?"
    assert [a.filename for a in inner.attachments] == ["invoice.pdf"]


def _tnef_object(level: int, name: int, kind: int, data: bytes) -> bytes:
    checksum = sum(data) & 0xFFFF
    return struct.pack("<BHHI", level, name, kind, len(data)) + data + struct.pack("<H", checksum)


def build_tnef(filename: str, payload: bytes) -> bytes:
    """A minimal winmail.dat: version, code page and one attachment (title + data)."""
    out = struct.pack("<IH", 0x223E9F78, 0x1234)
    out += _tnef_object(1, 0x9006, 0x0008, struct.pack("<I", 0x00010000))
    out += _tnef_object(1, 0x9007, 0x0006, struct.pack("<II", 1252, 0))
    out += _tnef_object(2, 0x9002, 0x0006, b"\x01\x00" + b"\x00" * 12)
    out += _tnef_object(2, 0x8010, 0x0001, filename.encode("ascii") + b"\x00")
    out += _tnef_object(2, 0x800F, 0x0006, payload)
    return out


def tnef_mail(tnef: bytes) -> bytes:
    import base64

    encoded = base64.encodebytes(tnef).decode("ascii")
    return mail(
        'From: outlook@example.com\nSubject: TNEF\nContent-Type: multipart/mixed; boundary="T"',
        "--T\nContent-Type: text/plain\n\nSee attachment.\n"
        '--T\nContent-Type: application/ms-tnef; name="winmail.dat"\n'
        'Content-Disposition: attachment; filename="winmail.dat"\n'
        f"Content-Transfer-Encoding: base64\n\n{encoded}--T--\n",
    )


def test_winmail_dat_is_decoded_and_kept() -> None:
    tnef = build_tnef("report.txt", b"hello from tnef")
    msg = parse_message(tnef_mail(tnef))
    names = [a.filename for a in msg.attachments]
    assert names == ["winmail.dat", "report.txt"]
    assert msg.attachments[0].data == tnef
    assert msg.attachments[0].content_type == "application/ms-tnef"
    assert msg.attachments[1].data == b"hello from tnef"
    assert msg.attachments[1].content_type == "text/plain"


def test_broken_winmail_dat_keeps_original_with_defect() -> None:
    msg = parse_message(tnef_mail(b"not a tnef stream at all"))
    assert [a.filename for a in msg.attachments] == ["winmail.dat"]
    assert msg.attachments[0].data == b"not a tnef stream at all"
    assert any("winmail.dat" in d for d in msg.defects)


def test_a_winmail_dat_of_many_files_or_records_is_kept_unopened(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each file inside would be a stored blob and a notice line outside the MIME part limit,
    and tnefparse's time grows with records x bytes: past the limits it stays one file."""
    from mailgate.ingest import parse

    many = build_tnef("a.txt", b"a")
    for i in range(parse.MAX_TNEF_FILES):
        many += _tnef_object(2, 0x9002, 0x0006, b"\x01\x00" + b"\x00" * 12)
        many += _tnef_object(2, 0x8010, 0x0001, f"f{i}.txt".encode() + b"\x00")
        many += _tnef_object(2, 0x800F, 0x0006, b"x")
    msg = parse_message(tnef_mail(many))
    assert [a.filename for a in msg.attachments] == ["winmail.dat"]
    assert any(f"{parse.MAX_TNEF_FILES + 1} files" in d for d in msg.defects)

    records = build_tnef("b.txt", b"b") + _tnef_object(1, 0x9999, 0x0006, b"") * 200
    assert parse._tnef_record_count(records) == 205
    monkeypatch.setattr(parse, "MAX_TNEF_COPY_BYTES", 205 * len(records) - 1)
    msg = parse_message(tnef_mail(records))
    assert [a.filename for a in msg.attachments] == ["winmail.dat"]
    assert any("205 records" in d for d in msg.defects)
    monkeypatch.setattr(parse, "MAX_TNEF_COPY_BYTES", 205 * len(records))
    assert [a.filename for a in parse_message(tnef_mail(records)).attachments] == ["winmail.dat", "b.txt"]


def test_archives_are_not_decompressed() -> None:
    import base64
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("inner.txt", "x" * 10_000)
    data = buf.getvalue()
    msg = parse_message(
        mail(
            'From: a@b.example\nContent-Type: multipart/mixed; boundary="Z"',
            "--Z\nContent-Type: text/plain\n\nzip\n--Z\nContent-Type: application/zip; "
            'name="a.zip"\nContent-Transfer-Encoding: base64\n\n' + base64.encodebytes(data).decode() + "--Z--\n",
        )
    )
    assert [(a.filename, a.data) for a in msg.attachments] == [("a.zip", data)]


# --------------------------------------------------------------------------- DSN


def test_rfc3464_bounce() -> None:
    msg = fixture("dsn_rfc3464.eml")
    assert msg.is_dsn
    assert msg.dsn_original_message_ids == ("outbox-42-abc@mailgate.example.com",)
    assert msg.dsn_failed_recipients == ("gone.user@example.org",)
    assert "could not" in msg.text


def test_dsn_with_returned_message_rfc822() -> None:
    raw = mail(
        "From: MAILER-DAEMON@mx.example\nSubject: failure\n"
        'Content-Type: multipart/report; report-type="delivery-status"; boundary="R"',
        "--R\nContent-Type: text/plain\n\nfailed\n"
        "--R\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx\n\n"
        "Final-Recipient: rfc822;<nobody@example.org>\nAction: failed\nStatus: 5.0.0\n\n"
        "--R\nContent-Type: message/rfc822\n\nFrom: support@example.com\n"
        "Message-ID: <orig-1@example.com>\nSubject: hello\n\nbody\n--R--\n",
    )
    msg = parse_message(raw)
    assert msg.is_dsn
    assert msg.dsn_original_message_ids == ("orig-1@example.com",)
    assert msg.dsn_failed_recipients == ("nobody@example.org",)


# --------------------------------------------------------------------------- refusals


def nested_multipart(depth: int) -> bytes:
    parts = [b"From: a@b.example\nSubject: deep\n"]
    for i in range(depth):
        parts.append(b"Content-Type: multipart/mixed; boundary=b%d\n\n--b%d\n" % (i, i))
    parts.append(b"Content-Type: text/plain\n\nbottom\n")
    for i in reversed(range(depth)):
        parts.append(b"--b%d--\n" % i)
    return b"".join(parts)


def test_600_deep_nesting_is_unusable_not_recursion_error() -> None:
    with pytest.raises(UnusableMessage, match="nesting"):
        parse_message(nested_multipart(600))


def test_nesting_within_limit_parses() -> None:
    assert parse_message(nested_multipart(15)).text == "bottom"


def test_deep_message_rfc822_chain_is_unusable() -> None:
    raw = b"From: a@b.example\nSubject: s\n"
    raw += b"Content-Type: message/rfc822\n\nFrom: a@b.example\n" * 600 + b"\nbottom\n"
    with pytest.raises(UnusableMessage):
        parse_message(raw)


def test_too_many_parts() -> None:
    body = "".join("--P\nContent-Type: text/plain\n\npart\n" for _ in range(50)) + "--P--\n"
    raw = mail('From: a@b.example\nContent-Type: multipart/mixed; boundary="P"', body)
    with pytest.raises(UnusableMessage, match="parts"):
        parse_message(raw, max_parts=20)
    assert parse_message(raw).text.count("part") == 50


def test_huge_from_header_is_refused_before_address_parsing() -> None:
    # Parsing 20,000 addresses takes the email package seconds; the byte-level precheck
    # (its length, then a count of '@') refuses it before any address is parsed.
    addresses = ", ".join(f"user{i}@example.com" for i in range(20_000))
    raw = mail(f"From: {addresses}\nSubject: s")
    with pytest.raises(UnusableMessage, match="header 'from' is [0-9]+ bytes long"):
        parse_message(raw)


def test_a_flood_of_small_header_fields_is_refused_before_parsing() -> None:
    from mailgate.ingest import parse

    many = "".join(f"X-A{i}: b\n" for i in range(parse.MAX_HEADER_FIELDS))
    with pytest.raises(UnusableMessage, match=r"[0-9]+ header fields \(limit 5000\)"):
        parse_message(mail(f"From: a@b.example\n{many}Subject: s"))
    big = "".join(f"X-B{i}: {'v' * 900}\n" for i in range(2500))  # 2.2 MB in 2500 fields
    with pytest.raises(UnusableMessage, match="header block of [0-9]+ bytes"):
        parse_message(mail(f"From: a@b.example\n{big}Subject: s"))
    fine = "".join(f"Received: from h{i}.example by mx.example\n" for i in range(200))
    assert parse_message(mail(f"From: a@b.example\n{fine}Subject: s")).from_addr == "a@b.example"


def test_address_count_limit_under_byte_limit() -> None:
    addresses = ",".join(f"u{i}@x.io" for i in range(600))
    with pytest.raises(UnusableMessage, match="more than 500 addresses"):
        parse_message(mail(f"From: a@b.example\nTo: {addresses}"))


def test_header_byte_limit() -> None:
    with pytest.raises(UnusableMessage, match="bytes long"):
        parse_message(mail("From: a@b.example\nX-Junk: " + "a" * 300_000))


def test_two_from_headers_are_refused() -> None:
    with pytest.raises(UnusableMessage, match="From"):
        parse_message(mail("From: a@b.example\nFrom: boss@corp.example\nSubject: s"))


@pytest.mark.parametrize("raw", [b"", b"   \r\n\t\n", b"\r\n\r\nbody only\r\n"])
def test_empty_or_headerless_input(raw: bytes) -> None:
    with pytest.raises(UnusableMessage):
        parse_message(raw)


def test_stray_nul_in_header_is_repaired_not_refused() -> None:
    msg = parse_message(b"From: a@b.example\r\nSubject: x\x00y\r\n\r\nbody\r\n")
    assert msg.subject == "xy"
    assert any("NUL" in d for d in msg.defects)


@pytest.mark.parametrize(
    "raw",
    [b"Dear support, my printer is broken.\n", b"key: value\nother: thing\n\nbody\n"],
)
def test_text_without_mail_headers_is_unusable(raw: bytes) -> None:
    with pytest.raises(UnusableMessage):
        parse_message(raw)


def test_random_bytes_are_unusable() -> None:
    rng = random.Random(20240305)
    for _ in range(200):
        with pytest.raises(UnusableMessage):
            parse_message(rng.randbytes(rng.randint(1, 4096)))


# --------------------------------------------------------------------------- speed, corpus


def test_spamassassin_corpus_parses_or_is_unusable() -> None:
    if not CORPUS.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"corpus missing at {CORPUS}")
        pytest.skip(f"corpus not found at {CORPUS}")
    counts: Counter[str] = Counter()
    start = time.perf_counter()
    for path in sorted(CORPUS.rglob("*")):
        if not path.is_file():
            continue
        try:
            parse_message(path.read_bytes())
        except UnusableMessage:
            counts["unusable"] += 1
        else:
            counts["parsed"] += 1
    elapsed = time.perf_counter() - start
    total = sum(counts.values())
    print(f"corpus: {dict(counts)} of {total} in {elapsed:.2f}s")
    assert total >= 3000
    assert counts["parsed"] >= total * 0.99


def test_html_nested_beyond_the_limit_is_kept_as_text_only() -> None:
    # 100,000 nested <div>: the sanitiser would need many minutes for this (its time grows
    # faster than the square of the depth); the parser keeps the words and says why.
    body = "<html><body>" + "<div>" * 100_000 + "Hello support, deep inside." + "</div>" * 100_000
    raw = (b"From: Mallory <mallory@example.net>\r\nTo: support@example.com\r\nSubject: deep\r\n"
           b"Message-ID: <deep@example.net>\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
           + body.encode())
    msg = parse_message(raw)
    assert msg.html is None
    assert "Hello support, deep inside." in msg.text
    assert any("nested deeper than 2048 levels" in d for d in msg.defects)


def test_html_with_many_shallow_tags_is_still_sanitised() -> None:
    body = "<p>row <b>x</b></p>" * 3000 + "<script>alert(1)</script>"
    raw = (b"From: a@example.net\r\nTo: support@example.com\r\nSubject: wide\r\n"
           b"Message-ID: <wide@example.net>\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + body.encode())
    msg = parse_message(raw)
    assert msg.html is not None and "<script" not in msg.html and msg.html.count("<p>") == 3000
