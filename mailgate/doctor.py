"""`mailgate doctor`: each check returns ok, warning or error with one line of detail."""

from __future__ import annotations

import smtplib
import ssl
from typing import Any

from mailgate.config import SECRET_KEY_PUBLISHED, Settings, published_secret_key, valid_helo_name
from mailgate.outbox import helo_name
from mailgate.runtime import Runtime


def _check(name: str, status: str, detail: str) -> dict[str, Any]:
    # One line each: drivers put the server's detail and a link to their docs on lines of their own.
    return {"name": name, "status": status, "detail": " ".join(line.strip() for line in detail.splitlines())}


def run_checks(settings: Settings) -> list[dict[str, Any]]:
    checks = [_check("config", "ok", str(settings.path))]
    if published_secret_key(settings):
        checks.append(_check("secret key", "error", SECRET_KEY_PUBLISHED))
    try:
        rt = Runtime.build(settings)
    except Exception as exc:  # a data_dir that is a file, a database URL the driver refuses...
        return [*checks, _check("runtime", "error", f"{type(exc).__name__}: {exc}")]
    try:
        from mailgate.store import migrate

        current, head = migrate.current_revision(rt.engine), migrate.head_revision()
        if current == head:
            checks.append(_check("database", "ok", f"schema at {current}"))
        else:
            checks.append(_check("database", "error" if current else "warning",
                                 f"schema at {current or 'empty'}, code needs {head}: run `mailgate db upgrade`"))
    except Exception as exc:
        checks.append(_check("database", "error", f"{type(exc).__name__}: {exc}"))
    checks.extend(_journal(settings))
    checks.append(_outbound(settings))
    checks.extend(_imap(settings, rt))
    checks.append(_spam_model(settings, rt))
    checks.append(_quarantine_digest(settings))
    return checks


def _quarantine_digest(settings: Settings) -> dict[str, Any]:
    hours = settings.spam.digest_hours
    if not hours:
        return _check("quarantine digest", "ok", "off (spam.digest_hours = 0): held mail is listed by the CLI only")
    to = settings.quarantine_digest_to
    if not to:
        # Otherwise a customer's mail held by mistake is purged unseen.
        return _check("quarantine digest", "warning",
                      "no agent has role \"admin\" and spam.digest_to is empty: the list of held mail goes "
                      "to nobody")
    return _check("quarantine digest", "ok", f"every {hours:g} h to {', '.join(to)}")


def _spam_model(settings: Settings, rt: Runtime) -> dict[str, Any]:
    from mailgate.spamfeatures import FEATURE_VERSION

    if not settings.spam.enabled:
        return _check("spam model", "ok", "disabled")
    model = rt.spam_model()
    if model is None:
        # spam.enabled, yet spam is ticketed and answered: the operator must know.
        return _check("spam model", "error", f"{settings.spam_model_path}: no usable model (the log says why): "
                      "filter off; replace the file or run `mailgate spam train`")
    detail = f"{settings.spam_model_path} (feature set {model.meta['feature_version']})"
    if model.meta["feature_version"] < FEATURE_VERSION:
        # Still correct, only weaker: it scores and learns its own set until retrained.
        detail += f"; `mailgate spam train` would add feature set {FEATURE_VERSION}"
    return _check("spam model", "ok", detail)


def _journal(settings: Settings) -> list[dict[str, Any]]:
    """Mail the SMTP listener accepted but the work process has not taken yet (SQLite only;
    no line when there is no journal): answered 250, so it must not sit there unseen."""
    from mailgate.journal import JOURNAL_FILE, STUCK_AFTER, backlog
    from mailgate.store.engine import utcnow

    try:
        count, oldest = backlog(settings.helpdesk.data_dir / JOURNAL_FILE)
    except Exception as exc:
        return [_check("smtp journal", "error", f"{type(exc).__name__}: {exc}")]
    if oldest is None:
        return [] if not (settings.helpdesk.data_dir / JOURNAL_FILE).exists() else [
            _check("smtp journal", "ok", "empty")]
    age = utcnow() - oldest
    detail = f"{count} accepted message(s) waiting, the oldest for {int(age.total_seconds())} s"
    if age > STUCK_AFTER:
        return [_check("smtp journal", "warning", detail + ": is `mailgate run` (its work process) running?")]
    return [_check("smtp journal", "ok", detail)]


def _outbound(settings: Settings) -> dict[str, Any]:
    ob = settings.outbound
    if ob.scheme == "maildir":
        path = ob.maildir
        try:
            for sub in ("tmp", "new", "cur"):
                (path / sub).mkdir(parents=True, exist_ok=True)
            probe = path / "tmp" / ".doctor"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            return _check("outbound", "error", f"maildir {path}: {exc}")
        return _check("outbound", "ok", f"maildir {path} writable")
    scheme, rest = ob.url.split("://", 1)
    host, _, port = rest.rstrip("/").partition(":")
    try:
        context = ssl.create_default_context(cafile=str(ob.ca_file) if ob.ca_file else None)
        helo = helo_name(settings)
        smtp_conn = (smtplib.SMTP_SSL(host, int(port or 465), local_hostname=helo, timeout=10, context=context)
                     if scheme == "smtps" else smtplib.SMTP(host, int(port or 25), local_hostname=helo, timeout=10))
        with smtp_conn as smtp:
            smtp.ehlo()
            if ob.starttls:
                # The same trust as the sender's: the configured private CA, else the system store.
                smtp.starttls(context=context)
                smtp.ehlo()
            if ob.user and ob.password:
                smtp.login(ob.user, ob.password)
            code, _ = smtp.noop()
    except (OSError, smtplib.SMTPException, ValueError, UnicodeError) as exc:
        return _check("outbound", "error", f"{ob.url}: {type(exc).__name__}: {exc}")
    if not valid_helo_name(helo) or (not helo.startswith("[") and "." not in helo):
        return _check("outbound", "warning", f"{ob.url} answered {code}, but our EHLO name {helo!r} is no domain: "
                      "many relays refuse it; set outbound.helo_name")
    return _check("outbound", "ok", f"{ob.url} answered {code} (EHLO {helo})")


def _imap(settings: Settings, rt: Runtime) -> list[dict[str, Any]]:
    if not settings.imap:
        return []
    try:
        from mailgate.transport.imap import check_login, imap_health
    except ImportError as exc:
        return [_check("imap", "error", f"IMAP support unavailable: {exc}")]
    from mailgate.store.engine import utcnow

    out = []
    for account in settings.imap:
        error = check_login(account)
        out.append(_check(f"imap {account.name}", "error" if error else "ok", error or "login and select ok"))
    try:
        for h in imap_health(rt.engine, settings.imap, utcnow()):
            if h.get("warning"):
                out.append(_check(f"imap {h['name']} health", "warning", h["warning"]))
    except Exception as exc:
        out.append(_check("imap health", "warning", f"{type(exc).__name__}: {exc}"))
    return out
