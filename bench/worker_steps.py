"""Where the ingest worker's time goes, step by step, in one process (no SMTP, no daemon).

    .venv/bin/python bench/worker_steps.py [--messages 1000] [--sql]

Accepts N real messages from ../shared/corpus/spamassassin into a fresh SQLite
spool, then runs the worker's batches in this process and prints milliseconds
per message for each pipeline step (and for prepare, claim, finish and the
notice helpers inside the steps). For reference, in the same run: the bare
`parse_message` of the same messages. With --sql, the time SQLite itself spent
in each statement (the rest of a step is Python and SQLAlchemy). Run by hand;
never in CI.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.smtp_ingest import corpus_messages  # noqa: E402
from tests.conftest import write_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--sql", action="store_true", help="also time each SQL statement")
    args = ap.parse_args()
    logging.disable(logging.WARNING)

    from sqlalchemy import event

    from mailgate import spool
    from mailgate.config import load_settings
    from mailgate.ingest import notify, pipeline
    from mailgate.ingest.parse import UnusableMessage, parse_message
    from mailgate.runtime import Runtime
    from mailgate.store.migrate import upgrade

    messages = corpus_messages(args.messages)
    work = Path(tempfile.mkdtemp(prefix="mgsteps."))
    rt = Runtime.build(load_settings(write_config(work, spam_enabled=True)))
    upgrade(rt.engine)
    rt.spam_model()
    for raw in messages:
        spool.accept(rt.engine, rt.blobs, raw, source="smtp", envelope_from="bench@customer.org",
                     envelope_to=("support@example.com",))

    spent: collections.Counter[str] = collections.Counter()

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t0
        return wrapper

    pipeline.STEPS = tuple((name, timed(f"step {name}", fn)) for name, fn in pipeline.STEPS)
    pipeline.prepare = timed("prepare (parse, spam score)", pipeline.prepare)
    pipeline.spool.claim_batch = timed("claim", spool.claim_batch)  # type: ignore[attr-defined]
    pipeline.spool.finish = timed("finish", spool.finish)  # type: ignore[attr-defined]
    notify.enqueue = timed("  notify: render + compose", notify.enqueue)
    notify.thread_ids = timed("  notify: References query", notify.thread_ids)
    notify.loop_guard_allows = timed("  notify: loop guard", notify.loop_guard_allows)

    statements: collections.Counter[str] = collections.Counter()
    sql_time: collections.Counter[str] = collections.Counter()
    if args.sql:
        @event.listens_for(rt.engine, "before_cursor_execute")
        def _before(conn, cursor, statement, params, context, many) -> None:  # type: ignore[no-untyped-def]
            conn.info["t0"] = time.perf_counter()

        @event.listens_for(rt.engine, "after_cursor_execute")
        def _after(conn, cursor, statement, params, context, many) -> None:  # type: ignore[no-untyped-def]
            key = " ".join(statement.split())[:100]
            sql_time[key] += time.perf_counter() - conn.info["t0"]
            statements[key] += 1

    t0 = time.perf_counter()
    done = 0
    while results := pipeline.run_batch(rt, "bench"):
        done += len(results)
    total = time.perf_counter() - t0

    t0 = time.perf_counter()
    for raw in messages:
        with contextlib.suppress(UnusableMessage):
            parse_message(raw)
    parse_only = time.perf_counter() - t0

    print(f"{done} messages, worker in-process: {1000 * total / done:.2f} ms per message "
          f"({done / total:.0f} msg/s)")
    print(f"reference, parse_message alone on the same messages: {1000 * parse_only / done:.2f} ms per message")
    for name, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {1000 * seconds / done:6.2f} ms  {name}")
    if args.sql:
        print(f"SQLite itself: {1000 * sum(sql_time.values()) / done:.2f} ms per message in "
              f"{sum(statements.values()) / done:.1f} statements")
        for key, seconds in sql_time.most_common(12):
            print(f"  {1000 * seconds / done:6.3f} ms {statements[key] / done:5.2f}x  {key}")


if __name__ == "__main__":
    main()
