"""More pure ticket values: tags through reply prefixes, our Message-IDs, one-line header text."""

from __future__ import annotations

import pytest

from mailgate import domain

SECRET = "test-secret-key-0123456789"


@pytest.mark.parametrize(("subject", "number"), [
    ("[EXAMPLE #12] Printer", 12),
    ("Re: [EXAMPLE #12] Printer", 12),
    ("AW: WG: [example #12] Drucker", 12),
    ("SV: [ EXAMPLE # 12 ] Skrivare", 12),
    ("Vs: Re: Printer [EXAMPLE #0012]", 12),
    ("RE: Printer", None),
    ("[OTHER #12] Printer", None),
    ("[EXAMPLE 12] Printer", None),
    ("[EXAMPLE #] Printer", None),
])
def test_ticket_from_subject(subject: str, number: int | None) -> None:
    assert domain.ticket_from_subject("EXAMPLE", subject) == number


def test_tag_with_regex_characters_is_literal() -> None:
    assert domain.ticket_from_subject("ACME.IT", "Re: [ACME.IT #5] x") == 5
    assert domain.ticket_from_subject("ACME.IT", "Re: [ACMExIT #5] x") is None


@pytest.mark.parametrize(("subject", "tagged"), [
    ("Printer on fire", "[EXAMPLE #7] Printer on fire"),
    ("Re: [EXAMPLE #7] Printer on fire", "[EXAMPLE #7] Re: Printer on fire"),
    ("Printer [EXAMPLE #7]  on fire", "[EXAMPLE #7] Printer on fire"),
    ("", "[EXAMPLE #7]"),
])
def test_tagged_subject_carries_the_tag_once(subject: str, tagged: str) -> None:
    result = domain.tagged_subject("EXAMPLE", 7, subject)
    assert result == tagged
    assert result.count("[EXAMPLE #7]") == 1


@pytest.mark.parametrize(("subject", "normal"), [
    ("Re: Re: Printer", "Printer"),
    ("AW: WG: Drucker", "Drucker"),
    ("SV: VS: Tulostin", "Tulostin"),
    ("Ответ: Принтер", "Принтер"),
    ("Fwd: RE[2]: Printer", "Printer"),
    ("回复：打印机", "打印机"),
    ("Regarding the printer", "Regarding the printer"),
    ("Rework: plan", "Rework: plan"),
])
def test_normalize_subject(subject: str, normal: str) -> None:
    assert domain.normalize_subject(subject) == normal


def test_our_message_ids_are_authenticated() -> None:
    mid = domain.make_message_id(SECRET, "example.com", 42)
    assert mid.startswith("mg.42.") and mid.endswith("@example.com")
    assert domain.ticket_from_our_message_id(SECRET, mid) == 42
    assert domain.ticket_from_our_message_id(SECRET, mid.upper()) == 42  # some clients upper-case ids
    assert domain.ticket_from_our_message_id("another-secret-key", mid) is None
    forged = mid.replace("mg.42.", "mg.43.")
    assert domain.ticket_from_our_message_id(SECRET, forged) is None
    assert domain.ticket_from_our_message_id(SECRET, domain.make_message_id(SECRET, "example.com", None)) is None
    assert domain.ticket_from_our_message_id(SECRET, "abc@customer.org") is None
    assert domain.make_message_id(SECRET, "example.com", 42) != mid  # a fresh nonce each time


@pytest.mark.parametrize(("value", "expected"), [
    ("Hi\r\nBcc: x@evil.example", "Hi Bcc: x@evil.example"),
    ("a\tb\x00c\x1bd", "a b c d"),
    ("line\u2028sep\u2029para\x85next", "line sep para next"),
    ("  lots   of\n\n space  ", "lots of space"),
    ("Größe 火事", "Größe 火事"),
])
def test_one_line(value: str, expected: str) -> None:
    assert domain.one_line(value) == expected


def test_one_line_limit() -> None:
    assert domain.one_line("x" * 300, limit=250) == "x" * 250


@pytest.mark.parametrize("address", ["support+12-abcd@example.com", "Support+12-ABCD@Example.COM"])
def test_parse_plus_address_is_case_insensitive(address: str) -> None:
    assert domain.parse_plus_address(address) == ("support@example.com", 12, "abcd")


@pytest.mark.parametrize("address", ["support+12@example.com", "support+x-abcd@example.com",
                                     "support+12-ab@example.com", "support+12-abc1@example.com", "plain@x.org"])
def test_parse_plus_address_refuses_other_forms(address: str) -> None:
    assert domain.parse_plus_address(address) is None
