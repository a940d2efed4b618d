"""End to end: `mailgate run` as a subprocess, smtplib in, the outgoing maildir out."""

from __future__ import annotations

import re
import smtplib
import socket
import sqlite3
import time
from pathlib import Path

import pytest

from tests.conftest import (
    Daemon,
    cli,
    cli_json,
    mail,
    query_json,
    start_daemon,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.e2e


def open_ticket(daemon: Daemon, **kw: str) -> dict:
    m = mail(**kw)
    daemon.send(m)
    wait_until(lambda: daemon.tickets())
    daemon.wait_idle()
    return daemon.tickets()[-1]


def confirmation(daemon: Daemon, to: str = "carol@customer.org"):
    mails = [m for m in daemon.sent_to(to) if "registered as ticket" in m.get_body(("plain",)).get_content()]
    assert len(mails) >= 1
    return mails[-1]


def test_new_ticket_gets_confirmation_and_agents_get_notices(daemon: Daemon) -> None:
    daemon.send(mail(subject="Printer on fire", message_id="<first@customer.org>"))
    sent = daemon.wait_sent(3)
    assert len(sent) == 3  # requester confirmation + one notice to each of the two agents
    tickets = daemon.tickets()
    assert len(tickets) == 1
    t = tickets[0]
    assert t["subject"] == "Printer on fire" and t["requester"] == "carol@customer.org"
    assert t["status"] == "new" and t["priority"] == "normal"
    conf = confirmation(daemon)
    assert conf["Subject"] == f"[EXAMPLE #{t['number']}] Printer on fire"
    assert conf["In-Reply-To"] == "<first@customer.org>"
    assert conf["Auto-Submitted"] == "auto-replied"
    assert str(conf["Reply-To"]).startswith(f"support+{t['number']}-")
    assert conf.get_body(("html",)) is not None
    assert sorted(str(m["To"]) for m in sent) == ["alice@example.com", "bob@example.com", "carol@customer.org"]
    shown = daemon.ticket(t["number"])
    kinds = [(m["kind"], m["direction"]) for m in shown["messages"]]
    assert kinds == [("public", "in"), ("system", "out")]
    steps = [h["step"] for h in shown["messages"][0]["rule_hits"]]
    assert steps[:5] == ["parse", "dedupe", "screen", "identify", "spam"]
    assert any(h["step"] == "route" and "new ticket" in h["reason"] for h in shown["messages"][0]["rule_hits"])


def test_the_listener_prepends_its_received_line(daemon: Daemon) -> None:
    # RFC 5321 4.4: an SMTP server that accepts a message MUST add a trace line at its top.
    daemon.send(mail(subject="Traced", message_id="<traced@customer.org>"))
    wait_until(lambda: daemon.tickets())
    stored = [p.read_bytes() for p in (daemon.config.parent / "data").rglob("*")
              if p.is_file() and p.read_bytes().startswith(b"Received: ")]
    assert len(stored) == 1 and b"Subject: Traced" in stored[0]
    trace, rest = stored[0].split(b"\r\n", 3)[:3], stored[0].split(b"\r\n", 3)[3]
    # smtplib's EHLO names the host, or its address literal when the name has no dot.
    assert re.fullmatch(rb"Received: from [\w.\-\[\]]+ \(\[127\.0\.0\.1\]\)", trace[0])
    assert trace[1].startswith(b"\tby ") and trace[1].endswith(b"(mailgate) with ESMTP")
    assert trace[2].startswith(b"\tfor <support@example.com>; ")
    assert rest.startswith(b"From: Carol <carol@customer.org>")


def test_mail_saved_from_mbox_and_sent_by_smtp_still_becomes_a_ticket(daemon: Daemon) -> None:
    # Its mbox "From " line now sits under our Received line (the corpus is such mail).
    daemon.send(b"From carol@customer.org Thu Aug 22 12:36:23 2002\r\n" + mail(subject="From mbox").as_bytes())
    wait_until(lambda: daemon.tickets())
    assert [t["subject"] for t in daemon.tickets()] == ["From mbox"]


def test_reply_by_subject_tag(daemon: Daemon) -> None:
    t = open_ticket(daemon)
    daemon.send(mail(subject=f"Re: [EXAMPLE #{t['number']}] Printer on fire", body="Still burning."))
    wait_until(lambda: len(daemon.ticket(t["number"])["messages"]) == 3)
    assert len(daemon.tickets()) == 1
    last = daemon.ticket(t["number"])["messages"][-1]
    assert last["text"].strip() == "Still burning." and last["kind"] == "public"


def test_reply_by_references_with_tag_removed(daemon: Daemon) -> None:
    t = open_ticket(daemon)
    conf = confirmation(daemon)
    daemon.send(mail(subject="AW: Printer", body="Antwort ohne Tag.",
                     headers={"In-Reply-To": conf["Message-ID"], "References": conf["Message-ID"]}))
    wait_until(lambda: len(daemon.ticket(t["number"])["messages"]) == 3)
    assert len(daemon.tickets()) == 1


def test_reply_to_token_address_from_a_client_that_drops_everything(daemon: Daemon) -> None:
    t = open_ticket(daemon)
    reply_to = str(confirmation(daemon)["Reply-To"])
    daemon.send(mail(to=reply_to, subject="new subject entirely", body="By token."),
                recipients=[reply_to])
    wait_until(lambda: len(daemon.ticket(t["number"])["messages"]) == 3)
    hits = daemon.ticket(t["number"])["messages"][-1]["rule_hits"]
    assert any(h["step"] == "route" and "reply token" in h["reason"] for h in hits)


def test_hijack_attempt_opens_a_new_ticket_and_says_so(daemon: Daemon) -> None:
    t = open_ticket(daemon)
    daemon.send(mail(sender="mallory@evil.example", subject=f"Re: [EXAMPLE #{t['number']}] close this",
                     body="Please close it."))
    wait_until(lambda: len(daemon.tickets()) == 2)
    daemon.wait_idle()
    assert len(daemon.ticket(t["number"])["messages"]) == 2  # untouched
    mallory = daemon.sent_to("mallory@evil.example")
    assert len(mallory) == 1
    text = mallory[0].get_body(("plain",)).get_content()
    assert f"You wrote about ticket #{t['number']}" in text
    new = daemon.tickets()[-1]
    assert new["requester"] == "mallory@evil.example"


def test_run_on_an_empty_database_creates_the_schema(workdir: Path) -> None:
    # The other daemon tests start on a copy of a migrated database (conftest.migrated_sqlite).
    d = start_daemon(write_config(workdir), empty_database=True)
    try:
        d.send(mail())
        wait_until(lambda: d.tickets())
        assert "empty database: creating the schema" in d.log.read_text()
    finally:
        d.stop()


def test_same_message_twice_makes_one_ticket(daemon: Daemon) -> None:
    m = mail(message_id="<dup@customer.org>")
    daemon.send(m)
    daemon.send(m)
    wait_until(lambda: query_json(daemon.config, "tickets", "list"))
    daemon.wait_idle()
    assert len(daemon.tickets()) == 1
    assert len(daemon.ticket(daemon.tickets()[0]["number"])["messages"]) == 2  # message + confirmation


def test_auto_reply_is_stored_on_its_ticket_and_never_answered(daemon: Daemon) -> None:
    t = open_ticket(daemon)
    before = len(daemon.sent())
    conf = confirmation(daemon)
    daemon.send(mail(subject=f"Automatic reply: [EXAMPLE #{t['number']}] Printer on fire",
                     body="I am out of the office until Monday.",
                     headers={"Auto-Submitted": "auto-replied", "In-Reply-To": conf["Message-ID"]}))
    wait_until(lambda: len(daemon.ticket(t["number"])["messages"]) == 3)
    daemon.wait_idle()
    shown = daemon.ticket(t["number"])
    assert shown["messages"][-1]["kind"] == "auto"
    assert shown["status"] == t["status"]
    assert len(daemon.sent()) == before


def test_unmatched_bounce_is_screened_not_a_ticket(daemon: Daemon) -> None:
    daemon.send(mail(sender="MAILER-DAEMON@mx.example.net", subject="Undelivered Mail Returned to Sender",
                     body="This is the mail system."), sender="")
    wait_until(lambda: query_json(daemon.config, "screened"))
    daemon.wait_idle()
    assert daemon.tickets() == []
    assert daemon.sent() == []


def test_garbage_becomes_a_dead_letter_and_the_daemon_keeps_serving(daemon: Daemon) -> None:
    daemon.send(bytes(range(256)) * 4)
    wait_until(lambda: query_json(daemon.config, "deadletter", "list"))
    dead = query_json(daemon.config, "deadletter", "list")
    assert len(dead) == 1 and "unusable" in dead[0]["reason"]
    assert daemon.alive()
    open_ticket(daemon)
    assert len(daemon.tickets()) == 1


def test_recipient_check_size_limit_and_long_lines(workdir: Path) -> None:
    cfg = write_config(workdir)
    cfg.write_text(cfg.read_text().replace("[smtp]\n", "[smtp]\nmax_message_bytes = 20000\n"))
    d = start_daemon(cfg)
    try:
        with smtplib.SMTP("127.0.0.1", d.port) as smtp:
            smtp.ehlo()
            smtp.mail("carol@customer.org")
            code, _ = smtp.rcpt("someone-else@example.com")
            assert code == 550
            assert smtp.rcpt("support+anything@example.com")[0] == 250
            smtp.rset()
            # refused at MAIL (SIZE= declared) or at the end of DATA: both 552
            with pytest.raises(smtplib.SMTPResponseException) as err:
                smtp.sendmail("carol@customer.org", ["support@example.com"],
                              b"Subject: big\r\n\r\n" + b"x" * 100 + b"\r\n" + (b"y" * 70 + b"\r\n") * 400)
            assert err.value.smtp_code == 552
        long_line = b"From: carol@customer.org\r\nSubject: long line\r\nMessage-ID: <long@x>\r\n\r\n" + b"z" * 5000
        d.send(long_line)
        wait_until(lambda: d.tickets())
        assert len(d.tickets()) == 1
    finally:
        d.stop()


def test_storage_failure_answers_451_and_loses_nothing(workdir: Path) -> None:
    cfg = write_config(workdir)
    cfg.write_text(cfg.read_text().replace('[database]\n', '[database]\nbusy_timeout_seconds = 1.0\n'))
    d = start_daemon(cfg)
    try:
        d.send(mail(subject="warm up"))
        d.wait_idle()
        con = sqlite3.connect(workdir / "data" / "accept-journal.db", timeout=5, isolation_level=None)
        # On SQLite the listener commits to the acceptance journal (mailgate.journal).
        con.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(smtplib.SMTPDataError) as err:
                d.send(mail(subject="during outage"))
            assert err.value.smtp_code == 451
            assert b"Traceback" not in err.value.smtp_error and b"Error" not in err.value.smtp_error
        finally:
            con.execute("ROLLBACK")
            con.close()
        assert d.alive()
        d.send(mail(subject="after outage"))  # the sender's retry
        wait_until(lambda: len(d.tickets()) == 2)
        assert sorted(t["subject"] for t in d.tickets()) == ["after outage", "warm up"]
    finally:
        d.stop()


def test_a_broken_raw_mail_directory_delays_mail_but_loses_none(workdir: Path) -> None:
    d = start_daemon(write_config(workdir))
    try:
        d.send(mail(subject="warm up"))
        d.wait_idle()
        raw_dir = workdir / "data" / "raw"
        raw_dir.rename(workdir / "raw-away")
        raw_dir.write_bytes(b"")  # a file where the blob directory should be
        try:
            # The journal holds the bytes: the sender gets its 250; the move to the blob store
            # fails and is retried, and the journal row stays until it succeeds.
            d.send(mail(subject="during outage"))
            journal = sqlite3.connect(workdir / "data" / "accept-journal.db", timeout=5)
            wait_until(lambda: "moving accepted mail from the journal into the spool failed" in d.log.read_text())
            assert journal.execute("SELECT count(*) FROM journal").fetchone()[0] == 1
            journal.close()
        finally:
            raw_dir.unlink()
            (workdir / "raw-away").rename(raw_dir)
        assert d.alive()
        wait_until(lambda: len(d.tickets()) == 2)
        assert sorted(t["subject"] for t in d.tickets()) == ["during outage", "warm up"]
    finally:
        d.stop()


def test_lmtp_mode_answers_per_recipient(workdir: Path) -> None:
    cfg = write_config(workdir)
    cfg.write_text(cfg.read_text().replace("[smtp]\n", "[smtp]\nlmtp = true\n"))
    d = start_daemon(cfg)
    try:
        # smtplib.LMTP reads a single reply after DATA, so speak the protocol by hand (RFC 2033 4.2).
        with socket.create_connection(("127.0.0.1", d.port), timeout=30) as sock:
            f = sock.makefile("rwb")

            def reply() -> bytes:
                lines = [f.readline()]
                while lines[-1][3:4] == b"-":
                    lines.append(f.readline())
                return lines[-1]

            def say(line: bytes) -> bytes:
                f.write(line + b"\r\n")
                f.flush()
                return reply()

            assert reply().startswith(b"220")
            assert say(b"LHLO test").startswith(b"250")
            assert say(b"MAIL FROM:<carol@customer.org>").startswith(b"250")
            assert say(b"RCPT TO:<support@example.com>").startswith(b"250")
            assert say(b"RCPT TO:<nobody@example.com>").startswith(b"550")
            assert say(b"RCPT TO:<support-comment@example.com>").startswith(b"250")
            assert say(b"DATA").startswith(b"354")
            f.write(mail(subject="via lmtp").as_bytes().replace(b"\n", b"\r\n") + b".\r\n")
            f.flush()
            assert reply().startswith(b"250") and reply().startswith(b"250")  # one per accepted recipient
            assert say(b"QUIT").startswith(b"221")
        wait_until(lambda: d.tickets())
        assert len(d.tickets()) == 1
    finally:
        d.stop()


def test_envelope_bytes_that_are_not_utf8_are_stored_not_refused(daemon: Daemon) -> None:
    """aiosmtpd keeps such bytes as lone surrogates, which the journal could not store: the
    message was refused with 451 on every retry, and so was every session committed with it."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as sock:
        f = sock.makefile("rwb")

        def say(line: bytes) -> bytes:
            f.write(line + b"\r\n")
            f.flush()
            lines = [f.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(f.readline())
            return lines[-1]

        assert f.readline().startswith(b"220")
        assert say(b"EHLO test").startswith(b"250")
        assert say(b"MAIL FROM:<bad\xff@customer.org> SMTPUTF8").startswith(b"250")
        assert say(b"RCPT TO:<support+\xfe@example.com>").startswith(b"250")
        assert say(b"DATA").startswith(b"354")
        f.write(bytes(mail(subject="odd envelope")).replace(b"\n", b"\r\n") + b".\r\n")
        f.flush()
        assert f.readline().startswith(b"250")
        assert say(b"QUIT").startswith(b"221")
    wait_until(lambda: daemon.tickets())
    assert [t["subject"] for t in daemon.tickets()] == ["odd envelope"]


def test_sigterm_stops_cleanly(daemon: Daemon) -> None:
    open_ticket(daemon)
    t0 = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - t0 < 30


def test_sigterm_with_an_idle_client_connected_answers_it_421_and_stops(daemon: Daemon) -> None:
    """An MTA keeps idle connections (Postfix caches LMTP ones). From Python 3.12 on, waiting
    for the server to close waited for them too, and systemd killed the daemon mid-drain."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=20) as sock:
        f = sock.makefile("rwb")
        assert f.readline().startswith(b"220")
        f.write(b"EHLO client.example\r\n")
        f.flush()
        while f.readline()[3:4] == b"-":
            pass
        assert daemon.stop() == 0
        assert f.readline() == b"421 4.3.2 Service shutting down\r\n"
    assert "stopped" in daemon.log.read_text()


def test_ingest_exit_codes(workdir: Path) -> None:
    cfg = write_config(workdir)
    ok = cli(cfg, "ingest", input=mail(subject="by pipe").as_bytes())
    assert ok.stdout.decode().strip() == "1"
    bad = cli(cfg, "ingest", input=b"\x00\x01\x02 not mail", check=False)
    assert bad.returncode == 65
    assert len(cli_json(cfg, "deadletter", "list")) == 1
    con = sqlite3.connect(workdir / "mailgate.db", timeout=5, isolation_level=None)
    cfg.write_text(cfg.read_text().replace('[database]\n', '[database]\nbusy_timeout_seconds = 1.0\n'))
    con.execute("BEGIN EXCLUSIVE")
    try:
        busy = cli(cfg, "ingest", input=mail(subject="locked").as_bytes(), check=False)
        assert busy.returncode == 75, busy.stderr
    finally:
        con.execute("ROLLBACK")
        con.close()
    # A database that is not there: 75, in one line (an MTA mails stderr back in its bounce),
    # though psycopg's own text runs over three.
    down = write_config(workdir / "down", database="postgresql+psycopg://nobody@127.0.0.1:9/none")
    gone = cli(down, "ingest", input=mail(subject="db down").as_bytes(), check=False)
    assert gone.returncode == 75 and len(gone.stderr.decode().strip().splitlines()) == 1, gone.stderr


def test_ingest_prints_the_ticket_of_a_redelivery_and_refuses_a_queue_not_ours(workdir: Path) -> None:
    cfg = write_config(workdir, helpdesk_extra='queues = ["billing@example.com"]')
    raw = mail(subject="by pipe", message_id="<pipe-1@customer.org>").as_bytes()
    assert cli(cfg, "ingest", "--queue", "Billing@Example.com", input=raw).stdout.decode().strip() == "1"
    # The MTA delivers it again (a lost 250, a retried pipe): the same ticket, printed as such.
    assert cli(cfg, "ingest", "--queue", "billing@example.com", input=raw).stdout.decode().strip() == "1"
    assert [t["queue"] for t in cli_json(cfg, "tickets", "list")] == ["billing@example.com"]
    # A typo in the pipe line: deferred (75), not stored, not put in the default queue.
    typo = cli(cfg, "ingest", "--queue", "bil1ing@example.com", input=mail(subject="typo").as_bytes(),
               check=False)
    assert typo.returncode == 75
    assert typo.stderr.decode().strip() == (
        "mailgate: --queue bil1ing@example.com: not one of our addresses (helpdesk.address, comment_address, queues)")
    imported = cli(cfg, "import", "--queue", "sales@example.com", str(workdir), check=False)
    assert imported.returncode == 2 and "not one of our addresses" in imported.stderr.decode()
    con = sqlite3.connect(workdir / "mailgate.db")
    assert con.execute("select count(*) from inbound").fetchone() == (2,)
    con.close()
    # Any of our addresses is fine: the comment address of a per-address pipe, and the plus
    # form Postfix's ${recipient} gives.
    for queue in ("support-comment@example.com", "support+1-abcd@example.com"):
        assert cli(cfg, "ingest", "--queue", queue, input=mail(subject=queue).as_bytes()).returncode == 0


def test_ingest_queue_is_the_envelope_recipient_so_a_bcc_to_the_comment_address_is_a_note(
        workdir: Path) -> None:
    """An agent Bccs the comment address, whose pipe names it with --queue: a note. Read
    from the headers alone, it was an answer, and the note went to the customer."""
    cfg = write_config(workdir, helpdesk_extra='trusted_authserv_ids = ["mx.example.com"]')
    cli(cfg, "ingest", input=mail(subject="Printer on fire").as_bytes())
    note = mail(sender="Alice <alice@example.com>", to="alice@example.com", subject="Re: [EXAMPLE #1] Printer on fire",
                body="Internal: NOTE-MARKER owes us three invoices.",
                headers={"Authentication-Results": "mx.example.com; dkim=pass header.d=example.com"})
    cli(cfg, "ingest", "--queue", "support-comment@example.com", input=note.as_bytes())
    messages = cli_json(cfg, "tickets", "show", "1")["messages"]
    assert [m["kind"] for m in messages if "NOTE-MARKER" in m["text"]] == ["internal"]
    assert [r["template"] for r in cli_json(cfg, "outbox", "list") if r["to"] == "carol@customer.org"] == [
        "requester/created"]


def test_a_port_in_use_stops_the_daemon_with_one_line(workdir: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = write_config(workdir, smtp_port=taken.getsockname()[1])
        proc = cli(cfg, "run", check=False, timeout=60)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.decode().splitlines() if "mailgate" in line and " INFO " not in line]
    assert len(lines) == 1 and lines[0].startswith("mailgate: cannot start:") and "in use" in lines[0], lines


def test_bad_config_is_one_line_naming_the_key(workdir: Path) -> None:
    cfg = write_config(workdir)
    cfg.write_text(cfg.read_text().replace('port = ', 'port = "x" #'))
    proc = cli(cfg, "run", check=False)
    assert proc.returncode == 2
    err = proc.stderr.decode().strip()
    assert "\n" not in err and "smtp.port" in err and "Traceback" not in err


def test_dead_letter_list_names_sender_and_subject(workdir: Path) -> None:
    cfg = write_config(workdir)
    two_from = (b"From: a@customer.org\r\nFrom: b@customer.org\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n"
                b"Message-ID: <two-from@customer.org>\r\n\r\nbody\r\n")
    assert cli(cfg, "ingest", input=two_from, check=False).returncode == 65
    dead = cli_json(cfg, "deadletter", "list")
    assert len(dead) == 1
    assert dead[0]["from"] == "a@customer.org" and dead[0]["subject"] == "café"
    assert dead[0]["message_id"] == "two-from@customer.org"
    assert "From" in dead[0]["reason"]


def test_a_killed_work_process_is_restarted_and_nothing_is_lost(daemon: Daemon) -> None:
    import os
    import signal as _signal

    def work_pids() -> list[int]:
        tasks = Path(f"/proc/{daemon.proc.pid}/task")
        return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]

    first = wait_until(work_pids)
    assert len(first) == 1  # one child: the work process (no multiprocessing helpers)
    os.kill(first[0], _signal.SIGKILL)
    daemon.send(mail(subject="while the worker was down"))  # accepted by the main process alone
    wait_until(lambda: daemon.tickets(), timeout=30)
    assert [t["subject"] for t in daemon.tickets()] == ["while the worker was down"]
    assert daemon.alive() and work_pids() != first


def work_and_helpers(daemon: Daemon, count: int = 1) -> tuple[int, list[int]] | None:
    """(work process, its parse-ahead helpers), once it has `count` of them."""
    for task in Path(f"/proc/{daemon.proc.pid}/task").iterdir():
        for work in (task / "children").read_text().split():
            helpers = [int(c) for t in Path(f"/proc/{work}/task").iterdir()
                       for c in (t / "children").read_text().split()]
            if len(helpers) >= count:
                return int(work), helpers
    return None


def work_and_helper_pids(daemon: Daemon) -> tuple[int, int] | None:
    """(work process, its parse-ahead helper), once both are there."""
    found = work_and_helpers(daemon)
    return (found[0], found[1][0]) if found is not None else None


def test_a_killed_parse_helper_restarts_the_work_process_and_nothing_is_lost(daemon: Daemon) -> None:
    import os
    import signal as _signal

    # Once it is running (a helper that dies while the work process starts is the same
    # story, told from start-up instead).
    wait_until(lambda: "parse-ahead helper process(es) started" in daemon.log.read_text())
    first = wait_until(lambda: work_and_helper_pids(daemon))
    os.kill(first[1], _signal.SIGKILL)  # as a message that crashed the interpreter would
    for i in range(3):
        daemon.send(mail(subject=f"after the helper died {i}"))
    wait_until(lambda: len(daemon.tickets()) == 3, timeout=60)
    assert sorted(t["subject"] for t in daemon.tickets()) == [f"after the helper died {i}" for i in range(3)]
    second = wait_until(lambda: work_and_helper_pids(daemon))
    assert daemon.alive() and second[0] != first[0] and second[1] != first[1]
    with sqlite3.connect(daemon.config.parent / "mailgate.db") as db:
        attempts = [n for (n,) in db.execute("SELECT attempts FROM inbound ORDER BY id")]
    # The helper died while idle: the batch that found the pool broken was never parsed,
    # and gets its attempts back.
    assert attempts == [1, 1, 1]
    assert "parse-ahead helper process died" in daemon.log.read_text()


def test_a_stuck_parse_helper_is_killed_and_its_message_retried(workdir: Path) -> None:
    import os
    import signal as _signal

    d = start_daemon(write_config(workdir, helpdesk_extra="parse_timeout_seconds = 2"))
    try:
        wait_until(lambda: "parse-ahead helper process(es) started" in d.log.read_text())
        first = wait_until(lambda: work_and_helper_pids(d))
        # Three messages wait while the work process is paused, so that one batch claims them
        # all; then its helper hangs on the first, as a parse that never ends would leave it.
        os.kill(first[0], _signal.SIGSTOP)
        os.kill(first[1], _signal.SIGSTOP)
        for i in range(3):
            d.send(mail(subject=f"parsed by a stuck helper {i}"))
        os.kill(first[0], _signal.SIGCONT)
        wait_until(lambda: "parsing took longer than 2 s" in d.log.read_text(), timeout=30)
        with sqlite3.connect(workdir / "mailgate.db") as db:
            (error,) = db.execute("SELECT last_error FROM inbound WHERE id = 1").fetchone()
        assert "parsing took longer than 2 s" in error
        # The stuck helper is gone (killed, not waited for), a new pair works, and every
        # message is processed: nothing lost.
        wait_until(lambda: not Path(f"/proc/{first[1]}").exists(), timeout=30)
        wait_until(lambda: len(d.tickets()) == 3, timeout=60)
        second = wait_until(lambda: work_and_helper_pids(d))
        assert d.alive() and second[0] != first[0]
        with sqlite3.connect(workdir / "mailgate.db") as db:
            attempts = [n for (n,) in db.execute("SELECT attempts FROM inbound ORDER BY id")]
        # Only the message it hung on is charged an attempt; the rest of its batch were given back.
        assert attempts == [2, 1, 1]
    finally:
        d.stop()


def test_a_pool_broken_beside_a_stuck_helper_does_not_hang_the_work_process(workdir: Path) -> None:
    # Two helpers: one stuck, the other dies. The pool's shutdown would wait for the stuck
    # one for ever (helpers ignore SIGTERM): the work process kills them and restarts.
    import os
    import signal as _signal

    d = start_daemon(write_config(workdir, helpdesk_extra="parse_processes = 2"))
    try:
        wait_until(lambda: "2 parse-ahead helper process(es) started" in d.log.read_text())
        work, (stuck, dying) = wait_until(lambda: work_and_helpers(d, 2))
        os.kill(stuck, _signal.SIGSTOP)
        os.kill(dying, _signal.SIGKILL)
        d.send(mail(subject="after the pool broke"))
        wait_until(lambda: [t["subject"] for t in d.tickets()] == ["after the pool broke"], timeout=60)
        assert not Path(f"/proc/{stuck}").exists() and d.alive()
    finally:
        d.stop()
