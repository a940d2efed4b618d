"""Loop guard and flood caps, end to end (threats.md rows 16 and 18)."""

from __future__ import annotations

from email import policy
from pathlib import Path

import pytest

from tests.conftest import cli, cli_json, mail, query_json, start_daemon, wait_until, write_config

pytestmark = pytest.mark.e2e


def test_automatic_mail_per_recipient_and_new_tickets_per_sender_are_capped(workdir: Path) -> None:
    cfg = write_config(workdir, helpdesk_extra="auto_reply_limit_per_hour = 3\nnew_tickets_per_sender_per_hour = 5")
    d = start_daemon(cfg)
    try:
        for i in range(7):
            d.send(mail(sender="robot@flood.example", subject=f"Alert {i}", message_id=f"<alert{i}@flood.example>"))
        wait_until(lambda: len(query_json(cfg, "screened")) == 2, timeout=30)
        d.wait_idle()
        tickets = d.tickets()
        screened = cli_json(cfg, "screened")
        to_robot = d.sent_to("robot@flood.example")
    finally:
        d.stop()
    assert len(tickets) == 5  # the sixth and seventh hit the new-ticket cap...
    assert len(screened) == 2 and all("rate limit" in r["reason"] for r in screened)  # ...and are kept, listed
    assert len(to_robot) == 3  # three confirmations an hour to one address, no more
    held = [h for t in tickets[3:] for m in d_ticket_messages(cfg, t["number"]) for h in m["rule_hits"]
            if h["step"] == "notify"]
    assert len(held) == 2 and all("loop guard" in h["reason"] for h in held)


def test_the_loop_guard_counts_plus_addresses_as_their_mailbox(workdir: Path) -> None:
    # carol+1@ ... carol+4@ are one mailbox: a forged From with a new +tag each time
    # must not multiply the confirmations she gets.
    cfg = write_config(workdir, helpdesk_extra="auto_reply_limit_per_hour = 2")
    d = start_daemon(cfg)
    try:
        for i in range(4):
            d.send(mail(sender=f"carol+{i}@customer.org", subject=f"Question {i}", message_id=f"<q{i}@customer.org>"))
        wait_until(lambda: len(d.tickets()) == 4, timeout=30)
        d.wait_idle()
        confirmations = [r for r in query_json(cfg, "outbox", "list") if r["template"] == "requester/created"]
    finally:
        d.stop()
    assert sorted(r["to"] for r in confirmations) == ["carol+0@customer.org", "carol+1@customer.org"]


def test_the_new_ticket_cap_counts_plus_addresses_as_their_mailbox(workdir: Path) -> None:
    check_new_ticket_cap_per_mailbox(write_config(workdir, helpdesk_extra="new_tickets_per_sender_per_hour = 2"))


def check_new_ticket_cap_per_mailbox(cfg: Path) -> None:
    """carol+0@, carol+1@, carol+2@ and carol@ are one mailbox under a cap of two; the
    mailbox a_b@ is not axb@ (as a LIKE pattern would read it), nor 100%@ 1000@."""
    def ingest(sender: str) -> str:
        # UTF-8 headers as sent with SMTPUTF8 (the default policy would write an encoded word).
        raw = mail(sender=sender, subject=f"from {sender}").as_bytes(policy=policy.default.clone(utf8=True))
        out = cli(cfg, "ingest", input=raw)
        return out.stdout.decode().strip()

    assert ingest("carol+0@customer.org").isdigit()
    assert ingest("carol+1@customer.org").isdigit()
    for sender in ("carol+2@customer.org", "Carol@customer.org"):
        assert ingest(sender) == "screened: carol@customer.org opened 2 tickets in the last hour: rate limit"
    for sender in ("axb+1@customer.org", "axb+2@customer.org", "1000+1@customer.org", "1000+2@customer.org"):
        assert ingest(sender).isdigit()
    assert ingest("a_b+1@customer.org").isdigit()
    assert ingest("100%+1@customer.org").isdigit()
    assert ingest("carol@other.example").isdigit()
    # One domain in its Unicode and its ASCII form is one mailbox too.
    assert ingest("dora+1@bücher.de").isdigit()
    assert ingest("dora+2@xn--bcher-kva.de").isdigit()
    assert ingest("dora@BÜCHER.de") == "screened: dora@bücher.de opened 2 tickets in the last hour: rate limit"
    assert len(cli_json(cfg, "tickets", "list")) == 2 + 4 + 3 + 2


def d_ticket_messages(cfg: Path, number: int) -> list[dict]:
    return query_json(cfg, "tickets", "show", str(number))["messages"]


def test_list_mail_gets_no_status_notices_until_a_person_writes(workdir: Path) -> None:
    """List or bulk mail opens a ticket without a confirmation, and later status changes
    (by hand, by mail or by auto-close) do not mail the list either (RFC 3834)."""
    cfg = write_config(workdir)
    to_list = lambda: [r["template"] for r in query_json(cfg, "outbox", "list")  # noqa: E731
                       if r["to"] == "dev@lists.customer.org"]
    listed = mail(sender="Dev List <dev@lists.customer.org>", subject="[dev] build broken",
                  headers={"List-Id": "<dev.lists.customer.org>", "Precedence": "list"})
    cli(cfg, "ingest", input=bytes(listed))
    cli(cfg, "tickets", "update", "1", "--status", "solved")
    cli(cfg, "tickets", "update", "1", "--status", "closed")
    assert to_list() == []

    # A person writes from that address on the ticket: status notices resume.
    person = mail(sender="Dev List <dev@lists.customer.org>", subject="Re: [EXAMPLE #1] [dev] build broken")
    cli(cfg, "ingest", input=bytes(person))
    cli(cfg, "tickets", "update", "1", "--status", "solved")
    assert to_list() == ["requester/status-solved"]


def test_mail_from_our_own_address_opens_no_ticket(workdir: Path) -> None:
    """A ticket whose requester is the help desk would mail its answers to the help desk."""
    cfg = write_config(workdir, helpdesk_extra='queues = ["billing@example.com"]')
    for sender in ("support@example.com", "Billing <billing@example.com>", "support+7-abcd@example.com"):
        out = cli(cfg, "ingest", input=mail(sender=sender, subject="Hello from myself").as_bytes())
        assert out.stdout.decode().startswith("screened: from our own address"), out.stdout
    assert cli_json(cfg, "tickets", "list") == []
    assert len(cli_json(cfg, "screened", "--json")) == 3
