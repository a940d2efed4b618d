"""Which ticket a message belongs to. Pure: the pipeline gathers the facts.

Evidence, strongest first:
1. a reply token in a recipient address, valid for this sender (proves the
   sender was mailed about the ticket);
2. In-Reply-To/References naming a Message-ID that we made (it carries an
   HMAC, so it cannot be forged), or one we stored, if the sender is a member
   of that ticket;
3. the subject tag, if the sender is a member of the ticket or a verified agent.
A tag, token or reference that names a ticket the sender may not write to
makes a new ticket and is recorded as a hijack attempt (threats.md 9-11),
except in old mail imported as history, where the staff's own answers (an
agent's address or ours, without proof) are kept on the ticket they answered
as answers already sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RouteFacts:
    sender: str
    sender_is_verified_agent: bool
    token_ticket: int | None  # from a plus address whose token is valid for the sender
    bad_token_ticket: int | None  # a plus address whose token did not verify
    our_reference_tickets: tuple[int, ...]  # from Message-IDs with our valid HMAC, newest first
    stored_reference_tickets: tuple[int, ...]  # from Message-IDs of messages we stored
    tag_ticket: int | None
    members: Mapping[int, frozenset[str]] = field(default_factory=dict)  # ticket -> addresses
    existing: frozenset[int] = frozenset()  # the candidate tickets that exist
    # Imported history from an agent's address or ours, with no proof of identity: the
    # candidate tickets it may answer on record (opened by the same kind of import, no
    # later than the answer's date). An old mailbox holds the answers the staff sent
    # straight to the customer back then.
    answerable_in_history: frozenset[int] = frozenset()
    # Automatic mail (a bounce, an out-of-office) opens no ticket; a delivery report goes
    # with the mail it reports on, if that is ours (apply.record_bounce).
    automatic: bool = False


@dataclass(frozen=True)
class RouteDecision:
    ticket: int | None
    reason: str
    hijack_of: int | None = None  # the ticket a refused message tried to write into
    answer_on_record: bool = False  # history: the staff's answer, stored as sent back then
    # Matched by something only the sender's mailbox holds (a reply token valid for the
    # sender, one of our Message-IDs sent to them), not by what anyone can write.
    proven: bool = False


def _member(facts: RouteFacts, ticket: int) -> bool:
    return facts.sender_is_verified_agent or facts.sender in facts.members.get(ticket, frozenset())


def decide_route(facts: RouteFacts) -> RouteDecision:
    if facts.token_ticket is not None and facts.token_ticket in facts.existing:
        return RouteDecision(facts.token_ticket, f"reply token for #{facts.token_ticket}", proven=True)
    for t in facts.our_reference_tickets:
        if t in facts.existing:
            return RouteDecision(t, f"References names our Message-ID for #{t}", proven=True)
    refused: list[int] = []
    for t in facts.stored_reference_tickets:
        if t in facts.existing:
            if _member(facts, t):
                return RouteDecision(t, f"References names a stored message of #{t}")
            refused.append(t)
    tag = facts.tag_ticket
    if tag is not None and tag in facts.existing:
        if _member(facts, tag):
            return RouteDecision(tag, f"subject tag #{tag}, sender is a participant")
        refused.append(tag)
    if facts.bad_token_ticket is not None and facts.bad_token_ticket in facts.existing:
        refused.append(facts.bad_token_ticket)
    answered = next((t for t in refused if t in facts.answerable_in_history), None)
    if answered is not None:
        return RouteDecision(answered, f"imported history: {facts.sender} answered #{answered} "
                                       "(no proof of identity: kept as an answer sent then, no commands)",
                             answer_on_record=True)
    then = "automatic mail opens none" if facts.automatic else "new ticket"
    if refused:
        return RouteDecision(None, f"names #{refused[0]} but sender {facts.sender} is not a participant "
                                   f"and has no valid token: {then}", hijack_of=refused[0])
    return RouteDecision(None, f"no ticket matched: {then}")
