"""The manager workflow on a real broker and Redis: rules, refusals, and what reaches Kafka.

Jurisdiction and event refusals, the two-person rule and the approval policy, Test and
Exercise flagging, cancel/correction/update as CAP messages on ``hazards.raw`` (valid
against the OASIS schema, referencing the right messages), the Atom feed, and the shape
of refusals (413 body limit, 422 validation with a readable message).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from ops.api.identity import User
from ops.settings import Settings
from streams.atom import ATOM_NS
from streams.cap import parse_cap
from streams.cap_schema import validate_schema
from streams.records import Alert
from streams.topics import HAZARDS_RAW
from tests.api.conftest import Api, composed, draft, make_settings, start_api, stop_api
from tests.integration.pipeline_helpers import read_topic

pytestmark = pytest.mark.integration

NEW_YORK = {"circle": {"lon": -74.0, "lat": 40.7, "radius_km": 5}, "desc": "Manhattan"}
# A polygon straddling the Los Angeles / Orange County line (half outside LA County).
STRADDLE = {"polygon": {"type": "Polygon", "coordinates": [[
    [-118.2, 33.85], [-117.8, 33.85], [-117.8, 33.65], [-118.2, 33.65], [-118.2, 33.85]]]}}


async def raw_alerts(api: Api, expected: int) -> list[tuple[Alert, bytes, dict[str, bytes]]]:
    records = await read_topic(api.settings.kafka_bootstrap_servers, HAZARDS_RAW, expected)
    out = []
    for rec in records:
        for alert in parse_cap(rec.value):
            out.append((alert, rec.value, dict(rec.headers)))
    return out


@pytest.mark.parametrize(("area", "why"), [
    (NEW_YORK, "outside the jurisdiction"),
    ({"codes": ["FIPS:36061"]}, "outside the jurisdiction"),
    (STRADDLE, "outside the jurisdiction"),
])
async def test_areas_outside_the_jurisdiction_are_refused(api: Api, area: dict[str, Any],
                                                          why: str) -> None:
    for method, path in (("POST", "/alerts"), ("POST", "/alerts/preview")):
        r = await api.call(method, path, "originator", json=draft(area=area))
        assert r.status_code == 403, r.text
        assert why in r.json()["detail"] and "Demo County" in r.json()["detail"]
    # Refusals are audited with the reason.
    entries = await api.ctx.audit.entries(action="alert.compose")
    assert entries and entries[-1][1].outcome == "denied"
    assert "jurisdiction" in entries[-1][1].detail


async def test_areas_inside_the_jurisdiction_in_every_form_are_accepted(api: Api) -> None:
    inside_poly = {"type": "Polygon", "coordinates": [[
        [-118.4, 34.0], [-118.2, 34.0], [-118.2, 34.15], [-118.4, 34.15], [-118.4, 34.0]]]}
    for area in ({"codes": ["SAME:006037", "FIPS:06109"]}, {"polygon": inside_poly},
                 {"circle": {"lon": -118.3, "lat": 34.05, "radius_km": 3}}):
        r = await api.call("POST", "/alerts", "originator", json=draft(area=area))
        assert r.status_code == 201, r.text


async def test_event_codes_outside_the_organisation_list_are_refused(api: Api) -> None:
    r = await api.call("POST", "/alerts", "originator", json=draft(event_code="AVW"))
    assert r.status_code == 403
    assert "event not allowed" in r.json()["detail"] and "AVW" in r.json()["detail"]
    r = await api.call("POST", "/alerts", "originator", json=draft(event_code=""))
    assert r.status_code == 403 and "no SAME event code" in r.json()["detail"]


async def test_unknown_zone_codes_and_bad_fields_are_422_with_a_message(api: Api) -> None:
    r = await api.call("POST", "/alerts", "originator", json=draft(area={"codes": ["FIPS:99999"]}))
    assert r.status_code == 422 and "unknown zone code" in r.json()["detail"]
    body = draft(severity="Catastrophic")
    del body["status"]
    r = await api.call("POST", "/alerts", "originator", json=body)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "status" in detail and "severity" in detail, detail
    r = await api.call("POST", "/alerts", "originator", json=draft(area={}))
    assert r.status_code == 422 and "needs a polygon, a circle or" in r.json()["detail"]


async def test_two_person_rule(api: Api) -> None:
    ident = api.ctx.identity
    await ident.put_user(User(id="both", name="Both Roles", org="demo-county",
                              roles=["originator", "approver"]))
    _, both = await ident.create_token("both")
    api.tokens["both"] = both
    r = await api.call("POST", "/alerts", "both", json=draft())
    rid = r.json()["id"]
    assert r.json()["needs_approval"] is True
    r = await api.call("POST", f"/alerts/{rid}/submit", "both")
    assert r.json()["state"] == "pending_approval"
    r = await api.call("POST", f"/alerts/{rid}/approve", "both", json={})
    assert r.status_code == 403 and "two-person rule" in r.json()["detail"]
    r = await api.call("POST", f"/alerts/{rid}/send", "both")
    assert r.status_code == 409 and "approved" in r.json()["detail"]
    # Someone who only edited it cannot approve either.
    rid2 = await composed(api, "draft")
    r = await api.call("PUT", f"/alerts/{rid2}", "both", json=draft(headline="Tweaked"))
    assert r.status_code == 200
    await api.call("POST", f"/alerts/{rid2}/submit", "originator")
    r = await api.call("POST", f"/alerts/{rid2}/approve", "both", json={})
    assert r.status_code == 403
    # A different approver can; that sends it.
    r = await api.call("POST", f"/alerts/{rid}/approve", "approver", json={})
    assert r.status_code == 200 and r.json()["state"] == "sent", r.text
    assert r.json()["approved_by"] == "demo-approver"
    # A Test alert needs nobody else and is flagged everywhere.
    r = await api.call("POST", "/alerts", "both", json=draft(status="Test"))
    test_id = r.json()["id"]
    assert r.json()["is_test"] is True and "TEST" in r.json()["status_banner"]
    r = await api.call("POST", f"/alerts/{test_id}/submit", "both")
    assert r.json()["state"] == "sent" and r.json()["is_test"] is True
    sent = await raw_alerts(api, 2)
    statuses = sorted(a.status for a, _, _ in sent)
    assert statuses == ["Actual", "Test"]
    for alert, payload, headers in sent:
        assert headers["source"] == b"console:demo-county"
        assert alert.sender == "oem@demo-county.tocsin.invalid"
        assert validate_schema(payload) == []
    denied = [e for _, e in await api.ctx.audit.entries(action="alert.approve", limit=1000)
              if e.outcome == "denied"]
    assert len(denied) == 2 and all(e.actor == "both" for e in denied)


async def test_approval_policy_from_a_severity_up(broker: str, redis_url: str, tmp_path: Path,
                                                  data_dir: Path) -> None:
    settings = make_settings(broker, redis_url, tmp_path, data_dir,
                             api_approval_policy="from_severity",
                             api_approval_min_severity="Severe")
    api = await start_api(settings)
    try:
        minor = await api.call("POST", "/alerts", "originator", json=draft(severity="Minor"))
        assert minor.json()["needs_approval"] is False
        r = await api.call("POST", f"/alerts/{minor.json()['id']}/submit", "originator")
        assert r.json()["state"] == "sent"
        severe = await api.call("POST", "/alerts", "originator", json=draft(severity="Extreme"))
        r = await api.call("POST", f"/alerts/{severe.json()['id']}/submit", "originator")
        assert r.json()["state"] == "pending_approval"
    finally:
        await stop_api(api)


async def test_reject_edit_resubmit_and_state_conflicts(api: Api) -> None:
    rid = await composed(api, "pending")
    r = await api.call("PUT", f"/alerts/{rid}", "originator", json=draft())
    assert r.status_code == 409 and "pending_approval" in r.json()["detail"]
    r = await api.call("POST", f"/alerts/{rid}/reject", "approver", json={"reason": "typo"})
    assert r.json()["state"] == "rejected" and r.json()["reject_reason"] == "typo"
    r = await api.call("PUT", f"/alerts/{rid}", "originator", json=draft(headline="Fixed"))
    assert r.json()["state"] == "draft"
    r = await api.call("POST", f"/alerts/{rid}/submit", "originator")
    assert r.json()["state"] == "pending_approval"
    r = await api.call("POST", f"/alerts/{rid}/submit", "originator")
    assert r.status_code == 409
    r = await api.call("GET", "/alerts/doesnotexist", "originator")
    assert r.status_code == 404 and "no alert" in r.json()["detail"]


async def test_update_cancel_and_correction_are_cap_messages_referencing_the_thread(
        api: Api) -> None:
    rid = await composed(api, "sent")
    r = await api.call("POST", f"/alerts/{rid}/update", "originator",
                       json=draft(headline="Leak contained; stay indoors one more hour"))
    upd = r.json()["id"]
    assert r.json()["kind"] == "update" and r.json()["parent"] == rid
    r = await api.call("POST", f"/alerts/{rid}/update", "originator", json=draft(status="Test"))
    assert r.status_code == 422 and "keeps the status" in r.json()["detail"]
    await api.call("POST", f"/alerts/{upd}/submit", "originator")
    r = await api.call("POST", f"/alerts/{upd}/approve", "approver", json={})
    assert r.json()["state"] == "sent" and r.json()["cap"]["msg_type"] == "Update"
    r = await api.call("POST", f"/alerts/{upd}/correct", "approver", json={})
    assert r.status_code == 200, r.text
    correction = r.json()
    assert correction["kind"] == "correction" and correction["parent"] == rid
    root = (await api.call("GET", f"/alerts/{rid}", "originator")).json()
    assert root["state"] == "corrected" and root["chain"] == [rid, upd]
    r = await api.call("POST", f"/alerts/{rid}/cancel", "originator", json={})
    assert r.status_code == 409

    sent = await raw_alerts(api, 3)
    by_type = {a.msg_type: (a, p) for a, p, _ in sent}
    original, update, cancel = (by_type[t][0] for t in ("Alert", "Update", "Cancel"))
    triple = f"{original.sender},{original.identifier},{original.sent}"
    assert update.references == [triple]
    assert cancel.references == [triple, f"{update.sender},{update.identifier},{update.sent}"]
    assert "sent in error" in cancel.note
    assert "sent in error" in cancel.infos[0].headline
    for _, payload in by_type.values():
        assert validate_schema(payload) == []
    # The CAP of each record is served, and the Atom feed lists what was issued.
    r = await api.call("GET", f"/alerts/{rid}/cap", "auditor")
    assert r.status_code == 200 and r.headers["content-type"] == "application/cap+xml"
    r = await api.client.get("/feeds/alerts.atom")
    assert r.status_code == 200
    feed = etree.fromstring(r.content)
    entries = feed.findall(f"{{{ATOM_NS}}}entry")
    assert len(entries) == 3
    link = entries[0].find(f"{{{ATOM_NS}}}link").get("href")
    item = await api.client.get(link.replace("http://api", ""))
    assert item.status_code == 200 and parse_cap(item.content)[0].msg_type == "Cancel"


async def test_withdrawing_an_unsent_alert_sends_nothing(api: Api) -> None:
    rid = await composed(api, "pending")
    r = await api.call("POST", f"/alerts/{rid}/cancel", "approver", json={"reason": "no"})
    assert r.json()["state"] == "cancelled" and r.json()["cap"] is None
    assert await raw_alerts(api, 0) == []


async def test_history_filters(api: Api) -> None:
    a = await composed(api, "draft")
    b = await composed(api, "pending")
    c = await composed(api, "draft", status="Exercise")
    r = await api.call("GET", "/alerts", "originator", params={"state": "draft"})
    assert [x["id"] for x in r.json()] == [c, a]
    r = await api.call("GET", "/alerts", "approver", params={"state": "pending_approval"})
    assert [x["id"] for x in r.json()] == [b]
    r = await api.call("GET", "/alerts", "approver", params={"status": "Exercise"})
    assert [x["id"] for x in r.json()] == [c] and r.json()[0]["is_test"] is True
    assert "EXERCISE" in r.json()[0]["status_banner"]
    r = await api.call("GET", "/alerts", "auditor", params={"since": "2999-01-01T00:00:00+00:00"})
    assert r.json() == []
    r = await api.call("GET", "/alerts", "auditor", params={"since": "yesterday"})
    assert r.status_code == 422


async def test_body_size_limits_are_413(broker: str, redis_url: str, tmp_path: Path,
                                        data_dir: Path) -> None:
    settings: Settings = make_settings(broker, redis_url, tmp_path, data_dir,
                                       api_max_body_bytes=4096, max_message_bytes=8192)
    api = await start_api(settings)
    try:
        big = draft(description="x" * 5000)
        r = await api.call("POST", "/alerts", "originator", json=big)
        assert r.status_code == 413 and "too large" in r.json()["detail"]

        async def chunks() -> Any:  # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b"<" * 1000

        r = await api.call("POST", "/ingest/cap", "agency", content=chunks())
        assert r.status_code == 413
        r = await api.call("POST", "/ingest/cap", "agency", content=b"<a>" + b" " * 6000)
        assert r.status_code == 422  # under the CAP limit: parsed and refused with a reason
    finally:
        await stop_api(api)


async def test_the_pipeline_sender_registry_is_applied_before_sending(
        broker: str, redis_url: str, tmp_path: Path, data_dir: Path) -> None:
    """With a strict ``senders_file`` the console refuses what ingest would dead-letter."""
    registry = tmp_path / "senders.yaml"
    registry.write_text("policy: strict\nsenders:\n  - sender: someone@else.invalid\n")
    settings = make_settings(broker, redis_url, tmp_path, data_dir,
                             senders_file=str(registry))
    api = await start_api(settings)
    try:
        r = await api.call("POST", "/alerts", "originator", json=draft())
        assert r.status_code == 403 and "unknown_sender" in r.json()["detail"], r.text
        registry.write_text("policy: strict\nsenders:\n"
                            "  - sender: oem@demo-county.tocsin.invalid\n"
                            "    jurisdiction: {codes: ['FIPS:06037']}\n")
    finally:
        await stop_api(api)
    api = await start_api(settings)
    try:
        r = await api.call("POST", "/alerts", "originator",
                           json=draft(area={"codes": ["FIPS:06109"]}))
        assert r.status_code == 403 and "pipeline registry" in r.json()["detail"]
        r = await api.call("POST", "/alerts", "originator", json=draft())
        assert r.status_code == 201, r.text
    finally:
        await stop_api(api)
