"""Store helpers, without sockets."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import event
from sqlmodel import select

from mailgate.config import load_settings
from mailgate.runtime import Runtime
from mailgate.store import migrate
from mailgate.store.engine import insert_object, session_scope, utcnow
from mailgate.store.tables import Contact
from tests.conftest import write_config


def test_insert_object_writes_the_row_once_and_later_changes_as_updates(workdir: Path) -> None:
    rt = Runtime.build(load_settings(write_config(workdir)))
    migrate.upgrade(rt.engine)
    statements: list[str] = []
    event.listen(rt.engine, "before_cursor_execute",
                 lambda _c, _cur, statement, *_a: statements.append(statement.split()[0]))
    with session_scope(rt.engine) as session:
        contact = Contact(email="carol@customer.org", name="Carol", created_at=utcnow())
        insert_object(session, contact)
        assert contact.id is not None
        assert session.get(Contact, contact.id) is contact  # in the session, no SELECT
    assert statements == ["BEGIN", "INSERT"]  # and nothing flushed again at the commit
    statements.clear()
    with session_scope(rt.engine) as session:
        contact = session.exec(select(Contact)).one()
        contact.tier = "gold"
        session.add(contact)
    assert statements.count("UPDATE") == 1
    with session_scope(rt.engine) as session:
        assert [(c.email, c.name, c.tier) for c in session.exec(select(Contact))] == [
            ("carol@customer.org", "Carol", "gold")]
