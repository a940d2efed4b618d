"""Is the sender one of our agents, provably? Pure over plain data.

A From header is trivially forged (threats.md 11-13), so an agent address
counts as the agent only with a reply token valid for that agent, or with an
Authentication-Results header stamped by one of *our* configured authserv-ids
showing DKIM pass for the From domain or SPF pass for an aligned envelope
domain. Reply-To never identifies anyone.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import authres

from mailgate.domain import base_address

# "'Carol Smith' via Support": how Google Groups and Mailman name a sender whose From
# they rewrote to the list's own address.
_VIA_NAME_RE = re.compile(r"^\s*['\"]?(?P<name>.*?)['\"]?\s+via\s+\S.*$", re.IGNORECASE | re.DOTALL)


def sender_behind_own_list(from_addr: str, from_name: str, original_from: tuple[str, str] | None,
                           reply_to: Sequence[str], own_addresses: Collection[str], *,
                           original_from_present: bool | None = None) -> tuple[str, str] | None:
    """(name, address) of the person whose mail our own group or list (support@ as a Google
    Group in front of the mailbox we read) sent on From our address, as it does for a
    DMARC-strict sender; None for any other mail.

    The person is X-Original-From, or the one Reply-To address of a From named "X via Y".
    Trusting them is no more than trusting a From: whoever could forge these could forge
    the From itself. Never one of our own addresses: that is our mail come back. An
    X-Original-From that is there but names no single mailbox (original_from None,
    original_from_present True) names nobody: Reply-To is the poster's to choose.
    """
    if base_address(from_addr) not in own_addresses:
        return None
    if original_from is None and original_from_present:
        return None
    via = _VIA_NAME_RE.match(from_name)
    if original_from is not None:
        name, address = original_from
    elif via is not None and len(reply_to) == 1:
        name, address = "", reply_to[0]
    else:
        return None
    if not address or base_address(address) in own_addresses:
        return None
    return (name or (via.group("name").strip() if via is not None else "")), address


def rewritten_by_own_list(from_addr: str, from_name: str, *, original_from_present: bool,
                          own_addresses: Collection[str]) -> bool:
    """Whether mail From our address bears the marks of our own group passing someone's
    mail on (X-Original-From, or a From named "X via Y"), whether or not that someone
    can be named (sender_behind_own_list). Our own answers are From "Agent via Desk" too,
    and are taken for such mail: a Message-ID of ours proves nothing of who sent a copy
    (a customer has the ones of the mail we sent them)."""
    return base_address(from_addr) in own_addresses and (
        original_from_present or _VIA_NAME_RE.match(from_name) is not None)


@dataclass(frozen=True)
class Identity:
    verified: bool
    how: str


def _aligned(domain: str, from_domain: str) -> bool:
    """The authenticated domain is the From domain or a parent of it.

    Not a child of it: a subdomain may be delegated to a third party (a mailing
    service, a tenant), and a pass for that party must not speak for our agents.
    """
    domain, from_domain = domain.lower().rstrip("."), from_domain.lower().rstrip(".")
    return bool(domain) and "." in domain and (domain == from_domain or from_domain.endswith("." + domain))


def auth_results_pass(headers: Sequence[str], trusted_ids: Sequence[str], from_domain: str) -> str | None:
    """The trusted DKIM/SPF pass aligned with from_domain, described; None if none.

    `headers` in message order, topmost first. Only the topmost header stamped
    by a trusted authserv-id counts: that is the one our own MTA added last. A
    lower one with the same id was there before our MTA saw the message, so it
    is a forgery our MTA failed to remove (RFC 8601 section 5), never evidence.
    """
    parsed = _topmost_trusted(headers, trusted_ids)
    return _first_pass(parsed, from_domain) if parsed is not None and from_domain else None


def dmarc_failed(headers: Sequence[str], trusted_ids: Sequence[str], from_domain: str) -> str | None:
    """The trusted DMARC fail for from_domain, described; None if none (no verdict is no fail).

    Our MTA saying that the From domain's owner disowns this mail: the From is forged."""
    return _dmarc(headers, trusted_ids, from_domain, "fail")


def from_authenticated(headers: Sequence[str], trusted_ids: Sequence[str], from_domain: str) -> str | None:
    """Our MTA's word that the From domain sent this: an aligned DKIM/SPF pass or a DMARC pass."""
    return auth_results_pass(headers, trusted_ids, from_domain) or _dmarc(headers, trusted_ids, from_domain, "pass")


def _dmarc(headers: Sequence[str], trusted_ids: Sequence[str], from_domain: str, wanted: str) -> str | None:
    parsed = _topmost_trusted(headers, trusted_ids)
    if parsed is None or not from_domain:
        return None
    for result in parsed.results:
        if str(result.method).lower() != "dmarc" or str(result.result).lower() != wanted:
            continue
        props = _properties(result)
        header_from = props.get("header.from", from_domain).lower().rstrip(".")
        if header_from == from_domain.lower().rstrip("."):
            return f"Authentication-Results {parsed.authserv_id}: dmarc={wanted} header.from={header_from}"
    return None


def _properties(result: authres.AuthenticationResult) -> dict[str, str]:
    """A result's properties as {"header.d": "example.com", "smtp.mailfrom": ...}."""
    return {f"{p.type}.{p.name}".lower(): str(p.value) for p in result.properties}


def _topmost_trusted(headers: Sequence[str], trusted_ids: Sequence[str]) -> authres.AuthenticationResultsHeader | None:
    """The topmost Authentication-Results stamped by a trusted authserv-id, parsed (see
    auth_results_pass for why only that one)."""
    trusted = {t.lower() for t in trusted_ids}
    if not trusted:
        return None
    for value in headers:
        try:
            parsed = authres.AuthenticationResultsHeader.parse(f"Authentication-Results: {value}")
        except Exception:
            # Not evidence. If our own server wrote it (the sender can make it unparsable:
            # smtp.helo=[203.0.113.5], smtp.mailfrom=<>), the search stops here: a header
            # below ours with our authserv-id was written by the sender.
            if _authserv_id(value) in trusted:
                return None
            continue
        if (parsed.authserv_id or "").lower() in trusted:
            return parsed
    return None


def _authserv_id(value: str) -> str:
    """The authserv-id an Authentication-Results value starts with, lowercased, read without
    a full parse: comments dropped, then the first word before ';'."""
    previous = None
    while previous != value:  # nested comments, innermost first
        previous, value = value, re.sub(r"\([^()]*\)", " ", value)
    words = value.split(";", 1)[0].split()
    return words[0].lower() if words else ""


def spf_pass(headers: Sequence[str], trusted_ids: Sequence[str], domain: str) -> str | None:
    """As auth_results_pass, but only an SPF pass counts: it says which server handed the
    mail to ours. A DKIM signature of our domain can be replayed by anyone who got mail
    from us, with headers the signature does not cover added."""
    parsed = _topmost_trusted(headers, trusted_ids)
    return _first_pass(parsed, domain, ("spf",)) if parsed is not None and domain else None


def _first_pass(parsed: authres.AuthenticationResultsHeader, from_domain: str,
                methods: tuple[str, ...] = ("dkim", "spf")) -> str | None:
    for result in parsed.results:
        if str(result.result).lower() != "pass":
            continue
        method = str(result.method).lower()
        if method not in methods:
            continue
        props = _properties(result)
        if method == "dkim":
            d = props.get("header.d") or props.get("header.i", "").rpartition("@")[2]
            if d and _aligned(d, from_domain):
                return f"Authentication-Results {parsed.authserv_id}: dkim=pass header.d={d}"
        elif method == "spf":
            # The envelope sender only, as DMARC does: a HELO name says nothing about From.
            mf = props.get("smtp.mailfrom", "")
            d = mf.rpartition("@")[2]
            if d and _aligned(d, from_domain):
                return f"Authentication-Results {parsed.authserv_id}: spf=pass smtp.mailfrom={mf}"
    return None


def identify_agent(*, sender: str, agent_emails: Sequence[str], token_valid_for_sender: bool,
                   auth_results: Sequence[str], trusted_ids: Sequence[str]) -> Identity | None:
    """None if the sender is not an agent address at all; else whether it is proven."""
    if sender not in agent_emails:
        return None
    if token_valid_for_sender:
        return Identity(True, "reply token valid for this agent")
    passed = auth_results_pass(auth_results, trusted_ids, sender.rpartition("@")[2])
    if passed:
        return Identity(True, passed)
    return Identity(False, "agent address without a valid token or trusted DKIM/SPF pass")
