"""Abuse limits (429 with Retry-After per IP, token and citizen) and the k-anonymous
public transparency endpoint."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from shapely.geometry import box

from geofencing.areas import geometry_to_wkb
from ops.api import create_app
from ops.api.public import Count, protect
from streams.records import Alert, Area, Info, Receipt, RecipientResult
from tests.api.conftest import Api, make_settings, start_api, stop_api

pytestmark = pytest.mark.integration
K = 10


async def test_rate_limits_answer_429_with_retry_after(broker: str, redis_url: str,
                                                       tmp_path: Path, data_dir: Path) -> None:
    settings = make_settings(broker, redis_url, tmp_path, data_dir, api_rate_public_per_min=3,
                             api_rate_token_per_min=5, api_rate_citizen_per_min=2)
    api = await start_api(settings)
    try:
        codes = [(await api.client.get("/public/alerts")).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = await api.client.get("/feeds/alerts.atom")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "this IP address" in r.json()["detail"] and "3 requests per minute" in \
            r.json()["detail"]
        # Another address has its own bucket.
        app = create_app(settings, context=api.ctx)
        other = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("10.9.8.7", 1)),
                                  base_url="http://api")
        assert (await other.get("/public/alerts")).status_code == 200
        await other.aclose()
        # Per token: the originator's token runs out, the approver's does not.
        codes = [(await api.call("GET", "/me", "originator")).status_code for _ in range(6)]
        assert codes == [200] * 5 + [429]
        r = await api.call("GET", "/me", "originator")
        assert "this token" in r.json()["detail"] and "retry-after" in r.headers
        assert (await api.call("GET", "/me", "approver")).status_code == 200
        # Citizen endpoints, per IP.
        codes = [(await api.client.post("/citizens", json={})).status_code for _ in range(3)]
        assert codes == [201, 201, 429]
    finally:
        await stop_api(api)


def test_protect_suppresses_small_counts_and_small_complements() -> None:
    assert protect(9, K) == Count(value=None, suppressed=True)
    assert protect(0, K).suppressed
    parent = protect(25, K)
    assert protect(20, K, parent).suppressed  # 25 - 20 = 5 people singled out
    assert protect(25, K, parent).value == 25  # the whole group: nobody singled out
    assert protect(15, K, parent).value == 15
    assert protect(15, K, Count(value=None, suppressed=True)).suppressed


def _alert(ident: str, *, status: str = "Actual", event: str, minutes_ago: int,
           bbox: tuple[float, float, float, float]) -> Alert:
    sent = (datetime.now(UTC) - timedelta(minutes=minutes_ago)).replace(microsecond=0)
    info = Info(event=event, severity="Severe", headline=f"{event} warning",
                sender_name="Demo County", expires=(sent + timedelta(hours=6)).isoformat(),
                areas=[Area(desc=f"{event} area")])
    return Alert(identifier=ident, sender="oem@demo-county.tocsin.invalid",
                 sent=sent.isoformat(), status=status, msg_type="Alert", scope="Public",
                 infos=[info], geometry_wkb=geometry_to_wkb(box(*bbox)),
                 received_at=sent.timestamp())


LA = (-118.4, 33.9, -118.2, 34.1)  # inside Los Angeles County
MD = (-77.2, 39.0, -77.1, 39.1)  # inside Montgomery County, Maryland
# counters per alert: matched (people reached), per channel (matched, sent)
CASES: dict[str, dict[str, Any]] = {
    "big": dict(bbox=LA, event="Flood", reached=120,
                ch={"push": (100, 100), "sms": (60, 45), "email": (14, 14)}),
    "edge": dict(bbox=LA, event="Fire", reached=25,
                 ch={"push": (20, 20), "sms": (3, 3), "email": (12, 8)}),
    "tiny": dict(bbox=MD, event="Flood", reached=7, ch={"push": (7, 7)}),
    "live": dict(bbox=MD, event="Fire", reached=40, ch={"push": (40, 12)}, complete=False),
    "drill": dict(bbox=LA, event="Flood", reached=30, ch={"push": (30, 30)}, status="Exercise"),
}


async def _load_alerts(api: Api) -> dict[str, Alert]:
    alerts = {}
    for n, (name, case) in enumerate(CASES.items()):
        alert = _alert(name, status=case.get("status", "Actual"), event=case["event"],
                       minutes_ago=10 * (n + 1), bbox=case["bbox"])
        await api.ctx.alerts.register(alert)
        partitions = api.settings.partitions
        for p in range(partitions):  # every shard answers
            per = {c: (m if p == 0 else 0) for c, (m, _) in case["ch"].items()}
            await api.ctx.alerts.add_matched(
                alert.key, per, case["reached"] if p == 0 else 0, partition=p
            )
        for channel, (matched, sent) in case["ch"].items():
            settled = matched if case.get("complete", True) else sent
            results = [RecipientResult(f"sub-{name}-{i}", "sent" if i < sent else "failed")
                       for i in range(settled)]
            await api.ctx.alerts.apply_receipt(Receipt(alert.key, channel, "outbox", results))
        alerts[name] = alert
    return alerts


def _numbers(entry: dict[str, Any]) -> list[tuple[str, Any]]:
    """Every published count of an entry, with its path."""
    reach = entry["reach"]
    if not reach["final"]:
        return []
    out = [("reached", reach["reached"])]
    for channel, counts in reach["channels"].items():
        out += [(f"{channel}.{k}", v) for k, v in counts.items()]
    return out


async def test_public_reach_is_k_anonymous_under_every_filter_combination(api: Api) -> None:
    alerts = await _load_alerts(api)
    name_of = {a.key: n for n, a in alerts.items()}
    r = await api.client.get("/public/alerts", params={"include_tests": True})
    assert r.status_code == 200
    first_view = {name_of[e["key"]]: e for e in r.json()["alerts"]}
    assert set(first_view) == set(CASES)
    big, edge, tiny, live = (first_view[n]["reach"] for n in ("big", "edge", "tiny", "live"))
    assert big["reached"]["value"] == 120
    assert big["channels"]["push"]["matched"]["value"] == 100
    assert big["channels"]["sms"]["sent"]["value"] == 45
    assert big["channels"]["sms"]["not_sent"]["value"] == 15
    assert big["channels"]["email"]["matched"]["value"] == 14
    assert edge["channels"]["push"]["matched"] == {"value": None, "suppressed": True}
    assert edge["channels"]["sms"]["matched"]["suppressed"]
    assert edge["channels"]["email"]["matched"]["value"] == 12
    assert edge["channels"]["email"]["sent"]["suppressed"]  # 8 sent, 4 not: both hidden
    assert tiny["reached"]["suppressed"]
    assert live == {"final": False}
    assert first_view["drill"]["is_test"] and "EXERCISE" in first_view["drill"]["status_banner"]

    now = datetime.now(UTC)
    filters = {
        "since": ["", (now - timedelta(minutes=25)).isoformat()],
        "until": ["", (now - timedelta(minutes=15)).isoformat()],
        "status": ["", "Actual", "Exercise"], "event": ["", "Flood", "fire"],
        "zone": ["", "FIPS:06037", "SAME:024031"], "include_tests": [False, True],
    }
    seen_sets = set()
    for combo in itertools.product(*filters.values()):
        params = {k: v for k, v in zip(filters, combo, strict=True) if v != ""}
        r = await api.client.get("/public/alerts", params=params)
        assert r.status_code == 200, (params, r.text)
        body = r.json()
        assert set(body) == {"k", "note", "alerts"}, "no totals across alerts are served"
        seen_sets.add(tuple(sorted(name_of[e["key"]] for e in body["alerts"])))
        for entry in body["alerts"]:
            # A filter chooses alerts; it never changes (splits) an alert's numbers.
            assert entry["reach"] == first_view[name_of[entry["key"]]]["reach"], params
            for path, count in _numbers(entry):
                assert count["value"] is None or count["value"] >= K, (params, path)
                assert count["suppressed"] == (count["value"] is None)
            if entry["reach"]["final"]:
                total = entry["reach"]["reached"]["value"]
                for channel in entry["reach"]["channels"].values():
                    m = channel["matched"]["value"]
                    if m is not None and total is not None:
                        assert total - m == 0 or total - m >= K
                    s, ns = channel["sent"]["value"], channel["not_sent"]["value"]
                    assert (s is None) == (ns is None)
    assert len(seen_sets) > 5, "the filters did not actually select different alerts"
    # Nothing about people: no subscriber ids or addresses anywhere.
    assert b"sub-" not in r.content and b"@example" not in r.content
    page = await api.client.get("/public", params={"include_tests": True})
    assert page.status_code == 200 and "&lt;k" in page.text and "[EXERCISE]" in page.text


async def test_public_timing_comes_from_the_receipts_topic(api: Api) -> None:
    from streams.publish import produce
    from streams.records import encode
    from streams.topics import RECEIPTS
    from tests.api.conftest import wait_for

    alerts = await _load_alerts(api)
    key = alerts["big"].key
    receipts = [Receipt(key, "push", "outbox", [RecipientResult("s1", "sent")], sent_at=t)
                for t in (1000.0, 1003.5, 1001.0)]
    await produce(api.settings.kafka_bootstrap_servers, RECEIPTS,
                  [(key.encode(), encode(rc), []) for rc in receipts])

    async def timed() -> bool:
        return await api.ctx.times.get(key) == (1000.0, 1003.5)

    await wait_for(timed, 20, "delivery times from the receipts topic")
    r = await api.client.get("/public/alerts")
    entry = next(e for e in r.json()["alerts"] if e["key"] == key)
    assert entry["timing"]["first_delivery"] == "1970-01-01T00:16:40+00:00"
    assert entry["timing"]["last_delivery"] == "1970-01-01T00:16:43+00:00"
    assert entry["area"]["type"] == "Polygon"
