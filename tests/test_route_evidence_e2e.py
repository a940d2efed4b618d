"""Who may write into a ticket, end to end: forged owners, forwarded notices, widened audiences."""

from __future__ import annotations

import sqlite3
from email import message_from_bytes
from pathlib import Path

import pytest

from tests.conftest import Daemon, cli, mail, start_daemon, wait_until, write_config

pytestmark = pytest.mark.e2e


def open_ticket(daemon: Daemon, sender: str = "Carol <carol@customer.org>") -> int:
    daemon.send(mail(sender=sender, subject="VPN down", body="The VPN is down."))
    wait_until(lambda: daemon.tickets())
    daemon.wait_idle()
    return daemon.tickets()[-1]["number"]


def test_forged_owner_address_cannot_write_into_the_ticket(daemon: Daemon) -> None:
    number = open_ticket(daemon)
    cli(daemon.config, "tickets", "update", str(number), "--owner", "alice@example.com")
    # From: the owner, no token, no trusted Authentication-Results, no commands: a stranger.
    daemon.send(mail(sender="alice@example.com", subject=f"Re: [EXAMPLE #{number}] VPN down",
                     body="Please send your password to me.", headers={"Cc": "spy@evil.example"}))
    wait_until(lambda: len(daemon.tickets()) == 2)
    daemon.wait_idle()
    shown = daemon.ticket(number)
    assert len([m for m in shown["messages"] if m["direction"] == "in"]) == 1
    assert shown["participants"] == []


def test_a_forwarded_notice_does_not_let_its_reader_in(daemon: Daemon) -> None:
    number = open_ticket(daemon)
    confirmation = daemon.sent_to("carol@customer.org")[0]
    # Carol forwards our mail; Dave replies to it, naming our (genuine) Message-ID.
    daemon.send(mail(sender="dave@elsewhere.example", subject="Re: Fwd: VPN down", body="Me too!",
                     headers={"In-Reply-To": confirmation["Message-ID"],
                              "References": confirmation["Message-ID"], "Cc": "spy@evil.example"}))
    wait_until(lambda: len(daemon.tickets()) == 2)
    daemon.wait_idle()
    shown = daemon.ticket(number)
    assert len([m for m in shown["messages"] if m["direction"] == "in"]) == 1
    assert shown["participants"] == []
    dave = daemon.tickets()[-1]
    assert dave["requester"] == "dave@elsewhere.example"


def test_the_requester_replying_to_our_mail_is_routed_and_may_add_a_cc(daemon: Daemon) -> None:
    number = open_ticket(daemon)
    confirmation = daemon.sent_to("carol@customer.org")[0]
    daemon.send(mail(sender="carol@customer.org", subject="Re: something else", body="More detail.",
                     headers={"In-Reply-To": confirmation["Message-ID"], "Cc": "boss@customer.org"}))
    wait_until(lambda: len(daemon.ticket(number)["messages"]) == 3)
    daemon.wait_idle()
    assert len(daemon.tickets()) == 1
    assert daemon.ticket(number)["participants"] == ["boss@customer.org"]
    hits = daemon.ticket(number)["messages"][-1]["rule_hits"]
    assert any(h["step"] == "route" and "our Message-ID" in h["reason"] for h in hits)


def test_ingest_defers_on_a_broken_config(workdir) -> None:  # type: ignore[no-untyped-def]
    bad = workdir / "config.toml"
    bad.write_text("[database]\nurl = 3\n")
    proc = cli(bad, "ingest", input=mail().as_bytes(), check=False)
    assert proc.returncode == 75  # the MTA keeps the mail and retries; a bounce would lose it
    assert "database.url" in proc.stderr.decode()


def test_a_requester_from_that_our_mta_found_forged_is_a_stranger_s(workdir: Path) -> None:
    """From is all that makes a requester; where our MTA says DMARC failed for its domain,
    the mail may neither write into the requester's ticket nor add a reader to it."""
    daemon = start_daemon(write_config(workdir, helpdesk_extra='trusted_authserv_ids = ["mx.example.com"]'))
    try:
        number = open_ticket(daemon)
        verdict = "mx.example.com; spf=fail smtp.mailfrom=evil.example; dmarc=fail header.from=customer.org"
        daemon.send(mail(sender="carol@customer.org", subject=f"Re: [EXAMPLE #{number}] VPN down",
                         body="Send the answers to my new colleague too.",
                         headers={"Cc": "spy@evil.example", "Authentication-Results": verdict}))
        wait_until(lambda: len(daemon.tickets()) == 2)
        daemon.wait_idle()
        shown = daemon.ticket(number)
        assert len([m for m in shown["messages"] if m["direction"] == "in"]) == 1
        assert shown["participants"] == []
        # The real Carol, DMARC passing: her reply joins the ticket and may copy her boss in.
        daemon.send(mail(sender="carol@customer.org", subject=f"Re: [EXAMPLE #{number}] VPN down",
                         body="Still down.", headers={
                             "Cc": "boss@customer.org",
                             "Authentication-Results": "mx.example.com; dmarc=pass header.from=customer.org"}))
        wait_until(lambda: len([m for m in daemon.ticket(number)["messages"] if m["direction"] == "in"]) == 2)
        assert daemon.ticket(number)["participants"] == ["boss@customer.org"]
    finally:
        daemon.stop()


def test_a_reply_by_subject_tag_alone_adds_no_reader(workdir: Path) -> None:
    """From and a subject tag are anyone's to write: a forger's Cc got every later answer.
    The requester's own reply, to the token address we gave them, still copies people in."""
    from tests.conftest import cli_json

    config = write_config(workdir)
    cli(config, "ingest", input=mail(subject="Invoice dispute", body="Card 4242 charged twice.").as_bytes())
    forged = mail(subject="Re: [EXAMPLE #1] Invoice dispute", body="Adding my colleague.",
                  headers={"Cc": "mallory@evil.example"})
    cli(config, "ingest", input=forged.as_bytes())
    shown = cli_json(config, "tickets", "show", "1")
    assert shown["participants"] == []
    assert any(h["step"] == "cc" and "not added" in h["reason"] for h in shown["messages"][-1]["rule_hits"])
    with sqlite3.connect(workdir / "mailgate.db") as db:
        [(raw,)] = db.execute("SELECT raw FROM outbox WHERE template = 'requester/created'").fetchall()
    token_address = str(message_from_bytes(raw)["Reply-To"])
    own = mail(to=token_address, subject="Re: [EXAMPLE #1] Invoice dispute", body="My boss should see this.",
               headers={"Cc": "boss@customer.org"})
    cli(config, "ingest", input=own.as_bytes())
    assert cli_json(config, "tickets", "show", "1")["participants"] == ["boss@customer.org"]
