"""Shared fixtures: configs written per test, `mailgate run` as a subprocess,
a capture relay on loopback, and the public corpus beside the checkout."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["tests.imapserver"]

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
CORPUS = REPO.parent / "shared" / "corpus" / "spamassassin"
IN_CI = os.environ.get("CI") == "true"
MAILGATE = [sys.executable, "-m", "mailgate.cli"]


def need(condition: bool, reason: str) -> None:
    """Skip with a reason, or fail in CI where every server and file must be present."""
    if not condition:
        if IN_CI:
            pytest.fail(f"required in CI: {reason}")
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


AGENTS = """
[[agents]]
email = "alice@example.com"
name = "Alice"
role = "admin"
groups = ["L1"]

[[agents]]
email = "bob@example.com"
name = "Bob"
role = "agent"
groups = ["L1", "L2"]
"""


def write_config(directory: Path, *, smtp_port: int | None = None, outbound: str = "maildir:sent",
                 database: str = "sqlite:///mailgate.db", extra: str = "", agents: str = AGENTS,
                 helpdesk_extra: str = "", spam_enabled: bool = False, spam_extra: str = "") -> Path:
    """A complete config for one test. The spam filter is off unless a test is about it."""
    directory.mkdir(parents=True, exist_ok=True)
    text = f"""
[database]
url = "{database}"

[smtp]
host = "127.0.0.1"
port = {smtp_port or free_port()}

[outbound]
url = "{outbound}"
poll_seconds = 0.2
retry_base_seconds = 0.5

[helpdesk]
address = "support@example.com"
comment_address = "support-comment@example.com"
subject_tag = "EXAMPLE"
secret_key = "test-secret-key-0123456789"
data_dir = "data"
name = "Example Support"
worker_poll_seconds = 0.2
{helpdesk_extra}

[spam]
enabled = {"true" if spam_enabled else "false"}
{spam_extra}

{agents}
{extra}
"""
    path = directory / "config.toml"
    path.write_text(text)
    return path


def cli(config: Path, *args: str, input: bytes | None = None, check: bool = True,
        timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run([*MAILGATE, *args, "--config", str(config)], input=input,
                          capture_output=True, timeout=timeout, cwd=config.parent)
    if check and proc.returncode != 0:
        raise AssertionError(f"mailgate {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout.decode()}\n{proc.stderr.decode()}")
    return proc


def cli_json(config: Path, *args: str) -> Any:
    return json.loads(cli(config, *args, "--json").stdout)


def query_json(config: Path, *args: str) -> Any:
    """A read-only `mailgate ... --json` query (tickets, outbox, screened, dead letters,
    quarantine, spam score), run in this process. End-to-end tests poll these while the
    daemon works, and a subprocess spends 1-2 s importing before it answers: two thirds of
    those tests' time. The commands' exit codes and one-line errors are tested through a
    real process (cli)."""
    from typer.testing import CliRunner

    from mailgate.cli import app

    result = CliRunner().invoke(app, [*args, "--json", "--config", str(config)], catch_exceptions=False)
    if result.exit_code != 0:
        raise AssertionError(f"mailgate {' '.join(args)} exited {result.exit_code}:\n{result.output}")
    return json.loads(result.stdout)


def mail(*, sender: str = "Carol <carol@customer.org>", to: str = "support@example.com",
         subject: str = "Printer on fire", body: str = "Hello, my printer is on fire.",
         message_id: str | None = None, headers: dict[str, str] | None = None) -> EmailMessage:
    m = EmailMessage()
    m["From"] = sender
    m["To"] = to
    m["Subject"] = subject
    m["Message-ID"] = message_id or f"<{time.time_ns()}.{os.getpid()}@customer.org>"
    for k, v in (headers or {}).items():
        m[k] = v
    m.set_content(body)
    return m


def sent_messages(maildir: Path) -> list[EmailMessage]:
    new = maildir / "new"
    if not new.is_dir():
        return []
    return [message_from_bytes(p.read_bytes(), policy=policy.default)  # type: ignore[misc]
            for p in sorted(new.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name))]


@dataclass
class Daemon:
    config: Path
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def maildir(self) -> Path:
        return self.config.parent / "sent"

    def send(self, message: EmailMessage | bytes, *, sender: str | None = None,
             recipients: list[str] | None = None) -> None:
        import smtplib

        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as smtp:
            if isinstance(message, bytes):
                smtp.sendmail(sender or "carol@customer.org", recipients or ["support@example.com"], message)
            else:
                smtp.send_message(message, from_addr=sender, to_addrs=recipients)

    def tickets(self, *args: str) -> list[dict[str, Any]]:
        return query_json(self.config, "tickets", "list", *args)

    def ticket(self, number: int) -> dict[str, Any]:
        return query_json(self.config, "tickets", "show", str(number))

    def sent(self) -> list[EmailMessage]:
        return sent_messages(self.maildir)

    def sent_to(self, address: str) -> list[EmailMessage]:
        return [m for m in self.sent() if address in str(m["To"])]

    def wait_sent(self, count: int, timeout: float = 20) -> list[EmailMessage]:
        wait_until(lambda: len(self.sent()) >= count, timeout)
        time.sleep(0.3)  # let a surplus mail show up, so exact counts mean something
        return self.sent()

    def wait_idle(self, timeout: float = 30) -> None:
        """Until the acceptance journal is empty, the spool has no queued or processing rows,
        and the outbox nothing queued."""
        import sqlite3

        db = self.config.parent / "mailgate.db"
        journal = self.config.parent / "data" / "accept-journal.db"

        def count(path: Path, query: str) -> int:
            if not path.exists():
                return 0
            con = sqlite3.connect(path, timeout=5)
            try:
                return int(con.execute(query).fetchone()[0])
            finally:
                con.close()

        def idle() -> bool:
            try:
                return (count(journal, "select count(*) from journal") == 0
                        and count(db, "select count(*) from inbound where state in ('queued','processing')") == 0
                        and count(db, "select count(*) from outbox where state in ('queued','sending')") == 0)
            except sqlite3.Error:
                return False

        wait_until(idle, timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


_SCHEMA_TEMPLATE: dict[str, bytes] = {}


def migrated_sqlite() -> bytes:
    """An empty SQLite database with the schema at head, made once per test run. Creating
    the schema costs a daemon about 2 s of start-up (Alembic in a child process);
    test_run_on_an_empty_database_creates_the_schema starts on an empty one."""
    if "db" not in _SCHEMA_TEMPLATE:
        from mailgate.store import migrate
        from mailgate.store.engine import make_engine

        folder = Path(tempfile.mkdtemp(prefix="mg.schema."))
        engine = make_engine(f"sqlite:///{folder / 'template.db'}")
        migrate.upgrade(engine)
        engine.dispose()  # the last connection checkpoints the WAL into the file
        _SCHEMA_TEMPLATE["db"] = (folder / "template.db").read_bytes()
        shutil.rmtree(folder, ignore_errors=True)
    return _SCHEMA_TEMPLATE["db"]


def start_daemon(config: Path, port: int | None = None, *, empty_database: bool = False) -> Daemon:
    import tomllib

    settings = tomllib.loads(config.read_text())
    port = port or settings["smtp"]["port"]
    database = config.parent / "mailgate.db"
    if not empty_database and settings["database"]["url"] == "sqlite:///mailgate.db" and not database.exists():
        database.write_bytes(migrated_sqlite())
    log = config.parent / "daemon.log"
    fh = open(log, "ab")  # noqa: SIM115 - handed to the child process
    proc = subprocess.Popen([*MAILGATE, "run", "--config", str(config)], stdout=fh, stderr=subprocess.STDOUT,
                            cwd=config.parent)
    daemon = Daemon(config=config, port=port, proc=proc, log=log)

    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"mailgate run exited {proc.returncode}:\n{log.read_text()}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, timeout=60)
    return daemon


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short paths: unix sockets and maildir names stay well inside limits.
    path = Path(tempfile.mkdtemp(prefix="mg."))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(workdir: Path) -> Iterator[Daemon]:
    d = start_daemon(write_config(workdir))
    yield d
    d.stop()


@dataclass
class CaptureRelay:
    """An SMTP server on loopback that keeps what it receives (the 'relay' we send to)."""

    port: int
    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    fail_with: str | None = None  # e.g. "451 4.3.0 try later": refuse DATA with this
    fail_mail_from: str | None = None  # e.g. "530 5.7.0 Must issue a STARTTLS command first"
    fail_rcpt: str | None = None  # e.g. "554 5.7.1 <x@y>: Relay access denied"
    data_seconds: float = 0.0  # a slow relay: seconds before it answers DATA
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        if self.fail_mail_from:
            return self.fail_mail_from
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if self.fail_rcpt:
            return self.fail_rcpt
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_seconds:
            await asyncio.sleep(self.data_seconds)
        if self.fail_with:
            return self.fail_with
        with self.lock:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 OK"

    def parsed(self) -> list[EmailMessage]:
        with self.lock:
            return [message_from_bytes(raw, policy=policy.default) for _, _, raw in self.messages]  # type: ignore[misc]


@pytest.fixture
def relay() -> Iterator[CaptureRelay]:
    from aiosmtpd.controller import Controller

    port = free_port()
    capture = CaptureRelay(port=port)
    controller = Controller(capture, hostname="127.0.0.1", port=port)
    controller.start()
    yield capture
    controller.stop()


@pytest.fixture
def corpus() -> Path:
    need(CORPUS.is_dir(), f"public corpus not found at {CORPUS}")
    return CORPUS


def ticket_with_first_message(rt: Any, raw: bytes, *, status: str = "new", from_spam: bool = False) -> int:
    """A ticket from dave@pitch.example whose first incoming message is `raw`, stored
    directly (no pipeline): for tests of what agents do to a ticket afterwards."""
    from mailgate.store.engine import session_scope, utcnow
    from mailgate.store.tables import Contact, Message, Ticket

    with session_scope(rt.engine) as session:
        contact = Contact(email="dave@pitch.example", name="Dave", created_at=utcnow())
        session.add(contact)
        session.flush()
        ticket = Ticket(subject="Quick question", requester_id=contact.id, queue="support@example.com",
                        status=status, status_kind=status, from_spam=from_spam, created_at=utcnow(),
                        updated_at=utcnow())
        session.add(ticket)
        session.flush()
        session.add(Message(ticket_id=ticket.number, kind="public", direction="in", from_addr="dave@pitch.example",
                            raw_sha256=rt.blobs.put(raw), created_at=utcnow()))
        assert ticket.number is not None
        return ticket.number
