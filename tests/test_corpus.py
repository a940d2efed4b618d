"""The whole public corpus through `mailgate import`: every message is accounted for."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import cli, write_config

pytestmark = pytest.mark.e2e

FOLDERS = ("easy-ham-1", "hard-ham-1", "spam-1")
OUTCOMES = {"ticket", "reply", "note", "screened", "quarantined", "duplicate", "dead"}


def test_every_corpus_message_ends_somewhere_known(corpus: Path, workdir: Path) -> None:
    cfg = write_config(workdir, spam_enabled=True)
    expected = sum(1 for d in FOLDERS for p in (corpus / d).iterdir() if p.is_file())
    assert expected == 3250
    reported: dict[str, int] = {}
    for folder in FOLDERS:
        out = json.loads(cli(cfg, "import", str(corpus / folder), "--json", timeout=600).stdout)
        for k, v in out.items():
            reported[k] = reported.get(k, 0) + v
    assert sum(reported.values()) == expected, reported
    assert set(reported) <= OUTCOMES, reported

    db = sqlite3.connect(workdir / "mailgate.db")
    rows = db.execute("select state, outcome, last_error, rule_hits from inbound").fetchall()
    assert len(rows) == expected  # one spool row per message: none lost, none doubled
    by_outcome: dict[str, int] = {}
    for state, outcome, last_error, rule_hits in rows:
        assert state in ("done", "dead"), state
        by_outcome[outcome] = by_outcome.get(outcome, 0) + 1
        if state == "dead":
            assert last_error, "a dead letter must say why"
        elif outcome in ("screened", "quarantined", "duplicate"):
            hits = json.loads(rule_hits)
            assert any(h["step"] == "stop" and h["reason"] for h in hits), "a stop must say why"
    assert by_outcome == reported
    # Tickets and replies left a message row each; screened and quarantined mail did not.
    messages_in = db.execute("select count(*) from message where direction = 'in' and inbound_id is not null"
                             ).fetchone()[0]
    assert messages_in == reported.get("ticket", 0) + reported.get("reply", 0) + reported.get("note", 0)
    # The shipped spam model keeps most corpus spam out (it was trained on it).
    assert reported.get("quarantined", 0) >= 450
    # Re-importing the same folder is idempotent.
    again = json.loads(cli(cfg, "import", str(corpus / "hard-ham-1"), "--json", timeout=600).stdout)
    assert again == {"already imported": 250}


def test_corpus_spam_with_the_filter_off_is_answered_without_a_failure(corpus: Path, workdir: Path) -> None:
    # With the filter on, the strangest senders of the corpus are quarantined and never
    # answered; with it off each gets a confirmation, which must not fail the message
    # (a non-ASCII address once made composing it raise, and the message was retried).
    cfg = write_config(workdir, spam_enabled=False)
    out = json.loads(cli(cfg, "import", str(corpus / "spam-1"), "--json", timeout=600).stdout)
    assert sum(out.values()) == 500 and "quarantined" not in out, out
    db = sqlite3.connect(workdir / "mailgate.db")
    unfinished = db.execute("select id, state, substr(last_error, 1, 200) from inbound "
                            "where state != 'done' or last_error is not null").fetchall()
    assert unfinished == []
    assert db.execute("select count(*) from outbox where template = 'requester/created'").fetchone()[0] >= 400
