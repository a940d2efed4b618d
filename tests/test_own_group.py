"""support@ as a Google Group (or Mailman list) in front of the mailbox mailgate reads.

The group stamps its List-Id and Precedence: list on every customer's mail, and rewrites
the From of a DMARC-strict sender to its own address ("'Carol Smith' via Support"), with
the person in X-Original-From and Reply-To. The fixtures are written by hand after
Google's documented behaviour, not captured from a real group.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgate.ingest.identify import rewritten_by_own_list, sender_behind_own_list
from mailgate.ingest.parse import parse_message
from mailgate.ingest.screen import ScreenVerdict, own_list_ids, screen_message
from tests.conftest import FIXTURES, cli, query_json, write_config

OURS = ("support@example.com", "support-comment@example.com", "sales@example.com")
REWRITTEN = (FIXTURES / "googlegroup_rewritten_from.eml").read_bytes()
THROUGH_GROUP = (FIXTURES / "googlegroup_plain.eml").read_bytes()


def kind(raw: bytes) -> str | None:
    return screen_message(parse_message(raw), envelope_from=None, own_addresses=OURS).kind


def test_our_own_groups_list_headers_do_not_make_a_customer_a_list() -> None:
    assert own_list_ids(OURS) == {"support.example.com", "support-comment.example.com", "sales.example.com"}
    assert screen_message(parse_message(THROUGH_GROUP), envelope_from=None, own_addresses=OURS) == ScreenVerdict(
        None, "")
    assert screen_message(parse_message(THROUGH_GROUP), envelope_from=None).kind == "list"  # without: a list
    named = THROUGH_GROUP.replace(b"List-ID: <support.example.com>", b'List-ID: "Support" <Support.Example.COM>')
    assert kind(named) is None
    # Another list's mail stays list mail, and the sender's own Precedence: bulk still counts.
    other = THROUGH_GROUP.replace(b"List-ID: <support.example.com>", b"List-ID: <dev.lists.customer.org>")
    assert kind(other) == "list"
    both = THROUGH_GROUP.replace(b"List-ID: <support.example.com>",
                                 b"List-ID: <support.example.com>\r\nList-ID: <dev.lists.customer.org>")
    assert kind(both) == "list"
    assert kind(THROUGH_GROUP.replace(b"Precedence: list", b"Precedence: bulk")) == "bulk"
    # A newsletter sent to support@ through the group keeps its own List-Unsubscribe: still a list.
    newsletter = THROUGH_GROUP.replace(
        b"List-Unsubscribe: <mailto:googlegroups-manage",
        b"List-Unsubscribe: <https://shop.example/u?x=1>\r\nList-Unsubscribe: <mailto:googlegroups-manage")
    assert kind(newsletter) == "list"
    # A Mailman list of ours (lists.example.com) is ours too.
    mailman = THROUGH_GROUP.replace(
        b"List-Unsubscribe: <mailto:googlegroups-manage+000000000000+unsubscribe@googlegroups.com>, "
        b"<https://groups.google.com/a/example.com/group/support/subscribe>",
        b"List-Unsubscribe: <https://lists.example.com/mailman/options/support>, "
        b"<mailto:support-request@example.com?subject=unsubscribe>")
    assert mailman != THROUGH_GROUP and kind(mailman) is None

    def unsubscribe(links: bytes) -> bytes:
        return THROUGH_GROUP.replace(
            b"List-Unsubscribe: <mailto:googlegroups-manage+000000000000+unsubscribe@googlegroups.com>, "
            b"<https://groups.google.com/a/example.com/group/support/subscribe>", b"List-Unsubscribe: " + links)

    # Only our domain's pages on Google Groups are ours; a link is read up to ?, # or \.
    assert kind(unsubscribe(b"<https://groups.google.com/a/example.com/group/support/subscribe>")) is None
    assert kind(unsubscribe(b"<https://Example.COM./unsubscribe>")) is None
    for foreign in (b"<https://groups.google.com/g/some-other-newsletter/unsubscribe>",
                    b"<https://attacker.org#@example.com>", b"<https://attacker.org\\@example.com/>",
                    b"<https://attacker.org/?x=example.com>", b"<https://example.com.attacker.org/>",
                    b"https://example.com/unsubscribe",
                    b"<mailto:unsub@news.attacker.org,x@example.com>",
                    b"<mailto:x@example.com?cc=unsub@news.attacker.org>",
                    b"<mailto:x@example.com?%63c=unsub@news.attacker.org>",
                    b"<https://groups.google.com/a/example.com/../../g/other-newsletter/unsubscribe>",
                    b"<https://groups.google.com/a/example.com/%2e%2e/%2e%2e/g/other/unsubscribe>"):
        assert kind(unsubscribe(foreign)) == "list", foreign


@pytest.mark.parametrize(("from_addr", "from_name", "original", "reply_to", "expected"), [
    # Google's rewrite: X-Original-From names the person.
    ("support@example.com", "'Carol Smith' via Support", ("Carol Smith", "carol@customer.org"),
     ("carol@customer.org",), ("Carol Smith", "carol@customer.org")),
    # Mailman's: "X via List" with the person in Reply-To.
    ("support@example.com", "Carol Smith via Support", None, ("carol@customer.org",),
     ("Carol Smith", "carol@customer.org")),
    # Not from our address: nothing to recover.
    ("carol@customer.org", "Carol via Support", None, ("dave@customer.org",), None),
    # From our address without a sign of a rewrite: our own mail come back, or a forgery.
    ("support@example.com", "Example Support", None, ("carol@customer.org",), None),
    # Two Reply-To addresses: no single person.
    ("support@example.com", "Carol via Support", None, ("carol@customer.org", "dave@customer.org"), None),
    # The person behind it is one of our addresses: our mail come back through the group.
    ("support@example.com", "Support via Support", ("", "support+12-abcd@example.com"), (), None),
    ("sales@example.com", "'Carol' via Sales", None, ("carol@customer.org",), ("Carol", "carol@customer.org")),
])
def test_the_person_behind_a_from_our_group_rewrote(from_addr: str, from_name: str,
                                                     original: tuple[str, str] | None, reply_to: tuple[str, ...],
                                                     expected: tuple[str, str] | None) -> None:
    assert sender_behind_own_list(from_addr, from_name, original, reply_to, OURS) == expected


def test_an_unusable_x_original_from_names_nobody() -> None:
    # Two X-Original-From headers, or two mailboxes: not a fallback to Reply-To, which the
    # poster chose.
    assert sender_behind_own_list("support@example.com", "Carol via Support", None, ("victim@bigcorp.example",),
                                  OURS, original_from_present=True) is None


def test_x_original_from_is_read_only_when_it_names_one_mailbox() -> None:
    assert parse_message(REWRITTEN).original_from == ("Carol Smith", "carol@customer.org")
    two = REWRITTEN.replace(b"X-Original-From: Carol Smith <carol@customer.org>",
                            b"X-Original-From: Carol Smith <carol@customer.org>, dave@customer.org")
    assert parse_message(two).original_from is None
    twice = REWRITTEN.replace(b"X-Original-From: Carol Smith <carol@customer.org>",
                              b"X-Original-From: carol@customer.org\r\nX-Original-From: dave@customer.org")
    assert parse_message(twice).original_from is None


def _requesters(config: Path) -> dict[str, str]:
    return {t["subject"]: t["requester"] for t in query_json(config, "tickets", "list")}


def test_mail_through_our_group_becomes_the_customers_ticket_and_is_confirmed(workdir: Path) -> None:
    config = write_config(workdir, agents="", helpdesk_extra='trusted_authserv_ids = ["mx.example.com"]')
    cli(config, "ingest", input=THROUGH_GROUP)
    cli(config, "ingest", input=REWRITTEN)
    assert _requesters(config) == {"VPN drops every hour": "dave@customer.org",
                                   "Printer on fire": "carol@customer.org"}
    confirmations = sorted(r["to"] for r in query_json(config, "outbox", "list")
                           if r["template"] == "requester/created")
    assert confirmations == ["carol@customer.org", "dave@customer.org"]
    # Carol's later reply through the group lands on her ticket.
    reply = REWRITTEN.replace(b"Subject: Printer on fire", b"Subject: Re: [EXAMPLE #2] Printer on fire").replace(
        b"<CAHx1-carol-0001@", b"<CAHx1-carol-0002@")
    cli(config, "ingest", input=reply)
    assert len(query_json(config, "tickets", "list")) == 2
    assert [m["from"] for m in query_json(config, "tickets", "show", "2")["messages"] if m["direction"] == "in"] == [
        "carol@customer.org", "carol@customer.org"]


def test_a_rewrite_that_our_mta_cannot_vouch_for_is_not_taken(workdir: Path) -> None:
    # Anyone can write From: support@ and X-Original-From: a customer of ours. Where our MTA
    # authenticates mail, the rewrite counts only with a pass for our own domain.
    config = write_config(workdir, agents="", helpdesk_extra='trusted_authserv_ids = ["mx.example.com"]')
    forged = REWRITTEN.replace(b"dkim=pass header.d=example.com; spf=pass", b"dkim=none; spf=fail")
    assert b"screened" in cli(config, "ingest", input=forged).stdout
    # A mail of ours, DKIM-signed for our domain, replayed with X-Original-From added: the
    # signature does not cover that header, and a replay keeps it valid. Only SPF, which
    # names the server that handed the mail to ours, counts.
    replayed = REWRITTEN.replace(b"spf=pass smtp.mailfrom=support+bncBDEXAMPLE0000@example.com",
                                 b"spf=fail smtp.mailfrom=x@attacker.example").replace(
        b"<CAHx1-carol-0001@", b"<CAHx1-carol-0009@")
    assert b"screened" in cli(config, "ingest", input=replayed).stdout
    # Two X-Original-From headers name nobody, and Reply-To does not stand in for them.
    twice = REWRITTEN.replace(b"X-Original-From: Carol Smith <carol@customer.org>",
                              b"X-Original-From: mallory@evil.example\r\nX-Original-From: carol@customer.org").replace(
        b"<CAHx1-carol-0001@", b"<CAHx1-carol-0010@")
    assert b"screened" in cli(config, "ingest", input=twice).stdout
    assert query_json(config, "tickets", "list") == []
    # Nor is an agent's address behind it ever taken (the group signs for our domain).
    agents = write_config(workdir / "agents", helpdesk_extra='trusted_authserv_ids = ["mx.example.com"]')
    as_agent = REWRITTEN.replace(b"carol@customer.org", b"alice@example.com")
    assert b"screened" in cli(agents, "ingest", input=as_agent).stdout


@pytest.mark.parametrize(("from_addr", "from_name", "original_present", "expected"), [
    ("support@example.com", "'Mallory' via Support", False, True),  # nobody behind it to name
    ("support@example.com", "Support", True, True),  # an X-Original-From we could not read
    ("support@example.com", "Support", False, False),  # our own mail, as our Sent folder holds it
    ("carol@customer.org", "Carol via Support", True, False),  # not From our address
])
def test_our_groups_marks_are_seen_whether_or_not_someone_is_named(
        from_addr: str, from_name: str, original_present: bool, expected: bool) -> None:
    assert rewritten_by_own_list(from_addr, from_name, original_from_present=original_present,
                                 own_addresses=OURS) is expected
