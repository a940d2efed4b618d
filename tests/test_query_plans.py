"""No query on the message path reads a whole table.

Done inbound and sent outbox rows only accumulate, so a query that scans them
makes every message a little slower than the last: the claim queries did, and
the duplicate check did whenever SQLite picked the state index. This asks
SQLite for the plan of every SELECT while a message is processed and sent, on a
database that has history and statistics gathered when every row was done
(the worst case for the planner), and fails on any full scan.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import event

from tests.conftest import mail, write_config


def test_message_path_reads_no_whole_table(workdir: Path) -> None:
    from mailgate import outbox, spool
    from mailgate.config import load_settings
    from mailgate.ingest import pipeline
    from mailgate.runtime import Runtime
    from mailgate.store.migrate import upgrade

    logging.disable(logging.WARNING)
    try:
        rt = Runtime.build(load_settings(write_config(workdir)))
        upgrade(rt.engine)

        def accept(raw: bytes) -> None:
            spool.accept(rt.engine, rt.blobs, raw, source="smtp", envelope_to=("support@example.com",))

        for i in range(150):
            accept(mail(sender=f"customer{i}@example.org", subject=f"history {i}").as_bytes())
        while pipeline.run_batch(rt, "history"):
            pass
        outbox.record_results(rt.engine, rt.settings, [(row.id, None) for row in outbox.claim_due(
            rt.engine, "history", limit=1000)], "history")  # type: ignore[misc]
        with rt.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")

        scans: set[tuple[str, str]] = set()

        @event.listens_for(rt.engine, "before_cursor_execute")
        def explain(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
            if not statement.lstrip().upper().startswith("SELECT"):
                return
            params = parameters[0] if executemany else parameters
            for row in cursor.connection.execute("EXPLAIN QUERY PLAN " + statement, params).fetchall():
                if row[-1].startswith("SCAN"):
                    scans.add((row[-1], " ".join(statement.split())[:100]))

        first = mail(subject="Printer on fire")
        accept(first.as_bytes())
        accept(first.as_bytes())  # the same message again: the duplicate check
        accept(mail(subject="Re: Printer on fire", headers={"In-Reply-To": str(first["Message-ID"])}).as_bytes())
        outcomes = []
        while results := pipeline.run_batch(rt, "w"):
            outcomes += [r.outcome for r in results]
        assert outcomes == ["ticket", "duplicate", "reply"]
        assert outbox.claim_due(rt.engine, "w")
        assert scans == set()
    finally:
        logging.disable(logging.NOTSET)
