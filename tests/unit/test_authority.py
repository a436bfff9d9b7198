"""Sender registry: jurisdiction, allowed events, signatures, IPAWS profile, policies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import shapely
from shapely.geometry.base import BaseGeometry

from geofencing.areas import resolve_alert_geometry
from geofencing.gazetteer import Gazetteer, default_gazetteer
from streams.authority import (
    Jurisdiction,
    RegistryError,
    Sender,
    SenderRegistry,
    authorise,
    ipaws_problems,
    missing_from_thread,
)
from streams.cap import parse_cap
from streams.records import Alert, Info
from tests.unit.test_signature import make_identity, sign

REPO = Path(__file__).resolve().parents[2]
CAP12 = REPO / "data" / "cap" / "cap12"
STORM = "oasiscap__spec12_A2_severe_thunderstorm.xml"  # KSTO@NWS.NOAA.GOV, California, SVR
MARYLAND = "oasiscap__ipaws_local_area_emergency_polygon.xml"  # IPAWS LAE, Montgomery Co.
AMBER = "oasiscap__spec12_A4_amber_multilingual.xml"  # KARO@CLETS.DOJ.CA.GOV, LA County
TSUNAMI = "oasiscap__wcatwc_tsunami_cancellation_update.xml"  # IPAWS, no SAME event code

REGISTRY_YAML = """
policy: strict
tolerance_m: 2000
senders:
  - sender: ksto@nws.noaa.gov          # case differs from the CAP <sender>: still matches
    name: NWS Sacramento
    jurisdiction: {codes: ["SAME:006000"]}
    event_codes: [svr, tor]
  - sender: "402013233923688"
    name: Montgomery County MD
    jurisdiction: {codes: ["SAME:024031"]}
    ipaws_profile: true
  - sender: KARO@CLETS.DOJ.CA.GOV
    jurisdiction: {codes: ["FIPS:06037"]}
    events: [child abduction, "Abducción de Niño"]   # names are per language
"""


@pytest.fixture(scope="module")
def gaz() -> Gazetteer:
    return default_gazetteer(REPO / "data")


@pytest.fixture
def registry(tmp_path: Path, gaz: Gazetteer) -> SenderRegistry:
    path = tmp_path / "senders.yaml"
    path.write_text(REGISTRY_YAML)
    return SenderRegistry.load(path, gaz)


def load(name: str, gaz: Gazetteer) -> tuple[Alert, BaseGeometry | None, bytes]:
    data = (CAP12 / name).read_bytes()
    [alert] = parse_cap(data)
    geometry, _ = resolve_alert_geometry(alert, gaz)
    return alert, geometry, data


def reasons(problems: list[str]) -> list[str]:
    return [p.split(":", 1)[0] for p in problems]


def test_registered_senders_inside_their_jurisdiction_are_authorised(
        registry: SenderRegistry, gaz: Gazetteer) -> None:
    for name in (STORM, MARYLAND, AMBER):
        alert, geometry, _ = load(name, gaz)
        assert geometry is not None
        assert authorise(alert, geometry, registry) == [], name


def test_alert_outside_jurisdiction_is_rejected(registry: SenderRegistry,
                                                gaz: Gazetteer) -> None:
    # The Maryland polygon, sent under the California sender's name.
    alert, geometry, _ = load(MARYLAND, gaz)
    alert.sender = "KSTO@NWS.NOAA.GOV"
    alert.infos[0].event_codes[0] = type(alert.infos[0].event_codes[0])("SAME", "SVR")
    problems = authorise(alert, geometry, registry)
    assert reasons(problems) == ["outside_jurisdiction"]
    assert "100% of the alert area" in problems[0]


def test_jurisdiction_tolerance_in_metres() -> None:
    # A 0.2-degree square at 60N; the alert pokes out east by ~300 m or by ~5.5 km.
    square = shapely.box(10.0, 60.0, 10.2, 60.2)
    sender = Sender("s@example.org", jurisdiction=Jurisdiction(
        geometry=json.loads(shapely.to_geojson(square))))
    registry = SenderRegistry([sender], tolerance_m=1000)
    [alert] = parse_cap((CAP12 / STORM).read_bytes())
    alert.sender = "s@example.org"
    deg_per_km_lon = 1 / (111.32 * 0.5)  # cos(60) = 0.5
    slight = shapely.box(10.05, 60.05, 10.2 + 0.3 * deg_per_km_lon, 60.1)
    far = shapely.box(10.05, 60.05, 10.2 + 5.5 * deg_per_km_lon, 60.1)
    assert authorise(alert, slight, registry) == []
    assert reasons(authorise(alert, far, registry)) == ["outside_jurisdiction"]


def test_event_not_allowed(registry: SenderRegistry, gaz: Gazetteer) -> None:
    alert, geometry, _ = load(STORM, gaz)
    alert.infos[0].event_codes = [type(alert.infos[0].event_codes[0])("SAME", "EVI")]
    problems = authorise(alert, geometry, registry)
    assert reasons(problems) == ["event_not_allowed"]
    assert "['EVI']" in problems[0]
    amber, amber_geometry, _ = load(AMBER, gaz)
    amber.infos[1].event = "Tornado Warning"  # allowed by event name only
    assert reasons(authorise(amber, amber_geometry, registry)) == ["event_not_allowed"]


def test_unknown_sender_policies(registry: SenderRegistry, gaz: Gazetteer) -> None:
    alert, geometry, _ = load(TSUNAMI, gaz)
    assert reasons(authorise(alert, geometry, registry)) == ["unknown_sender"]
    open_mode = SenderRegistry()  # the demo default: open
    assert authorise(alert, geometry, open_mode) == []
    assert "sender 'wcatwc@noaa.gov' is not registered (open mode)" in alert.warnings


def test_ipaws_profile(gaz: Gazetteer) -> None:
    maryland, _, _ = load(MARYLAND, gaz)
    assert ipaws_problems(maryland) == []
    tsunami, _, _ = load(TSUNAMI, gaz)  # real IPAWS message without a SAME eventCode
    assert ipaws_problems(tsunami) == ["info 1 has 0 SAME event codes, exactly one required"]
    storm, _, _ = load(STORM, gaz)
    storm.infos[0].expires = None
    assert ipaws_problems(storm) == ["<code>IPAWSv1.0</code> is missing (codes: [])",
                                     "info 1 has no <expires>"]
    registry = SenderRegistry([Sender(tsunami.sender, ipaws_profile=True)])
    assert reasons(authorise(tsunami, None, registry)) == ["ipaws_profile"]


def message(identifier: str, sent: str, refs: tuple[str, ...] = (),
            expires: str = "2030-01-01T00:00:00+00:00", msg_type: str = "Update") -> Alert:
    return Alert(identifier=identifier, sender="ipaws@example.gov", sent=sent, status="Actual",
                 msg_type=msg_type, scope="Public",
                 references=[f"ipaws@example.gov,{r},{sent}" for r in refs],
                 infos=[Info(expires=expires)])


def test_ipaws_thread_names_every_unexpired_message_the_references_omit() -> None:
    # A1 <- U1 <- U2 is the thread; U3 should name A1, U1 and U2. A0 expired long ago,
    # Z9 was sent after U3 (U3's sender could not have named it).
    now = 1_800_000_000.0  # 2027-01-15
    a0 = message("A0", "2027-01-15T06:00:00+00:00", msg_type="Alert",
                 expires="2027-01-15T07:00:00+00:00")
    a1 = message("A1", "2027-01-15T07:00:00+00:00", ("A0",), msg_type="Alert",
                 expires="2027-01-15T10:00:00+00:00")
    u1 = message("U1", "2027-01-15T07:30:00+00:00", ("A1",), expires="2027-01-15T10:00:00Z")
    u2 = message("U2", "2027-01-15T08:00:00-00:00", ("A1", "U1"))
    z9 = message("Z9", "2027-01-15T09:00:00+00:00", ("U2",))
    thread = {m.key: m for m in (a0, a1, u1, u2, z9)}
    complete = message("U3", "2027-01-15T08:30:00+00:00", ("A1", "U1", "U2"))
    assert missing_from_thread(complete, thread, now) == []
    only_first = message("U3", "2027-01-15T08:30:00+00:00", ("A1",))
    assert [m.identifier for m in missing_from_thread(only_first, thread, now)] == ["U1", "U2"]
    only_last = message("U3", "2027-01-15T08:30:00+00:00", ("U2",), msg_type="Cancel")
    assert [m.identifier for m in missing_from_thread(only_last, thread, now)] == ["A1", "U1"]
    # Once A1 and U1 have expired, naming the last update is enough.
    next_day = now + 86400
    assert missing_from_thread(only_last, thread, next_day) == []
    assert [m.identifier for m in missing_from_thread(only_first, thread, next_day)] == ["U2"]


def test_cancel_without_area_skips_the_jurisdiction_test(registry: SenderRegistry,
                                                         gaz: Gazetteer) -> None:
    [cancel] = parse_cap((CAP12 / "oasiscap__ipaws_nv_cancel.xml").read_bytes())
    cancel.sender = "402013233923688"
    assert authorise(cancel, None, registry) == []


def test_required_signature(tmp_path: Path, gaz: Gazetteer) -> None:
    agency = make_identity("ksto.example")
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ksto.pem").write_bytes(agency.cert_pem)
    path = tmp_path / "senders.json"
    path.write_text(json.dumps({"senders": [{
        "sender": "KSTO@NWS.NOAA.GOV", "require_signature": True,
        "certificate": "certs/ksto.pem"}]}))
    registry = SenderRegistry.load(path, gaz)
    alert, geometry, data = load(STORM, gaz)
    signed = sign(data, agency)
    assert authorise(alert, geometry, registry, payload=signed) == []
    tampered = signed.replace(b"SEVERE THUNDERSTORM", b"ALL CLEAR", 1)
    assert reasons(authorise(alert, geometry, registry, payload=tampered)) == ["bad_signature"]
    assert reasons(authorise(alert, geometry, registry, payload=data)) == ["unsigned"]
    assert reasons(authorise(alert, geometry, registry)) == ["signature_required"]
    forged = sign(data, make_identity("impostor.example"))
    assert reasons(authorise(alert, geometry, registry, payload=forged)) == ["bad_signature"]


@pytest.mark.parametrize(("text", "match"), [
    ("senders: [{sender: a, colour: red}]", "colour"),
    ("senders: [{sender: a, jurisdiction: {codes: ['SAME:099999']}}]", "SAME:099999"),
    ("senders: [{sender: a, jurisdiction: {zone: x}}]", "zone"),
    ("senders: [{sender: a, require_signature: true}]", "needs a certificate"),
    ("senders: [{sender: a, certificate: missing.pem}]", "missing.pem"),
    ("senders: [{sender: a}, {sender: A}]", "twice"),
    ("policy: lax", "lax"),
    ("senders: [{sender: a, jurisdiction: {geometry: {type: Point, coordinates: [1, 2]}}}]",
     "no area"),
    ("senders: [", "senders"),
])
def test_registry_errors(tmp_path: Path, gaz: Gazetteer, text: str, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RegistryError, match=match):
        SenderRegistry.load(path, gaz)
