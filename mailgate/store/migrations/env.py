"""Alembic environment: the connection is handed in by mailgate.store.migrate."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

from mailgate.store import tables  # noqa: F401  (registers the tables on the metadata)

target_metadata = SQLModel.metadata


def run_migrations_online() -> None:
    connection = context.config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
