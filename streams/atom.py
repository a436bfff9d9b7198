"""Tocsin's own alerts out: a CAP 1.2 XML serializer and a CAP 1.2 Atom index feed.

:func:`alert_to_cap_xml` writes an :class:`~streams.records.Alert` as a CAP 1.2
document that is valid against the OASIS XSD (element order as the schema requires) and
that :func:`streams.cap.parse_cap` reads back into an equal model. Only CAP content is
written: ingest bookkeeping (``source``, ``warnings``, ``geometry_wkb``,
``received_at``) is not part of a CAP message. Polygons go back to CAP's ``lat,lon``
order; coordinates are written with ``repr`` so every float survives the round trip.

:func:`atom_feed` builds the index feed agencies and aggregators poll (the "CAP Atom
index" shape NWS and MeteoAlarm publish): one ``<entry>`` per alert with ``id``,
``updated`` (the alert's ``sent``), ``title`` (headline or event), ``summary`` (the
description) and a ``link`` to the CAP document (``type="application/cap+xml"``).
The API serves it later; this module only renders bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from lxml import etree

from streams.records import Alert, Area, Geocode, Info

CAP12_NS = "urn:oasis:names:tc:emergency:cap:1.2"
ATOM_NS = "http://www.w3.org/2005/Atom"
CAP_MIME = "application/cap+xml"
_SUMMARY_CHARS = 1000  # an index entry summarises; the CAP document has the full text


def _el(parent: etree._Element, name: str, text: str | None = None,
        ns: str = CAP12_NS) -> etree._Element:
    child = etree.SubElement(parent, f"{{{ns}}}{name}")
    if text is not None:
        child.text = text
    return child


def _opt(parent: etree._Element, name: str, text: str | None) -> None:
    # The parser reads an absent optional element as "" / None, so omitting empty values
    # keeps the round trip exact and the output schema-valid (no empty dateTimes).
    if text:
        _el(parent, name, text)


def _pairs(parent: etree._Element, name: str, pairs: Iterable[Geocode]) -> None:
    for pair in pairs:
        el = _el(parent, name)
        _el(el, "valueName", pair.value_name)
        _el(el, "value", pair.value)


def _area(parent: etree._Element, area: Area) -> None:
    el = _el(parent, "area")
    _el(el, "areaDesc", area.desc)
    for ring in area.polygons:
        _el(el, "polygon", " ".join(f"{lat!r},{lon!r}" for lon, lat in ring))
    for c in area.circles:
        _el(el, "circle", f"{c.lat!r},{c.lon!r} {c.radius_km!r}")
    _pairs(el, "geocode", area.geocodes)


def _info(parent: etree._Element, info: Info) -> None:
    el = _el(parent, "info")
    _el(el, "language", info.language)
    for category in info.categories:
        _el(el, "category", category)
    _el(el, "event", info.event)
    _el(el, "urgency", info.urgency)
    _el(el, "severity", info.severity)
    _el(el, "certainty", info.certainty)
    _pairs(el, "eventCode", info.event_codes)
    _opt(el, "effective", info.effective)
    _opt(el, "onset", info.onset)
    _opt(el, "expires", info.expires)
    _opt(el, "senderName", info.sender_name)
    _opt(el, "headline", info.headline)
    _opt(el, "description", info.description)
    _opt(el, "instruction", info.instruction)
    _opt(el, "web", info.web)
    _pairs(el, "parameter", info.parameters)
    for area in info.areas:
        _area(el, area)


def alert_element(alert: Alert) -> etree._Element:
    """The CAP 1.2 ``<alert>`` element for ``alert`` (for embedding or signing)."""
    root = etree.Element(f"{{{CAP12_NS}}}alert", nsmap={None: CAP12_NS})
    for name, value in (("identifier", alert.identifier), ("sender", alert.sender),
                        ("sent", alert.sent), ("status", alert.status),
                        ("msgType", alert.msg_type), ("scope", alert.scope)):
        _el(root, name, value)
    for code in alert.codes:
        _el(root, "code", code)
    _opt(root, "note", alert.note)
    _opt(root, "references", " ".join(alert.references))
    for info in alert.infos:
        _info(root, info)
    return root


def alert_to_cap_xml(alert: Alert, *, pretty: bool = False) -> bytes:
    """Serialise an alert as a UTF-8 CAP 1.2 document (with XML declaration).

    Raises ``ValueError`` if a text holds characters XML cannot carry (control
    characters); the records we issue never should.
    """
    return bytes(etree.tostring(alert_element(alert), xml_declaration=True, encoding="UTF-8",
                                pretty_print=pretty))


def _title(alert: Alert) -> str:
    for info in alert.infos:
        if info.headline:
            return info.headline
    if alert.infos:
        return f"{alert.infos[0].event} ({alert.msg_type})"
    return f"{alert.msg_type} {alert.identifier}"


def _summary(alert: Alert) -> str:
    text = next((i.description for i in alert.infos if i.description), alert.note)
    return text if len(text) <= _SUMMARY_CHARS else text[: _SUMMARY_CHARS - 1] + "…"


def _rfc3339(value: str) -> str:
    return datetime.fromisoformat(value).isoformat(timespec="seconds")


def atom_feed(alerts: Iterable[Alert], *, feed_id: str, title: str, self_url: str,
              cap_url: Callable[[Alert], str], author: str = "Tocsin",
              updated: str | None = None) -> bytes:
    """A CAP 1.2 Atom index feed of ``alerts`` (newest ``sent`` first).

    ``cap_url(alert)`` is where the CAP document of an alert is served; it is also the
    entry ``id`` (stable per alert, as Atom requires). ``updated`` defaults to the newest
    ``sent`` (or now for an empty feed) so the feed changes only when an alert does.
    """
    items = sorted(alerts, key=lambda a: datetime.fromisoformat(a.sent), reverse=True)
    feed = etree.Element(f"{{{ATOM_NS}}}feed", nsmap={None: ATOM_NS})
    _el(feed, "id", feed_id, ATOM_NS)
    _el(feed, "title", title, ATOM_NS)
    if updated is None:
        updated = (_rfc3339(items[0].sent) if items
                   else datetime.now(UTC).isoformat(timespec="seconds"))
    _el(feed, "updated", updated, ATOM_NS)
    _el(_el(feed, "author", ns=ATOM_NS), "name", author, ATOM_NS)
    link = _el(feed, "link", ns=ATOM_NS)
    link.set("rel", "self")
    link.set("href", self_url)
    for alert in items:
        entry = _el(feed, "entry", ns=ATOM_NS)
        url = cap_url(alert)
        _el(entry, "id", url, ATOM_NS)
        _el(entry, "updated", _rfc3339(alert.sent), ATOM_NS)
        _el(entry, "title", _title(alert), ATOM_NS)
        alt = _el(entry, "link", ns=ATOM_NS)
        alt.set("rel", "alternate")
        alt.set("type", CAP_MIME)
        alt.set("href", url)
        summary = _summary(alert)
        if summary:
            _el(entry, "summary", summary, ATOM_NS)
    return bytes(etree.tostring(feed, xml_declaration=True, encoding="UTF-8",
                                pretty_print=True))
