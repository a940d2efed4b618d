"""HTML-only mail to readable text (mailgate.ingest.htmltext)."""

import subprocess
import sys

from mailgate.ingest.htmltext import MAX_HTML_DEPTH, html_to_text


def test_paragraphs_breaks_and_entities() -> None:
    html = "<p>Hello&nbsp;<b>support</b>,</p><p>line one<br>line two</p><div>end &amp; done</div>"
    assert html_to_text(html) == "Hello support,\n\nline one\nline two\n\nend & done"


def test_inline_tags_do_not_split_words() -> None:
    assert html_to_text("<p><b>F</b>REE <i>offer</i></p>") == "FREE offer"


def test_links_keep_their_address_unless_it_is_the_text() -> None:
    html = ('<p>See the <a href="https://example.org/help">help page</a> or '
            '<a href="https://example.org/x">https://example.org/x</a> or '
            '<a href="mailto:ops@example.org">ops@example.org</a>.</p>')
    assert html_to_text(html) == ("See the help page <https://example.org/help> or "
                                  "https://example.org/x or ops@example.org.")


def test_lists_and_tables() -> None:
    html = "<ul><li>one</li><li>two</li></ul><ol><li>first</li><li>second</li></ol>" \
           "<table><tr><td>a</td><td>b</td></tr><tr><td>c</td><td>d</td></tr></table>"
    assert html_to_text(html) == "- one\n- two\n\n1. first\n2. second\n\na  b\nc  d"


def test_blockquote_becomes_quoted_lines() -> None:
    html = ("<div>Thanks, that worked!</div><div>On Monday Support wrote:</div>"
            "<blockquote><p>Please restart it.</p><p>Regards</p></blockquote>")
    assert html_to_text(html) == ("Thanks, that worked!\nOn Monday Support wrote:\n\n"
                                  "> Please restart it.\n>\n> Regards")


def test_pre_keeps_its_lines() -> None:
    assert html_to_text("<p>log:</p><pre>a  b\n  c</pre>") == "log:\n\na  b\n  c"


def test_invisible_parts_and_comments_are_dropped() -> None:
    html = "<head><title>T</title><style>p{}</style></head><!-- hidden --><p>shown<img alt=x>text</p>"
    assert html_to_text(html) == "showntext"


def test_empty_and_hostile_input() -> None:
    assert html_to_text("") == ""
    assert html_to_text("<!-- only a comment -->") == ""
    deep = "<div>" * 20000 + "deep" + "</div>" * 20000  # no recursion on hostile nesting
    assert "deep" in html_to_text(deep)
    assert html_to_text("<p>\x00broken <b>markup</p></i>") == "broken markup"


def test_break_after_a_block_is_an_empty_line() -> None:
    html = "<div>#priority urgent</div><div>The model number too.</div><br><div>On Mon wrote:</div>"
    assert html_to_text(html) == "#priority urgent\nThe model number too.\n\nOn Mon wrote:"


def test_markup_too_deep_for_the_parser_falls_back_to_stripped_tags() -> None:
    deep = "<div>" * (MAX_HTML_DEPTH + 100) + "Hello <b>world</b> &amp; more" + "</div>" * (MAX_HTML_DEPTH + 100)
    assert html_to_text(deep) == "Hello world & more"


def test_the_fallback_is_linear_on_openers_that_never_close() -> None:
    """Too deep for the parser, then 300,000 "<" with no ">": the fallback's old tag pattern
    took about a minute here. Run in a child with a 30 s limit, a guard rather than a timing
    assertion (it takes milliseconds; re holds the GIL, so nothing in-process can stop it)."""
    code = ("from mailgate.ingest.htmltext import MAX_HTML_DEPTH, html_to_text; "
            "print(len(html_to_text('<div>' * (MAX_HTML_DEPTH + 100) + '<' * 300_000)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30, check=True)
    assert done.stdout == b"300000\n"


def test_what_a_reader_never_sees_is_not_text() -> None:
    html = ('<html><head><title>Newsletter template</title></head><body>'
            '<div style="display:none;max-height:0">Preview text nobody sees</div>'
            '<span hidden>tracking 1234</span><p style="visibility: hidden">hidden too</p>'
            '<p>My printer is on fire.</p></body></html>')
    assert html_to_text(html) == "My printer is on fire."


def test_html_only_mail_is_read_as_received_not_as_sanitised() -> None:
    from mailgate.ingest.parse import parse_message

    raw = (b"From: a@example.com\r\nSubject: x\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
           b"<html><head><title>Template</title></head><body><div style='display:none'>preheader</div>"
           b"<p>Real words.</p></body></html>\r\n")
    msg = parse_message(raw)
    assert msg.text.strip() == "Real words."
    assert "Template" not in (msg.html or "")  # the stored, sanitised copy drops the <title> too


def test_the_spam_filters_view_leaves_out_only_what_nobody_sees() -> None:
    """unseen_hidden: 0-1 px fonts, transparent text and white text on no background go;
    '1.1em' is no tiny font (it read as '1' and a word boundary), and a white label on a
    coloured button is read."""
    unseen = {
        '<p style="font-size:1px">pad</p>ok': "ok",
        '<p style="font-size:0">pad</p>ok': "ok",
        '<p style="opacity:0">pad</p>ok': "ok",
        '<p style="color:#ffffff">pad</p>ok': "ok",
        '<p><font color="white">pad</font></p>ok': "ok",
        '<p style="font-size:1.1em">Thanks a lot</p>': "Thanks a lot",
        '<p style="font-size:10px">ten</p>': "ten",
        '<table bgcolor="#336699"><tr><td><font color="#ffffff">Click me</font></td></tr></table>': "Click me",
        '<div style="background:#000"><span style="color:white">light</span></div>': "light",
        '<font size="1">small print</font>': "small print",
        # White on a white or unset background is unseen, wherever the background is set.
        '<table bgcolor="#ffffff"><tr><td><font color="#ffffff">pad</font></td></tr></table>ok': "ok",
        '<div style="background:#fff"><p style="color:#ffffff">pad</p></div>ok': "ok",
        '<p style="color:#fff;background-color:#fff">pad</p>ok': "ok",
        '<p style="color:#fff;background:none">pad</p>ok': "ok",
        '<span style="font-size:1.5px">pad</span>ok': "ok",
        '<p style="font-size:0.9em">normal</p>': "normal",
        # See-through keywords show the colour beneath (Google Docs sets transparent on every span).
        '<table bgcolor="#073763"><tr><td><span style="background-color:transparent;color:#ffffff">'
        'Invoice number</span></td></tr></table>': "Invoice number",
        '<td style="background-image:url(x.png)"><span style="color:#fff">hero text</span></td>': "hero text",
        '<table><tr><td background="img.png"><font color="white">hero</font></td></tr></table>': "hero",
        '<p style="color:rgb(255,255,255)">pad</p>ok': "ok",
        '<table bgcolor="ffffff"><tr><td><font color="#ffffff">pad</font></td></tr></table>ok': "ok",
        # A layout's font-size:0 wrapper hides only the text that does not set its own size.
        '<div style="font-size:0px"><div style="font-size:14px">Column text</div></div>': "Column text",
        '<p style="mso-bidi-font-size:1.0pt">Body</p>': "Body",
        # Only colour words count in a background shorthand; "none" is no image; #fff200 is yellow.
        '<div style="background:#ffffff none repeat scroll 0% 0%"><p style="color:#ffffff">pad</p></div>ok': "ok",
        '<div style="background-color:#ffffff !important"><p style="color:#fff">pad</p></div>ok': "ok",
        '<td style="background-image:none"><span style="color:#fff">pad</span></td>ok': "ok",
        '<p style="color:#fff200">Sale ends today</p>': "Sale ends today",
        # Inside a tiny block: no link address, bullet or rule either; the last size declared
        # counts, and a relative one stays tiny.
        '<div style="font-size:0"><a href="https://spam.example/x">pad</a><ul><li>pad</li></ul><hr></div>ok': "ok",
        '<p style="font-size:14px;font-size:0">pad</p>ok': "ok",
        '<td style="font-size:0"><span style="font-size:100%">pad</span></td>ok': "ok",
    }
    for html, text in unseen.items():
        assert html_to_text(html, unseen_hidden=True) == text, html
    # An agent's view keeps what a dark background may show.
    assert html_to_text('<p style="color:#fff">kept</p>') == "kept"


def test_text_after_a_comment_is_kept() -> None:
    """The Windows clipboard's <!--StartFragment--> cut the customer's sentence: iterwalk
    gives comments as events of their own, and their tails were never written."""
    html = ('<p>Hello,<!--StartFragment--> the VPN fails with error 809.<!--EndFragment--></p>'
            "<p>Regards<!-- sig --> Carol</p>")
    assert html_to_text(html) == "Hello, the VPN fails with error 809.\n\nRegards Carol"
    assert html_to_text("<div><?php x ?>a</div>") == "a"
