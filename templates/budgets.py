"""Length budgets: SMS segment counting (GSM-7 vs UCS-2) and word-boundary truncation.

Every rendered text is cut to its budget after rendering, never before: the template
decides what comes first, the budget decides how much of the rest survives. A cut is
on a word boundary and ends with an ellipsis, which for GSM-7 texts is ``...``
(``…`` is not in GSM 03.38 and would switch the whole SMS to UCS-2, halving its room).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "PUSH_BODY_MAX",
    "PUSH_TITLE_MAX",
    "SMS_MAX_SEGMENTS",
    "SUBJECT_MAX",
    "WEA_LONG_MAX",
    "WEA_SHORT_MAX",
    "Budgets",
    "gsm_ellipsis",
    "is_gsm7",
    "sms_segments",
    "truncate",
    "unicode_ellipsis",
]

# Push: FCM allows a 4 KB payload, but lock screens show about two lines of title and
# an expanded notification about 1000 characters of body.
PUSH_TITLE_MAX = 80
PUSH_BODY_MAX = 1000
SMS_MAX_SEGMENTS = 3
SUBJECT_MAX = 200
# WEA (Wireless Emergency Alerts) message lengths: the legacy 90-character text and the
# 360-character text of WEA 3.0 handsets.
WEA_SHORT_MAX = 90
WEA_LONG_MAX = 360


@dataclass(frozen=True, slots=True)
class Budgets:
    """How long each rendered text may be (``sms_segments`` comes from configuration)."""

    push_title: int = PUSH_TITLE_MAX
    push_body: int = PUSH_BODY_MAX
    sms_segments: int = SMS_MAX_SEGMENTS
    email_subject: int = SUBJECT_MAX
    wea_short: int = WEA_SHORT_MAX
    wea_long: int = WEA_LONG_MAX

    def __post_init__(self) -> None:
        if self.sms_segments < 1:
            raise ValueError("sms_segments must be at least 1")
        for name in ("push_title", "push_body", "email_subject", "wea_short", "wea_long"):
            if getattr(self, name) < 20:
                raise ValueError(f"{name} budget below 20 characters leaves nothing to read")

    def sms_fits(self, text: str) -> bool:
        """Whether ``text`` fits in the configured number of SMS segments."""
        return sms_segments(text) <= self.sms_segments


# GSM 03.38 default alphabet (0x1B, the escape to the extension table, excluded) and
# the extension table, whose characters cost two septets each.
_GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXT = frozenset("\f^{}\\[~]|€")


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
    out = head + ellipsis(head)
    # The word-boundary cut is shorter than cut(lo), so it fits whenever the budget is
    # monotonic; check anyway: a budget must never overflow.
    return out if fits(out) else cut(lo)


def unicode_ellipsis(_: str) -> str:
    """``…``: one character, for texts measured in characters."""
    return "…"


def gsm_ellipsis(head: str) -> str:
    """``...`` after GSM-7 text (``…`` would force UCS-2), ``…`` otherwise."""
    return "..." if is_gsm7(head) else "…"
