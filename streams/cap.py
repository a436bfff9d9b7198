"""CAP 1.0 / 1.1 / 1.2 XML -> validated :class:`~streams.records.Alert` records.

Plain Python (no faust) so ingest, tests and tools share one parser. The XML parser is
hardened: DTDs are refused outright (XXE, billion laughs), nothing is fetched from the
network, and size / depth / area / polygon / vertex budgets are enforced so one hostile
message cannot exhaust a worker. Real-world quirks that do not change meaning (BOM,
ISO-8859-1, ``cap:`` prefix, XML signatures, unknown elements...) are accepted and
recorded in ``Alert.warnings``; anything that would make us route or word an alert wrongly
raises :class:`CapError` with a short machine-readable ``reason`` for the DLQ.

The ``check_*`` helpers and :class:`Budget` are shared with ``streams.hazard_json`` so
JSON feeds obey exactly the same rules.
"""

from __future__ import annotations

import itertools
import math
import operator
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import msgspec
from lxml import etree

from streams.records import (
    CERTAINTIES,
    MSG_TYPES,
    SCOPES,
    SEVERITIES,
    STATUSES,
    URGENCIES,
    Alert,
    Area,
    Circle,
    Geocode,
    Info,
)

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


def _range_error(lons: list[float], lats: list[float], where: str) -> CapError:
    for lon, lat in zip(lons, lats, strict=True):
        # The chained comparisons are False for NaN, so NaN is reported here too.
        if not -90.0 <= lat <= 90.0:
            return CapError("bad_polygon", f"{where}: latitude {lat} is not in [-90, 90]")
        if not -180.0 <= lon <= 180.0:
            hint = " (ring crosses the antimeridian)" if math.isfinite(lon) else ""
            return CapError("bad_polygon", f"{where}: longitude {lon} is not in [-180, 180]{hint}")
    return CapError("bad_polygon", f"{where}: coordinates are not finite numbers")


def check_ring(lons: list[float], lats: list[float], where: str) -> list[tuple[float, float]]:
    """Validate a polygon ring given as parallel lists; return it as ``(lon, lat)`` tuples.

    Rules: every coordinate finite and in range, at least 4 points, first == last.
    The common all-valid case is checked with C-level sum/min/max, not a Python loop.
    """
    if lons and not (
        math.isfinite(sum(lons) + sum(lats))  # any NaN/inf poisons the sum
        and -90.0 <= min(lats) and max(lats) <= 90.0
        and -180.0 <= min(lons) and max(lons) <= 180.0
    ):
        raise _range_error(lons, lats, where)
    if len(lons) < 4:
        raise CapError("bad_polygon", f"{where}: {len(lons)} points; a polygon needs at least 4 "
                                      "(first point repeated last)")
    if lons[0] != lons[-1] or lats[0] != lats[-1]:
        raise CapError("bad_polygon", f"{where}: not closed, first point (lat {lats[0]}, lon "
                                      f"{lons[0]}) != last point (lat {lats[-1]}, lon {lons[-1]})")
    return list(zip(lons, lats, strict=True))


def check_circle(lon: float, lat: float, radius_km: float, where: str) -> Circle:
    """Validate a circle centre (WGS84) and radius in km."""
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        raise CapError("bad_circle", f"{where}: centre lat {lat}, lon {lon} is out of range")
    if not (math.isfinite(radius_km) and radius_km >= 0.0):
        raise CapError("bad_circle", f"{where}: radius {radius_km} km must be finite and >= 0")
    return Circle(lon=lon, lat=lat, radius_km=radius_km)


def dedupe(warnings: list[str]) -> list[str]:
    """Warnings in first-seen order without repeats (one per distinct quirk)."""
    return list(dict.fromkeys(warnings))


# ----------------------------------------------------------------- CAP text geometry
_WS_COMMA = re.compile(r"\s,|,\s")
_STRAY_WS = re.compile(r"\s*,\s*")


def _number(text: str) -> float:
    if "_" in text:  # float() also accepts "1_0"; CAP coordinates never contain "_"
        raise ValueError(text)
    return float(text)


def _well_formed(text: str, pairs: list[str]) -> bool:
    # Every whitespace-separated token holds exactly one comma. Done with str.count and a
    # C-level map (no Python loop per vertex): big rings are the hot path.
    return text.count(",") == len(pairs) and all(map(operator.contains, pairs, _COMMAS))


_COMMAS = itertools.repeat(",")
_FLOAT_ARRAY = msgspec.json.Decoder(list[float])


def parse_polygon_text(text: str, where: str, budget: Budget, warnings: list[str]
                       ) -> list[tuple[float, float]]:
    """Parse and validate CAP polygon text (``"lat,lon lat,lon ..."``) into a (lon, lat) ring."""
    pairs = text.split()
    if not _well_formed(text, pairs):
        if _WS_COMMA.search(text):  # "38.47, -120.14": whitespace around the comma
            warnings.append("stray whitespace inside polygon coordinates ignored")
            text = _STRAY_WS.sub(",", text)
            pairs = text.split()
        if not _well_formed(text, pairs):
            bad = next((p for p in pairs if p.count(",") != 1), text.strip())
            raise CapError("bad_polygon", f"{where}: {bad[:64]!r} is not a 'lat,lon' pair")
    budget.polygon(len(pairs))
    try:
        # Fast path: the pairs as one JSON array, parsed in C by msgspec (3x faster than
        # float() per number on the 93,000-vertex NWS stress file). JSON numbers are a
        # subset of what float() reads and both round correctly, so values are identical;
        # anything else ("+1", ".5", "nan", "1_0") takes the float() path and its errors.
        coords = _FLOAT_ARRAY.decode("[" + ",".join(pairs) + "]")
    except (msgspec.DecodeError, msgspec.ValidationError):
        try:
            coords = list(map(_number if "_" in text else float,
                              text.replace(",", " ").split()))
        except ValueError:
            bad = next((p for p in pairs if not _numeric_pair(p)), text.strip())
            raise CapError("bad_polygon", f"{where}: {bad[:64]!r} is not numeric") from None
    return check_ring(coords[1::2], coords[0::2], where)  # CAP is lat,lon; we store lon,lat


def _numeric_pair(pair: str) -> bool:
    try:
        for part in pair.split(","):
            _number(part)
    except ValueError:
        return False
    return True


def parse_circle_text(text: str, where: str, warnings: list[str]) -> Circle:
    """Parse and validate CAP circle text (``"lat,lon radius_km"``)."""
    if _WS_COMMA.search(text):
        warnings.append("stray whitespace inside circle coordinates ignored")
        text = _STRAY_WS.sub(",", text)
    parts = text.split()
    centre = parts[0].split(",") if len(parts) == 2 else []
    if len(centre) != 2:
        raise CapError("bad_circle", f"{where}: {text.strip()[:64]!r} is not 'lat,lon radius_km'")
    try:
        lat, lon, radius = _number(centre[0]), _number(centre[1]), _number(parts[1])
    except ValueError:
        raise CapError("bad_circle", f"{where}: {text.strip()[:64]!r} is not numeric") from None
    return check_circle(lon, lat, radius, where)


# ------------------------------------------------------------------------ XML parsing
_ALERT_SINGLE = ("identifier", "sender", "sent", "status", "msgType", "scope", "note",
                 "references")
_ALERT_OTHER = ("source", "restriction", "addresses", "code", "incidents", "password", "info")
_INFO_SINGLE = ("language", "event", "urgency", "severity", "certainty", "effective", "onset",
                "expires", "senderName", "headline", "description", "instruction", "web")
_INFO_OTHER = ("category", "responseType", "audience", "eventCode", "contact", "parameter",
               "resource", "area")
_AREA = ("areaDesc", "polygon", "circle", "geocode", "altitude", "ceiling")


def _tag_maps(ns: str) -> dict[str, dict[str, str]]:
    # Clark-notation tag -> local name, per parent. A dict lookup on el.tag is the
    # cheapest namespace-agnostic match lxml allows (no QName object per element).
    def m(names: tuple[str, ...]) -> dict[str, str]:
        return {f"{{{ns}}}{n}": n for n in names}

    return {"alert": m(_ALERT_SINGLE + _ALERT_OTHER), "info": m(_INFO_SINGLE + _INFO_OTHER),
            "area": m(_AREA), "kv": m(("valueName", "value"))}


_TAGS = {ns: _tag_maps(ns) for ns in CAP_NAMESPACES}
_local = threading.local()
_ROOT_TAG_RE = re.compile(rb"<[A-Za-z_]")
_DOCTYPE_UTF16 = ("<!DOCTYPE".encode("utf-16-le"), "<!DOCTYPE".encode("utf-16-be"))


def _parser() -> etree.XMLParser:
    # lxml parsers must not be shared between threads; one per thread, built once.
    parser = getattr(_local, "parser", None)
    if parser is None:
        parser = _local.parser = etree.XMLParser(
            resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False,
            huge_tree=False, remove_comments=True)
    return parser


def _refuse_doctype(data: bytes) -> None:
    # Fast pre-scan of the prolog only (a DOCTYPE cannot follow the root start tag; a CDATA
    # description quoting "<!DOCTYPE html>" must not trip it). parse_cap re-checks docinfo,
    # which also catches a DOCTYPE hidden behind a prolog comment mentioning "<alert".
    m = _ROOT_TAG_RE.search(data)
    if data.find(b"<!DOCTYPE", 0, m.start() if m else len(data)) >= 0 or (
        b"\x00" in data[:4] and any(d in data for d in _DOCTYPE_UTF16)
    ):
        raise CapError("doctype_forbidden", "document contains a DOCTYPE/DTD; CAP needs none "
                                            "and DTDs enable entity (XXE) attacks")


def _check_depth(root: etree._Element, max_depth: int) -> None:
    # "is there an element at depth max_depth + 1?" as one XPath, evaluated in C (no Python
    # per element); compiled once per limit and per thread, like the parser.
    cache: dict[int, etree.XPath] = _local.__dict__.setdefault("depth_xpath", {})
    xp = cache.get(max_depth)
    if xp is None:
        xp = cache[max_depth] = etree.XPath("boolean(" + "/*" * (max_depth + 1) + ")")
    if xp(root):
        raise CapError("too_deep", f"elements nested deeper than {max_depth} levels")


class _Ctx:
    """Per-document state threaded through the element walkers."""

    __slots__ = ("budget", "tags", "version", "warnings")

    def __init__(self, tags: dict[str, dict[str, str]], version: str, budget: Budget) -> None:
        self.tags, self.version, self.budget = tags, version, budget
        self.warnings: list[str] = []


def _other(el: etree._Element, parent: str, ctx: _Ctx) -> None:
    if not isinstance(el.tag, str):  # processing instruction / entity node
        return
    q = etree.QName(el)
    if q.namespace == DSIG_NS and q.localname == "Signature":
        ctx.warnings.append("XML signature not verified")
    else:
        ctx.warnings.append(f"unknown element <{q.localname}> in <{parent}> ignored")


def _collect(el: etree._Element, parent: str, singles: tuple[str, ...], ctx: _Ctx
             ) -> tuple[dict[str, str], dict[str, list[etree._Element]]]:
    tags = ctx.tags[parent]
    single: dict[str, str] = {}
    multi: dict[str, list[etree._Element]] = {}
    for child in el:
        name = tags.get(child.tag)  # type: ignore[call-overload]  # PIs have callable tags
        if name is None:
            _other(child, parent, ctx)
        elif name in singles:
            if name in single:
                ctx.warnings.append(f"duplicate <{name}> in <{parent}>: first one used")
            else:
                single[name] = child.text or ""
        else:
            multi.setdefault(name, []).append(child)
    return single, multi


def _required(single: dict[str, str], name: str, parent: str) -> str:
    value = single.get(name)
    if value is None:
        raise CapError("missing_element", f"required <{name}> is missing from <{parent}>")
    value = value.strip()
    if not value:
        raise CapError("missing_element", f"required <{name}> in <{parent}> is empty")
    return value


def _optional_dt(single: dict[str, str], name: str, ctx: _Ctx) -> str | None:
    value = single.get(name)
    if value is None or not value.strip():
        if value is not None:
            ctx.warnings.append(f"empty <{name}> ignored")
        return None
    return check_datetime(value, name, ctx.warnings)


def _alert(el: etree._Element, ctx: _Ctx, source: str) -> Alert:
    single, multi = _collect(el, "alert", _ALERT_SINGLE, ctx)
    # Fixed validation order (not document order) so the reason for a bad message is stable.
    identifier = check_identifier(_required(single, "identifier", "alert"), "identifier")
    sender = check_identifier(_required(single, "sender", "alert"), "sender")
    sent = check_datetime(_required(single, "sent", "alert"), "sent", ctx.warnings)
    status = check_enum(single.get("status"), STATUSES, "status", ctx.warnings)
    msg_type = check_enum(single.get("msgType"), MSG_TYPES, "msgType", ctx.warnings)
    if "scope" not in single and ctx.version == "1.0":  # optional in the CAP 1.0 schema
        ctx.warnings.append("CAP 1.0 message without <scope>: assumed Public")
        single["scope"] = "Public"
    scope = check_enum(single.get("scope"), SCOPES, "scope", ctx.warnings)
    references = check_references(single.get("references"), msg_type, ctx.warnings)
    infos = [_info(i, n, ctx) for n, i in enumerate(multi.get("info", ()), 1)]
    codes = [c.text.strip() for c in multi.get("code", ()) if c.text and c.text.strip()]
    return Alert(identifier=identifier, sender=sender, sent=sent, status=status,
                 msg_type=msg_type, scope=scope, source=source, cap_version=ctx.version,
                 references=references, note=single.get("note", "").strip(), infos=infos,
                 warnings=ctx.warnings, codes=codes)


def _info(el: etree._Element, n: int, ctx: _Ctx) -> Info:
    single, multi = _collect(el, "info", _INFO_SINGLE, ctx)
    w = ctx.warnings
    categories = [check_enum(c.text or "", CATEGORIES, "category", w)
                  for c in multi.get("category", ())]
    if not categories:
        if ctx.version != "1.0":  # <category> only became mandatory in CAP 1.1
            raise CapError("missing_element", f"required <category> is missing from <info> {n}")
        w.append("CAP 1.0 <info> without <category>")
    event = _required(single, "event", "info")
    urgency = check_enum(single.get("urgency"), URGENCIES, "urgency", w)
    severity = check_enum(single.get("severity"), SEVERITIES, "severity", w)
    certainty = single.get("certainty")
    if certainty is not None and certainty.strip() == "Very Likely":
        w.append("certainty 'Very Likely' (CAP 1.0) mapped to 'Likely'")  # as CAP 1.1 says
        certainty = "Likely"
    certainty = check_enum(certainty, CERTAINTIES, "certainty", w)

    def text(name: str) -> str:
        return single.get(name, "").strip()

    areas = [_area(a, f"info[{n}]/area[{k}]", ctx) for k, a in enumerate(multi.get("area", ()), 1)]
    return Info(language=text("language") or "en-US", categories=categories, event=event,
                urgency=urgency, severity=severity, certainty=certainty,
                sender_name=text("senderName"), headline=text("headline"),
                description=text("description"), instruction=text("instruction"),
                web=text("web"), effective=_optional_dt(single, "effective", ctx),
                onset=_optional_dt(single, "onset", ctx),
                expires=_optional_dt(single, "expires", ctx), areas=areas,
                event_codes=_pairs(multi.get("eventCode", ()), "eventCode", ctx),
                parameters=_pairs(multi.get("parameter", ()), "parameter", ctx))


def _area(el: etree._Element, where: str, ctx: _Ctx) -> Area:
    ctx.budget.area()
    area = Area()
    tags = ctx.tags["area"]
    for child in el:
        name = tags.get(child.tag)  # type: ignore[call-overload]
        if name == "polygon":
            text = child.text
            if text is None or not text.strip():
                ctx.warnings.append("empty <polygon/> ignored")
            else:
                ring_where = f"{where}/polygon[{len(area.polygons) + 1}]"
                area.polygons.append(parse_polygon_text(text, ring_where, ctx.budget, ctx.warnings))
        elif name == "circle":
            where_c = f"{where}/circle[{len(area.circles) + 1}]"
            area.circles.append(parse_circle_text(child.text or "", where_c, ctx.warnings))
        elif name == "geocode":
            geocode = _geocode(child, ctx)
            if geocode is not None:
                area.geocodes.append(geocode)
        elif name == "areaDesc":
            area.desc = (child.text or "").strip()
        elif name is None:
            _other(child, "area", ctx)
    return area


def _value_pair(el: etree._Element, parent: str, ctx: _Ctx) -> tuple[str, str]:
    """(valueName, value) of a geocode / eventCode / parameter, both stripped."""
    if ctx.version == "1.0":  # CAP 1.0 carries these as "name=value" text
        name, _, value = (el.text or "").partition("=")
    else:
        name = value = ""
        tags = ctx.tags["kv"]
        for child in el:  # a plain loop: geocodes are the most numerous elements
            kv = tags.get(child.tag)  # type: ignore[call-overload]
            if kv == "valueName":
                name = child.text or ""
            elif kv == "value":
                value = child.text or ""
            else:
                _other(child, parent, ctx)
    return name.strip(), value.strip()


def _pairs(elements: Iterable[etree._Element], parent: str, ctx: _Ctx) -> list[Geocode]:
    # eventCode / parameter names are kept as sent: unlike geocode schemes they are often
    # case-sensitive URNs (CAP-AU, CAP-CP profiles).
    out = []
    for el in elements:
        name, value = _value_pair(el, parent, ctx)
        if name:
            out.append(Geocode(value_name=name, value=value))
        else:
            ctx.warnings.append(f"<{parent}> without valueName ignored")
    return out


def _geocode(el: etree._Element, ctx: _Ctx) -> Geocode | None:
    name, value = _value_pair(el, "geocode", ctx)
    if not name:
        ctx.warnings.append("<geocode> without valueName ignored")
        return None
    if name.islower():
        ctx.warnings.append(f"lower-case geocode valueName {name!r} upper-cased")
    return Geocode(value_name=name.upper(), value=value)


def parse_xml(data: bytes, limits: CapLimits = DEFAULT_LIMITS) -> etree._Element:
    """Parse untrusted XML with the hardened parser and the byte / depth limits.

    Shared by the CAP parser, the schema check and the signature verifier so every path
    refuses DTDs (XXE, billion laughs) and oversized or over-deep documents the same way.
    Raises :class:`CapError` (``too_large``, ``doctype_forbidden``, ``xml_syntax``,
    ``too_deep``).
    """
    if len(data) > limits.max_bytes:
        raise CapError("too_large", f"document is {len(data)} bytes; limit {limits.max_bytes}")
    _refuse_doctype(data)
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as e:
        if "depth" in str(e).lower():  # libxml2's own hard nesting cap (256)
            raise CapError("too_deep", f"elements nested too deeply: {e}") from None
        raise CapError("xml_syntax", f"not well-formed XML: {e}") from None
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None:
        raise CapError("doctype_forbidden", "document contains a DOCTYPE/DTD; CAP needs none")
    _check_depth(root, limits.max_depth)
    return root


def cap_version(root: etree._Element) -> tuple[str, str, str]:
    """``(namespace, local name, CAP version)`` of a CAP root; ``CapError("not_cap")`` else."""
    tag = root.tag if isinstance(root.tag, str) else ""
    ns, _, local = tag[1:].rpartition("}") if tag.startswith("{") else ("", "", tag)
    if local not in ("alert", "alerts"):
        raise CapError("not_cap", f"root element <{local}> is not a CAP <alert>")
    version = CAP_NAMESPACES.get(ns)
    if version is None:
        raise CapError("not_cap", f"<{local}> is in namespace {ns or '(none)'!r}, not a CAP "
                                  "1.0/1.1/1.2 namespace")
    return ns, local, version


def parse_cap(data: bytes, *, limits: CapLimits = DEFAULT_LIMITS, source: str = "",
              strict: bool = False) -> list[Alert]:
    """Parse and validate one CAP XML document into alerts.

    Returns one alert for a normal ``<alert>``, several for a non-standard ``<alerts>``
    wrapper (e.g. SMHI). ``source`` is copied into ``Alert.source``. Raises
    :class:`CapError` (``.reason`` e.g. ``xml_syntax``, ``doctype_forbidden``, ``not_cap``,
    ``missing_element``, ``bad_enum``, ``bad_datetime``, ``bad_identifier``,
    ``bad_references``, ``missing_references``, ``bad_polygon``, ``bad_circle``,
    ``too_large``, ``too_deep``, ``too_many_areas`` / ``_polygons`` / ``_vertices`` /
    ``_alerts``). ``strict=True`` also validates against the OASIS XSD
    (:mod:`streams.cap_schema`) after the semantic rules and raises ``schema_invalid``.
    """
    root = parse_xml(data, limits)
    docinfo = root.getroottree().docinfo
    doc_warnings: list[str] = []
    if data[:3] == b"\xef\xbb\xbf":
        doc_warnings.append("UTF-8 byte-order mark")
    encoding = (docinfo.encoding or "UTF-8").upper()
    if encoding not in ("UTF-8", "UTF8"):
        doc_warnings.append(f"declared encoding {encoding} (CAP expects UTF-8)")
    ns, local, version = cap_version(root)
    if root.prefix:
        doc_warnings.append(f"namespace prefix '{root.prefix}:' on CAP elements")

    elements = [root]
    if local == "alerts":
        elements = [c for c in root if c.tag == f"{{{ns}}}alert"]
        if not elements:
            raise CapError("not_cap", "<alerts> wrapper holds no CAP <alert>")
        if len(elements) > limits.max_alerts:
            raise CapError("too_many_alerts", f"{len(elements)} alerts; limit {limits.max_alerts}")
        doc_warnings.append(f"non-standard <alerts> wrapper holding {len(elements)} alerts")
    budget = Budget(limits)
    alerts = []
    for el in elements:
        ctx = _Ctx(_TAGS[ns], version, budget)
        ctx.warnings.extend(doc_warnings)
        alert = _alert(el, ctx, source)
        alert.warnings = dedupe(alert.warnings)
        alerts.append(alert)
    if strict:
        from streams.cap_schema import validate_schema  # lazy: the XSDs load on first use

        schema_warnings: list[str] = []
        errors = validate_schema(root, version, warnings=schema_warnings)
        if errors:
            more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
            raise CapError("schema_invalid", f"OASIS CAP {version} schema: {errors[0]}{more}")
        for alert in alerts:
            alert.warnings = dedupe(alert.warnings + schema_warnings)
    return alerts
