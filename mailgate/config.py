"""TOML -> frozen, validated settings.

Defaults live here, in one place; config.example.toml documents them. The
settings object is passed explicitly to whoever needs it: there is no global.
A bad key or value raises ConfigError with one line that names the key.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

from mailgate.domain import base_address

DEFAULT_CONFIG_PATH = Path("/etc/mailgate/config.toml")

_ADDRESS_RE = re.compile(r"^[^@\s<>()\[\],;:\"]+@[A-Za-z0-9.-]+\.[A-Za-z0-9-]+$|^[^@\s]+@localhost$")
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


# Upper bounds of durations, in seconds. A duration must stay a date when added to now
# (deadline_hours = 1e8 made every mail fail with OverflowError), and beyond these a value
# is a typo rather than a policy.
HOUR = 3600.0
DAY = 24 * HOUR
YEAR = 365 * DAY


class ConfigError(Exception):
    """A bad configuration file, key or value. str() is one line naming the key."""


@dataclass(frozen=True)
class DatabaseSettings:
    url: str
    echo: bool = False
    busy_timeout_seconds: float = 30.0


@dataclass(frozen=True)
class SmtpSettings:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 2525
    lmtp: bool = False
    max_message_bytes: int = 25 * 1024 * 1024
    hostname: str = "mailgate"


@dataclass(frozen=True)
class OutboundSettings:
    url: str  # maildir:PATH or smtp://host:port
    starttls: bool = False
    user: str | None = None
    password: str | None = None
    ca_file: Path | None = None  # a private CA for the relay's certificate (default: the system store)
    timeout_seconds: float = 30.0
    max_attempts: int = 60
    retry_base_seconds: float = 30.0
    retry_max_seconds: float = 3600.0
    deadline_hours: float = 48.0
    poll_seconds: float = 1.0
    verp: bool = False  # a per-mail envelope sender, support+bounce-TAG@, that bounces prove themselves by
    helo_name: str | None = None  # EHLO name; None: smtp.hostname if it has a dot, else this host's FQDN

    @property
    def scheme(self) -> str:
        return self.url.split(":", 1)[0]

    @property
    def maildir(self) -> Path:
        return Path(self.url.split(":", 1)[1])


@dataclass(frozen=True)
class ImapAccount:
    name: str
    host: str
    username: str
    queue: str
    port: int = 993
    tls: str = "ssl"  # ssl | starttls | none
    password: str | None = None
    password_command: str | None = None
    oauth2_token_command: str | None = None
    folder: str = "INBOX"
    after: str = "move"  # move | seen | delete
    move_to: str = "Processed"
    failed_folder: str = "Failed"
    batch_size: int = 50
    poll_seconds: float = 60.0
    idle: bool = True
    max_message_bytes: int = 25 * 1024 * 1024
    unreachable_warning_minutes: float = 30.0
    ca_file: Path | None = None
    shadow: bool = False


@dataclass(frozen=True)
class StatusDef:
    name: str
    kind: str  # new | open | pending | solved | closed
    notify_requester: bool = False


@dataclass(frozen=True)
class Agent:
    email: str
    name: str
    role: str = "agent"  # agent | admin
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class AssignmentRule:
    target: str  # an agent email or "group:NAME"
    category: str | None = None
    queue: str | None = None
    sender_domain: str | None = None
    subject_keywords: tuple[str, ...] = ()
    strategy: str = "round-robin"  # round-robin | least-open | notify (group: stay unassigned, tell all)


@dataclass(frozen=True)
class HelpdeskSettings:
    address: str
    comment_address: str
    subject_tag: str
    secret_key: str
    data_dir: Path
    name: str = "Support"
    queues: tuple[str, ...] = ()
    templates_dir: Path | None = None
    statuses: tuple[StatusDef, ...] = ()
    priorities: tuple[str, ...] = ("low", "normal", "high", "urgent")
    default_priority: str = "normal"
    categories: tuple[str, ...] = ()
    trusted_authserv_ids: tuple[str, ...] = ()
    auto_reply_limit_per_hour: int = 5
    auto_reply_limit_per_day: int = 40
    new_tickets_per_sender_per_hour: int = 20
    max_attempts: int = 5
    worker_poll_seconds: float = 0.5
    parse_processes: int = 1
    parse_timeout_seconds: float = 300.0
    notify_group_on_new: bool = True
    ratings: tuple[str, ...] = ("1", "2", "3", "4", "5")

    @property
    def all_addresses(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.address, self.comment_address, *self.queues)))

    def status(self, name: str) -> StatusDef | None:
        for s in self.statuses:
            if s.name == name:
                return s
        return None


@dataclass(frozen=True)
class SpamSettings:
    enabled: bool = True
    threshold: float = 0.9
    model_path: Path | None = None  # None: data_dir/spam-model.npz, seeded from the shipped model
    retention_days: int = 30
    # Mail with a smaller share of words the model knows is never held (mailgate.spamfilter).
    min_known_words: float = 0.3
    # Held mail is listed by mail at most this often (0: never), to digest_to or the admins,
    # so that a customer's mail held by mistake is seen before it is purged.
    digest_hours: float = 24.0
    digest_to: tuple[str, ...] = ()


@dataclass(frozen=True)
class SlaTarget:
    first_response_hours: float
    resolution_hours: float


@dataclass(frozen=True)
class SlaTier:
    name: str
    targets: Mapping[str, SlaTarget]  # by priority
    always_on: bool = False  # 24x7


@dataclass(frozen=True)
class SlaSettings:
    timezone: str = "UTC"
    hours: Mapping[str, tuple[time, time] | None] = field(default_factory=dict)
    holidays_country: str | None = None
    extra_holidays: tuple[str, ...] = ()
    default_tier: str = "customer"
    tiers: tuple[SlaTier, ...] = ()
    tier_rules: Mapping[str, str] = field(default_factory=dict)  # address or @domain -> tier
    warn_before_minutes: float = 60.0
    escalation_groups: tuple[str, ...] = ("L1", "L2", "L3")
    auto_close_solved_days: float = 7.0
    pending_reminder_days: float = 3.0
    pending_close_days: float = 10.0


@dataclass(frozen=True)
class LogSettings:
    level: str = "INFO"


@dataclass(frozen=True)
class Settings:
    path: Path | None
    database: DatabaseSettings
    smtp: SmtpSettings
    outbound: OutboundSettings
    helpdesk: HelpdeskSettings
    agents: tuple[Agent, ...]
    imap: tuple[ImapAccount, ...] = ()
    spam: SpamSettings = SpamSettings()
    sla: SlaSettings = SlaSettings()
    assignment: tuple[AssignmentRule, ...] = ()
    log: LogSettings = LogSettings()

    def agent(self, email: str) -> Agent | None:
        email = email.lower()
        for a in self.agents:
            if a.email == email:
                return a
        return None

    def group_members(self, group: str) -> tuple[Agent, ...]:
        return tuple(a for a in self.agents if group in a.groups)

    @property
    def quarantine_digest_to(self) -> tuple[str, ...]:
        """Who gets the quarantine digest: spam.digest_to, else every admin."""
        return self.spam.digest_to or tuple(a.email for a in self.agents if a.role == "admin")

    @property
    def raw_dir(self) -> Path:
        return self.helpdesk.data_dir / "raw"

    @property
    def spam_model_path(self) -> Path:
        return self.spam.model_path or self.helpdesk.data_dir / "spam-model.npz"


DEFAULT_STATUSES = (
    StatusDef("new", "new"),
    StatusDef("open", "open"),
    StatusDef("pending", "pending", notify_requester=True),
    StatusDef("on-hold", "pending"),
    StatusDef("solved", "solved", notify_requester=True),
    StatusDef("closed", "closed", notify_requester=True),
)
_STATUS_KINDS = ("new", "open", "pending", "solved", "closed")


class _Section:
    """Reads one TOML table, remembering the dotted key for error messages."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: must be a table")
        self.data = data
        self.where = where
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ..., *,
            required: bool = False) -> Any:
        self.used.add(name)
        if name not in self.data:
            if required or default is ...:
                raise ConfigError(f"{self.key(name)}: required key is missing")
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if bool not in kinds and isinstance(value, bool) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise ConfigError(f"{self.key(name)}: expected {names}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            # TOML has nan and inf; every later comparison with them is false.
            raise ConfigError(f"{self.key(name)}: must be a finite number, got {value!r}")
        return value

    def positive(self, name: str, kind: type, default: Any, *, at_most: float | None = None) -> Any:
        value = self.get(name, kind, default)
        if value <= 0:
            raise ConfigError(f"{self.key(name)}: must be greater than 0, got {value!r}")
        if at_most is not None and value > at_most:
            raise ConfigError(f"{self.key(name)}: must be at most {at_most:g}, got {value!r}")
        return value

    def address(self, name: str, default: Any = ...) -> str:
        value = self.get(name, str, default)
        return _check_address(self.key(name), value)

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(name, str, default)
        if value not in choices:
            raise ConfigError(f"{self.key(name)}: must be one of {', '.join(choices)}, got {value!r}")
        return value

    def str_list(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.get(name, list, list(default))
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.key(name)}: expected a list of strings")
        return tuple(value)

    def sub(self, name: str) -> _Section:
        self.used.add(name)
        return _Section(self.data.get(name, {}), self.key(name))

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key")


def _check_address(key: str, value: str) -> str:
    if not _ADDRESS_RE.match(value):
        raise ConfigError(f"{key}: not an email address: {value!r}")
    return value.lower()


def _check_our_address(key: str, value: str) -> str:
    """One of the help desk's own addresses: mail to its plus forms carries reply tokens and
    bounce tags (support+12-tok@, support+bounce-tag@), so it must have no + of its own."""
    value = _check_address(key, value)
    if "+" in value.split("@", 1)[0]:
        raise ConfigError(f"{key}: must not contain '+' (its plus forms carry reply tokens), got {value!r}")
    return value


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def load_settings(path: Path | str) -> Settings:
    """Read and validate a config file. Raises ConfigError (one line) on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    settings = settings_from_dict(data, base=path.resolve().parent, path=path.resolve())
    _check_paths(settings)
    return settings


def _check_paths(s: Settings) -> None:
    """Paths the file names that cannot be what they are for. Here, not in settings_from_dict:
    that one describes a configuration, and this machine may not be where it runs."""
    if s.helpdesk.data_dir.exists() and not s.helpdesk.data_dir.is_dir():
        raise ConfigError(f"helpdesk.data_dir: not a directory: {s.helpdesk.data_dir}")
    if s.helpdesk.templates_dir is not None and not s.helpdesk.templates_dir.is_dir():
        # Skipped quietly, the site's templates would never be used.
        raise ConfigError(f"helpdesk.templates_dir: not a directory: {s.helpdesk.templates_dir}")
    ca_files = [("outbound.ca_file", s.outbound.ca_file)] + [
        (f"imap[{i}].ca_file", a.ca_file) for i, a in enumerate(s.imap)]
    for key, ca_file in ca_files:
        if ca_file is not None and not ca_file.is_file():
            raise ConfigError(f"{key}: no such file: {ca_file}")


def settings_from_dict(data: dict[str, Any], *, base: Path, path: Path | None = None) -> Settings:
    root = _Section(data, "")
    db = _database(root.sub("database"), base)
    smtp = _smtp(root.sub("smtp"))
    outbound = _outbound(root.sub("outbound"), base)
    helpdesk = _helpdesk(root.sub("helpdesk"), base)
    agents = _agents(root, helpdesk)
    imap = _imap(root, helpdesk, base)
    spam = _spam(root.sub("spam"), base, helpdesk)
    sla = _sla(root.sub("sla"), helpdesk)
    assignment = _assignment(root, helpdesk, agents)
    log_sec = root.sub("log")
    log = LogSettings(level=log_sec.choice("level", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO"))
    log_sec.finish()
    root.finish()
    return Settings(path=path, database=db, smtp=smtp, outbound=outbound, helpdesk=helpdesk,
                    agents=agents, imap=imap, spam=spam, sla=sla, assignment=assignment, log=log)


def _comment_address(sec: _Section, address: str, queues: tuple[str, ...]) -> str:
    """Mail to the comment address is an internal note: if it were also a queue, every
    agent's answer would be kept as a note and never reach the customer."""
    value = _check_our_address(sec.key("comment_address"), sec.get("comment_address", str, ...))
    if base_address(value) in {base_address(a) for a in (address, *queues)}:
        raise ConfigError(f"helpdesk.comment_address: must differ from helpdesk.address and helpdesk.queues, "
                          f"got {value!r}")
    return value


def _database(sec: _Section, base: Path) -> DatabaseSettings:
    url = sec.get("url", str, required=True)
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and ":memory:" not in url:
        url = "sqlite:///" + str(_resolve(base, url[len("sqlite:///"):]))
    elif not url.startswith(("sqlite:", "postgresql")):
        raise ConfigError(f"database.url: must start with sqlite:/// or postgresql, got {url!r}")
    if url == "sqlite://" or ":memory:" in url or not url.startswith(("sqlite:///", "postgresql://", "postgresql+")):
        # "sqlite://" is a database in memory: each process would have its own, empty.
        raise ConfigError(f"database.url: must be sqlite:///PATH or postgresql+psycopg://..., got {url!r}")
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception as exc:
        raise ConfigError(f"database.url: not a database URL ({exc}), got {url!r}") from None
    try:
        parsed.get_dialect()  # names a dialect SQLAlchemy has (the driver is imported at connect)
    except Exception as exc:
        raise ConfigError(f"database.url: {exc}, got {safe_url(url)!r}") from None
    echo = sec.get("echo", bool, False)
    busy = sec.positive("busy_timeout_seconds", float, 30.0, at_most=HOUR)
    sec.finish()
    return DatabaseSettings(url=url, echo=echo, busy_timeout_seconds=busy)


def safe_url(url: str) -> str:
    """A database URL to print: its password, if any, as ***."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads: no password part it could hide either
        return url


def _port(sec: _Section, name: str, default: int, *, lowest: int = 0) -> int:
    """lowest 0 for a port we listen on (0: any free one), 1 for one we connect to."""
    port = sec.get(name, int, default)
    if not lowest <= port <= 65535:
        raise ConfigError(f"{sec.key(name)}: must be a port number {lowest}-65535, got {port}")
    return port


def _nonempty(sec: _Section, name: str, default: Any = ..., *, why: str = "") -> str:
    value = sec.get(name, str, default, required=default is ...)
    if not value.strip():
        raise ConfigError(f"{sec.key(name)}: must not be empty{why}")
    return value


def _smtp(sec: _Section) -> SmtpSettings:
    s = SmtpSettings(
        enabled=sec.get("enabled", bool, True),
        host=_nonempty(sec, "host", "127.0.0.1", why=" (0.0.0.0 or :: listens on every address)"),
        port=_port(sec, "port", 2525),
        lmtp=sec.get("lmtp", bool, False),
        max_message_bytes=sec.positive("max_message_bytes", int, 25 * 1024 * 1024),
        hostname=sec.get("hostname", str, "mailgate"),
    )
    sec.finish()
    return s


def _outbound(sec: _Section, base: Path) -> OutboundSettings:
    url = sec.get("url", str, required=True)
    if url.startswith("maildir:"):
        if not url[len("maildir:"):].strip():
            raise ConfigError("outbound.url: maildir: needs a folder, e.g. maildir:var/sent")
        url = "maildir:" + str(_resolve(base, url[len("maildir:"):]))
    else:
        m = re.match(r"^smtps?://[^:/]+(?::(\d+))?/?$", url)
        if not m:
            raise ConfigError(f"outbound.url: must be maildir:PATH or smtp://host:port, got {url!r}")
        if m.group(1) is not None and not 0 < int(m.group(1)) <= 65535:
            raise ConfigError(f"outbound.url: port must be 1-65535, got {url!r}")
    ca_file = sec.get("ca_file", str, None)
    s = OutboundSettings(
        url=url,
        starttls=sec.get("starttls", bool, False),
        user=sec.get("user", str, None),
        password=_secret_from_env(sec, "password"),
        ca_file=_resolve(base, ca_file) if ca_file else None,
        # At most 120: a row's whole send must end within outbox.STALE_SENDING.
        timeout_seconds=sec.positive("timeout_seconds", float, 30.0, at_most=120),
        max_attempts=sec.positive("max_attempts", int, 60),
        retry_base_seconds=sec.positive("retry_base_seconds", float, 30.0, at_most=DAY),
        retry_max_seconds=sec.positive("retry_max_seconds", float, 3600.0, at_most=DAY),
        deadline_hours=sec.positive("deadline_hours", float, 48.0, at_most=YEAR / HOUR),
        poll_seconds=sec.positive("poll_seconds", float, 1.0, at_most=HOUR),
        verp=sec.get("verp", bool, False),
        helo_name=sec.get("helo_name", str, None),
    )
    if s.helo_name is not None and not valid_helo_name(s.helo_name):
        raise ConfigError(f"outbound.helo_name: must be a host name such as mail.example.com or an "
                          f"address literal such as [192.0.2.1] or [IPv6:2001:db8::1], got {s.helo_name!r}")
    if bool(s.user) != bool(s.password):
        # A user without a password (or the reverse) is a half-done setup: the relay refuses
        # the login, or the password is never used, and mail waits in the outbox.
        raise ConfigError("outbound.user and outbound.password: give both or neither")
    if s.user and s.scheme == "smtp" and not s.starttls and not _is_loopback(s.url.split("://", 1)[1]):
        raise ConfigError("outbound.user: the password would cross the network in clear text: "
                          "use smtps://, or starttls = true (plain smtp:// with a login only to this host)")
    sec.finish()
    return s


_DOMAIN_RE = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def valid_helo_name(name: str) -> bool:
    """RFC 5321 4.1.1.1: the EHLO argument is a domain or an address literal, [192.0.2.1]
    or [IPv6:2001:db8::1]."""
    if name.startswith("[") and name.endswith("]"):
        literal = name[1:-1]
        try:
            if literal[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            return False
        return True
    return bool(_DOMAIN_RE.fullmatch(name))


def _is_loopback(host_port: str) -> bool:
    host = host_port.rstrip("/").partition(":")[0]  # outbound.url has no IPv6 literal
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# secret_key values printed in DESIGN.md and config.example.toml: anyone can compute reply
# tokens with them and act as an agent. Accepted for a trial on the example config (its
# listener is on loopback, its mail goes to a maildir); `doctor` fails and `run` warns.
PUBLISHED_SECRET_KEYS = frozenset({"change-me", "change-me-to-something-long-and-random"})
SECRET_KEY_PUBLISHED = (
    "helpdesk.secret_key is the published example value: anyone can forge reply tokens and act as an "
    "agent; set a random one, e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")


def published_secret_key(settings: Settings) -> bool:
    return settings.helpdesk.secret_key in PUBLISHED_SECRET_KEYS


def _helpdesk(sec: _Section, base: Path) -> HelpdeskSettings:
    address = _check_our_address(sec.key("address"), sec.get("address", str, ...))
    tag = sec.get("subject_tag", str, required=True)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,30}", tag):
        raise ConfigError(f"helpdesk.subject_tag: letters, digits, '.', '_' or '-' only, got {tag!r}")
    secret = sec.get("secret_key", str, required=True)
    if len(secret) < 8:
        raise ConfigError("helpdesk.secret_key: must be at least 8 characters")
    statuses = _statuses(sec)
    priorities = sec.str_list("priorities", ("low", "normal", "high", "urgent"))
    default_priority = sec.get("default_priority", str, "normal")
    if default_priority not in priorities:
        raise ConfigError(f"helpdesk.default_priority: {default_priority!r} is not in helpdesk.priorities")
    templates_dir = sec.get("templates_dir", str, None)
    queues = tuple(_check_our_address("helpdesk.queues", q) for q in sec.str_list("queues"))
    s = HelpdeskSettings(
        address=address,
        comment_address=_comment_address(sec, address, queues),
        subject_tag=tag,
        secret_key=secret,
        data_dir=_resolve(base, _nonempty(sec, "data_dir")),
        name=sec.get("name", str, "Support"),
        queues=queues,
        templates_dir=_resolve(base, templates_dir) if templates_dir else None,
        statuses=statuses,
        priorities=priorities,
        default_priority=default_priority,
        categories=sec.str_list("categories"),
        trusted_authserv_ids=sec.str_list("trusted_authserv_ids"),
        auto_reply_limit_per_hour=sec.positive("auto_reply_limit_per_hour", int, 5),
        auto_reply_limit_per_day=sec.positive("auto_reply_limit_per_day", int, 40),
        new_tickets_per_sender_per_hour=sec.positive("new_tickets_per_sender_per_hour", int, 20),
        max_attempts=sec.positive("max_attempts", int, 5),
        worker_poll_seconds=sec.positive("worker_poll_seconds", float, 0.5, at_most=HOUR),
        parse_processes=_parse_processes(sec),
        parse_timeout_seconds=sec.positive("parse_timeout_seconds", float, 300.0, at_most=DAY),
        notify_group_on_new=sec.get("notify_group_on_new", bool, True),
        ratings=sec.str_list("ratings", ("1", "2", "3", "4", "5")),
    )
    sec.finish()
    return s


def _parse_processes(sec: _Section) -> int:
    value = sec.get("parse_processes", int, 1)
    if not 0 <= value <= 16:
        raise ConfigError(f"{sec.key('parse_processes')}: must be between 0 and 16, got {value!r}")
    return value


def _statuses(sec: _Section) -> tuple[StatusDef, ...]:
    if "statuses" not in sec.data:
        sec.used.add("statuses")
        return DEFAULT_STATUSES
    raw = sec.get("statuses", list)
    out: list[StatusDef] = []
    for i, item in enumerate(raw):
        s = _Section(item, f"helpdesk.statuses[{i}]")
        name = _nonempty(s, "name")
        if name.lower() in {o.name.lower() for o in out}:
            raise ConfigError(f"helpdesk.statuses[{i}].name: {name!r} is listed twice")
        kind = s.choice("kind", _STATUS_KINDS, "open")
        out.append(StatusDef(name, kind, s.get("notify_requester", bool, False)))
        s.finish()
    kinds = {s.kind for s in out}
    for needed in ("new", "open", "solved", "closed"):
        if needed not in kinds:
            raise ConfigError(f"helpdesk.statuses: needs at least one status of kind {needed!r}")
    return tuple(out)


def _agents(root: _Section, helpdesk: HelpdeskSettings) -> tuple[Agent, ...]:
    raw = root.get("agents", list, [])
    out: list[Agent] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        s = _Section(item, f"agents[{i}]")
        email = s.address("email")
        if email in seen:
            raise ConfigError(f"agents[{i}].email: {email} is listed twice")
        if base_address(email) in helpdesk.all_addresses:
            # A plus form too: mail to it reaches our own mailbox, and mail from it is ours.
            raise ConfigError(f"agents[{i}].email: {email} is one of the help desk's own addresses")
        seen.add(email)
        out.append(Agent(
            email=email,
            name=s.get("name", str, email.split("@")[0]),
            role=s.choice("role", ("agent", "admin"), "agent"),
            groups=s.str_list("groups"),
        ))
        s.finish()
    return tuple(out)


def _secret_from_env(sec: _Section, name: str) -> str | None:
    """A secret given as is, or as "env:VAR" so that it stays out of the file."""
    value = sec.get(name, str, None)
    if value and value.startswith("env:"):
        var = value[4:]
        if not os.environ.get(var):
            # Said here, naming the key: otherwise the missing secret shows up later as a
            # login failure or a misleading "password is required".
            raise ConfigError(f"{sec.key(name)}: environment variable {var} is not set")
        return os.environ[var]
    return value


def _imap(root: _Section, helpdesk: HelpdeskSettings, base: Path) -> tuple[ImapAccount, ...]:
    raw = root.get("imap", list, [])
    out: list[ImapAccount] = []
    for i, item in enumerate(raw):
        s = _Section(item, f"imap[{i}]")
        tls = s.choice("tls", ("ssl", "starttls", "none"), "ssl")
        host = s.get("host", str, required=True)
        username = s.get("username", str, required=True)
        ca_file = s.get("ca_file", str, None)
        acct = ImapAccount(
            name=s.get("name", str, f"{username}@{host}"),
            host=host,
            username=username,
            queue=s.address("queue", helpdesk.address),
            port=_port(s, "port", 993 if tls == "ssl" else 143, lowest=1),
            tls=tls,
            password=_secret_from_env(s, "password"),
            password_command=s.get("password_command", str, None),
            oauth2_token_command=s.get("oauth2_token_command", str, None),
            folder=s.get("folder", str, "INBOX"),
            after=s.choice("after", ("move", "seen", "delete"), "move"),
            move_to=s.get("move_to", str, "Processed"),
            failed_folder=s.get("failed_folder", str, "Failed"),
            batch_size=s.positive("batch_size", int, 50),
            poll_seconds=s.positive("poll_seconds", float, 60.0, at_most=DAY),
            idle=s.get("idle", bool, True),
            max_message_bytes=s.positive("max_message_bytes", int, 25 * 1024 * 1024),
            unreachable_warning_minutes=s.positive("unreachable_warning_minutes", float, 30.0, at_most=YEAR / 60),
            ca_file=_resolve(base, ca_file) if ca_file else None,
            shadow=s.get("shadow", bool, False),
        )
        if not (acct.password or acct.password_command or acct.oauth2_token_command):
            raise ConfigError(f"imap[{i}].password: one of password, password_command or "
                              "oauth2_token_command is required")
        if acct.queue not in helpdesk.all_addresses:
            raise ConfigError(f"imap[{i}].queue: {acct.queue} is not helpdesk.address or one of helpdesk.queues")
        out.append(acct)
        s.finish()
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise ConfigError("imap: two accounts share a name; give each a distinct 'name'")
    return tuple(out)


def _spam(sec: _Section, base: Path, helpdesk: HelpdeskSettings) -> SpamSettings:
    threshold = sec.get("threshold", float, 0.9)
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"spam.threshold: must be in (0, 1], got {threshold}")
    model_path = sec.get("model_path", str, None)
    min_known_words = sec.get("min_known_words", float, 0.3)
    if not 0.0 <= min_known_words <= 1.0:
        raise ConfigError(f"spam.min_known_words: must be in [0, 1], got {min_known_words}")
    digest_hours = sec.get("digest_hours", float, 24.0)
    if not 0 <= digest_hours <= YEAR / HOUR:
        raise ConfigError(f"spam.digest_hours: must be 0 (no digest) to {YEAR / HOUR:g}, got {digest_hours}")
    s = SpamSettings(
        enabled=sec.get("enabled", bool, True),
        threshold=threshold,
        model_path=_resolve(base, model_path) if model_path else None,
        retention_days=sec.positive("retention_days", int, 30, at_most=10 * YEAR / DAY),
        min_known_words=min_known_words,
        digest_hours=digest_hours,
        digest_to=tuple(_check_address("spam.digest_to", a) for a in sec.str_list("digest_to")),
    )
    for address in s.digest_to:
        if base_address(address) in helpdesk.all_addresses:
            # The list would come straight back in as mail, its #release lines and all.
            raise ConfigError(f"spam.digest_to: {address} is one of the help desk's own addresses")
    sec.finish()
    return s


def _parse_hours(key: str, value: str) -> tuple[time, time] | None:
    if value.strip().lower() in ("", "closed", "off"):
        return None
    m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", value)
    if not m:
        raise ConfigError(f"{key}: expected 'HH:MM-HH:MM' or 'closed', got {value!r}")
    h1, m1, h2, m2 = (int(x) for x in m.groups())
    try:
        start = time(h1, m1)
        end = time(h2, m2) if (h2, m2) != (24, 0) else time(23, 59, 59, 999999)
    except ValueError:
        raise ConfigError(f"{key}: not a valid time range: {value!r}") from None
    if end <= start:
        raise ConfigError(f"{key}: end must be after start: {value!r}")
    return start, end


# Business hours to the first response and to resolution, by priority (config.example.toml's
# `customer` tier); a priority a site adds gets the normal one's.
_DEFAULT_TARGETS = {"low": SlaTarget(16.0, 80.0), "normal": SlaTarget(8.0, 40.0),
                    "high": SlaTarget(4.0, 16.0), "urgent": SlaTarget(1.0, 8.0)}


def _default_target(priority: str) -> SlaTarget:
    return _DEFAULT_TARGETS.get(priority.lower(), _DEFAULT_TARGETS["normal"])


def _sla(sec: _Section, helpdesk: HelpdeskSettings) -> SlaSettings:
    tz = sec.get("timezone", str, "UTC")
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo(tz)
    except Exception:
        raise ConfigError(f"sla.timezone: unknown time zone {tz!r}") from None
    hours_sec = sec.sub("hours")
    hours: dict[str, tuple[time, time] | None] = {}
    for day in _DAYS:
        default = "09:00-17:00" if day not in ("sat", "sun") else "closed"
        hours[day] = _parse_hours(hours_sec.key(day), hours_sec.get(day, str, default))
    hours_sec.finish()
    tiers: list[SlaTier] = []
    for i, item in enumerate(sec.get("tiers", list, [])):
        t = _Section(item, f"sla.tiers[{i}]")
        name = t.get("name", str, required=True)
        always_on = t.get("always_on", bool, False)
        targets_sec = t.sub("targets")
        targets: dict[str, SlaTarget] = {}
        for prio in helpdesk.priorities:
            p = targets_sec.sub(prio)
            default = _default_target(prio)
            resolution = p.positive("resolution_hours", float, default.resolution_hours)
            # A tier that sets only the resolution time: the first response is due no later.
            first = p.positive("first_response_hours", float, min(default.first_response_hours, resolution))
            if first > resolution:
                raise ConfigError(f"{p.key('first_response_hours')}: {first:g} h is more than resolution_hours "
                                  f"{resolution:g} h")
            if resolution > YEAR / HOUR:
                raise ConfigError(f"{p.key('resolution_hours')}: must be at most {YEAR / HOUR:g}, got {resolution:g}")
            targets[prio] = SlaTarget(first_response_hours=first, resolution_hours=resolution)
            p.finish()
        targets_sec.finish()
        tiers.append(SlaTier(name=name, targets=targets, always_on=always_on))
        t.finish()
    if not tiers:
        tiers.append(SlaTier(name="customer", targets={p: _default_target(p) for p in helpdesk.priorities}))
    if all(h is None for h in hours.values()) and not all(t.always_on for t in tiers):
        # No due time could ever be computed: every new ticket would fail.
        raise ConfigError("sla.hours: every day is closed; open at least one, or make every tier always_on")
    tier_names = {t.name for t in tiers}
    default_tier = sec.get("default_tier", str, tiers[0].name if "customer" not in tier_names
                           else "customer")
    if default_tier not in tier_names:
        raise ConfigError(f"sla.default_tier: {default_tier!r} is not one of the sla.tiers")
    rules_sec = sec.sub("tier_rules")
    rules: dict[str, str] = {}
    for pattern in list(rules_sec.data):
        tier = rules_sec.get(pattern, str)
        if tier not in tier_names:
            raise ConfigError(f"sla.tier_rules.{pattern}: {tier!r} is not one of the sla.tiers")
        rules[pattern.lower()] = tier
    rules_sec.finish()
    extra_holidays = sec.str_list("extra_holidays")
    for day in extra_holidays:
        try:
            date.fromisoformat(day)
        except ValueError:
            raise ConfigError(f"sla.extra_holidays: not a date (YYYY-MM-DD): {day!r}") from None
    country = sec.get("holidays_country", str, None)
    if country:
        import holidays

        if country.upper() not in holidays.list_supported_countries():
            raise ConfigError(f"sla.holidays_country: unknown country code {country!r}")
    s = SlaSettings(
        timezone=tz,
        hours=hours,
        holidays_country=country.upper() if country else None,
        extra_holidays=extra_holidays,
        default_tier=default_tier,
        tiers=tuple(tiers),
        tier_rules=rules,
        warn_before_minutes=sec.positive("warn_before_minutes", float, 60.0, at_most=YEAR / 60),
        escalation_groups=sec.str_list("escalation_groups", ("L1", "L2", "L3")),
        auto_close_solved_days=sec.positive("auto_close_solved_days", float, 7.0, at_most=10 * YEAR / DAY),
        pending_reminder_days=sec.positive("pending_reminder_days", float, 3.0, at_most=10 * YEAR / DAY),
        pending_close_days=sec.positive("pending_close_days", float, 10.0, at_most=10 * YEAR / DAY),
    )
    sec.finish()
    _check_targets_reachable(s)
    return s


def _check_targets_reachable(s: SlaSettings) -> None:
    """Due times are computed up to ten years ahead (sla.add_business_time): a target that
    the business hours, less the holidays, do not reach by then failed every new ticket of
    its priority. Checked with the calendar the runtime builds (the holidays package costs a
    fifth of a second to load), only for targets over 300 weeks of open hours: holidays
    never close the 222 weeks more that ten years have."""
    from datetime import UTC, timedelta

    from mailgate.sla import BusinessCalendar, add_business_time, holiday_dates

    weekly = sum((datetime.combine(date.min, h[1]) - datetime.combine(date.min, h[0])).total_seconds()
                 for h in s.hours.values() if h is not None) / HOUR
    large = [(i, prio, target.resolution_hours) for i, tier in enumerate(s.tiers) if not tier.always_on
             for prio, target in tier.targets.items() if target.resolution_hours > weekly * 300]
    if not large:
        return
    now = datetime.now(UTC)
    calendar = BusinessCalendar(timezone=s.timezone, hours=s.hours, holidays=holiday_dates(
        s.holidays_country, s.extra_holidays, range(now.year - 1, now.year + 3)))
    for i, prio, hours in large:
        try:
            add_business_time(calendar, now, timedelta(hours=hours))
        except ValueError:
            raise ConfigError(f"sla.tiers[{i}].targets.{prio}.resolution_hours: {hours:g} business hours are not "
                              "reached within ten years of sla.hours, holidays taken out") from None


def _assignment(root: _Section, helpdesk: HelpdeskSettings,
                agents: tuple[Agent, ...]) -> tuple[AssignmentRule, ...]:
    raw = root.get("assignment", list, [])
    groups = {g for a in agents for g in a.groups}
    emails = {a.email for a in agents}
    out: list[AssignmentRule] = []
    for i, item in enumerate(raw):
        s = _Section(item, f"assignment[{i}]")
        target = s.get("target", str, required=True)
        if target.startswith("group:"):
            if target[6:] not in groups:
                raise ConfigError(f"assignment[{i}].target: no agent is in group {target[6:]!r}")
        elif target.lower() not in emails:
            raise ConfigError(f"assignment[{i}].target: {target!r} is not an agent or group:NAME")
        out.append(AssignmentRule(
            target=target if target.startswith("group:") else target.lower(),
            category=s.get("category", str, None),
            queue=_assignment_queue(s, helpdesk),
            sender_domain=(s.get("sender_domain", str, None) or "").lower() or None,
            subject_keywords=tuple(k.lower() for k in s.str_list("subject_keywords")),
            strategy=s.choice("strategy", ("round-robin", "least-open", "notify"), "round-robin"),
        ))
        s.finish()
    return tuple(out)


def _assignment_queue(s: _Section, helpdesk: HelpdeskSettings) -> str | None:
    queue = s.get("queue", str, None)
    if queue is not None and base_address(queue) not in {base_address(a) for a in (helpdesk.address, *helpdesk.queues)}:
        raise ConfigError(f"{s.key('queue')}: {queue!r} is not helpdesk.address or one of helpdesk.queues")
    return queue


def config_path(explicit: str | Path | None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get("MAILGATE_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG_PATH
