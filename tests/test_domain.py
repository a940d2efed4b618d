"""Pure ticket values: reply tokens, plus addresses, subject tags, our Message-IDs."""

from __future__ import annotations

from mailgate import domain

SECRET = "test-secret-key-0123456789"


def test_reply_token_is_per_ticket_and_recipient() -> None:
    t = domain.reply_token(SECRET, 5, "Alice@Example.com")
    assert t == domain.reply_token(SECRET, 5, "alice@example.com") and len(t) == domain.TOKEN_LENGTH
    assert t != domain.reply_token(SECRET, 6, "alice@example.com")
    assert t != domain.reply_token(SECRET, 5, "bob@example.com")
    assert t != domain.reply_token("another-secret-key", 5, "alice@example.com")
    assert domain.token_is_valid(SECRET, 5, "alice@example.com", t.upper())
    assert not domain.token_is_valid(SECRET, 5, "bob@example.com", t)


def test_reply_address_round_trip() -> None:
    addr = domain.reply_address("support@example.com", SECRET, 42, "carol@customer.org")
    base, number, token = domain.parse_plus_address(addr)  # type: ignore[misc]
    assert (base, number) == ("support@example.com", 42)
    assert domain.token_is_valid(SECRET, 42, "carol@customer.org", token)
    comment = domain.reply_address("support-comment@example.com", SECRET, 42, "bob@example.com")
    assert domain.parse_plus_address(comment)[0] == "support-comment@example.com"  # type: ignore[index]
    assert domain.parse_plus_address("support@example.com") is None
    assert domain.parse_plus_address("support+abc@example.com") is None
    assert domain.base_address("Support+42-xyz@Example.com") == "support@example.com"


def test_bounce_address_is_no_reply_address() -> None:
    addr = domain.bounce_address("support@example.com", "0123456789abcdef")
    assert addr == "support+bounce-0123456789abcdef@example.com"
    assert domain.is_bounce_address(addr) and domain.base_address(addr) == "support@example.com"
    assert domain.parse_plus_address(addr) is None  # never read as a ticket's reply token
    reply = domain.reply_address("support@example.com", SECRET, 42, "carol@customer.org")
    assert not domain.is_bounce_address(reply) and not domain.is_bounce_address("support@example.com")
    assert not domain.is_bounce_address("bounce-x@example.com")


def test_subject_tags() -> None:
    assert domain.tagged_subject("EXAMPLE", 7, "Re: [EXAMPLE #7] Printer") == "[EXAMPLE #7] Re: Printer"
    assert domain.ticket_from_subject("EXAMPLE", "AW: [ example #12 ] x") == 12
    assert domain.ticket_from_subject("EXAMPLE", "[OTHER #12] x") is None
    assert domain.strip_tag("EXAMPLE", "Re: [EXAMPLE #7]  Printer") == "Re: Printer"
    assert domain.normalize_subject("Re: AW: Fwd: SV: Printer") == "Printer"


def test_our_message_ids_carry_an_hmac() -> None:
    mid = domain.make_message_id(SECRET, "example.com", 9)
    assert domain.ticket_from_our_message_id(SECRET, mid) == 9
    assert domain.ticket_from_our_message_id("another-secret-key", mid) is None
    forged = mid.replace("mg.9.", "mg.8.", 1)
    assert domain.ticket_from_our_message_id(SECRET, forged) is None
    assert domain.ticket_from_our_message_id(SECRET, domain.make_message_id(SECRET, "example.com", None)) is None
    assert domain.make_message_id(SECRET, "example.com", 9) != mid  # a fresh nonce each time


def test_one_line_refuses_header_injection() -> None:
    assert domain.one_line("Hi\r\nBcc: victim@x.org") == "Hi Bcc: victim@x.org"
    assert len(domain.one_line("x" * 500, 100)) == 100


def test_numbers_beyond_a_32_bit_column_name_no_ticket() -> None:
    assert domain.ticket_from_subject("EXAMPLE", "Re: [EXAMPLE #2147483647] hi") == 2147483647
    assert domain.ticket_from_subject("EXAMPLE", "Re: [EXAMPLE #2147483648] hi") is None
    assert domain.parse_plus_address("support+999999999999-abcdabcd@example.com") is None
    assert domain.parse_plus_address("support+0-abcdabcd@example.com") == ("support@example.com", 0, "abcdabcd")


def test_mailbox_of_drops_the_tag_and_spells_the_domain_in_unicode() -> None:
    assert domain.mailbox_of("Carol+7@Customer.ORG") == "carol@customer.org"
    assert domain.mailbox_of("dora+x@BÜCHER.de") == "dora@bücher.de"
    assert domain.mailbox_of("dora@xn--bcher-kva.de") == "dora@bücher.de"
    assert domain.mailbox_of("dora@bu\u0308cher.de") == "dora@bücher.de"  # decomposed ü
    # IDNA 2008 keeps ß: straße.de is xn--strae-oqa.de, and strasse.de another domain.
    assert domain.mailbox_of("dan@xn--strae-oqa.de") == domain.mailbox_of("dan@straße.de") == "dan@straße.de"
    assert domain.mailbox_of("dan@strasse.de") == "dan@strasse.de"
    for dot in "\u3002\uff0e\uff61":  # IDNA's other full stops
        assert domain.mailbox_of(f"victim@bücher{dot}de") == "victim@bücher.de"
    bad = "x@xn--9.de"  # no valid A-label: kept as written
    assert domain.mailbox_of(bad) == bad


def test_wire_address_sends_an_idn_domain_as_its_a_label() -> None:
    """Any relay takes carol@xn--bcher-kva.de; carol@bücher.de needs SMTPUTF8, which many lack."""
    assert domain.wire_address("carol@bücher.de") == "carol@xn--bcher-kva.de"
    assert domain.wire_address("dan@straße.de") == "dan@xn--strae-oqa.de"  # IDNA 2008, not strasse.de
    assert domain.wire_address("Dora@BÜCHER\u3002de") == "Dora@xn--bcher-kva.de"  # the local part as written
    for unchanged in ("carol@customer.org", "josé@exämple.org", "josé@example.org", "x@-ä-.de", "no-at-sign"):
        assert domain.wire_address(unchanged) == unchanged  # SMTPUTF8's, or not ours to fix
    assert domain.mailbox_of(domain.wire_address("carol@bücher.de")) == "carol@bücher.de"
