"""IMAP intake benchmark (run by hand, never in CI).

    python bench/imap_ingest.py [--count 2000] [--batch-sizes 20,50,200] [--no-daemon]

Real mail from ../shared/corpus/spamassassin is appended into a throwaway
Dovecot (tests/imapserver.py). Printed, all in the same run on the same mail:

1. reference: a bare aioimaplib session doing UID FETCH BODY.PEEK[] of the
   whole mailbox, per batch size (what any IMAP client must pay);
   and spool.accept of the same mail with no IMAP at all (what any transport
   must pay: fsynced blob + SQLite commit per message);
2. ImapPoller.poll_once (no pipeline): fetch + size check + spool.accept
   (fsynced blob + SQLite commit per message) + UID MOVE, per batch size;
3. unless --no-daemon: `mailgate run` with an [[imap]] account, time from the
   moment the mail lands in the watched folder until every message is
   processed (tickets), beside the same mail sent to the SMTP listener of a
   second daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import smtplib
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aioimaplib  # noqa: E402

from mailgate.store.blobs import BlobStore  # noqa: E402
from mailgate.store.engine import make_engine  # noqa: E402
from mailgate.store.migrate import upgrade  # noqa: E402
from mailgate.transport.imap import ImapPoller, parse_bodies, uid_set  # noqa: E402
from tests.imapserver import Dovecot, start_dovecot  # noqa: E402

CORPUS = ROOT.parent / "shared" / "corpus" / "spamassassin"


def load_corpus(count: int) -> list[bytes]:
    files: list[Path] = []
    for sub in ("spam-1", "hard-ham-1", "easy-ham-1"):
        files += sorted((CORPUS / sub).iterdir())
    out = []
    for p in files[:count]:
        raw = p.read_bytes()
        # IMAP literals are CRLF text; the corpus files are Unix LF.
        out.append(raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    if len(out) < count:
        raise SystemExit(f"only {len(out)} messages in {CORPUS}")
    return out


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:8.0f} msg/s  ({seconds:6.2f} s)"


async def raw_fetch(server: Dovecot, user: str, batch: int) -> tuple[int, float]:
    c = aioimaplib.IMAP4(server.host, server.port, timeout=60)
    await c.wait_hello_from_server()
    await c.login(user, server.password)
    t0 = time.perf_counter()
    await c.examine("INBOX")
    c.protocol.state = aioimaplib.SELECTED
    resp = await c.uid_search("ALL", charset=None)
    uids = [int(x) for x in resp.lines[0].split()]
    got = 0
    for i in range(0, len(uids), batch):
        r = await c.uid("fetch", uid_set(uids[i:i + batch]), "(UID BODY.PEEK[])")
        got += len(parse_bodies(r.lines))
    elapsed = time.perf_counter() - t0
    await c.logout()
    return got, elapsed


def poller_run(server: Dovecot, user: str, batch: int, work: Path) -> tuple[int, float]:
    engine = make_engine("sqlite:///" + str(work / f"b{batch}.db"))
    upgrade(engine)
    account = server.account(user, batch_size=batch)
    poller = ImapPoller(account, engine, BlobStore(work / f"raw{batch}"))
    t0 = time.perf_counter()
    n = asyncio.run(poller.poll_once())
    elapsed = time.perf_counter() - t0
    engine.dispose()
    return n, elapsed


def accept_only(mails: list[bytes], work: Path, tag: str) -> float:
    """spool.accept of the same mail without IMAP: the floor any transport pays."""
    from mailgate import spool

    engine = make_engine("sqlite:///" + str(work / f"a{tag}.db"))
    upgrade(engine)
    blobs = BlobStore(work / f"araw{tag}")
    t0 = time.perf_counter()
    for i, raw in enumerate(mails):
        spool.accept(engine, blobs, raw, source="imap", source_key=f"bench:{i}")
    elapsed = time.perf_counter() - t0
    engine.dispose()
    return elapsed


# ----------------------------------------------------------------- daemon


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(directory: Path, smtp_port: int, imap: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.toml"
    path.write_text(f"""
[database]
url = "sqlite:///mailgate.db"
[smtp]
host = "127.0.0.1"
port = {smtp_port}
[outbound]
url = "maildir:sent"
[helpdesk]
address = "support@example.com"
comment_address = "support-comment@example.com"
subject_tag = "BENCH"
secret_key = "bench-secret-key-0123456789"
data_dir = "data"
worker_poll_seconds = 0.2
new_tickets_per_sender_per_hour = 100000
[spam]
enabled = false
[[agents]]
email = "alice@example.com"
name = "Alice"
role = "admin"
groups = ["L1"]
{imap}
""")
    return path


def start_daemon(config: Path, port: int) -> subprocess.Popen[bytes]:
    log = open(config.parent / "daemon.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([sys.executable, "-m", "mailgate.cli", "run", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=config.parent)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit((config.parent / "daemon.log").read_text()[-2000:])
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    raise SystemExit("daemon did not start")


def counts(config: Path) -> tuple[int, int, int]:
    """(inbound rows, processed rows, tickets)."""
    try:
        con = sqlite3.connect(config.parent / "mailgate.db", timeout=10)
        try:
            total = con.execute("select count(*) from inbound").fetchone()[0]
            done = con.execute("select count(*) from inbound where state in ('done','dead')").fetchone()[0]
            tickets = con.execute("select count(*) from ticket").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0, 0, 0
    return int(total), int(done), int(tickets)


def wait_processed(config: Path, n: int, t0: float, timeout: float = 180) -> tuple[float, float, int]:
    """Seconds from t0 until all n are accepted, until all are processed; tickets made."""
    accepted_at = None
    while True:
        total, done, tickets = counts(config)
        if accepted_at is None and total >= n:
            accepted_at = time.perf_counter() - t0
        if done >= n:
            return accepted_at or time.perf_counter() - t0, time.perf_counter() - t0, tickets
        if time.perf_counter() - t0 > timeout:
            con = sqlite3.connect(config.parent / "mailgate.db", timeout=10)
            stuck = con.execute("select id, state, attempts, claimed_by, claimed_at, next_attempt_at, "
                                "substr(last_error, 1, 300) from inbound where state not in ('done','dead')").fetchall()
            con.close()
            log = (config.parent / "daemon.log")
            raise SystemExit(f"timed out: {total} accepted, {done} processed of {n}; not processed: {stuck}\n"
                             + (log.read_text()[-3000:] if log.exists() else ""))
        time.sleep(0.1)


def daemon_imap(server: Dovecot, mails: list[bytes], work: Path, batch: int) -> tuple[float, float, int]:
    user = server.new_user()
    server.create_folder(user, "Staging", "Watched")
    server.append_many(user, mails, folder="Staging")
    port = free_port()
    imap = f"""
[[imap]]
name = "bench"
host = "{server.host}"
port = {server.port}
tls = "none"
username = "{user}"
password = "{server.password}"
folder = "Watched"
batch_size = {batch}
poll_seconds = 60
"""
    config = write_config(work / f"imap{batch}", port, imap)
    proc = start_daemon(config, port)
    try:
        time.sleep(1.0)  # let the poller connect and IDLE
        t0 = time.perf_counter()
        # One maildir rename per message, much faster than the intake: the
        # clock measures mailgate, not the injection.
        server.doveadm("move", "-u", user, "Watched", "mailbox", "Staging", "all")
        accepted, processed, tickets = wait_processed(config, len(mails), t0)
    finally:
        proc.terminate()
        proc.wait(30)
    return accepted, processed, tickets


def daemon_smtp(mails: list[bytes], work: Path) -> tuple[float, float, int]:
    port = free_port()
    config = write_config(work / "smtp", port)
    proc = start_daemon(config, port)
    try:
        t0 = time.perf_counter()
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
            for raw in mails:
                smtp.sendmail("sender@example.org", ["support@example.com"], raw)
        accepted, processed, tickets = wait_processed(config, len(mails), t0)
    finally:
        proc.terminate()
        proc.wait(30)
    return accepted, processed, tickets


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--batch-sizes", default="20,50,200")
    ap.add_argument("--daemon-batch", type=int, default=50)
    ap.add_argument("--no-daemon", action="store_true")
    args = ap.parse_args()
    batches = [int(x) for x in args.batch_sizes.split(",")]
    mails = load_corpus(args.count)
    n = len(mails)
    size = sum(map(len, mails))
    print(f"{n} messages, {size / 1e6:.1f} MB, from {CORPUS}")
    server = start_dovecot()
    work = Path(tempfile.mkdtemp(prefix="mgbench."))
    try:
        t0 = time.perf_counter()
        ref_user = server.new_user()
        server.append_many(ref_user, mails)
        print(f"setup: APPEND of {n} messages over one connection: {rate(n, time.perf_counter() - t0)}")
        print("\nbatch  raw aioimaplib UID FETCH     spool.accept alone (no IMAP)  "
              "ImapPoller.poll_once (fetch+accept+MOVE)  poller/accept-alone")
        for batch in batches:
            got, raw_s = asyncio.run(raw_fetch(server, ref_user, batch))
            assert got == n, got
            user = server.new_user()
            server.append_many(user, mails)
            acc_s = accept_only(mails, work, str(batch))
            accepted, poll_s = poller_run(server, user, batch, work)
            assert accepted == n and server.count(user, "Processed") == n
            print(f"{batch:5d}  {rate(n, raw_s)}  {rate(n, acc_s)}  {rate(n, poll_s)}"
                  f"          {acc_s / poll_s:5.2f}")
        if not args.no_daemon:
            print(f"\n`mailgate run` end to end (batch_size {args.daemon_batch}, spam filter off):")
            acc, proc_s, tickets = daemon_imap(server, mails, work, args.daemon_batch)
            print(f"  IMAP: all accepted {rate(n, acc)}; all processed {rate(n, proc_s)}; "
                  f"{tickets} tickets")
            sacc, sproc, stickets = daemon_smtp(mails, work)
            print(f"  SMTP: all accepted {rate(n, sacc)}; all processed {rate(n, sproc)}; "
                  f"{stickets} tickets")
            print(f"  IMAP/SMTP end-to-end rate: {sproc / proc_s:.2f}")
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
