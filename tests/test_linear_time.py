"""Patterns that read text from strangers' mail finish in one pass on hostile input.

Each case runs in a child process with a time limit. That is not a timing
assertion: the case takes milliseconds, and the limit is there so that a pattern
turned quadratic again fails the test instead of holding CI for an hour (re holds
the GIL, so nothing inside the test process could interrupt it). The figures in the
ids are what the quadratic versions took here on 100,000 characters.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

CASES = {
    "reply prefix, 're' and spaces (70 s)":
        "from mailgate.domain import normalize_subject as f; f('re' + ' ' * 200_000)",
    "email argument of many dots (23 s)":
        "from mailgate.ingest.commands import _EMAIL; assert not _EMAIL.match('x@' + '.' * 200_000 + '@')",
    "address of '<a', spaces and 'b@example.com>' (68 s)":
        "from mailgate.ingest.parse import parse_message as f; "
        "f(b'From: c@d.org\\r\\nTo: <a' + b' ' * 200_000 + b'b@example.com>\\r\\nSubject: x\\r\\n\\r\\nhi\\r\\n')",
    "a 10 MB header of folded lines (155 s)":
        "from mailgate.ingest.parse import UnusableMessage, parse_message as f\n"
        "try: f(b'From: c@d.org\\r\\nX-Junk: a' + b'\\r\\n b' * 2_500_000 + b'\\r\\n\\r\\nhi\\r\\n')\n"
        "except UnusableMessage: pass",
    "100,000 links on one line of HTML (minutes)":
        "from mailgate.ingest.htmltext import html_to_text as f; "
        "f('<p>' + '<a href=\"http://e.example/\">l</a>' * 100_000)",
    "'a@b' and 200,000 colons in To (152 s)":
        "from mailgate.ingest.parse import parse_message as f; "
        "f(b'From: c@d.org\\r\\nTo: a@b' + b':' * 200_000 + b'\\r\\nSubject: x\\r\\n\\r\\nhi\\r\\n')",
    "100,000 escaped quotes in a From comment (60 s)":
        "from mailgate.ingest.parse import parse_message as f; "
        "f(b'From: a@b.example (' + b'\\\\\"' * 100_000 + b')\\r\\nSubject: x\\r\\n\\r\\nhi\\r\\n')",
    "a 10 MB folded Content-Type after 30 nested parts (163 s)": """
from mailgate.ingest.parse import UnusableMessage, parse_message
raw = b'From: c@d.org\\r\\nContent-Type: multipart/mixed; boundary=b\\r\\n\\r\\n'
for i in range(30):  # more containers than the depth limit: the depth scan reads every line
    raw += (b'--b\\r\\nContent-Type: multipart/alternative; boundary=c%d\\r\\n\\r\\n--c%d\\r\\n'
            b'Content-Type: text/plain\\r\\n\\r\\nx\\r\\n--c%d--\\r\\n' % (i, i, i))
raw += b'--b\\r\\nContent-Type: text/plain;' + b'\\r\\n x=y' * 2_000_000 + b'\\r\\n\\r\\nhi\\r\\n--b--\\r\\n'
try:
    parse_message(raw)
except UnusableMessage:
    pass
""",
    "an attachment named by 600,000 encoded words (45 s)":
        "from mailgate.ingest.parse import parse_message as f; "
        "m = f(b'From: c@d.org\\r\\nSubject: x\\r\\nContent-Type: multipart/mixed; boundary=b\\r\\n\\r\\n"
        "--b\\r\\nContent-Type: text/plain\\r\\n\\r\\nhi\\r\\n--b\\r\\nContent-Type: application/pdf\\r\\n"
        "Content-Disposition: attachment; filename=\\\"' + b'=?utf-8?b?YWFh?=' * 600_000 + "
        "b'\\\"\\r\\n\\r\\nxx\\r\\n--b--\\r\\n'); assert m.attachments[0].filename.startswith('aaa')",
    "header comment never closed (7 s)":
        "from mailgate.ingest.screen import _first_token as f; f('(' * 400_000)",
    "a Message-ID of 200,000 quotes (80 s: a lookahead at each quote)":
        "from mailgate.ingest.parse import parse_message as f; "
        "f(b'From: c@d.org\\r\\nMessage-ID: <' + b'\"' * 200_000 + b'\\r\\nSubject: x\\r\\n\\r\\nhi\\r\\n')",
}


@pytest.mark.parametrize("code", CASES.values(), ids=CASES.keys())
def test_one_pass(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30, check=True)

