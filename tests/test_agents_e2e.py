"""Agents by email, end to end: `mailgate run` as a subprocess, smtplib in, the outgoing
maildir out (issue 5, DESIGN.md section 3).

Each scenario reuses one daemon across its steps (a daemon start costs seconds) and
checks exact counts of the mails each step produced.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.conftest import AGENTS, Daemon, mail, query_json, start_daemon, wait_until, write_config
from tests.test_parse import build_tnef

pytestmark = pytest.mark.e2e

TRUSTED = 'trusted_authserv_ids = ["mx.example.com"]\ncategories = ["billing", "hardware"]'
DKIM_PASS = "mx.example.com; dkim=pass header.d=example.com"
CAROL = "carol@customer.org"
HANK = "hank@customer.org"


class Desk:
    """A daemon plus a cursor over its outgoing maildir: `take` returns only new mail."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.seen: set[str] = set()

    def take(self) -> list[EmailMessage]:
        """Every mail sent since the last take, once the daemon is idle."""
        self.d.wait_idle()
        time.sleep(0.3)  # let a surplus mail show up, so exact counts mean something
        self.d.wait_idle()
        new_dir = self.d.maildir / "new"
        fresh = sorted((p for p in new_dir.iterdir() if p.name not in self.seen),
                       key=lambda p: (p.stat().st_mtime_ns, p.name)) if new_dir.is_dir() else []
        from email import message_from_bytes, policy

        self.seen.update(p.name for p in fresh)
        return [message_from_bytes(p.read_bytes(), policy=policy.default) for p in fresh]  # type: ignore[misc]

    def send(self, m: EmailMessage, recipients: list[str] | None = None) -> None:
        self.d.send(m, recipients=recipients)

    def query(self, sql: str, *args: object) -> list[tuple]:
        """Straight from the database: much cheaper than a `mailgate tickets` subprocess."""
        con = sqlite3.connect(self.d.config.parent / "mailgate.db", timeout=5)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def numbers(self) -> set[int]:
        return {n for (n,) in self.query("select number from ticket")}

    def owner(self, number: int) -> str | None:
        return self.query("select owner from ticket where number = ?", number)[0][0]

    def open(self, subject: str, sender: str = f"Carol <{CAROL}>", body: str = "Hello, help please.",
             **kw: str) -> tuple[int, list[EmailMessage]]:
        before = self.numbers()
        self.send(mail(sender=sender, subject=subject, body=body, **kw))
        number = wait_until(lambda: (self.numbers() - before or {0}).pop())
        return number, self.take()


def to(mails: list[EmailMessage], address: str) -> list[EmailMessage]:
    return [m for m in mails if address in str(m["To"])]


def text(m: EmailMessage) -> str:
    return m.get_body(("plain",)).get_content()  # type: ignore[union-attr]


def reply(notice: EmailMessage, sender: str, body: str, *, headers: dict[str, str] | None = None,
          html: bool = False) -> tuple[EmailMessage, list[str]]:
    """What a mail client makes of 'Reply': to Reply-To, threaded, the notice quoted below."""
    quoted = "\n".join("> " + line for line in text(notice).splitlines())
    full = f"{body}\n\n-- \n{sender.split('@')[0].title()} | Example Corp | +1 555 0100\n\n" \
           f"On Mon, 1 Jan 2024 at 10:00, Example Support <support@example.com> wrote:\n{quoted}\n"
    reply_to = str(notice["Reply-To"])
    m = mail(sender=sender, to=reply_to, subject="Re: " + str(notice["Subject"]), body=full,
             headers={"In-Reply-To": str(notice["Message-ID"]), "References": str(notice["Message-ID"]),
                      **(headers or {})})
    if html:
        paragraphs = "".join(f"<div>{line}</div>" for line in body.splitlines())
        m.set_content(f"<html><body>{paragraphs}<br><div class=gmail_quote>On Mon wrote:"
                      f"<blockquote>{text(notice)}</blockquote></div></body></html>", subtype="html")
    return m, [reply_to]


@pytest.fixture(scope="module")
def desk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Desk]:
    d = start_daemon(write_config(tmp_path_factory.mktemp("agents"), helpdesk_extra=TRUSTED))
    yield Desk(d)
    d.stop()


def test_answers_notes_collision_and_commands(desk: Desk) -> None:
    d = desk.d
    n, mails = desk.open("Printer on fire", body="SECRETQUOTE my printer is on fire",
                         headers={"Cc": "Dave <dave@customer.org>"})
    # confirmation to carol; unassigned, no rules: every agent hears of it
    assert sorted(str(m["To"]) for m in mails) == ["alice@example.com", "bob@example.com", CAROL]
    notice_a, notice_b = to(mails, "alice@example.com")[0], to(mails, "bob@example.com")[0]
    assert notice_a["Reply-To"] != notice_b["Reply-To"]  # a token per agent
    assert d.ticket(n)["participants"] == ["dave@customer.org"]  # copied by the requester

    # Bob answers: requester and CC get only his new text, threaded, from "Bob via ..."
    desk.send(*reply(notice_b, "bob@example.com", "Please switch it off and unplug it."))
    mails = desk.take()
    assert sorted(str(m["To"]) for m in mails) == [CAROL, "dave@customer.org"]  # no result mail to bob
    answer = to(mails, CAROL)[0]
    body = text(answer)
    assert "Please switch it off and unplug it." in body
    for leaked in ("SECRETQUOTE", "Reply to this mail", "+1 555 0100", "wrote:", "New ticket"):
        assert leaked not in body
    assert str(answer["From"]) == "Bob via Example Support <support@example.com>"
    assert str(answer["Subject"]) == f"[EXAMPLE #{n}] Printer on fire"
    first_in = d.ticket(n)["messages"][0]["message_id"]
    assert first_in in str(answer["In-Reply-To"]) and first_in in str(answer["References"])
    assert "Auto-Submitted" not in answer
    assert str(answer["Reply-To"]).startswith(f"support+{n}-")
    assert d.ticket(n)["status"] == "open"

    # Alice answers the older notice: delivered, and she is told Bob was first
    desk.send(*reply(notice_a, "alice@example.com", "I will come by with an extinguisher."))
    mails = desk.take()
    assert sorted(str(m["To"]) for m in mails) == ["alice@example.com", CAROL, "dave@customer.org"]
    warning = text(to(mails, "alice@example.com")[0])
    assert "Bob <bob@example.com> answered the requester at" in warning
    assert "I will come by" in text(to(mails, CAROL)[0])

    # #note: other agents get it, the requester nothing
    desk.send(*reply(notice_a, "alice@example.com", "#note\nNOTE-MARKER the customer is grumpy"))
    mails = desk.take()
    assert sorted(str(m["To"]) for m in mails) == ["alice@example.com", "bob@example.com"]
    note = to(mails, "bob@example.com")[0]
    assert "NOTE-MARKER" in text(note)
    assert str(note["Reply-To"]).startswith(f"support-comment+{n}-")
    assert "internal note stored" in text(to(mails, "alice@example.com")[0])
    # Bob's answer came after notice_a too, but a note is delivered to nobody: no warning
    # that would say "your reply was delivered as well".
    assert "answered the requester at" not in text(to(mails, "alice@example.com")[0])

    # Bob replies to the note notice: it goes to the comment address, so it is a note too
    desk.send(*reply(note, "bob@example.com", "COMMENT-MARKER agreed"))
    mails = desk.take()
    assert [str(m["To"]) for m in mails] == ["alice@example.com"]
    assert "COMMENT-MARKER" in text(mails[0])
    kinds = [(m["kind"], m["text"][:14]) for m in d.ticket(n)["messages"] if m["kind"] == "internal"]
    assert kinds == [("internal", "NOTE-MARKER th"), ("internal", "COMMENT-MARKER")]

    # One bad line: nothing changes, one error reply naming it
    desk.send(*reply(notice_a, "alice@example.com", "#status pending\n#priority bogus\nAtomic text"))
    mails = desk.take()
    assert [str(m["To"]) for m in mails] == ["alice@example.com"]
    err = text(mails[0])
    assert "#priority bogus: unknown priority" in err and "NOT applied" in err
    t = d.ticket(n)
    assert (t["status"], t["priority"]) == ("open", "normal")

    # A valid set: all applied, one confirmation listing the changes
    desk.send(*reply(notice_a, "alice@example.com",
                     "#status pending\n#priority HIGH\n#category billing\n#assign bob@example.com\n"
                     "#cc erin@customer.org\nPlease send us the printer's logs."))
    mails = desk.take()
    assert sorted(str(m["To"]) for m in mails) == sorted([
        "alice@example.com", "bob@example.com",  # confirmation, assigned notice
        CAROL, CAROL, "dave@customer.org", "erin@customer.org"])  # answer (+ status notice to carol)
    done = text(to(mails, "alice@example.com")[0])
    for change in ("status: open -> pending", "priority: normal -> high", "category: - -> billing",
                   "owner: nobody -> bob@example.com", "cc added: erin@customer.org", "answer sent to"):
        assert change in done
    assert "assigned ticket" in text(to(mails, "bob@example.com")[0])
    carol = sorted(text(m) for m in to(mails, CAROL))
    assert any("waiting for information from you" in c for c in carol)
    assert any("printer's logs" in c for c in carol)
    t = d.ticket(n)
    assert (t["status"], t["priority"], t["category"], t["owner"]) == ("pending", "high", "billing",
                                                                        "bob@example.com")

    # Role table: bob (agent) may not change the tier; alice #uncc erin, then erin hears nothing
    desk.send(*reply(notice_b, "bob@example.com", "#tier customer"))
    mails = desk.take()
    assert [str(m["To"]) for m in mails] == ["bob@example.com"]
    assert "only an admin may change the tier" in text(mails[0])
    desk.send(*reply(notice_a, "alice@example.com", "#uncc erin@customer.org\n#priority high\nLogs received, thanks."))
    mails = desk.take()
    assert sorted(str(m["To"]) for m in mails) == ["alice@example.com", CAROL, "dave@customer.org"]
    # A value the ticket already has: said so, and no event recorded
    assert "priority: high (unchanged)" in text(to(mails, "alice@example.com")[0])
    assert [e["action"] for e in d.ticket(n)["events"]].count("priority") == 1

    # #canned, inserted where the command stood, from an HTML-only mail
    desk.send(*reply(notice_a, "alice@example.com", "#priority urgent\n#canned need-info\nThe model number too.",
                     html=True))
    mails = desk.take()
    assert sorted(str(m["To"]) for m in mails) == ["alice@example.com", CAROL, "dave@customer.org"]
    canned = text(to(mails, CAROL)[0])
    assert canned.index("we need a little more") < canned.index("The model number too.")
    assert "#canned" not in canned and "gmail" not in canned and "SECRETQUOTE" not in canned
    assert d.ticket(n)["priority"] == "urgent"

    # Solved: the per-status template asks for a rating; the rating lands on the ticket
    desk.send(*reply(notice_a, "alice@example.com", "#status solved"))
    mails = desk.take()
    assert sorted(str(m["To"]) for m in mails) == ["alice@example.com", CAROL]
    solved = to(mails, CAROL)[0]
    assert "you may rate it" in text(solved) and "we consider your ticket" in text(solved)
    desk.send(*reply(solved, CAROL, "5"))
    wait_until(lambda: d.ticket(n)["rating"] == "5")


def test_spoofed_agent_and_authentication_results(desk: Desk) -> None:
    d = desk.d
    n, _ = desk.open("Spoof target")
    subject = f"Re: [EXAMPLE #{n}] Spoof target"
    # no token, no trusted Authentication-Results: nothing applied, the real alice is warned
    desk.send(mail(sender="Alice <alice@example.com>", subject=subject, body="#status closed"))
    mails = desk.take()
    assert [str(m["To"]) for m in mails] == ["alice@example.com"]
    assert "neither a valid reply token nor a" in text(mails[0])
    t = d.ticket(n)
    assert t["status"] == "new" and len(t["messages"]) == 2
    # the same header from an authserv-id we do not trust counts for nothing
    desk.send(mail(sender="alice@example.com", subject=subject, body="#status closed",
                   headers={"Authentication-Results": "evil.example; dkim=pass header.d=example.com"}))
    mails = desk.take()
    assert [str(m["To"]) for m in mails] == ["alice@example.com"]
    assert d.ticket(n)["status"] == "new"
    # a spoofed note to the comment address is refused the same way
    desk.send(mail(sender="alice@example.com", to="support-comment@example.com", subject=subject,
                   body="forged note"), recipients=["support-comment@example.com"])
    mails = desk.take()
    assert [str(m["To"]) for m in mails] == ["alice@example.com"]
    assert all(m["text"] != "forged note" for m in d.ticket(n)["messages"])
    # list or bulk headers do not get forged commands a ticket in alice's name
    before = desk.numbers()
    for headers in ({"Precedence": "bulk"}, {"List-Id": "<x.lists.example.com>"}):
        desk.send(mail(sender="alice@example.com", subject="New", body="#status closed", headers=headers))
        mails = desk.take()
        assert [str(m["To"]) for m in mails] == ["alice@example.com"], headers
    assert desk.numbers() == before
    # trusted authserv-id with an aligned DKIM pass: the command counts
    desk.send(mail(sender="alice@example.com", subject=subject, body="#status closed",
                   headers={"Authentication-Results": DKIM_PASS}))
    mails = desk.take()
    assert sorted(str(m["To"]) for m in mails) == ["alice@example.com", CAROL]  # confirmation, status notice
    assert d.ticket(n)["status"] == "closed"


def test_an_answer_threads_under_the_mail_that_opened_an_automatic_ticket(desk: Desk) -> None:
    """Mail that asks for no auto-reply (Outlook's X-Auto-Response-Suppress, a list) may open a
    ticket, stored as automatic: the answer is still a reply to it in the customer's client,
    and not to the out-of-office that came after it."""
    n, notices = desk.open("Quota question", sender="Gina <gina@customer.org>",
                           headers={"X-Auto-Response-Suppress": "All"})
    assert [str(m["To"]) for m in notices if "gina" in str(m["To"])] == []  # no confirmation
    opening = desk.d.ticket(n)["messages"][0]
    assert opening["kind"] == "auto"
    desk.send(mail(sender="gina@customer.org", subject=f"Out of office: [EXAMPLE #{n}] Quota question",
                   body="I am away until Monday.", headers={"Auto-Submitted": "auto-replied"}))
    wait_until(lambda: len(desk.d.ticket(n)["messages"]) == 2)
    desk.send(*reply(to(notices, "bob@example.com")[0], "bob@example.com", "Your quota is 10 GB."))
    answer = to(desk.take(), "gina@customer.org")[0]
    assert str(answer["In-Reply-To"]) == f"<{opening['message_id']}>"


def test_an_answer_never_threads_under_an_out_of_office(desk: Desk) -> None:
    """A ticket an agent opened for a customer has no mail of theirs: their out-of-office
    answer to it is stored as automatic, and the next answer must not reply to that."""
    before = desk.numbers()
    desk.send(mail(sender="Alice <alice@example.com>", subject="Your order 4711",
                   body="#requester frank@customer.org\nHello Frank, your order is delayed.",
                   headers={"Authentication-Results": DKIM_PASS}))
    first = to(desk.take(), "frank@customer.org")[0]
    (n,) = desk.numbers() - before
    away = mail(sender="frank@customer.org", subject="Automatic reply: " + str(first["Subject"]),
                body="I am away until Monday.",
                headers={"Auto-Submitted": "auto-replied", "In-Reply-To": str(first["Message-ID"])})
    desk.send(away)
    wait_until(lambda: len(desk.d.ticket(n)["messages"]) >= 2)
    desk.take()
    desk.send(mail(sender="Alice <alice@example.com>", subject=f"[EXAMPLE #{n}] Your order 4711",
                   body="It ships tomorrow.", headers={"Authentication-Results": DKIM_PASS}))
    answer = to(desk.take(), "frank@customer.org")[0]
    assert str(answer["In-Reply-To"]) != str(away["Message-ID"])


def test_an_answer_after_a_merge_replies_to_the_requesters_own_mail(desk: Desk) -> None:
    """Another customer's mail, merged in, is not what this requester has in their mailbox."""
    a, mails_a = desk.open("Login broken", sender="ivy@customer.org", body="Login broken.")
    b, mails_b = desk.open("Quota", sender="Jack <jack@customer.org>", headers={"X-Auto-Response-Suppress": "All"})
    opening_b = desk.d.ticket(b)["messages"][0]
    desk.send(*reply(to(mails_a, "bob@example.com")[0], "bob@example.com", f"#merge {b}"))
    desk.take()
    desk.send(*reply(to(mails_b, "bob@example.com")[0], "bob@example.com", "Your quota is 10 GB."))
    answers = desk.take()
    answer = to(answers, "jack@customer.org")[0]
    assert str(answer["In-Reply-To"]) == f"<{opening_b['message_id']}>"
    # Ivy, merged in, never had Jack's mail: her copy names none of it.
    ivy = to(answers, "ivy@customer.org")[0]
    assert opening_b["message_id"] not in str(ivy["In-Reply-To"]) + str(ivy["References"])


def test_an_answer_replies_to_the_latest_mail_that_has_a_message_id(desk: Desk) -> None:
    """Postfix adds no Message-ID to remote mail: the reply without one cannot be named."""
    n, notices = desk.open("Printer jam", sender="Hana <hana@customer.org>", message_id="<jam1@customer.org>")
    again = mail(sender="hana@customer.org", subject=f"Re: [EXAMPLE #{n}] Printer jam", body="Still jammed.")
    del again["Message-ID"]
    desk.send(again)
    wait_until(lambda: len(desk.d.ticket(n)["messages"]) >= 3)
    desk.take()
    desk.send(*reply(to(notices, "bob@example.com")[0], "bob@example.com", "Open tray 2."))
    answer = to(desk.take(), "hana@customer.org")[0]
    assert str(answer["In-Reply-To"]) == "<jam1@customer.org>"


def test_requester_command_opens_a_ticket_for_a_customer(desk: Desk) -> None:
    d = desk.d
    before = desk.numbers()
    desk.send(mail(sender="Alice <alice@example.com>", subject="Your order 4711",
                   body="#requester frank@customer.org\n#priority high\nHello Frank, your order is delayed.",
                   headers={"Authentication-Results": DKIM_PASS}))
    mails = desk.take()
    assert sorted(str(m["To"]) for m in mails) == ["alice@example.com", "frank@customer.org"]
    (number,) = desk.numbers() - before
    t = d.ticket(number)
    assert (t["requester"], t["owner"], t["priority"]) == ("frank@customer.org", "alice@example.com", "high")
    frank = to(mails, "frank@customer.org")[0]
    assert text(frank).startswith("Hello Frank, your order is delayed.")
    assert str(frank["From"]) == "Alice via Example Support <support@example.com>"
    assert str(frank["Subject"]) == f"[EXAMPLE #{number}] Your order 4711"
    # commands naming no ticket: one error reply, no ticket
    desk.send(mail(sender="alice@example.com", subject="oops", body="#status closed",
                   headers={"Authentication-Results": DKIM_PASS}))
    mails = desk.take()
    assert [str(m["To"]) for m in mails] == ["alice@example.com"]
    assert "names no ticket" in text(mails[0])
    assert len(desk.numbers()) == len(before) + 1


def test_merge_keeps_histories_and_redirects_replies_and_spam_closes(desk: Desk) -> None:
    d = desk.d
    # a requester of its own: the loop guard caps automatic mail per recipient and hour
    a, mails_a = desk.open("Cannot log in", sender=f"Hank <{HANK}>", body="FIRST-A login fails")
    conf_a = to(mails_a, HANK)[0]
    notice = to(mails_a, "alice@example.com")[0]
    b, _ = desk.open("Login broken", sender="grace@customer.org", body="FIRST-B login broken")
    for bad in (f"#merge {a}", "#merge 99999"):
        desk.send(*reply(notice, "alice@example.com", bad))
        mails = desk.take()
        assert [str(m["To"]) for m in mails] == ["alice@example.com"] and "NOT applied" in text(mails[0])
    desk.send(*reply(notice, "alice@example.com", f"#merge {b}"))
    mails = desk.take()
    assert sorted(str(m["To"]) for m in mails) == ["alice@example.com", HANK]  # confirmation, merged notice
    assert "joined" in text(to(mails, HANK)[0]) and f"#{b}" in str(to(mails, HANK)[0]["Subject"])
    tb = d.ticket(b)
    texts = [m["text"] for m in tb["messages"]]
    assert any("FIRST-A" in x for x in texts) and any("FIRST-B" in x for x in texts)
    assert d.ticket(a)["status"] == "closed"
    # hank answers the old confirmation (token and tag of #a): it lands on #b
    desk.send(*reply(conf_a, HANK, "LATE-REPLY still broken"))
    wait_until(lambda: any("LATE-REPLY" in m["text"] for m in d.ticket(b)["messages"]))
    assert not any("LATE-REPLY" in m["text"] for m in d.ticket(a)["messages"])
    mails = desk.take()
    assert sorted(str(m["To"]) for m in mails) == ["alice@example.com", "bob@example.com"]  # agents told
    # an answer on #b reaches both requesters
    desk.send(*reply(to(mails, "alice@example.com")[0], "alice@example.com", "Fixed for both of you."))
    mails = desk.take()
    assert sorted(str(m["To"]) for m in mails) == ["grace@customer.org", HANK]

    # #spam with the spam filter off: closed, no word to the requester
    s, mails = desk.open("Cheap pills", sender="spammer@junk.example", body="buy now")
    desk.send(*reply(to(mails, "bob@example.com")[0], "bob@example.com", "#spam"))
    mails = desk.take()
    assert [str(m["To"]) for m in mails] == ["bob@example.com"]
    assert "marked as spam and closed" in text(mails[0])
    assert d.ticket(s)["status"] == "closed"


ASSIGN_AGENTS = AGENTS + """
[[agents]]
email = "carl@example.com"
name = "Carl"
groups = ["L2"]
"""

RULES = """
[[assignment]]
sender_domain = "vip.example"
target = "alice@example.com"

[[assignment]]
subject_keywords = ["invoice"]
target = "group:L1"

[[assignment]]
subject_keywords = ["outage"]
target = "group:L2"
strategy = "notify"

[[assignment]]
category = "hardware"
target = "group:L2"
strategy = "least-open"
"""


def test_assignment_rules_round_robin_group_notice_and_least_open(workdir: Path) -> None:
    desk = Desk(start_daemon(write_config(workdir, agents=ASSIGN_AGENTS, extra=RULES, helpdesk_extra=TRUSTED)))
    try:
        n, mails = desk.open("invoice question", sender="vip@vip.example")  # first match wins
        assert desk.owner(n) == "alice@example.com"
        assert sorted(str(m["To"]) for m in mails) == ["alice@example.com", "vip@vip.example"]
        owners = []
        for i in range(3):
            n, mails = desk.open(f"invoice {i}", sender=f"c{i}@customer.org")
            owners.append(desk.owner(n))
            assert sorted(str(m["To"]) for m in mails) == sorted([owners[-1], f"c{i}@customer.org"])
        # the rule's own rotation: the vip ticket (another rule) does not shift it
        assert owners == ["alice@example.com", "bob@example.com", "alice@example.com"]
        n, mails = desk.open("outage in region 2", sender="ops@customer.org")
        assert desk.owner(n) is None
        assert sorted(str(m["To"]) for m in mails) == ["bob@example.com", "carl@example.com", "ops@customer.org"]
        n, mails = desk.open("a question", sender="dora@customer.org")
        assert sorted(str(m["To"]) for m in mails) == ["alice@example.com", "bob@example.com",
                                                       "carl@example.com", "dora@customer.org"]
        # a category set later lets the least-open rule pick: carl owns nothing open, bob one
        desk.send(*reply(to(mails, "alice@example.com")[0], "alice@example.com", "#category hardware"))
        mails = desk.take()
        assert sorted(str(m["To"]) for m in mails) == ["alice@example.com", "carl@example.com"]
        assert desk.owner(n) == "carl@example.com"
    finally:
        desk.d.stop()


def test_nothing_internal_reaches_the_requester_by_a_slip(desk: Desk) -> None:
    """A misspelt #note line and a reply with no text of its own (only the quoted notice and
    a signature) were mailed to the customer as answers."""
    n, mails = desk.open("Slips")
    notice = to(mails, "alice@example.com")[0]
    for body in ("#note: customer is rude, refund denied internally", "# note refund denied internally",
                 "#note, refund denied internally"):
        desk.send(*reply(notice, "alice@example.com", body))
        mails = desk.take()
        assert CAROL not in [str(m["To"]) for m in mails], body
    desk.send(*reply(notice, "alice@example.com", "#status: pending"))
    desk.take()
    assert desk.d.ticket(n)["status"] == "pending"
    desk.send(*reply(notice, "alice@example.com", ""))  # only the signature and the quote
    mails = desk.take()
    assert [str(m["To"]) for m in mails] == ["alice@example.com"]  # one result mail
    assert "found no text of yours" in text(mails[0])
    assert "delivered as well" not in text(mails[0])
    messages = desk.d.ticket(n)["messages"]
    assert all(m["kind"] == "internal" for m in messages if m["from"] == "alice@example.com")
    # The notice quoted without ">" under "On ... wrote:", or only a signature: still nothing.
    for body in (f"On Mon, Support wrote:\n{text(notice)}", "-- \nAlice Smith\nSupport L1, home 555-0100"):
        desk.send(mail(sender="alice@example.com", to=str(notice["Reply-To"]), subject="Re: slips", body=body),
                  recipients=[str(notice["Reply-To"])])
        assert [str(m["To"]) for m in desk.take()] == ["alice@example.com"], body


def test_merge_cannot_carry_an_assignment_past_the_owner_check(desk: Desk) -> None:
    first, mails = desk.open("Merge source")
    notice_b = to(mails, "bob@example.com")[0]
    second, mails = desk.open("Merge target owned by alice")
    notice_a = to(mails, "alice@example.com")[0]
    desk.send(*reply(notice_a, "alice@example.com", "#assign me"))
    desk.take()
    desk.send(*reply(notice_b, "bob@example.com", f"#merge {second}\n#assign me"))  # bob is no admin
    mails = desk.take()
    assert [str(m["To"]) for m in mails] == ["bob@example.com"]
    assert "cannot come with #merge" in text(mails[0])
    assert desk.owner(second) == "alice@example.com" and desk.d.ticket(first)["status"] != "closed"


def test_a_rating_is_the_requesters_and_text_after_it_is_a_reply(desk: Desk) -> None:
    rater = "gina@customer.org"  # not carol: her automatic mail of this module hits the loop guard
    n, mails = desk.open("Rate me", sender=f"Gina <{rater}>", headers={"Cc": "Erin <erin@customer.org>"})
    notice = to(mails, "alice@example.com")[0]
    desk.send(*reply(notice, "alice@example.com", "#status solved"))
    solved = to(desk.take(), rater)[0]
    desk.send(*reply(solved, "erin@customer.org", "5"))  # a CC: not the requester's rating
    desk.take()
    assert (desk.d.ticket(n)["rating"], desk.d.ticket(n)["status"]) == (None, "open")  # a reply
    desk.send(*reply(notice, "alice@example.com", "#status solved"))
    desk.take()
    desk.send(*reply(solved, rater, "5\n\nThanks a lot!\nGina"))
    mails = desk.take()
    t = desk.d.ticket(n)
    # A good rating with a thank-you: rated, still solved, and the agents read the words.
    assert (t["rating"], t["status"]) == ("5", "solved")
    assert "Thanks a lot" in text(to(mails, "alice@example.com")[0])
    desk.send(*reply(solved, rater, "1\nThe printer is on fire again, please come at once!"))
    desk.take()
    t = desk.d.ticket(n)
    # A bad one with a complaint: rated, and reopened as the reply it is.
    assert (t["rating"], t["status"]) == ("1", "open")


def test_the_former_owner_hears_of_a_reassignment_and_the_answer_precedes_the_status(desk: Desk) -> None:
    n, mails = desk.open("Reassign me", sender="Hana <hana@customer.org>")
    notice_a, notice_b = to(mails, "alice@example.com")[0], to(mails, "bob@example.com")[0]
    desk.send(*reply(notice_b, "bob@example.com", "#assign me"))
    desk.take()
    desk.send(*reply(notice_a, "alice@example.com", "#assign me"))  # alice is an admin
    mails = desk.take()
    lost = to(mails, "bob@example.com")
    assert len(lost) == 1 and "it is no longer yours" in text(lost[0])

    desk.send(*reply(notice_a, "alice@example.com", "#status pending\nPlease send the printer's logs."))
    desk.take()
    to_hana = [r["template"] for r in reversed(query_json(desk.d.config, "outbox", "list"))
               if r["to"] == "hana@customer.org" and r["ticket"] == n]
    assert to_hana[-2:] == ["requester/answer", "requester/status"]


def test_attachments_are_listed_for_agents_and_an_agents_files_reach_the_customer(desk: Desk) -> None:
    screenshot = mail(sender="Ivo <ivo@customer.org>", subject="Error dialog")
    screenshot.add_attachment(b"\x89PNG" + b"x" * 3000, maintype="image", subtype="png", filename="screen.png")
    desk.send(screenshot)
    mails = desk.take()
    notice = to(mails, "alice@example.com")[0]
    assert "screen.png  (image/png, 2.9 KB)" in text(notice)

    answer, recipients = reply(notice, "alice@example.com", "Please install the driver attached.")
    answer.add_attachment(b"PK\x03\x04driver", maintype="application", subtype="zip", filename="drivér-2.2.zip")
    original = mail(subject="the notice itself")  # a client set to attach the original
    answer.add_attachment(bytes(original), maintype="message", subtype="rfc822", filename="original.eml")
    answer.add_attachment(b"0\x82sig", maintype="application", subtype="pkcs7-signature", filename="smime.p7s")
    # Outlook's winmail.dat holds the whole mail, the quoted notice too: only its files go on.
    answer.add_attachment(build_tnef("fix.txt", b"reboot twice"), maintype="application", subtype="ms-tnef",
                          filename="winmail.dat")
    desk.send(answer, recipients)
    sent = to(desk.take(), "ivo@customer.org")[0]
    files = [(p.get_filename(), p.get_content_type(), p.get_payload(decode=True)) for p in sent.iter_attachments()]
    assert files == [("drivér-2.2.zip", "application/zip", b"PK\x03\x04driver"),
                     ("fix.txt", "text/plain", b"reboot twice")]
    assert "Please install the driver attached." in text(sent)

    # Inline images: a pasted screenshot goes with the answer, a signature's small logo does not.
    html_answer, recipients = reply(notice, "alice@example.com", "See the screenshot below.")
    html_answer.add_alternative('<p>See the screenshot below.</p><img src="cid:shot@x"><img src="cid:logo@x">',
                                subtype="html")
    html_part = html_answer.get_body(("html",))
    assert html_part is not None
    for cid, name, size in (("shot@x", "shot.png", 40_000), ("logo@x", "logo.png", 2_000)):
        html_part.add_related(b"\x89PNG" + b"x" * size, maintype="image", subtype="png", cid=f"<{cid}>",
                              filename=name)
    desk.send(html_answer, recipients)
    sent = to(desk.take(), "ivo@customer.org")[0]
    assert [p.get_filename() for p in sent.iter_attachments()] == ["shot.png"]

    # A winmail.dat mailgate cannot unpack is not sent on either (it holds the quoted
    # notice), and the agent is told to attach the files again.
    outlook, recipients = reply(notice, "alice@example.com", "The log is attached.")
    outlook.add_attachment(b"not tnef at all", maintype="application", subtype="ms-tnef", filename="winmail.dat")
    desk.send(outlook, recipients)
    mails = desk.take()
    assert list(to(mails, "ivo@customer.org")[0].iter_attachments()) == []
    assert "winmail.dat was not sent on" in text(to(mails, "alice@example.com")[0])

    # Over 7 MB of files: the answer goes without them, and the agent is told.
    big, recipients = reply(notice, "alice@example.com", "Here is the full dump.")
    big.add_attachment(os.urandom(11 * 2**20), maintype="application", subtype="octet-stream", filename="dump.bin")
    desk.send(big, recipients)
    mails = desk.take()
    assert list(to(mails, "ivo@customer.org")[0].iter_attachments()) == []
    assert "answer sent without its files: 11.00 MB is over the 7 MB" in text(to(mails, "alice@example.com")[0])


def test_a_queue_s_tickets_are_answered_from_the_queue_s_address(workdir: Path) -> None:
    """The customer wrote to billing@: confirmation, notices and answers come from billing@
    (as RT's per-queue correspond address), and replies to billing+N-token@ route back."""
    cfg = write_config(workdir, helpdesk_extra='queues = ["billing@example.com"]')
    desk = Desk(start_daemon(cfg))
    try:
        n, mails = desk.open("Invoice wrong", to="billing@example.com")
        assert desk.query("select queue from ticket where number = ?", n) == [("billing@example.com",)]
        confirmation, notice = to(mails, CAROL)[0], to(mails, "alice@example.com")[0]
        assert "Example Support <billing@example.com>" in text(confirmation)  # its signature
        for m in (confirmation, notice):
            assert str(m["From"]).endswith("<billing@example.com>")
            assert str(m["Reply-To"]).startswith(f"billing+{n}-")
        desk.send(*reply(notice, "alice@example.com", "Corrected, sorry."))
        answer = to(desk.take(), CAROL)[0]
        assert str(answer["From"]) == "Alice via Example Support <billing@example.com>"
        assert "Corrected, sorry." in text(answer)
        senders = {s for (s,) in desk.query("select mail_from from outbox where ticket_id = ?", n)}
        assert senders == {"billing@example.com"}
        # A ticket of the main address still comes from it.
        m, mails = desk.open("Printer")
        assert str(to(mails, CAROL)[0]["From"]).endswith("<support@example.com>")
    finally:
        desk.d.stop()


def test_a_reply_to_the_result_of_a_note_is_a_note_again(desk: Desk) -> None:
    """The result of a #note answered to the public address: an agent's second thought on
    the note, sent by replying to it, went to the customer."""
    number, mails = desk.open("Contract question", sender="Ivy <ivy@customer.org>")
    notice = to(mails, "alice@example.com")[0]
    first, rcpts = reply(notice, "alice@example.com", "#note\nNOTE1 they owe us 5000 EUR",
                         headers={"Authentication-Results": DKIM_PASS})
    desk.send(first, rcpts)
    result = to(desk.take(), "alice@example.com")
    [done] = [m for m in result if "internal note stored" in text(m)]
    assert str(done["Reply-To"]).startswith("support-comment+")
    second, rcpts = reply(done, "alice@example.com", "NOTE2 do not mention the lawsuit",
                          headers={"Authentication-Results": DKIM_PASS})
    desk.send(second, rcpts)
    assert not to(desk.take(), "ivy@customer.org")
    kinds = desk.query("select kind, text from message where ticket_id = ? and text like 'NOTE%'", number)
    assert [k for k, body in kinds] == ["internal", "internal"], kinds


def test_an_answer_to_a_notice_of_a_ticket_merged_since_is_not_sent(desk: Desk) -> None:
    """#b merged into #a of another requester: a reply to #b's old notice, meant for #b's
    requester, went to #a's requester too (and its commands acted on #a)."""
    a, mails_a = desk.open("Password reset", sender="Kim <kim@customer.org>")
    b, mails_b = desk.open("Password reset too", sender="Lea <lea@other.example>")
    old_notice = to(mails_b, "bob@example.com")[0]
    desk.send(*reply(to(mails_b, "alice@example.com")[0], "alice@example.com", f"#merge {a}"))
    desk.take()
    desk.send(*reply(old_notice, "bob@example.com", "#status closed\nHi Lea, your reset code is 884211."))
    mails = desk.take()
    assert [str(m["To"]) for m in mails] == ["bob@example.com"]
    assert f"#{b} was merged into #{a}: nothing was sent and no command applied" in text(mails[0])
    assert desk.d.ticket(a)["status"] != "closed"
    notes = desk.query("select kind from message where ticket_id = ? and text like '%884211%'", a)
    assert notes == [("internal",)]


def test_an_owner_removed_from_the_agents_gets_no_more_customer_mail(workdir: Path) -> None:
    """ticket_agents took the owner as they were: the requester's mail went to someone no
    longer on the desk, and to nobody who is."""
    config = write_config(workdir, helpdesk_extra=TRUSTED)
    desk = Desk(start_daemon(config))
    try:
        n, mails = desk.open("VPN down", sender="Mia <mia@customer.org>")
        desk.send(*reply(to(mails, "bob@example.com")[0], "bob@example.com", "#assign me"))
        desk.take()
    finally:
        desk.d.stop()
    without_bob = AGENTS[:AGENTS.index('[[agents]]\nemail = "bob@example.com"')]
    config.write_text(config.read_text().replace(AGENTS, without_bob))
    seen = desk.seen
    desk = Desk(start_daemon(config))
    desk.seen = seen
    try:
        desk.send(mail(sender="mia@customer.org", subject=f"Re: [EXAMPLE #{n}] VPN down", body="Still down."))
        assert [str(m["To"]) for m in desk.take()] == ["alice@example.com"]
    finally:
        desk.d.stop()


def test_no_merge_into_a_closed_or_spam_ticket_and_an_unchanged_status_is_said(desk: Desk) -> None:
    """A merge into a ticket closed as spam was taken: the requester's next mail landed there
    unseen, and the spammer was its requester. And `#status new` on a new ticket sent an
    empty result."""
    n, mails = desk.open("Broken screen", sender="Ned <ned@customer.org>")
    notice = to(mails, "alice@example.com")[0]
    s, spam_mails = desk.open("Cheap pills now", sender="pills@junk.example")
    desk.send(*reply(to(spam_mails, "alice@example.com")[0], "alice@example.com", "#spam"))
    desk.take()
    desk.send(*reply(notice, "alice@example.com", f"#merge {s}"))
    [result] = desk.take()
    assert f"there is no open ticket #{s} to merge into" in text(result) and "NOT applied" in text(result)
    assert desk.d.ticket(n)["status"] == "new"
    desk.send(*reply(notice, "alice@example.com", "#status new"))
    [result] = desk.take()
    assert "status: new (unchanged)" in text(result)


def test_a_reply_to_the_result_of_commands_alone_is_an_answer(desk: Desk) -> None:
    """Only a note's result answers to the comment address: an agent who took a ticket with
    `#assign me` and answered by replying to its result had the answer kept as a note."""
    n, mails = desk.open("Printer offline", sender="Olga <olga@customer.org>")
    desk.send(*reply(to(mails, "bob@example.com")[0], "bob@example.com", "#assign me"))
    [done] = to(desk.take(), "bob@example.com")
    assert str(done["Reply-To"]).startswith("support+")
    desk.send(*reply(done, "bob@example.com", "Please switch it off and on again."))
    assert [str(m["To"]) for m in desk.take()] == ["olga@customer.org"]
