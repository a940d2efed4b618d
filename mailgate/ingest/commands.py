"""#commands at the top of an agent's new text. Pure: parsing and validation only.

Commands are read only from the lines at the very top of the visible (quote-
stripped) text, so a quoted notice or an out-of-office echo that contains
`#status closed` is never a command (threats.md 17).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# name -> whether it takes an argument
KNOWN: dict[str, bool] = {
    "status": True, "priority": True, "category": True, "assign": True, "assist": True,
    "tier": True, "note": False, "spam": False, "merge": True, "canned": True,
    "requester": True, "cc": True, "uncc": True,
}
_LINE = re.compile(r"^#([A-Za-z][A-Za-z_-]*)(?:[ \t]+(.*))?$")
_EMAIL = re.compile(r"^[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+$")


@dataclass(frozen=True)
class Command:
    name: str
    arg: str
    line: str


@dataclass(frozen=True)
class ParsedCommands:
    commands: tuple[Command, ...]
    body: str  # the text below the commands
    errors: tuple[str, ...]

    def has(self, name: str) -> bool:
        return any(c.name == name for c in self.commands)

    def get(self, name: str) -> Command | None:
        return next((c for c in self.commands if c.name == name), None)


def parse_commands(text: str) -> ParsedCommands:
    lines = text.replace("\r\n", "\n").split("\n")
    i = 0
    while i < len(lines) and not lines[i].strip():
        i += 1
    commands: list[Command] = []
    errors: list[str] = []
    while i < len(lines):
        line = lines[i].strip()
        m = _LINE.match(line)
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
    names = [c.name for c in commands if c.name not in ("cc", "uncc", "assist")]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        errors.append(f"#{dup}: given more than once")
    return ParsedCommands(tuple(commands), "\n".join(lines[i:]).strip("\n"), tuple(errors))


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


def validate(parsed: ParsedCommands, rules: CommandRules, *, has_ticket: bool) -> list[str]:
    """Every reason the command set must be refused; empty means apply all of it."""
    errors = list(parsed.errors)
    for c in parsed.commands:
        arg = c.arg
        if c.name == "status" and arg not in rules.statuses:
            errors.append(f"{c.line}: unknown status; one of {', '.join(rules.statuses)}")
        elif c.name == "priority" and arg.lower() not in rules.priorities:
            errors.append(f"{c.line}: unknown priority; one of {', '.join(rules.priorities)}")
        elif c.name == "category" and rules.categories and arg not in rules.categories:
            errors.append(f"{c.line}: unknown category; one of {', '.join(rules.categories)}")
        elif c.name == "tier":
            if not rules.author_is_admin:
                errors.append(f"{c.line}: only an admin may change the tier")
            elif arg not in rules.tiers:
                errors.append(f"{c.line}: unknown tier; one of {', '.join(rules.tiers)}")
        elif c.name == "assign":
            target = rules.author if arg.lower() == "me" else arg.lower()
            if target not in rules.agents:
                errors.append(f"{c.line}: {arg} is not an agent")
            elif not rules.author_is_admin and rules.owner not in (None, rules.author):
                errors.append(f"{c.line}: the ticket belongs to {rules.owner}; "
                              "only its owner or an admin may reassign it")
            elif not rules.author_is_admin and target != rules.author and rules.owner is None:
                errors.append(f"{c.line}: only an admin may assign a ticket to another agent")
        elif c.name == "assist":
            if arg.lower() not in rules.agents:
                errors.append(f"{c.line}: {arg} is not an agent")
            elif not rules.author_is_admin and rules.owner not in (None, rules.author):
                errors.append(f"{c.line}: only the owner or an admin may add assistants")
        elif c.name in ("cc", "uncc", "requester") and not _EMAIL.match(arg):
            errors.append(f"{c.line}: not an email address")
        elif c.name == "merge" and not arg.lstrip("#").isdigit():
            errors.append(f"{c.line}: #merge takes a ticket number")
        elif c.name == "canned" and arg not in rules.canned:
            known = ", ".join(rules.canned) or "none are installed"
            errors.append(f"{c.line}: no canned answer {arg!r}; known: {known}")
    if not has_ticket and not parsed.has("requester"):
        ticket_only = [c.line for c in parsed.commands if c.name not in ("note", "canned", "cc")]
        if ticket_only:
            errors.append(f"{ticket_only[0]}: this message names no ticket (reply to a notice, "
                          "or use #requester EMAIL to open one)")
    if parsed.has("requester") and has_ticket:
        errors.append(f"{parsed.get('requester').line}: #requester opens a new ticket; "  # type: ignore[union-attr]
                      "send it to the support address, not as a reply")
    if parsed.has("note") and parsed.has("canned"):
        errors.append("#canned: a canned answer goes to the requester and cannot be part of a #note")
    return errors
