"""Which ticket a message belongs to: decide_route over plain facts."""

from __future__ import annotations

from mailgate.ingest.route import RouteFacts, decide_route


def facts(**kw) -> RouteFacts:
    base = dict(sender="carol@customer.org", sender_is_verified_agent=False, token_ticket=None,
                bad_token_ticket=None, our_reference_tickets=(), stored_reference_tickets=(), tag_ticket=None,
                members={1: frozenset({"carol@customer.org"}), 2: frozenset({"grace@customer.org"})},
                existing=frozenset({1, 2}))
    return RouteFacts(**{**base, **kw})


def test_nothing_matches() -> None:
    d = decide_route(facts())
    assert d.ticket is None and d.hijack_of is None
    assert d.reason == "no ticket matched: new ticket"
    # A bounce or an out-of-office opens none: the record must not say it did.
    assert decide_route(facts(automatic=True)).reason == "no ticket matched: automatic mail opens none"
    hijack = decide_route(facts(tag_ticket=2, automatic=True))
    assert hijack.hijack_of == 2 and hijack.reason.endswith(": automatic mail opens none")


def test_valid_token_wins_over_everything() -> None:
    d = decide_route(facts(token_ticket=2, tag_ticket=1, our_reference_tickets=(1,)))
    assert d.ticket == 2 and "token" in d.reason


def test_token_for_a_missing_ticket_falls_through() -> None:
    assert decide_route(facts(token_ticket=9, tag_ticket=1)).ticket == 1


def test_our_message_id_needs_no_membership() -> None:
    assert decide_route(facts(sender="new@x.org", our_reference_tickets=(2,))).ticket == 2


def test_stored_reference_and_tag_need_membership() -> None:
    assert decide_route(facts(stored_reference_tickets=(1,))).ticket == 1
    assert decide_route(facts(tag_ticket=1)).ticket == 1
    d = decide_route(facts(tag_ticket=2))
    assert d.ticket is None and d.hijack_of == 2
    d = decide_route(facts(stored_reference_tickets=(2,)))
    assert d.ticket is None and d.hijack_of == 2


def test_verified_agent_may_use_any_tag() -> None:
    assert decide_route(facts(sender="alice@example.com", sender_is_verified_agent=True, tag_ticket=2)).ticket == 2


def test_bad_token_is_a_hijack_attempt() -> None:
    d = decide_route(facts(sender="mallory@evil.example", bad_token_ticket=1))
    assert d.ticket is None and d.hijack_of == 1


def test_tag_of_a_ticket_that_does_not_exist() -> None:
    d = decide_route(facts(tag_ticket=99))
    assert d.ticket is None and d.hijack_of is None


def test_the_staffs_old_answer_joins_the_ticket_it_answered() -> None:
    d = decide_route(facts(sender="alice@example.com", stored_reference_tickets=(2,),
                           answerable_in_history=frozenset({2})))
    assert (d.ticket, d.answer_on_record, d.hijack_of) == (2, True, None)
    live = decide_route(facts(sender="alice@example.com", stored_reference_tickets=(2,)))
    assert (live.ticket, live.answer_on_record, live.hijack_of) == (None, False, 2)


def test_the_staffs_old_answer_joins_only_a_ticket_it_may_answer() -> None:
    d = decide_route(facts(sender="alice@example.com", stored_reference_tickets=(1, 2), tag_ticket=2,
                           answerable_in_history=frozenset({2})))
    assert (d.ticket, d.answer_on_record) == (2, True)
    d = decide_route(facts(sender="alice@example.com", stored_reference_tickets=(1,),
                           answerable_in_history=frozenset({2})))
    assert (d.ticket, d.answer_on_record, d.hijack_of) == (None, False, 1)
    d = decide_route(facts(sender="alice@example.com", stored_reference_tickets=(9,),
                           answerable_in_history=frozenset({9})))  # no such ticket
    assert (d.ticket, d.answer_on_record) == (None, False)
