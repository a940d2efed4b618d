"""#commands at the top of an agent's new text. Pure: parsing and validation only.

Commands are read only from the lines at the very top of the visible (quote-
stripped) text, so a quoted notice or an out-of-office echo that contains
`#status closed` is never a command (threats.md 17). The one exception is
`#canned NAME` on a line of its own further down: it marks where a canned
answer goes, and is validated with the rest.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from mailgate.domain import MAX_ID, base_address

# name -> whether it takes an argument
KNOWN: dict[str, bool] = {
    "status": True, "priority": True, "category": True, "assign": True, "assist": True,
    "tier": True, "note": False, "spam": False, "merge": True, "canned": True,
    "requester": True, "cc": True, "uncc": True, "release": True,
}
# Commands that may sensibly appear more than once in one message.
REPEATABLE = frozenset({"cc", "uncc", "assist", "canned", "release"})
_RELEASE_IDS = re.compile(r"#?([0-9]{1,12})")
# "#note: ...", "#status: solved", "#note, ..." and "# note" are commands too: read as
# prose, a misspelt #note line went to the customer with the note under it.
_LINE = re.compile(r"^#[ \t]*([A-Za-z][A-Za-z_-]*)(?:[ \t]*[:=,][ \t]*|[ \t]+|$)(.*)$")
_INLINE_CANNED = re.compile(r"^[ \t]*#canned[ \t]+(\S+)[ \t]*$", re.IGNORECASE)
# Dot-separated labels: with "." also inside the classes, a domain of many dots and no end
# took re seconds to give up on (100,000 dots: 23 s).
_EMAIL = re.compile(r"^[^@\s<>,;]+@[^@\s<>,;.]+(?:\.[^@\s<>,;.]+)+$")
# HTML-to-text conversion leaves no-break and zero-width spaces where the agent typed spaces.
_ODD_SPACE = str.maketrans({"\u00a0": " ", "\u2007": " ", "\u202f": " ", "\u200b": "", "\ufeff": ""})


@dataclass(frozen=True)
class Command:
    name: str
    arg: str
    line: str
    inline: bool = False  # a #canned line inside the body: replaced in place


@dataclass(frozen=True)
class ParsedCommands:
    commands: tuple[Command, ...]
    body: str  # the text below the commands (inline #canned lines still in it)
    errors: tuple[str, ...]

    def has(self, name: str) -> bool:
        return any(c.name == name for c in self.commands)

    def get(self, name: str) -> Command | None:
        return next((c for c in self.commands if c.name == name), None)

    @property
    def first(self) -> Command | None:
        return self.commands[0] if self.commands else None

    def ids_to_release(self) -> list[int]:
        """The ids of every #release line, once each (a line that is not ids adds none)."""
        return list(dict.fromkeys(i for c in self.commands if c.name == "release" for i in release_ids(c.arg) or ()))


def _command_line(line: str) -> re.Match[str] | None:
    return _LINE.match(line.strip())


def parse_commands(text: str) -> ParsedCommands:
    lines = text.replace("\r\n", "\n").translate(_ODD_SPACE).split("\n")
    i = 0
    while i < len(lines) and not lines[i].strip():
        i += 1
    commands: list[Command] = []
    errors: list[str] = []
    while i < len(lines):
        line = lines[i].strip()
        if not line:
            # HTML mail puts every <div>/<p> on its own paragraph: a blank line between two
            # command lines does not end the block, a blank line before prose does.
            j = i
            while j < len(lines) and not lines[j].strip():
                j += 1
            if commands and j < len(lines) and _command_line(lines[j]):
                i = j
                continue
            break
        m = _command_line(line)
        if not m:
            break
        name, arg = m.group(1).lower(), (m.group(2) or "").strip()
        if name not in KNOWN:
            errors.append(f"{line}: unknown command #{name}")
        elif KNOWN[name] and not arg:
            errors.append(f"{line}: #{name} needs a value")
        elif not KNOWN[name] and arg:
            # '#note some text' is common: the rest of the line is the note's first line
            commands.append(Command(name, "", line))
            lines[i] = arg
            break
        else:
            commands.append(Command(name, arg, line))
        i += 1
    body = "\n".join(lines[i:]).strip("\n")
    for line in body.split("\n"):
        m = _INLINE_CANNED.match(line)
        if m:
            commands.append(Command("canned", m.group(1), line.strip(), inline=True))
    names = [c.name for c in commands if c.name not in REPEATABLE]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        errors.append(f"#{dup}: given more than once")
    return ParsedCommands(tuple(commands), body, tuple(errors))


_TICKET_NUMBER = re.compile(r"#?([0-9]{1,12})")


def merge_target(arg: str) -> int | None:
    """'123' or '#123' -> 123; None for anything else (str.isdigit also takes '²', which
    int() refuses) or a number no ticket can have."""
    m = _TICKET_NUMBER.fullmatch(arg.strip())
    return int(m.group(1)) if m and 0 < int(m.group(1)) <= MAX_ID else None


def release_ids(arg: str) -> list[int] | None:
    """'17 18', '#17, #18' -> [17, 18]; None if anything else is in the way."""
    words = [w for w in re.split(r"[\s,;]+", arg) if w]
    matches = [_RELEASE_IDS.fullmatch(w) for w in words]
    if not words or not all(matches) or any(int(m.group(1)) > MAX_ID for m in matches if m):
        return None
    return list(dict.fromkeys(int(m.group(1)) for m in matches if m))


def find_choice(value: str, choices: Sequence[str]) -> str | None:
    """The configured spelling of `value`, matched without regard to case."""
    folded = value.casefold()
    return next((c for c in choices if c.casefold() == folded), None)


@dataclass(frozen=True)
class CommandRules:
    """What the validation needs to know, as plain data."""

    statuses: Sequence[str]
    priorities: Sequence[str]
    categories: Sequence[str]  # empty: any category is allowed
    tiers: Sequence[str]
    agents: Sequence[str]
    canned: Sequence[str]
    author: str
    author_is_admin: bool
    owner: str | None  # the ticket's current owner, None without a ticket
    ticket: int | None = None  # the ticket the message is about
    merge_targets: Collection[int] = field(default_factory=frozenset)  # tickets that exist, unmerged
    own_addresses: Collection[str] = field(default_factory=frozenset)  # the help desk's addresses
    ccs: Collection[str] = field(default_factory=frozenset)  # the ticket's CC participants
    quarantined: Collection[int] = field(default_factory=frozenset)  # #release ids still held


def validate(parsed: ParsedCommands, rules: CommandRules, *, has_ticket: bool) -> list[str]:
    """Every reason the command set must be refused; empty means apply all of it."""
    errors = list(parsed.errors)
    agents = {a.lower() for a in rules.agents}
    own = {a.lower() for a in rules.own_addresses}
    if parsed.has("merge"):
        # After #merge the other commands apply to the target, but who may #assign or
        # #assist was checked against this ticket's owner.
        for c in parsed.commands:
            if c.name in ("assign", "assist"):
                errors.append(f"{c.line}: #{c.name} cannot come with #merge; send it in a reply after the merge")
    # "#assign me" in the same mail: the author owns the ticket when #assist applies.
    takes_it = any(c.name == "assign" and c.arg.lower() in ("me", rules.author) for c in parsed.commands)
    for c in parsed.commands:
        arg = c.arg
        if c.name == "status" and find_choice(arg, rules.statuses) is None:
            errors.append(f"{c.line}: unknown status; one of {', '.join(rules.statuses)}")
        elif c.name == "priority" and find_choice(arg, rules.priorities) is None:
            errors.append(f"{c.line}: unknown priority; one of {', '.join(rules.priorities)}")
        elif c.name == "category" and rules.categories and find_choice(arg, rules.categories) is None:
            errors.append(f"{c.line}: unknown category; one of {', '.join(rules.categories)}")
        elif c.name == "tier":
            if not rules.author_is_admin:
                errors.append(f"{c.line}: only an admin may change the tier")
            elif find_choice(arg, rules.tiers) is None:
                errors.append(f"{c.line}: unknown tier; one of {', '.join(rules.tiers)}")
        elif c.name == "assign":
            target = rules.author if arg.lower() == "me" else arg.lower()
            if target not in agents:
                errors.append(f"{c.line}: {arg} is not an agent")
            elif not rules.author_is_admin and rules.owner not in (None, rules.author):
                errors.append(f"{c.line}: the ticket belongs to {rules.owner}; "
                              "only its owner or an admin may reassign it")
            elif not rules.author_is_admin and target != rules.author and rules.owner is None:
                errors.append(f"{c.line}: only an admin may assign a ticket to another agent")
        elif c.name == "assist":
            target = arg.lower()
            if target not in agents:
                errors.append(f"{c.line}: {arg} is not an agent")
            elif not rules.author_is_admin and rules.owner not in (None, rules.author):
                errors.append(f"{c.line}: only the owner or an admin may add assistants")
            elif (not rules.author_is_admin and rules.owner is None and target != rules.author
                  and not takes_it):
                # With an assistant the group hears no more of the ticket: as #assign, only an
                # admin hands an unowned ticket to someone else.
                errors.append(f"{c.line}: only an admin may add another agent to a ticket nobody owns")
        elif c.name in ("cc", "uncc", "requester"):
            if not _EMAIL.match(arg):
                errors.append(f"{c.line}: not an email address")
            elif base_address(arg) in own:
                # mail to ourselves would come straight back in: a loop
                errors.append(f"{c.line}: {arg} is one of the help desk's own addresses")
            elif c.name == "uncc" and arg.lower() not in {x.lower() for x in rules.ccs}:
                errors.append(f"{c.line}: {arg} is not a CC participant of this ticket")
            elif c.name != "uncc" and arg.lower() in agents:
                errors.append(f"{c.line}: {arg} is an agent; "
                              + ("use #assist to add an agent" if c.name == "cc"
                                 else "a ticket on behalf of a customer needs the customer's address"))
        elif c.name == "merge":
            target = merge_target(arg)
            if target is None:
                errors.append(f"{c.line}: #merge takes a ticket number")
            elif rules.ticket is not None and target == rules.ticket:
                errors.append(f"{c.line}: a ticket cannot be merged into itself")
            elif target not in rules.merge_targets:
                errors.append(f"{c.line}: there is no open ticket #{target} to merge into "
                              "(it does not exist, or it is solved, closed, merged or spam)")
        elif c.name == "release":
            ids = release_ids(arg)
            if ids is None:
                errors.append(f"{c.line}: #release takes the ids of held messages, as the quarantine list shows them")
            elif not rules.author_is_admin:
                errors.append(f"{c.line}: only an admin may release held mail")
            else:
                missing = [str(i) for i in ids if i not in rules.quarantined]
                if missing:
                    errors.append(f"{c.line}: not in the quarantine: {', '.join(missing)}")
        elif c.name == "canned" and arg not in rules.canned:
            known = ", ".join(rules.canned) or "none are installed"
            errors.append(f"{c.line}: no canned answer {arg!r}; known: {known}")
    if parsed.has("release"):
        # Held mail is not a ticket: a reply to the quarantine digest carries only #release.
        other = [c.line for c in parsed.commands if c.name != "release"]
        if has_ticket:
            errors.append(f"{parsed.get('release').line}: #release is a reply to the quarantine list, "  # type: ignore[union-attr]
                          "not to a ticket's notice")
        elif other:
            errors.append(f"{other[0]}: cannot be combined with #release")
    elif not has_ticket and not parsed.has("requester"):
        ticket_only = [c.line for c in parsed.commands if c.name not in ("note", "canned", "cc")]
        if ticket_only:
            errors.append(f"{ticket_only[0]}: this message names no ticket (reply to a notice, "
                          "or use #requester EMAIL to open one)")
    if parsed.has("requester") and has_ticket:
        errors.append(f"{parsed.get('requester').line}: #requester opens a new ticket; "  # type: ignore[union-attr]
                      "send it to the support address, not as a reply")
    if parsed.has("note") and parsed.has("canned"):
        errors.append("#canned: a canned answer goes to the requester and cannot be part of a #note")
    if parsed.has("spam"):
        clash = [c.line for c in parsed.commands if c.name in ("status", "merge", "canned", "requester")]
        if clash:
            errors.append(f"{clash[0]}: #spam closes the ticket and cannot be combined with it")
    return errors
