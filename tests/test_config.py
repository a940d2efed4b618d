"""Config: TOML -> frozen settings; every mistake is one line naming the key, exit 2 at start."""

from __future__ import annotations

import copy
import subprocess
from datetime import time
from pathlib import Path
from typing import Any

import pytest

from mailgate.config import ConfigError, load_settings, settings_from_dict
from tests.conftest import MAILGATE, REPO

BASE = Path("/srv/mailgate")

# The minimal config of DESIGN.md section 7, verbatim.
MINIMAL = """
[database]
url = "sqlite:///var/mailgate.db"     # or postgresql+psycopg://...

[smtp]                                 # inbound listener
host = "127.0.0.1"
port = 2525

[outbound]
url = "maildir:var/sent"               # or smtp://host:port (starttls, user, password keys)

[helpdesk]
address = "support@example.com"
comment_address = "support-comment@example.com"
subject_tag = "EXAMPLE"
secret_key = "change-me"
data_dir = "var"                       # raw mail, attachments, quarantine, dead letters

[[agents]]
email = "alice@example.com"
name = "Alice"
role = "admin"
groups = ["L1"]
"""

REQUIRED: dict[str, dict[str, Any]] = {
    "database": {"url": "sqlite:///var/mailgate.db"},
    "outbound": {"url": "maildir:var/sent"},
    "helpdesk": {"address": "support@example.com", "comment_address": "support-comment@example.com",
                 "subject_tag": "EXAMPLE", "secret_key": "change-me", "data_dir": "var"},
}
REQUIRED_KEYS = [f"{section}.{key}" for section, keys in REQUIRED.items() for key in keys]


def data(**changes: Any) -> dict[str, Any]:
    """The required keys, with `section__key=value` changes (None deletes the key)."""
    d = copy.deepcopy(REQUIRED)
    for name, value in changes.items():
        section, _, key = name.partition("__")
        if not key:
            d[section] = value
        elif value is None:
            d[section].pop(key, None)
        else:
            d.setdefault(section, {})[key] = value
    return d


def error(d: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as exc:
        settings_from_dict(d, base=BASE)
    message = str(exc.value)
    assert "\n" not in message
    return message


def without(text: str, dotted: str) -> str:
    """MINIMAL with one `key = ...` line removed from its section."""
    section, key = dotted.split(".")
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            current = stripped.strip("[]").split("]")[0].strip("[")
        if current == section and stripped.split("=")[0].strip() == key:
            continue
        out.append(line)
    return "\n".join(out) + "\n"


# --- at start: exit 2 and one line, never a traceback ---------------------------------

BAD_AT_START = [
    *[(without(MINIMAL, key), f"mailgate: config error: {key}: required key is missing") for key in REQUIRED_KEYS],
    (MINIMAL.replace("port = 2525", 'port = "2525"'), "mailgate: config error: smtp.port: expected int, got '2525'"),
    (MINIMAL.replace("[smtp]", "[smtp]\nhots = 'x'"), "mailgate: config error: smtp.hots: unknown key"),
    (MINIMAL.replace('url = "maildir:var/sent"', 'url = "smtp://relay:99999"'),
     "mailgate: config error: outbound.url: port must be 1-65535, got 'smtp://relay:99999'"),
    # Paths that cannot be what they are for: the site's templates were skipped quietly.
    (MINIMAL.replace('data_dir = "var"', 'data_dir = "var"\ntemplates_dir = "no-such-dir"'),
     "mailgate: config error: helpdesk.templates_dir: not a directory: "),
    (MINIMAL.replace('data_dir = "var"', 'data_dir = "config.toml"'),
     "mailgate: config error: helpdesk.data_dir: not a directory: "),
    (MINIMAL.replace('url = "maildir:var/sent"', 'url = "smtps://relay"\nca_file = "relay-ca.pem"'),
     "mailgate: config error: outbound.ca_file: no such file: "),
]


def test_mailgate_run_refuses_bad_config_with_one_line_exit_2(tmp_path: Path) -> None:
    """Each required key missing, and bad types, values and unknown keys, through `mailgate run`.

    The processes run side by side: each pays the interpreter start-up, not the test suite.
    """
    procs = []
    for i, (text, _) in enumerate(BAD_AT_START):
        d = tmp_path / str(i)
        d.mkdir()
        (d / "config.toml").write_text(text)
        procs.append(subprocess.Popen([*MAILGATE, "run", "--config", str(d / "config.toml")], cwd=d, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    missing_file = subprocess.Popen([*MAILGATE, "run", "--config", str(tmp_path / "nope.toml")], text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for proc, (_, expected) in zip(procs, BAD_AT_START, strict=True):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        assert out == ""
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith(expected), err
    out, err = missing_file.communicate(timeout=120)
    assert missing_file.returncode == 2
    assert err.startswith(f"mailgate: config error: cannot read config file {tmp_path / 'nope.toml'}")
    assert len(err.strip().splitlines()) == 1


def test_a_database_it_cannot_reach_is_one_line_for_run_and_db_upgrade(tmp_path: Path) -> None:
    """The two commands the systemd unit runs printed 130-160 lines of traceback."""
    url = "postgresql+psycopg://u:Sup3rS3cret@127.0.0.1:1/x"
    config = _write(tmp_path / "config.toml", MINIMAL.replace('"sqlite:///var/mailgate.db"', f'"{url}"').replace(
        '"change-me"', '"a-secret-nobody-published"'))
    url = url.replace("Sup3rS3cret", "***")  # never printed: systemd keeps stderr in the journal
    for command, prefix, code in ((["run"], "mailgate: cannot start: ", 1), (["db", "upgrade"], "mailgate: ", 75)):
        proc = subprocess.run([*MAILGATE, *command, "--config", str(config)], cwd=tmp_path, text=True,
                              capture_output=True, timeout=120)
        assert proc.returncode == code and proc.stdout == "", proc.stderr
        assert proc.stderr.startswith(f"{prefix}database {url}: OperationalError: (psycopg.OperationalError) "
                                      "connection failed"), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_missing_keys_are_named_exactly() -> None:
    for key in REQUIRED_KEYS:
        section, name = key.split(".")
        assert error(data(**{f"{section}__{name}": None})) == f"{key}: required key is missing"


# --- unit: values, types, unknown keys ------------------------------------------------------

@pytest.mark.parametrize(("changes", "message"), [
    ({"smtp": {"port": True}}, "smtp.port: expected int, got True"),
    ({"smtp": {"port": -1}}, "smtp.port: must be a port number 0-65535, got -1"),
    ({"smtp": {"enabled": "yes"}}, "smtp.enabled: expected bool, got 'yes'"),
    ({"smtp": {"max_message_bytes": 0}}, "smtp.max_message_bytes: must be greater than 0, got 0"),
    ({"smtp": "2525"}, "smtp: must be a table"),
    ({"helpdesk__data_dir": 5}, "helpdesk.data_dir: expected str, got 5"),
    ({"helpdesk__address": "support"}, "helpdesk.address: not an email address: 'support'"),
    ({"helpdesk__address": "a b@example.com"}, "helpdesk.address: not an email address: 'a b@example.com'"),
    ({"helpdesk__comment_address": "x@"}, "helpdesk.comment_address: not an email address: 'x@'"),
    ({"helpdesk__queues": ["sales"]}, "helpdesk.queues: not an email address: 'sales'"),
    ({"helpdesk__subject_tag": "EX AMPLE"}, "helpdesk.subject_tag: letters, digits, '.', '_' or '-' only"),
    ({"helpdesk__secret_key": "short"}, "helpdesk.secret_key: must be at least 8 characters"),
    ({"helpdesk__default_priority": "meh"}, "helpdesk.default_priority: 'meh' is not in helpdesk.priorities"),
    ({"helpdesk__colour": "blue"}, "helpdesk.colour: unknown key"),
    ({"helpdesk__parse_processes": -1}, "helpdesk.parse_processes: must be between 0 and 16, got -1"),
    ({"helpdesk__parse_processes": "2"}, "helpdesk.parse_processes: expected int, got '2'"),
    ({"outbound__url": "smtp://relay:99999"}, "outbound.url: port must be 1-65535"),
    ({"outbound__url": "smtp://relay:0"}, "outbound.url: port must be 1-65535"),
    ({"outbound__url": "ftp://relay"}, "outbound.url: must be maildir:PATH or smtp://host:port"),
    ({"outbound__starttls": 1}, "outbound.starttls: expected bool, got 1"),
    ({"outbound__verp": "yes"}, "outbound.verp: expected bool, got 'yes'"),
    ({"helpdesk__address": "help+desk@example.com"}, "helpdesk.address: must not contain '+'"),
    ({"helpdesk__queues": ["sales+x@example.com"]}, "helpdesk.queues: must not contain '+'"),
    ({"helpdesk__comment_address": "support+notes@example.com"}, "helpdesk.comment_address: must not contain '+'"),
    ({"agents": [{"email": "support+alice@example.com"}]},
     "agents[0].email: support+alice@example.com is one of the help desk's own addresses"),
    ({"database__url": "mysql://x"}, "database.url: must start with sqlite:/// or postgresql"),
    ({"agents": [{"email": "alice"}]}, "agents[0].email: not an email address: 'alice'"),
    ({"agents": [{"email": "a@example.com", "role": "boss"}]}, "agents[0].role: must be one of agent, admin"),
    ({"agents": [{"email": "a@example.com", "groups": "L1"}]}, "agents[0].groups: expected list, got 'L1'"),
    ({"agents": [{"email": "a@example.com", "nmae": "A"}]}, "agents[0].nmae: unknown key"),
    ({"agents": [{"email": "support@example.com"}]}, "agents[0].email: support@example.com is one of the help"),
    ({"sla": {"timezone": "Mars/Olympus"}}, "sla.timezone: unknown time zone 'Mars/Olympus'"),
    ({"sla": {"hours": {"mon": "9-17"}}}, "sla.hours.mon: expected 'HH:MM-HH:MM' or 'closed', got '9-17'"),
    ({"sla": {"hours": {"mon": "17:00-09:00"}}}, "sla.hours.mon: end must be after start"),
    ({"sla": {"hours": {"monday": "09:00-17:00"}}}, "sla.hours.monday: unknown key"),
    ({"sla": {"hours": {d: "closed" for d in ("mon", "tue", "wed", "thu", "fri")}}},
     "sla.hours: every day is closed; open at least one, or make every tier always_on"),
    ({"sla": {"holidays_country": "XX"}}, "sla.holidays_country: unknown country code 'XX'"),
    ({"sla": {"tiers": [{"name": "customer", "targets": {"low": {"first_response_hours": 20,
                                                                "resolution_hours": 10}}}]}},
     "sla.tiers[0].targets.low.first_response_hours: 20 h is more than resolution_hours 10 h"),
    ({"sla": {"extra_holidays": ["2026-13-01"]}}, "sla.extra_holidays: not a date (YYYY-MM-DD): '2026-13-01'"),
    ({"sla": {"default_tier": "gold"}}, "sla.default_tier: 'gold' is not one of the sla.tiers"),
    ({"sla": {"tier_rules": {"@big.com": "gold"}}}, "sla.tier_rules.@big.com: 'gold' is not one of the sla.tiers"),
    ({"spam": {"threshold": 1.5}}, "spam.threshold: must be in (0, 1], got 1.5"),
    ({"spam": {"min_known_words": 2}}, "spam.min_known_words: must be in [0, 1], got 2.0"),
    ({"imap": [{"host": "h", "username": "u"}]}, "imap[0].password: one of password, password_command"),
    ({"imap": [{"host": "h", "username": "u", "password": "p", "queue": "other@example.com"}]},
     "imap[0].queue: other@example.com is not helpdesk.address"),
    ({"assignment": [{"target": "group:L9"}]}, "assignment[0].target: no agent is in group 'L9'"),
    # TOML has nan and inf, and every comparison with them is false: they passed every check.
    ({"outbound__timeout_seconds": float("nan")}, "outbound.timeout_seconds: must be a finite number, got nan"),
    # A row's whole send must end before another sender may take it over (outbox.STALE_SENDING).
    ({"outbound__timeout_seconds": 300}, "outbound.timeout_seconds: must be at most 120, got 300"),
    ({"spam": {"digest_hours": float("inf")}}, "spam.digest_hours: must be a finite number, got inf"),
    # Mail to the comment address is a note: as the support address, every answer was kept as one.
    ({"helpdesk__comment_address": "Support@example.com"}, "helpdesk.comment_address: must differ from"),
    ({"database__url": "sqlite://"}, "database.url: must be sqlite:///PATH or postgresql+psycopg://"),
    ({"database__url": "postgresql"}, "database.url: must be sqlite:///PATH or postgresql+psycopg://"),
    ({"database__url": "sqlite:///:memory:"}, "database.url: must be sqlite:///PATH or postgresql+psycopg://"),
    ({"outbound": {"url": "smtp://relay", "user": "mg", "password": ""}}, "outbound.user and outbound.password"),
    ({"outbound__url": "maildir:"}, "outbound.url: maildir: needs a folder"),
    ({"helpdesk__data_dir": " "}, "helpdesk.data_dir: must not be empty"),
    ({"smtp": {"host": ""}}, "smtp.host: must not be empty (0.0.0.0 or :: listens on every address)"),
    ({"imap": [{"host": "h", "username": "u", "password": "p", "port": 0}]},
     "imap[0].port: must be a port number 1-65535"),
    ({"helpdesk__statuses": [{"name": "new", "kind": "new"}, {"name": "New", "kind": "open"}]},
     "helpdesk.statuses[1].name: 'New' is listed twice"),
    ({"helpdesk__statuses": [{"name": "", "kind": "new"}]}, "helpdesk.statuses[0].name: must not be empty"),
    ({"agents": [{"email": "alice@example.com"}], "assignment": [{"target": "alice@example.com",
                                                                  "queue": "sales@example.com"}]},
     "assignment[0].queue: 'sales@example.com' is not helpdesk.address or one of helpdesk.queues"),
    ({"outbound": {"url": "smtp://relay", "user": "mg"}}, "outbound.user and outbound.password: give both"),
    ({"outbound": {"url": "smtp://relay.example.net:587", "user": "mg", "password": "pw"}},
     "outbound.user: the password would cross the network in clear text"),
    ({"outbound__helo_name": "mail server"}, "outbound.helo_name: must be a host name"),
    # A duration must stay a date when added to now (1e8 hours failed every mail).
    ({"database__url": "postgresql+nosuchdriver://db/x"},
     "database.url: Can't load plugin: sqlalchemy.dialects:postgresql.nosuchdriver"),
    ({"outbound__deadline_hours": 1e8}, "outbound.deadline_hours: must be at most 8760, got 100000000.0"),
    ({"sla": {"auto_close_solved_days": 1e6}}, "sla.auto_close_solved_days: must be at most 3650"),
    ({"spam": {"digest_hours": 1e9}}, "spam.digest_hours: must be 0 (no digest) to 8760"),
    ({"sla": {"tiers": [{"name": "t", "targets": {"normal": {"resolution_hours": 30000.0}}}]}},
     "sla.tiers[0].targets.normal.resolution_hours: must be at most 8760, got 30000"),
    ({"sla": {"hours": {d: "closed" for d in ("mon", "tue", "wed", "thu", "sat", "sun")} | {"fri": "09:00-10:00"},
              "tiers": [{"name": "t", "targets": {"normal": {"resolution_hours": 600.0}}}]}},
     "sla.tiers[0].targets.normal.resolution_hours: 600 business hours are not reached within ten years"),
    # Mondays only, and Colombia's holidays fall on Mondays: 4,000 hours are not there.
    ({"sla": {"hours": {d: "closed" for d in ("tue", "wed", "thu", "fri", "sat", "sun")} | {"mon": "09:00-17:00"},
              "holidays_country": "CO",
              "tiers": [{"name": "t", "targets": {"normal": {"resolution_hours": 4000.0}}}]}},
     "sla.tiers[0].targets.normal.resolution_hours: 4000 business hours are not reached within ten years"),
    ({"outbound__helo_name": "-bad-.example"}, "outbound.helo_name: must be a host name"),
    ({"outbound__helo_name": "[1.2]"}, "outbound.helo_name: must be a host name"),
    ({"outbound__helo_name": "[IPv6:2001:db8::zz]"}, "outbound.helo_name: must be a host name"),
])
def test_bad_values_name_their_key(changes: dict[str, Any], message: str) -> None:
    assert message in error(data(**changes))


def test_a_relay_login_needs_tls_unless_the_relay_is_on_this_host() -> None:
    login = {"user": "mg", "password": "pw"}
    for url, extra in (("smtps://relay.example.net", {}), ("smtp://relay.example.net:587", {"starttls": True}),
                       ("smtp://127.0.0.1:25", {}), ("smtp://localhost", {})):
        s = settings_from_dict(data(outbound={"url": url, **login, **extra}), base=BASE)
        assert s.outbound.user == "mg"
    for name in ("mx1.example.com", "[192.0.2.1]", "[IPv6:2001:db8::1]"):
        s = settings_from_dict(data(outbound={"url": "smtp://relay", "helo_name": name}), base=BASE)
        assert s.outbound.helo_name == name


def test_first_line_of_error_names_the_key() -> None:
    # One line, starting with the dotted key: an operator greps their file for it.
    assert error(data(helpdesk__address=None)) == "helpdesk.address: required key is missing"
    assert error(data(sla={"tiers": [{"targets": {}}]})) == "sla.tiers[0].name: required key is missing"


def test_settings_are_frozen() -> None:
    s = settings_from_dict(data(), base=BASE)
    with pytest.raises(AttributeError):
        s.helpdesk.address = "x@example.com"  # type: ignore[misc]


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "etc" / "site").mkdir(parents=True)  # load_settings checks they are there
    (tmp_path / "etc" / "ca.pem").write_text("")
    (tmp_path / "imap-ca.pem").write_text("")
    path = tmp_path / "etc" / "mailgate.toml"
    path.write_text(MINIMAL.replace('data_dir = "var"', 'data_dir = "var"\ntemplates_dir = "site"')
                    .replace('url = "maildir:var/sent"', 'url = "smtp://relay:25"\nca_file = "ca.pem"')
                    + '\n[spam]\nmodel_path = "models/m.npz"\n'
                    + '\n[[imap]]\nhost = "h"\nusername = "u"\npassword = "p"\nca_file = "../imap-ca.pem"\n')
    s = load_settings(path)
    etc = tmp_path / "etc"
    assert s.path == path
    assert s.database.url == f"sqlite:///{etc}/var/mailgate.db"
    assert s.helpdesk.data_dir == etc / "var"
    assert s.helpdesk.templates_dir == etc / "site"
    assert s.spam.model_path == etc / "models" / "m.npz"
    assert s.outbound.ca_file == etc / "ca.pem"
    assert s.imap[0].ca_file == etc / ".." / "imap-ca.pem"
    maildir = load_settings(_write(tmp_path / "m.toml", MINIMAL))
    assert maildir.outbound.maildir == tmp_path / "var" / "sent"


def test_absolute_paths_stay(tmp_path: Path) -> None:
    s = settings_from_dict(data(database__url="sqlite:////abs/db.sqlite", outbound__url="maildir:/abs/sent",
                                helpdesk__data_dir="/abs/var"), base=BASE)
    assert s.database.url == "sqlite:////abs/db.sqlite"
    assert s.outbound.maildir == Path("/abs/sent")
    assert s.helpdesk.data_dir == Path("/abs/var")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_env_password_for_imap_and_outbound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MG_TEST_IMAP_PW", "imap-secret")
    monkeypatch.setenv("MG_TEST_SMTP_PW", "smtp-secret")
    s = settings_from_dict(data(
        imap=[{"host": "imap.example.com", "username": "u", "password": "env:MG_TEST_IMAP_PW"}],
        outbound={"url": "smtp://relay:587", "starttls": True, "user": "mg", "password": "env:MG_TEST_SMTP_PW"},
    ), base=BASE)
    assert s.imap[0].password == "imap-secret"
    assert s.imap[0].port == 993 and s.imap[0].name == "u@imap.example.com"
    assert s.outbound.password == "smtp-secret"
    assert s.outbound.scheme == "smtp"
    plain = settings_from_dict(data(imap=[{"host": "h", "username": "u", "password": "literal"}]), base=BASE)
    assert plain.imap[0].password == "literal"


def test_env_password_unset_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MG_TEST_UNSET", raising=False)
    assert error(data(imap=[{"host": "h", "username": "u", "password": "env:MG_TEST_UNSET"}])) == \
        "imap[0].password: environment variable MG_TEST_UNSET is not set"
    assert error(data(outbound={"url": "smtp://relay", "password": "env:MG_TEST_UNSET"})) == \
        "outbound.password: environment variable MG_TEST_UNSET is not set"


def test_example_config_loads() -> None:
    s = load_settings(REPO / "config.example.toml")
    assert s.helpdesk.address == "support@example.com"
    assert [a.email for a in s.agents] == ["alice@example.com", "bob@example.com"]
    assert [t.name for t in s.sla.tiers] == ["customer", "special-24x7"]
    assert s.sla.tiers[1].always_on is True
    assert s.sla.tiers[0].targets["urgent"].first_response_hours == 1.0
    assert s.sla.holidays_country is None
    assert s.outbound.maildir == REPO / "var" / "sent"
    assert s.helpdesk.data_dir == REPO / "var"


def test_minimal_config_has_documented_defaults(tmp_path: Path) -> None:
    s = load_settings(_write(tmp_path / "config.toml", MINIMAL))
    assert s.smtp.host == "127.0.0.1" and s.smtp.port == 2525 and s.smtp.enabled and not s.smtp.lmtp
    assert s.smtp.max_message_bytes == 26214400 and s.smtp.hostname == "mailgate"
    ob = s.outbound
    assert (ob.starttls, ob.user, ob.password, ob.ca_file, ob.verp) == (False, None, None, None, False)
    assert (ob.timeout_seconds, ob.max_attempts, ob.retry_base_seconds, ob.retry_max_seconds,
            ob.deadline_hours, ob.poll_seconds) == (30.0, 60, 30.0, 3600.0, 48.0, 1.0)
    hd = s.helpdesk
    assert hd.name == "Support" and hd.queues == () and hd.templates_dir is None
    assert [(st.name, st.kind) for st in hd.statuses] == [
        ("new", "new"), ("open", "open"), ("pending", "pending"), ("on-hold", "pending"),
        ("solved", "solved"), ("closed", "closed")]
    assert hd.priorities == ("low", "normal", "high", "urgent") and hd.default_priority == "normal"
    assert hd.categories == () and hd.trusted_authserv_ids == ()
    assert (hd.auto_reply_limit_per_hour, hd.auto_reply_limit_per_day, hd.new_tickets_per_sender_per_hour,
            hd.max_attempts) == (5, 40, 20, 5)
    assert hd.ratings == ("1", "2", "3", "4", "5")
    assert hd.all_addresses == ("support@example.com", "support-comment@example.com")
    assert s.agents[0].role == "admin" and s.agents[0].groups == ("L1",)
    assert s.spam.enabled and s.spam.threshold == 0.9 and s.spam.retention_days == 30
    assert s.spam.min_known_words == 0.3
    assert s.spam_model_path == tmp_path / "var" / "spam-model.npz"
    sla = s.sla
    assert sla.timezone == "UTC" and sla.holidays_country is None and sla.extra_holidays == ()
    assert sla.hours["mon"] == (time(9), time(17)) and sla.hours["fri"] == (time(9), time(17))
    assert sla.hours["sat"] is None and sla.hours["sun"] is None
    assert [t.name for t in sla.tiers] == ["customer"] and sla.default_tier == "customer"
    # The example's customer tier is the default: priority sets the targets out of the box.
    example = load_settings(REPO / "config.example.toml").sla.tiers[0]
    assert example.name == "customer" and sla.tiers[0] == example
    assert sla.tiers[0].targets["urgent"] != sla.tiers[0].targets["low"]
    # A tier that sets only a resolution time: the first response is due no later than that.
    partial = _write(tmp_path / "partial.toml", MINIMAL + '[[sla.tiers]]\nname = "customer"\n'
                     "[sla.tiers.targets.low]\nresolution_hours = 10.0\n")
    low = load_settings(partial).sla.tiers[0].targets["low"]
    assert (low.first_response_hours, low.resolution_hours) == (10.0, 10.0)
    # Priorities spelt another way get the same defaults; one a site adds gets normal's.
    capitals = load_settings(_write(tmp_path / "capitals.toml", MINIMAL.replace(
        "[helpdesk]\n", '[helpdesk]\npriorities = ["Low", "Normal", "URGENT", "blocker"]\n'
        'default_priority = "Normal"\n', 1))).sla.tiers[0].targets
    assert capitals["URGENT"] == sla.tiers[0].targets["urgent"]
    assert capitals["Low"] == sla.tiers[0].targets["low"]
    assert capitals["blocker"] == capitals["Normal"] == sla.tiers[0].targets["normal"]
    assert sla.escalation_groups == ("L1", "L2", "L3")
    assert (sla.warn_before_minutes, sla.auto_close_solved_days, sla.pending_reminder_days,
            sla.pending_close_days) == (60.0, 7.0, 3.0, 10.0)
    assert s.log.level == "INFO" and s.imap == () and s.assignment == ()


def test_example_documents_every_outbound_and_helpdesk_key() -> None:
    """config.example.toml documents every key: each settings field appears in it (commented or not)."""
    from dataclasses import fields

    from mailgate.config import HelpdeskSettings, OutboundSettings, SmtpSettings, SpamSettings

    text = (REPO / "config.example.toml").read_text()
    for cls in (OutboundSettings, SmtpSettings, HelpdeskSettings, SpamSettings):
        for f in fields(cls):
            assert f"{f.name} =" in text, f"{cls.__name__}.{f.name} is not in config.example.toml"


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"[helpdesk]\nname = \"Caf\xe9\"\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(path)
    assert str(exc.value) == f"{path}: not UTF-8 text (byte 22)"
