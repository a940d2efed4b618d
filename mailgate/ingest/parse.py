"""Turn raw mail bytes into a ParsedMessage: the pure, defensive first step of ingest.

Everything here works on bytes and plain values: no database, no config. Hostile input
either parses leniently (with notes in ``defects``) or raises UnusableMessage; no other
exception is meant to escape. The stdlib parser runs with the compat32 policy because it
keeps raw header text and never invokes the (slow, occasionally raising) structured
header parser; header decoding, address parsing and limits are done here instead.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import io
import mimetypes
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from email.utils import parsedate_to_datetime

import nh3
from mailparser.dates import parse_mail_date
from mailparser.utils import mime_header_view

from mailgate.ingest.htmltext import MAX_HTML_DEPTH, html_to_text, too_deep

__all__ = ["Attachment", "ParsedMessage", "UnusableMessage", "parse_message"]


class UnusableMessage(Exception):
    """The bytes cannot be handled as a mail (reason in str(exc)).

    The caller dead-letters it (exit 65).
    """


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    data: bytes
    content_id: str | None
    inline: bool


@dataclass(frozen=True)
class ParsedMessage:
    message_id: str | None
    subject: str
    from_addr: str
    from_name: str
    to: tuple[str, ...]
    cc: tuple[str, ...]
    reply_to: tuple[str, ...]
    delivered_to: tuple[str, ...]
    in_reply_to: tuple[str, ...]
    references: tuple[str, ...]
    date: datetime | None
    headers: tuple[tuple[str, str], ...]
    text: str
    html: str | None
    attachments: tuple[Attachment, ...]
    defects: tuple[str, ...]
    is_dsn: bool
    dsn_original_message_ids: tuple[str, ...]
    dsn_failed_recipients: tuple[str, ...]
    # X-Original-From, where a group or list put the sender when it rewrote From to its
    # own address (Google Groups, for DMARC); exactly one mailbox, or None.
    original_from: tuple[str, str] | None = None
    # The stdlib (compat32) tree it was read from, for the spam filter's features: one
    # parse serves both. Read it, never change it.
    mime: Message | None = field(default=None, repr=False, compare=False)

    def header(self, name: str) -> str | None:
        key = name.lower()
        for hname, value in self.headers:
            if hname == key:
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        key = name.lower()
        return [value for hname, value in self.headers if hname == key]


# --------------------------------------------------------------------------- limits

# Same notion of a header line as email.feedparser, so the pre-scan sees what the parser
# sees: no space before the colon (RFC 5322's obsolete "Subject :" ends the header block).
_HEADER_LINE_RE = re.compile(rb"^([\x21-\x39\x3b-\x7e]+):")
_CONTROL_BYTES_RE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CONTAINER_CT_RE = re.compile(rb"^content-type:\s*(?:multipart|message)/", re.I | re.M)
_BOUNDARY_RE = re.compile(rb'boundary\s*=\s*(?:"([^"\r\n]*)"|([^\s;]+))', re.I)
_ADDRESS_HEADERS = frozenset(
    {
        "from",
        "sender",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "resent-from",
        "resent-sender",
        "resent-to",
        "resent-cc",
        "resent-bcc",
        "delivered-to",
        "x-original-to",
        "return-path",
    }
)
_MAX_DEFECTS = 100
# The header block as a whole: each field is capped (max_header_bytes), but 3.2 million
# small fields (24 MB) took 50 s and 1.3 GB to parse. Real mail has a few dozen fields.
MAX_HEADER_FIELDS = 5_000
MAX_HEADER_BLOCK_BYTES = 2 * 2**20
# At least one of these marks a header block as mail, not text that happens to hold a colon.
# Trace fields (Received, Return-Path, Delivered-To) do not count: the MTA in
# front and our own listener add them to whatever bytes arrive, garbage included.
_MAIL_HEADERS = (_ADDRESS_HEADERS - {"delivered-to", "x-original-to", "return-path"}) | {
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "in-reply-to",
    "references",
}


def _scan_header_fields(raw: bytes) -> list[tuple[str, bytes]]:
    """Header fields of the top-level block as (lowercased name, unfolded raw field bytes)."""
    # Each field's lines are joined once at the end: adding each continuation line to the
    # bytes so far copied them all again (a 10 MB folded header: 155 s).
    fields: list[tuple[str, list[bytes]]] = []
    pos = 0
    size = len(raw)
    while pos < size:
        end = raw.find(b"\n", pos)
        end = size if end < 0 else end + 1
        line = raw[pos:end]
        pos = end
        content = line.rstrip(b"\r\n")
        if not content:
            break
        if content.startswith(b"From "):
            # An mbox separator line. First, the parser keeps it as the unixfrom; under
            # our Received line (mail saved from mbox and sent by SMTP) it notes a defect
            # and reads on. Either way it is not a header and does not end the block.
            continue
        if content[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1].append(content)
            continue
        match = _HEADER_LINE_RE.match(content)
        if match is None:
            break
        fields.append((match.group(1).decode("ascii").lower(), [content]))
    return [(name, b"".join(lines)) for name, lines in fields]


def _precheck(raw: bytes, *, max_depth: int, max_header_bytes: int, max_addresses: int) -> list[tuple[str, bytes]]:
    if not raw.strip():
        raise UnusableMessage("empty message")
    fields = _scan_header_fields(raw)
    if not fields:
        raise UnusableMessage("no header block (input does not start with a mail header)")
    # A stray control byte is repaired later; a header block full of them is binary
    # data that merely happens to start with something like "Xy:".
    block_size = sum(len(value) for _, value in fields)
    controls = sum(len(_CONTROL_BYTES_RE.findall(value)) for _, value in fields)
    if controls > max(4, block_size // 20):
        raise UnusableMessage("binary data in the header block, not a mail")
    if not any(name in _MAIL_HEADERS for name, _ in fields):
        raise UnusableMessage("no mail header (From, To, Subject, Date, Message-ID, ...) found")
    if len(fields) > MAX_HEADER_FIELDS:
        raise UnusableMessage(f"{len(fields)} header fields (limit {MAX_HEADER_FIELDS})")
    if block_size > MAX_HEADER_BLOCK_BYTES:
        raise UnusableMessage(f"header block of {block_size} bytes (limit {MAX_HEADER_BLOCK_BYTES})")
    per_name: dict[str, int] = {}
    for name, value in fields:
        if len(value) > max_header_bytes:
            raise UnusableMessage(f"header {name!r} is {len(value)} bytes long (limit {max_header_bytes})")
        if name in _ADDRESS_HEADERS:
            # '@' count is an upper bound on the addresses; cheap and linear, unlike parsing.
            per_name[name] = per_name.get(name, 0) + value.count(b"@")
            if per_name[name] > max_addresses:
                raise UnusableMessage(f"header {name!r} names more than {max_addresses} addresses")
    # The stdlib parser and walkers recurse per nesting level, so depth must be known
    # before parsing. Only mails declaring more containers than the limit need the scan.
    if len(_CONTAINER_CT_RE.findall(raw)) > max_depth:
        depth = _scan_mime_depth(raw, max_depth)
        if depth > max_depth:
            raise UnusableMessage(f"MIME nesting deeper than {max_depth} levels")
    return fields


def _scan_mime_depth(raw: bytes, limit: int) -> int:
    """Approximate the MIME container depth by following boundaries line by line.

    Stops as soon as the depth exceeds ``limit``. A None entry stands for an
    encapsulated message/*, which ends when an enclosing boundary shows up.
    """
    stack: list[bytes | None] = []
    in_headers = True
    # The Content-Type's folded lines, joined when the part's header ends: adding each to
    # the bytes so far copied them again (a 10 MB folded Content-Type: 163 s).
    ctype_lines: list[bytes] = []
    collecting = False
    deepest = 0
    for line in raw.splitlines():
        if in_headers:
            if not line.strip():
                ctype = b"".join(ctype_lines)
                lowered = ctype.lower().lstrip()
                in_headers = False
                if lowered.startswith(b"multipart/"):
                    match = _BOUNDARY_RE.search(ctype)
                    if match:
                        stack.append((match.group(1) or match.group(2) or b"").strip())
                elif lowered.startswith(b"message/"):
                    stack.append(None)
                    in_headers = True
                ctype_lines = []
                collecting = False
                deepest = max(deepest, len(stack))
                if deepest > limit:
                    return deepest
                continue
            if line[:1] in (b" ", b"\t"):
                if collecting:
                    ctype_lines.append(line)
            else:
                collecting = line[:13].lower() == b"content-type:"
                if collecting:
                    ctype_lines = [line[13:]]
            continue
        if stack and line.startswith(b"--"):
            stripped = line.rstrip()
            for index in range(len(stack) - 1, -1, -1):
                boundary = stack[index]
                if boundary is None:
                    continue
                if stripped == b"--" + boundary:
                    del stack[index + 1 :]
                    in_headers = True
                    ctype_lines = []
                    collecting = False
                    break
                if stripped == b"--" + boundary + b"--":
                    del stack[index:]
                    break
    return deepest


def _tree_stats(msg: Message) -> tuple[int, int]:
    """(max depth, part count) of the parsed tree, iteratively: no recursion on hostile depth."""
    deepest = 0
    count = 0
    stack: list[tuple[Message, int]] = [(msg, 0)]
    while stack:
        part, depth = stack.pop()
        count += 1
        deepest = max(deepest, depth)
        # delivery-status blocks are header groups, not MIME parts.
        if part.is_multipart() and part.get_content_type() != "message/delivery-status":
            payload = part.get_payload()
            if isinstance(payload, list):
                stack.extend((child, depth + 1) for child in payload)
    return deepest, count


# --------------------------------------------------------------------------- text decoding

_CHARSET_ALIASES: dict[str, str | None] = {
    "x-unknown": None,
    "unknown": None,
    "unknown-8bit": None,
    "x-user-defined": None,
    "default": None,
    "charset": None,
    "ks_c_5601-1987": "cp949",
    "ks_c_5601": "cp949",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "iso-8859-8-i": "iso-8859-8",
    "x-mac-roman": "mac_roman",
    "macintosh": "mac_roman",
    # Mail labelled latin-1 is in practice windows-1252 (curly quotes, euro sign).
    "iso-8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "us-ascii": "ascii",
    "ansi_x3.4-1968": "ascii",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "x-sjis": "cp932",
    "sjis": "cp932",
    "windows-874": "cp874",
    "unicode-1-1-utf-7": "utf-7",
    "utf8": "utf-8",
}
_TEXT_CODEC_CACHE: dict[str, str | None] = {}
# Python codecs that raise on any input (undefined), or on errors="replace" (idna,
# punycode), or read escapes rather than a charset: decoded as unknown charsets instead.
_NOT_MAIL_CHARSETS = frozenset({"undefined", "idna", "punycode", "unicode-escape", "raw-unicode-escape"})


def _codec_for(charset: str | None) -> str | None:
    """Map a declared charset to a Python text codec, None when unknown or not text."""
    if not charset:
        return None
    name = charset.strip().strip("\"'").lower()
    # RFC 2231 language suffix: utf-8*en
    name = name.split("*", 1)[0]
    if name in _TEXT_CODEC_CACHE:
        return _TEXT_CODEC_CACHE[name]
    codec: str | None
    if name in _CHARSET_ALIASES:
        codec = _CHARSET_ALIASES[name]
    else:
        try:
            info = codecs.lookup(name)
            # Refuse bytes-to-bytes codecs (zlib, base64, rot13...) named as charsets, and
            # Python's text codecs that are no charset of mail and fail on any input.
            codec = info.name if getattr(info, "_is_text_encoding", True) else None
            if codec in _NOT_MAIL_CHARSETS:
                codec = None
        except (LookupError, ValueError):  # ValueError: a NUL in the name
            codec = None
    if len(_TEXT_CODEC_CACHE) < 512:
        _TEXT_CODEC_CACHE[name] = codec
    return codec


def _decode_bytes(data: bytes, charset: str | None, defects: list[str], what: str) -> str:
    codec = _codec_for(charset)
    if codec is None:
        if charset and charset.strip().lower() not in ("", "unknown-8bit"):
            defects.append(f"{what}: unknown charset {charset[:40]!r}, decoded as utf-8/cp1252")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("cp1252", errors="replace")
    try:
        return data.decode(codec)
    except (UnicodeError, LookupError):
        pass
    # Mislabelled 8-bit text is usually utf-8 (or cp1252 when sent as "us-ascii").
    if codec != "utf-8":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            defects.append(f"{what}: not valid {charset[:40] if charset else ''}, decoded as utf-8")
            return text
    defects.append(f"{what}: invalid bytes for charset {charset!r:.40}, replaced")
    fallback = "cp1252" if codec == "ascii" else codec
    try:
        return data.decode(fallback, errors="replace")
    except (UnicodeError, LookupError):
        return data.decode("utf-8", errors="replace")


_SURROGATES_RE = re.compile("[\ud800-\udfff]")
_UNSAFE_CTRL_RE = re.compile("[\x00\ud800-\udfff]")


def _clean_str(text: str) -> str:
    """Drop NUL (PostgreSQL text refuses it) and lone surrogates (not encodable as utf-8)."""
    if _UNSAFE_CTRL_RE.search(text) is None:
        return text
    return _SURROGATES_RE.sub("\ufffd", text.replace("\x00", ""))


def _fix_8bit(value: str, defects: list[str], what: str) -> str:
    """BytesParser hands 8-bit header octets over as surrogate escapes: decode them properly."""
    if _SURROGATES_RE.search(value) is None:
        return value
    data = value.encode("ascii", "surrogateescape")
    try:
        text = data.decode("utf-8")
        defects.append(f"8-bit characters in header {what}, decoded as utf-8")
    except UnicodeDecodeError:
        text = data.decode("cp1252", errors="replace")
        defects.append(f"8-bit characters in header {what}, decoded as cp1252")
    return text


_ENCODED_WORD_RE = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?]*)\?=")
_FOLD_RE = re.compile(r"\r?\n(?=[ \t])")
_CRLF_RE = re.compile(r"[\r\n]+")


def _decode_words(value: str, defects: list[str], what: str) -> str:
    """Decode RFC 2047 encoded words leniently (also inside quotes and glued to text)."""
    if "=?" not in value:
        return value
    # Decoded words are bytearrays, extended in place: a run of thousands of words in one
    # charset (a hostile filename) would otherwise be copied once per word.
    pieces: list[tuple[str | None, bytearray | str]] = []
    pos = 0
    for match in _ENCODED_WORD_RE.finditer(value):
        between = value[pos : match.start()]
        # Whitespace between two encoded words is not part of the text (RFC 2047 6.2).
        if between and not (between.isspace() and pieces and pieces[-1][0] is not None):
            pieces.append((None, between))
        charset, encoding, payload = match.group(1), match.group(2).lower(), match.group(3)
        try:
            if encoding == "q":
                data = binascii.a2b_qp(payload.encode("ascii", "replace"), header=True)
            else:
                raw = payload.encode("ascii", "replace").rstrip(b"=")
                if len(raw) % 4 == 1:
                    raw = raw[:-1]
                data = base64.b64decode(raw + b"=" * (-len(raw) % 4))
        except (binascii.Error, ValueError):
            defects.append(f"{what}: undecodable encoded word kept as text")
            pieces.append((None, match.group(0)))
        else:
            # Adjacent words in one charset are joined before decoding, so multi-byte
            # characters split across words (common with ISO-2022-JP, utf-8) survive.
            last = pieces[-1] if pieces else None
            if last is not None and last[0] == charset and isinstance(last[1], bytearray):
                last[1].extend(data)
            else:
                pieces.append((charset, bytearray(data)))
        pos = match.end()
    tail = value[pos:]
    if tail:
        pieces.append((None, tail))
    out: list[str] = []
    for charset, chunk in pieces:
        if charset is None or isinstance(chunk, str):
            out.append(chunk if isinstance(chunk, str) else chunk.decode("ascii", "replace"))
        else:
            out.append(_decode_bytes(bytes(chunk), charset, defects, what))
    return "".join(out)


def _decode_header(value: str, defects: list[str], what: str) -> str:
    """Raw header value -> unfolded, decoded text without CR/LF."""
    value = _FOLD_RE.sub("", value)
    value = _fix_8bit(value, defects, what)
    value = _decode_words(value, defects, what)
    if "\x00" in value:
        defects.append(f"NUL removed from header {what}")
    # Encoded words can smuggle CR/LF; never let them reach a header we might reuse.
    value = _CRLF_RE.sub(" ", value)
    return _clean_str(value).strip()


_WS_CTRL_RE = re.compile(r"[\s\x00-\x1f\x7f]+")


def _one_line(text: str) -> str:
    return _WS_CTRL_RE.sub(" ", text).strip()


# --------------------------------------------------------------------------- addresses

# Strict addr-spec: one unquoted '@', dot-atom or quoted local part, dot-atom or literal
# domain; non-ASCII allowed for SMTPUTF8. 'a@evil@corp' and friends fail here.
_ATEXT = r"[^\x00-\x20\"(),.:;<>@\[\\\]\x7f]"
# A quoted local part may not hold a comma or white space, though RFC 5322 allows them:
# recipients are joined with commas on the way out (an outbox row, the relay's RCPTs), and
# '"x,victim@elsewhere,y"@customer.org' would mail a hidden third party.
_ADDR_SPEC_RE = re.compile(
    rf'(?:{_ATEXT}+(?:\.{_ATEXT}+)*|"(?:[^"\\\r\n,\s]|\\[^,\s])*")'
    rf"@(?:{_ATEXT}+(?:\.{_ATEXT}+)*|\[[^\[\]\\\s]*\])"
)


def _split_address_list(value: str) -> list[tuple[str, str, str]]:
    """Split an address list into (phrase, angle-addr or None-ish, comment) per element.

    A small linear tokenizer: quoted strings, nested comments and angle brackets are
    honoured, group syntax ('name: a, b;') is flattened.
    """
    elements: list[tuple[str, str, str]] = []
    phrase: list[str] = []
    angle: list[str] = []
    comment: list[str] = []
    has_angle = False
    # Whether the phrase so far holds an '@': kept as we go, as joining the phrase at every
    # ':' made 'a@b' and 200,000 colons quadratic (152 s).
    phrase_has_at = False
    i = 0
    n = len(value)

    def flush() -> None:
        nonlocal has_angle, phrase_has_at
        text = "".join(phrase).strip()
        addr = "".join(angle).strip() if has_angle else ""
        if text or addr:
            elements.append((text, addr if has_angle else "\x00", "".join(comment).strip()))
        phrase.clear()
        angle.clear()
        comment.clear()
        has_angle = phrase_has_at = False

    while i < n:
        ch = value[i]
        if ch == '"':
            j = i + 1
            buf = []
            while j < n and value[j] != '"':
                if value[j] == "\\" and j + 1 < n:
                    j += 1
                buf.append(value[j])
                j += 1
            phrase.append('"' + "".join(buf).replace("\\", "\\\\").replace('"', '\\"') + '"')
            phrase_has_at = phrase_has_at or "@" in buf
            i = j + 1
        elif ch == "(":
            depth = 1
            j = i + 1
            start = j
            while j < n and depth:
                if value[j] == "\\":
                    j += 2
                    continue
                if value[j] == "(":
                    depth += 1
                elif value[j] == ")":
                    depth -= 1
                j += 1
            comment.append(value[start : j - 1 if depth == 0 else j])
            phrase.append(" ")
            i = j
        elif ch == "<":
            j = value.find(">", i + 1)
            if j < 0:
                j = n
            angle.clear()
            angle.append(value[i + 1 : j])
            has_angle = True
            i = j + 1
        elif ch in ",;":
            flush()
            i += 1
        elif ch == ":" and not has_angle and not phrase_has_at:
            # group display name: drop it, the members follow
            phrase.clear()
            comment.clear()
            i += 1
        else:
            phrase.append(ch)
            phrase_has_at = phrase_has_at or ch == "@"
            i += 1
    flush()
    return elements


def _unquote_phrase(text: str) -> str:
    """Quoted strings unquoted and unescaped, the rest as it is; a quote that never closes
    is dropped. One pass: the pattern this replaces scanned to the end from each '"' that
    never closed ('(' and 200,000 escaped quotes in a From comment: 232 s). Once a quote
    has no closer, no later one has, so every '"' from there on is dropped."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        q = text.find('"', i)
        if q < 0:
            out.append(text[i:])
            break
        out.append(text[i:q])
        j = q + 1
        quoted: list[str] = []
        while j < n and text[j] != '"':
            if text[j] == "\\" and j + 1 < n and text[j + 1] != "\n":
                j += 1
            quoted.append(text[j])
            j += 1
        if j == n:
            out.append(text[q + 1 :].replace('"', ""))
            break
        out.append("".join(quoted))
        i = j + 1
    return "".join(out)


_SPACE_RUN_RE = re.compile(r"\s+")


def _space_around_at_or_dot(addr: str, run: re.Match[str]) -> str:
    """'' for a run of white space beside an '@' or a '.' ('a . b @ c' is a.b@c), else the run.

    In one pass what the pattern "optional spaces, [@.], optional spaces" did by rescanning a
    run of spaces from each of them (a To of '<a', 200,000 spaces, 'b@example.com>': 291 s).
    """
    before = addr[run.start() - 1 : run.start()]
    after = addr[run.end() : run.end() + 1]
    return "" if before in ("@", ".") or after in ("@", ".") else run.group()


def _normalize_addr(candidate: str) -> str | None:
    addr = candidate.strip()
    if addr.startswith("@") and ":" in addr:
        # obsolete source route <@relay:user@host>
        addr = addr.split(":", 1)[1]
    addr = _SPACE_RUN_RE.sub(lambda m: _space_around_at_or_dot(addr, m), addr)
    if _ADDR_SPEC_RE.fullmatch(addr) is None:
        return None
    return addr.lower()


def _parse_addresses(raw_value: str, defects: list[str], what: str, *, lenient: bool = False) -> list[tuple[str, str]]:
    """(display name, lowercased addr-spec) pairs; invalid addresses are dropped with a defect.

    ``lenient`` accepts the single valid address token inside a bare phrase (Yahoo's
    'Delivered-To: mailing list x@y'); it is only for trace headers, never for From.
    """
    value = _fix_8bit(_FOLD_RE.sub("", raw_value), defects, what)
    value = _CRLF_RE.sub(" ", value)
    result: list[tuple[str, str]] = []
    for phrase, angle, comment in _split_address_list(value):
        candidate = angle if angle != "\x00" else phrase
        addr = _normalize_addr(candidate) if candidate else None
        if addr is None and lenient and angle == "\x00":
            tokens = [t for t in candidate.split() if "@" in t]
            addr = _normalize_addr(tokens[0]) if len(tokens) == 1 else None
        if addr is None:
            if candidate.strip():
                defects.append(f"{what}: invalid address {candidate.strip()[:80]!r} ignored")
            continue
        name_src = phrase if angle != "\x00" else comment
        name = _one_line(_decode_words(_unquote_phrase(name_src), defects, what))
        result.append((_clean_str(name), _clean_str(addr)))
    return result


# An id without spaces as it is (a stray quote included), or one whose local part is quoted
# (RFC 5322's obs-id-left, `<"a b"@host>`, quoted pairs allowed), which has spaces: that was
# read as `b"@host`. Each alternative stops at a quote or bracket: linear on hostile input.
_MSGID_RE = re.compile(r'<("(?:[^"\\\r\n]|\\.)*"@[^<>\s"]+|[^<>\s]+)>')


def _parse_msgids(raw_value: str) -> list[str]:
    # UTF-8 ids are legal where the mail came with SMTPUTF8 (RFC 6532): decoded, not turned
    # into U+FFFD. The defect, if any, is noted where the header block is decoded.
    value = _CRLF_RE.sub(" ", _FOLD_RE.sub("", _fix_8bit(raw_value, [], "message id")))
    ids = _MSGID_RE.findall(value)
    if not ids:
        # Some clients omit the brackets; accept bare tokens that look like ids.
        ids = [token.strip("<>,;") for token in value.split() if "@" in token and '"' not in token]
    return [_clean_str(i) for i in ids if i]


# --------------------------------------------------------------------------- attachments

_BIDI_AND_FORMAT_RE = re.compile("[\u200b-\u200f\u202a-\u202e\u2066-\u2069\u061c\ufeff]")
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_MAX_FILENAME = 200


def sanitize_filename(name: str | None) -> str:
    """A display-only file name: no path parts, controls or bidi tricks, at most 200 chars."""
    if not name:
        return "attachment"
    text = unicodedata.normalize("NFC", name)
    text = _BIDI_AND_FORMAT_RE.sub("", text)
    text = "".join(ch for ch in text if unicodedata.category(ch)[0] != "C")
    text = re.split(r"[/\\]", text)[-1]
    text = _DRIVE_RE.sub("", text).strip()
    if not text.strip("."):
        return "attachment"
    if len(text) > _MAX_FILENAME:
        _stem, dot, ext = text.rpartition(".")
        # Keep a short extension visible: it is what tells the reader what the file is.
        keep = len(ext) + 1 if dot and 0 < len(ext) <= 16 else 0
        text = text[: _MAX_FILENAME - keep] + text[len(text) - keep :] if keep else text[:_MAX_FILENAME]
    return text


def _content_id(value: str | None) -> str | None:
    if not value:
        return None
    cid = str(value).strip()
    if cid.lower().startswith("cid:"):
        cid = cid[4:]
    cid = cid.strip().strip("<>").strip()
    return _clean_str(cid) or None


_CID_REF_RE = re.compile(r"""cid:([^"'\s>)]+)""", re.I)


# --------------------------------------------------------------------------- HTML

_HTML_TAGS = set(nh3.ALLOWED_TAGS) | {"font"}
_HTML_ATTRIBUTES: dict[str, set[str]] = {k: set(v) for k, v in nh3.ALLOWED_ATTRIBUTES.items()}
_HTML_ATTRIBUTES.setdefault("*", set()).update({"title", "dir", "lang"})
_HTML_ATTRIBUTES.setdefault("font", set()).update({"color", "face", "size"})
# cid: lets inline images resolve against our attachments; javascript:/data: stay out.
_URL_SCHEMES = set(nh3.ALLOWED_URL_SCHEMES) | {"cid"}


def sanitize_html(html: str) -> str:
    return nh3.clean(
        html,
        tags=_HTML_TAGS,
        attributes=_HTML_ATTRIBUTES,
        url_schemes=_URL_SCHEMES,
        link_rel="noopener noreferrer nofollow",
        strip_comments=True,
        # Dropped with their text: nh3's default is script and style only, and a <title>
        # in the head read as the first words of the mail.
        clean_content_tags={"script", "style", "title", "head", "template", "noscript"} - _HTML_TAGS,
    )


# --------------------------------------------------------------------------- the walk

_DEFECT_TEXT = {
    "MissingHeaderBodySeparatorDefect": "no blank line between headers and body",
    "StartBoundaryNotFoundDefect": "multipart boundary never found",
    "CloseBoundaryNotFoundDefect": "multipart closing boundary missing",
    "FirstHeaderLineIsContinuationDefect": "first header line is a continuation line",
    "MisplacedEnvelopeHeaderDefect": "mbox 'From ' line inside the headers",
    "MultipartInvariantViolationDefect": "multipart type without subparts",
    "NoBoundaryInMultipartDefect": "multipart without boundary parameter",
    "InvalidBase64PaddingDefect": "base64 body with bad padding",
    "InvalidBase64CharactersDefect": "base64 body with invalid characters",
    "InvalidBase64LengthDefect": "base64 body with invalid length",
    "InvalidMultipartContentTransferEncodingDefect": "multipart with invalid transfer encoding",
}


def _describe_defect(defect: object, where: str) -> str:
    name = type(defect).__name__
    text = _DEFECT_TEXT.get(name) or re.sub(r"(?<!^)(?=[A-Z])", " ", name).lower()
    return f"{text} ({where})"


def _message_bytes(msg: Message) -> bytes:
    buf = io.BytesIO()
    # maxheaderlen=0: do not refold headers, keep the forwarded mail as close to its bytes.
    BytesGenerator(buf, mangle_from_=False, maxheaderlen=0, policy=compat32).flatten(msg)
    return buf.getvalue()


def _raw_header_values(msg: Message, name: str) -> list[str]:
    key = name.lower()
    return [str(v) for k, v in msg.raw_items() if k.lower() == key]


@dataclass
class _Collector:
    """What the walk found; attachments are (raw name, content type, data, raw Content-ID)."""

    defects: list[str]
    texts: list[str] = field(default_factory=list)
    htmls: list[str] = field(default_factory=list)
    attachments: list[tuple[str, str, bytes, str | None]] = field(default_factory=list)
    tnef_bodies: list[str] = field(default_factory=list)
    is_dsn: bool = False
    # None until a delivery report is seen: only parts inside one are read for these.
    dsn_ids: list[str] | None = None
    dsn_failed: list[str] | None = None


def _payload_bytes(part: Message, defects: list[str], where: str) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except (ValueError, TypeError, binascii.Error, LookupError, AssertionError) as exc:
        defects.append(f"undecodable body ({where}): {type(exc).__name__}")
        data = None
    if isinstance(data, bytes):
        return data
    try:
        payload = part.get_payload()
    except (UnicodeError, LookupError):
        return b""
    if isinstance(payload, str):
        return payload.encode("ascii", "surrogateescape")
    return b""


def _dsn_status(part: Message, col: _Collector) -> None:
    assert col.dsn_failed is not None
    blocks = part.get_payload()
    if not isinstance(blocks, list):
        # Not parsed into blocks (e.g. encoded): read the text ourselves.
        text = _payload_bytes(part, col.defects, "delivery-status").decode("utf-8", "replace")
        blocks = [
            BytesParser(policy=compat32).parsebytes(chunk.strip().encode() + b"\n\n")
            for chunk in re.split(r"\r?\n\s*\r?\n", text)
            if chunk.strip()
        ]
    for block in blocks:
        if not isinstance(block, Message):
            continue
        action = str(block.get("action", "")).strip().lower()
        if not action.startswith("failed"):
            continue
        # Both: the address we mailed may have been forwarded (Original-Recipient carol@,
        # Final-Recipient csmith@, a mailbox renamed and gone). A report cannot tell that
        # from one failed member of a larger alias; counting it stops mail to a dead address.
        for normalized in (*_dsn_recipients(block, "final-recipient"),
                           *_dsn_recipients(block, "original-recipient")):
            if normalized not in col.dsn_failed:
                col.dsn_failed.append(normalized)


def _dsn_recipients(block: Message, header_name: str) -> list[str]:
    out: list[str] = []
    for raw in _raw_header_values(block, header_name):
        value = _FOLD_RE.sub("", raw).strip()
        addr_type, sep, addr = value.partition(";")
        candidate = addr if sep else addr_type
        normalized = _normalize_addr(candidate.strip().strip("<>"))
        if normalized:
            out.append(normalized)
    return out


def _dsn_ids_from_headers(raw_values: Iterable[str], col: _Collector) -> None:
    assert col.dsn_ids is not None
    for raw in raw_values:
        for mid in _parse_msgids(raw)[:1]:
            if mid not in col.dsn_ids:
                col.dsn_ids.append(mid)


# tnefparse copies the rest of the data for each record it reads: its time grows with
# records x bytes (640,000 empty records, 7 MB, took over three minutes). Past this budget,
# or past MAX_TNEF_FILES files (each a stored blob and a line in every notice, outside the
# MIME part limit), winmail.dat is kept as it came, unopened.
MAX_TNEF_COPY_BYTES = 2**31
MAX_TNEF_FILES = 100
_TNEF_RECORD_OVERHEAD = 11  # level (1), name and type (4), length (4), checksum (2)


def _tnef_record_count(data: bytes) -> int:
    """The number of records in a TNEF stream, read in linear time (6 bytes of header,
    then records that each give their length)."""
    count, offset = 0, 6
    while offset + _TNEF_RECORD_OVERHEAD <= len(data):
        length = int.from_bytes(data[offset + 5:offset + 9], "little")
        offset += _TNEF_RECORD_OVERHEAD + length
        count += 1
    return count


def _handle_tnef(data: bytes, col: _Collector, where: str) -> None:
    from tnefparse import TNEF  # imported lazily: only Outlook mail needs it

    records = _tnef_record_count(data)
    if records * len(data) > MAX_TNEF_COPY_BYTES:
        col.defects.append(f"winmail.dat not unpacked ({where}): {records} records in {len(data)} bytes "
                           "is more than mailgate reads; kept as winmail.dat")
        return
    try:
        tnef = TNEF(data, do_checksum=False)
        if len(tnef.attachments) > MAX_TNEF_FILES:
            col.defects.append(f"winmail.dat not unpacked ({where}): {len(tnef.attachments)} files "
                               f"(limit {MAX_TNEF_FILES}); kept as winmail.dat")
            return
        contained: list[tuple[str, bytes]] = []
        for att in tnef.attachments:
            name = att.long_filename() or att.name
            if isinstance(name, bytes):
                name = name.decode("utf-8", "replace")
            payload = att.data if isinstance(att.data, bytes) else b""
            contained.append((str(name).strip("\x00"), payload))
        body = tnef.body
    except Exception as exc:  # noqa: BLE001 - tnefparse raises anything on hostile input
        col.defects.append(f"winmail.dat could not be decoded ({where}): {type(exc).__name__}")
        return
    for name, payload in contained:
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        col.attachments.append((name, ctype, payload, None))
    if body:
        if isinstance(body, bytes):
            body = _decode_bytes(body, None, col.defects, "winmail.dat body")
        col.tnef_bodies.append(str(body))


def _param_bytes(value: str) -> bytes:
    """The bytes of a decoded RFC 2231 value: the stdlib unquotes %XX to Latin-1 characters,
    and raw 8-bit bytes in the header come as surrogate escapes."""
    try:
        return value.encode("latin-1", "surrogateescape")
    except UnicodeEncodeError:  # characters beyond Latin-1: the header was already text
        return value.encode("utf-8", "surrogateescape")


def _walk(msg: Message, col: _Collector) -> None:
    # (part, index path, inside a delivery report)
    stack: list[tuple[Message, str, bool]] = [(msg, "1", False)]
    while stack:
        part, where, in_report = stack.pop()
        try:
            _visit(part, where, in_report, col, stack)
        except RecursionError:
            raise
        except Exception as exc:  # noqa: BLE001 - one broken part must not lose the mail
            col.defects.append(f"part {where} skipped: {type(exc).__name__}: {str(exc)[:80]}")


def _visit(
    part: Message,
    where: str,
    in_report: bool,
    col: _Collector,
    stack: list[tuple[Message, str, bool]],
) -> None:
    for defect in part.defects:
        if len(col.defects) < _MAX_DEFECTS:
            col.defects.append(_describe_defect(defect, f"part {where}"))
    try:
        view, view_defects = mime_header_view(part)
    except Exception as exc:  # its RFC 2231 decoding trusts the charset named in the header
        view, view_defects = part, [f"MIME headers not decoded: {type(exc).__name__}"]
    col.defects.extend(f"{d} (part {where})" for d in view_defects)
    ctype = view.get_content_type()

    if ctype == "message/delivery-status":
        if col.dsn_failed is not None:
            _dsn_status(part, col)
        return

    # Not get_payload() on a leaf: compat32 decodes 8-bit text with the declared charset
    # there, and a charset such as "idna" raises.
    payload = part.get_payload() if part.is_multipart() else None
    if isinstance(payload, list):
        if ctype.startswith("message/"):
            nested = payload[0] if payload and isinstance(payload[0], Message) else None
            if nested is None:
                return
            if in_report:
                _dsn_ids_from_headers(_raw_header_values(nested, "message-id"), col)
            subjects = _raw_header_values(nested, "subject")
            subject = ""
            if subjects:
                subject = _one_line(_decode_header(subjects[0], col.defects, "Subject"))
            name = sanitize_filename((subject[: _MAX_FILENAME - 4] or "forwarded message") + ".eml")
            col.attachments.append((name, "message/rfc822", _message_bytes(nested), view.get("content-id")))
            return
        report = ctype == "multipart/report" and (str(view.get_param("report-type", "")).lower() == "delivery-status")
        if report:
            col.is_dsn = True
            col.dsn_ids = col.dsn_ids if col.dsn_ids is not None else []
            col.dsn_failed = col.dsn_failed if col.dsn_failed is not None else []
        children = [c for c in payload if isinstance(c, Message)]
        for index in range(len(children) - 1, -1, -1):
            stack.append((children[index], f"{where}.{index + 1}", in_report or report))
        return

    disposition = view.get_content_disposition()
    filename: str | None = None
    param = view.get_param("filename", header="content-disposition") or view.get_param("name")
    if isinstance(param, tuple):
        # An RFC 2231 name: its bytes decoded here, by the same charset rules as a body. The
        # stdlib would use any Python codec the name gives, and some (punycode, idna) turn
        # a name into other text, or raise on it, depending on the Python version.
        raw_name = _decode_bytes(_param_bytes(param[2]), param[0], col.defects, "attachment name")
    else:
        try:
            raw_name = view.get_filename() or view.get_param("name")
        except (UnicodeError, LookupError):
            raw_name = None
    if raw_name:
        if isinstance(raw_name, tuple):
            raw_name = raw_name[2]
        filename = _decode_words(str(raw_name), col.defects, "attachment name")

    if ctype in ("text/plain", "text/html") and disposition != "attachment" and not filename:
        data = _payload_bytes(part, col.defects, f"part {where}")
        text = _decode_bytes(data, view.get_content_charset(), col.defects, f"part {where}")
        text = _clean_str(text.replace("\r\n", "\n"))
        (col.texts if ctype == "text/plain" else col.htmls).append(text)
        return

    data = _payload_bytes(part, col.defects, f"part {where}")
    if ctype == "text/rfc822-headers" and in_report:
        headers = BytesParser(policy=compat32).parsebytes(data, headersonly=True)
        _dsn_ids_from_headers(_raw_header_values(headers, "message-id"), col)
    is_tnef = ctype in ("application/ms-tnef", "application/vnd.ms-tnef") or ((filename or "").lower() == "winmail.dat")
    if is_tnef:
        col.attachments.append((filename or "winmail.dat", ctype, data, view.get("content-id")))
        _handle_tnef(data, col, f"part {where}")
        return
    col.attachments.append((filename or "", ctype, data, view.get("content-id")))


# --------------------------------------------------------------------------- entry point


def _parse_date(raw: str | None, defects: list[str]) -> datetime | None:
    if raw is None:
        return None
    value = _CRLF_RE.sub(" ", _FOLD_RE.sub("", raw)).strip()
    value = _fix_8bit(value, defects, "Date")
    if not value:
        defects.append("empty Date header")
        return None
    result = parse_mail_date(value)
    if result.value is not None:
        if "weekday-mismatch" in result.reasons:
            defects.append("Date: weekday does not match the date")
        return result.value
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        defects.append(f"unparseable Date {value[:60]!r}")
        return None
    if parsed.tzinfo is None:
        defects.append("Date without time zone, taken as UTC")
        return parsed.replace(tzinfo=UTC)
    defects.append(f"non-standard Date {value[:60]!r} ({', '.join(result.reasons)})")
    try:
        return parsed.astimezone(UTC)
    except (OverflowError, ValueError):
        return None


def _dedupe(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(i for i in items if i))


def parse_message(
    raw: bytes,
    *,
    max_depth: int = 20,
    max_parts: int = 500,
    max_header_bytes: int = 256_000,
    max_addresses: int = 500,
) -> ParsedMessage:
    """Parse raw mail bytes; raise UnusableMessage when they cannot be handled as a mail."""
    raw = bytes(raw)
    _precheck(raw, max_depth=max_depth, max_header_bytes=max_header_bytes, max_addresses=max_addresses)
    try:
        msg = BytesParser(policy=compat32).parsebytes(raw)
        depth, parts = _tree_stats(msg)
    except RecursionError:
        # Backstop only: the pre-scan should have refused this already.
        raise UnusableMessage(f"MIME nesting deeper than {max_depth} levels") from None
    if depth > max_depth:
        raise UnusableMessage(f"MIME nesting deeper than {max_depth} levels")
    if parts > max_parts:
        raise UnusableMessage(f"{parts} MIME parts (limit {max_parts})")

    defects: list[str] = []
    raw_items = [(str(k).lower(), str(v)) for k, v in msg.raw_items()]
    from_values = [v for k, v in raw_items if k == "from"]
    if len(from_values) > 1:
        raise UnusableMessage("more than one From header (RFC 7489 6.6.1)")

    headers = tuple((name, _decode_header(value, defects, name)) for name, value in raw_items)

    def first_raw(name: str) -> str | None:
        found = [v for k, v in raw_items if k == name]
        if len(found) > 1 and name in ("subject", "message-id", "date", "to", "cc", "reply-to"):
            defects.append(f"duplicate {name} header, the first one is used")
        return found[0] if found else None

    def addresses(*names: str, lenient: bool = False) -> tuple[str, ...]:
        out: list[str] = []
        for name in names:
            for k, v in raw_items:
                if k == name:
                    parsed = _parse_addresses(v, defects, name, lenient=lenient)
                    out.extend(addr for _, addr in parsed)
        return _dedupe(out)

    from_addr = from_name = ""
    if from_values:
        parsed_from = _parse_addresses(from_values[0], defects, "from")
        if parsed_from:
            from_name, from_addr = parsed_from[0]
            if len(parsed_from) > 1:
                defects.append("From names several mailboxes, the first one is used")
        else:
            defects.append("From header without a valid address")
    else:
        defects.append("missing From header")

    original_from = None
    original_from_values = [v for k, v in raw_items if k == "x-original-from"]
    if len(original_from_values) == 1:
        parsed_original = _parse_addresses(original_from_values[0], defects, "x-original-from")
        original_from = parsed_original[0] if len(parsed_original) == 1 else None

    raw_mid = first_raw("message-id")
    mids = _parse_msgids(raw_mid) if raw_mid is not None else []
    message_id = mids[0] if mids else None
    if message_id is None:
        defects.append("missing Message-ID")

    raw_subject = first_raw("subject")
    subject = _one_line(_decode_header(raw_subject, defects, "subject")) if raw_subject else ""

    col = _Collector(defects=defects)
    try:
        _walk(msg, col)
    except RecursionError:
        raise UnusableMessage(f"MIME nesting deeper than {max_depth} levels") from None

    html_src = "\n".join(h for h in col.htmls if h.strip())
    text = "\n\n".join(t.strip("\n") for t in col.texts if t.strip())
    if html_src and too_deep(html_src):
        # Hostile nesting: no HTML view (the sanitiser would take minutes), its bare text
        # only; the original stays in the raw message.
        defects.append(f"HTML nested deeper than {MAX_HTML_DEPTH} levels: kept as text only")
        html = None
        text = text or html_to_text(html_src)
    else:
        html = sanitize_html(html_src) if html_src else None
        if not text and html:
            text = html_to_text(html_src)
    if not text and col.tnef_bodies:
        text = "\n\n".join(col.tnef_bodies).strip()

    referenced = {ref.lower() for ref in _CID_REF_RE.findall(html_src)} if html_src else set()
    attachments: list[Attachment] = []
    for name, ctype, data, cid_raw in col.attachments:
        cid = _content_id(cid_raw)
        attachments.append(
            Attachment(
                filename=sanitize_filename(name),
                content_type=ctype.lower(),
                data=data,
                content_id=cid,
                # Only images the HTML actually shows are inline; anything else is listed,
                # so a customer's screenshot is never hidden from the agent.
                inline=cid is not None and cid.lower() in referenced,
            )
        )

    in_reply_to_raw = first_raw("in-reply-to")
    references_raw = " ".join(v for k, v in raw_items if k == "references")
    date_raw = first_raw("date")

    if len(defects) > _MAX_DEFECTS:
        dropped = len(defects) - _MAX_DEFECTS
        defects = defects[:_MAX_DEFECTS] + [f"... and {dropped} more defects"]

    return ParsedMessage(
        message_id=message_id,
        subject=subject,
        from_addr=from_addr,
        from_name=from_name,
        to=addresses("to"),
        cc=addresses("cc"),
        reply_to=addresses("reply-to"),
        delivered_to=addresses("delivered-to", "x-original-to", lenient=True),
        in_reply_to=_dedupe(_parse_msgids(in_reply_to_raw) if in_reply_to_raw else []),
        references=_dedupe(_parse_msgids(references_raw)),
        date=_parse_date(date_raw, defects),
        headers=headers,
        text=text,
        html=html,
        attachments=tuple(attachments),
        defects=tuple(dict.fromkeys(defects)),
        is_dsn=col.is_dsn,
        dsn_original_message_ids=tuple(col.dsn_ids or ()),
        dsn_failed_recipients=tuple(col.dsn_failed or ()),
        original_from=original_from,
        mime=msg,
    )
