"""The new words of a reply: quoted history, quote headers and signatures removed.

mail-parser-reply finds the quote headers of the languages it knows (its HEADER_REGEX);
our own markers add Finnish, Russian, forwarded-message banners, mobile footers and
the '>' quoting it leaves alone. We work line by line on the original text so that
indentation and the agent's '#commands' survive exactly as written.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from mailparser_reply.constants import MAIL_LANGUAGES
from mailparser_reply.parser import EmailMessage

__all__ = ["visible_reply_text"]

# Header detection only needs the start of a line; capping the length keeps the
# library's nested lazy patterns from going quadratic on one huge hostile line.
_MAX_SCAN_LINE = 400
_MAX_LIBRARY_SCAN = 8_000  # characters of the line view searched with the library's pattern

_ORIGINAL_WORDS = "original message|ursprüngliche nachricht|alkuperäinen viesti|исходное сообщение|message d'origine"
_FORWARDED_WORDS = ("forwarded message|weitergeleitete nachricht|välitetty viesti|пересылаемое сообщение"
                    "|переадресованное сообщение")
_BANNER_WORDS = ("begin forwarded message|anfang der weitergeleiteten nachricht|välitetty viesti alkaa"
                 "|начало переадресованного сообщения|début du message réexpédié")
_SEPARATOR_RE = re.compile(rf"^\s*-{{2,}}\s*(?:{_ORIGINAL_WORDS}|{_FORWARDED_WORDS})\s*-{{2,}}\s*$", re.IGNORECASE)
_FORWARD_BANNER_RE = re.compile(rf"^\s*(?:{_BANNER_WORDS})\s*:\s*$", re.IGNORECASE)
# The forwarded forms among the separators and banners: what follows is a message the
# sender wants read, not history (a requester forwarding a vendor's mail to us).
_FORWARDED_RE = re.compile(rf"^\s*(?:-{{2,}}\s*(?:{_FORWARDED_WORDS})\s*-{{2,}}|(?:{_BANNER_WORDS})\s*:)\s*$",
                           re.IGNORECASE)
# An attribution line carries an address, a time or a year; "Please run this:" does not.
_ATTRIBUTION_HINT_RE = re.compile(r"@|\d{1,2}:\d{2}|\b(?:19|20)\d{2}\b")
# "On ... wrote:", "Am ... schrieb ...:", "... kirjoitti:", "... написал(а):" and the
# Thunderbird forms ("X wrote:", "X пишет:"); also matched on two joined lines, as Gmail
# wraps long ones.
_WROTE_RE = re.compile(
    r"^\s*(?:"
    r"on\b.{1,300}\bwrote\s*:"
    r"|.{1,300}\bwrote\s*:"
    r"|am\b.{1,300}\bschrieb\b.{0,200}:"
    r"|.{1,300}\bschrieb\s*:"
    r"|.{1,300}\bkirjoitti\b.{0,200}:"
    r"|.{1,300}(?:написал\(а\)|написала|написал|пишет)\s*:"
    r"|le\b.{1,300}\ba écrit\s*:"
    r"|.{1,300}\b(?:escribió|escreveu|ha scritto|schreef)\s*:"
    r")\s*$",
    re.IGNORECASE,
)
# Dutch Gmail puts the sender after the verb ("Op ... schreef X <x@y>:"): taken only with a
# time, year or address in the line, as "De technicus schreef het volgende:" is prose.
_WROTE_SENDER_AFTER_RE = re.compile(
    r"^\s*.{1,300}\b(?:escribió|escreveu|ha scritto|schreef)\b.{0,200}:\s*$",
    re.IGNORECASE,
)
_MAX_WROTE_LINE = 520  # "am" + 300 + "schrieb" + 200 + ":", the longest the pattern takes
# Cheap keyword test so the backtracking pattern above only runs on candidate lines.
_WROTE_HINTS = ("wrote", "schrieb", "kirjoitti", "написал", "пишет", "a écrit", "escribió", "escreveu",
                "ha scritto", "schreef")


def _is_wrote_header(text: str) -> bool:
    """An "On ... wrote:" line. Every form of _WROTE_RE ends with ':' and is at most
    _MAX_WROTE_LINE long, which is checked first: on a line without a final ':' the
    pattern tries every split of its .{1,300} and .{0,200} (1 MB of 400-character
    "am schrieb am schrieb ..." lines took 45 s)."""
    stripped = text.strip()
    if not stripped.endswith(":") or len(stripped) > _MAX_WROTE_LINE:
        return False
    return _WROTE_RE.match(text) is not None or (
        _ATTRIBUTION_HINT_RE.search(text) is not None and _WROTE_SENDER_AFTER_RE.match(text) is not None)


def _is_mobile_footer(line: str) -> bool:
    # Stripped and short: the pattern's space classes overlap, and "sent from my phone"
    # with 2,000 trailing spaces took half a second a line.
    stripped = line.strip()
    return len(stripped) <= _MAX_FOOTER_LINE and _MOBILE_FOOTER_RE.match(stripped) is not None


def _has_wrote_hint(line: str) -> bool:
    lowered = line.lower()
    return any(hint in lowered for hint in _WROTE_HINTS)


# Outlook's header block over the quoted mail, in the languages of its users here and
# in es/pt/it/nl (an unknown one sent the quoted notice on as the agent's answer).
_OUTLOOK_FROM_RE = re.compile(r"^\s*\*?(?:from|von|lähettäjä|от|de|da|van)\*?\s*:\s*\S", re.IGNORECASE)
_OUTLOOK_FIELD_RE = re.compile(
    r"^\s*\*?(?:sent|date|to|subject|cc|gesendet|datum|an|betreff|lähetetty|päivämäärä"
    r"|vastaanottaja|aihe|отправлено|дата|кому|тема|копия|envoyé|à|objet"
    r"|enviado|fecha|para|asunto|assunto|inviato|data|a|oggetto|verzonden|aan|onderwerp)\*?\s*:",
    re.IGNORECASE,
)
_OUTLOOK_SUBJECT_RE = re.compile(
    r"^\s*\*?(?:subject|betreff|aihe|тема|objet|asunto|assunto|oggetto|onderwerp)\*?\s*:", re.IGNORECASE)
_UNDERSCORE_RE = re.compile(r"^\s*_{10,}\s*$")
# Under Outlook's line of underscores, its header block in any language (Swedish "Från:",
# Polish "Od:", Japanese "差出人:"): a field that names an address, then two more fields.
# The sent field's time (10:00, 10:00:00), year or dotted date (1.12.2026), standing alone:
# not part of a dotted number (an IP, a price, a version) nor of a word (X2000, 1920x1080,
# 0x2003). ASCII boundaries, as "2026年" has its year before a word character.
_SENT_AT_RE = re.compile(r"(?<![0-9A-Za-z.:])(?:\d{1,2}:\d{2}(?::\d{2})?|(?:19|20)\d{2}"
                         r"|\d{1,2}\.\d{1,2}\.(?:19|20)\d{2})(?![0-9A-Za-z.:])")
_ANY_FIELD_RE = re.compile(r"^\s*\*?[^\W\d_][^\W\d_ .'-]{0,20}(?:[ .'-][^\W\d_]{1,20}){0,2}\*?\s*[:：]")
_QUOTED_RE = re.compile(r"^\s*>")
_SIG_DASH_RE = re.compile(r"^-- ?$")
_MAX_FOOTER_LINE = 80  # the longest footer above is about 60 characters
_MOBILE_FOOTER_RE = re.compile(
    r"^\s*(?:"
    r"sent from my [\w\- ]{1,40}|sent from (?:outlook|mail) for [\w ]{1,20}"
    r"|get outlook for (?:ios|android)"
    r"|von meinem [\w\- ]{1,40} gesendet|gesendet von meinem [\w\- ]{1,40}"
    r"|gesendet von outlook für (?:ios|android)|outlook für (?:ios|android) herunterladen"
    r"|lähetetty (?:\w+ ){0,3}\w+(?:sta|stä)(?: \(\w+\))?"
    r"|отправлено с (?:моего )?[\w\- ]{1,40}|отправлено из [\w\-. ]{1,40}"
    r")\s*[.!]?\s*$",
    re.IGNORECASE,
)


@lru_cache(maxsize=16)
def _library_header_regex(languages: tuple[str, ...]) -> re.Pattern[str]:
    known = [lang for lang in languages if lang in MAIL_LANGUAGES] or ["en"]
    # EmailMessage compiles the header regex for its languages; we reuse it on our
    # own line-preserving view of the text instead of its stripped copy.
    return EmailMessage(text="", languages=list(known)).HEADER_REGEX


def _library_cut(lines: list[str], start: int, languages: tuple[str, ...]) -> int | None:
    view = "\n".join(line.strip()[:_MAX_SCAN_LINE] for line in lines)
    offset = sum(len(line.strip()[:_MAX_SCAN_LINE]) + 1 for line in lines[:start])
    # The library's pattern runs with DOTALL and nested lazy spans: about 20 ms a line on
    # hostile 400-character lines (1 MB of "am schrieb am schrieb ...": 45 s). Searching
    # a bounded stretch keeps a message's cost bounded (hostile lines: 3.6 s in 32,000
    # characters, 0.9 s in 8,000); a quote header further down is left to our own rules
    # (_classify), which read every line. 8,000 and 32,000 cut the same on the 3,358
    # corpus and fixture texts.
    match = _library_header_regex(languages).search(view, offset, offset + _MAX_LIBRARY_SCAN)
    if match is None:
        return None
    position = match.start()
    # The Outlook pattern may start on the newline before its first field.
    while position < len(view) and view[position] == "\n":
        position += 1
    return view.count("\n", 0, position)


def _is_outlook_block(lines: list[str], index: int) -> bool:
    """From-line and two header fields. With an address in the From line or a subject
    among the fields only: "Da: Roma Termini / A: Fiumicino / Data: 12 marzo" is a trip."""
    if not _OUTLOOK_FROM_RE.match(lines[index]):
        return False
    fields = [line for line in lines[index + 1 : index + 6] if _OUTLOOK_FIELD_RE.match(line)]
    return len(fields) >= 2 and ("@" in lines[index] or "<" in lines[index]
                                 or any(_OUTLOOK_SUBJECT_RE.match(line) for line in fields))


def _is_any_language_block(lines: list[str], index: int) -> bool:
    """A header block of a language _OUTLOOK_FROM_RE does not know, taken only under
    Outlook's underscores and only in Outlook's shape: a field with an address, the date
    and time sent on one of the two lines below, four fields in all. "Login: carol@...",
    "Server: ...", "Port: 993" in an answer is text."""
    first = lines[index][:_MAX_SCAN_LINE]
    if not _ANY_FIELD_RE.match(first) or not ("@" in first or "<" in first):
        return False
    below = [line[:_MAX_SCAN_LINE] for line in lines[index + 1 : index + 6]]
    fields = [line for line in below if _ANY_FIELD_RE.match(line)]
    sent = any(_ANY_FIELD_RE.match(line) and _SENT_AT_RE.search(line) for line in below[:2])
    return len(fields) >= 3 and sent


def _next_nonblank(lines: list[str], index: int) -> int | None:
    for j in range(index, min(index + 3, len(lines))):
        if lines[j].strip():
            return j
    return None


def _is_signature(lines: list[str], index: int, end: int) -> bool:
    """'-- ' starts a signature; a bare '--' only with a few lines after it (Outlook drops
    the space; a '--' between two steps of an answer is no signature)."""
    line = lines[index]
    if line == "-- ":
        return True
    return bool(_SIG_DASH_RE.match(line)) and sum(1 for ln in lines[index + 1 : end] if ln.strip()) <= 6


def _introduces_quote(lines: list[str], index: int) -> bool:
    j = _next_nonblank(lines, index + 1)
    return j is not None and bool(_QUOTED_RE.match(lines[j]))


def _classify(lines: list[str], index: int, last_text: int) -> tuple[str, int] | None:
    """('hard', n): history starts here, drop the rest. ('soft', n): drop these n lines
    only, because '>' quoting follows and interleaved answers below must survive.
    last_text: the last line that is neither blank nor '>' quoted."""
    line = lines[index]
    if len(line) > 2 * _MAX_SCAN_LINE:
        return None
    if _SEPARATOR_RE.match(line) or _FORWARD_BANNER_RE.match(line):
        return ("hard", 1)
    if _is_outlook_block(lines, index):
        return ("hard", 1)
    if _UNDERSCORE_RE.match(line):
        j = _next_nonblank(lines, index + 1)
        if j is not None and (_is_outlook_block(lines, j) or _is_any_language_block(lines, j)):
            return ("hard", 1)
        return None
    span = 0
    nxt = lines[index + 1].strip() if index + 1 < len(lines) else ""
    if _has_wrote_hint(line) and _is_wrote_header(line):
        span = 1
    elif (
        nxt
        and len(nxt) < _MAX_SCAN_LINE
        and not line.rstrip().endswith(":")
        # Dutch: "Op ... schreef X <" + "x@y>:"; a verb on the first line alone joins only with
        # a time, year or address ("Kollega kirjoitti ohjeen" + "Vaiheet ovat:" is prose).
        and (_has_wrote_hint(nxt) or (_has_wrote_hint(line) and _ATTRIBUTION_HINT_RE.search(line + nxt)))
        and _is_wrote_header(line.rstrip() + " " + nxt)
    ):
        span = 2
    if span:
        return ("soft", span) if _introduces_quote(lines, index + span - 1) else ("hard", span)
    # Another "...:" line directly introducing a '>' quoted block is a quote header when it
    # names a sender or a time, or when nothing but quoting follows ("Helpdesk escribió:");
    # "Please run this:" above a quoted command, with the answer going on below, is text.
    if (line.rstrip().endswith(":") and _introduces_quote(lines, index)
            and (_ATTRIBUTION_HINT_RE.search(line) or index >= last_text)):
        return ("soft", 1)
    return None


_RULE_LINE_RE = re.compile(r"[-_=*~\u2500\u2014]{3,}")


def visible_reply_text(text: str, *, languages: Sequence[str] = ("en", "de", "fi", "ru"),
                       whole_if_empty: bool = True, keep_forwarded: bool = False) -> str:
    """The new text of a reply. whole_if_empty: when nothing new is left, the whole text
    (a customer's mail is never lost to a wrong cut); an agent's reply is then empty, since
    sending it on would mail the quoted notice or the signature to the customer.
    keep_forwarded: a forwarded message and everything after it is kept (a requester
    forwarding a vendor's mail wants it read)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")

    # Agent #commands at the very top stay as written and are never scanned as markers.
    head = 0
    while head < len(lines) and (not lines[head].strip() or lines[head].lstrip().startswith("#")):
        head += 1

    cut = len(lines)
    dropped: set[int] = set()
    forwarded = len(lines)
    last_text = max((i for i, line in enumerate(lines) if line.strip() and not _QUOTED_RE.match(line)),
                    default=-1)
    index = head
    while index < len(lines):
        if keep_forwarded and _FORWARDED_RE.match(lines[index]):
            forwarded = index
            break
        verdict = _classify(lines, index, last_text)
        if verdict is None:
            index += 1
            continue
        kind, span = verdict
        if kind == "hard":
            cut = index
            break
        dropped.update(range(index, index + span))
        index += span

    library = _library_cut(lines, head, tuple(lang.lower() for lang in languages))
    # Two lines that merely look like header fields ("To: ...", "Subject: ..." in an
    # example the agent writes out) are no quote header: it must start From or be a
    # "wrote:" line.
    if (library is not None and head <= library < min(cut, forwarded) and library not in dropped
            and (_OUTLOOK_FROM_RE.match(lines[library]) or _has_wrote_hint(lines[library]))):
        if _introduces_quote(lines, library):
            dropped.add(library)
        else:
            cut = library

    body: list[str] = []
    for number in range(head, cut):
        line = lines[number]
        if number >= forwarded:
            body.extend(ln.rstrip() for ln in lines[number:])
            break
        if _is_signature(lines, number, cut) or _is_mobile_footer(line):
            break
        # Every '>' line goes, with a recognised header above it or not: Outlook's prefixed
        # quoting ("> -----Original Message-----") and attributions in other languages have
        # none, and an agent's answer must never carry the quoted notice to the customer.
        if number in dropped or _QUOTED_RE.match(line):
            continue
        body.append(line.rstrip())

    if cut < len(lines):
        # The rule a client draws above its quote header (Outlook on the web's <hr>, which
        # the HTML-to-text step writes as "----") belongs to the quote, not the answer.
        while body and (not body[-1].strip() or _RULE_LINE_RE.fullmatch(body[-1].strip())):
            body.pop()
    kept = "\n".join(lines[:head] + body).strip("\n")
    # Collapse the blank runs left where quoted blocks were removed.
    kept = re.sub(r"\n{3,}", "\n\n", kept).rstrip()
    if not kept.strip():
        return text.strip() if whole_if_empty else ""
    return kept
