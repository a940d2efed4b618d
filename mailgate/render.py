"""Jinja environment for every outgoing mail.

Sandboxed (templates may be edited by operators: CVE-2024-56201 and friends),
StrictUndefined (a typo fails loudly instead of mailing a blank), scoped names
such as `requester/created.txt.j2`, and a site directory searched before the
packaged templates. Callers pass a whitelisted context built by
`ticket_context`, never ORM objects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2 import ChoiceLoader, FileSystemLoader, StrictUndefined, TemplateNotFound
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mailgate.domain import one_line


def packaged_dir(name: str) -> Path:
    """templates/ or models/: inside the wheel (mailgate/_data) or beside the package in a checkout."""
    inside = Path(str(resources.files("mailgate"))) / "_data" / name
    if inside.is_dir():
        return inside
    return Path(__file__).resolve().parent.parent / name


@dataclass(frozen=True)
class RenderedMail:
    subject: str
    text: str
    html: str | None


class Renderer:
    def __init__(self, site_dir: Path | None = None) -> None:
        loaders = []
        if site_dir is not None:
            loaders.append(FileSystemLoader(str(site_dir)))
        loaders.append(FileSystemLoader(str(packaged_dir("templates"))))
        self.env = ImmutableSandboxedEnvironment(
            loader=ChoiceLoader(loaders),
            undefined=StrictUndefined,
            autoescape=lambda name: bool(name and name.endswith(".html.j2")),
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )

    def exists(self, name: str) -> bool:
        try:
            self.env.get_template(name)
        except TemplateNotFound:
            return False
        return True

    def render_text(self, name: str, context: dict[str, Any]) -> str:
        return self.env.get_template(name).render(**context)

    def render_mail(self, name: str, context: dict[str, Any]) -> RenderedMail:
        """`name` like 'requester/created': .subject.j2 and .txt.j2 required, .html.j2 optional.

        The HTML version is sent only from the directory the plain text came from: a
        site that rewrites the .txt.j2 must not have the packaged HTML, which most
        clients show instead, say what the site's text no longer says."""
        subject = one_line(self.render_text(f"{name}.subject.j2", context), limit=250)
        text_template = self.env.get_template(f"{name}.txt.j2")
        text = text_template.render(**context)
        html = None
        try:
            html_template = self.env.get_template(f"{name}.html.j2")
        except TemplateNotFound:
            pass
        else:
            if _directory_of(html_template.filename) == _directory_of(text_template.filename):
                html = html_template.render(**context)
        return RenderedMail(subject=subject, text=text, html=html)


def _directory_of(filename: str | None) -> Path | None:
    # Where the loader found it, not where a symlink points: a site may link its files in.
    return Path(os.path.abspath(filename)).parent if filename else None
