"""IMAP poller: a mailbox as a queue, feeding spool.accept (DESIGN.md section 1).

One ImapPoller per [[imap]] account, each its own asyncio task, so one failing
mailbox never stops the others. A pass: SELECT, compare UIDVALIDITY with the
stored one, UID SEARCH for UIDs above the stored last_uid, then per batch:
UID FETCH (RFC822.SIZE) to leave oversize mail alone, UID FETCH BODY.PEEK[],
spool.accept_batch (one commit for the batch), wait for its outcomes from the
work process (the `process` callback; a dead letter is filed in the Failed
folder), then the after-action (MOVE / \\Seen / delete) and only then advance
last_uid. The next batch is fetched and stored while the work process handles
this one; batches are filed and last_uid advanced in order.

A message the server cannot return (its FETCH fails, or the server hangs up on
it) must not hold up the others: a batch whose FETCH fails is fetched again one
message at a time, and a message that fails alone is left in the mailbox,
reported, and tried again on later passes. last_uid never moves past it; the
poller remembers in memory how far it got beyond (and does not fetch again what
the spool already holds), see docs/imap.md.

Exactly once rests on three things: the spool is idempotent on
source_key = imap:<account>:<uidvalidity>:<uid> (and, here, on the raw bytes'
sha256 within the account, which covers a UIDVALIDITY rescan); the mailbox is
only changed after the commit; last_uid only moves after the action. After a
crash, the messages stored but not yet filed are found in the spool by that
source_key and filed without being fetched again.

Only UID commands are used: sequence numbers shift under concurrent expunges.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import random
import re
import shlex
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

import aioimaplib
from sqlalchemy.engine import Engine
from sqlmodel import select

from mailgate import spool
from mailgate.config import ImapAccount
from mailgate.store.blobs import BlobStore
from mailgate.store.engine import as_utc, iso, session_scope, utcnow
from mailgate.store.tables import ImapState, Inbound

log = logging.getLogger(__name__)

T = TypeVar("T")

# RFC 2177 lets servers drop an IDLE after 30 minutes; re-issue well before.
IDLE_MAX_SECONDS = 25 * 60
COMMAND_TIMEOUT = 60.0
CREDENTIAL_COMMAND_TIMEOUT = 60.0
# aioimaplib parses a read recursively, one level per response line: a reply
# with ~1000 lines in one socket read (sizes of 1000 messages, EXPUNGEs after
# a big MOVE) raises RecursionError and kills the connection. So no single
# command names more UIDs than this, whatever batch_size says.
MAX_UIDS_PER_COMMAND = 150
# Batches fetched and stored while an earlier one is still being processed, so that the
# work process never waits for a FETCH. Each is still filed only after its own outcomes.
LOOKAHEAD_BATCHES = 2
# A message the server would not return is tried again poll_seconds later, then at doubling
# intervals up to this: a server that hangs up on it (Dovecot) costs a reconnect per try.
SKIPPED_RETRY_MAX_SECONDS = 30 * 60

_UIDVALIDITY_RE = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_FETCH_HEAD_RE = re.compile(rb"^\d+ FETCH \(")
_UID_RE = re.compile(rb"\bUID (\d+)")
_SIZE_RE = re.compile(rb"\bRFC822\.SIZE (\d+)")
_LITERAL_RE = re.compile(rb"\{(\d+)\}$")
# imap_state.last_error of a message left in place because the server would not return it.
_UNFETCHABLE_RE = re.compile(r"message UID (\d+) in .* could not be fetched")
_UNFILED_RE = re.compile(r"stored mail up to UID (\d+) in .* could not be filed")


def _waiting_uid(error: str | None) -> int | None:
    """The highest UID a standing report is about (a message left unfetched or unfiled while
    passes succeed around it), None for any other error."""
    if (unfetchable := _UNFETCHABLE_RE.match(error or "")) is not None:
        return int(unfetchable.group(1))
    if (unfiled := _UNFILED_RE.match(error or "")) is not None:
        return int(unfiled.group(1))
    return None


class ImapError(Exception):
    """A failure talking to the IMAP server; str() is one line for logs and health."""


class ImapRefused(ImapError):
    """The server answered NO or BAD: the command failed, but the connection is still in step."""


@dataclass(frozen=True)
class _Item:
    uid: int
    action: str  # move | failed | seen | delete | none


@dataclass
class _Stored:
    """A fetched batch: what spool.accept_batch stored, as (uid, inbound id, outcome if
    known, duplicate)."""

    uidvalidity: int
    position: int  # the batch's highest UID: passed over once the batch is filed
    items: list[tuple[int, int, str | None, bool]] = field(default_factory=list)
    accepted: int = 0
    recovered: list[int] = field(default_factory=list)  # skipped before, stored (or gone) now
    outcomes: asyncio.Task[list[_Item]] | None = None  # set once stored


@dataclass
class _Fetched:
    """What the FETCHes of one batch got. A UID in none of these was expunged meanwhile."""

    bodies: dict[int, bytes] = field(default_factory=dict)
    oversize: dict[int, int] = field(default_factory=dict)  # uid -> size: left in place for good
    failed: dict[int, str] = field(default_factory=dict)  # uid -> the server's answer: tried later


@dataclass
class _Skipped:
    """A message the server would not return: left in the mailbox, tried again from retry_at."""

    tries: int
    retry_at: float  # time.monotonic()


# ---------------------------------------------------------------- credentials


def _run_credential_command(what: str, command: str) -> str:
    """Run the operator's command (no shell) and return its stdout, stripped."""
    try:
        res = subprocess.run(shlex.split(command), capture_output=True, text=True,
                             timeout=CREDENTIAL_COMMAND_TIMEOUT, check=False)
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        raise ImapError(f"{what} failed: {exc}") from None
    if res.returncode != 0:
        err = " ".join(res.stderr.split()) or f"exit status {res.returncode}"
        raise ImapError(f"{what} failed: {err}")
    value = res.stdout.strip()
    if not value:
        raise ImapError(f"{what} failed: it printed nothing")
    return value


def _chunks(uids: Sequence[int], size: int = MAX_UIDS_PER_COMMAND) -> list[Sequence[int]]:
    return [uids[i:i + size] for i in range(0, len(uids), size)]


def mailbox_name(name: str) -> str:
    """A folder name as IMAP4rev1 sends it: modified UTF-7 (RFC 3501 5.1.3). Printable ASCII
    stands for itself ("&" as "&-"); anything else is UTF-16 in base64 with "," for "/",
    between "&" and "-": "Entwürfe" -> "Entw&APw-rfe"."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            encoded = base64.b64encode("".join(pending).encode("utf-16-be")).decode("ascii")
            out.append("&" + encoded.rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in name:
        if " " <= ch <= "~":
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def _quote(mailbox: str) -> str:
    name = mailbox_name(mailbox)
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def uid_set(uids: Iterable[int]) -> str:
    """Compact UID set (1:3,7): keeps command lines short for big batches."""
    ordered = sorted(set(uids))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}:{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ImapError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _ssl_context(account: ImapAccount) -> ssl.SSLContext:
    if account.ca_file:
        return ssl.create_default_context(cafile=str(account.ca_file))
    return ssl.create_default_context()


# ------------------------------------------------------------------- session


class _Session:
    """One authenticated, selected IMAP connection."""

    def __init__(self, account: ImapAccount, timeout: float = COMMAND_TIMEOUT) -> None:
        self.account = account
        self.timeout = timeout
        self.lost = asyncio.Event()
        self.client: aioimaplib.IMAP4 | None = None
        self.uidvalidity = 0
        self.farewell = ""  # the text of the server's last BYE: its only word on why it hung up
        self._selected: tuple[str, bool] | None = None  # (folder, readonly), for reopen

    @property
    def c(self) -> aioimaplib.IMAP4:
        assert self.client is not None
        return self.client

    def has(self, capability: str) -> bool:
        return capability in self.c.protocol.capabilities

    async def call(self, aw: Awaitable[T], timeout: float | None = None) -> T:
        """Await an aioimaplib call, but give up at once when the connection drops.

        aioimaplib leaves a pending command waiting forever (or until its own
        timeout) when the server goes away; we want to reconnect promptly.
        """
        task = asyncio.ensure_future(aw)
        lost = asyncio.ensure_future(self.lost.wait())
        try:
            done, _ = await asyncio.wait({task, lost}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            lost.cancel()
        if task in done:
            return task.result()
        task.cancel()
        if lost in done:
            raise self.lost_error()
        raise ImapError("IMAP command timed out")

    def lost_error(self) -> ImapError:
        said = f" ({self.farewell})" if self.farewell else ""
        return ImapError(f"connection to {self.account.host}:{self.account.port} lost{said}")

    async def ok(self, aw: Awaitable[aioimaplib.Response], what: str,
                 timeout: float | None = None) -> aioimaplib.Response:
        resp = await self.call(aw, timeout)
        if resp.result != "OK":
            raise ImapRefused(f"{what} failed: {_text(resp)}")
        return resp

    async def open(self) -> None:
        a = self.account
        ctx = _ssl_context(a) if a.tls == "ssl" else None
        # One event per connection: when reopen replaces a connection, a late callback
        # from the old one must not mark the new one lost.
        lost = self.lost = asyncio.Event()
        self.farewell = ""
        # IMAP4 with an ssl_context rather than IMAP4_SSL: only the former passes conn_lost_cb.
        self.client = aioimaplib.IMAP4(host=a.host, port=a.port, timeout=self.timeout,
                                       conn_lost_cb=lambda _exc: lost.set(), ssl_context=ctx)
        self._keep_farewell()
        await self.call(self.c.wait_hello_from_server())
        if a.tls == "starttls":
            await self._starttls()
        await self._authenticate()
        # Dovecot and others change the capability list after login (MOVE, UIDPLUS, IDLE).
        await self.call(self.c.protocol.capability(), timeout=self.timeout)

    def _keep_farewell(self) -> None:
        """Note the text of an untagged BYE. aioimaplib drops it ("ignored untagged response")
        while an asynchronous command such as FETCH is pending, yet it is all the server says
        when it hangs up on a message it cannot read (Dovecot: "BYE FETCH failed: Internal
        error occurred. Refer to server log ..."). A private hook: without it, no text."""
        proto = self.c.protocol
        untagged = getattr(proto, "_untagged_response", None)
        if untagged is None:
            return

        def note(line: bytes) -> Any:
            if line.startswith(b"* BYE"):
                self.farewell = line[2:].decode(errors="replace").strip()
            return untagged(line)

        setattr(proto, "_untagged_response", note)  # noqa: B010 - an instance hook, not a method

    async def reopen(self) -> None:
        """A fresh connection, with the same folder selected, in place of one that was lost or
        may be out of step (a command timed out). Raises if the server cannot be reached, or if
        the folder's UIDVALIDITY changed meanwhile: its UIDs would name other messages now."""
        assert self._selected is not None
        folder, readonly = self._selected
        before = self.uidvalidity
        await self.close()
        await self.open()
        if await self.select(folder, readonly=readonly) != before:
            raise ImapError(f"UIDVALIDITY of {folder} changed from {before} to "
                            f"{self.uidvalidity} during the pass")

    async def _starttls(self) -> None:
        # aioimaplib 2.0 has no STARTTLS (iroco-co/aioimaplib#1): send the command,
        # then upgrade the transport under the same protocol object.
        if not self.has("STARTTLS"):
            raise ImapError(f"{self.account.host} does not offer STARTTLS")
        proto = self.c.protocol
        resp = await self.call(proto.execute(aioimaplib.Command("STARTTLS", proto.new_tag(),
                                                                loop=proto.loop)),
                               timeout=self.timeout)
        if resp.result != "OK":
            raise ImapError(f"STARTTLS failed: {_text(resp)}")
        loop = asyncio.get_running_loop()
        transport = await asyncio.wait_for(
            loop.start_tls(proto.transport, proto, _ssl_context(self.account),
                           server_hostname=self.account.host),
            self.timeout)
        proto.transport = transport
        # Capabilities announced before TLS must not be trusted (RFC 3501 6.2.1).
        await self.call(proto.capability(), timeout=self.timeout)

    async def _authenticate(self) -> None:
        a = self.account
        if a.oauth2_token_command:
            token = await asyncio.to_thread(_run_credential_command, "oauth2_token_command",
                                            a.oauth2_token_command)
            resp = await self.call(self.c.xoauth2(a.username, token))  # type: ignore[arg-type]
            if resp.result != "OK":
                raise ImapError(f"XOAUTH2 login as {a.username} failed: {_text(resp)}")
            return
        if a.password_command:
            password = await asyncio.to_thread(_run_credential_command, "password_command",
                                               a.password_command)
        else:
            password = a.password or ""
        resp = await self.call(self.c.login(a.username, password))
        if resp.result != "OK":
            raise ImapError(f"login as {a.username} failed: {_text(resp)}")

    async def select(self, folder: str, *, readonly: bool = False) -> int:
        self._selected = (folder, readonly)
        if readonly:
            # EXAMINE: the server guarantees no change at all, not even \Recent.
            resp = await self.ok(self.c.examine(_quote(folder)), f"EXAMINE {folder}")
            # aioimaplib only tracks SELECT; UID commands need the SELECTED state.
            self.c.protocol.state = aioimaplib.SELECTED
        else:
            resp = await self.ok(self.c.select(_quote(folder)), f"SELECT {folder}")
        for line in resp.lines:
            m = _UIDVALIDITY_RE.search(bytes(line))
            if m:
                self.uidvalidity = int(m.group(1))
                return self.uidvalidity
        raise ImapError(f"SELECT {folder}: server sent no UIDVALIDITY")

    async def create(self, folder: str) -> None:
        resp = await self.call(self.c.create(_quote(folder)), self.timeout)
        if resp.result != "OK" and b"ALREADYEXISTS" not in b" ".join(bytes(x) for x in resp.lines):
            # Not every server says [ALREADYEXISTS]; the MOVE/COPY that follows tells the truth.
            log.debug("CREATE %s: %s", folder, _text(resp))

    async def present(self, uids: Sequence[int]) -> set[int]:
        """Which of these UIDs the folder still holds."""
        resp = await self.ok(self.c.uid_search("UID", uid_set(uids), charset=None), "UID SEARCH", self.timeout)
        found = {int(x) for line in resp.lines[:-1] for x in bytes(line).split() if x.isdigit()}
        return found & set(uids)

    async def search_new(self, last_uid: int) -> list[int]:
        resp = await self.ok(self.c.uid_search("UID", f"{last_uid + 1}:*", charset=None),
                             "UID SEARCH")
        uids: list[int] = []
        for line in resp.lines[:-1]:
            uids += [int(x) for x in bytes(line).split() if x.isdigit()]
        # "n:*" always matches the highest UID, even when it is <= last_uid.
        return sorted(u for u in set(uids) if u > last_uid)

    async def sizes(self, uids: Sequence[int]) -> dict[int, int]:
        out: dict[int, int] = {}
        for part in _chunks(uids):
            resp = await self.ok(self.c.uid("fetch", uid_set(part), "(UID RFC822.SIZE)"),
                                 "UID FETCH RFC822.SIZE")
            for line in resp.lines:
                if isinstance(line, bytes) and _FETCH_HEAD_RE.match(line):
                    u, s = _UID_RE.search(line), _SIZE_RE.search(line)
                    if u and s:
                        out[int(u.group(1))] = int(s.group(1))
        return out

    async def bodies(self, uids: Sequence[int]) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        for part in _chunks(uids):
            resp = await self.ok(self.c.uid("fetch", uid_set(part), "(UID BODY.PEEK[])"),
                                 "UID FETCH BODY.PEEK[]")
            out.update(parse_bodies(resp.lines))
        return out

    async def act(self, items: Sequence[_Item]) -> None:
        a = self.account
        groups: dict[str, list[int]] = {}
        for it in items:
            groups.setdefault(it.action, []).append(it.uid)
        for action, all_uids in groups.items():
            for uids in _chunks(all_uids):
                if action == "move":
                    await self.move(uids, a.move_to)
                elif action == "failed":
                    await self.move(uids, a.failed_folder)
                elif action == "seen":
                    await self.ok(self.c.uid("store", uid_set(uids), "+FLAGS.SILENT", r"(\Seen)"),
                                  "UID STORE \\Seen", self.timeout)
                elif action == "delete":
                    await self.delete(uids)

    async def move(self, uids: Sequence[int], folder: str) -> None:
        for attempt in (1, 2):
            if self.has("MOVE"):
                # aioimaplib gives these no time limit: a stalled server held the poller for good.
                resp = await self.call(self.c.uid("move", uid_set(uids), _quote(folder)), self.timeout)
            else:
                resp = await self.call(self.c.uid("copy", uid_set(uids), _quote(folder)), self.timeout)
                if resp.result == "OK":
                    await self.delete(uids)
            if resp.result == "OK":
                return
            if attempt == 1 and b"TRYCREATE" in b" ".join(bytes(x) for x in resp.lines):
                await self.create(folder)
                continue
            raise ImapRefused(f"moving UIDs {uid_set(uids)} to {folder} failed: {_text(resp)}")

    async def delete(self, uids: Sequence[int]) -> None:
        await self.ok(self.c.uid("store", uid_set(uids), "+FLAGS.SILENT", r"(\Deleted)"),
                      "UID STORE \\Deleted", self.timeout)
        if self.has("UIDPLUS"):
            await self.ok(self.c.uid("expunge", uid_set(uids)), "UID EXPUNGE", self.timeout)
        else:
            # Without UIDPLUS a plain EXPUNGE would also remove messages someone
            # else flagged \Deleted; leave ours flagged, the server's cleanup or
            # the next client with EXPUNGE removes them. They are above last_uid
            # no more, so they are not fetched again.
            log.info("%s: server lacks UIDPLUS; messages left flagged \\Deleted", self.account.name)

    async def wait_for_news(self, stop: asyncio.Event, seconds: float) -> None:
        """IDLE until the server pushes something, stop is set, or `seconds` pass."""
        use_idle = self.account.idle and self.has("IDLE")
        waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(stop.wait()),
                                             asyncio.ensure_future(self.lost.wait())}
        idle: asyncio.Future[Any] | None = None
        push: asyncio.Future[Any] | None = None
        if use_idle:
            queue = self.c.protocol.idle_queue
            while not queue.empty():  # pushes from an earlier IDLE were handled by the last pass
                queue.get_nowait()
            # Our own timeout below governs; the library's must not fire first.
            idle = await self.call(self.c.idle_start(timeout=IDLE_MAX_SECONDS + 60),
                                   timeout=self.timeout)
            push = asyncio.ensure_future(self.c.wait_server_push(timeout=IDLE_MAX_SECONDS + 60))
            waiters.add(push)
        try:
            done, _ = await asyncio.wait(waiters, timeout=seconds,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        if self.lost.is_set():
            raise self.lost_error()
        if push is not None and push in done and not push.cancelled() and push.exception() is None:
            lines = push.result()
            if any(bytes(x).startswith(b"BYE") for x in lines if isinstance(x, bytes | bytearray)):
                said = b" ".join(bytes(x) for x in lines).decode(errors="replace")
                raise ImapError(f"server closed the connection: {said}")
        if idle is not None:
            self.c.idle_done()
            resp = await self.call(asyncio.wait_for(idle, self.timeout))
            if resp.result != "OK":
                raise ImapError(f"IDLE failed: {_text(resp)}")

    async def close(self) -> None:
        if self.client is None:
            return
        try:
            if not self.lost.is_set():
                if self.c.has_pending_idle():
                    # Cancelled mid-IDLE: LOGOUT would queue behind the IDLE forever.
                    self.c.idle_done()
                await self.call(self.c.logout(), timeout=2)
        except Exception:  # noqa: BLE001 - the connection is being thrown away anyway
            pass
        finally:
            transport = self.c.protocol.transport
            if transport is not None:
                transport.close()


def _text(resp: aioimaplib.Response) -> str:
    last = resp.lines[-1] if resp.lines else b""
    return f"{resp.result} {bytes(last).decode(errors='replace')}".strip()


def parse_bodies(lines: Sequence[bytes | bytearray]) -> dict[int, bytes]:
    """Pick (UID, literal) pairs out of an aioimaplib UID FETCH ... BODY[] response.

    aioimaplib gives: b'n FETCH (UID u BODY[] {size}', bytearray(literal), b')' per
    message. The UID may also come after the literal (b' UID u)'), and unsolicited
    FETCH lines (flag changes) may be mixed in.
    """
    out: dict[int, bytes] = {}
    i = 0
    while i < len(lines):
        line = lines[i]
        if isinstance(line, bytes) and _FETCH_HEAD_RE.match(line) and _LITERAL_RE.search(line) \
                and i + 1 < len(lines) and isinstance(lines[i + 1], bytearray):
            m = _UID_RE.search(line)
            tail = lines[i + 2] if i + 2 < len(lines) else b""
            if m is None and isinstance(tail, bytes):
                m = _UID_RE.search(tail)
            if m is not None:
                out[int(m.group(1))] = bytes(lines[i + 1])
            i += 2
            continue
        i += 1
    return out


# -------------------------------------------------------------------- poller


class ImapPoller:
    """Moves the mail of one IMAP mailbox into the spool, exactly once."""

    def __init__(self, account: ImapAccount, engine: Engine, blobs: BlobStore, *,
                 process: Callable[[int], Awaitable[str]] | None = None,
                 on_health: Callable[[str, dict[str, Any]], None] | None = None,
                 backoff_initial: float = 1.0, backoff_max: float = 300.0) -> None:
        self.account = account
        self.engine = engine
        self.blobs = blobs
        self.process = process
        self.on_health = on_health
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._key_prefix = f"imap:{account.name}:"
        self._last_ok_mono = time.monotonic()  # outage clock starts when the poller does
        self._warned_at: float | None = None
        # How far the poller got beyond last_uid, which stops below the lowest message the
        # server would not return (see _file): kept in memory only, for this UIDVALIDITY.
        self._uidvalidity: int | None = None
        self._passed = 0  # highest UID filed; all below it are done, except the skipped
        self._skipped: dict[int, _Skipped] = {}
        if account.tls == "none" and account.host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("imap %s: tls = \"none\" sends the password in clear to %s",
                        account.name, account.host)

    # -- public ---------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Poll until stop is set. Never raises, except CancelledError."""
        delay = self.backoff_initial
        while not stop.is_set():
            session = _Session(self.account)
            try:
                await session.open()
                await self._prepare(session)
                while not stop.is_set():
                    await self._drain(session, stop)
                    await self._ok()
                    delay = self.backoff_initial
                    if stop.is_set():
                        break
                    await session.wait_for_news(stop, min(self.account.poll_seconds,
                                                          IDLE_MAX_SECONDS))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a poller must outlive any failure
                await self._failed(exc)
            finally:
                await asyncio.shield(session.close())
            if stop.is_set():
                break
            # Jitter spreads reconnects of many pollers after a shared outage.
            sleep = delay * random.uniform(0.5, 1.0)
            delay = min(delay * 2, self.backoff_max)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), sleep)

    async def poll_once(self) -> int:
        """One connect-fetch-accept-act pass. Returns how many new messages were accepted.

        Raises ImapError/SpoolError/OSError after recording the error in health.
        """
        session = _Session(self.account)
        try:
            await session.open()
            await self._prepare(session)
            accepted = await self._drain(session, None)
            await self._ok()
            return accepted
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._failed(exc)
            raise
        finally:
            await asyncio.shield(session.close())

    # -- one pass -----------------------------------------------------------
    async def _prepare(self, session: _Session) -> None:
        a = self.account
        if not a.shadow:
            # Create targets up front so a missing folder is an error at connect
            # time, not after messages were accepted.
            folders = {a.failed_folder} | ({a.move_to} if a.after == "move" else set())
            for folder in sorted(folders):
                await session.create(folder)
        uidvalidity = await session.select(a.folder, readonly=a.shadow)
        await asyncio.to_thread(self._check_uidvalidity, uidvalidity)
        if uidvalidity != self._uidvalidity:
            self._uidvalidity, self._passed = uidvalidity, 0
            self._skipped.clear()

    async def _drain(self, session: _Session, stop: asyncio.Event | None) -> int:
        await self._forget_oversize_gone(session)
        accepted = 0
        retry_due = True
        while True:
            _, last_uid = await asyncio.to_thread(self._position)
            # Skipped messages whose retry is due: once per pass, however often the search repeats.
            retry = self._due_retries(last_uid) if retry_due else []
            retry_due = False
            found = await session.search_new(max(last_uid, self._passed))
            uids = sorted(set(retry) | set(found))
            if not uids:
                return accepted
            # While the work process handles a batch, the next ones are fetched and stored
            # (up to LOOKAHEAD_BATCHES ahead, so that it never waits for a FETCH). Batches
            # are filed (moved) and last_uid advanced strictly in order, each only after
            # its own messages' outcomes are known.
            waiting: list[_Stored] = []
            try:
                for start in range(0, len(uids), self.account.batch_size):
                    try:
                        stored = await self._store_batch(session, uids[start:start + self.account.batch_size])
                    except Exception:
                        # File what was committed before, so a spool outage never makes us
                        # fetch it again; the error that stopped us is the one to report.
                        with contextlib.suppress(Exception):
                            while waiting:
                                await self._file(session, waiting[0])
                                waiting.pop(0)
                        raise
                    accepted += stored.accepted
                    stored.outcomes = asyncio.create_task(self._outcomes(stored.items))
                    waiting.append(stored)
                    if len(waiting) > LOOKAHEAD_BATCHES:
                        await self._file(session, waiting.pop(0))
                    if stop is not None and stop.is_set():
                        break  # the rest waits for the next pass
                while waiting:
                    await self._file(session, waiting[0])
                    waiting.pop(0)
            except BaseException:
                for batch in waiting:
                    if batch.outcomes is not None:
                        batch.outcomes.cancel()
                raise
            if stop is not None and stop.is_set():
                return accepted

    def _due_retries(self, last_uid: int) -> list[int]:
        now = time.monotonic()
        return sorted(uid for uid, skipped in self._skipped.items()
                      if uid > last_uid and skipped.retry_at <= now)

    async def _store_batch(self, session: _Session, uids: list[int]) -> _Stored:
        """FETCH a batch and store it with one commit (all or nothing: raises SpoolError).

        A message the spool already holds under this UID (a crash before the move, a pass
        that starts again below a skipped message) is not fetched again. A message the
        server would not return is left in place and reported; _file keeps last_uid below it.
        """
        uv = session.uidvalidity
        known = await asyncio.to_thread(self._known, uv, uids)
        got = await self._fetch(session, [u for u in uids if u not in known])
        for uid, size in got.oversize.items():
            await self._report_oversize(uv, uid, size)
        for uid, why in got.failed.items():
            await self._report_unfetchable(uid, why)
        fetched = sorted(got.bodies.items())
        stored = await asyncio.to_thread(self._accept_batch, uv, fetched) if fetched else []
        batch = _Stored(uidvalidity=uv, position=uids[-1])
        batch.items = sorted(stored + [(uid, inbound_id, outcome, True)
                                       for uid, (inbound_id, outcome) in known.items()])
        batch.accepted = sum(1 for *_, duplicate in stored if not duplicate)
        batch.recovered = [u for u in uids if u in self._skipped and u not in got.failed]
        return batch

    async def _fetch(self, session: _Session, uids: Sequence[int]) -> _Fetched:
        """Sizes, then the bodies within max_message_bytes, in as few commands as possible.

        Should that fail (a NO, a server that hangs up, as Dovecot does on a message file it
        cannot read) or leave a body out, each message still without a result is fetched
        alone: a message the server cannot return then costs only itself, never its batch.
        """
        got = _Fetched()
        rest = list(uids)
        if len(uids) > 1:
            try:
                sizes = await session.sizes(uids)
                got.oversize = {u: n for u, n in sizes.items() if n > self.account.max_message_bytes}
                fetchable = [u for u in uids if u in sizes and u not in got.oversize]
                got.bodies = await session.bodies(fetchable) if fetchable else {}
                rest = [u for u in fetchable if u not in got.bodies]  # no size: expunged meanwhile
            except Exception as exc:  # noqa: BLE001 - narrowed down one message at a time below
                log.warning("imap %s: fetching UIDs %s failed (%s); fetching them one at a time",
                            self.account.name, uid_set(uids), _one_line(exc))
                await self._recover(session, exc)
                got.bodies = {}
                rest = [u for u in uids if u not in got.oversize]
        for uid in rest:
            await self._fetch_one(session, uid, got)
        return got

    async def _fetch_one(self, session: _Session, uid: int, got: _Fetched) -> None:
        try:
            size = (await session.sizes([uid])).get(uid)
            if size is None:
                return  # expunged by someone else meanwhile: nothing left to fetch
            if size > self.account.max_message_bytes:
                got.oversize[uid] = size
                return
            raw = (await session.bodies([uid])).get(uid)
        except Exception as exc:  # noqa: BLE001 - this message's failure, unless reopen fails too
            got.failed[uid] = _one_line(exc)
            await self._recover(session, exc)
            return
        if raw is None:
            got.failed[uid] = "the FETCH reply had no body for it"
        else:
            got.bodies[uid] = raw

    async def _recover(self, session: _Session, exc: BaseException) -> None:
        """After a failed command: a NO leaves the connection usable; anything else (lost,
        timed out, a library error) may leave it out of step, so it is replaced. If the
        server is really gone, reopen raises and the pass ends as for any outage."""
        if not isinstance(exc, ImapRefused):
            await session.reopen()

    async def _file(self, session: _Session, batch: _Stored) -> None:
        """Move (or flag) a stored batch by its messages' outcomes, then advance last_uid."""
        assert batch.outcomes is not None
        done = await batch.outcomes
        if batch.uidvalidity != session.uidvalidity:
            return  # the folder was recreated meanwhile: these UIDs name other messages now
        filed = True
        if done and not self.account.shadow:
            try:
                await session.act(done)
            except ImapRefused as exc:
                # The server would not file them (a read-only or full folder, a quota). They
                # are spooled and handled; they stay below last_uid, filing is tried again on
                # later passes, and mail above them goes on being fetched meanwhile.
                filed = False
                await self._report_unfiled([item.uid for item in done], _one_line(exc))
        if filed:
            for uid in batch.recovered:
                self._skipped.pop(uid, None)
        self._passed = max(self._passed, batch.position)
        # last_uid stops just below the lowest message the server would not return, so that
        # after a restart the poller starts there again and the message is never given up on.
        # In this process the search goes on from _passed, so nothing above is searched twice.
        position = min([self._passed, *(uid - 1 for uid in self._skipped)])
        await asyncio.to_thread(self._advance, batch.uidvalidity, position)

    async def _outcomes(self, stored: list[tuple[int, int, str | None, bool]]) -> list[_Item]:
        """The action for each stored message, by its outcome. The whole batch is waited for
        at once: the work process takes several messages per claim."""
        async def outcome_of(inbound_id: int, known: str | None) -> str | None:
            if known is not None or self.process is None:
                return known
            return await self._run_process(inbound_id)

        outcomes = await asyncio.gather(*(outcome_of(i, o) for _, i, o, _ in stored))
        return [_Item(uid, self._action_for(o)) for (uid, _, _, _), o in zip(stored, outcomes, strict=True)]

    def _action_for(self, outcome: str | None) -> str:
        a = self.account
        if a.shadow:
            return "none"
        if outcome == "dead":
            return "failed"
        return a.after

    async def _run_process(self, inbound_id: int) -> str | None:
        assert self.process is not None
        try:
            return await self.process(inbound_id)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001
            # The message is safely spooled; the ingest worker retries it. Blocking
            # the mailbox on it would stall every message behind it.
            log.exception("imap %s: processing inbound %s failed; left to the worker",
                          self.account.name, inbound_id)
            return None

    async def _report_unfetchable(self, uid: int, why: str) -> None:
        """Record a message that the server would not return, and when to try it again.
        It stays in the mailbox untouched (never flagged, moved or deleted)."""
        a = self.account
        before = self._skipped.get(uid)
        tries = before.tries + 1 if before else 1
        delay = min(a.poll_seconds * 2 ** min(tries - 1, 20), SKIPPED_RETRY_MAX_SECONDS)
        self._skipped[uid] = _Skipped(tries=tries, retry_at=time.monotonic() + delay)
        msg = (f"message UID {uid} in {a.folder} could not be fetched (attempt {tries}): {why}; "
               f"it stays in the mailbox and is tried again later")
        log.log(logging.ERROR if before is None else logging.WARNING,
                "imap %s: %s (next try in %.0f s)", a.name, msg, delay)
        await asyncio.to_thread(self._record, None, msg)

    async def _report_unfiled(self, uids: Sequence[int], why: str) -> None:
        """Record stored messages that the server would not move, flag or delete, and when
        to file them again (they are in the spool: a later pass files them from there)."""
        a = self.account
        tries = 1 + max((self._skipped[u].tries for u in uids if u in self._skipped), default=0)
        delay = min(a.poll_seconds * 2 ** min(tries - 1, 20), SKIPPED_RETRY_MAX_SECONDS)
        for uid in uids:
            self._skipped[uid] = _Skipped(tries=tries, retry_at=time.monotonic() + delay)
        # The highest UID first: last_error keeps 2000 characters, and a long set would push it out.
        msg = (f"stored mail up to UID {max(uids)} in {a.folder} could not be filed (attempt {tries}): "
               f"{why}; it stays in the mailbox and filing is tried again later (UIDs {uid_set(uids)})")
        log.log(logging.ERROR if tries == 1 else logging.WARNING, "imap %s: %s (next try in %.0f s)",
                a.name, msg, delay)
        await asyncio.to_thread(self._record, None, msg)

    async def _report_oversize(self, uidvalidity: int, uid: int, size: int) -> None:
        a = self.account
        msg = (f"message UID {uid} in {a.folder} is {size} bytes, over max_message_bytes "
               f"({a.max_message_bytes}); left in place")
        log.error("imap %s: %s", a.name, msg)
        # Never stored, so no dead letter either: a standing warning until it is gone.
        await asyncio.to_thread(self._set_oversize, lambda waiting: [
            *[w for w in waiting if w[:2] != [uidvalidity, uid]], [uidvalidity, uid, size]])
        await asyncio.to_thread(self._record, None, msg)

    async def _forget_oversize_gone(self, session: _Session) -> None:
        """Each pass: messages too large to fetch that someone took out of the folder (after
        passing them on by hand) are no longer warned about. After a UIDVALIDITY change
        the rescan reports again those still there."""
        # Read each pass (one row): another instance may have held the lease meanwhile.
        waiting = await asyncio.to_thread(self._oversize_waiting)
        current = [w for w in waiting if w[0] == session.uidvalidity]
        present = await session.present([w[1] for w in current]) if current else set()
        kept = [w for w in current if w[1] in present]
        if kept != waiting:
            await asyncio.to_thread(self._set_oversize, lambda now: [
                w for w in now if w[0] == session.uidvalidity and (w[1] in present or w not in current)])

    # -- health -------------------------------------------------------------
    async def _ok(self) -> None:
        self._last_ok_mono = time.monotonic()
        self._warned_at = None
        health = await asyncio.to_thread(self._record, utcnow(), None)
        self._emit(health)

    async def _failed(self, exc: BaseException) -> None:
        msg = _one_line(exc)
        log.error("imap %s: %s", self.account.name, msg)
        try:
            health = await asyncio.to_thread(self._record, None, msg)
        except Exception as db_exc:  # noqa: BLE001 - the database may be the thing that failed
            log.error("imap %s: could not record health: %s", self.account.name, _one_line(db_exc))
            health = {"name": self.account.name, "last_error": msg}
        limit = self.account.unreachable_warning_minutes * 60
        now = time.monotonic()
        if now - self._last_ok_mono >= limit and (self._warned_at is None
                                                  or now - self._warned_at >= limit):
            self._warned_at = now
            log.warning("imap %s: mailbox not reachable for %.0f minutes: %s",
                        self.account.name, (now - self._last_ok_mono) / 60, msg)
        self._emit(health)

    def _emit(self, health: dict[str, Any]) -> None:
        if self.on_health is not None:
            try:
                self.on_health(self.account.name, health)
            except Exception:  # noqa: BLE001
                log.exception("imap %s: on_health callback failed", self.account.name)

    # -- database (sync, run in threads) ------------------------------------------
    def _state(self, session: Any) -> ImapState:
        row = session.exec(select(ImapState).where(ImapState.account == self.account.name)).first()
        if row is None:
            row = ImapState(account=self.account.name)
            session.add(row)
            session.flush()
        return row

    def _position(self) -> tuple[int | None, int]:
        with session_scope(self.engine) as s:
            row = self._state(s)
            return row.uidvalidity, row.last_uid

    def _check_uidvalidity(self, uidvalidity: int) -> None:
        with session_scope(self.engine) as s:
            row = self._state(s)
            if row.uidvalidity == uidvalidity:
                return
            if row.uidvalidity is not None:
                # The mailbox was recreated or restored: every UID may mean another
                # message now. Rescan; _accept_batch recognises mail it has seen by its bytes.
                log.warning("imap %s: UIDVALIDITY changed %s -> %s; rescanning %s",
                            self.account.name, row.uidvalidity, uidvalidity, self.account.folder)
            row.uidvalidity = uidvalidity
            row.last_uid = 0
            s.add(row)

    def _advance(self, uidvalidity: int, uid: int) -> None:
        with session_scope(self.engine) as s:
            row = self._state(s)
            # Guards against a concurrent UIDVALIDITY reset or a slower twin poller.
            if row.uidvalidity == uidvalidity and uid > row.last_uid:
                row.last_uid = uid
                waiting = _waiting_uid(row.last_error)
                if waiting is not None and waiting <= uid:
                    # last_uid only passes a message left behind once it was fetched and
                    # filed (or is gone): the report is out of date, and doctor stops warning.
                    row.last_error = row.last_error_at = None
                s.add(row)

    def _known(self, uidvalidity: int, uids: Sequence[int]) -> dict[int, tuple[int, str | None]]:
        """The UIDs already in the spool under this UIDVALIDITY: (inbound id, outcome if known)."""
        keys = {f"{self._key_prefix}{uidvalidity}:{uid}": uid for uid in uids}
        out: dict[int, tuple[int, str | None]] = {}
        with session_scope(self.engine) as s:
            for part in _chunks(list(keys)):
                for key, inbound_id, state, outcome in s.exec(
                        select(Inbound.source_key, Inbound.id, Inbound.state, Inbound.outcome)
                        .where(Inbound.source_key.in_(part))).all():  # type: ignore[union-attr]
                    out[keys[key]] = (inbound_id, _stored_outcome(state, outcome))
        return out

    def _accept_batch(self, uidvalidity: int,
                      fetched: list[tuple[int, bytes]]) -> list[tuple[int, int, str | None, bool]]:
        """spool.accept_batch of the messages whose exact bytes did not come from this
        account before (a UIDVALIDITY change renumbers the same mail).

        Returns (uid, inbound id, outcome if it was already processed, duplicate) each.
        """
        digests = {uid: hashlib.sha256(raw).hexdigest() for uid, raw in fetched}
        with session_scope(self.engine) as s:
            priors: dict[str, Inbound] = {}
            for row in s.exec(select(Inbound).where(
                    Inbound.raw_sha256.in_(set(digests.values())),  # type: ignore[attr-defined]
                    Inbound.source_key.startswith(self._key_prefix, autoescape=True),  # type: ignore[union-attr]
            ).order_by(Inbound.id)).all():  # type: ignore[arg-type]
                priors.setdefault(row.raw_sha256, row)
        new = [(uid, raw) for uid, raw in fetched if digests[uid] not in priors]
        accepted = dict(zip((uid for uid, _ in new), spool.accept_batch(
            self.engine, self.blobs, [(f"{self._key_prefix}{uidvalidity}:{uid}", raw) for uid, raw in new],
            source="imap", queue=self.account.queue), strict=True))
        out: list[tuple[int, int, str | None, bool]] = []
        for uid, _ in fetched:
            res = accepted.get(uid)
            if res is not None and not res.duplicate:
                out.append((uid, res.inbound_id, None, False))
                continue
            prior = priors.get(digests[uid])
            if prior is None:
                assert res is not None
                with session_scope(self.engine) as s:
                    prior = s.get(Inbound, res.inbound_id)
            assert prior is not None and prior.id is not None
            out.append((uid, prior.id, _stored_outcome(prior.state, prior.outcome), True))
        return out

    def _oversize_waiting(self) -> list[list[int]]:
        with session_scope(self.engine) as s:
            return _oversize_of(self._state(s))

    def _set_oversize(self, change: Callable[[list[list[int]]], list[list[int]]]) -> None:
        with session_scope(self.engine) as s:
            row = self._state(s)
            waiting = change(_oversize_of(row))
            row.oversize = json.dumps(waiting) if waiting else None
            s.add(row)

    def _record(self, ok_at: datetime | None, error: str | None) -> dict[str, Any]:
        with session_scope(self.engine) as s:
            row = self._state(s)
            if ok_at is not None:
                row.last_ok_at = ok_at
            if error is not None:
                row.last_error = error[:2000]
                row.last_error_at = utcnow()
            s.add(row)
            return _health_of(self.account, row, utcnow())


def _oversize_of(row: ImapState) -> list[list[int]]:
    try:
        waiting = json.loads(row.oversize or "[]")
    except ValueError:
        return []
    return [w for w in waiting if isinstance(w, list) and len(w) == 3 and all(type(x) is int for x in w)]


def _stored_outcome(state: str, outcome: str | None) -> str | None:
    """What decides where an already stored message goes: None while it is not processed yet."""
    if state == "dead":
        return "dead"
    return (outcome or "done") if state == "done" else None


# ------------------------------------------------------------------ doctor


def _health_of(account: ImapAccount, row: ImapState | None, now: datetime) -> dict[str, Any]:
    ok_at = as_utc(row.last_ok_at) if row and row.last_ok_at else None
    err_at = as_utc(row.last_error_at) if row and row.last_error_at else None
    error = row.last_error if row else None
    limit = timedelta(minutes=account.unreachable_warning_minutes)
    warning = None
    if ok_at is None:
        if error:
            warning = f"imap {account.name}: never fetched successfully; last error: {error}"
    elif now - ok_at > limit:
        minutes = int((now - ok_at).total_seconds() // 60)
        warning = (f"imap {account.name}: no successful fetch for {minutes} minutes"
                   + (f"; last error: {error}" if error and err_at and err_at >= ok_at else ""))
    if warning is None and _waiting_uid(error) is not None:
        # Passes succeed around it, yet the message waits; cleared once last_uid passes it.
        warning = f"imap {account.name}: {error}"
    waiting = _oversize_of(row) if row is not None else []
    if warning is None and waiting:
        # Never fetched, so neither stored nor a dead letter: only someone can pass them on.
        warning = (f"imap {account.name}: {len(waiting)} message(s) over max_message_bytes "
                   f"({account.max_message_bytes}) wait in {account.folder}, never fetched (UIDs "
                   f"{', '.join(str(w[1]) for w in waiting[:20])}): pass them on by hand (`mailgate ingest`) "
                   "and take them out of the folder; this warning ends then")
    return {
        "name": account.name,
        "host": account.host,
        "folder": account.folder,
        "queue": account.queue,
        "shadow": account.shadow,
        "uidvalidity": row.uidvalidity if row else None,
        "last_uid": row.last_uid if row else 0,
        "last_ok_at": iso(ok_at),
        "last_error": error,
        "last_error_at": iso(err_at),
        "ok": ok_at is not None and (err_at is None or ok_at >= err_at),
        "warning": warning,
    }


def imap_health(engine: Engine, accounts: Sequence[ImapAccount],
                now: datetime) -> list[dict[str, Any]]:
    """Per mailbox: position, last success, last error, and a warning if unreachable too long."""
    with session_scope(engine) as s:
        rows = {r.account: r for r in s.exec(select(ImapState)).all()}
    return [_health_of(a, rows.get(a.name), as_utc(now)) for a in accounts]


async def check_login_async(account: ImapAccount, timeout: float = 20.0) -> str:
    session = _Session(account, timeout=timeout)
    try:
        await asyncio.wait_for(session.open(), timeout)
        await asyncio.wait_for(session.select(account.folder), timeout)
        return ""
    except Exception as exc:  # noqa: BLE001 - doctor reports, never raises
        return f"imap {account.name}: {_one_line(exc)}"
    finally:
        await session.close()


def check_login(account: ImapAccount) -> str:
    """For `mailgate doctor`: '' if login and SELECT work, else one error line."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(check_login_async(account))
    # Called from inside a running loop: asyncio.run would refuse, use a thread.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, check_login_async(account)).result()
