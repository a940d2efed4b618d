"""Spam features: the structure tokens, on hand-written headers (no model, no corpus)."""

from __future__ import annotations

import pytest

from mailgate.spamfeatures import extract_tokens

BODY = b"\n\nHello, this is the body of the message.\n"


def tokens(headers: str, body: bytes = BODY) -> set[str]:
    return extract_tokens(headers.strip().encode() + body)


def test_origin_hop_from_a_dialup_line_with_a_bare_helo() -> None:
    got = tokens(
        """
Received: from relay.example.net (relay.example.net [192.0.2.10]) by mx.example.com
Received: from mccrary-8bnedo4 (c-24-98-25-152.atl.client2.example.com [24.98.25.152])
\tby relay.example.net with SMTP
Received: from laptop (localhost [127.0.0.1]) by mccrary-8bnedo4
From: a@example.org
"""
    )
    # The oldest hop from a public address is the dial-up one; the 127.0.0.1 hop is skipped.
    assert {"orig:helo_nodot", "orig:rdns_dyn"} <= got
    assert "orig:rdns_none" not in got


def test_origin_hop_of_a_well_run_server() -> None:
    got = tokens(
        """
Received: from mail.example.org (mail.example.org [198.51.100.7]) by mx.example.com
From: a@example.org
"""
    )
    assert not {t for t in got if t.startswith("orig:")}


@pytest.mark.parametrize(
    ("received", "expected"),
    [
        ("from localhost.com ([61.174.203.252]) by relay", {"orig:rdns_none"}),
        ("from [61.174.203.252] (unknown [61.174.203.252]) by relay", {"orig:helo_ip", "orig:rdns_none"}),
        ("from mail.spammer.biz (smtp.example.net [198.51.100.9]) by relay", {"orig:helo_ne_rdns"}),
        ("from a (b [10.0.0.1]) by relay", {"orig:none"}),
    ],
)
def test_origin_hop_shapes(received: str, expected: set[str]) -> None:
    got = {t for t in tokens(f"Received: {received}\nFrom: a@example.org") if t.startswith("orig:")}
    assert got == expected


def test_date_without_time_zone_and_missing_date() -> None:
    assert "date:no_tz" in tokens("Date: Sat, 7 Sep 2002 17:58:28\nFrom: a@example.org")
    assert "date:bad" in tokens("Date: yesterday at noon\nFrom: a@example.org")
    assert "date:none" in tokens("From: a@example.org")
    clean = tokens("Date: Sat, 7 Sep 2002 17:58:28 -0500\nFrom: a@example.org")
    assert not {t for t in clean if t.startswith("date:")}


def test_message_id_outline_and_domain() -> None:
    got = tokens("Message-ID: <57.883554.549391@mccrary-8bnedo4>\nFrom: x@example.org")
    assert {"mid:shape=9.9.9", "mid:dom_nodot"} <= got
    own = tokens("Message-ID: <20240301.1a@mail.example.org>\nFrom: Alice <alice@example.org>")
    assert "mid:dom_eq_from" in own
    assert "mid:no_at" in tokens("Message-ID: <justdigits123>\nFrom: x@example.org")


def test_recipients_sender_and_reply_to() -> None:
    got = tokens(
        "From: <AffiliateOffers@Amazon.Com>\nTo: undisclosed-recipients:;\n"
        "Reply-To: offers@elsewhere.example"
    )
    assert {"to:undisclosed", "to:noname", "from:dom_case", "replyto:other"} <= got
    assert not {t for t in tokens("From: a@example.org") if t.startswith("to:")}
    assert "to:eq_from" in tokens("From: james2000@example.org\nTo: james2000@example.org")
    assert "from:lp_digits" in tokens("From: james2000@example.org")
    assert "replyto:same" in tokens("From: a@example.org\nReply-To: A@example.org")


def test_subject_signals() -> None:
    fake = tokens("Subject: RE: your account\nFrom: a@example.org")
    assert "s:fake_reply" in fake
    real = tokens("Subject: Re: your account\nIn-Reply-To: <1@example.org>\nFrom: a@example.org")
    assert "s:fake_reply" not in real
    assert "s:trailing_id" in tokens("Subject: Lowest rates today        xkqwz\nFrom: a@b.org")
    assert "s:trailing_id" in tokens("Subject: Your order (48213)\nFrom: a@b.org")
    enc = tokens("Subject: =?koi8-r?B?8NLJ18XU?=\nFrom: a@b.org")
    assert "s:enc=koi8-r/b" in enc
    assert {"s:excl", "s:dollar"} <= tokens("Subject: Win $500 now!\nFrom: a@b.org")


def test_mime_structure() -> None:
    raw = (
        b"From: a@example.org\nContent-Type: multipart/alternative;"
        b' boundary="----000000000000000000000"\n\n'
        b"------000000000000000000000\nContent-Type: text/html\n"
        b"Content-Transfer-Encoding: base64\n\nPGI+aGk8L2I+\n"
        b"------000000000000000000000--\n"
    )
    got = extract_tokens(raw)
    assert {"cte:html:base64", "bnd:----9", "mime:no_version"} <= got


def test_hostile_headers_stay_bounded_and_never_raise() -> None:
    long = "a" * 200_000
    raw = (
        f"Received: from {long} ({long} [{long}])\nDate: {long}\nMessage-ID: <{long}@{long}>\n"
        f"To: {'x@y, ' * 5000}\nSubject: {'re: ' * 5000}\nFrom: {long}@{long}\n\nbody\n"
    ).encode()
    got = extract_tokens(raw)
    assert "parse:failed" not in got
    assert all(len(t) < 200 for t in got)
