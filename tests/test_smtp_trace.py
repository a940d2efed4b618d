"""The Received line the SMTP/LMTP listener prepends (RFC 5321 4.4), as a pure function."""

from __future__ import annotations

from datetime import UTC, datetime
from email import message_from_bytes

from mailgate.transport.smtp import trace_header

NOW = datetime(2026, 11, 27, 20, 0, tzinfo=UTC)


def test_one_recipient_is_named_and_the_line_is_folded_with_crlf() -> None:
    line = trace_header(helo="mx.customer.org", peer=("203.0.113.5", 40000), hostname="help.example.com",
                        protocol="ESMTP", recipients=["support@example.com"], now=NOW)
    assert line == (b"Received: from mx.customer.org ([203.0.113.5])\r\n"
                    b"\tby help.example.com (mailgate) with ESMTP\r\n"
                    b"\tfor <support@example.com>; Fri, 27 Nov 2026 20:00:00 +0000\r\n")


def test_several_recipients_are_not_named_to_each_other() -> None:
    line = trace_header(helo="mx.customer.org", peer=("203.0.113.5", 1), hostname="h", protocol="LMTP",
                        recipients=["support@example.com", "billing@example.com"], now=NOW)
    assert b"for <" not in line and b"with LMTP; Fri, 27 Nov 2026" in line


def test_ipv6_unix_socket_and_missing_helo() -> None:
    v6 = trace_header(helo=None, peer=("2001:db8:0::1", 25, 0, 0), hostname="h", protocol="SMTP",
                      recipients=[], now=NOW)
    assert v6.startswith(b"Received: from unknown ([IPv6:2001:db8::1])\r\n")
    unix = trace_header(helo="x", peer="/run/mailgate.sock", hostname="h", protocol="SMTP", recipients=[], now=NOW)
    assert unix.startswith(b"Received: from x ([unknown])\r\n")


def test_a_hostile_helo_or_recipient_cannot_forge_header_structure() -> None:
    line = trace_header(helo="evil (forged [10.0.0.1]);\r\nX-Injected: yes " + "a" * 5000,
                        peer=("198.51.100.9", 1), hostname="h", protocol="ESMTP",
                        recipients=["support+x;\r\nBcc: <a>@example.com"], now=NOW)
    parsed = message_from_bytes(line + b"\r\nbody")
    assert parsed.keys() == ["Received"]
    value = " ".join(str(parsed["Received"]).split())
    assert value.startswith("from evilforged[10.0.0.1]X-Injected:yes")
    # ';' would end the clause early, CR/LF the line, '<>' the path.
    assert "for <support+xBcc:a@example.com>; Fri, 27 Nov 2026" in value
    assert all(len(x) <= 998 for x in line.split(b"\r\n"))


def test_domain_literal_utf8_recipient_and_bare_ipv6_helo() -> None:
    line = trace_header(helo="::1", peer=("::1", 1, 0, 0), hostname="help example.com", protocol="ESMTP",
                        recipients=["support@[192.0.2.7]"], now=NOW)
    assert line.startswith(b"Received: from [IPv6:::1] ([IPv6:::1])\r\n\tby helpexample.com (mailgate)")
    assert b"for <support@[192.0.2.7]>;" in line
    utf8 = trace_header(helo="x", peer=("198.51.100.9", 1), hostname="h", protocol="ESMTP",
                        recipients=["s\u00fcpport@example.com"], now=NOW)
    assert "for <s\u00fcpport@example.com>;".encode() in utf8
