"""#commands: the pure parser and validator (no database, no daemon)."""

from __future__ import annotations

import pytest

from mailgate.ingest.commands import CommandRules, find_choice, parse_commands, validate

RULES = CommandRules(
    statuses=["new", "open", "pending", "on-hold", "solved", "closed"],
    priorities=["low", "normal", "high", "urgent"], categories=["billing", "hardware"],
    tiers=["customer", "enterprise"], agents=["alice@example.com", "bob@example.com"],
    canned=["need-info", "thanks"], author="bob@example.com", author_is_admin=False,
    owner="bob@example.com", ticket=7, merge_targets=frozenset({3}),
    own_addresses=frozenset({"support@example.com", "support-comment@example.com"}),
    ccs=frozenset({"dave@customer.org"}))
ADMIN = CommandRules(**{**RULES.__dict__, "author": "alice@example.com", "author_is_admin": True})


def errors(text: str, rules: CommandRules = RULES, *, has_ticket: bool = True) -> list[str]:
    return validate(parse_commands(text), rules, has_ticket=has_ticket)


def test_commands_only_at_the_top_and_the_body_below() -> None:
    p = parse_commands("\n#status pending\n#Priority high\nHello Carol,\n#status closed\n")
    assert [(c.name, c.arg) for c in p.commands] == [("status", "pending"), ("priority", "high")]
    assert p.body == "Hello Carol,\n#status closed"  # a command below prose is text
    assert p.first is not None and p.first.name == "status"


def test_no_commands() -> None:
    p = parse_commands("Just an answer.\n#status closed")
    assert p.commands == () and p.errors == () and p.body.startswith("Just an answer.")


def test_blank_lines_between_commands_as_html_conversion_makes_them() -> None:
    p = parse_commands("#status\u00a0pending\n\n#priority high\n\nHello")
    assert [(c.name, c.arg) for c in p.commands] == [("status", "pending"), ("priority", "high")]
    assert p.body == "Hello"


def test_note_with_text_on_the_same_line() -> None:
    p = parse_commands("#note the customer called\nsecond line")
    assert [c.name for c in p.commands] == ["note"]
    assert p.body == "the customer called\nsecond line"


@pytest.mark.parametrize(("text", "expected"), [
    ("#frobnicate 3", "#frobnicate 3: unknown command #frobnicate"),
    ("#status", "#status: #status needs a value"),
    ("#status open\n#status closed", "#status: given more than once"),
])
def test_parse_errors(text: str, expected: str) -> None:
    assert expected in parse_commands(text).errors


def test_repeatable_commands_are_not_duplicates() -> None:
    assert errors("#cc a@x.org\n#cc b@x.org\n#assist alice@example.com") == []


def test_inline_canned_is_a_command_in_place() -> None:
    p = parse_commands("#priority high\nHello,\n#canned need-info\nBye")
    assert [(c.name, c.arg, c.inline) for c in p.commands] == [("priority", "high", False),
                                                               ("canned", "need-info", True)]
    assert "#canned need-info" in p.body
    assert "no canned answer 'nope'" in errors("Hi\n#canned nope")[0]


@pytest.mark.parametrize(("text", "fragment"), [
    ("#status bogus", "unknown status"),
    ("#priority bogus", "#priority bogus: unknown priority"),
    ("#category toys", "unknown category"),
    ("#tier enterprise", "only an admin may change the tier"),
    ("#assign carol@customer.org", "is not an agent"),
    ("#assist nobody@example.com", "is not an agent"),
    ("#cc not-an-address", "not an email address"),
    ("#cc support@example.com", "help desk's own addresses"),
    ("#cc support+7-abcd@example.com", "help desk's own addresses"),
    ("#cc alice@example.com", "use #assist"),
    ("#uncc erin@customer.org", "not a CC participant"),
    ("#merge abc", "takes a ticket number"),
    ("#merge 7", "cannot be merged into itself"),
    ("#merge 99", "no open ticket #99"),
    ("#canned missing", "no canned answer"),
    ("#requester frank@customer.org", "opens a new ticket"),
    ("#note\n#canned thanks", "cannot be part of a #note"),
    ("#spam\n#status open", "#spam closes the ticket"),
])
def test_every_bad_value_is_named(text: str, fragment: str) -> None:
    found = errors(text)
    assert any(fragment in e for e in found), found


@pytest.mark.parametrize("text", [
    "#status Pending", "#priority URGENT", "#category Billing", "#assign me", "#assign bob@example.com",
    "#assist alice@example.com", "#cc erin@customer.org", "#uncc dave@customer.org", "#merge #3",
    "#canned thanks", "#note", "#spam",
])
def test_every_good_command(text: str) -> None:
    assert errors(text) == []


def test_roles_for_assignment() -> None:
    others = CommandRules(**{**RULES.__dict__, "owner": "alice@example.com"})
    assert "only its owner or an admin may reassign" in errors("#assign me", others)[0]
    assert "only the owner or an admin may add assistants" in errors("#assist bob@example.com", others)[0]
    unowned = CommandRules(**{**RULES.__dict__, "owner": None})
    assert errors("#assign me", unowned) == []
    assert "only an admin may assign a ticket to another agent" in errors("#assign alice@example.com", unowned)[0]
    # An assistant on a ticket nobody owns takes its notices from the group: as #assign.
    assert "only an admin may add another agent" in errors("#assist alice@example.com", unowned)[0]
    assert errors("#assist bob@example.com", unowned) == []
    assert errors("#assign me\n#assist alice@example.com", unowned) == []  # taking it in the same mail
    assert errors("#assist bob@example.com", CommandRules(**{**ADMIN.__dict__, "owner": None})) == []
    admin_others = CommandRules(**{**ADMIN.__dict__, "owner": "bob@example.com"})
    assert errors("#assign alice@example.com\n#tier enterprise", admin_others) == []
    assert errors("#assign bob@example.com", RULES) == []  # the owner hands off (or keeps) their own ticket


def test_no_ticket() -> None:
    assert "names no ticket" in errors("#status closed", has_ticket=False)[0]
    assert errors("#requester frank@customer.org\n#priority high", has_ticket=False) == []
    assert "not an email address" in errors("#requester frank", has_ticket=False)[0]
    assert "customer's address" in errors("#requester alice@example.com", has_ticket=False)[0]


def test_every_error_of_a_message_is_reported() -> None:
    assert len(errors("#status pending\n#priority bogus\n#category toys")) == 2


def test_find_choice() -> None:
    assert find_choice("ON-HOLD", RULES.statuses) == "on-hold"
    assert find_choice("x", RULES.statuses) is None


def test_release_ids() -> None:
    from mailgate.ingest.commands import release_ids

    assert release_ids("17") == [17]
    assert release_ids("#17, #18;19  17") == [17, 18, 19]
    assert release_ids("17 and 18") is None and release_ids("") is None and release_ids("1" * 13) is None


def test_release_from_a_reply_to_the_quarantine_list() -> None:
    held = CommandRules(**{**ADMIN.__dict__, "ticket": None, "owner": None, "quarantined": frozenset({17, 18})})
    assert errors("#release 17 18\n#release #17", held, has_ticket=False) == []
    assert errors("#release 17, 19", held, has_ticket=False) == ["#release 17, 19: not in the quarantine: 19"]
    assert "takes the ids of held messages" in errors("#release all", held, has_ticket=False)[0]
    agent = CommandRules(**{**held.__dict__, "author": "bob@example.com", "author_is_admin": False})
    assert errors("#release 17", agent, has_ticket=False) == ["#release 17: only an admin may release held mail"]
    # Only by itself, and only without a ticket: held mail is not a ticket.
    assert errors("#release 17\n#priority high", held, has_ticket=False) == [
        "#priority high: cannot be combined with #release"]
    assert "not to a ticket's notice" in errors("#release 17", held)[0]


def test_merge_target_takes_ascii_digits_of_a_possible_ticket_only() -> None:
    from mailgate.ingest.commands import merge_target

    assert [merge_target(a) for a in ("123", "#123", " #7 ")] == [123, 123, 7]
    # str.isdigit() took "²" and int() then failed the message; a 5000-digit number too.
    for arg in ("#²", "#12³", "٣", "#0", "#2147483648", "9" * 5000, "12a", ""):
        assert merge_target(arg) is None, arg


def test_a_hash_and_a_word_is_always_a_command_line() -> None:
    # Read as prose, "#note: ..." went to the customer with the note under it.
    for line, name, arg in (("#note: refund denied", "note", ""), ("#status: solved", "status", "solved"),
                            ("# note", "note", ""), ("#note, check billing", "note", ""),
                            ("#priority=high", "priority", "high")):
        parsed = parse_commands(line)
        assert [(c.name, c.arg) for c in parsed.commands] == [(name, arg)], line
    assert parse_commands("#note: refund denied").body == "refund denied"
    assert parse_commands("#notes on this").errors == ("#notes on this: unknown command #notes",)
    assert parse_commands("#1 on my list is the printer").commands == ()
