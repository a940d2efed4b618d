"""What the filter is taught when agents mark a ticket as spam and undo it: once per class,
moved rather than counted twice, read from the ticket's own record (not from what a sender wrote)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailgate.admin import update_ticket
from mailgate.config import load_settings
from mailgate.ingest.apply import add_event, released_from_quarantine, teach_filter
from mailgate.runtime import Runtime
from mailgate.store import migrate
from mailgate.store.engine import session_scope, utcnow
from mailgate.store.tables import Contact, Event, Message, Ticket
from tests.conftest import mail, write_config


def hits(*pairs: tuple[str, str]) -> str:
    return json.dumps([{"step": step, "hit": False, "reason": reason} for step, reason in pairs])


def test_released_from_quarantine_is_read_from_the_spam_steps_own_hit() -> None:
    assert released_from_quarantine(hits(("spam", "released from quarantine (spam score was 0.998): not filtered")))
    # The sender's address and subject appear in other steps' reasons, written by the sender.
    assert not released_from_quarantine(hits(("identify", '"released from quarantine"@evil.example: stranger')))
    assert not released_from_quarantine(hits(("route", "subject: released from quarantine")))
    assert not released_from_quarantine("not json") and not released_from_quarantine('{"step": "spam"}')


@pytest.fixture
def desk(workdir: Path) -> Iterator[tuple[Runtime, int, list[tuple[bool, bool]]]]:
    """A ticket with one stored incoming message; lessons are recorded, not learned."""
    rt = Runtime.build(load_settings(write_config(workdir, spam_enabled=True)))
    migrate.upgrade(rt.engine)
    lessons: list[tuple[bool, bool]] = []
    rt.learn_spam = lambda raw, is_spam, relabel=False: lessons.append((is_spam, relabel)) or True  # type: ignore[method-assign]
    with session_scope(rt.engine) as session:
        contact = Contact(email="dave@pitch.example", name="Dave", created_at=utcnow())
        session.add(contact)
        session.flush()
        ticket = Ticket(subject="Quick question", requester_id=contact.id, queue="support@example.com",
                        status="new", status_kind="new", created_at=utcnow(), updated_at=utcnow())
        session.add(ticket)
        session.flush()
        session.add(Message(ticket_id=ticket.number, kind="public", direction="in", from_addr="dave@pitch.example",
                            raw_sha256=rt.blobs.put(mail().as_bytes()), created_at=utcnow(),
                            rule_hits=hits(("identify", '"released from quarantine"@pitch.example'))))
        number = ticket.number
    assert number is not None
    yield rt, number, lessons


def lesson(rt: Runtime, number: int, is_spam: bool) -> tuple[dict[str, Any] | None, str]:
    with session_scope(rt.engine) as session:
        learn, said = teach_filter(rt, session, session.get(Ticket, number), is_spam)  # type: ignore[arg-type]
    return ({"run": learn} if learn else None), said


def record(rt: Runtime, number: int, action: str, new: str) -> None:
    with session_scope(rt.engine) as session:
        add_event(session, session.get(Ticket, number), "alice@example.com", action, None, new)  # type: ignore[arg-type]


def test_each_lesson_is_taught_once_and_moved_when_undone(desk: tuple[Runtime, int, list]) -> None:
    rt, number, lessons = desk
    first, said = lesson(rt, number, True)
    assert first is not None and said == "the spam filter learned its first message"
    first["run"]()
    assert lessons == [(True, False)]  # a plain lesson: the spoofed "released" address counts for nothing
    record(rt, number, "spam", "learned")

    again, said = lesson(rt, number, True)
    assert again is None and said == "the spam filter already counts its first message as spam"
    undo, said = lesson(rt, number, False)
    assert undo is not None and said == "the spam filter learned its first message as ham"
    undo["run"]()
    assert lessons[-1] == (False, True)  # moved from spam to ham


def test_an_undo_with_the_filter_off_leaves_the_lesson_standing(desk: tuple[Runtime, int, list], workdir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    rt, number, lessons = desk
    record(rt, number, "spam", "learned")
    monkeypatch.setattr(rt, "spam_model", lambda: None)
    assert lesson(rt, number, False) == (None, "spam filter off: nothing learned")
    record(rt, number, "not spam", "kept")  # what unmark_spam records then
    monkeypatch.undo()
    # The filter still counts it as spam: a second #spam teaches nothing, a reopening moves it.
    assert lesson(rt, number, True) == (None, "the spam filter already counts its first message as spam")
    undo, _ = lesson(rt, number, False)
    assert undo is not None


def test_reopening_from_the_cli_moves_the_lesson_and_tells_the_requester_nothing(
        desk: tuple[Runtime, int, list]) -> None:
    rt, number, lessons = desk
    with session_scope(rt.engine) as session:
        ticket = session.get(Ticket, number)
        assert ticket is not None
        ticket.from_spam, ticket.status, ticket.status_kind = True, "closed", "closed"
    record(rt, number, "spam", "learned")
    out = update_ticket(rt, number, status="pending")  # pending mails the requester, normally
    assert out["changes"] == ["status: closed -> pending",
                              "no longer marked as spam; the spam filter learned its first message as ham"]
    assert lessons == [(False, True)]
    with session_scope(rt.engine) as session:
        from sqlmodel import select

        from mailgate.store.tables import Outbox

        assert session.exec(select(Outbox)).all() == []
        actions = [e.action for e in session.exec(select(Event).where(Event.ticket_id == number)).all()]
        assert session.get(Ticket, number).from_spam is False  # type: ignore[union-attr]
    assert actions[-2:] == ["status", "not spam"]
