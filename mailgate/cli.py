"""The `mailgate` command. Thin: parse options, call the package, print.

Exit codes: 0 ok; 2 bad usage or configuration (one line, no traceback);
for `ingest`, 65 unusable input (kept as a dead letter) and 75 temporary
failure, a bad configuration included (the MTA should retry), as sysexits.h
and rt-mailgate use them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

# sqlmodel and the rest of the package are imported inside the commands: a config error or
# --help then answers without paying for SQLAlchemy's import.
from mailgate.config import ConfigError, Settings, config_path, load_settings, safe_url
from mailgate.domain import MAX_ID

if TYPE_CHECKING:
    from mailgate.runtime import Runtime
    from mailgate.spool import Accepted

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="mailgate: an email-first help desk daemon.")
tickets_app = typer.Typer(no_args_is_help=True, help="List, show and change tickets.")
outbox_app = typer.Typer(no_args_is_help=True, help="Outgoing mail queue.")
dead_app = typer.Typer(no_args_is_help=True, help="Messages that could not be processed.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
spam_app = typer.Typer(no_args_is_help=True, help="The spam filter.")
quarantine_app = typer.Typer(no_args_is_help=True, help="Messages held as spam.")
app.add_typer(tickets_app, name="tickets")
app.add_typer(outbox_app, name="outbox")
app.add_typer(dead_app, name="deadletter")
app.add_typer(db_app, name="db")
app.add_typer(spam_app, name="spam")
spam_app.add_typer(quarantine_app, name="quarantine")

EX_DATAERR = 65
EX_TEMPFAIL = 75

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Config file "
                      "(default: $MAILGATE_CONFIG, then /etc/mailgate/config.toml).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
# Ticket numbers and row ids fit a 32-bit integer column (domain.MAX_ID).
TicketNumber = Annotated[int, typer.Argument(min=1, max=MAX_ID)]


# Subjects, addresses, bodies and file names come from strangers' mail and reach the
# operator's terminal only through shown(), echo(), print_json() and text_console():
# a control character (ESC starts a terminal sequence, OSC 52 writes the clipboard,
# 0x9b is a one-byte CSI) or a bidi override must not act on it, nor Rich markup.
_TERMINAL_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# json.dumps escapes C0 controls itself; with ensure_ascii=False it leaves these raw.
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


def shown(value: object) -> str:
    """Text safe to print to a terminal: unsafe characters become U+FFFD."""
    return _TERMINAL_UNSAFE.sub("\ufffd", "" if value is None else str(value))


def echo(message: str, *, err: bool = False) -> None:
    typer.echo(shown(message), err=err)


def text_console(*, stderr: bool = False) -> Console:
    """A Rich console that prints text as text: no markup, emoji codes or highlighting.
    Style goes on Text objects."""
    stream = sys.stderr if stderr else sys.stdout
    # Through a pipe Rich assumes 80 columns and cuts addresses and subjects ("carol@cu…"):
    # grep and awk must see whole values, one row a line.
    width = None if stream.isatty() else 100_000
    return Console(stderr=stderr, markup=False, emoji=False, highlight=False, width=width)


def fail(message: str, code: int = 2) -> NoReturn:
    # One line, whatever a library's exception text holds (psycopg's run over three).
    echo("mailgate: " + re.sub(r"\s*\n\s*", " ", message.strip()), err=True)
    raise typer.Exit(code)


def queue_option(settings: Settings, queue: str | None, error_code: int, *,
                 any_of_ours: bool = False) -> str | None:
    """--queue, lower-cased: helpdesk.address or one of helpdesk.queues, in a plus form too
    (Postfix's ${recipient}); with any_of_ours, the comment address as well. Another address
    stops the command: a typo in an MTA's pipe line would otherwise put a whole queue's mail
    in the default queue, unnoticed."""
    if queue is None:
        return None
    from mailgate.domain import base_address

    hd = settings.helpdesk
    allowed = hd.all_addresses if any_of_ours else (hd.address, *hd.queues)
    if base_address(queue) not in allowed:
        names = "helpdesk.address, comment_address, queues" if any_of_ours else "helpdesk.address, queues"
        fail(f"--queue {queue}: not one of our addresses ({names})", error_code)
    # As given for a pipe (its envelope recipient, see ingest); the queue itself otherwise.
    return queue.lower() if any_of_ours else base_address(queue)


def settings_for(config: Path | None, *, error_code: int = 2) -> Settings:
    try:
        return load_settings(config_path(config))
    except ConfigError as exc:
        fail(f"config error: {exc}", error_code)


def setup_logging(settings: Settings, level: str | None = None) -> None:
    logging.basicConfig(level=level or settings.log.level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # aiosmtpd logs every SMTP command at INFO; apscheduler every job run.
    for noisy in ("mail.log", "apscheduler", "alembic.runtime.migration"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def runtime_for(config: Path | None, *, upgrade: bool = True, config_error_code: int = 2) -> Any:
    from mailgate.runtime import Runtime
    from mailgate.store import migrate

    settings = settings_for(config, error_code=config_error_code)
    setup_logging(settings, "WARNING")
    try:
        rt = Runtime.build(settings)
        if upgrade and migrate.current_revision(rt.engine) is None:
            migrate.upgrade(rt.engine)
    except Exception as exc:
        fail(database_failure(settings, exc), EX_TEMPFAIL)
    return rt


def database_failure(settings: Settings, exc: BaseException) -> str:
    """One line: drivers and SQLAlchemy add lines (the server's detail, a link to their docs)."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"database {safe_url(settings.database.url)}: {type(exc).__name__}: {first}"


def print_json(data: Any) -> None:
    text = json.dumps(data, indent=2, ensure_ascii=False)
    # Escaped, the same data: these characters only occur inside JSON strings.
    typer.echo(_JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text))


# --- run / ingest / import ------------------------------------------------------------

@app.command()
def run(config: ConfigOpt = None) -> None:
    """Run the daemon: SMTP/LMTP listener, IMAP pollers, ingest worker, outbox, scheduler."""
    from sqlalchemy.exc import SQLAlchemyError

    from mailgate.service import serve

    settings = settings_for(config)
    setup_logging(settings)
    try:
        code = asyncio.run(serve(settings))
    except (SQLAlchemyError, ImportError) as exc:  # down, refused, no driver: one line, systemd restarts us
        fail(f"cannot start: {database_failure(settings, exc)}", 1)
    except OSError as exc:
        fail(f"cannot start: {exc}", 1)
    except RuntimeError as exc:
        fail(str(exc), 1)
    raise typer.Exit(code)


@app.command()
def ingest(config: ConfigOpt = None,
           queue: Annotated[str | None, typer.Option(help="The support address it was sent to.")] = None,
           sender: Annotated[str | None, typer.Option("--from", help="Envelope sender.")] = None) -> None:
    """Read one message on stdin, store it, process it; print the ticket number."""
    from mailgate import spool
    from mailgate.ingest.pipeline import run_one

    raw = sys.stdin.buffer.read()
    # A broken config is the operator's to fix, not the sender's: an MTA must defer (75), not bounce.
    rt = runtime_for(config, config_error_code=EX_TEMPFAIL)
    # The operator's to fix: defer, not bounce. It is the envelope recipient of a pipe: the
    # comment address makes a note, and a plus form keeps its reply token.
    queue = queue_option(rt.settings, queue, EX_TEMPFAIL, any_of_ours=True)
    # An MTA pipe (Postfix) mails stderr back in its bounce: the worker's traceback stays in the
    # dead letter (`mailgate deadletter list`), and stderr gets only our one line below.
    logging.getLogger("mailgate.ingest").setLevel(logging.CRITICAL)
    try:
        accepted = spool.accept(rt.spool_engine, rt.blobs, raw, source="ingest",
                                queue=queue, envelope_from=sender, envelope_to=(queue,) if queue else ())
    except spool.SpoolError as exc:
        fail(f"temporary failure, message not stored: {exc}", EX_TEMPFAIL)
    try:
        result = run_one(rt, spool.worker_id(), only_id=accepted.inbound_id)
    except Exception as exc:  # stored is stored: the daemon's worker processes it later
        echo(f"stored as inbound {accepted.inbound_id}; not processed yet: {type(exc).__name__}")
        return
    if result is None:
        echo(f"queued as inbound {accepted.inbound_id}")
        return
    if result.outcome == "dead":
        fail(f"unusable message kept as dead letter {accepted.inbound_id}: {result.reason}", EX_DATAERR)
    if result.outcome in ("retry", "lost"):
        # Stored: the daemon's worker will try again. Not a temporary failure for the sender.
        echo(f"stored as inbound {accepted.inbound_id}; processing will be retried: {result.reason}")
        return
    if result.ticket_number is not None:
        echo(str(result.ticket_number))
    else:
        echo(f"{result.outcome}: {result.reason}")


@app.command("import")
def import_(path: Path, config: ConfigOpt = None,
            queue: Annotated[str | None, typer.Option(help="Queue address for new tickets.")] = None,
            notify: Annotated[bool, typer.Option(
                "--notify", help="Process as live mail: send confirmations, notices and answers, "
                                 "dated now (mail that arrived while the help desk was down).")] = False,
            json_out: JsonOpt = False) -> None:
    """Import an mbox file, a maildir, or a folder of one-message files.

    By default as history (a migration): tickets, notes and commands as for live mail, dated
    by each message's Date header, and nothing sent: every mail it would cause is kept in
    the outbox as 'shadow'."""
    from rich.progress import Progress

    from mailgate import spool
    from mailgate.ingest.pipeline import process_one, run_one
    from mailgate.mailsource import iter_messages

    rt = runtime_for(config)
    queue = queue_option(rt.settings, queue, 2)
    if not path.exists():
        fail(f"{path}: no such file or directory")
    outcomes: dict[str, int] = {}
    worker = spool.worker_id()
    # Rows an interrupted import (Ctrl-C, kill) left claimed: processed again below.
    spool.release_dead_claims(rt.engine)
    with Progress(transient=True, disable=json_out or not sys.stderr.isatty(),
                  console=text_console(stderr=True)) as progress:
        task = progress.add_task("importing", total=None)
        for batch in import_batches(iter_messages(path)):
            try:
                # Stored durably a batch at a time (one fsync and one commit), claimed by this
                # process in the same commit so that they are processed in mailbox order (a
                # reply after its original) even while a daemon runs; then processed one by
                # one, each in its own transaction, as the daemon does.
                accepted = spool.accept_batch(rt.spool_engine, rt.blobs,
                                              [(f"import:{key}", raw) for key, raw in batch],
                                              source="backfill" if notify else spool.HISTORY_IMPORT,
                                              queue=queue, claimed_by=worker)
            except spool.SpoolError as exc:
                fail(f"stopped: could not store {batch[0][0]} or one of the {len(batch) - 1} after it: {exc}",
                     EX_TEMPFAIL)
            for done in accepted:
                # A message an earlier import stored but did not finish is processed now.
                result = (process_one(rt, done.claimed) if done.claimed is not None
                          else run_one(rt, worker, only_id=done.inbound_id))
                name = result.outcome if result else _import_count_name(rt, done)
                outcomes[name] = outcomes.get(name, 0) + 1
                progress.advance(task)
    if json_out:
        print_json(outcomes)
    else:
        for name, n in sorted(outcomes.items()):
            echo(f"{name}: {n}")


def _import_count_name(rt: Runtime, done: Accepted) -> str:
    """How `import` counts a message it did not process now (spool.Accepted): by its row."""
    from mailgate import spool

    state, outcome = spool.state_of(rt.engine, done.inbound_id)
    if state == "done":
        return "already imported" if done.duplicate else outcome or "done"
    if state == "dead":
        return "dead"
    return "queued"  # another process (a daemon) has it, or it waits for a retry


IMPORT_BATCH_MESSAGES = 100
IMPORT_BATCH_BYTES = 32 * 2**20


def import_batches(messages: Iterable[tuple[str, bytes]]) -> Iterator[list[tuple[str, bytes]]]:
    """Messages in batches of IMPORT_BATCH_MESSAGES, or fewer once they hold
    IMPORT_BATCH_BYTES: a mailbox of large messages must not be read into memory whole."""
    batch: list[tuple[str, bytes]] = []
    size = 0
    for key, raw in messages:
        batch.append((key, raw))
        size += len(raw)
        if len(batch) >= IMPORT_BATCH_MESSAGES or size >= IMPORT_BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# --- tickets ------------------------------------------------------------------------------

STATE_STYLE = {"overdue": "bold red", "unanswered": "yellow", "answered": "green", "pending": "cyan",
               "closed": "dim"}


def _row_style(t: dict[str, Any]) -> str:
    if t["status_kind"] in ("solved", "closed"):
        return STATE_STYLE["closed"]
    if t["overdue"]:
        return STATE_STYLE["overdue"]
    if t["status_kind"] == "pending":
        return STATE_STYLE["pending"]
    return STATE_STYLE["answered"] if t["answered"] else STATE_STYLE["unanswered"]


DEFAULT_COLUMNS = "number,status,priority,owner,requester,subject,created_at"


@tickets_app.command("list")
def tickets_list(
    config: ConfigOpt = None, json_out: JsonOpt = False,
    status: Annotated[str | None, typer.Option(help="Exact status name.")] = None,
    open_: Annotated[bool, typer.Option("--open", help="new, open and pending kinds.")] = False,
    closed: Annotated[bool, typer.Option("--closed", help="solved and closed kinds.")] = False,
    overdue: Annotated[bool, typer.Option("--overdue")] = False,
    owner: Annotated[str | None, typer.Option()] = None,
    queue: Annotated[str | None, typer.Option()] = None,
    priority: Annotated[str | None, typer.Option()] = None,
    category: Annotated[str | None, typer.Option()] = None,
    requester: Annotated[str | None, typer.Option()] = None,
    since: Annotated[datetime | None, typer.Option(help="Created at or after (ISO date/time, UTC).")] = None,
    text: Annotated[str | None, typer.Option(help="Words in the subject or public messages.")] = None,
    sort: Annotated[str, typer.Option(help="One of: " + ", ".join(
        ("number", "created_at", "updated_at", "priority", "status", "owner", "first_response_due",
         "resolution_due")))] = "number",
    columns: Annotated[list[str] | None, typer.Option(
        help="Columns for the table: comma-separated, several after the flag, or the flag repeated "
             f"(default {DEFAULT_COLUMNS}).")] = None,
) -> None:
    """List tickets (colours: red overdue, yellow unanswered, green answered, cyan pending, dim closed)."""
    from mailgate.store.engine import as_utc, session_scope
    from mailgate.views import SORT_FIELDS, SUMMARY_FIELDS, TicketFilter, list_tickets, ticket_summary

    if sort not in SORT_FIELDS:
        fail(f"--sort: one of {', '.join(SORT_FIELDS)}")
    if open_ and closed:
        fail("--open and --closed: give one of them (each excludes the other's tickets)")
    cols = [c.strip() for given in (columns or [DEFAULT_COLUMNS]) for c in given.split(",") if c.strip()]
    # Checked before the query, so a wrong name is reported even when no ticket matches.
    unknown = [c for c in cols if c not in SUMMARY_FIELDS]
    if unknown:
        fail(f"--columns: unknown column {unknown[0]!r}")
    rt = runtime_for(config)
    hd = rt.settings.helpdesk
    f = TicketFilter(status=status, open=open_, closed=closed, overdue=overdue, owner=owner, queue=queue,
                     priority=priority, category=category, requester=requester,
                     since=as_utc(since) if since else None, text=text)
    with session_scope(rt.engine) as session:
        # A mistyped value would list nothing, which reads as "no such tickets". A value
        # dropped from the config that tickets still have is no typo.
        if status is not None and hd.status(status) is None and not _some_ticket_has(session, "status", status):
            fail(f"--status {status}: not a configured status ({', '.join(s.name for s in hd.statuses)}) "
                 "and no ticket has it")
        if priority is not None and priority not in hd.priorities and not _some_ticket_has(
                session, "priority", priority):
            fail(f"--priority {priority}: not a configured priority ({', '.join(hd.priorities)}) and no ticket "
                 "has it")
        rows = [ticket_summary(session, t)
                for t in list_tickets(session, f, sort, rt.settings.helpdesk.priorities)]
    if json_out:
        print_json(rows)
        return
    table = Table(show_lines=False)
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*[shown(r.get(c)) for c in cols], style=_row_style(r))
    text_console().print(table)


def _some_ticket_has(session: Any, field: str, value: str) -> bool:
    from sqlmodel import select

    from mailgate.store.tables import Ticket

    column = getattr(Ticket, field)
    return session.exec(select(Ticket.number).where(column == value).limit(1)).first() is not None


def _load_ticket(session: Any, number: int) -> Any:
    from mailgate.store.tables import Ticket

    ticket = session.get(Ticket, number)
    if ticket is None:
        fail(f"no ticket #{number}", 1)
    return ticket


@tickets_app.command("show")
def tickets_show(number: TicketNumber, config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
    """Show one ticket with its messages, rule hits and events."""
    from mailgate.store.engine import session_scope
    from mailgate.views import ticket_detail

    rt = runtime_for(config)
    with session_scope(rt.engine) as session:
        data = ticket_detail(session, _load_ticket(session, number))
    if json_out:
        print_json(data)
        return
    console = text_console()
    console.print(Text(shown(f"#{data['number']} {data['subject']}"), style="bold"))
    for key in ("status", "priority", "category", "queue", "requester", "participants", "owner", "assistants",
                "tier", "created_at", "first_response_due", "resolution_due", "overdue", "rating"):
        value = data[key]
        if isinstance(value, list):
            value = ", ".join(value) or "-"
        console.print(shown(f"  {key:20} {'-' if value is None else value}"))
    if data["from_spam"]:
        console.print(f"  {'spam':20} closed as spam (reopening it undoes that)")
    for m in data["messages"]:
        console.print(Text.assemble("\n", (shown(f"{m['created_at']} {m['kind']} {m['direction']}"), "bold"),
                                    " ", shown(m["from"])))
        console.print(shown(m["text"]))
        for a in m["attachments"]:
            console.print(shown(f"  [attachment] {a['filename']!r} {a['content_type']} {a['size']} bytes"))
        for h in m["rule_hits"]:
            console.print(Text(shown(f"  [{h['step']}] {h['reason']}"), style="dim"))
    if data["events"]:
        console.print(Text("\nevents", style="bold"))
    for e in data["events"]:
        change = f" {e['old'] or '-'} -> {e['new'] or '-'}" if e["old"] is not None or e["new"] is not None else ""
        detail = f" ({e['detail']})" if e["detail"] else ""
        console.print(shown(f"  {e['at']} {e['actor']}: {e['action']}{change}{detail}"))


@tickets_app.command("update")
def tickets_update(
    number: TicketNumber, config: ConfigOpt = None,
    status: Annotated[str | None, typer.Option()] = None,
    priority: Annotated[str | None, typer.Option()] = None,
    category: Annotated[str | None, typer.Option()] = None,
    owner: Annotated[str | None, typer.Option()] = None,
    assist: Annotated[str | None, typer.Option()] = None,
    tier: Annotated[str | None, typer.Option()] = None,
    json_out: JsonOpt = False,
) -> None:
    """Change a ticket from the command line (recorded as actor 'cli'; notices go out as by mail)."""
    from mailgate.admin import update_ticket

    rt = runtime_for(config)
    try:
        data = update_ticket(rt, number, status=status, priority=priority, category=category, owner=owner,
                             assist=assist, tier=tier)
    except ValueError as exc:
        fail(str(exc), 1)
    if json_out:
        print_json(data)
    else:
        echo(f"#{number}: " + ("; ".join(data["changes"]) or "nothing changed"))


@tickets_app.command("note")
def tickets_note(number: TicketNumber, config: ConfigOpt = None,
                 text: Annotated[str | None, typer.Option(help="Note text (default: read stdin).")] = None,
                 author: Annotated[str, typer.Option(help="Recorded author.")] = "cli") -> None:
    """Add an internal note (never sent to the requester)."""
    from mailgate.admin import add_note

    rt = runtime_for(config)
    body = text if text is not None else sys.stdin.read()
    if not body.strip():
        fail("empty note")
    try:
        add_note(rt, number, body, author)
    except ValueError as exc:
        fail(str(exc), 1)
    echo(f"#{number}: note added")


# --- outbox and dead letters -----------------------------------------------------------------

@outbox_app.command("list")
def outbox_list(config: ConfigOpt = None, json_out: JsonOpt = False,
                state: Annotated[str | None, typer.Option(help="queued, sending, sent or failed")] = None,
                limit: Annotated[int, typer.Option(min=1)] = 100) -> None:
    """Outgoing mail, newest first."""
    from sqlmodel import select

    from mailgate.store.engine import iso, session_scope
    from mailgate.store.tables import Outbox

    rt = runtime_for(config)
    with session_scope(rt.engine) as session:
        query = select(Outbox).order_by(Outbox.id.desc()).limit(limit)  # type: ignore[union-attr]
        if state:
            query = query.where(Outbox.state == state)
        rows = [{"id": r.id, "ticket": r.ticket_id, "to": r.recipients, "template": r.template,
                 "state": r.state, "attempts": r.attempts, "message_id": r.message_id,
                 "created_at": iso(r.created_at), "sent_at": iso(r.sent_at),
                 "next_attempt_at": iso(r.next_attempt_at), "last_error": r.last_error}
                for r in session.exec(query).all()]
    if json_out:
        print_json(rows)
        return
    table = Table()
    for c in ("id", "ticket", "to", "template", "state", "attempts", "last_error"):
        table.add_column(c)
    for r in rows:
        table.add_row(*[shown(r[c]) for c in ("id", "ticket", "to", "template", "state", "attempts",
                                                   "last_error")])
    text_console().print(table)


@outbox_app.command("retry")
def outbox_retry(ids: Annotated[list[int] | None, typer.Argument(
    help="Outbox ids (default: all failed).", min=1, max=MAX_ID)] = None,
                 config: ConfigOpt = None) -> None:
    """Send failed outgoing mail again."""
    from mailgate.outbox import retry_failed

    rt = runtime_for(config)
    done = retry_failed(rt.engine, ids, rt.settings.outbound.deadline_hours)
    echo(f"{len(done)} queued again")
    _fail_for_ids_not_done(ids, done, "no failed outgoing mail with this id (`mailgate outbox list`)")


def _inbound_rows(rt: Any, where: Any, limit: int) -> list[dict[str, Any]]:
    from sqlmodel import select

    from mailgate.store.engine import iso, session_scope
    from mailgate.store.tables import Inbound
    from mailgate.views import stop_reason

    with session_scope(rt.engine) as session:
        rows = session.exec(select(Inbound).where(where).order_by(Inbound.id.desc()).limit(limit)).all()  # type: ignore[union-attr]
        return [{"id": r.id, "source": r.source, "received_at": iso(r.received_at), "from": r.from_addr,
                 "subject": r.subject, "message_id": r.message_id_header, "attempts": r.attempts,
                 "outcome": r.outcome, "spam_score": r.spam_score, "size": r.size,
                 "reason": (r.last_error or "").strip().splitlines()[-1:][0] if r.last_error else
                 stop_reason(r.rule_hits), "error": r.last_error} for r in rows]


def _print_inbound(rows: list[dict[str, Any]], json_out: bool, line: str) -> None:
    if json_out:
        print_json(rows)
        return
    for r in rows:
        echo(line.format(**r))


@dead_app.command("list")
def deadletter_list(config: ConfigOpt = None, json_out: JsonOpt = False,
                    limit: Annotated[int, typer.Option(min=1)] = 100) -> None:
    """Messages kept aside after failing, with the reason."""
    from mailgate.store.tables import Inbound

    _print_inbound(_inbound_rows(runtime_for(config), Inbound.state == "dead", limit), json_out,
                   "{id:>6}  {received_at}  {source:6}  attempts={attempts}  {reason}")


@dead_app.command("retry")
def deadletter_retry(ids: Annotated[list[int] | None, typer.Argument(
    help="Inbound ids (default: all).", min=1, max=MAX_ID)] = None,
                     config: ConfigOpt = None) -> None:
    """Put dead letters back in the queue; the running daemon processes them."""
    from mailgate import spool

    rt = runtime_for(config)
    done = spool.requeue(rt.engine, ids)
    echo(f"{len(done)} requeued")
    _fail_for_ids_not_done(ids, done, "no dead letter with this id (`mailgate deadletter list`)")


def _fail_for_ids_not_done(asked: list[int] | None, done: list[int], why: str) -> None:
    """Ids the operator named that nothing was done for: each on stderr, and exit 1."""
    acted_on = set(done)
    missing = [i for i in dict.fromkeys(asked or []) if i not in acted_on]
    for inbound_id in missing:
        echo(f"mailgate: {inbound_id}: {why}", err=True)
    if missing:
        raise typer.Exit(1)


@app.command("screened")
def screened_list(config: ConfigOpt = None, json_out: JsonOpt = False,
                  limit: Annotated[int, typer.Option(min=1)] = 100) -> None:
    """Automatic mail (bounces, auto-replies) that matched no ticket, and rate-limited mail."""
    from mailgate.store.tables import Inbound

    _print_inbound(_inbound_rows(runtime_for(config), Inbound.outcome == "screened", limit), json_out,
                   "{id:>6}  {received_at}  {from}  {subject!r}  {reason}")


# --- database, doctor ----------------------------------------------------------------------------

@db_app.command("upgrade")
def db_upgrade(config: ConfigOpt = None) -> None:
    """Apply schema migrations."""
    from mailgate.store import migrate

    rt = runtime_for(config, upgrade=False)
    try:
        before = migrate.current_revision(rt.engine)
        migrate.upgrade(rt.engine)
        now = migrate.current_revision(rt.engine)
    except Exception as exc:
        fail(database_failure(rt.settings, exc), EX_TEMPFAIL)
    echo(f"database at {now} (was {before or 'empty'})")


@app.command()
def doctor(config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
    """Check config, database, outbound relay and IMAP logins; non-zero exit on any failure."""
    from mailgate.doctor import run_checks

    settings = settings_for(config)
    setup_logging(settings, "ERROR")
    checks = run_checks(settings)
    if json_out:
        print_json(checks)
    else:
        for c in checks:
            mark = {"ok": "ok  ", "warning": "WARN", "error": "FAIL"}[c["status"]]
            echo(f"[{mark}] {c['name']}: {c['detail']}")
    if any(c["status"] == "error" for c in checks):
        raise typer.Exit(1)


# --- spam filter and quarantine ----------------------------------------------------------------

DirsOpt = Annotated[list[Path], typer.Option(help="Folder of one-file messages, maildir or mbox; repeatable.")]


def _spam_progress(label: str) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=text_console(stderr=True), transient=True, disable=not sys.stderr.isatty())


def _count_sources(paths: list[Path]) -> int | None:
    """Messages in folders of files or maildirs (cheap: a directory listing); None for an mbox."""
    total = 0
    for path in paths:
        if not path.is_dir():
            return None
        dirs = [d for d in (path / "cur", path / "new") if d.is_dir()] or [path]
        total += sum(1 for d in dirs for e in d.iterdir() if not e.name.startswith(".") and e.is_file())
    return total


def _report_skipped(skipped: list[str]) -> None:
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        echo(f"mailgate: skipped {len(skipped)} file(s) that are not mail: {shown}", err=True)


def _check_sources(paths: list[Path], option: str) -> None:
    if not paths:
        fail(f"{option}: give at least one folder, maildir or mbox")
    for path in paths:
        if not path.exists():
            fail(f"{option} {path}: no such file or directory")


@spam_app.command("train")
def spam_train(
    ham: DirsOpt, spam: DirsOpt, config: ConfigOpt = None,
    out: Annotated[Path | None, typer.Option(help="Model file to write (default: the configured model, "
                                                  "spam.model_path or data_dir/spam-model.npz).")] = None,
    alpha: Annotated[float | None, typer.Option(help="Naive-Bayes smoothing (default: the shipped "
                                                    "model's choice).")] = None,
) -> None:
    """Train a new model from scratch on folders of ham and spam; the running daemon picks it up."""
    import itertools
    import time

    from mailgate.runtime import save_spam_model
    from mailgate.spamfilter import DEFAULT_ALPHA, SpamModel, read_mail_sources

    settings = settings_for(config)
    _check_sources(ham, "--ham")
    _check_sources(spam, "--spam")
    target = out or settings.spam_model_path
    try:
        model = SpamModel.empty(alpha=DEFAULT_ALPHA if alpha is None else alpha)
    except ValueError as exc:
        fail(f"--alpha: {exc}")
    counts = {"ham": 0, "spam": 0}
    skipped: list[str] = []

    def labelled(paths: list[Path], kind: str) -> Any:
        for raw in read_mail_sources(paths, skipped):
            counts[kind] += 1
            yield raw, kind == "spam"

    ham_total, spam_total = _count_sources(ham), _count_sources(spam)
    total = None if ham_total is None or spam_total is None else ham_total + spam_total
    started = time.perf_counter()
    try:
        with _spam_progress("training") as progress:
            task = progress.add_task("training", total=total)
            model.fit(itertools.chain(labelled(ham, "ham"), labelled(spam, "spam")),
                      progress=lambda n: progress.update(task, completed=n))
    except OSError as exc:
        fail(f"cannot read training mail: {exc}")
    _report_skipped(skipped)
    if not model.ready:
        fail(f"need both ham and spam to train (read {counts['ham']} ham, {counts['spam']} spam)")
    try:
        save_spam_model(model, target)
    except OSError as exc:
        fail(f"cannot write {target}: {exc}")
    seconds = time.perf_counter() - started
    echo(f"trained on {counts['ham']} ham and {counts['spam']} spam in {seconds:.1f} s; "
               f"saved {target} ({target.stat().st_size} bytes)")


@spam_app.command("eval")
def spam_eval(
    ham: DirsOpt, spam: DirsOpt, config: ConfigOpt = None, json_out: JsonOpt = False,
    threshold: Annotated[float | None, typer.Option(help="Default: spam.threshold.")] = None,
    min_known_words: Annotated[float | None, typer.Option(
        help="Default: spam.min_known_words; 0 judges mail in any language.")] = None,
) -> None:
    """Measure the configured model on labelled mail (accuracy, spam recall, ham false positives)."""
    from mailgate.runtime import load_spam_model
    from mailgate.spamfilter import ModelError, evaluate, read_mail_sources

    settings = settings_for(config)
    _check_sources(ham, "--ham")
    _check_sources(spam, "--spam")
    try:
        model = load_spam_model(settings)
    except ModelError as exc:
        fail(str(exc), 1)
    cut = settings.spam.threshold if threshold is None else threshold
    known = settings.spam.min_known_words if min_known_words is None else min_known_words
    if not 0.0 < cut <= 1.0:  # as spam.threshold; also refuses nan
        fail(f"--threshold: must be in (0, 1], got {cut}")
    if not 0.0 <= known <= 1.0:
        fail(f"--min-known-words: must be in [0, 1], got {known}")
    skipped: list[str] = []
    try:
        result = evaluate(model, read_mail_sources(ham, skipped), read_mail_sources(spam, skipped), cut, known)
        _report_skipped(skipped)
    except OSError as exc:
        fail(f"cannot read mail: {exc}")
    for option, paths, key in (("--ham", ham, "n_ham"), ("--spam", spam, "n_spam")):
        if not result[key]:
            # Accuracy over one class only, or none, would be a figure without meaning.
            fail(f"{option}: no messages in {', '.join(map(str, paths))}")
    if json_out:
        print_json(result)
        return
    echo(f"threshold {cut}, min known words {known}: {result['n_ham']} ham, {result['n_spam']} spam")
    for key in ("accuracy", "spam_recall", "ham_false_positive_rate"):
        echo(f"  {key:24} {result[key]:.4f}")


@spam_app.command("score")
def spam_score(
    file: Annotated[Path, typer.Argument(help="One raw message (.eml); '-' reads stdin.")],
    config: ConfigOpt = None, json_out: JsonOpt = False,
) -> None:
    """Score one message with the configured model."""
    from mailgate.runtime import load_spam_model
    from mailgate.spamfilter import ModelError

    settings = settings_for(config)
    try:
        raw = sys.stdin.buffer.read() if str(file) == "-" else file.read_bytes()
    except OSError as exc:
        fail(f"{file}: {exc.strerror or exc}")
    try:
        model = load_spam_model(settings)
    except ModelError as exc:
        fail(str(exc), 1)
    spam = settings.spam
    result = model.score_bytes(raw, spam.threshold, min_known_words=spam.min_known_words)
    if json_out:
        # Unrounded: near 0 and 1 the digits far out still show what learning changed.
        print_json({"score": result.score, "is_spam": result.is_spam, "known_words": result.known_words})
        return
    verdict = "spam" if result.is_spam else "ham"
    note = f"threshold {spam.threshold}"
    if result.score >= spam.threshold and not result.is_spam:
        verdict = "not held"
        note += (f"; the model knows only {result.known_words:.1%} of its words, "
                 f"below spam.min_known_words {spam.min_known_words:.1%}")
    echo(f"{result.score:.4f} {verdict} ({note})")


@quarantine_app.command("list")
def quarantine_list(config: ConfigOpt = None, json_out: JsonOpt = False,
                    limit: Annotated[int, typer.Option(min=1)] = 1000) -> None:
    """Messages held as spam (no ticket, no answer), newest first."""
    from mailgate.quarantine import list_quarantine

    rt = runtime_for(config)
    rows = list_quarantine(rt, limit=limit)
    if json_out:
        print_json(rows)
        return
    table = Table()
    for c in ("id", "received_at", "spam_score", "from", "subject"):
        table.add_column(c)
    for r in rows:
        score = "" if r["spam_score"] is None else f"{r['spam_score']:.3f}"
        table.add_row(str(r["id"]), shown(r["received_at"]), score, shown(r["from"]), shown(r["subject"]))
    text_console().print(table)


@quarantine_app.command("show")
def quarantine_show(inbound_id: Annotated[int, typer.Argument(
                        help="An id from `spam quarantine list`.", min=1, max=MAX_ID)],
                    config: ConfigOpt = None, json_out: JsonOpt = False,
                    raw: Annotated[bool, typer.Option("--raw", help="Write the message's bytes as received "
                                                      "(to save it, or to pipe to `spam score -`).")] = False) -> None:
    """One held message: why it was held, its envelope, text and attachments."""
    from mailgate.quarantine import held_message

    if raw and json_out:
        fail("--raw and --json exclude each other")
    if raw and sys.stdout.isatty():
        # The bytes as a spammer wrote them: escape sequences would reach the terminal.
        fail("--raw writes the message as received: redirect it to a file or a pipe")
    found = held_message(runtime_for(config), inbound_id)
    if isinstance(found, str):
        fail(f"{inbound_id}: {found}", 1)
    shown_row, data = found
    if raw:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    if json_out:
        print_json(shown_row)
        return
    score = "" if shown_row["spam_score"] is None else f"spam score {shown_row['spam_score']:.4f}"
    recipients = ", ".join(shown_row["envelope_to"]) or "(none recorded)"
    lines = [f"id:          {shown_row['id']}",
             f"received:    {shown_row['received_at']}",
             f"held:        {shown_row['why'] or score}",
             f"from:        {shown_row['from'] or ''}",
             f"envelope:    from <{shown_row['envelope_from'] or ''}> to {recipients}",
             f"subject:     {shown_row['subject'] or ''}",
             f"message-id:  {shown_row['message_id'] or ''}",
             f"size:        {shown_row['size']} bytes"]
    lines += [f"attachment:  {a['filename']} ({a['content_type']}, {a['size']} bytes)"
              for a in shown_row["attachments"]]
    lines += [f"defect:      {d}" for d in shown_row["defects"]]
    echo("\n".join(lines) + "\n")
    echo(shown_row["text"].rstrip("\n"))
    if shown_row["text_truncated"]:
        echo("[... the text goes on: `--raw` writes the whole message]")


@quarantine_app.command("release")
def quarantine_release(ids: Annotated[list[int], typer.Argument(
                           help="Ids from `spam quarantine list`.", min=1, max=MAX_ID)],
                       config: ConfigOpt = None) -> None:
    """Release false positives: learn each as ham and ticket it as usual (with its confirmation)."""
    from mailgate import spool
    from mailgate.ingest.pipeline import run_one
    from mailgate.quarantine import release

    rt = runtime_for(config)
    worker = spool.worker_id()
    failed = 0
    for inbound_id in ids:
        done = release(rt, inbound_id)
        if not done.ok:
            failed += 1
            echo(f"mailgate: {inbound_id}: {done.detail}", err=True)
            continue
        if done.learned:
            learned = "learned as ham"
        elif not rt.settings.spam.enabled:
            learned = "not learned (spam filter off)"
        else:
            learned = "NOT learned as ham: the spam model is unusable (see the log)"
        result = run_one(rt, worker, only_id=inbound_id)
        if result is None:
            echo(f"{inbound_id}: released, {learned}; the daemon is processing it")
        elif result.ticket_number is not None:
            echo(f"{inbound_id}: released, {learned}; ticket #{result.ticket_number} ({result.outcome})")
        else:
            echo(f"{inbound_id}: released, {learned}; {result.outcome}: {result.reason}")
    if failed:
        raise typer.Exit(1)


# Options that take several values after one flag, as DESIGN.md writes them
# (`--ham DIR...`, `--columns ...`). Click gives an option one value per occurrence, so
# `--ham a b` becomes `--ham a --ham b` before it parses.
MULTI_VALUE_OPTIONS = frozenset({"--ham", "--spam", "--columns"})


def expand_multi_value_options(argv: list[str]) -> list[str]:
    out: list[str] = []
    current: str | None = None
    for arg in argv:
        if arg == "--":
            current = None
        elif arg.startswith("-"):
            name = arg.split("=", 1)[0]
            current = name if name in MULTI_VALUE_OPTIONS and "=" not in arg else None
            out.append(arg)
            continue
        elif current is not None and out and out[-1] != current:
            out.append(current)
        out.append(arg)
    return out


def main() -> None:
    app(args=expand_multi_value_options(sys.argv[1:]), prog_name="mailgate")


if __name__ == "__main__":
    main()
