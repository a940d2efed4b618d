"""A real Dovecot IMAP server for tests (pytest plugin).

Register with ``pytest_plugins = ["tests.imapserver"]``. Fixtures:

- ``dovecot`` (session): one Dovecot 2.3 on loopback with a plaintext+STARTTLS
  port and an imaps port, certificate from a throwaway trustme CA.
- ``imap_user`` (function): a fresh user with an empty maildir, so tests do not
  see each other's mail while sharing one server.

Follows ../shared/notes/dovecot-for-tests.md: short temp dir (unix socket
paths are limited to ~108 bytes), free ports, unprivileged via setpriv when
run as root. A missing dovecot binary fails in CI and skips elsewhere.
"""

from __future__ import annotations

import contextlib
import imaplib
import itertools
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


def _binary(name: str, fallback: str) -> str | None:
    # /usr/sbin is often missing from PATH for non-root users.
    return shutil.which(name) or (fallback if Path(fallback).exists() else None)


DOVECOT = _binary("dovecot", "/usr/sbin/dovecot")
DOVEADM = _binary("doveadm", "/usr/bin/doveadm")
PASSWORD = "secret"

_CONF = """\
instance_name = mailgate-test-{tag}
base_dir = {root}/run
state_dir = {root}/lib
log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = yes
ssl_cert = <{root}/cert.pem
ssl_key = <{root}/key.pem
{ssl_dh}
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
default_internal_user = {user}
default_internal_group = {group}
default_login_user = {user}
mail_location = maildir:~/Maildir
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={user} gid={group} home={root}/home/%n
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {ssl_port}
  }}
}}
service anvil {{
  chroot =
  # No auth penalty: tests log in with wrong passwords on purpose, and the
  # penalty (per IP, up to 15 s) would slow every later login from 127.0.0.1.
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Dovecot:
    """A running Dovecot and helpers to look into / change its mailboxes."""

    root: Path
    port: int
    ssl_port: int
    ca_file: Path
    host: str = "127.0.0.1"
    password: str = PASSWORD
    proc: subprocess.Popen[bytes] | None = None
    _owner: tuple[int, int] | None = None
    _users: set[str] = field(default_factory=set)
    _pool: list[str] = field(default_factory=list)

    # -- lifecycle -------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.root / "dovecot.conf"

    def _run_prefix(self) -> list[str]:
        if os.geteuid() == 0:
            # imap-login refuses to run as root; setpriv execs, so the pid stays Dovecot's master.
            return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        return []

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        out = open(self.root / "out.log", "ab")  # noqa: SIM115 - lives as long as the process
        cmd = [*self._run_prefix(), DOVECOT or "dovecot", "-F", "-c", str(self.conf)]
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dovecot exited {self.proc.returncode}: {self.log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                    if s.recv(100).startswith(b"* OK"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"dovecot did not start in {timeout}s: {self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # The master leaves running imap processes (and so open client
        # connections) behind; a stopped server must drop its clients too.
        children = _descendants(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # Wait until the port is closed so a test's "server is down" is really down.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                time.sleep(0.05)
            except OSError:
                return

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 20) -> str:
        lines: list[str] = []
        for name in ("dovecot.log", "out.log"):
            p = self.root / name
            if p.exists():
                lines += p.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(lines)

    # -- users and mailboxes ----------------------------------------------
    def add_user(self, name: str) -> str:
        """Add a passwd-file user and wait until Dovecot sees it.

        Dovecot stats the passwd file at most once a second, so a user written
        right after a login may be unknown for up to a second.
        """
        if name in self._users:
            return name
        with open(self.root / "passwd", "a") as fh:
            fh.write(f"{name}:{{PLAIN}}{self.password}\n")
        self._users.add(name)
        self._chown(self.root / "passwd")
        deadline = time.monotonic() + 5
        while True:
            try:
                self.connect(name).logout()
                return name
            except imaplib.IMAP4.error:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def new_user(self) -> str:
        """A user nobody has used yet (from a pool written at start, so no waiting)."""
        name = self._pool.pop(0) if self._pool else f"extra{next(_user_seq)}"
        return self.add_user(name)

    def _chown(self, path: Path) -> None:
        if self._owner is not None:
            os.chown(path, *self._owner)

    def doveadm(self, *args: str, input: bytes | None = None) -> str:
        res = subprocess.run([DOVEADM or "doveadm", "-c", str(self.conf), *args], input=input,
                             capture_output=True, timeout=30)
        if res.returncode != 0:
            err = res.stderr.decode(errors="replace")
            raise RuntimeError(f"doveadm {' '.join(args)} failed: {err}")
        return res.stdout.decode(errors="replace")

    def connect(self, user: str) -> imaplib.IMAP4:
        conn = imaplib.IMAP4(self.host, self.port, timeout=10)
        conn.login(user, self.password)
        return conn

    def append(self, user: str, raw: bytes, folder: str = "INBOX", flags: str = "") -> int:
        """IMAP APPEND; returns the new message's UID (Dovecot answers APPENDUID)."""
        conn = self.connect(user)
        try:
            typ, data = conn.append(folder, flags or None, None, raw)
            assert typ == "OK", data
            m = re.search(rb"APPENDUID \d+ (\d+)", data[0] or b"")
            return int(m.group(1)) if m else 0
        finally:
            conn.logout()

    def append_many(self, user: str, raws: list[bytes], folder: str = "INBOX") -> None:
        """Many APPENDs over one connection (the bench appends thousands)."""
        conn = self.connect(user)
        try:
            for raw in raws:
                typ, data = conn.append(folder, None, None, raw)
                assert typ == "OK", data
        finally:
            conn.logout()

    def uids(self, user: str, folder: str = "INBOX") -> list[int]:
        conn = self.connect(user)
        try:
            typ, data = conn.select(_q(folder), readonly=True)
            if typ != "OK":
                return []
            typ, data = conn.uid("SEARCH", "ALL")
            return [int(x) for x in (data[0] or b"").split()]
        finally:
            conn.logout()

    def count(self, user: str, folder: str = "INBOX") -> int:
        return len(self.uids(user, folder))

    def flags(self, user: str, folder: str = "INBOX") -> dict[int, str]:
        conn = self.connect(user)
        try:
            conn.select(_q(folder), readonly=True)
            typ, data = conn.uid("FETCH", "1:*", "(FLAGS)")
            out: dict[int, str] = {}
            for item in data:
                if isinstance(item, bytes):
                    m = re.search(rb"UID (\d+).*FLAGS \(([^)]*)\)|FLAGS \(([^)]*)\).*UID (\d+)",
                                  item)
                    if m:
                        uid = int(m.group(1) or m.group(4))
                        out[uid] = (m.group(2) if m.group(2) is not None else m.group(3)).decode()
            return out
        finally:
            conn.logout()

    def folders(self, user: str) -> list[str]:
        return sorted(self.doveadm("mailbox", "list", "-u", user).split())

    def create_folder(self, user: str, *names: str) -> None:
        self.doveadm("mailbox", "create", "-u", user, *names)

    def message_count(self, user: str, folder: str) -> int:
        """By doveadm, which takes the folder's Unicode name (no IMAP encoding involved)."""
        out = self.doveadm("-f", "flow", "mailbox", "status", "-u", user, "messages", folder)
        return int(out.split("=")[1])

    def uidvalidity(self, user: str, folder: str = "INBOX") -> int:
        out = self.doveadm("-f", "flow", "mailbox", "status", "-u", user, "uidvalidity", folder)
        return int(out.split("=")[1])

    def set_uidvalidity(self, user: str, value: int, folder: str = "INBOX") -> None:
        self.doveadm("mailbox", "update", "-u", user, "--uid-validity", str(value), folder)

    def account(self, user: str, **overrides: Any) -> Any:
        """An ImapAccount for this server: plaintext port, fast polling, unless overridden."""
        from mailgate.config import ImapAccount

        values: dict[str, Any] = dict(name=user, host=self.host, port=self.port, tls="none",
                                      username=user, password=self.password,
                                      queue="support@example.com", poll_seconds=30.0,
                                      ca_file=self.ca_file)
        values.update(overrides)
        return ImapAccount(**values)

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


def _descendants(pid: int) -> list[int]:
    """Pids of all processes below pid (from /proc; Linux only, as is Dovecot here)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _q(folder: str) -> str:
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI must provide it)")
    pytest.skip(reason)


def start_dovecot() -> Dovecot:
    """Start a Dovecot in a new temp dir (also used by bench/imap_ingest.py)."""
    import trustme

    root = Path(tempfile.mkdtemp(prefix="dv.", dir="/tmp"))
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(root / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(root / "cert.pem"))
    ca.cert_pem.write_to_path(str(root / "ca.pem"))
    owner: tuple[int, int] | None = None
    if os.geteuid() == 0:
        import grp
        import pwd

        owner = (pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
        user, group = "nobody", "nogroup"
    else:
        import grp
        import pwd

        user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    dh = Path("/usr/share/dovecot/dh.pem")
    for sub in ("run", "lib", "home"):
        (root / sub).mkdir()
    pool = [f"user{i}" for i in range(1, 201)]
    (root / "passwd").write_text("".join(f"{u}:{{PLAIN}}{PASSWORD}\n" for u in pool))
    port, ssl_port = _free_port(), _free_port()
    (root / "dovecot.conf").write_text(_CONF.format(
        root=root, user=user, group=group, port=port, ssl_port=ssl_port, tag=root.name[3:],
        ssl_dh=f"ssl_dh = <{dh}" if dh.exists() else ""))
    if owner is not None:
        for p in [root, *root.rglob("*")]:
            os.chown(p, *owner)
    server = Dovecot(root=root, port=port, ssl_port=ssl_port, ca_file=root / "ca.pem",
                     _owner=owner, _users=set(pool), _pool=list(pool))
    server.start()
    return server


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    if DOVECOT is None or DOVEADM is None:
        _missing("dovecot/doveadm not installed (apt-get install dovecot-imapd)")
    try:
        import trustme  # noqa: F401
    except ImportError:
        _missing("trustme not installed (pip install trustme)")
    server = start_dovecot()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


_user_seq = itertools.count(1)


@pytest.fixture
def imap_user(dovecot: Dovecot) -> str:
    """A fresh mailbox user on the shared server (a restart by another test leaves it usable)."""
    if not dovecot.running:
        dovecot.start()
    return dovecot.new_user()
