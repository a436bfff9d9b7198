"""CAP rules shared by every input format: errors, resource budgets, field validators.

Split out of :mod:`streams.cap` so the XML walker (``streams.cap``), the coordinate
parsers (``streams.cap_geometry``) and the JSON feeds (``streams.hazard_json``) apply
exactly the same rules and raise the same :class:`CapError` reasons. Everything here is
re-exported by ``streams.cap``; import from there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

CAP_NAMESPACES = {
    "urn:oasis:names:tc:emergency:cap:1.2": "1.2",
    "urn:oasis:names:tc:emergency:cap:1.1": "1.1",
    "http://www.incident.com/cap/1.0": "1.0",
}
DSIG_NS = "http://www.w3.org/2000/09/xmldsig#"
CATEGORIES = ("Geo", "Met", "Safety", "Security", "Rescue", "Fire", "Health", "Env",
              "Transport", "Infra", "CBRNE", "Other")  # fmt: skip
# msgTypes that only make sense relative to earlier messages (CAP 1.2 section 3.2.1).
NEEDS_REFERENCES = ("Update", "Cancel")


class CapError(ValueError):
    """A rejected input. ``reason`` is a short code for the DLQ; ``str(e)`` explains it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class CapLimits:
    """Resource budgets for one input document (the defaults admit every real file in data/)."""

    max_bytes: int = 4_000_000
    max_depth: int = 64
    max_areas: int = 5_000
    max_polygons: int = 5_000
    max_vertices: int = 500_000
    max_alerts: int = 1_000  # a non-standard <alerts> wrapper / JSON collection
    # Markup items ("<" characters: tags, comments, PIs, CDATA) in the whole document, an
    # upper bound of its elements counted in C before parsing. Every element costs Python
    # work (~1-3 us): without this bound 4 MB of "<x/>" took over a second of CPU. The
    # largest real message has ~2,000; 5,000 areas of ~20 tags each still fit.
    max_markup: int = 200_000


DEFAULT_LIMITS = CapLimits()


class Budget:
    """Counts areas, polygons and vertices across one document and fails fast past a limit.

    Counting happens *before* the coordinates are converted, so a 20,000-polygon bomb
    is refused without building 20,000 lists.
    """

    __slots__ = ("areas", "limits", "polygons", "vertices")

    def __init__(self, limits: CapLimits) -> None:
        self.limits = limits
        self.areas = self.polygons = self.vertices = 0

    def area(self) -> None:
        """Account for one more area."""
        self.areas += 1
        if self.areas > self.limits.max_areas:
            raise CapError("too_many_areas", f"more than {self.limits.max_areas} areas")

    def polygon(self, vertices: int) -> None:
        """Account for one more polygon of ``vertices`` points."""
        self.polygons += 1
        self.vertices += vertices
        if self.polygons > self.limits.max_polygons:
            raise CapError("too_many_polygons", f"more than {self.limits.max_polygons} polygons")
        if self.vertices > self.limits.max_vertices:
            raise CapError("too_many_vertices",
                           f"more than {self.limits.max_vertices} polygon vertices in total")


# --------------------------------------------------------------------- shared validators
# [0-9] not \d: \d would accept non-ASCII digits that fromisoformat then rejects oddly.
_DT_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
                    r"(Z|[+-][0-9]{2}:[0-9]{2})?")  # fmt: skip


def check_datetime(value: str, field: str, warnings: list[str]) -> str:
    """Validate a CAP date-time; return it stripped ("Z" rewritten to "+00:00" with a warning).

    CAP requires an explicit numeric offset: a local time without one is ambiguous by
    hours, which would make expiry (and so delivery) wrong; that is an error.
    """
    s = value.strip()
    m = _DT_RE.fullmatch(s)
    if m is None:
        raise CapError("bad_datetime", f"<{field}> {value.strip()[:64]!r} is not an ISO 8601 "
                                       "date-time like 2003-06-17T14:57:00-07:00")
    if m.group(1) is None:
        raise CapError("bad_datetime",
                       f"<{field}> {s!r} has no time-zone offset (CAP requires one, e.g. -07:00)")
    if m.group(1) == "Z":
        warnings.append(f"<{field}> uses 'Z' (CAP requires a numeric offset); read as +00:00")
        s = s[:-1] + "+00:00"
    try:
        datetime.fromisoformat(s)
    except ValueError as e:
        raise CapError("bad_datetime", f"<{field}> {s!r} is not a valid date-time: {e}") from None
    return s


def check_enum(value: str | None, allowed: tuple[str, ...], field: str,
               warnings: list[str]) -> str:
    """Validate an enumerated value; a case-only mismatch is fixed with a warning."""
    if value is None:
        raise CapError("missing_element", f"required <{field}> is missing")
    v = value.strip()
    if v in allowed:
        return v
    for a in allowed:
        if a.lower() == v.lower():
            warnings.append(f"<{field}> {v!r} normalised to {a!r}")
            return a
    raise CapError("bad_enum", f"<{field}> {v[:64]!r} is not one of: {', '.join(allowed)}")


_BAD_ID_CHARS = re.compile(r"[\s,<&]")


def check_identifier(value: str, field: str) -> str:
    """Validate a CAP ``identifier`` / ``sender``: no whitespace, commas, ``<`` or ``&``.

    CAP 1.1 and 1.2 forbid them because ``references`` is a whitespace-separated list of
    comma-separated ``sender,identifier,sent`` triples: an identifier holding either could
    never be referenced unambiguously by a later Update or Cancel.
    """
    m = _BAD_ID_CHARS.search(value)
    if m is not None:
        raise CapError("bad_identifier", f"<{field}> {value[:64]!r} contains {m.group()!r}; CAP "
                                         "forbids spaces, commas, '<' and '&' in it")
    return value


def check_references(value: str | list[str] | None, msg_type: str,
                     warnings: list[str]) -> list[str]:
    """Validate references (whitespace-separated ``sender,identifier,sent`` triples)."""
    if value is None:
        if msg_type in NEEDS_REFERENCES:
            raise CapError("missing_references", f"msgType {msg_type} must name the message(s) "
                                                 "it replaces in <references>, which is missing")
        return []
    items = value.split() if isinstance(value, str) else value
    if not items:
        if msg_type in NEEDS_REFERENCES:
            raise CapError("bad_references", f"<references> is empty but msgType {msg_type} "
                                             "must list sender,identifier,sent triples")
        # Real NAAD (Canada) Alerts carry an empty <references/>; an Alert references
        # nothing, so dropping a national warning over it would be the wrong trade-off.
        warnings.append(f"empty <references/> ignored (msgType {msg_type})")
        return []
    for item in items:
        parts = item.split(",")
        if len(parts) != 3 or not all(p.strip() for p in parts):
            raise CapError("bad_references", f"<references> entry {item[:120]!r} is not a "
                                             "sender,identifier,sent triple")
    return list(items)


def dedupe(warnings: list[str]) -> list[str]:
    """Warnings in first-seen order without repeats (one per distinct quirk)."""
    return list(dict.fromkeys(warnings))
