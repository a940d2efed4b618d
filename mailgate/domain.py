"""Ticket values that need no I/O: subject tags, reply tokens, our Message-IDs.

Stdlib only. Everything here is a plain function over plain data.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import unicodedata

TOKEN_LENGTH = 12  # base32 characters: 60 bits of HMAC


def _mac(secret: str, *parts: str) -> str:
    digest = hmac.new(secret.encode(), "\x1f".join(parts).encode(), hashlib.sha256).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:TOKEN_LENGTH]


# --- reply tokens: support+123-<token>@example.com ---------------------------

def reply_token(secret: str, ticket_number: int, recipient: str) -> str:
    """Proves that `recipient` was sent mail about the ticket."""
    return _mac(secret, "reply", str(ticket_number), recipient.lower())


# Ticket numbers and row ids are 32-bit integer columns (PostgreSQL's integer). A larger
# number in a subject tag, a plus address or a command names no row, and must not reach
# a query, which PostgreSQL refuses: the message would fail instead of opening a ticket.
MAX_ID = 2**31 - 1

# The quarantine digest's Reply-To carries a token for this number, which no ticket has:
# it proves an admin's #release reply as a ticket token proves a reply to a notice.
QUARANTINE_REPLY_NUMBER = 0


def reply_address(base_address: str, secret: str, ticket_number: int, recipient: str) -> str:
    local, domain = base_address.split("@", 1)
    return f"{local}+{ticket_number}-{reply_token(secret, ticket_number, recipient)}@{domain}"


_PLUS_RE = re.compile(r"^(?P<local>[^+@]+)\+(?P<ticket>\d{1,12})-(?P<token>[a-z2-7]{4,32})@(?P<domain>.+)$")


def parse_plus_address(address: str) -> tuple[str, int, str] | None:
    """'support+123-tok@x' -> ('support@x', 123, 'tok'); None for any other form."""
    m = _PLUS_RE.match(address.lower())
    if not m:
        return None
    number = int(m["ticket"])
    if number > MAX_ID:
        return None
    return f"{m['local']}@{m['domain']}", number, m["token"]


_BOUNCE_TAG = "bounce-"


def bounce_address(base_address: str, tag: str) -> str:
    """The envelope sender of one outgoing mail (VERP): 'support+bounce-TAG@x'. A delivery
    report proves itself by coming back to it: only the mailbox that got the mail saw it
    (as Return-Path), where the Message-ID is also known to whoever the recipient replied to."""
    local, domain = base_address.split("@", 1)
    return f"{local}+{_BOUNCE_TAG}{tag}@{domain}"


def is_bounce_address(address: str) -> bool:
    local = address.partition("@")[0]
    return "+" in local and local.split("+", 1)[1].startswith(_BOUNCE_TAG)


def base_address(address: str) -> str:
    """Strip any +detail: 'support+anything@x' -> 'support@x'."""
    local, _, domain = address.lower().partition("@")
    return f"{local.split('+', 1)[0]}@{domain}"


def mailbox_of(address: str) -> str:
    """The mailbox an address reaches, as far as the address tells: lowercased, without
    +detail, the domain in Unicode (NFC) whether it came as bücher.de or xn--bcher-kva.de.
    Caps per sender count mailboxes: a new +tag or spelling must not buy a new count.

    Not through Python's idna codec: that is IDNA 2003, which maps straße.de to
    strasse.de, another domain, where IDNA 2008 (what registries and mail use) keeps ß.
    """
    local, _, domain = base_address(address).partition("@")
    # IDNA's other full stops (。．｡) separate labels too (RFC 3490 3.1).
    domain = domain.translate(_IDNA_DOTS)
    labels = [_u_label(label) if label.startswith("xn--") else label for label in domain.split(".")]
    return f"{local}@{unicodedata.normalize('NFC', '.'.join(labels)).lower()}"


_IDNA_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})


def wire_address(address: str) -> str:
    """The address as sent: an internationalised domain after an ASCII local part as its
    A-label (carol@bücher.de -> carol@xn--bcher-kva.de, IDNA 2008 with UTS 46 mapping),
    which any relay takes; SMTPUTF8 is needed only for a local part that is not ASCII.
    Anything else, and a domain IDNA refuses, as written."""
    local, at, domain = address.rpartition("@")
    if not at or domain.isascii() or not local.isascii():
        return address
    import idna  # only for the rare address that needs it

    try:
        return f"{local}@{idna.encode(domain.translate(_IDNA_DOTS), uts46=True).decode('ascii')}"
    except (idna.IDNAError, UnicodeError):
        return address


def _u_label(a_label: str) -> str:
    try:
        return a_label[4:].encode("ascii").decode("punycode")
    except (UnicodeError, ValueError):  # no valid A-label: compared as written
        return a_label


def token_is_valid(secret: str, ticket_number: int, sender: str, token: str) -> bool:
    return hmac.compare_digest(reply_token(secret, ticket_number, sender), token.lower())


# --- subject tags: [TAG #123] -----------------------------------------------

def tagged_subject(tag: str, ticket_number: int, subject: str) -> str:
    """The subject with our tag, once, wherever the client put the old one."""
    stripped = strip_tag(tag, subject)
    return f"[{tag} #{ticket_number}] {stripped}".rstrip()


def tag_pattern(tag: str) -> re.Pattern[str]:
    return re.compile(r"\[\s*" + re.escape(tag) + r"\s*#\s*(\d{1,12})\s*\]", re.IGNORECASE)


def ticket_from_subject(tag: str, subject: str) -> int | None:
    m = tag_pattern(tag).search(subject)
    return int(m.group(1)) if m and int(m.group(1)) <= MAX_ID else None


def strip_tag(tag: str, subject: str) -> str:
    return re.sub(r"\s{2,}", " ", tag_pattern(tag).sub("", subject)).strip()


_REPLY_PREFIX = re.compile(
    r"^\s*((re|aw|sv|vs|fw|fwd|wg|tr|rv|ref|antw|odp|vá|ynt|rif|r|fs|vl|отв|ответ|пер|réf|"
    r"回复|答复|转发)\s*(?:\[\d+\]\s*)?[:：]\s*)+",  # one \s* each: "re" and 100,000 spaces took 70 s
    re.IGNORECASE,
)


def normalize_subject(subject: str) -> str:
    """Subject without reply/forward prefixes, for display and comparison."""
    prev = None
    s = subject
    while prev != s:
        prev = s
        s = _REPLY_PREFIX.sub("", s).strip()
    return s


# --- our Message-IDs carry an HMAC so a forged In-Reply-To cannot claim them --

def make_message_id(secret: str, domain: str, ticket_number: int | None) -> str:
    """'<mg.123.r4nd0m.mac@domain>' without brackets. Fixed at outbox-row creation."""
    nonce = secrets.token_hex(8)
    t = str(ticket_number or 0)
    return f"mg.{t}.{nonce}.{_mac(secret, 'mid', t, nonce)}@{domain}"


_OUR_MID = re.compile(r"^mg\.(\d{1,12})\.([0-9a-f]{16})\.([a-z2-7]{12})@")


def ticket_from_our_message_id(secret: str, message_id: str) -> int | None:
    """The ticket number if message_id is one we made (HMAC checked); else None."""
    m = _OUR_MID.match(message_id.lower())
    if not m:
        return None
    t, nonce, mac = m.groups()
    if not hmac.compare_digest(_mac(secret, "mid", t, nonce), mac):
        return None
    number = int(t)
    return number if 0 < number <= MAX_ID else None


# --- text helpers -------------------------------------------------------------

def envelope_text(value: str) -> str:
    """An envelope address as text a database can store. aiosmtpd keeps bytes that are not
    UTF-8 as lone surrogates, which SQLite and PostgreSQL refuse (and a NUL PostgreSQL
    refuses): in the SMTP listener's group commit that failed every session of the group
    with 451, and the message itself on every retry. Such bytes become U+FFFD; NUL is
    dropped."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace").replace("\x00", "")


def one_line(value: str, limit: int = 200) -> str:
    """For rendered headers: no CR/LF or other controls can survive (header injection)."""
    cleaned = "".join(" " if unicodedata.category(c).startswith("C") else c for c in value)
    cleaned = re.sub(r"\s+", " ", cleaned).strip()
    return cleaned[:limit]
