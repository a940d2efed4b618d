"""Templates: sandboxed, strict, site directory first, HTML autoescaped."""

from __future__ import annotations

import sqlite3
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import pytest
from jinja2.exceptions import SecurityError, UndefinedError

from mailgate.render import Renderer, packaged_dir
from tests.conftest import cli, mail, write_config

HOSTILE = '<script>alert("x")</script> & <b>bold</b>'


def context(subject: str = "Printer on fire", **extra: Any) -> dict[str, Any]:
    """The shape notify.send hands to a requester template."""
    return {
        "helpdesk": {"name": "Example Support", "address": "support@example.com", "subject_tag": "EXAMPLE",
                     "ratings": ["1", "2", "3", "4", "5"]},
        "ticket": {"number": 7, "subject": subject, "status": "new", "status_kind": "new", "priority": "normal",
                   "category": None, "queue": "support@example.com", "tier": "customer", "owner": None,
                   "requester": "carol@customer.org", "requester_name": "Carol", "first_response_due": None,
                   "resolution_due": None},
        "message": None,
        "tagged_subject": f"[EXAMPLE #7] {subject}",
        "hijack_notice": None,
        "recipient": "carol@customer.org",
        **extra,
    }


def site(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "site" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "site"


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''|attr('__class__') }}",
    "{{ '{0.__class__}'|attr('format')('x') }}",  # CVE-2025-27516: format reached through |attr
    "{{ '{0.__class__.__mro__}'.format(ticket) }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ ticket.__class__ }}",
    "{{ helpdesk.ratings.append('6') }}",  # immutable sandbox: no mutation of the context
    "{{ ticket.update(number=1) }}",
])
def test_sandbox_refuses_escapes(tmp_path: Path, source: str) -> None:
    r = Renderer(site(tmp_path, {"evil.txt.j2": source}))
    with pytest.raises(SecurityError):
        r.render_text("evil.txt.j2", context())


def test_strict_undefined_raises_on_a_typo(tmp_path: Path) -> None:
    r = Renderer(site(tmp_path, {"typo.txt.j2": "Ticket {{ tikcet.number }}",
                                 "typo2.txt.j2": "Ticket {{ ticket.numbr }}"}))
    with pytest.raises(UndefinedError, match="tikcet"):
        r.render_text("typo.txt.j2", context())
    with pytest.raises(UndefinedError, match="numbr"):
        r.render_text("typo2.txt.j2", context())


def test_every_packaged_requester_template_renders() -> None:
    r = Renderer()
    for name in ("requester/created", "requester/answer", "requester/status", "requester/status-solved"):
        rendered = r.render_mail(name, context(message={"from": "alice@example.com", "from_name": "Alice",
                                                        "text": "Answer text", "subject": "s", "created_at": None},
                                               old_status="new"))
        assert rendered.subject.startswith("[EXAMPLE #7]")
        assert rendered.text and rendered.html


def test_site_directory_overrides_packaged_template(tmp_path: Path) -> None:
    r = Renderer(site(tmp_path, {"requester/created.subject.j2": "Got it: {{ tagged_subject }}\n"}))
    rendered = r.render_mail("requester/created", context())
    assert rendered.subject == "Got it: [EXAMPLE #7] Printer on fire"
    # The other parts still come from the package.
    assert rendered.text == Renderer().render_mail("requester/created", context()).text
    assert (packaged_dir("templates") / "requester" / "created.txt.j2").is_file()
    assert rendered.html is not None  # both versions of the body are still the package's


def test_a_site_text_override_is_not_sent_beside_the_packaged_html(tmp_path: Path) -> None:
    """Most clients show the HTML version: the package's must not contradict the site's text."""
    r = Renderer(site(tmp_path, {"requester/created.txt.j2": "Ticket {{ ticket.number }} opened.\n"}))
    rendered = r.render_mail("requester/created", context())
    assert rendered.text == "Ticket 7 opened.\n" and rendered.html is None

    both = Renderer(site(tmp_path, {"requester/created.html.j2": "<p>Ticket {{ ticket.number }}</p>\n"}))
    assert both.render_mail("requester/created", context()).html == "<p>Ticket 7</p>\n"
    # A site's file may be a link to a shared one: it is the site's all the same.
    shared = tmp_path / "shared.html.j2"
    shared.write_text("<p>Shared {{ ticket.number }}</p>\n")
    (tmp_path / "site" / "requester" / "created.html.j2").unlink()
    (tmp_path / "site" / "requester" / "created.html.j2").symlink_to(shared)
    assert Renderer(tmp_path / "site").render_mail("requester/created", context()).html == "<p>Shared 7</p>\n"
    # An HTML override without its text beside it is not sent beside the packaged text.
    html_only = Renderer(site(tmp_path / "other", {"requester/created.html.j2": "<p>site</p>\n"}))
    assert html_only.render_mail("requester/created", context()).html is None


def test_subject_is_one_line_whatever_the_template_makes() -> None:
    rendered = Renderer().render_mail("requester/created", context(subject="Hi\r\nBcc: x@evil.example"))
    assert "\n" not in rendered.subject and "\r" not in rendered.subject


def test_html_autoescapes_subject_text_does_not() -> None:
    rendered = Renderer().render_mail("requester/created", context(subject=HOSTILE))
    assert rendered.html is not None
    assert "<script>" not in rendered.html and "<b>bold</b>" not in rendered.html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in rendered.html
    assert HOSTILE in rendered.text  # plain text is not HTML: escaping it would garble it


def test_daemon_uses_site_templates_and_escapes_html(workdir: Path) -> None:
    config = write_config(workdir, helpdesk_extra='templates_dir = "site"', agents="")
    site(workdir, {"requester/created.subject.j2": "Site says: {{ tagged_subject }}",
                   "requester/created.txt.j2": "Site text for #{{ ticket.number }}\n",
                   "requester/created.html.j2": "<p>Site HTML about {{ ticket.subject }}</p>\n"})
    out = cli(config, "ingest", input=mail(subject=HOSTILE).as_bytes())
    assert out.stdout.decode().strip() == "1"
    con = sqlite3.connect(workdir / "mailgate.db")
    try:
        rows = con.execute("select recipients, raw from outbox order by id").fetchall()
    finally:
        con.close()
    assert [r[0] for r in rows] == ["carol@customer.org"]
    msg = message_from_bytes(rows[0][1], policy=policy.default)
    assert msg["Subject"] == f"Site says: [EXAMPLE #1] {HOSTILE}"
    assert msg.get_body(("plain",)).get_content().strip() == "Site text for #1"  # type: ignore[union-attr]
    html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert html.startswith("<p>Site HTML about ") and "<script>" not in html and "&lt;script&gt;" in html


def test_a_sender_without_a_display_name_shows_as_the_bare_address() -> None:
    r = Renderer()
    nameless = {"from": "carol@customer.org", "from_name": "", "text": "Help", "subject": "s", "created_at": None,
                "attachments": []}
    ctx = context(message=nameless, role="owner", by="alice@example.com")
    ctx["ticket"] = {**ctx["ticket"], "requester_name": ""}
    for name in ("agent/new_ticket", "agent/assigned"):
        text = r.render_mail(name, ctx).text
        assert "From:     carol@customer.org\n" in text, name
    answer = r.render_mail("requester/answer", ctx)
    assert answer.html is not None
    assert "\nExample Support\n" in answer.text and ", Example Support" not in answer.text
    assert ", Example Support" not in answer.html


def test_no_ratings_configured_no_rating_asked_for() -> None:
    r = Renderer()
    for name in ("requester/status-solved", "requester/status"):
        ctx = context(old_status="open")
        ctx["ticket"] = {**ctx["ticket"], "status": "solved", "status_kind": "solved"}
        asked = r.render_mail(name, ctx)
        assert asked.html is not None
        for text in (" ".join(asked.text.split()), " ".join(asked.html.split())):
            assert "with one of 1, 2, 3, 4, 5 on the first line" in text
            assert "If it did not, just reply and the ticket opens again." in text
        ctx["helpdesk"] = {**ctx["helpdesk"], "ratings": []}
        silent = r.render_mail(name, ctx)
        assert silent.html is not None
        for text in (silent.text, silent.html):
            assert "rate" not in text and "with one of" not in text
            # Not "If it did not": there is no answer before it to refer to.
            assert "If it did not" not in text
            assert "If your problem is not solved, just reply and the ticket opens again." in text


def test_an_agents_result_says_done_and_not_done_apart() -> None:
    # An admin's #release: one message released, another refused (its bytes are gone).
    def result(changes: list[str], not_done: list[str]) -> str:
        values = context(ticket=None, errors=[], collision=None, changes=changes, not_done=not_done)
        return Renderer().render_mail("agent/result", values | {"subject": "Re: held mail"}).text

    both = result(["released #1 from a@b.example (hi)"], ["#2: its stored bytes cannot be read"])
    assert both.index("Done:") < both.index("released #1") < both.index("Not done:") < both.index("#2: its")
    refused = result([], ["#2: its stored bytes cannot be read"])
    assert "Done:" not in refused.replace("Not done:", "") and "Not done:" in refused
    # Other results do not pass not_done at all.
    plain = Renderer().render_mail("agent/result", context(errors=[], collision=None,
                                                            changes=["status: open -> solved"])).text
    assert plain.lstrip().startswith("Done on ticket #7:") and "Not done" not in plain
