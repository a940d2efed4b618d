"""What the filter is taught when agents mark a ticket as spam and undo it: once per class,
moved rather than counted twice, and only what the model itself remembers being taught
(a lesson recorded on the ticket that never reached the model takes nothing away)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from mailgate.admin import update_ticket
from mailgate.config import load_settings
from mailgate.ingest.apply import add_event, teach_filter
from mailgate.runtime import Runtime
from mailgate.store import migrate
from mailgate.store.engine import session_scope
from mailgate.store.tables import Event, Outbox, Ticket
from tests.conftest import mail, ticket_with_first_message, write_config

FIRST = mail(sender="Dave <dave@pitch.example>", subject="Quick question",
             body="We build websites. Can I send you our price list?").as_bytes()


@pytest.fixture
def desk(workdir: Path) -> Iterator[tuple[Runtime, int]]:
    """A ticket with one stored incoming message, and the shipped model to teach."""
    rt = Runtime.build(load_settings(write_config(workdir, spam_enabled=True)))
    migrate.upgrade(rt.engine)
    yield rt, ticket_with_first_message(rt, FIRST)


def lesson(rt: Runtime, number: int, is_spam: bool) -> tuple[dict[str, Any] | None, str]:
    with session_scope(rt.engine) as session:
        learn, said = teach_filter(rt, session, session.get(Ticket, number), is_spam)  # type: ignore[arg-type]
    return ({"run": learn} if learn else None), said


def class_counts(rt: Runtime) -> tuple[int, int]:
    model = rt.spam_model()
    assert model is not None
    return model.meta["n_ham"], model.meta["n_spam"]


def test_each_lesson_is_taught_once_and_moved_when_undone(desk: tuple[Runtime, int]) -> None:
    rt, number = desk
    ham, spam = class_counts(rt)
    first, said = lesson(rt, number, True)
    assert first is not None and said == "the spam filter learned its first message"
    assert first["run"]() is True
    assert class_counts(rt) == (ham, spam + 1)

    again, said = lesson(rt, number, True)
    assert again is not None and said == "the spam filter already counts its first message as spam"
    again["run"]()  # run anyway (another instance may have undone it): the model counts it once
    assert class_counts(rt) == (ham, spam + 1)
    undo, said = lesson(rt, number, False)
    assert undo is not None and said == "the spam filter learned its first message as ham"
    undo["run"]()
    assert class_counts(rt) == (ham + 1, spam)  # moved from spam to ham


def test_a_lesson_recorded_but_never_learned_takes_nothing_away(desk: tuple[Runtime, int]) -> None:
    # The ticket says "learned" (the process died after the commit, before the lesson ran):
    # the undo must not take a spam message's counts out of the model, only add the ham.
    rt, number = desk
    with session_scope(rt.engine) as session:
        add_event(session, session.get(Ticket, number), "alice@example.com", "spam", None, "learned")  # type: ignore[arg-type]
    ham, spam = class_counts(rt)
    undo, _ = lesson(rt, number, False)
    assert undo is not None
    undo["run"]()
    assert class_counts(rt) == (ham + 1, spam)


def test_an_undo_with_the_filter_off_leaves_the_lesson_standing(desk: tuple[Runtime, int],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    rt, number = desk
    first, _ = lesson(rt, number, True)
    assert first is not None
    first["run"]()
    monkeypatch.setattr(rt, "spam_model", lambda: None)
    assert lesson(rt, number, False) == (None, "spam filter off: nothing learned")
    monkeypatch.undo()
    # The filter still counts it as spam: a second #spam teaches nothing, a reopening moves it.
    ham, spam = class_counts(rt)
    again, said = lesson(rt, number, True)
    assert again is not None and said == "the spam filter already counts its first message as spam"
    again["run"]()
    assert class_counts(rt) == (ham, spam)
    undo, _ = lesson(rt, number, False)
    assert undo is not None
    undo["run"]()
    assert class_counts(rt) == (ham + 1, spam - 1)


def test_reopening_from_the_cli_moves_the_lesson_and_tells_the_requester_nothing(
        desk: tuple[Runtime, int]) -> None:
    rt, number = desk
    assert rt.learn_spam(FIRST, True)  # what the agent's #spam taught
    with session_scope(rt.engine) as session:
        ticket = session.get(Ticket, number)
        assert ticket is not None
        ticket.from_spam, ticket.status, ticket.status_kind = True, "closed", "closed"
    ham, spam = class_counts(rt)
    out = update_ticket(rt, number, status="pending")  # pending mails the requester, normally
    assert out["changes"] == ["status: closed -> pending",
                              "no longer marked as spam; the spam filter learned its first message as ham"]
    assert class_counts(rt) == (ham + 1, spam - 1)
    with session_scope(rt.engine) as session:
        assert session.exec(select(Outbox)).all() == []
        actions = [e.action for e in session.exec(select(Event).where(Event.ticket_id == number)).all()]
        assert session.get(Ticket, number).from_spam is False  # type: ignore[union-attr]
    assert actions[-2:] == ["status", "not spam"]
