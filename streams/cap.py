"""CAP 1.0 / 1.1 / 1.2 XML -> validated :class:`~streams.records.Alert` records.

Plain Python (no faust) so ingest, tests and tools share one parser. The XML parser is
hardened: DTDs are refused outright (XXE, billion laughs), nothing is fetched from the
network, and size / depth / area / polygon / vertex budgets are enforced so one hostile
message cannot exhaust a worker. Real-world quirks that do not change meaning (BOM,
ISO-8859-1, ``cap:`` prefix, XML signatures, unknown elements...) are accepted and
recorded in ``Alert.warnings``; anything that would make us route or word an alert wrongly
raises :class:`CapError` with a short machine-readable ``reason`` for the DLQ.

The rules shared with ``streams.hazard_json`` (errors, budgets, ``check_*``) live in
``streams.cap_checks`` and the polygon / circle parsers in ``streams.cap_geometry``; both
are re-exported here, so ``from streams.cap import ...`` is the one public API.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable

from lxml import etree

from streams.cap_checks import (
    CAP_NAMESPACES,
    CATEGORIES,
    DEFAULT_LIMITS,
    DSIG_NS,
    NEEDS_REFERENCES,
    Budget,
    CapError,
    CapLimits,
    check_datetime,
    check_enum,
    check_identifier,
    check_references,
    dedupe,
)
from streams.cap_geometry import (
    check_circle,
    check_ring,
    parse_circle_text,
    parse_polygon_text,
)
from streams.records import (
    CERTAINTIES,
    MSG_TYPES,
    SCOPES,
    SEVERITIES,
    STATUSES,
    URGENCIES,
    Alert,
    Area,
    Geocode,
    Info,
)

__all__ = [
    "CAP_NAMESPACES", "CATEGORIES", "DEFAULT_LIMITS", "DSIG_NS", "NEEDS_REFERENCES", "Budget",
    "CapError", "CapLimits", "cap_version", "check_circle", "check_datetime", "check_enum",
    "check_identifier", "check_references", "check_ring", "dedupe", "parse_cap",
    "parse_circle_text", "parse_polygon_text", "parse_xml",
]  # fmt: skip

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
    ``too_deep``, ``too_much_markup``).
    """
    if len(data) > limits.max_bytes:
        raise CapError("too_large", f"document is {len(data)} bytes; limit {limits.max_bytes}")
    _refuse_doctype(data)
    # C speed, and only when the document is big enough to break the bound at all.
    markup = data.count(b"<") if len(data) > limits.max_markup else 0
    if markup > limits.max_markup:
        raise CapError("too_much_markup", f"{markup} tags ('<' characters); limit "
                                          f"{limits.max_markup}")
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
    ``too_large``, ``too_deep``, ``too_much_markup``, ``too_many_areas`` / ``_polygons``
    / ``_vertices`` / ``_alerts``). ``strict=True`` also validates against the OASIS XSD
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
