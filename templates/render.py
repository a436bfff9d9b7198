"""Render an alert into the texts a citizen receives: push, SMS, email and WEA-style.

Templates are plain Jinja2 files next to this module (or in the directory given to
:class:`Renderer`): ``push.j2``, ``sms.j2``, ``email.j2`` (text part) with
``email.html.j2`` (HTML part), and ``wea90.j2`` / ``wea360.j2``. Each renders the body
and may define a top-level ``{% set subject %}`` block, which becomes the subject
(push title, email subject). CAP text is passed as *variables*, never compiled as a
template, so an alert cannot inject template code. Autoescaping is on only for
``*.html.j2`` templates: the other texts are plain, where escaping would show ``&amp;``.

Per recipient the renderer takes the reader's ``language``, ``timezone`` (the expiry is
shown in their local time, see :mod:`templates.locale`) and ``place``: the citizen's own
name for the place or zone that matched ("Affects your place: Home"). Renders are
cached per (alert, channel, language, timezone, place); a fan-out of a million
recipients shares a few dozen renders.

Budgets (:class:`templates.budgets.Budgets`) are applied after rendering, cutting on a
word boundary with an ellipsis; a long description is cut, never overflows.

- push: title <= 80, body <= 1000 characters;
- SMS: a configured maximum of segments (default 3: 459 GSM-7 septets or 201 UCS-2
  units);
- email: subject <= 200 characters on one line (the body is not budgeted);
- WEA: 90 and 360 characters. The CAP parameters ``CMAMtext`` / ``CMAMlongtext``
  (the sender's own WEA texts) are used when present, else the text is composed. WEA is
  a broadcast format, so these texts say "in this area" and do not name a place.

A Cancel is rendered as a notice ("CANCELLED: <headline>. This alert has been
cancelled.") without the original's instruction, description or expiry: a Cancel
without ``<info>`` borrows the original's text, and repeating "take cover now" in a
cancellation would be worse than saying nothing.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import markupsafe

from streams.records import CHANNELS, Alert, Info
from templates.budgets import (
    PUSH_BODY_MAX,
    PUSH_TITLE_MAX,
    SMS_MAX_SEGMENTS,
    SUBJECT_MAX,
    WEA_LONG_MAX,
    WEA_SHORT_MAX,
    Budgets,
    gsm_ellipsis,
    is_gsm7,
    sms_segments,
    truncate,
    unicode_ellipsis,
)
from templates.locale import cap_word, format_expiry, labels_for

__all__ = [
    "KINDS",
    "PUSH_BODY_MAX",
    "PUSH_TITLE_MAX",
    "SMS_MAX_SEGMENTS",
    "SUBJECT_MAX",
    "WEA_LONG_MAX",
    "WEA_SHORT_MAX",
    "Budgets",
    "RenderedMessage",
    "Renderer",
    "is_gsm7",
    "select_info",
    "sms_segments",
    "truncate",
]

#: What :meth:`Renderer.render` can produce: the delivery channels plus WEA texts.
KINDS: tuple[str, ...] = (*CHANNELS, "wea90", "wea360")
_CMAM = {"wea90": "cmamtext", "wea360": "cmamlongtext"}
_STATUS_PREFIX = {"Test": "TEST", "Exercise": "EXERCISE", "System": "SYSTEM", "Draft": "DRAFT"}


def _clean(text: str) -> str:
    """Collapse all whitespace (CAP text is often hard-wrapped and indented)."""
    return " ".join(text.split())


def _paragraph_list(text: str) -> list[str]:
    """Re-flow hard-wrapped text into its blank-line-separated paragraphs."""
    return [p for p in (_clean(x) for x in re.split(r"\n\s*\n", text.strip())) if p]


def _sentence(text: str) -> str:
    """Jinja filter: end a fragment with a full stop unless it has punctuation."""
    text = text.rstrip()
    return text if not text or text[-1] in ".!?…:" else text + "."


_URL_RE = re.compile(r"https?://[^\s<>\"']+[^\s<>\"'.,;:!?)]")


def _linkify(text: str) -> markupsafe.Markup:
    """Jinja filter for HTML: escape ``text`` and link the http(s) URLs in it."""
    out, last = [], 0
    for m in _URL_RE.finditer(text):
        url = markupsafe.escape(m.group(0))
        out += [markupsafe.escape(text[last : m.start()]), f'<a href="{url}">{url}</a>']
        last = m.end()
    out.append(markupsafe.escape(text[last:]))
    return markupsafe.Markup("".join(out))


def _norm_lang(language: str) -> str:
    return language.strip().replace("_", "-").lower()


def select_info(alert: Alert, language: str) -> Info | None:
    """The info block to show a reader of ``language``.

    Exact tag (``es-US``), then same primary subtag (``es`` matches ``es-MX``), then
    any English block, then the first block. CAP's default language is ``en-US``.
    """
    if not alert.infos:
        return None
    langs = [_norm_lang(i.language or "en-US") for i in alert.infos]
    want = _norm_lang(language or "")
    if want:
        for info, lang in zip(alert.infos, langs, strict=True):
            if lang == want:
                return info
        primary = want.split("-")[0]
        for info, lang in zip(alert.infos, langs, strict=True):
            if lang.split("-")[0] == primary:
                return info
    for info, lang in zip(alert.infos, langs, strict=True):
        if lang.split("-")[0] == "en":
            return info
    return alert.infos[0]


def _parameter(info: Info, name: str) -> str:
    """A CAP ``<parameter>`` value by name (case-insensitive), whitespace collapsed."""
    for p in info.parameters:
        if p.value_name.strip().lower() == name:
            return _clean(p.value)
    return ""


@dataclass(frozen=True, slots=True)
class RenderedMessage:
    """A rendered text: ``language`` is the info block actually used, ``expires`` its
    raw CAP expiry (the sender derives a provider TTL from it), ``html`` the HTML part
    of an email ("" for the other channels)."""

    subject: str
    body: str
    language: str = ""
    expires: str | None = None
    html: str = ""


@dataclass(frozen=True, slots=True)
class CacheInfo:
    """Render cache statistics."""

    hits: int
    misses: int
    size: int


def _autoescape(name: str | None) -> bool:
    return bool(name) and (name or "").endswith((".html", ".htm", ".html.j2", ".htm.j2"))


class Renderer:
    """Renders alerts per (channel, language, time zone, place) with an LRU cache.

    An Update is a new CAP message (new identifier, new ``sent``) and therefore a new
    cache entry. ``budgets`` sets the length limits (the SMS segment maximum is
    configuration: ``Settings.sms_max_segments``).
    """

    def __init__(
        self,
        template_dir: Path | None = None,
        *,
        cache_size: int = 4096,
        budgets: Budgets | None = None,
    ) -> None:
        self.template_dir = Path(template_dir) if template_dir else Path(__file__).parent
        self.budgets = budgets or Budgets()
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(self.template_dir),
            autoescape=_autoescape,
            trim_blocks=True,
            lstrip_blocks=True,
            undefined=jinja2.StrictUndefined,  # a typo in a template fails loudly
        )
        self.env.filters["sentence"] = _sentence
        self.env.filters["linkify"] = _linkify
        self._cache: OrderedDict[tuple[str, ...], RenderedMessage] = OrderedDict()
        self._cache_size = max(1, cache_size)
        self._hits = 0
        self._misses = 0

    def cache_info(self) -> CacheInfo:
        """Hits, misses and current size of the render cache."""
        return CacheInfo(self._hits, self._misses, len(self._cache))

    def render(
        self, alert: Alert, channel: str, language: str, *, timezone: str = "", place: str = ""
    ) -> RenderedMessage:
        """The message for ``alert`` on ``channel`` (one of :data:`KINDS`) for a reader
        of ``language`` in ``timezone`` (IANA name; "" shows the sender's own offset)
        whose place or zone named ``place`` matched ("" when it has no name)."""
        if channel not in KINDS:
            raise ValueError(f"unknown channel {channel!r}")
        key = (alert.key, alert.sent, channel, language, timezone, place)
        cached = self._cache.get(key)
        if cached is not None:
            self._hits += 1
            self._cache.move_to_end(key)
            return cached
        self._misses += 1
        rendered = self._render(alert, channel, language, timezone, place)
        self._cache[key] = rendered
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return rendered

    def context(
        self,
        alert: Alert,
        info: Info | None,
        *,
        language: str = "",
        timezone: str = "",
        place: str = "",
    ) -> dict[str, Any]:
        """Template variables for one info block and reader (public so tools can preview
        them). Labels follow the reader's ``language``, else the info block's."""
        info = info or Info()
        lang, labels = labels_for(language, info.language or "en")
        status_prefix = _STATUS_PREFIX.get(alert.status, "")
        msg_label = {"Update": labels["update"], "Cancel": labels["cancel"]}.get(alert.msg_type, "")
        prefix = "".join(f"{p}: " for p in (status_prefix, msg_label) if p)
        areas = list(dict.fromkeys(_clean(a.desc) for a in info.areas if a.desc.strip()))
        expiry = format_expiry(info.expires, timezone, lang)
        place = _clean(place)
        paragraphs = _paragraph_list(info.description)
        return {
            "status": alert.status,
            "status_prefix": status_prefix,
            "msg_type": alert.msg_type,
            "cancelled": alert.msg_type == "Cancel",
            "prefix": prefix,
            "event": _clean(info.event),
            "headline": _clean(info.headline),
            "description": "\n\n".join(paragraphs),
            "description_paragraphs": paragraphs,
            "instruction": _clean(info.instruction),
            "areas": "; ".join(areas),
            "expires": expiry.when if expiry else "",
            "until": expiry.until if expiry else "",
            "until_short": expiry.until_short if expiry else "",
            "place": place,
            "place_line": labels["your_place"].format(place=place) if place else "",
            "sender_name": _clean(info.sender_name),
            "web": info.web.strip(),
            "severity": cap_word(info.severity, lang),
            "urgency": cap_word(info.urgency, lang),
            "certainty": cap_word(info.certainty, lang),
            "language": info.language,
            "reader_language": lang,
            "t": labels,
        }

    def _template(self, name: str, ctx: dict[str, Any]) -> tuple[str, str]:
        # make_module renders the body once and exposes top-level {% set %} values.
        module = self.env.get_template(name).make_module(ctx)
        return _clean(str(getattr(module, "subject", ""))), _tidy(str(module))

    def _render(
        self, alert: Alert, channel: str, language: str, timezone: str, place: str
    ) -> RenderedMessage:
        info = select_info(alert, language)
        ctx = self.context(alert, info, language=language, timezone=timezone, place=place)
        lang = info.language if info else ""
        expires = info.expires if info else None
        b = self.budgets
        if channel in _CMAM:
            limit = b.wea_short if channel == "wea90" else b.wea_long
            text = self._wea(alert, info, channel, ctx)
            body = truncate(text, lambda s: len(s) <= limit, gsm_ellipsis)
            return RenderedMessage("", body, lang, expires)
        subject, body = self._template(f"{channel}.j2", ctx)
        html = ""
        if channel == "push":
            body = truncate(body, lambda s: len(s) <= b.push_body, unicode_ellipsis)
            subject = truncate(subject, lambda s: len(s) <= b.push_title, unicode_ellipsis)
        elif channel == "sms":
            body = truncate(body, b.sms_fits, gsm_ellipsis)
        else:
            subject = truncate(subject, lambda s: len(s) <= b.email_subject, unicode_ellipsis)
            if (self.template_dir / "email.html.j2").is_file():
                html = str(self.env.get_template("email.html.j2").render(ctx, subject=subject))
        return RenderedMessage(subject, body, lang, expires, html)

    def _wea(self, alert: Alert, info: Info | None, channel: str, ctx: dict[str, Any]) -> str:
        """The sender's own WEA text when it gave one (not for a Cancel: a borrowed
        ``CMAMtext`` is the original's call to action), else the composed one."""
        own = _parameter(info, _CMAM[channel]) if info and alert.msg_type != "Cancel" else ""
        if own:
            return ctx["prefix"] + own
        return _clean(self._template(f"{channel}.j2", ctx)[1])


def _tidy(text: str) -> str:
    """Strip trailing spaces and collapse runs of blank lines left by optional blocks."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
