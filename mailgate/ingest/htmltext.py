"""Readable plain text from (already sanitised) HTML mail, for agents and reply parsing.

lxml parses in C; html2text, which we used first, runs Python's HTMLParser and
cost about 8.3 ms per HTML-only corpus body against about 1.8 ms here. The
walk is iterative (no recursion limit on hostile nesting). Paragraphs become
blank lines, <br> a line break, list items "- ", blockquotes "> " (so that
quoted history in an HTML-only reply is recognised as such), and a link whose
text is not its address keeps the address as "text <url>".
"""

from __future__ import annotations

import html as htmllib
import re

from lxml import etree

_PARAGRAPH = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "dl", "table",
                        "blockquote", "pre", "address", "center", "fieldset", "form", "figure"})
_LINE = frozenset({"div", "section", "article", "header", "footer", "nav", "aside", "main",
                   "tr", "dt", "dd", "li", "caption", "tbody", "thead", "tfoot", "hr"})
_INVISIBLE = frozenset({"script", "style", "head", "title", "template", "noscript", "img"})
# Elements a reader never sees (preheaders, tracking blocks): their text is not the sender's words.
_HIDDEN_STYLE_RE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden", re.IGNORECASE)
_SPACE_RE = re.compile(r"\s+")
_TAG_RE = re.compile(r"<[^<>]*>")  # the fallback; [^<>], as a "<" with no ">" after it made [^>] quadratic
_LINK_SCHEMES = ("http://", "https://", "ftp://", "mailto:")


class _Writer:
    """Accumulates lines, each with the blockquote depth it started at."""

    def __init__(self) -> None:
        self.lines: list[tuple[int, str]] = []
        self.current: list[str] = []
        self.line_depth = 0
        self.depth = 0  # blockquote nesting now
        self.pending = 0  # 1: start a new line before more text; 2: and leave a blank one
        self.pre = 0
        self.written = 0  # characters written so far (for link text)

    def text(self, value: str | None) -> None:
        if not value:
            return
        if self.pre:
            for i, piece in enumerate(value.split("\n")):
                if i:
                    self.end_line(force=True)
                self._put(piece)
            return
        value = _SPACE_RE.sub(" ", value)
        if value == " " and (not self.current or self.current[-1].endswith(" ")):
            return
        self._put(value)

    def _put(self, value: str) -> None:
        if self.pending:
            self.settle()
        if not self.current:
            self.line_depth = self.depth
            if not self.pre:
                value = value.lstrip()
        if value:
            self.current.append(value)
            self.written += len(value)

    def cell_gap(self) -> None:
        """Between table cells: two spaces, which the whitespace folding would merge."""
        if self.current:
            self.current.append("  ")

    def settle(self) -> None:
        """Make a pending break now, at the current quote depth (before the depth changes)."""
        if self.pending and self.current:
            pending = self.pending
            self.end_line()
            if pending == 2:
                self.lines.append((self.depth, ""))
        elif self.pending == 2 and self.lines and self.lines[-1][1]:
            self.lines.append((self.depth, ""))
        self.pending = 0

    def end_line(self, *, force: bool = False) -> None:
        if self.current or force:
            self.lines.append((self.line_depth if self.current else self.depth, "".join(self.current).rstrip()))
            self.current = []

    def brk(self, kind: int) -> None:
        self.pending = max(self.pending, kind)

    def line_break(self) -> None:
        """<br>: end the line; at the start of a line, an empty one (as a browser shows it)."""
        if self.pending:
            self.settle()
            self.lines.append((self.depth, ""))
        elif self.current:
            self.end_line()
        else:
            self.lines.append((self.depth, ""))

    def result(self) -> str:
        self.end_line()
        out = [("> " * depth + line).rstrip() if depth else line for depth, line in self.lines]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


MAX_HTML_DEPTH = 2048  # libxml2's limit with huge_tree


def too_deep(html: str) -> bool:
    """Is this markup nested deeper than MAX_HTML_DEPTH? nh3 (html5ever) takes time that grows
    faster than the square of the depth: 10,000 nested <div> cost 0.26 s, 20,000 cost 2 s, so
    a few hundred kilobytes of hostile HTML would hold the worker for minutes."""
    if html.count("<") <= MAX_HTML_DEPTH:  # cannot be nested deeper than it has tags
        return False
    parser = etree.HTMLParser(huge_tree=True, no_network=True)
    try:
        etree.HTML(html.replace("\x00", ""), parser)
    except (etree.ParserError, ValueError):
        return False
    return any(e.type_name == "ERR_RESOURCE_LIMIT" for e in parser.error_log)


def _tail(pieces: list[str], n: int) -> str:
    """The last n characters of "".join(pieces), joining only the pieces needed: joining the
    whole line at every </a> made a line of 100,000 links quadratic."""
    if n <= 0:
        return ""
    tail: list[str] = []
    have = 0
    for piece in reversed(pieces):
        if have >= n:
            break
        tail.append(piece)
        have += len(piece)
    return "".join(reversed(tail))[-n:]


# What the spam filter also takes for unseen, which spammers pad with: transparent text; text
# whose font size, its own or inherited, is zero or under 2 px or pt ("1.1em" is no such
# size, and a layout's font-size:0 wrapper hides only what does not set its own size); and
# white text unless a background that is not white (a colour or an image) is set on it or an
# ancestor: a white label on a blue button is read, on <body bgcolor="#ffffff"> or on
# nothing it is not. An agent's view keeps them all.
_UNSEEN_STYLE_RE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden|opacity\s*:\s*0(?:\.0+)?\s*(?:;|$)",
                              re.IGNORECASE)
_FONT_SIZE_RE = re.compile(r"(?<![-\w])font-size\s*:\s*([^;]*)", re.IGNORECASE)
_TINY_SIZE_RE = re.compile(r"\s*(?:0+(?:\.0+)?(?:[a-z%]+)?|[01](?:\.\d+)?\s*(?:px|pt))\s*(?:!important\s*)?$",
                           re.IGNORECASE)
# A size relative to the parent's (100%, 1em, inherit): tiny inside a tiny one.
_RELATIVE_SIZE_RE = re.compile(r"\s*(?:[\d.]+\s*(?:%|em|ex|ch)|inherit|unset|smaller|larger)\s*(?:!important\s*)?$",
                               re.IGNORECASE)
_WHITE = r"(?:#fff(?:fff)?|white|rgb\(\s*255\s*,\s*255\s*,\s*255\s*\))(?![\w-])"  # not #fff200, whitesmoke
_WHITE_STYLE_RE = re.compile(r"(?<![-\w])color\s*:\s*" + _WHITE, re.IGNORECASE)
_WHITE_RE = re.compile(r"#?fff(?:fff)?|white|rgb\(\s*255\s*,\s*255\s*,\s*255\s*\)", re.IGNORECASE)
_BACKGROUND_DECL_RE = re.compile(r"(?<![-\w])background(-color|-image)?\s*:\s*([^;]*)", re.IGNORECASE)
_COLOR_TOKEN_RE = re.compile(r"#[0-9a-f]{3,8}(?![\w-])|rgba?\([^)]*\)|hsla?\([^)]*\)|\b[a-z]+\b", re.IGNORECASE)
# Keywords that set no colour of their own: the one beneath shows through.
_SEE_THROUGH = frozenset({"transparent", "none", "inherit", "initial", "unset", "currentcolor"})
# The CSS colour names mail uses; the other words of a background shorthand (repeat, scroll,
# center, important) are no colour.
_COLOUR_NAMES = frozenset({
    "black", "white", "red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "gray", "grey",
    "silver", "gold", "navy", "teal", "maroon", "olive", "lime", "aqua", "cyan", "magenta", "fuchsia", "beige",
    "ivory", "khaki", "lavender", "linen", "azure", "coral", "crimson", "indigo", "violet", "salmon", "tan",
    "turquoise", "chocolate", "tomato", "orchid", "plum", "wheat", "snow", "honeydew", "mintcream", "aliceblue",
    "ghostwhite", "whitesmoke", "seashell", "oldlace", "floralwhite", "cornsilk", "lemonchiffon", "lightyellow",
    "lightgray", "lightgrey", "lightblue", "lightgreen", "lightpink", "darkgray", "darkgrey", "darkblue",
    "darkgreen", "darkred", "dimgray", "dimgrey", "gainsboro", "slategray", "slategrey", "steelblue", "royalblue",
    "skyblue", "midnightblue", "firebrick", "forestgreen", "seagreen", "darkslategray", "darkslategrey"
})


def _hidden(el: etree._Element, unseen: bool = False, background: str = "") -> bool:
    if el.get("hidden") is not None:
        return True
    style = el.get("style") or ""
    if unseen:
        white = bool(_WHITE_STYLE_RE.search(style) or _WHITE_RE.fullmatch((el.get("color") or "").strip()))
        return bool(_UNSEEN_STYLE_RE.search(style)) or (white and (not background or _WHITE_RE.fullmatch(background)
                                                                   is not None))
    return bool(_HIDDEN_STYLE_RE.search(style))


def _background(el: etree._Element, outer: str) -> str:
    """What the element's text is on: a colour, "image", or "" for nothing set."""
    own = ""
    for _kind, value in _BACKGROUND_DECL_RE.findall(el.get("style") or ""):
        if "url(" in value.lower() or "gradient(" in value.lower():
            return "image"
        colours = [c for c in _COLOR_TOKEN_RE.findall(value)
                   if c.startswith("#") or c.lower().startswith(("rgb", "hsl")) or c.lower() in _COLOUR_NAMES]
        own = colours[-1].lower() if colours else own
    if el.get("background"):
        return "image"
    attr = (el.get("bgcolor") or "").strip().lower()
    own = own or ("" if attr in _SEE_THROUGH else attr)
    return own or outer


def _tiny(el: etree._Element, outer: bool) -> bool:
    """Whether the element's text is too small to read: its own font size (the last one
    declared, as CSS takes it), else outer; a relative size keeps the outer verdict."""
    sizes = _FONT_SIZE_RE.findall(el.get("style") or "")
    if not sizes or _RELATIVE_SIZE_RE.match(sizes[-1]):
        return outer
    return bool(_TINY_SIZE_RE.match(sizes[-1]))


def html_to_text(html: str, *, unseen_hidden: bool = False) -> str:
    """Text of HTML as a reader sees it. Give it the HTML as received, not the sanitised
    copy: sanitising drops the style and hidden attributes that say what is invisible.
    unseen_hidden: also leave out tiny and white text (the spam filter's view)."""
    # Plain etree elements: lxml.html's element classes cost a lookup each. huge_tree lifts
    # libxml2's depth limit from 256 to 2048; deeper (hostile) markup loses its layout.
    parser = etree.HTMLParser(huge_tree=True, no_network=True)
    html = html.replace("\x00", "")  # libxml2 would show each as U+FFFD
    try:
        root = etree.HTML(html, parser)
    except (etree.ParserError, ValueError):
        root = None
    if root is None or any(e.type_name == "ERR_RESOURCE_LIMIT" for e in parser.error_log):
        return _SPACE_RE.sub(" ", htmllib.unescape(_TAG_RE.sub("", html))).strip()
    w = _Writer()
    links: list[tuple[int, str]] = []  # (characters written at <a>, href)
    list_counters: list[int | None] = []
    # For unseen_hidden, of each open element, innermost last: what its text is on, and
    # whether its font is too small to read.
    backgrounds = [""]
    tiny = [False]
    # Comments and processing instructions come as events of their own: the text after them
    # (`Hello,<!--StartFragment--> the VPN fails`) is their tail, and was lost.
    walker = etree.iterwalk(root, events=("start", "end", "comment", "pi"))
    for event, el in walker:
        if event in ("comment", "pi"):
            if not tiny[-1]:
                w.text(el.tail)
            continue
        tag = el.tag.lower() if isinstance(el.tag, str) else ""
        if event == "start":
            if unseen_hidden:
                backgrounds.append(_background(el, backgrounds[-1]))
                tiny.append(_tiny(el, tiny[-1]))
            if not tag or tag in _INVISIBLE or _hidden(el, unseen_hidden, backgrounds[-1]):
                walker.skip_subtree()  # its "end" still comes, and writes the tail
                continue
            if tag in _PARAGRAPH:
                w.brk(2)
            elif tag in _LINE:
                w.brk(1)
            if tag == "blockquote":
                w.settle()
                w.depth += 1
            elif tag == "pre":
                w.pre += 1
            elif tag in ("ul", "ol"):
                list_counters.append(0 if tag == "ol" else None)
            elif tag == "li":
                counter = list_counters[-1] if list_counters else None
                if counter is None:
                    w.text("" if tiny[-1] else "- ")
                else:
                    list_counters[-1] = counter + 1
                    w.text("" if tiny[-1] else f"{counter + 1}. ")
            elif tag in ("td", "th"):
                w.cell_gap()
            elif tag == "hr":
                w.text("" if tiny[-1] else "----")
            elif tag == "br":
                w.line_break()
            elif tag == "a":
                links.append((w.written, (el.get("href") or "").strip()))
            if not tiny[-1]:
                w.text(el.text)
        else:
            hidden = not tag or tag in _INVISIBLE or _hidden(el, unseen_hidden, backgrounds[-1])
            if unseen_hidden:
                backgrounds.pop()
                tiny.pop()
            if hidden:
                pass
            elif tag == "a" and links:
                start, href = links.pop()
                shown = _tail(w.current, w.written - start)
                if href.startswith(_LINK_SCHEMES) and href.removeprefix("mailto:") not in shown and not tiny[-1]:
                    w.text(f" <{href.removeprefix('mailto:')}>" if shown.strip() else href.removeprefix("mailto:"))
            elif tag == "blockquote":
                w.end_line()  # the quote's last line, still quoted
                w.pending = 0
                w.depth -= 1
                w.brk(2)
            elif tag == "pre":
                w.pre -= 1
                w.brk(2)
            elif tag in ("ul", "ol"):
                if list_counters:
                    list_counters.pop()
                w.brk(2)
            elif tag in _PARAGRAPH:
                w.brk(2)
            elif tag in _LINE:
                w.brk(1)
            if not tiny[-1]:  # the tail is the parent's text, in the parent's size
                w.text(el.tail)
    return w.result()
