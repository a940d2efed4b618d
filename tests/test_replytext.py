"""Tests for mailgate.ingest.replytext: the visible new text of replies."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from mailgate.ingest.parse import parse_message
from mailgate.ingest.replytext import visible_reply_text

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "reply_outlook_en.eml",
            "Hi,\n\nthe printer works again after the restart.\n\nKind regards\nJohn Smith\nCorp Ltd.",
        ),
        (
            "reply_outlook_de.eml",
            "Hallo,\n\nder Drucker läuft wieder.\n\nMit freundlichen Grüßen\nMax Mustermann",
        ),
        ("reply_outlook_fi.eml", "Moi,\n\ntulostin toimii taas.\n\nTerveisin\nMatti"),
        (
            "reply_outlook_ru.eml",
            "Добрый день,\n\nпринтер снова работает.\n\nС уважением,\nИван",
        ),
        ("reply_gmail_en.eml", "Thanks, that did it!"),
        ("reply_gmail_fi.eml", "Kiitos, nyt toimii!"),
        ("reply_gmail_html_de.eml", "Hat funktioniert, danke!"),
        ("reply_apple_de.eml", "Danke, das hat geholfen."),
        ("reply_apple_ru.eml", "Спасибо, помогло."),
        ("reply_thunderbird_en.eml", "Yes, it is plugged in.\n\nNo, that was the problem. Thanks!"),
        ("reply_thunderbird_ru.eml", "Всё заработало, спасибо."),
    ],
)
def test_client_replies(name: str, expected: str) -> None:
    msg = parse_message((FIXTURES / name).read_bytes())
    visible = visible_reply_text(msg.text)
    assert visible == expected
    # The quoted notice carried '#status closed': it must never look like a new command.
    assert "#status" not in visible


def test_commands_at_top_are_kept_verbatim() -> None:
    text = (
        "#status  closed\n#assign me\n\nDone.\n\n-- \nAlice\n\n"
        "From: Customer <c@example.org>\nSent: Tuesday\nTo: support@example.com\n"
        "Subject: x\n\n#status open\n"
    )
    assert visible_reply_text(text) == "#status  closed\n#assign me\n\nDone."


def test_only_quoted_text_falls_back_to_original() -> None:
    text = "> just a quote\n> nothing new\n"
    assert visible_reply_text(text) == text.strip()


def test_empty_text() -> None:
    assert visible_reply_text("") == ""
    assert visible_reply_text("  \n ") == ""


def test_interleaved_answers_survive() -> None:
    text = "On Tue, 5 Mar 2024, Support wrote:\n> Is it plugged in?\nYes.\n> Is it switched on?\nNo, that was it."
    assert visible_reply_text(text) == "Yes.\nNo, that was it."


def test_ordinary_words_are_not_signatures() -> None:
    text = "Thanks, that fixed it.\n- first point\n- second point\nBest,\nBob"
    assert visible_reply_text(text) == text


def test_indentation_is_preserved() -> None:
    text = "Config:\n\n    [smtp]\n    port = 25\n\nOn Mon, X wrote:\n> old"
    assert visible_reply_text(text) == "Config:\n\n    [smtp]\n    port = 25"


@pytest.mark.parametrize(
    "footer",
    [
        "Sent from my iPhone",
        "Get Outlook for iOS",
        "Von meinem iPhone gesendet",
        "Lähetetty iPhonesta",
        "Отправлено с iPhone",
    ],
)
def test_mobile_footers(footer: str) -> None:
    assert visible_reply_text(f"Works now.\n\n{footer}\n\n> old text") == "Works now."


@pytest.mark.parametrize(
    "separator",
    [
        "-----Original Message-----",
        "-----Ursprüngliche Nachricht-----",
        "---------- Forwarded message ---------",
        "Begin forwarded message:",
        "Anfang der weitergeleiteten Nachricht:",
    ],
)
def test_separators(separator: str) -> None:
    text = f"New text.\n\n{separator}\nFrom: a@b.example\nSubject: old\n\nold body"
    assert visible_reply_text(text) == "New text."


def test_german_outlook_header_block_without_separator() -> None:
    text = (
        "Erledigt.\n\nVon: Support <support@example.com>\nGesendet: Dienstag, 5. März 2024\n"
        "An: Max\nBetreff: Drucker\n\nalter Text"
    )
    assert visible_reply_text(text) == "Erledigt."


def test_the_rule_above_an_outlook_header_block_goes_with_it() -> None:
    """Outlook on the web draws an <hr> above its From/Sent block: the customer got "----"."""
    text = ("Kind regards\nBob\n----\n\nFrom: Support <support@example.com>\nSent: Monday, 2 March 2026 10:00\n"
            "To: Bob\nSubject: [EXAMPLE #1] Printer\n\nold notice")
    assert visible_reply_text(text) == "Kind regards\nBob"
    # A rule inside the answer stays.
    steps = "Steps:\n----\n1. Turn it off.\n\nOn Mon, 2 Mar 2026 at 10:00, Support <support@example.com> wrote:\n> q"
    assert visible_reply_text(steps) == "Steps:\n----\n1. Turn it off."


def test_wrapped_gmail_header() -> None:
    text = "Fine.\n\nOn Tue, Mar 5, 2024 at 10:12 AM Someone With A Long Name <\nsomeone@example.com> wrote:\n\n> old"
    assert visible_reply_text(text) == "Fine."


def test_crlf_input() -> None:
    assert visible_reply_text("Yes.\r\n\r\nOn Mon, X wrote:\r\n> q\r\n") == "Yes."


class _SearchSpy:
    """Stands in for the library's compiled header pattern and records what it is given:
    the longest line of each view, and how many characters each search may read."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern
        self.longest: list[int] = []
        self.searched: list[int] = []

    def search(self, view: str, pos: int = 0, endpos: int = sys.maxsize) -> re.Match[str] | None:
        self.longest.append(max(len(line) for line in view.split("\n")))
        self.searched.append(min(endpos, len(view)) - pos)
        return self.pattern.search(view, pos, endpos)


@pytest.fixture
def library_spy(monkeypatch: pytest.MonkeyPatch) -> _SearchSpy:
    from mailgate.ingest import replytext

    real = replytext._library_header_regex
    spy = _SearchSpy(real(("en", "de", "fi", "ru")))
    monkeypatch.setattr(replytext, "_library_header_regex", lambda languages: spy)
    return spy


def test_huge_hostile_line_reaches_the_regex_truncated(library_spy: _SearchSpy) -> None:
    # The quote-header regex backtracks on a long "On x x x ..." line; the guard is that it
    # only ever sees each line cut to _MAX_SCAN_LINE characters, whatever the input.
    from mailgate.ingest import replytext

    text = "On " + "x " * 200_000 + "\n> q"
    assert visible_reply_text(text) == text.split("\n")[0].rstrip()
    assert library_spy.longest and max(library_spy.longest) <= replytext._MAX_SCAN_LINE


def test_many_hostile_lines_are_searched_only_so_far(library_spy: _SearchSpy) -> None:
    """Lines of "am schrieb am schrieb ..." cost the library's pattern about 20 ms each
    (1 MB: 45 s); it searches a bounded stretch, and our own rules still see every line."""
    from mailgate.ingest import replytext

    hostile = ("am schrieb " * 40)[:399]
    text = "Thanks!\n" + "\n".join([hostile] * 2_500) + "\n\nOn Mon, 1 Jan 2024, Carol wrote:\n> old text"
    kept = "\n".join(line.rstrip() for line in text.split("\n")[:-3])
    assert visible_reply_text(text) == kept  # our own rule found the history and cut it
    assert library_spy.searched and max(library_spy.searched) <= replytext._MAX_LIBRARY_SCAN


def test_a_colon_line_above_quoted_lines_is_text_unless_it_names_a_sender_or_time() -> None:
    # The quoted line itself goes (it may be history: Outlook's prefixed quoting has no
    # header at all); the sentence introducing it stays.
    answer = "Please run this and check the output:\n\n> Get-Printer | fl\n\nIt should say Ready."
    assert visible_reply_text(answer) == "Please run this and check the output:\n\nIt should say Ready."
    outlook = "Done.\n\n> -----Original Message-----\n> From: Support\n> Owner: nobody\n> #assign EMAIL|me"
    assert visible_reply_text(outlook) == "Done."
    assert visible_reply_text("Done.\n\nOn Mon, 1 Jan 2024 at 10:00, Bob <b@x.org> wrote:\n> old") == "Done."
    assert visible_reply_text("Done.\n\nBob <b@x.org> 2024-01-01 10:00:\n> old\n> older") == "Done."


def test_lines_that_only_look_like_header_fields_are_text() -> None:
    answer = ("Send them a new mail like this:\n\nTo: escalations@vendor.example\n"
              "Subject: Case 4711\n\nand they answer within a day.")
    assert visible_reply_text(answer) == answer


def test_a_bare_double_dash_between_steps_is_no_signature() -> None:
    steps = "Step 1: unplug it.\n--\nStep 2: wait.\nStep 3: plug it in.\nStep 4: print.\n" \
            "Step 5: check.\nStep 6: tell us.\nStep 7: done.\nStep 8: really."
    assert visible_reply_text(steps) == steps
    assert visible_reply_text("Fixed.\n--\nAlice\nSupport") == "Fixed."


def test_a_forwarded_message_is_kept_when_asked() -> None:
    text = ("Please read their answer below.\n\n---------- Forwarded message ---------\n"
            "From: Vendor <help@vendor.example>\nSubject: Your case\n\nThe part ships on Monday.")
    assert visible_reply_text(text, keep_forwarded=True) == text
    assert visible_reply_text(text) == "Please read their answer below."


def test_an_attribution_without_date_or_address_is_a_header_when_only_quoting_follows() -> None:
    for attribution in ("Helpdesk escribió:", "Helpdesk ha scritto:", "Op donderdag schreef Helpdesk het volgende:"):
        text = f"Restart the router.\n\n{attribution}\n> New ticket #4\n> Owner: nobody\n> #assign EMAIL|me"
        assert visible_reply_text(text) == "Restart the router.", attribution


@pytest.mark.parametrize("header", [
    "De: Support <support@example.com>\nEnviado: lunes, 2 de marzo de 2026 9:00\nPara: Bob\nAsunto: [EXAMPLE #1] x",
    "Da: Support <support@example.com>\nInviato: lunedì 2 marzo 2026 09:00\nA: Bob\nOggetto: [EXAMPLE #1] x",
    "Van: Support <support@example.com>\nVerzonden: maandag 2 maart 2026 09:00\nAan: Bob\nOnderwerp: [EXAMPLE #1] x",
    "El lun, 2 mar 2026 a las 9:00, Example Support (<support@example.com>)\nescribió:",
    "Il giorno lun 2 mar 2026 alle ore 09:00 Example Support <support@example.com> ha scritto:",
    "Op ma 2 mrt 2026 om 09:00 schreef Example Support <\nsupport@example.com>:",
])
def test_spanish_italian_dutch_quote_headers_end_the_answer(header: str) -> None:
    # An unknown Outlook block sent the quoted notice (owner, due times) on as the answer.
    text = f"Restart the router.\n\n{header}\n\nNew ticket #1\nOwner: nobody\nFirst response due: soon"
    assert visible_reply_text(text) == "Restart the router."


@pytest.mark.parametrize("text", [
    "Vorrei prenotare il trasferimento:\nDa: Roma Termini\nA: Aeroporto Fiumicino\nData: 12 marzo 2026\nGrazie",
    "Il tecnico ha scritto nel rapporto quanto segue:\nil disco è guasto.\nMarco",
    "De monteur schreef in zijn rapport het volgende:\nde schijf is kapot.\nGroet",
    "Hei,\nKollega kirjoitti ohjeen\nVaiheet ovat:\nkäynnistä uudelleen\nTerveisin",
])
def test_prose_that_resembles_a_quote_header_is_kept(text: str) -> None:
    assert visible_reply_text(text) == text


@pytest.mark.parametrize("fields", [("Från", "Skickat", "Till", "Ämne"), ("Od", "Wysłano", "Do", "Temat"),
                                    ("差出人", "送信日時", "宛先", "件名"), ("Kimden", "Gönderildi", "Kime", "Konu")])
def test_outlook_header_block_in_any_language_under_its_underscores(fields: tuple[str, ...]) -> None:
    """Only the languages listed were known: in Swedish, Polish or Japanese the quoted
    notice, ticket data and all, went on to the customer as the agent's answer."""
    sender, sent, to, subject = fields
    text = (f"Answer in your language.\n\n________________________________\n"
            f"{sender}: Example Support <support@example.com>\n{sent}: 1 december 2026 10:00\n"
            f"{to}: Bob <bob@example.com>\n{subject}: [EXAMPLE #1] VPN down\n\n"
            "New ticket #1 in support@example.com\nFrom:     Carol <carol@customer.org>\n")
    assert visible_reply_text(text, whole_if_empty=False) == "Answer in your language."


def test_underscores_above_text_with_colons_are_not_a_header_block() -> None:
    text = "Steps:\n\n____________________\nOpen the settings: then VPN.\nThat is all.\n"
    assert visible_reply_text(text, whole_if_empty=False).endswith("That is all.")


def test_settings_under_underscores_are_text_not_an_outlook_block() -> None:
    """Outlook's block carries the time it was sent; "Login: ...", "Server:", "Port:" do not."""
    answer = ("Hi Carol, set your mail client up like this:\n\n____________________\n"
              "Login: carol@customer.org\nServer: imap.example.com\nPort: 993\nSecurity: SSL/TLS\n\n"
              "After that it should work again.\n")
    assert visible_reply_text(answer, whole_if_empty=False).endswith("After that it should work again.")
    details = ("Here are the details you asked for.\n\n____________\nContact: Carol Smith <carol@customer.org>\n"
               "Order: 12345\nSerial number: SN-88\nModel: X2\n\nIt stopped working on Monday.\n")
    assert visible_reply_text(details).endswith("It stopped working on Monday.")
    # Nor an address, an IP, a price or a version after it: none is the time it was sent.
    for second in ("Server: 192.168.10.25", "Price: 12.50 EUR", "Version: 10.15.7", "Resolution: 1920x1080",
                   "Model: X2000", "Printer: HP2055dn", "Error code: 0x2003"):
        text = (f"Details:\n\n____________\nCustomer: Carol <carol@customer.org>\n{second}\n"
                "Quantity: 3\nDelivery: Friday\n\nThe rest of the answer.\n")
        assert visible_reply_text(text, whole_if_empty=False).endswith("The rest of the answer."), second


@pytest.mark.parametrize("sent", ["Sent: 01.12.2026 10:00:00", "Lähetetty: 1.12.2026 10.00",
                                  "送信日時: 2026年12月1日 10:00"])
def test_the_sent_line_in_its_local_forms(sent: str) -> None:
    text = (f"Answer.\n\n________________________________\nFrom: Example Support <support@example.com>\n{sent}\n"
            "To: Bob <bob@example.com>\nSubject: [EXAMPLE #1] VPN down\n\nNew ticket #1\n")
    assert visible_reply_text(text.replace("From:", "Frm:"), whole_if_empty=False) == "Answer."
