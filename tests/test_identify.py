"""Agent identity: reply tokens and trusted Authentication-Results (threats.md 11-13)."""

from __future__ import annotations

from mailgate.ingest.identify import auth_results_pass, dmarc_failed, identify_agent

AGENTS = ["alice@example.com"]
TRUSTED = ["mx.example.com"]


def ident(sender: str = "alice@example.com", token: bool = False, headers: list[str] | None = None,
          trusted: list[str] = TRUSTED):
    return identify_agent(sender=sender, agent_emails=AGENTS, token_valid_for_sender=token,
                          auth_results=headers or [], trusted_ids=trusted)


def test_not_an_agent() -> None:
    assert ident("carol@customer.org", token=True) is None


def test_token_proves_the_agent() -> None:
    i = ident(token=True)
    assert i is not None and i.verified and "token" in i.how


def test_bare_from_is_not_proof() -> None:
    i = ident()
    assert i is not None and not i.verified


def test_trusted_dkim_pass_aligned() -> None:
    i = ident(headers=["mx.example.com; dkim=pass header.d=example.com header.s=sel"])
    assert i is not None and i.verified and "dkim=pass" in i.how


def test_trusted_spf_pass_aligned() -> None:
    assert ident(headers=["mx.example.com; spf=pass smtp.mailfrom=alice@example.com"]).verified  # type: ignore[union-attr]


def test_authserv_id_not_trusted() -> None:
    assert not ident(headers=["evil.example; dkim=pass header.d=example.com"]).verified  # type: ignore[union-attr]
    assert not ident(headers=["mx.example.com; dkim=pass header.d=example.com"], trusted=[]).verified  # type: ignore[union-attr]


def test_fail_or_unaligned_domain() -> None:
    for header in ("mx.example.com; dkim=fail header.d=example.com",
                   "mx.example.com; dkim=pass header.d=evil.example",
                   "mx.example.com; dkim=pass header.d=mail.example.com",  # a child domain: maybe delegated
                   "mx.example.com; spf=pass smtp.mailfrom=x@evil.example",
                   "mx.example.com; spf=pass smtp.helo=example.com",  # HELO says nothing about From
                   "mx.example.com; dkim=pass header.d=com"):
        assert not ident(headers=[header]).verified, header  # type: ignore[union-attr]


def test_parent_domain_aligns() -> None:
    assert auth_results_pass(["mx.example.com; dkim=pass header.d=example.com"], TRUSTED, "eu.example.com")


def test_only_the_topmost_trusted_header_counts() -> None:
    # Our MTA stamps its verdict on top; a lower header with our id was forged upstream.
    forged_below = ["mx.example.com; dkim=fail header.d=example.com",
                    "mx.example.com; dkim=pass header.d=example.com"]
    assert not ident(headers=forged_below).verified  # type: ignore[union-attr]
    untrusted_on_top = ["other.example; dkim=fail", "mx.example.com; dkim=pass header.d=example.com"]
    assert ident(headers=untrusted_on_top).verified  # type: ignore[union-attr]


def test_broken_header_is_no_evidence() -> None:
    assert not ident(headers=["mx.example.com; dkim=pass (unterminated comment"]).verified  # type: ignore[union-attr]
    assert auth_results_pass(["\x00garbage"], TRUSTED, "example.com") is None


def test_dmarc_fail_from_our_mta_names_a_forged_from() -> None:
    failed = dmarc_failed(["mx.example.com; dmarc=fail (p=reject) header.from=Customer.org"], TRUSTED, "customer.org")
    assert failed == "Authentication-Results mx.example.com: dmarc=fail header.from=customer.org"
    for headers, trusted in [
        (["mx.example.com; dmarc=pass header.from=customer.org"], TRUSTED),
        (["mx.example.com; dmarc=none header.from=customer.org"], TRUSTED),  # no policy: no verdict
        (["mx.example.com; dmarc=fail header.from=other.example"], TRUSTED),  # another domain's verdict
        (["evil.example; dmarc=fail header.from=customer.org"], TRUSTED),  # not our MTA
        (["mx.example.com; dmarc=fail header.from=customer.org"], []),  # nothing trusted
        (["mx.example.com; dkim=pass header.d=customer.org",  # our MTA's verdict on top; a
          "mx.example.com; dmarc=fail header.from=customer.org"], TRUSTED),  # lower one is forged
        ([], TRUSTED),
    ]:
        assert dmarc_failed(headers, trusted, "customer.org") is None, headers


def test_our_header_that_does_not_parse_ends_the_search() -> None:
    # The sender controls what makes our MTA's stamp unparsable (a HELO literal, a null
    # MAIL FROM); a header below it with our id was written by the sender.
    forged_below = "mx.example.com; dkim=pass header.d=example.com"
    for ours in ("mx.example.com; spf=softfail smtp.mailfrom=alice@example.com smtp.helo=[203.0.113.5]",
                 "mx.example.com; spf=none smtp.mailfrom=<>",
                 "(our (nested) comment) MX.example.com 1; dkim=pass (unterminated"):
        assert not ident(headers=[ours, forged_below]).verified, ours  # type: ignore[union-attr]
    # An unparsable header from someone else is skipped, as before.
    assert ident(headers=["other.example; spf=pass smtp.helo=[203.0.113.5]", forged_below]).verified  # type: ignore[union-attr]
