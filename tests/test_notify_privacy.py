"""No internal text reaches a requester or a CC participant, by any path.

End to end: internal text is written three ways (#note, a reply to the comment
address, a refused command message), then every kind of mail a requester can get
is driven (confirmation, answer, status notice, canned answer, merge notice,
rating request) and every text part of every mail to them is scanned. In-process:
requester templates only ever see a whitelisted context, and an internal message
handed to one is refused outright.
"""

from __future__ import annotations

import sqlite3
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from sqlmodel import Session

from mailgate.config import load_settings
from mailgate.runtime import Runtime
from mailgate.store import migrate
from mailgate.store.engine import session_scope, utcnow
from mailgate.store.tables import Contact, Ticket
from tests.conftest import mail, start_daemon, write_config
from tests.test_agents_e2e import CAROL, Desk, reply, text, to

MARKERS = ("PRIV-MARKER-NOTE", "PRIV-MARKER-COMMENT", "PRIV-MARKER-REFUSED")
CUSTOMERS = (CAROL, "dave@customer.org")


def all_text(m: EmailMessage) -> str:
    """Every header and every decoded text part: markers cannot hide in base64."""
    parts = [f"{k}: {v}" for k, v in m.items()]
    for part in m.walk():
        if part.get_content_maintype() == "text":
            parts.append(part.get_content())
    return "\n".join(parts)


@pytest.mark.e2e
def test_internal_text_never_reaches_requesters(workdir: Path) -> None:
    cfg = write_config(workdir, helpdesk_extra="auto_reply_limit_per_hour = 50")
    desk = Desk(start_daemon(cfg))
    try:
        n, mails = desk.open("Privacy", headers={"Cc": "dave@customer.org"})
        notice = to(mails, "alice@example.com")[0]

        # internal text, three ways
        desk.send(*reply(notice, "alice@example.com", f"#note\n{MARKERS[0]} customer owes us money"))
        note = to(desk.take(), "bob@example.com")[0]
        desk.send(*reply(note, "bob@example.com", f"{MARKERS[1]} agreed"))  # to the comment address
        desk.send(*reply(notice, "alice@example.com", f"#priority bogus\n{MARKERS[2]} half-typed"))
        internal = desk.take()
        assert sum(MARKERS[1] in text(m) for m in internal) == 1  # alice got bob's note
        assert not to(internal, CAROL) and not to(internal, "dave@customer.org")

        # every path to the requester
        desk.send(*reply(notice, "alice@example.com", "A public answer."))
        desk.send(*reply(notice, "alice@example.com", "#status pending"))
        desk.send(*reply(notice, "alice@example.com", "#canned thanks\nIt was the toner."))
        desk.take()
        m2, mails = desk.open("Privacy again")  # a second confirmation, then merge into it
        desk.send(*reply(notice, "alice@example.com", f"#merge {m2}"))
        desk.take()
        notice2 = to(mails, "alice@example.com")[0]
        desk.send(*reply(notice2, "alice@example.com", "Answer on the merged ticket."))
        desk.send(*reply(notice2, "alice@example.com", "#status solved"))  # asks for a rating
        desk.take()

        con = sqlite3.connect(workdir / "mailgate.db")
        rows = con.execute("select template, recipients, raw from outbox").fetchall()
        con.close()
        to_customers = [(t, message_from_bytes(raw, policy=policy.default))
                        for t, r, raw in rows if r in CUSTOMERS]
        templates = {t for t, _ in to_customers}
        assert templates == {"requester/created", "requester/answer", "requester/status",
                             "requester/status-solved", "requester/merged"}
        for template, m in to_customers:
            for marker in MARKERS:
                assert marker not in all_text(m), f"{marker} leaked through {template} to {m['To']}"
        # ...and the markers really were in the system: agents saw the notes
        to_agents = "\n".join(all_text(message_from_bytes(raw, policy=policy.default))
                              for _, r, raw in rows if r.endswith("@example.com"))
        assert MARKERS[0] in to_agents and MARKERS[1] in to_agents
        assert desk.d.ticket(m2)["rating"] is None
        kinds = {m["kind"] for m in desk.d.ticket(m2)["messages"] if any(k in m["text"] for k in MARKERS)}
        assert kinds == {"internal"}
    finally:
        desk.d.stop()


def _runtime(workdir: Path) -> Runtime:
    rt = Runtime.build(load_settings(write_config(workdir)))
    migrate.upgrade(rt.engine)
    return rt


def _carol_ticket(session: Session) -> Ticket:
    """An open ticket of Carol's, for the in-process tests below."""
    contact = Contact(email=CAROL, name="Carol", created_at=utcnow())
    session.add(contact)
    session.flush()
    ticket = Ticket(subject="s", requester_id=contact.id, queue="support@example.com", priority="normal",
                    status="open", status_kind="open", tier="customer", created_at=utcnow(), updated_at=utcnow())
    session.add(ticket)
    session.flush()
    return ticket


def test_requester_templates_get_a_whitelist_and_refuse_internal_messages(workdir: Path) -> None:
    from sqlmodel import select

    from mailgate.ingest import notify
    from mailgate.store.tables import Message, Outbox

    rt = _runtime(workdir)
    with session_scope(rt.engine) as session:
        ticket = _carol_ticket(session)
        note = Message(ticket_id=ticket.number, kind="internal", direction="in", from_addr="alice@example.com",
                       text="PRIV-MARKER secret", created_at=utcnow())
        session.add(note)
        session.flush()

        # The template context is plain values: no ORM object through which a template
        # (even a hostile operator-edited one) could walk to the ticket's messages.
        ctx = notify.ticket_context(rt, session, ticket)
        assert all(v is None or isinstance(v, str | int) for v in ctx.values())
        assert not any("message" in k for k in ctx)

        for template in ("requester/answer", "requester/created", "requester/status"):
            with pytest.raises(notify.PrivacyError):
                notify.send(rt, session, ticket=ticket, template=template, to=CAROL, message=note,
                            extra={"old_status": "new", "hijack_notice": None})
        assert session.exec(select(Outbox)).all() == []
        # agents' templates may show it
        row_id = notify.send(rt, session, ticket=ticket, template="agent/note", to="bob@example.com", message=note)
        row = session.get(Outbox, row_id)
        assert row is not None and b"PRIV-MARKER" in row.raw


def test_a_message_id_of_an_internal_note_is_never_in_requester_references(workdir: Path) -> None:
    cfg = write_config(workdir)
    desk = Desk(start_daemon(cfg))
    try:
        n, mails = desk.open("Refs")
        notice = to(mails, "alice@example.com")[0]
        note = mail(sender="alice@example.com", to=str(notice["Reply-To"]), subject="Re: x",
                    body="#note\nsecret", message_id="<internal-note-id@example.com>",
                    headers={"In-Reply-To": str(notice["Message-ID"])})
        desk.send(note, recipients=[str(notice["Reply-To"])])
        desk.send(*reply(notice, "alice@example.com", "Public answer."))
        answer = to(desk.take(), CAROL)[0]
        assert "internal-note-id" not in str(answer["References"])
    finally:
        desk.d.stop()


def test_requester_references_name_what_the_requester_got_never_an_agents_own_mail(workdir: Path) -> None:
    """An agent's Message-ID names the agent's mail host, and the customer never saw that
    mail: they got our copy of the answer, whose id is what their client threads on."""
    cfg = write_config(workdir)
    desk = Desk(start_daemon(cfg))
    try:
        n, mails = desk.open("Refs", headers={"Cc": "dave@customer.org"})
        confirmation = to(mails, CAROL)[0]
        notice = to(mails, "alice@example.com")[0]
        answers = []
        for i in (1, 2):
            own = mail(sender="alice@example.com", to=str(notice["Reply-To"]), subject="Re: x",
                       body=f"Answer {i}.", message_id=f"<agent-own-{i}@mailhost.internal.example>",
                       headers={"In-Reply-To": str(notice["Message-ID"])})
            desk.send(own, recipients=[str(notice["Reply-To"])])
            sent = desk.take()
            answers.append(to(sent, CAROL)[0])
            # Dave, copied, is named only what he got: the ids of Carol's copies would let him
            # forge a delivery report that flags her address.
            dave_refs = str(to(sent, "dave@customer.org")[0]["References"])
            assert str(confirmation["Message-ID"]) not in dave_refs
            assert not any(str(m["Message-ID"]) in dave_refs for m in answers)
        second = answers[1]
        assert "mailhost.internal" not in str(second["References"]) + str(second["In-Reply-To"])
        refs = str(second["References"]).split()
        assert str(confirmation["Message-ID"]) in refs and str(answers[0]["Message-ID"]) in refs
    finally:
        desk.d.stop()


def test_notices_to_agents_carry_a_cut_text_and_answers_the_whole(workdir: Path) -> None:
    """A 25 MB mail made a 30 MB notice per agent: over relays' limits, and agents x its size
    in the outbox. An agent's answer to the customer is never cut."""
    from mailgate.ingest import notify
    from mailgate.store.tables import Message, Outbox

    rt = _runtime(workdir)
    long_text = "".join(f"log line {i:06d}: something happened\n" for i in range(20_000))  # ~720 KB
    with session_scope(rt.engine) as session:
        ticket = _carol_ticket(session)
        message = Message(ticket_id=ticket.number, kind="public", direction="in", from_addr=CAROL,
                          text=long_text + "THE-LAST-LINE", created_at=utcnow())
        session.add(message)
        session.flush()
        notice_id = notify.send(rt, session, ticket=ticket, template="agent/new_ticket", to="bob@example.com",
                                message=message)
        answer_id = notify.send(rt, session, ticket=ticket, template="requester/answer", to=CAROL,
                                message=message, automatic=False)
        notice, answer = session.get(Outbox, notice_id), session.get(Outbox, answer_id)
        assert notice is not None and answer is not None
        notice_text = message_from_bytes(notice.raw, policy=policy.default).get_body(("plain",)).get_content()
        assert len(notice.raw) < 100_000
        assert "log line 000000" in notice_text and "THE-LAST-LINE" not in notice_text
        assert f"more characters: mailgate tickets show {ticket.number}]" in notice_text
        answer_text = message_from_bytes(answer.raw, policy=policy.default).get_body(("plain",)).get_content()
        assert "THE-LAST-LINE" in answer_text


def test_requester_references_leave_out_mail_that_was_never_sent(workdir: Path) -> None:
    """After `import` (history: its mail kept as shadow rows), the first live answer must
    not name the confirmation the customer never got, nor one that failed."""
    from mailgate.ingest import notify
    from mailgate.store.tables import Outbox

    rt = _runtime(workdir)
    with session_scope(rt.engine) as session:
        ticket = _carol_ticket(session)
        session.info["shadow"] = True
        shadow = notify.send(rt, session, ticket=ticket, template="requester/created", to=CAROL,
                             extra={"hijack_notice": None}, record_kind="system")
        session.info["shadow"] = False
        failed = notify.send(rt, session, ticket=ticket, template="requester/created", to=CAROL,
                             extra={"hijack_notice": None}, record_kind="system")
        sent = notify.send(rt, session, ticket=ticket, template="requester/created", to=CAROL,
                           extra={"hijack_notice": None}, record_kind="system")
        rows = {i: session.get(Outbox, i) for i in (shadow, failed, sent)}
        rows[failed].state = "failed"  # type: ignore[union-attr]
        session.flush()
        assert notify.requester_thread_ids(session, ticket, CAROL) == [rows[sent].message_id]  # type: ignore[union-attr]
