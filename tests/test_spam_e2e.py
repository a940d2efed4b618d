"""Spam end to end through `mailgate run`: quarantine, listing, release, known requesters, #spam feedback."""

from __future__ import annotations

import re
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailgate.spamfilter import SpamModel
from tests.conftest import (
    FIXTURES,
    REPO,
    Daemon,
    cli,
    cli_json,
    mail,
    query_json,
    start_daemon,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.e2e

# A short, blatant spam from the public corpus; the shipped model scores it 1.0.
OBVIOUS_SPAM = "spam-1/00048.8a64080dbd9d868358a22b655fb1b1cd.txt"
SPAMMER = "alewss6@hotmail.com"
SHIPPED_MODEL = REPO / "models" / "spam-model.npz"


def corpus_spam(corpus: Path) -> bytes:
    raw = (corpus / OBVIOUS_SPAM).read_bytes()
    if raw.startswith(b"From "):  # the corpus keeps the mbox separator line
        raw = raw.split(b"\n", 1)[1]
    return raw


def score(daemon: Daemon, path: Path) -> float:
    return float(query_json(daemon.config, "spam", "score", str(path))["score"])


def quarantine(daemon: Daemon) -> list[dict]:
    return query_json(daemon.config, "spam", "quarantine", "list")


def as_stored(path: Path, message: EmailMessage) -> Path:
    """The message as the daemon stores it, to score by hand: the listener prepends its
    Received line (a hop counts as a feature)."""
    path.write_bytes(b"Received: from localhost ([127.0.0.1])\r\n\tby mailgate (mailgate) with ESMTP\r\n"
                     b"\tfor <support@example.com>; Fri, 27 Nov 2026 20:00:00 +0000\r\n" + message.as_bytes())
    return path


def model_counts(daemon: Daemon) -> tuple[int, int]:
    """Messages the daemon's model counts as ham and as spam."""
    meta = SpamModel.load(daemon.config.parent / "data" / "spam-model.npz").meta
    return meta["n_ham"], meta["n_spam"]


@pytest.fixture
def spam_daemon(workdir: Path) -> Daemon:
    d = start_daemon(write_config(workdir, spam_enabled=True))
    yield d  # type: ignore[misc]
    d.stop()


def test_obvious_spam_is_quarantined_then_released_as_a_ticket_and_learned_as_ham(
        spam_daemon: Daemon, corpus: Path, workdir: Path) -> None:
    d = spam_daemon
    raw = corpus_spam(corpus)
    eml = workdir / "spam.eml"
    eml.write_bytes(raw)
    before = score(d, eml)
    assert before >= 0.99

    d.send(raw, sender=SPAMMER)
    wait_until(lambda: quarantine(d))
    d.wait_idle()
    assert d.tickets() == []
    assert d.sent() == []  # no confirmation, no agent notice: never answer spam
    held = quarantine(d)
    assert len(held) == 1
    q = held[0]
    assert q["from"] == SPAMMER and q["subject"] == "GET IN AT THE TOP!"
    assert q["message_id"] == "200208240231.DAA13330@webnote.net"
    assert q["spam_score"] >= 0.99 and q["received_at"].endswith("Z")

    out = cli(d.config, "spam", "quarantine", "release", str(q["id"])).stdout.decode()
    assert f"{q['id']}: released, learned as ham" in out
    wait_until(lambda: d.tickets())
    d.wait_idle()
    sent = d.wait_sent(3)
    assert sorted(str(m["To"]) for m in sent) == sorted(["alice@example.com", "bob@example.com", SPAMMER])
    confirmation = d.sent_to(SPAMMER)[0]
    assert "registered as ticket #1" in confirmation.get_body(("plain",)).get_content()

    tickets = d.tickets()
    assert len(tickets) == 1 and tickets[0]["requester"] == SPAMMER
    first = d.ticket(tickets[0]["number"])["messages"][0]
    assert first["direction"] == "in" and first["spam_score"] >= 0.99
    spam_hits = [h for h in first["rule_hits"] if h["step"] == "spam"]
    assert len(spam_hits) == 1 and spam_hits[0]["reason"].startswith("released from quarantine")
    assert quarantine(d) == []

    assert score(d, eml) < before  # learned as ham
    # Released twice: refused, nothing learned again.
    again = cli(d.config, "spam", "quarantine", "release", str(q["id"]), check=False)
    assert again.returncode == 1 and "not in quarantine" in again.stderr.decode()
    assert len(d.tickets()) == 1
    shipped = SpamModel.load(SHIPPED_MODEL).meta
    assert model_counts(d) == (shipped["n_ham"] + 1, shipped["n_spam"])

    # It was spam after all: an agent's #spam moves the lesson from ham to spam.
    notice = d.sent_to("alice@example.com")[0]
    d.send(mail(sender="Alice <alice@example.com>", to=str(notice["Reply-To"]),
                subject=f"Re: {notice['Subject']}", body="#spam\n"),
           sender="alice@example.com", recipients=[str(notice["Reply-To"])])
    wait_until(lambda: model_counts(d) != (shipped["n_ham"] + 1, shipped["n_spam"]))
    assert model_counts(d) == (shipped["n_ham"], shipped["n_spam"] + 1)


def test_a_known_requesters_spammy_mail_is_not_filtered(spam_daemon: Daemon, corpus: Path,
                                                        workdir: Path) -> None:
    d = spam_daemon
    d.send(mail(subject="Printer on fire"))
    wait_until(lambda: d.tickets())
    d.wait_idle()
    raw = re.sub(rb"(?m)^From: .*$", b"From: Carol <carol@customer.org>", corpus_spam(corpus), count=1)
    eml = workdir / "carol-spam.eml"
    eml.write_bytes(raw)
    assert score(d, eml) >= 0.99

    d.send(raw, sender="carol@customer.org")
    wait_until(lambda: len(d.tickets()) == 2)
    d.wait_idle()
    assert quarantine(d) == []
    shown = d.ticket(d.tickets()[-1]["number"])
    assert shown["requester"] == "carol@customer.org"
    first = shown["messages"][0]
    assert first["spam_score"] >= 0.99  # kept for the agents to see, and ignored
    assert [h["reason"] for h in first["rule_hits"] if h["step"] == "spam"] == [
        f"known requester or agent: never filtered (spam score {first['spam_score']:.3f})"]


def test_agent_hash_spam_learns_and_closes_without_mailing_the_requester(spam_daemon: Daemon,
                                                                         workdir: Path) -> None:
    d = spam_daemon
    pitch = mail(sender="Dave <dave@growth-partners.example>", subject="Quick question",
                 body="Hi there, we could help with the layout of your website. "
                      "Reply if you want a quote.\n\nDave", message_id="<20261127.4242@growth-partners.example>")
    eml = as_stored(workdir / "pitch.eml", pitch)
    before = score(d, eml)
    assert before < 0.9

    d.send(pitch)
    wait_until(lambda: d.tickets())
    d.wait_idle()
    sent = d.wait_sent(3)
    assert len(sent) == 3  # confirmation to Dave, a notice to each agent
    number = d.tickets()[0]["number"]
    first = d.ticket(number)["messages"][0]
    assert first["spam_score"] == pytest.approx(before, abs=0.2)  # scored (headers differ slightly in transit)
    assert any(h["step"] == "spam" and h["reason"].startswith("spam score") for h in first["rule_hits"])

    notice = d.sent_to("alice@example.com")[0]
    reply_to = str(notice["Reply-To"])
    assert reply_to.startswith(f"support+{number}-")
    d.send(mail(sender="Alice <alice@example.com>", to=reply_to, subject=f"Re: {notice['Subject']}",
                body="#spam\n"), sender="alice@example.com", recipients=[reply_to])
    wait_until(lambda: d.ticket(number)["status"] == "closed")
    d.wait_idle()

    sent = d.wait_sent(4)
    # Only the result of her command goes to Alice; Dave keeps just his first confirmation.
    assert sorted(str(m["To"]) for m in sent) == [
        "alice@example.com", "alice@example.com", "bob@example.com", "dave@growth-partners.example"]
    assert "marked as spam" in sent[-1].get_body(("plain",)).get_content()
    events = d.ticket(number)["events"]
    assert [(e["action"], e["new"]) for e in events if e["action"] == "spam"] == [("spam", "learned")]
    # Learned once the close has committed: the new file may still be on its way.
    after = wait_until(lambda: (s := score(d, eml)) >= 0.9 and s)
    assert after > before

    # Dave answers his confirmation: its reply token must not vouch for him any more.
    confirmation = d.sent_to("dave@growth-partners.example")[0]
    dave_reply_to = str(confirmation["Reply-To"])
    assert dave_reply_to.startswith(f"support+{number}-")
    d.send(mail(sender="Dave <dave@growth-partners.example>", to=dave_reply_to,
                subject=f"Re: {confirmation['Subject']}", headers={"In-Reply-To": str(confirmation["Message-ID"])},
                body="Hi there, we could help with the layout of your website. "
                     "Reply if you want a quote.\n\nDave"),
           sender="dave@growth-partners.example", recipients=[dave_reply_to])
    wait_until(lambda: quarantine(d))
    d.wait_idle()
    [held] = quarantine(d)
    assert held["from"] == "dave@growth-partners.example" and held["spam_score"] >= 0.9
    assert d.ticket(number)["status"] == "closed"  # not reopened
    assert len(d.wait_sent(4)) == 4  # and nobody told

    # A reply the filter lets through (here: in words the model does not know) is kept on
    # the ticket, but still does not reopen it or notify anyone.
    d.send(mail(sender="Dave <dave@growth-partners.example>", to=dave_reply_to,
                subject=f"Re: {confirmation['Subject']}",
                body="Hyvää päivää, tarjoamme edullista verkkosivujen suunnittelua yrityksellenne. "
                     "Vastatkaa tähän viestiin, niin lähetämme tarjouksen. Dave-REPLY-MARKER"),
           sender="dave@growth-partners.example", recipients=[dave_reply_to])
    wait_until(lambda: any("Dave-REPLY-MARKER" in m["text"] for m in d.ticket(number)["messages"]))
    d.wait_idle()
    shown = d.ticket(number)
    assert shown["status"] == "closed"
    kept = [m for m in shown["messages"] if "Dave-REPLY-MARKER" in m["text"]][0]
    assert [h["reason"] for h in kept["rule_hits"] if h["step"] == "spam"][-1] == (
        "reply to a ticket closed as spam: kept on it, not reopened, nobody told")
    assert len(d.wait_sent(4)) == 4

    # Bob had the same notice and answers #spam too: said so, nothing learned twice.
    bob_notice = d.sent_to("bob@example.com")[0]
    d.send(mail(sender="Bob <bob@example.com>", to=str(bob_notice["Reply-To"]),
                subject=f"Re: {bob_notice['Subject']}", body="#spam\n"),
           sender="bob@example.com", recipients=[str(bob_notice["Reply-To"])])
    result = d.wait_sent(5)[-1]
    assert str(result["To"]) == "bob@example.com"
    assert "already marked as spam: nothing learned again" in result.get_body(("plain",)).get_content()
    events = d.ticket(number)["events"]
    assert [(e["action"], e["new"]) for e in events if e["action"] == "spam"] == [("spam", "learned")]


def test_a_first_mail_in_a_language_the_model_never_learned_becomes_a_ticket(
        spam_daemon: Daemon) -> None:
    """The shipped corpus is English: its only Czech mail is spam. A Czech customer's first
    mail scores as spam, and is still not held, because the model knows few of its words;
    it is not answered by itself either."""
    d = spam_daemon
    eml = FIXTURES / "spamprobe" / "ham-2" / "seznam_cs_refund.eml"
    verdict = cli_json(d.config, "spam", "score", str(eml))
    assert verdict["score"] >= 0.9 and verdict["known_words"] < 0.3 and verdict["is_spam"] is False

    d.send(eml.read_bytes(), sender="petr.dvorak71@seznam.cz")
    wait_until(lambda: d.tickets())
    d.wait_idle()
    assert quarantine(d) == []
    first = d.ticket(d.tickets()[0]["number"])["messages"][0]
    assert first["spam_score"] >= 0.9
    reasons = [h["reason"] for h in first["rule_hits"] if h["step"] == "spam"]
    assert len(reasons) == 1 and "but the model knows only" in reasons[0]
    assert reasons[0].endswith("not held, and no confirmation is sent")
    # A ticket the agents see, but no confirmation: were it spam after all (a spammer can
    # pad with words the model never saw), that would be backscatter.
    assert d.sent_to("alice@example.com") and not d.sent_to("petr.dvorak71@seznam.cz")


def test_reopening_a_ticket_closed_as_spam_undoes_the_lesson(spam_daemon: Daemon, workdir: Path) -> None:
    """An agent's #spam was a mistake: reopening the ticket (by mail or from the CLI) clears the
    mark, and the filter counts the first message as ham instead of spam, never as both."""
    d = spam_daemon
    pitch = mail(sender="Erin <erin@studio-north.example>", subject="Website layout",
                 body="Hello, the layout of our website breaks on small screens since your update. "
                      "Could you have a look?\n\nErin", message_id="<20261128.77@studio-north.example>")
    eml = as_stored(workdir / "erin.eml", pitch)
    before = score(d, eml)
    d.send(pitch)
    wait_until(lambda: d.tickets())
    number = d.tickets()[0]["number"]
    d.wait_sent(3)
    notice = d.sent_to("alice@example.com")[0]
    reply_to = str(notice["Reply-To"])

    def command(body: str, sent: int) -> str:
        d.send(mail(sender="Alice <alice@example.com>", to=reply_to, subject=f"Re: {notice['Subject']}",
                    body=body), sender="alice@example.com", recipients=[reply_to])
        result = d.wait_sent(sent)[-1]
        assert str(result["To"]) == "alice@example.com"
        return result.get_body(("plain",)).get_content()

    assert "the spam filter learned its first message" in command("#spam\n", 4)
    shown = d.ticket(number)
    assert (shown["status"], shown["from_spam"]) == ("closed", True)
    assert "closed as spam (reopening it undoes that)" in cli(d.config, "tickets", "show", str(number)).stdout.decode()
    as_spam = wait_until(lambda: (s := score(d, eml)) > before and s)

    # Pending would mail the requester "changed from closed": Erin never heard of the close.
    result = command("#status pending\n", 5)
    assert "status: closed -> pending" in result
    assert "no longer marked as spam; the spam filter learned its first message as ham" in result
    shown = d.ticket(number)
    assert (shown["status"], shown["from_spam"]) == ("pending", False)
    assert len(d.sent_to("erin@studio-north.example")) == 1  # her confirmation only
    assert [(e["action"], e["new"]) for e in shown["events"] if "spam" in e["action"]] == [
        ("spam", "learned"), ("not spam", "learned")]
    as_ham = wait_until(lambda: (s := score(d, eml)) < before and s)

    # A second #spam moves it back: the same counts as the first lesson, to the digit.
    command("#spam\n", 6)
    assert wait_until(lambda: score(d, eml) == as_spam)
    # And the CLI reopens it as mail does.
    out = cli_json(d.config, "tickets", "update", str(number), "--status", "open")
    assert out["changes"] == ["status: closed -> open",
                              "no longer marked as spam; the spam filter learned its first message as ham"]
    assert score(d, eml) == as_ham  # the CLI learns before it returns
    assert d.ticket(number)["from_spam"] is False

    # Erin counts as a requester again: her next mail lands on the ticket as any reply does.
    confirmation = d.sent_to("erin@studio-north.example")[0]
    d.send(mail(sender="Erin <erin@studio-north.example>", to=str(confirmation["Reply-To"]),
                subject=f"Re: {confirmation['Subject']}", body="Any news? Erin-REPLY-MARKER"),
           sender="erin@studio-north.example", recipients=[str(confirmation["Reply-To"])])
    wait_until(lambda: any("Erin-REPLY-MARKER" in m["text"] for m in d.ticket(number)["messages"]))
    d.wait_idle()
    kept = [m for m in d.ticket(number)["messages"] if "Erin-REPLY-MARKER" in m["text"]][0]
    assert not [h for h in kept["rule_hits"] if "closed as spam" in h["reason"]]


def test_the_admins_get_a_digest_of_held_mail(workdir: Path, corpus: Path) -> None:
    """A held customer's mail must be seen before it is purged: the daemon's scheduler mails
    the list to the admins (here every 3.6 seconds instead of daily)."""
    d = start_daemon(write_config(workdir, spam_enabled=True, spam_extra="digest_hours = 0.001"))
    try:
        d.send(corpus_spam(corpus), sender=SPAMMER)
        [held] = wait_until(lambda: quarantine(d))
        [digest] = wait_until(lambda: d.sent_to("alice@example.com"), timeout=60)
        assert str(digest["Subject"]) == "1 message held as spam at support@example.com"
        body = digest.get_body(("plain",)).get_content()
        assert f"#{held['id']}  score " in body and f"From:    {SPAMMER}" in body
        assert "Subject: GET IN AT THE TOP!" in body
        assert digest["Auto-Submitted"] == "auto-generated"
        time.sleep(8)  # two more passes of the job: nothing new was held, so no new list
        assert [str(m["To"]) for m in d.sent()] == ["alice@example.com"]  # bob is no admin

        # Alice releases it by replying to the list. The same words sent to the support
        # address without the list's reply token could come from anyone: refused.
        eml = workdir / "spam.eml"
        eml.write_bytes(corpus_spam(corpus))
        before = score(d, eml)
        d.send(mail(sender="Alice <alice@example.com>", subject=f"Re: {digest['Subject']}",
                    body=f"#release {held['id']}\n"), sender="alice@example.com")
        spoofed = wait_until(lambda: [m for m in d.sent_to("alice@example.com") if "Refused" in str(m["Subject"])])
        assert "sent in your name" in str(spoofed[0]["Subject"]) and quarantine(d) == [held]

        reply_to = str(digest["Reply-To"])
        assert reply_to.startswith("support+0-")
        d.send(mail(sender="Alice <alice@example.com>", to=reply_to, subject=f"Re: {digest['Subject']}",
                    body=f"#release {held['id']}\n", headers={"In-Reply-To": str(digest["Message-ID"])}),
               sender="alice@example.com", recipients=[reply_to])
        [ticket] = wait_until(lambda: d.tickets())
        assert ticket["requester"] == SPAMMER and quarantine(d) == []
        result = wait_until(lambda: [m for m in d.sent_to("alice@example.com")
                                     if "released #" in m.get_body(("plain",)).get_content()])[0]
        assert f"released #{held['id']} from {SPAMMER} (GET IN AT THE TOP!)" in result.get_body(
            ("plain",)).get_content()
        assert wait_until(lambda: d.sent_to(SPAMMER))  # its confirmation, as for any new ticket
        assert wait_until(lambda: score(d, eml) < before)  # learned as ham
        assert str(result["Reply-To"]).startswith("support+0-")  # a correction may answer it

        # The list's token proves a #release and nothing else: not a command on a ticket
        # named by its tag, not a ticket on someone's behalf, and no ticket from prose.
        def reply_to_list(subject: str, body: str) -> str:
            seen = len(d.sent_to("alice@example.com"))
            d.send(mail(sender="Alice <alice@example.com>", to=reply_to, subject=subject, body=body),
                   sender="alice@example.com", recipients=[reply_to])
            wait_until(lambda: len(d.sent_to("alice@example.com")) > seen)
            return d.sent_to("alice@example.com")[-1].get_body(("plain",)).get_content()

        number = ticket["number"]
        assert "#status closed: only #release is read in a reply to the quarantine list" in reply_to_list(
            f"[EXAMPLE #{number}] Re: list", "#status closed\n")
        assert "only #release is read" in reply_to_list("Re: list", "#requester victim@evil.example\nHello")
        assert "no #release line at the top of your reply" in reply_to_list("Re: list", "Thanks, looks fine.")
        d.wait_idle()
        assert [(t["number"], t["status"]) for t in d.tickets()] == [(number, ticket["status"])]
        assert not d.sent_to("victim@evil.example")
    finally:
        d.stop()
