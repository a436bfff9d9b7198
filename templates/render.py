"""Render an alert into the subject and body of a push, SMS or email message.

Templates are plain Jinja2 files, ``<channel>.j2``, next to this module (or in the
directory given to :class:`Renderer`). Each renders the body and may define a
top-level ``{% set subject %}`` block, which becomes the subject (push title, email
subject). CAP text is passed as *variables*, never compiled as a template, so an alert
cannot inject template code. Autoescaping is on only for ``*.html``/``*.html.j2``
templates: the channel texts are plain text, where escaping would show ``&amp;``.

Budgets (after rendering, cutting on a word boundary with an ellipsis):

- push: body <= 1000 characters, title <= 200;
- SMS: at most 3 segments, i.e. 459 GSM-7 septets or 201 UCS-2 units, and the
  ellipsis is ``...`` when the text is GSM-7 (``…`` is not in GSM 03.38 and would
  switch the whole message to UCS-2);
- email: subject <= 200 characters on one line.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import jinja2

from streams.records import CHANNELS, Alert, Info

__all__ = [
    "PUSH_BODY_MAX",
    "SMS_MAX_SEGMENTS",
    "SUBJECT_MAX",
    "RenderedMessage",
    "Renderer",
    "is_gsm7",
    "select_info",
    "sms_segments",
    "truncate",
]

PUSH_BODY_MAX = 1000
SUBJECT_MAX = 200
SMS_MAX_SEGMENTS = 3

# GSM 03.38 default alphabet (0x1B, the escape to the extension table, excluded) and
# the extension table, whose characters cost two septets each.
_GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXT = frozenset("\f^{}\\[~]|€")

_STATUS_PREFIX = {"Test": "TEST", "Exercise": "EXERCISE", "System": "SYSTEM", "Draft": "DRAFT"}

# Channel labels by primary language subtag; English is the fallback. Status words
# (TEST, EXERCISE) stay in English on purpose: they are what operators and tests grep.
_LABELS: dict[str, dict[str, str]] = {
    "en": {
        "alert": "Alert",
        "area": "Area",
        "expires": "Expires",
        "source": "From",
        "more": "More",
        "instruction": "What to do",
        "event": "Event",
        "severity": "Severity",
        "update": "UPDATE",
        "cancel": "CANCELLED",
        "not_actual": "this is not a real alert",
    },
    "es": {
        "alert": "Alerta",
        "area": "Zona",
        "expires": "Vence",
        "source": "De",
        "more": "Más información",
        "instruction": "Qué hacer",
        "event": "Evento",
        "severity": "Gravedad",
        "update": "ACTUALIZACIÓN",
        "cancel": "CANCELADA",
        "not_actual": "esta no es una alerta real",
    },
    "fr": {
        "alert": "Alerte",
        "area": "Zone",
        "expires": "Expire",
        "source": "De",
        "more": "Plus d'informations",
        "instruction": "Que faire",
        "event": "Événement",
        "severity": "Gravité",
        "update": "MISE À JOUR",
        "cancel": "ANNULÉE",
        "not_actual": "ceci n'est pas une vraie alerte",
    },
}


def is_gsm7(text: str) -> bool:
    """True when every character is in the GSM 03.38 basic or extension table."""
    return all(c in _GSM7_BASIC or c in _GSM7_EXT for c in text)


def sms_segments(text: str) -> int:
    """How many SMS segments ``text`` needs (0 for an empty text).

    GSM-7: 160 septets in one segment, 153 per segment when concatenated (the UDH
    takes the rest); extension characters count twice. Otherwise UCS-2: 70 UTF-16
    units, 67 when concatenated (a character outside the BMP counts twice).
    """
    if not text:
        return 0
    if is_gsm7(text):
        units, single, multi = len(text) + sum(c in _GSM7_EXT for c in text), 160, 153
    else:
        units, single, multi = len(text.encode("utf-16-le")) // 2, 70, 67
    return 1 if units <= single else -(-units // multi)


def truncate(text: str, fits: Callable[[str], bool], ellipsis: Callable[[str], str]) -> str:
    """The longest prefix of ``text``, cut on a word boundary, plus an ellipsis, that fits.

    ``fits`` must be monotonic (a shorter text never fits worse); ``ellipsis`` picks
    the marker for a given prefix (SMS needs ``...`` for GSM-7 text).
    """
    if fits(text):
        return text

    def cut(n: int) -> str:
        head = text[:n].rstrip()
        return head + ellipsis(head)

    lo, hi = 0, len(text)  # invariant: cut(lo) fits (or lo == 0), cut(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(cut(mid)):
            lo = mid
        else:
            hi = mid
    head = text[:lo]
    if lo < len(text) and not text[lo].isspace():
        # Back off to the last word boundary unless that would throw away more than
        # half the text (one enormous "word", e.g. a URL).
        space = max(head.rfind(" "), head.rfind("\n"))
        if space > lo // 2:
            head = head[:space]
    head = head.rstrip(" \t\n,;:-")
    return head + ellipsis(head)


def _unicode_ellipsis(_: str) -> str:
    return "…"


def _sms_ellipsis(head: str) -> str:
    return "..." if is_gsm7(head) else "…"


def _clean(text: str) -> str:
    """Collapse all whitespace (CAP text is often hard-wrapped and indented)."""
    return " ".join(text.split())


def _paragraphs(text: str) -> str:
    """Re-flow hard-wrapped text, keeping blank-line-separated paragraphs."""
    paras = re.split(r"\n\s*\n", text.strip())
    return "\n\n".join(p for p in (_clean(x) for x in paras) if p)


def _sentence(text: str) -> str:
    """Jinja filter: end a fragment with a full stop unless it has punctuation."""
    text = text.rstrip()
    return text if not text or text[-1] in ".!?…:" else text + "."


def _format_time(value: str | None) -> str:
    """CAP datetime -> ``2003-06-11 22:39 UTC-07:00``; unparsable text passes through."""
    if not value:
        return ""
    try:
        dt = datetime.fromisoformat(value.strip())
    except ValueError:
        return value.strip()
    offset = dt.utcoffset()
    if offset is None:
        return f"{dt:%Y-%m-%d %H:%M}"
    if offset == timedelta(0):
        return f"{dt:%Y-%m-%d %H:%M} UTC"
    tz = dt.strftime("%z")
    return f"{dt:%Y-%m-%d %H:%M} UTC{tz[:3]}:{tz[3:]}"


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


@dataclass(frozen=True, slots=True)
class RenderedMessage:
    """A rendered text: ``language`` is the info block actually used, ``expires`` its
    raw CAP expiry (the sender derives a provider TTL from it)."""

    subject: str
    body: str
    language: str = ""
    expires: str | None = None


@dataclass(frozen=True, slots=True)
class CacheInfo:
    """Render cache statistics."""

    hits: int
    misses: int
    size: int


def _autoescape(name: str | None) -> bool:
    return bool(name) and (name or "").endswith((".html", ".htm", ".html.j2", ".htm.j2"))


class Renderer:
    """Renders alerts per (channel, language) with an LRU cache.

    A delivery batch holds hundreds of recipients sharing a handful of languages, and
    an alert is fanned out in many batches, so rendering is cached by
    ``(alert.key, alert.sent, channel, language)``: an Update is a new CAP message
    (new identifier, new ``sent``) and therefore a new entry.
    """

    def __init__(self, template_dir: Path | None = None, *, cache_size: int = 4096) -> None:
        self.template_dir = Path(template_dir) if template_dir else Path(__file__).parent
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(self.template_dir),
            autoescape=_autoescape,
            trim_blocks=True,
            lstrip_blocks=True,
            undefined=jinja2.StrictUndefined,  # a typo in a template fails loudly
        )
        self.env.filters["sentence"] = _sentence
        self._cache: OrderedDict[tuple[str, str, str, str], RenderedMessage] = OrderedDict()
        self._cache_size = max(1, cache_size)
        self._hits = 0
        self._misses = 0

    def cache_info(self) -> CacheInfo:
        """Hits, misses and current size of the render cache."""
        return CacheInfo(self._hits, self._misses, len(self._cache))

    def render(self, alert: Alert, channel: str, language: str) -> RenderedMessage:
        """The message for ``alert`` on ``channel`` for a reader of ``language``."""
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}")
        key = (alert.key, alert.sent, channel, language)
        cached = self._cache.get(key)
        if cached is not None:
            self._hits += 1
            self._cache.move_to_end(key)
            return cached
        self._misses += 1
        rendered = self._render(alert, channel, language)
        self._cache[key] = rendered
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return rendered

    def context(self, alert: Alert, info: Info | None) -> dict[str, Any]:
        """Template variables for one info block (public so tools can preview them)."""
        info = info or Info()
        labels = _LABELS.get(_norm_lang(info.language or "en").split("-")[0], _LABELS["en"])
        status_prefix = _STATUS_PREFIX.get(alert.status, "")
        msg_label = {"Update": labels["update"], "Cancel": labels["cancel"]}.get(alert.msg_type, "")
        prefix = "".join(f"{p}: " for p in (status_prefix, msg_label) if p)
        areas = list(dict.fromkeys(_clean(a.desc) for a in info.areas if a.desc.strip()))
        return {
            "status": alert.status,
            "status_prefix": status_prefix,
            "msg_type": alert.msg_type,
            "prefix": prefix,
            "event": _clean(info.event),
            "headline": _clean(info.headline),
            "description": _paragraphs(info.description),
            "instruction": _clean(info.instruction),
            "areas": "; ".join(areas),
            "expires": _format_time(info.expires),
            "sender_name": _clean(info.sender_name),
            "web": info.web.strip(),
            "severity": info.severity,
            "urgency": info.urgency,
            "certainty": info.certainty,
            "language": info.language,
            "t": labels,
        }

    def _render(self, alert: Alert, channel: str, language: str) -> RenderedMessage:
        info = select_info(alert, language)
        template = self.env.get_template(f"{channel}.j2")
        # make_module renders the body once and exposes top-level {% set %} values.
        module = template.make_module(self.context(alert, info))
        body = _tidy(str(module))
        subject = _clean(str(getattr(module, "subject", "")))
        if channel == "push":
            body = truncate(body, lambda s: len(s) <= PUSH_BODY_MAX, _unicode_ellipsis)
            subject = truncate(subject, lambda s: len(s) <= SUBJECT_MAX, _unicode_ellipsis)
        elif channel == "sms":
            body = truncate(body, lambda s: sms_segments(s) <= SMS_MAX_SEGMENTS, _sms_ellipsis)
        else:
            subject = truncate(subject, lambda s: len(s) <= SUBJECT_MAX, _unicode_ellipsis)
        lang = info.language if info else ""
        return RenderedMessage(subject, body, lang, info.expires if info else None)


def _tidy(text: str) -> str:
    """Strip trailing spaces and collapse runs of blank lines left by optional blocks."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
