"""Tell mail written by a person from automatic mail (DESIGN.md section 4, threats 16-18).

Pure: looks only at a ParsedMessage and the SMTP envelope sender. Every occurrence of a
header is considered (a duplicated Precedence cannot hide an automatic one), and the
first matching rule in the order bounce, auto_reply, list, bulk decides.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from urllib.parse import unquote

from mailgate.ingest.parse import ParsedMessage

__all__ = ["ScreenVerdict", "own_list_ids", "screen_message"]

AUTO_REPLY = "auto_reply"
BOUNCE = "bounce"
LIST = "list"
BULK = "bulk"


@dataclass(frozen=True)
class ScreenVerdict:
    kind: str | None
    reason: str

    @property
    def may_answer(self) -> bool:
        """Only mail written by a person may get an automatic answer (RFC 3834)."""
        return self.kind is None

    @property
    def is_automatic(self) -> bool:
        """Auto-replies and bounces never open tickets."""
        return self.kind in (AUTO_REPLY, BOUNCE)


PERSON = ScreenVerdict(None, "")

_DAEMON_LOCAL_PARTS = frozenset({"mailer-daemon", "mailer_daemon", "mailerdaemon", "mail-daemon", "postmaster"})

# Subjects that bounces carry when they are not proper RFC 3464 reports.
_BOUNCE_SUBJECT_RE = re.compile(
    r"^\s*(?:undeliver(?:ed|able)|delivery status notification|mail delivery (?:failed|failure)"
    r"|returned mail|failure notice|delivery failure|non[- ]?delivery|unzustellbar"
    r"|nicht zustellbar|palautus|toimitus ep[aä]onnistui|не доставлено|недоставленное)",
    re.IGNORECASE,
)

# Start of the subject of out-of-office replies, as the common clients write them.
_OOF_SUBJECT_RE = re.compile(
    r"^\s*(?:"
    r"out of (?:the )?office|automatic reply|auto(?:matic)?[- ]?reply|autoreply|auto:"
    r"|abwesenheitsnotiz|automatische antwort"
    r"|automaattinen vastaus|poissa"
    r"|автоматический ответ|автоответ"
    r"|réponse automatique"
    r")(?!\w)",
    re.IGNORECASE,
)

# Values of X-Auto-Response-Suppress that ask us not to auto-answer (DR/NDR/RN/NRN only
# concern receipts, so they do not count).
_SUPPRESS_VALUES = frozenset({"all", "oof", "autoreply"})


def _first_token(value: str) -> str:
    """'auto-replied (vacation)' -> 'auto-replied'; 'bulk; x=y' -> 'bulk'."""
    value = re.sub(r"\([^()]*\)", " ", value)  # [^()]: "(((" without ")" made [^)] quadratic
    token = re.split(r"[\s;]+", value.strip(), maxsplit=1)[0]
    return token.lower()


def _null_sender(msg: ParsedMessage, envelope_from: str | None) -> bool:
    if envelope_from is not None:
        return envelope_from.strip() in ("", "<>")
    # No envelope (IMAP, pipe without -f): the delivering MTA's Return-Path stands in.
    return any(value.strip() in ("<>", "") for value in msg.header_all("return-path"))


def _bounce_reason(msg: ParsedMessage, envelope_from: str | None) -> str | None:
    if msg.is_dsn:
        return "RFC 3464 DSN"
    local = msg.from_addr.rpartition("@")[0]
    if local in _DAEMON_LOCAL_PARTS:
        return "mailer-daemon sender"
    if msg.header_all("x-failed-recipients"):
        return "X-Failed-Recipients"
    if _null_sender(msg, envelope_from) and _BOUNCE_SUBJECT_RE.match(msg.subject):
        return "null Return-Path"
    return None


def _auto_reply_reason(msg: ParsedMessage, envelope_from: str | None) -> str | None:
    for value in msg.header_all("auto-submitted"):
        token = _first_token(value)
        if token and token != "no":
            return f"Auto-Submitted: {token}"
    for name, label in (("x-autoreply", "X-Autoreply"), ("x-autorespond", "X-Autorespond")):
        for value in msg.header_all(name):
            if _first_token(value) not in ("no", "false", "0"):
                return label
    for value in msg.header_all("precedence"):
        if _first_token(value) == "auto_reply":
            return "Precedence: auto_reply"
    if _OOF_SUBJECT_RE.match(msg.subject):
        return "out-of-office subject"
    if _null_sender(msg, envelope_from):
        # RFC 3834: automatic responses are sent with a null reverse path.
        return "null Return-Path"
    return None


def _list_id(value: str) -> str:
    """'Support <support.example.com>' -> 'support.example.com' (RFC 2919)."""
    m = re.search(r"<([^<>]*)>", value)
    return (m.group(1) if m else value).strip().lower()


def own_list_ids(addresses: Iterable[str]) -> frozenset[str]:
    """The List-Id a group or list at one of our addresses stamps (Google Groups and
    Mailman write support@example.com as support.example.com)."""
    return frozenset(a.lower().replace("@", ".") for a in addresses)


def _ours(host: str, own_domains: Collection[str]) -> bool:
    host = host.rstrip(".")
    return bool(host) and any(host == d or host.endswith("." + d) for d in own_domains)


def _group_link(uri: str, own_domains: Collection[str]) -> bool:
    """A List-Unsubscribe link of a group of ours: at our domains (a Mailman list at
    lists.example.com), Google's group manager address, or our domain's page on Google
    Groups (https://groups.google.com/a/example.com/...)."""
    uri = uri.strip().lower()
    if uri.startswith("mailto:"):
        address, _, query = uri[len("mailto:"):].partition("?")
        # One recipient only: "a@x,b@ours" and "?cc=" would also write elsewhere.
        if "," in address or "%2c" in address or re.search(r"(?:^|&)(?:to|cc|bcc)=", unquote(query)):
            return False
        host = address.rpartition("@")[2]
        return _ours(host, own_domains) or host == "googlegroups.com"
    m = re.match(r"^https?://([^/?#\\]*)([^?#\\]*)", uri)
    if m is None:
        return False
    host, path = m.group(1).rpartition("@")[2].split(":", 1)[0], m.group(2)
    if host.rstrip(".") == "groups.google.com":
        # Our domain's pages only, and no way out of them ("/a/example.com/../../g/other").
        return not re.search(r"\.\.|%2e|%2f", path) and any(path.startswith(f"/a/{d}/") for d in own_domains)
    return _ours(host, own_domains)


def _list_reason(msg: ParsedMessage, own_lists: Collection[str], own_domains: Collection[str]) -> str | None:
    list_ids = [_list_id(v) for v in msg.header_all("list-id")]
    if list_ids and all(i in own_lists for i in list_ids):
        # Our own group in front of the mailbox (support@ as a Google Group): it adds its
        # List-Id, Precedence: list and List-Unsubscribe to every customer's mail, which
        # says nothing about the sender. A List-Unsubscribe pointing elsewhere is the
        # sender's own: a newsletter sent to support@ through the group.
        for value in msg.header_all("list-unsubscribe"):
            links = re.findall(r"<([^<>]*)>", value)
            if not links or not all(_group_link(uri, own_domains) for uri in links):
                return "List-Unsubscribe present (not our own group's)"
        return None
    if list_ids:
        return "List-Id present"
    if msg.header_all("list-unsubscribe"):
        return "List-Unsubscribe present"
    for value in msg.header_all("precedence"):
        if _first_token(value) == "list":
            return "Precedence: list"
    return None


def _bulk_reason(msg: ParsedMessage) -> str | None:
    for value in msg.header_all("precedence"):
        token = _first_token(value)
        if token in ("bulk", "junk"):
            return f"Precedence: {token}"
    for value in msg.header_all("x-auto-response-suppress"):
        tokens = {t.strip().lower() for t in value.split(",")}
        if tokens & _SUPPRESS_VALUES:
            # The sender asks not to be auto-answered; a person may still be behind it,
            # so it may open a ticket (like bulk) but gets no confirmation.
            return "X-Auto-Response-Suppress"
    return None


def screen_message(msg: ParsedMessage, *, envelope_from: str | None,
                   own_addresses: Collection[str] = ()) -> ScreenVerdict:
    """Classify ``msg``; ``envelope_from`` is the SMTP MAIL FROM ('' for '<>'), None if unknown;
    ``own_addresses``: the help desk's addresses, where a group of our own may sit (own_list_ids)."""
    reason = _bounce_reason(msg, envelope_from)
    if reason:
        return ScreenVerdict(BOUNCE, reason)
    reason = _auto_reply_reason(msg, envelope_from)
    if reason:
        return ScreenVerdict(AUTO_REPLY, reason)
    reason = _list_reason(msg, own_list_ids(own_addresses),
                          {a.rpartition("@")[2].lower() for a in own_addresses})
    if reason:
        return ScreenVerdict(LIST, reason)
    reason = _bulk_reason(msg)
    if reason:
        return ScreenVerdict(BULK, reason)
    return PERSON
