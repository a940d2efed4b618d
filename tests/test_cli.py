"""The CLI contract of DESIGN.md section 6: import, tickets list/show/update/note, dead letters, doctor, db.

One desk is built once per module by `mailgate import` of tests/fixtures/cli_tickets.mbox and a few
changes; the many filter checks then run the typer app in-process (same code path, no interpreter
start-up each), while the commands an operator types are also run once as real subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import mailbox
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mailgate.cli import STATE_STYLE, _row_style, app
from tests.conftest import FIXTURES, cli, cli_json, free_port, mail, query_json, write_config

MBOX = FIXTURES / "cli_tickets.mbox"
PASSWD = b"root:x:0:0:root:/root:/bin/bash\n"
ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
TICKET_FIELDS = {"number", "subject", "status", "priority", "category", "queue", "requester", "participants",
                 "owner", "assistants", "tier", "created_at", "first_response_due", "resolution_due", "overdue",
                 "escalation_level", "rating"}
MESSAGE_FIELDS = {"kind", "direction", "from", "subject", "text", "message_id", "created_at", "attachments"}
ATTACHMENT_FIELDS = {"filename", "content_type", "size", "sha256"}
DESK_EXTRA = 'queues = ["sales@example.com"]\ncategories = ["billing", "hardware"]'


def invoke(config: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    result = CliRunner().invoke(app, [*args, "--config", str(config)], env=env)
    return result


def ok(config: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = invoke(config, *args, env=env)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def numbers(config: Path, *args: str) -> list[int]:
    return [t["number"] for t in json.loads(ok(config, "tickets", "list", "--json", *args))]


def sql(config: Path, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(config.parent / "mailgate.db", timeout=10)
    try:
        rows = con.execute(statement, params).fetchall()
        con.commit()
        return rows
    finally:
        con.close()


@pytest.fixture(scope="module")
def desk() -> Iterator[Path]:
    """Five tickets from the mbox, then: #1 open/urgent/hardware/alice+bob and answered, #2 high and
    overdue, #3 pending (overdue times, but paused), #4 closed/low, #5 backdated to 2020 with a note."""
    workdir = Path(tempfile.mkdtemp(prefix="mg."))
    config = write_config(workdir, helpdesk_extra=DESK_EXTRA)
    # As live mail (dated now): the filters below read due times.
    imported = json.loads(cli(config, "import", "--notify", str(MBOX), "--json").stdout)
    assert imported == {"ticket": 5, "reply": 1, "screened": 1}
    upd = cli_json(config, "tickets", "update", "1", "--status", "open", "--priority", "urgent", "--category",
                   "hardware", "--owner", "alice@example.com", "--assist", "bob@example.com", "--tier", "customer")
    assert upd == {"number": 1, "changes": [
        "status: new -> open", "priority: normal -> urgent", "category: - -> hardware",
        "owner: nobody -> alice@example.com", "assistant added: bob@example.com"]}
    ok(config, "tickets", "update", "2", "--priority", "high")
    ok(config, "tickets", "update", "3", "--status", "pending")
    ok(config, "tickets", "update", "4", "--status", "closed", "--priority", "low")
    ok(config, "tickets", "note", "5", "--text", "secret-walrus: customer is difficult", "--author",
       "alice@example.com")
    # Due times in the past, written after the updates (a priority change recomputes them).
    sql(config, "update ticket set first_response_due = '2020-01-01 00:00:00.000000' where number in (2, 3, 4)")
    sql(config, "update ticket set created_at = '2020-01-01 00:00:00.000000' where number = 5")
    sql(config, "update ticket set last_public_out_at = '2099-01-01 00:00:00.000000' where number = 1")
    yield config
    shutil.rmtree(workdir, ignore_errors=True)


# --- import ----------------------------------------------------------------------------------------

def test_reimport_is_idempotent(desk: Path) -> None:
    assert json.loads(ok(desk, "import", str(MBOX), "--json")) == {"already imported": 7}
    assert numbers(desk) == [1, 2, 3, 4, 5]
    assert sql(desk, "select count(*) from inbound") == [(7,)]
    assert json.loads(ok(desk, "screened", "--json"))[0]["subject"] == "Out of office"


def test_import_maildir(workdir: Path) -> None:
    config = write_config(workdir, agents="")
    box = mailbox.Maildir(str(workdir / "old-mail"), create=True)
    for i in range(3):
        box.add(mail(sender=f"user{i}@customer.org", subject=f"Old request {i}",
                     message_id=f"<old-{i}@customer.org>").as_bytes())
    box.add(mail(sender="user0@customer.org", subject="Re: [EXAMPLE #1] Old request 0", body="More.",
                 message_id="<old-3@customer.org>").as_bytes())
    box.close()
    out = cli(config, "import", str(workdir / "old-mail"))
    assert out.stdout.decode().splitlines() == ["reply: 1", "ticket: 3"]
    again = cli(config, "import", str(workdir / "old-mail"), "--json")
    assert json.loads(again.stdout) == {"already imported": 4}
    assert sorted(t["subject"] for t in query_json(config, "tickets", "list")) == [
        "Old request 0", "Old request 1", "Old request 2"]
    missing = cli(config, "import", str(workdir / "nope"), check=False)
    assert missing.returncode == 2 and "no such file or directory" in missing.stderr.decode()


def _old_mailbox(path: Path) -> Path:
    box = mailbox.mbox(str(path))
    box.add(mail(subject="Old request", message_id="<old-1@customer.org>",
                 headers={"Date": "Mon, 02 Nov 2026 10:00:00 +0100"}).as_bytes())
    box.add(mail(subject="Re: [EXAMPLE #1] Old request", body="Still broken.", message_id="<old-2@customer.org>",
                 headers={"Date": "Tue, 03 Nov 2026 08:30:00 +0000", "In-Reply-To": "<old-1@customer.org>"}).as_bytes())
    box.add(mail(subject="From the future", message_id="<old-3@customer.org>",
                 headers={"Date": "Thu, 01 Jan 2099 00:00:00 +0000"}).as_bytes())
    box.close()
    return path


def test_import_keeps_history_as_it_was_and_sends_nothing(workdir: Path) -> None:
    """A migration must not mail every old customer and agent, and its tickets keep their dates."""
    config = write_config(workdir)
    assert cli_json(config, "import", str(_old_mailbox(workdir / "old.mbox"))) == {"reply": 1, "ticket": 2}
    rows = query_json(config, "outbox", "list")
    assert rows and {r["state"] for r in rows} == {"shadow"}  # kept for a look, never sent
    first = query_json(config, "tickets", "show", "1")
    assert first["created_at"] == "2026-11-02T09:00:00Z"
    assert [m["created_at"] for m in first["messages"] if m["direction"] == "in"] == [
        "2026-11-02T09:00:00Z", "2026-11-03T08:30:00Z"]
    assert first["first_response_due"] is not None and first["first_response_due"] < "2026-11-10"
    future = query_json(config, "tickets", "show", "2")
    assert future["created_at"] > "2026-11-27" and future["created_at"] < "2099"  # a Date ahead of now: now


def test_history_import_is_not_held_to_the_live_caps(workdir: Path) -> None:
    """The per-sender cap on new tickets guards against a live flood; in an old mailbox stored
    newest first, each older mail saw every newer ticket as "opened in the last hour"."""
    config = write_config(workdir, helpdesk_extra="new_tickets_per_sender_per_hour = 1")
    box = mailbox.mbox(str(workdir / "old.mbox"))
    for day in (5, 4, 3):
        box.add(mail(subject=f"Request of {day} Nov", message_id=f"<old-{day}@customer.org>",
                     headers={"Date": f"Thu, {day:02d} Nov 2026 10:00:00 +0000"}).as_bytes())
    box.close()
    assert cli_json(config, "import", str(workdir / "old.mbox")) == {"ticket": 3}


def test_imported_answers_from_agents_and_our_address_join_the_customers_ticket(workdir: Path) -> None:
    """An old support mailbox holds the agents' answers (copied to support@, or from the Sent
    folder of support@ itself). They carry no reply token of ours, and before this they each
    opened a ticket with the agent or the help desk as the requester."""
    config = write_config(workdir)
    box = mailbox.mbox(str(workdir / "old.mbox"))
    box.add(mail(subject="Printer on fire", message_id="<c1@customer.org>",
                 headers={"Date": "Mon, 02 Nov 2026 10:00:00 +0000"}).as_bytes())
    box.add(mail(sender="Alice <alice@example.com>", to="carol@customer.org", subject="Re: Printer on fire",
                 body="Unplug it first.\n\nOn Mon, Carol wrote:\n> Hello, my printer is on fire.\n",
                 message_id="<a1@example.com>",
                 headers={"Cc": "support@example.com", "In-Reply-To": "<c1@customer.org>",
                          "References": "<c1@customer.org>", "Date": "Mon, 02 Nov 2026 11:00:00 +0000"}).as_bytes())
    box.add(mail(sender="Support <support@example.com>", to="carol@customer.org", subject="Re: Printer on fire",
                 body="Did that help?", message_id="<s1@example.com>",
                 headers={"In-Reply-To": "<a1@example.com>", "Date": "Tue, 03 Nov 2026 09:00:00 +0000"}).as_bytes())
    box.add(mail(subject="Re: Printer on fire", body="It did, thanks.", message_id="<c2@customer.org>",
                 headers={"In-Reply-To": "<s1@example.com>", "Date": "Tue, 03 Nov 2026 10:00:00 +0000"}).as_bytes())
    # Commands still need proof, in old mail as in live mail.
    box.add(mail(sender="Alice <alice@example.com>", to="carol@customer.org", subject="Re: Printer on fire",
                 body="#status closed", message_id="<a2@example.com>",
                 headers={"In-Reply-To": "<c2@customer.org>", "Date": "Tue, 03 Nov 2026 11:00:00 +0000"}).as_bytes())
    box.close()
    assert cli_json(config, "import", str(workdir / "old.mbox")) == {"ticket": 1, "reply": 3, "screened": 1}
    assert [t["number"] for t in query_json(config, "tickets", "list")] == [1]
    shown = query_json(config, "tickets", "show", "1")
    said = [(m["direction"], m["kind"], m["from"], m["author_agent"], m["text"].strip())
            for m in shown["messages"] if m["kind"] != "system"]
    assert said == [
        ("in", "public", "carol@customer.org", None, "Hello, my printer is on fire."),
        ("out", "public", "alice@example.com", "alice@example.com", "Unplug it first."),
        ("out", "public", "support@example.com", None, "Did that help?"),
        ("in", "public", "carol@customer.org", None, "It did, thanks."),
    ]
    assert shown["first_responded_at"] == "2026-11-02T11:00:00Z" and shown["status"] == "open"
    to_carol = [r for r in query_json(config, "outbox", "list") if r["to"] == "carol@customer.org"]
    assert [r["template"] for r in to_carol] == ["requester/created"]  # the answers reached her back then

    # Copies of mail mailgate sent (archived, or kept by a customer who puts its Message-ID on
    # a mail of their own through our group) were recorded when sent: never an answer again.
    sent_id = to_carol[0]["message_id"]
    again = mailbox.mbox(str(workdir / "again.mbox"))
    again.add(mail(sender='"Alice via Example Support" <support@example.com>', to="carol@customer.org",
                   subject="Re: Printer on fire", body="Refund approved.", message_id=f"<{sent_id}>",
                   headers={"In-Reply-To": "<c2@customer.org>", "Date": "Tue, 03 Nov 2026 10:30:00 +0000"}).as_bytes())
    again.close()
    assert cli_json(config, "import", str(workdir / "again.mbox")) == {"screened": 1}
    assert any(r["reason"].startswith("a copy of mail mailgate sent") for r in cli_json(config, "screened"))
    assert len(query_json(config, "tickets", "show", "1")["messages"]) == len(shown["messages"])


def test_imported_staff_mail_answers_only_tickets_of_the_import_and_after_them(workdir: Path) -> None:
    """Without proof of identity, staff mail in an import may not answer a live ticket, answer
    before the question, or pass for ours when our own group carried a stranger's mail."""
    config = write_config(workdir, helpdesk_extra='trusted_authserv_ids = ["mx.example.com"]')
    assert cli(config, "ingest", input=mail(subject="Live", message_id="<live@customer.org>").as_bytes()
               ).stdout.decode().strip() == "1"

    def import_(*messages: EmailMessage) -> dict[str, int]:
        path = workdir / f"old-{time.time_ns()}.mbox"
        box = mailbox.mbox(str(path))
        for m in messages:
            box.add(m.as_bytes())
        box.close()
        return cli_json(config, "import", str(path))

    def alice(refers_to: str, date: str, body: str = "Unplug it.") -> EmailMessage:
        return mail(sender="Alice <alice@example.com>", to="carol@customer.org", subject="Re: question",
                    body=body, headers={"In-Reply-To": refers_to, "Date": date})

    assert import_(mail(subject="Old question", message_id="<c1@customer.org>",
                        headers={"Date": "Mon, 02 Nov 2026 10:00:00 +0000"}),
                   mail(subject="Spam", message_id="<spam1@customer.org>",
                        headers={"Date": "Mon, 02 Nov 2026 10:00:00 +0000"})) == {"ticket": 2}
    sql(config, "update ticket set from_spam = 1 where number = 3")
    assert import_(
        alice("<live@customer.org>", "Mon, 02 Nov 2026 11:00:00 +0000"),  # a live ticket: #4
        alice("<c1@customer.org>", "Sun, 01 Nov 2026 09:00:00 +0000"),  # before the question: #5
        mail(sender='"Mallory via Support" <support@example.com>', subject="Re: Old question",
             body="Refund approved", headers={"X-Original-From": "mallory@evil.org", "In-Reply-To": "<c1@customer.org>",
                                              "Date": "Mon, 02 Nov 2026 11:00:00 +0000"}),
        # Our group's marks where nobody can be named behind them: still no mail of ours.
        mail(sender='"Mallory via Support" <support@example.com>', subject="Re: Old question",
             body="Refund approved", headers={"In-Reply-To": "<c1@customer.org>",
                                              "Date": "Mon, 02 Nov 2026 11:00:00 +0000"}),
        mail(sender="Support <support@example.com>", subject="Re: Old question", body="Refund approved",
             headers={"X-Original-From": '"x,y"@evil.org', "In-Reply-To": "<c1@customer.org>",
                      "Date": "Mon, 02 Nov 2026 11:00:00 +0000"}),
        alice("<spam1@customer.org>", "Mon, 02 Nov 2026 11:00:00 +0000", "Not for us."),
    ) == {"ticket": 2, "screened": 3, "reply": 1}
    tickets = {t["number"]: t for t in query_json(config, "tickets", "list")}
    assert sorted(tickets) == [1, 2, 3, 4, 5]
    assert tickets[1]["status"] == tickets[2]["status"] == "new"
    for number in (1, 2):
        assert query_json(config, "tickets", "show", str(number))["first_responded_at"] is None
    spam = query_json(config, "tickets", "show", "3")
    assert spam["first_responded_at"] is None and spam["messages"][-1]["text"].strip() == "Not for us."


def test_import_notify_processes_old_mail_as_live_mail(workdir: Path) -> None:
    config = write_config(workdir)
    assert cli_json(config, "import", "--notify", str(_old_mailbox(workdir / "old.mbox"))) == {
        "reply": 1, "ticket": 2}
    assert {r["state"] for r in query_json(config, "outbox", "list")} == {"queued"}
    assert query_json(config, "tickets", "show", "1")["created_at"] > "2026-11-27"


def test_import_processes_what_an_interrupted_import_stored_and_claimed(workdir: Path) -> None:
    import os
    import socket
    import subprocess

    from sqlalchemy import update

    from mailgate import spool
    from mailgate.config import load_settings
    from mailgate.runtime import Runtime
    from mailgate.store import migrate
    from mailgate.store.engine import session_scope
    from mailgate.store.tables import Inbound

    config = write_config(workdir, agents="")
    folder = workdir / "old-mail"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.eml").write_bytes(mail(subject=f"Old request {i}", message_id=f"<old-{i}@x>").as_bytes())
    rt = Runtime.build(load_settings(config))
    migrate.upgrade(rt.engine)
    # The first import stored and claimed its batch, then was killed before processing it.
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid no longer runs
    dead_import = f"{socket.gethostname()}:{gone.pid}"
    accepted = spool.accept_batch(rt.engine, rt.blobs, [(f"import:file:{p}", p.read_bytes()) for p in sorted(
        folder.resolve().iterdir())], source="import", claimed_by=dead_import)
    assert [a.claimed.state for a in accepted if a.claimed] == ["processing"] * 3
    assert spool.claim(rt.engine, "daemon", max_attempts=5) is None  # claimed: no daemon takes them
    with session_scope(rt.engine) as session:  # 0.eml: a live worker has it now
        session.exec(update(Inbound).where(Inbound.id == accepted[0].inbound_id).values(  # type: ignore[call-overload]
            claimed_by=f"{socket.gethostname()}:{os.getpid()}"))
    out = cli_json(config, "import", str(folder))
    assert out == {"queued": 1, "ticket": 2}


def test_import_batches_by_count_and_by_size(monkeypatch: pytest.MonkeyPatch) -> None:
    import mailgate.cli as mgcli

    monkeypatch.setattr(mgcli, "IMPORT_BATCH_MESSAGES", 3)
    monkeypatch.setattr(mgcli, "IMPORT_BATCH_BYTES", 10)
    small = [(str(i), b"x") for i in range(7)]
    assert [len(b) for b in mgcli.import_batches(small)] == [3, 3, 1]
    large = [("a", b"x" * 6), ("b", b"x" * 6), ("c", b"x")]
    assert [[k for k, _ in b] for b in mgcli.import_batches(large)] == [["a", "b"], ["c"]]
    assert list(mgcli.import_batches([])) == []


# --- tickets list -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "expected"), [
    ((), [1, 2, 3, 4, 5]),
    (("--status", "open"), [1]),
    (("--status", "new"), [2, 5]),
    (("--open",), [1, 2, 3, 5]),
    (("--closed",), [4]),
    (("--overdue",), [2]),  # #3 is paused (pending), #4 closed
    (("--owner", "alice@example.com"), [1]),
    (("--owner", "ALICE@example.com"), [1]),
    (("--owner", "bob@example.com"), []),
    (("--queue", "sales@example.com"), [3]),
    (("--queue", "support@example.com"), [1, 2, 4, 5]),
    (("--priority", "urgent"), [1]),
    (("--priority", "normal"), [3, 5]),
    (("--category", "hardware"), [1]),
    (("--requester", "carol@customer.org"), [1, 5]),
    (("--requester", "Carol@Customer.org", "--status", "new"), [5]),
    (("--since", "2021-01-01"), [1, 2, 3, 4]),
    (("--since", "2019-12-31T23:00:00"), [1, 2, 3, 4, 5]),
    (("--text", "zanzibar"), [2]),          # in a message body
    (("--text", "STILL BURNING"), [1]),     # in the reply, any case
    (("--text", "scanner"), [5]),           # in a subject
    (("--text", "secret-walrus"), []),      # internal notes are not searched
    (("--text", "%"), []),                  # not a wildcard
    (("--text", "_"), []),
    (("--text", "40 seats"), [3]),
    (("--open", "--priority", "high", "--overdue"), [2]),
    (("--sort", "priority"), [1, 2, 3, 5, 4]),
    (("--sort", "created_at"), [5, 1, 2, 3, 4]),
])
def test_tickets_list_filters(desk: Path, args: tuple[str, ...], expected: list[int]) -> None:
    assert numbers(desk, *args) == expected


def test_a_merged_ticket_is_listed_with_the_closed_ones(workdir: Path) -> None:
    least_open = '[[assignment]]\nsubject_keywords = ["hardware"]\ntarget = "group:L1"\nstrategy = "least-open"\n'
    config = write_config(workdir, extra=least_open)
    for subject in ("Printer jam", "Printer jam again"):
        cli(config, "ingest", input=mail(subject=subject).as_bytes())
    sql(config, "update ticket set merged_into = 1, status = 'closed', status_kind = 'closed' where number = 2")
    assert numbers(config) == [1]  # the open work: #2 goes on in #1
    assert numbers(config, "--closed") == numbers(config, "--status", "closed") == [2]
    [merged] = json.loads(ok(config, "tickets", "list", "--json", "--closed"))
    assert merged["merged_into"] == 1
    # Its mail goes to #1: changing it would change nothing anyone sees.
    for args in (("update", "2", "--status", "open"), ("note", "2", "--text", "lost?")):
        refused = invoke(config, "tickets", *args)
        assert refused.exit_code == 1 and "#2 was merged into #1: change that one" in refused.stderr
    # Reopened, as `tickets update` allowed before: not open work of its owner's, and it can be closed.
    sql(config, "update ticket set status = 'open', status_kind = 'open', owner = 'alice@example.com' "
                "where number = 2")
    assert numbers(config, "--status", "open") == [] and numbers(config, "--open") == [1]
    cli(config, "ingest", input=mail(sender="dan@customer.org", subject="hardware fault").as_bytes())
    assert sql(config, "select owner from ticket where number = 3") == [("alice@example.com",)]
    assert "open -> closed" in ok(config, "tickets", "update", "2", "--status", "closed")
    assert numbers(config, "--closed") == [2]


def test_tickets_list_json_has_no_messages(desk: Path) -> None:
    rows = json.loads(ok(desk, "tickets", "list", "--json"))
    assert len(rows) == 5
    for row in rows:
        assert set(row) >= TICKET_FIELDS and "messages" not in row


def test_tickets_list_columns_in_any_of_the_three_forms(desk: Path) -> None:
    # DESIGN.md writes `--columns ...`; a repeated flag lost the earlier columns without a word.
    def header(*columns: str) -> list[str]:
        table = cli(desk, "tickets", "list", *columns).stdout.decode()
        return [w for w in table.splitlines()[1].replace("┃", " ").split()]

    expected = ["number", "subject"]
    assert header("--columns", "number,subject") == expected
    assert header("--columns", "number", "subject") == expected
    assert header("--columns", "number", "--columns", "subject") == expected
    default = ["number", "status", "priority", "owner", "requester", "subject", "created_at"]
    assert header() == default
    # The default is in the help, which Typer shows as nothing for a list option without one.
    helptext = CliRunner().invoke(app, ["tickets", "list", "--help"], env={"COLUMNS": "300"}).stdout
    assert ",".join(default) in re.sub(r"[\s│]+", "", helptext)


def test_outbox_list_shows_zero_attempts_as_zero(workdir: Path) -> None:
    config = write_config(workdir)
    cli(config, "ingest", input=mail().as_bytes())
    rows = [line.split("│") for line in cli(config, "outbox", "list").stdout.decode().splitlines() if "queued" in line]
    assert rows and all(cells[6].strip() == "0" for cells in rows)  # not a blank cell


def test_tickets_list_bad_options(desk: Path) -> None:
    bad_sort = invoke(desk, "tickets", "list", "--sort", "colour")
    assert bad_sort.exit_code == 2 and "--sort: one of number" in bad_sort.stderr
    bad_col = invoke(desk, "tickets", "list", "--columns", "number,colour")
    assert bad_col.exit_code == 2 and "--columns: unknown column 'colour'" in bad_col.stderr
    # Also when no ticket matches: the column name is wrong whatever the rows.
    none = invoke(desk, "tickets", "list", "--status", "nonesuch", "--columns", "colour")
    assert none.exit_code == 2 and "--columns: unknown column 'colour'" in none.stderr
    # A mistyped filter value would list nothing, which reads as "no such tickets".
    status = invoke(desk, "tickets", "list", "--status", "nonesuch")
    assert status.exit_code == 2 and "--status nonesuch: not a configured status (new, open, pending" in status.stderr
    assert "no ticket has it" in status.stderr
    priority = invoke(desk, "tickets", "list", "--priority", "critical")
    assert priority.exit_code == 2 and "(low, normal, high, urgent)" in priority.stderr
    both = invoke(desk, "tickets", "list", "--open", "--closed")
    assert both.exit_code == 2 and "give one of them" in both.stderr


def test_a_status_dropped_from_the_config_can_still_be_listed(workdir: Path) -> None:
    config = write_config(workdir)
    cli(config, "ingest", input=mail().as_bytes())
    sql(config, "update ticket set status = 'waiting-vendor' where number = 1")  # renamed since
    assert numbers(config, "--status", "waiting-vendor") == [1]


def test_a_table_through_a_pipe_keeps_whole_values_one_row_a_line(desk: Path) -> None:
    """grep and awk on `tickets list` missed rows: Rich cut values to fit 80 columns."""
    out = cli(desk, "tickets", "list").stdout.decode()  # stdout is a pipe here
    rows = [line for line in out.splitlines() if "carol@customer.org" in line]
    assert len(rows) == 2 and all("Printer on fire" in r or "scanner" in r.lower() for r in rows)


def test_tickets_list_columns(desk: Path) -> None:
    out = ok(desk, "tickets", "list", "--columns", "number,owner,subject", env={"COLUMNS": "200"})
    header = next(line for line in out.splitlines() if "number" in line)
    assert re.findall(r"\w+", header) == ["number", "owner", "subject"]
    assert "alice@example.com" in out and "Printer on fire" in out
    assert "carol@customer.org" not in out  # requester column not asked for


def test_row_styles() -> None:
    base = {"status_kind": "open", "overdue": False, "answered": False}
    assert _row_style(base) == STATE_STYLE["unanswered"] == "yellow"
    assert _row_style({**base, "answered": True}) == "green"
    assert _row_style({**base, "overdue": True, "answered": True}) == "bold red"
    assert _row_style({**base, "status_kind": "pending"}) == "cyan"
    assert _row_style({**base, "status_kind": "solved", "overdue": True}) == "dim"
    assert _row_style({**base, "status_kind": "closed"}) == "dim"


def test_tickets_list_colours_in_a_terminal(desk: Path) -> None:
    out = ok(desk, "tickets", "list", "--columns", "number,subject", env={"FORCE_COLOR": "1", "COLUMNS": "200"})
    styles = {}
    for line in out.splitlines():
        m = re.search(r"(\x1b\[[0-9;]+m)\s*│?\s*(\d)\s", line)
        if m:
            styles[int(m.group(2))] = m.group(1)
    assert styles == {1: "\x1b[32m", 2: "\x1b[1;31m", 3: "\x1b[36m", 4: "\x1b[2m", 5: "\x1b[33m"}
    plain = ok(desk, "tickets", "list", env={"COLUMNS": "200", "TERM": "dumb"})
    assert "\x1b[" not in plain


# --- tickets show --------------------------------------------------------------------------------------

def test_tickets_show_json_contract(desk: Path) -> None:
    t = json.loads(ok(desk, "tickets", "show", "1", "--json"))
    assert TICKET_FIELDS | {"messages"} <= set(t)
    assert (t["number"], t["subject"], t["status"], t["priority"], t["category"], t["queue"], t["requester"]) == (
        1, "Printer on fire", "open", "urgent", "hardware", "support@example.com", "carol@customer.org")
    assert (t["owner"], t["assistants"], t["participants"], t["tier"]) == (
        "alice@example.com", ["bob@example.com"], [], "customer")
    assert (t["overdue"], t["escalation_level"], t["rating"]) == (False, 0, None)
    for key in ("created_at", "first_response_due", "resolution_due"):
        assert ISO_Z.match(t[key]), (key, t[key])
    kinds = [(m["kind"], m["direction"], m["from"]) for m in t["messages"]]
    assert kinds == [("public", "in", "carol@customer.org"), ("system", "out", "support@example.com"),
                     ("public", "in", "carol@customer.org")]
    for m in t["messages"]:
        assert set(m) >= MESSAGE_FIELDS and ISO_Z.match(m["created_at"])
    first, _, reply = t["messages"]
    assert first["message_id"] == "cli-1@customer.org" and first["subject"] == "Printer on fire"
    # The mbox's '>From ' quoting is undone on import.
    assert first["text"].strip() == "My printer is on fire.\nFrom the smell of it, the toner."
    assert reply["text"].strip() == "It is still burning." and reply["attachments"] == []
    overdue = json.loads(ok(desk, "tickets", "show", "2", "--json"))
    assert overdue["overdue"] is True and overdue["first_response_due"] == "2020-01-01T00:00:00Z"


def test_tickets_show_text_has_the_fields_and_the_events(desk: Path) -> None:
    out = ok(desk, "tickets", "show", "1")
    assert "  assistants           bob@example.com\n" in out  # a list as words, not ['...']
    assert "  participants         -\n" in out
    events = out.split("\nevents\n", 1)[1].splitlines()
    assert any("cli: status new -> open" in line for line in events), events
    assert any(line.endswith("cli: owner - -> alice@example.com") for line in events), events


def test_tickets_show_missing_ticket(desk: Path) -> None:
    result = invoke(desk, "tickets", "show", "99")
    assert result.exit_code == 1 and result.stderr.strip() == "mailgate: no ticket #99"


def test_hostile_attachment_name_is_sanitised_and_blob_named_by_sha256(desk: Path) -> None:
    t = json.loads(ok(desk, "tickets", "show", "4", "--json"))
    digest = hashlib.sha256(PASSWD).hexdigest()
    assert t["messages"][0]["attachments"] == [
        {"filename": "passwd", "content_type": "text/plain", "size": len(PASSWD), "sha256": digest,
         "inline": False}]
    data = desk.parent / "data"
    blob = data / "raw" / digest[:2] / digest[2:4] / digest
    assert blob.read_bytes() == PASSWD
    files = [p for p in data.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name == "passwd" or ".." in p.parts]
    assert all(re.fullmatch(r"[0-9a-f]{64}", p.name) for p in files if "raw" in p.parts)
    assert not (desk.parent / "etc").exists()
    text = ok(desk, "tickets", "show", "4")
    assert "[attachment] 'passwd' text/plain 32 bytes" in text


# --- tickets update and note ------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (("--status", "bogus"), "--status: unknown status 'bogus'; one of new, open, pending, on-hold, solved, closed"),
    (("--priority", "asap"), "--priority: one of low, normal, high, urgent"),
    (("--category", "misc"), "--category: one of billing, hardware"),
    (("--owner", "mallory@evil.example"), "--owner: mallory@evil.example is not a configured agent"),
    (("--assist", "mallory@evil.example"), "--assist: mallory@evil.example is not a configured agent"),
    (("--tier", "gold"), "--tier: one of customer"),
])
def test_tickets_update_bad_values(desk: Path, args: tuple[str, ...], message: str) -> None:
    result = invoke(desk, "tickets", "update", "5", *args)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"mailgate: {message}"
    assert json.loads(ok(desk, "tickets", "show", "5", "--json"))["status"] == "new"  # nothing changed


def test_tickets_update_each_flag_and_cli_exit_code(workdir: Path) -> None:
    config = write_config(workdir, helpdesk_extra=DESK_EXTRA, agents=_AGENTS_AND_L3)
    assert cli(config, "ingest", input=mail().as_bytes()).stdout.decode().strip() == "1"
    for args, change in [
        (("--status", "open"), "status: new -> open"),
        (("--priority", "high"), "priority: normal -> high"),
        (("--category", "billing"), "category: - -> billing"),
        (("--owner", "Bob@Example.com"), "owner: nobody -> bob@example.com"),
        (("--assist", "alice@example.com"), "assistant added: alice@example.com"),
        (("--tier", "gold"), "tier: customer -> gold"),
        (("--owner", ""), "owner: bob@example.com -> nobody"),
        (("--status", "open"), None),
    ]:
        out = ok(config, "tickets", "update", "1", *args)
        assert out.strip() == f"#1: {change or 'nothing changed'}"
    t = json.loads(ok(config, "tickets", "show", "1", "--json"))
    assert (t["status"], t["priority"], t["category"], t["owner"], t["assistants"], t["tier"]) == (
        "open", "high", "billing", None, ["alice@example.com"], "gold")
    actions = [(e["action"], e["actor"]) for e in t["events"] if e["actor"] == "cli"]
    assert [a for a, _ in actions] == ["status", "priority", "category", "owner", "assistant", "tier", "owner"]
    # The real command: exit 1 and one line.
    proc = cli(config, "tickets", "update", "1", "--priority", "asap", check=False)
    assert proc.returncode == 1
    assert proc.stderr.decode() == "mailgate: --priority: one of low, normal, high, urgent\n"
    missing = cli(config, "tickets", "update", "42", "--priority", "low", check=False)
    assert missing.returncode == 1 and missing.stderr.decode() == "mailgate: no ticket #42\n"


_AGENTS_AND_L3 = """
[[agents]]
email = "alice@example.com"
name = "Alice"
groups = ["L1"]

[[agents]]
email = "bob@example.com"
name = "Bob"
groups = ["L2"]

[[sla.tiers]]
name = "customer"

[[sla.tiers]]
name = "gold"
always_on = true
"""


def test_note_is_internal_and_never_mailed_to_the_requester(desk: Path) -> None:
    t = json.loads(ok(desk, "tickets", "show", "5", "--json"))
    notes = [m for m in t["messages"] if m["kind"] == "internal"]
    assert len(notes) == 1 and notes[0]["text"] == "secret-walrus: customer is difficult"
    assert notes[0]["from"] == "alice@example.com"
    rows = sql(desk, "select recipients, raw from outbox")
    with_secret = sorted(r for r, raw in rows if b"secret-walrus" in raw)
    assert "carol@customer.org" not in with_secret
    assert with_secret == ["bob@example.com"]  # the other agent is told; the author is not
    empty = invoke(desk, "tickets", "note", "5", "--text", "  ")
    assert empty.exit_code == 2 and "empty note" in empty.stderr


# --- dead letters ------------------------------------------------------------------------------------------

def test_deadletter_list_and_retry_after_the_cause_is_fixed(workdir: Path) -> None:
    from mailgate import spool
    from mailgate.config import load_settings
    from mailgate.ingest.pipeline import run_one
    from mailgate.runtime import Runtime

    config = write_config(workdir, agents="", helpdesk_extra='max_attempts = 1\ntemplates_dir = "site"')
    broken = workdir / "site" / "requester" / "created.subject.j2"
    broken.parent.mkdir(parents=True)
    broken.write_text("{{ tikcet.number }}")  # an operator's typo: every confirmation fails
    proc = cli(config, "ingest", input=mail(subject="Help").as_bytes(), check=False)
    assert proc.returncode == 65
    # One line: the traceback is kept with the dead letter, not handed to the MTA's bounce.
    assert proc.stderr.decode() == "mailgate: unusable message kept as dead letter 1: UndefinedError: 'tikcet' is " \
        "undefined\n"
    dead = query_json(config, "deadletter", "list")
    # (from and subject are not shown: the processing transaction that would record them rolled back)
    assert [(d["id"], d["source"], d["attempts"]) for d in dead] == [(1, "ingest", 1)]
    assert "tikcet" in dead[0]["reason"] and "Traceback" in dead[0]["error"]
    assert query_json(config, "tickets", "list") == []

    broken.unlink()
    assert ok(config, "deadletter", "retry").strip() == "1 requeued"
    assert ok(config, "deadletter", "retry").strip() == "0 requeued"
    # Ids that are no dead letter (mistyped, or requeued already): said, and exit 1.
    proc = cli(config, "deadletter", "retry", "1", "9999", check=False)
    assert (proc.returncode, proc.stdout.decode().strip()) == (1, "0 requeued")
    assert proc.stderr.decode().splitlines() == [
        "mailgate: 1: no dead letter with this id (`mailgate deadletter list`)",
        "mailgate: 9999: no dead letter with this id (`mailgate deadletter list`)"]
    proc = cli(config, "outbox", "retry", "9999", check=False)
    assert proc.returncode == 1 and "9999: no failed outgoing mail with this id" in proc.stderr.decode()
    # What the daemon's worker does with the requeued row:
    rt = Runtime.build(load_settings(config))
    result = run_one(rt, spool.worker_id())
    assert result is not None and (result.outcome, result.ticket_number) == ("ticket", 1)
    assert json.loads(ok(config, "deadletter", "list", "--json")) == []
    assert [t["subject"] for t in json.loads(ok(config, "tickets", "list", "--json"))] == ["Help"]


# --- doctor and db -----------------------------------------------------------------------------------------

def test_doctor_names_the_spam_model_feature_set_and_an_older_one(workdir: Path) -> None:
    from mailgate.spamfilter import SpamModel

    config = write_config(workdir, spam_enabled=True)
    line = cli(config, "doctor", check=False).stdout.decode().splitlines()[-2]
    # The shipped model, seeded into data_dir on first use.
    assert line == f"[ok  ] spam model: {workdir / 'data' / 'spam-model.npz'} (feature set 3)"
    old = SpamModel.load(workdir / "data" / "spam-model.npz")
    old._feature_version = 2  # as a model trained before feature set 3 would say
    old.save(workdir / "data" / "spam-model.npz")
    line = cli(config, "doctor", check=False).stdout.decode().splitlines()[-2]
    assert line.endswith("(feature set 2); `mailgate spam train` would add feature set 3")


def test_doctor_says_where_the_quarantine_digest_goes(workdir: Path) -> None:
    def digest_line(config: Path) -> str:
        return cli(config, "doctor", check=False).stdout.decode().splitlines()[-1]

    assert digest_line(write_config(workdir / "admins", spam_enabled=True)) == (
        "[ok  ] quarantine digest: every 24 h to alice@example.com")
    nobody = write_config(workdir / "nobody", spam_enabled=True, agents=_AGENTS_AND_L3.split("[[sla.tiers]]")[0])
    assert digest_line(nobody) == ("[WARN] quarantine digest: no agent has role \"admin\" and spam.digest_to "
                                   "is empty: the list of held mail goes to nobody")
    off = write_config(workdir / "off", spam_enabled=True, spam_extra="digest_hours = 0")
    assert digest_line(off).startswith("[ok  ] quarantine digest: off (spam.digest_hours = 0)")


def test_doctor_ok_with_maildir_and_fails_naming_an_unreachable_relay(workdir: Path) -> None:
    good = write_config(workdir / "good")
    proc = cli(good, "doctor")
    lines = proc.stdout.decode().splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "[ok  ] config", "[WARN] database", "[ok  ] outbound", "[ok  ] spam model", "[ok  ] quarantine digest"]
    assert "schema at empty" in lines[1] and "run `mailgate db upgrade`" in lines[1]
    assert lines[2].startswith(f"[ok  ] outbound: maildir {workdir / 'good' / 'sent'} writable")
    cli(good, "db", "upgrade")
    assert cli(good, "doctor").stdout.decode().splitlines()[1].startswith("[ok  ] database: schema at ")
    url = f"smtp://127.0.0.1:{free_port()}"
    bad = write_config(workdir / "bad", outbound=url)
    proc = cli(bad, "doctor", "--json", check=False)
    assert proc.returncode == 1
    checks = {c["name"]: c for c in json.loads(proc.stdout)}
    assert checks["outbound"]["status"] == "error" and checks["outbound"]["detail"].startswith(url)
    assert checks["config"]["status"] == "ok"


def test_doctor_fails_on_the_published_example_secret_key(workdir: Path) -> None:
    """Anyone who read config.example.toml could compute agents' reply tokens with it."""
    config = write_config(workdir)
    text = config.read_text()
    assert 'secret_key = "test-secret-key-0123456789"' in text
    example_config = (Path(__file__).resolve().parents[1] / "config.example.toml").read_text()
    example = re.search(r'^secret_key = "([^"]+)"', example_config, re.M)
    assert example is not None
    for published in ("change-me", example.group(1)):
        config.write_text(text.replace("test-secret-key-0123456789", published))
        proc = cli(config, "doctor", "--json", check=False)
        assert proc.returncode == 1
        check = next(c for c in json.loads(proc.stdout) if c["name"] == "secret key")
        assert check["status"] == "error" and "forge reply tokens" in check["detail"]


def test_db_upgrade_on_empty_database_is_idempotent(workdir: Path) -> None:
    from mailgate.store.migrate import head_revision, newest_migration

    config = write_config(workdir)
    head = head_revision()
    assert head == newest_migration()  # HEAD_REVISION names the newest migration script
    first = cli(config, "db", "upgrade").stdout.decode().strip()
    assert first == f"database at {head} (was empty)"
    second = cli(config, "db", "upgrade").stdout.decode().strip()
    assert second == f"database at {head} (was {head})"
    tables = {r[0] for r in sql(config, "select name from sqlite_master where type = 'table'")}
    assert {"ticket", "message", "attachment", "event", "inbound", "outbox", "contact"} <= tables


def test_db_upgrade_from_0001_keeps_the_rows(workdir: Path) -> None:
    from mailgate.config import load_settings
    from mailgate.runtime import Runtime
    from mailgate.store import migrate

    config = write_config(workdir)
    rt = Runtime.build(load_settings(config))
    migrate.upgrade(rt.engine, "0001")
    sql(config, "insert into inbound (source, envelope_to, raw_sha256, size, state, outcome, attempts, "
                "received_at, rule_hits) values ('smtp', '', ?, 1, 'done', 'quarantined', 0, "
                "'2026-11-01 00:00:00.000000', '[]')", "0" * 64)
    run = cli(config, "run", check=False, timeout=60)
    assert run.returncode != 0 and "mailgate db upgrade" in run.stderr.decode()  # refuses the old schema
    assert cli(config, "db", "upgrade").stdout.decode().strip() == f"database at {migrate.head_revision()} (was 0001)"
    assert sql(config, "select outcome, reported_at from inbound") == [("quarantined", None)]


def test_db_upgrade_from_0003_gives_every_contact_its_mailbox(workdir: Path) -> None:
    from mailgate.config import load_settings
    from mailgate.runtime import Runtime
    from mailgate.store import migrate

    config = write_config(workdir, helpdesk_extra="new_tickets_per_sender_per_hour = 2")
    rt = Runtime.build(load_settings(config))
    migrate.upgrade(rt.engine, "0003")
    for n, email in enumerate(("carol+1@customer.org", "dora@bücher.de")):
        sql(config, "insert into contact (email, name, created_at) values (?, '', '2026-11-01 00:00:00.000000')", email)
        sql(config, "insert into ticket (subject, requester_id, queue, priority, status, status_kind, tier, "
                    "created_at, updated_at, escalation_level, from_spam) values ('old', ?, 'support@example.com', "
                    "'normal', 'new', 'new', 'customer', ?, ?, 0, 0)", n + 1, *[utcnow_text()] * 2)
    sql(config, "insert into autoreplylog (recipient, sent_at) values ('eve@xn--bcher-kva.de', ?)", utcnow_text())
    cli(config, "db", "upgrade")
    assert sql(config, "select recipient from autoreplylog") == [("eve@bücher.de",)]  # the loop guard's key
    assert sql(config, "select email, mailbox from contact order by id") == [
        ("carol+1@customer.org", "carol@customer.org"), ("dora@bücher.de", "dora@bücher.de")]
    # The cap counts the tickets of the contacts the upgrade gave a mailbox.
    assert cli(config, "ingest", input=mail(sender="carol+2@customer.org").as_bytes()).stdout.decode().strip() == "3"
    assert cli(config, "ingest", input=mail(sender="carol@customer.org").as_bytes()).stdout.decode().startswith(
        "screened: carol@customer.org opened 2 tickets")


def test_db_upgrade_from_0004_keeps_a_waiting_oversize_report_as_a_warning(workdir: Path) -> None:
    """Before 0005 the report lived in last_error alone; last_uid is past the message, and
    nothing would report it again."""
    from mailgate.config import load_settings
    from mailgate.runtime import Runtime
    from mailgate.store import migrate
    from mailgate.transport.imap import imap_health

    config = write_config(workdir, extra='[[imap]]\nname = "inbox"\nhost = "127.0.0.1"\nusername = "u"\n'
                                         'password = "p"\nmax_message_bytes = 3000\n')
    rt = Runtime.build(load_settings(config))
    migrate.upgrade(rt.engine, "0004")
    sql(config, "insert into imapstate (account, uidvalidity, last_uid, last_ok_at, last_error, last_error_at) "
                "values ('inbox', 77, 9, ?, 'message UID 4 in INBOX is 6129 bytes, over max_message_bytes (3000); "
                "left in place', ?)", *[utcnow_text()] * 2)
    cli(config, "db", "upgrade")
    assert sql(config, "select oversize from imapstate") == [("[[77, 4, 6129]]",)]
    [health] = imap_health(rt.engine, rt.settings.imap, datetime.now(UTC))
    assert "1 message(s) over max_message_bytes (3000) wait in INBOX, never fetched (UIDs 4)" in health["warning"]


def utcnow_text() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def test_doctor_warns_about_accepted_mail_that_nothing_moves(workdir: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from mailgate.journal import AcceptJournal
    from mailgate.store.blobs import BlobStore

    config = write_config(workdir)
    cli(config, "db", "upgrade")
    journal = AcceptJournal(workdir / "data" / "accept-journal.db", BlobStore(workdir / "data" / "raw"))
    assert "[ok  ] smtp journal: empty" in cli(config, "doctor").stdout.decode()
    key, row = journal.row_for(mail().as_bytes(), source="smtp", queue="support@example.com",
                               envelope_from="carol@customer.org", envelope_to=("support@example.com",))
    assert journal.write_rows([row]) == [None]
    fresh = cli(config, "doctor").stdout.decode()
    assert "[ok  ] smtp journal: 1 accepted message(s) waiting" in fresh
    journal._conn.execute("UPDATE journal SET received_at = ?",
                          ((datetime.now(UTC) - timedelta(minutes=6)).isoformat(),))
    checks = {c["name"]: c for c in json.loads(cli(config, "doctor", "--json", check=False).stdout)}
    assert checks["smtp journal"]["status"] == "warning"
    assert "is `mailgate run` (its work process) running?" in checks["smtp journal"]["detail"]
    journal.close()


# --- text from mail on the operator's terminal -------------------------------------------------------------

HOSTILE_SUBJECT = "[link=https://evil.example/release]Invoice[/link] [/x] :thumbs_up: \u202eevil"
HOSTILE_MAIL = (
    b'From: Dana <"\x1b]52;c;aGk=\x07\x1b[8mx"@customer.example>\r\n'
    b"To: support@example.com\r\n"
    b"Subject: " + HOSTILE_SUBJECT.encode("utf-8") + b"\r\n"
    b"Message-ID: <hostile.1@customer.example>\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
    b"Hello \x1b[31mRED\x1b[0m and \xc2\x9b2J cleared?\r\n"
)


def _no_sequences_from_mail(out: str) -> None:
    assert "\x1b]" not in out and "\x07" not in out  # OSC: hyperlinks, the clipboard (52)
    assert "\x1b[8m" not in out and "\x1b[31m" not in out and "\x9b" not in out and "\u202e" not in out


def test_text_from_mail_cannot_drive_the_terminal(workdir: Path) -> None:
    """Subjects, addresses and bodies are printed as text in a real terminal (FORCE_COLOR):
    Rich markup is not read (an unmatched [/x] crashed the listing), escape sequences,
    C1 controls and bidi overrides come out as U+FFFD. JSON keeps the data, escaped."""
    config = write_config(workdir)
    assert cli(config, "ingest", input=HOSTILE_MAIL).stdout.decode().strip() == "1"
    terminal = {"FORCE_COLOR": "1", "COLUMNS": "300"}
    show = ok(config, "tickets", "show", "1", env=terminal)
    _no_sequences_from_mail(show)
    assert "[link=https://evil.example/release]Invoice[/link] [/x] :thumbs_up: \ufffdevil" in show
    assert "Hello \ufffd[31mRED\ufffd[0m and \ufffd2J cleared?" in show
    listing = ok(config, "tickets", "list", "--columns", "number,subject,requester", env=terminal)
    _no_sequences_from_mail(listing)
    assert "[/x]" in listing
    raw_json = ok(config, "tickets", "show", "1", "--json")
    _no_sequences_from_mail(raw_json)
    data = json.loads(raw_json)
    assert data["subject"] == HOSTILE_SUBJECT
    assert "\x1b[31mRED" in data["messages"][0]["text"]  # the data itself is kept


def test_quarantine_list_prints_hostile_subjects_as_text(workdir: Path) -> None:
    from mailgate.runtime import Runtime
    from mailgate.store import migrate
    from mailgate.store.engine import session_scope, utcnow
    from mailgate.store.tables import Inbound

    config = write_config(workdir, spam_enabled=True)
    from mailgate.config import load_settings

    rt = Runtime.build(load_settings(config))
    migrate.upgrade(rt.engine)
    with session_scope(rt.engine) as session:
        session.add(Inbound(source="smtp", raw_sha256=rt.blobs.put(HOSTILE_MAIL), received_at=utcnow(),
                            state="done", outcome="quarantined", spam_score=0.99, subject=HOSTILE_SUBJECT,
                            from_addr='"\x1b]52;c;aGk=\x07x"@customer.example'))
    out = ok(config, "spam", "quarantine", "list", env={"FORCE_COLOR": "1", "COLUMNS": "300"})
    _no_sequences_from_mail(out)
    assert "[/x]" in out and "\ufffd]52;c;aGk=\ufffdx" in out


def test_a_data_dir_that_is_a_file_is_a_config_error_naming_it(workdir: Path) -> None:
    """It was blamed on the database, with exit 75, by every command."""
    config = write_config(workdir)
    (workdir / "data").write_text("a file where the data directory should be")
    for command in (["doctor"], ["tickets", "list"]):
        proc = cli(config, *command, check=False)
        assert proc.returncode == 2 and proc.stdout == b""
        expected = f"mailgate: config error: helpdesk.data_dir: not a directory: {workdir / 'data'}\n"
        assert proc.stderr.decode() == expected


def test_sort_by_priority_follows_the_configured_priorities(workdir: Path) -> None:
    config = write_config(workdir, helpdesk_extra='priorities = ["low", "normal", "high", "critical"]')
    for subject in ("a", "b", "c"):
        cli(config, "ingest", input=bytes(mail(subject=subject)))
    cli(config, "tickets", "update", "2", "--priority", "critical")
    cli(config, "tickets", "update", "3", "--priority", "high")
    listed = query_json(config, "tickets", "list", "--sort", "priority")
    assert [(t["number"], t["priority"]) for t in listed] == [(2, "critical"), (3, "high"), (1, "normal")]


def test_update_owner_tells_the_former_owner_as_by_mail(workdir: Path) -> None:
    config = write_config(workdir)
    cli(config, "ingest", input=bytes(mail(subject="Owned")))
    cli(config, "tickets", "update", "1", "--owner", "alice@example.com")
    before = {r["id"] for r in query_json(config, "outbox", "list")}
    cli(config, "tickets", "update", "1", "--owner", "bob@example.com")
    new = [(r["to"], r["template"]) for r in query_json(config, "outbox", "list") if r["id"] not in before]
    assert sorted(new) == [("alice@example.com", "agent/assigned"), ("bob@example.com", "agent/assigned")]


def test_a_limit_below_one_is_a_usage_error(workdir: Path) -> None:
    """On PostgreSQL a negative LIMIT was a traceback; on SQLite it meant no limit."""
    config = write_config(workdir)
    for command in (["outbox", "list"], ["deadletter", "list"], ["screened"], ["spam", "quarantine", "list"]):
        proc = cli(config, *command, "--limit", "-1", check=False)
        assert proc.returncode == 2 and "Invalid value for '--limit'" in proc.stderr.decode(), command


def test_a_doctor_check_is_one_line_whatever_the_driver_said() -> None:
    from mailgate.doctor import _check

    said = 'connection failed: connection to server at "127.0.0.1", port 9 failed: Connection refused\n\t' \
           "Is the server running on that host and accepting TCP/IP connections?\n(Background on this error at: x)"
    assert "\n" not in _check("database", "error", said)["detail"]
