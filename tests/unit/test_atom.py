"""CAP 1.2 serializer (model -> XML -> model) and Tocsin's own Atom index feed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from streams.atom import ATOM_NS, CAP_MIME, alert_to_cap_xml, atom_feed
from streams.cap import CATEGORIES, parse_cap
from streams.cap_schema import validate_schema
from streams.feeds import parse_index
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
from tests.unit.test_cap import REJECTED

REPO = Path(__file__).resolve().parents[2]
CAP = REPO / "data" / "cap"
# Every real file the parser accepts (the rejected ones are asserted in test_cap.py).
REAL = sorted(
    p for p in [*(CAP / "cap12").iterdir(), *(CAP / "cap11").iterdir()] if p.name not in REJECTED
)


def cap_content(alert: Alert) -> dict[str, object]:
    """The CAP part of the model (what a CAP document carries)."""
    d = msgspec.to_builtins(alert)
    for key in ("warnings", "cap_version", "source", "received_at", "geometry_wkb"):
        d.pop(key, None)
    return d  # type: ignore[no-any-return]


# ------------------------------------------------------------------- strategies
# XML 1.0 can carry any character except controls, surrogates and U+FFFE/U+FFFF; the
# parser strips leading/trailing whitespace, so generated texts are stripped too.
_CHARS = st.characters(exclude_categories=("Cc", "Cs", "Cn"), include_characters="\n\t")
text = st.text(_CHARS, max_size=40).map(str.strip)
required_text = text.filter(bool)
token = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,30}", fullmatch=True)
offsets = st.integers(-12 * 4, 14 * 4).map(lambda q: timezone(timedelta(minutes=15 * q)))
cap_time = st.builds(
    lambda dt, tz: dt.replace(tzinfo=tz).isoformat(timespec="seconds"),
    st.datetimes(datetime(1990, 1, 1), datetime(2090, 1, 1)), offsets)
lat = st.floats(-90, 90, allow_nan=False)
lon = st.floats(-180, 180, allow_nan=False)


@st.composite
def rings(draw: st.DrawFn) -> list[tuple[float, float]]:
    points = draw(st.lists(st.tuples(lon, lat), min_size=3, max_size=12))
    return [*points, points[0]]


pairs = st.builds(Geocode, value_name=required_text, value=text)
geocodes = st.builds(Geocode, value_name=st.from_regex(r"[A-Z][A-Z0-9_]{0,9}", fullmatch=True),
                     value=text)
areas = st.builds(Area, desc=text, polygons=st.lists(rings(), max_size=3),
                  circles=st.lists(st.builds(Circle, lon=lon, lat=lat,
                                             radius_km=st.floats(0, 20_000)), max_size=2),
                  geocodes=st.lists(geocodes, max_size=4))
infos = st.builds(
    Info, language=st.from_regex(r"[a-z]{2}(-[A-Z]{2})?", fullmatch=True),
    categories=st.lists(st.sampled_from(CATEGORIES), min_size=1, max_size=3),
    event=required_text, urgency=st.sampled_from(URGENCIES),
    severity=st.sampled_from(SEVERITIES), certainty=st.sampled_from(CERTAINTIES),
    sender_name=text, headline=text, description=text, instruction=text,
    web=st.one_of(st.just(""), st.from_regex(r"https://[a-z]{1,10}\.example/[a-z0-9]{0,8}",
                                             fullmatch=True)),
    effective=st.none() | cap_time, onset=st.none() | cap_time, expires=st.none() | cap_time,
    areas=st.lists(areas, max_size=3), event_codes=st.lists(pairs, max_size=2),
    parameters=st.lists(pairs, max_size=3))
references = st.lists(st.builds(lambda s, i, t: f"{s},{i},{t}", token, token, cap_time),
                      min_size=1, max_size=3)


@st.composite
def alerts(draw: st.DrawFn) -> Alert:
    msg_type = draw(st.sampled_from(MSG_TYPES))
    needs_refs = msg_type in ("Update", "Cancel")
    return Alert(
        identifier=draw(token), sender=draw(token), sent=draw(cap_time),
        status=draw(st.sampled_from(STATUSES)), msg_type=msg_type,
        scope=draw(st.sampled_from(SCOPES)),
        references=draw(references if needs_refs else st.just([]) | references),
        note=draw(text), infos=draw(st.lists(infos, max_size=3)),
        codes=draw(st.lists(token, max_size=2)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(alerts())
def test_model_to_cap_xml_to_model_round_trip(alert: Alert) -> None:
    xml = alert_to_cap_xml(alert)
    [back] = parse_cap(xml)
    assert back.warnings == []  # our own output needs no quirk tolerance
    assert cap_content(back) == cap_content(alert)
    assert validate_schema(xml) == []  # and it is valid against the OASIS XSD


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_real_alerts_round_trip_upgraded_to_cap12(path: Path) -> None:
    originals = parse_cap(path.read_bytes())
    for original in originals:
        xml = alert_to_cap_xml(original)
        assert b'xmlns="urn:oasis:names:tc:emergency:cap:1.2"' in xml
        [back] = parse_cap(xml)
        assert back.cap_version == "1.2"
        assert cap_content(back) == cap_content(original)
        assert validate_schema(xml) == []


def test_serializer_refuses_text_xml_cannot_carry() -> None:
    [alert] = parse_cap((CAP / "cap12/oasiscap__spec12_A1_homeland_security.xml").read_bytes())
    alert.note = "bell \x07"
    with pytest.raises(ValueError):
        alert_to_cap_xml(alert)


# --------------------------------------------------------------------------- Atom feed
def issued() -> list[Alert]:
    names = ["oasiscap__spec12_A2_severe_thunderstorm.xml",
             "oasiscap__spec12_A4_amber_multilingual.xml", "oasiscap__ipaws_nv_cancel.xml"]
    return [parse_cap((CAP / "cap12" / n).read_bytes())[0] for n in names]


def url_of(alert: Alert) -> str:
    return f"https://tocsin.example/cap/{alert.key}.xml"


def test_atom_feed_entries() -> None:
    feed = atom_feed(issued(), feed_id="https://tocsin.example/alerts", title="Tocsin alerts",
                     self_url="https://tocsin.example/alerts.atom", cap_url=url_of)
    root = etree.fromstring(feed)
    ns = {"a": ATOM_NS}
    assert root.findtext("a:id", namespaces=ns) == "https://tocsin.example/alerts"
    entries = root.findall("a:entry", ns)
    assert len(entries) == 3
    # Newest first; the feed's updated is the newest sent.
    updated = [e.findtext("a:updated", namespaces=ns) for e in entries]
    assert updated == sorted(updated, key=datetime.fromisoformat, reverse=True)
    assert root.findtext("a:updated", namespaces=ns) == updated[0]
    by_title = {e.findtext("a:title", namespaces=ns): e for e in entries}
    storm = by_title["SEVERE THUNDERSTORM WARNING"]
    link = storm.find("a:link", ns)
    assert link is not None and link.get("type") == CAP_MIME
    assert storm.findtext("a:id", namespaces=ns) == link.get("href")
    assert storm.findtext("a:summary", namespaces=ns).startswith("AT 254 PM PDT")  # type: ignore[union-attr]
    assert "Cancel" in " ".join(by_title)  # an alert without headline: event or msgType


def test_atom_feed_is_readable_by_our_own_poller() -> None:
    alerts_ = issued()
    feed = atom_feed(alerts_, feed_id="urn:tocsin:feed", title="t",
                     self_url="https://tocsin.example/alerts.atom", cap_url=url_of)
    index = parse_index(feed, "https://tocsin.example/alerts.atom")
    assert index.problems == []
    assert sorted(e.link for e in index.entries) == sorted(url_of(a) for a in alerts_)


def test_empty_feed_is_valid() -> None:
    feed = atom_feed([], feed_id="urn:x", title="none", self_url="https://x.example/a",
                     cap_url=url_of)
    updated = etree.fromstring(feed).findtext(f"{{{ATOM_NS}}}updated")
    assert updated is not None
    assert abs(datetime.fromisoformat(updated) - datetime.now(UTC)) < timedelta(minutes=5)
