"""The pipeline's stage functions without Kafka, on a real redis-server and real data."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from geofencing.gazetteer import default_gazetteer
from streams.authority import SenderRegistry
from streams.pipeline import Ingestor, detect_content_type, match, scatter
from streams.publish import rebase_cap_times
from streams.records import Receipt, RecipientResult, Subscription, encode
from streams.shards import Shard
from streams.state import AlertStore

pytestmark = pytest.mark.integration
STORM = "cap/cap12/oasiscap__spec12_A2_severe_thunderstorm.xml"
AMBER = "cap/cap12/oasiscap__spec12_A4_amber_multilingual.xml"


@pytest.fixture
async def ingestor(redis_url: str, data_dir: Path):  # type: ignore[no-untyped-def]
    client = aioredis.Redis.from_url(redis_url)
    yield Ingestor(default_gazetteer(data_dir), AlertStore(client))
    await client.aclose()


def now_bytes(data_dir: Path, rel: str) -> bytes:
    return rebase_cap_times((data_dir / rel).read_bytes(), datetime.now(UTC))


async def test_a_live_cap_alert_is_accepted_with_its_area_resolved(
    ingestor: Ingestor, data_dir: Path
) -> None:
    outcome = await ingestor.ingest(
        now_bytes(data_dir, STORM), {"content-type": b"application/cap+xml"}
    )
    assert not outcome.dead
    [alert] = outcome.alerts
    assert alert.identifier == "KSTO1055887203" and alert.geometry_wkb
    assert alert.max_severity == "Severe"


async def test_geocode_only_alert_resolves_through_the_county_gazetteer(
    ingestor: Ingestor, data_dir: Path
) -> None:
    outcome = await ingestor.ingest(now_bytes(data_dir, AMBER), {})
    [alert] = outcome.alerts
    assert alert.geometry_wkb, "SAME 006037 (Los Angeles County) must resolve"


async def test_the_historical_file_as_published_is_rejected_as_expired(
    ingestor: Ingestor, data_dir: Path
) -> None:
    outcome = await ingestor.ingest((data_dir / STORM).read_bytes(), {})
    assert [d.reason for d in outcome.dead] == ["expired"]
    assert not outcome.alerts


async def test_republished_message_is_a_duplicate_and_a_reused_identifier_a_conflict(
    ingestor: Ingestor, data_dir: Path
) -> None:
    payload = now_bytes(data_dir, STORM)
    first = await ingestor.ingest(payload, {})
    again = await ingestor.ingest(payload, {})
    assert len(first.alerts) == 1 and not again.alerts and again.duplicates == 1
    later = rebase_cap_times(payload, datetime.now(UTC) + timedelta(minutes=5))
    reused = await ingestor.ingest(later, {})
    assert [d.reason for d in reused.dead] == ["identifier_reused"]


async def test_an_alert_with_no_routable_area_goes_to_the_dlq(ingestor: Ingestor) -> None:
    event = {
        "identifier": "x-1", "sender": "sensor@example.org", "sent": "2099-01-01T00:00:00+00:00",
        "status": "Actual", "msgType": "Alert", "scope": "Public", "event": "Flood",
        "severity": "Severe", "urgency": "Immediate", "certainty": "Observed",
        "category": "Met",
        "area": {"geocodes": [{"valueName": "SAME", "value": "999999"}]},
    }  # fmt: skip
    outcome = await ingestor.ingest(
        json.dumps(event).encode(), {"content-type": b"application/json"}
    )
    assert [d.reason for d in outcome.dead] == ["no_routable_area"]
    assert "999999" in outcome.dead[0].detail


async def test_garbage_and_hostile_xml_are_rejected_with_reasons(ingestor: Ingestor) -> None:
    garbage = await ingestor.ingest(b"\x00\x01\x02", {})
    assert [d.reason for d in garbage.dead] == ["unknown_content_type"]
    xxe = b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><a>&x;</a>'
    hostile = await ingestor.ingest(xxe, {})
    assert [d.reason for d in hostile.dead] == ["doctype_forbidden"]
    assert b"root:" not in encode(hostile.dead[0])


def test_content_type_detection() -> None:
    assert detect_content_type(b"\xef\xbb\xbf<alert/>") == "xml"
    assert detect_content_type(b' {"a": 1}') == "json"
    assert detect_content_type(b"{}", "application/cap+xml; charset=utf-8") == "xml"
    assert detect_content_type(b"hello") == ""


async def test_scatter_and_match_honour_severity_and_test_opt_in(
    ingestor: Ingestor, data_dir: Path
) -> None:
    [alert] = (await ingestor.ingest(now_bytes(data_dir, STORM), {})).alerts
    requests = scatter(alert, 4, time.time())
    assert [p for p, _ in requests] == [0, 1, 2, 3]
    shard = Shard()
    inside = {"kind": "place", "lon": -119.95, "lat": 38.47, "channels": ["push", "sms"]}
    for sid, extra in {
        "everyone": {},
        "extreme-only": {"min_severity": "Extreme"},
        "outside": {"lon": -100.0},
        "zone": {"kind": "zone", "zone": "FIPS:06109", "lon": None, "lat": None},
    }.items():
        shard.apply(sid, encode(Subscription(id=sid, **{**inside, **extra})))  # type: ignore[arg-type]
    shard.apply("zone", None)  # a tombstone erases it
    view = await shard.view(ingestor.gazetteer)
    batches, counts, n = match(requests[0][1], view, batch_size=500, partition=0)
    assert n == 1 and counts == {"push": 1, "sms": 1}
    assert {r.subscriber_id for b in batches for r in b.recipients} == {"everyone"}
    test_request = requests[0][1]
    test_request.status = "Test"
    assert match(test_request, view, batch_size=500, partition=0)[2] == 0


def test_a_malformed_subscription_record_is_rejected_not_fatal() -> None:
    shard = Shard()
    assert shard.apply("a", b"{not json") is not None
    other = encode(Subscription(id="b", kind="place", lon=1, lat=1))
    assert shard.apply("a", other) == "subscription id does not match the record key"
    assert shard.subscriptions == {} and shard.rejected == 2


async def test_update_and_cancel_must_reference_a_known_unexpired_alert(
    ingestor: Ingestor, data_dir: Path
) -> None:
    sent = datetime.now(UTC).replace(microsecond=0)
    template = (
        '<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2"><identifier>{i}</identifier>'
        "<sender>s@example.org</sender><sent>{sent}</sent><status>Actual</status>"
        "<msgType>{t}</msgType><scope>Public</scope>{refs}"
        "<info><category>Met</category><event>Flood</event><urgency>Immediate</urgency>"
        "<severity>Severe</severity><certainty>Observed</certainty><expires>{exp}</expires>"
        "<area><areaDesc>x</areaDesc><geocode><valueName>SAME</valueName>"
        "<value>006075</value></geocode></area></info></alert>"
    )

    def cap(i: str, t: str, refs: str = "", exp: datetime | None = None) -> bytes:
        expires = (exp or sent + timedelta(hours=1)).isoformat()
        ref_xml = f"<references>{refs}</references>" if refs else ""
        return template.format(i=i, sent=sent.isoformat(), t=t, refs=ref_xml, exp=expires).encode()

    first = await ingestor.ingest(cap("a1", "Alert"), {})
    assert first.alerts
    update = await ingestor.ingest(cap("a2", "Update", f"s@example.org,a1,{sent.isoformat()}"), {})
    assert update.alerts and not update.dead
    orphan = await ingestor.ingest(
        cap("a3", "Update", "s@example.org,zz,2020-01-01T00:00:00-00:00"), {}
    )
    assert [d.reason for d in orphan.dead] == ["unknown_reference"]
    # An alert that has expired since it was registered cannot be updated any more.
    short = await ingestor.ingest(cap("b1", "Alert", exp=sent + timedelta(seconds=1)), {})
    assert short.alerts
    ingestor.clock = lambda: time.time() + 5
    late = await ingestor.ingest(cap("b2", "Cancel", f"s@example.org,b1,{sent.isoformat()}"), {})
    assert [d.reason for d in late.dead] == ["reference_expired"]
    # A Cancel marks what it references as cancelled.
    cancel = await ingestor.ingest(cap("a4", "Cancel", f"s@example.org,a2,{sent.isoformat()}"), {})
    assert cancel.alerts
    assert await ingestor.store.cancelled_by(update.alerts[0].key) == cancel.alerts[0].key


async def test_quiet_hours_hold_back_moderate_alerts_but_not_severe_ones(
    ingestor: Ingestor, data_dir: Path
) -> None:
    [alert] = (await ingestor.ingest(now_bytes(data_dir, STORM), {})).alerts
    [(_, request)] = scatter(alert, 1, time.time())
    shard = Shard()
    hour = datetime.now(UTC).hour
    window = f"{(hour - 1) % 24:02d}:00-{(hour + 2) % 24:02d}:00"  # around now, may wrap
    always_quiet = {"quiet_hours": window, "timezone": "UTC"}
    for sid in ("sleeper", "awake"):
        extra = always_quiet if sid == "sleeper" else {}
        sub = Subscription(id=sid, kind="place", lon=-119.95, lat=38.47, channels=["sms"], **extra)  # type: ignore[arg-type]
        shard.apply(sid, encode(sub))
    view = await shard.view(ingestor.gazetteer)
    assert match(request, view, batch_size=10, partition=0)[2] == 2  # Severe overrides
    request.severity = "Moderate"
    batches, _, n = match(request, view, batch_size=10, partition=0)
    assert n == 1 and [r.subscriber_id for r in batches[0].recipients] == ["awake"]


async def test_extreme_or_immediate_alerts_take_the_priority_lane(
    ingestor: Ingestor, data_dir: Path
) -> None:
    [storm] = (await ingestor.ingest(now_bytes(data_dir, STORM), {})).alerts
    assert storm.urgent  # the NWS storm is Immediate
    [(_, request)] = scatter(storm, 1, time.time())
    shard = Shard()
    shard.apply(
        "x", encode(Subscription(id="x", kind="place", lon=-119.95, lat=38.47, channels=["sms"]))
    )
    batches, _, _ = match(request, await shard.view(ingestor.gazetteer), batch_size=10, partition=0)
    assert batches and all(b.urgent for b in batches)
    routine = now_bytes(data_dir, STORM).replace(b"Immediate", b"Expected")
    routine = routine.replace(b"KSTO1055887203", b"KSTO-routine")
    [watch] = (await ingestor.ingest(routine, {})).alerts
    assert not watch.urgent  # Severe but Expected: the routine lane


async def test_the_sender_registry_bounds_who_may_alert_where(
    redis_url: str, data_dir: Path, tmp_path: Path
) -> None:
    registry_file = tmp_path / "senders.yaml"
    registry_file.write_text(
        "policy: strict\n"
        "senders:\n"
        "  - sender: KSTO@NWS.NOAA.GOV\n"
        "    jurisdiction: {codes: ['FIPS:06109', 'FIPS:06003', 'FIPS:06009']}\n"
        "    event_codes: [SVR]\n"
        "  - sender: KAR0@example.org\n"
        "    jurisdiction: {codes: ['FIPS:06075']}\n"  # San Francisco, not Los Angeles
    )
    gazetteer = default_gazetteer(data_dir)
    client = aioredis.Redis.from_url(redis_url)
    ingestor = Ingestor(
        gazetteer, AlertStore(client), senders=SenderRegistry.load(registry_file, gazetteer)
    )
    try:
        storm = await ingestor.ingest(now_bytes(data_dir, STORM), {})
        assert storm.alerts and not storm.dead  # inside its jurisdiction, allowed event
        amber = await ingestor.ingest(now_bytes(data_dir, AMBER), {})
        assert [d.reason for d in amber.dead] == ["unknown_sender"]
        moved = now_bytes(data_dir, AMBER).replace(b"<sender>", b"<sender>KAR0@example.org<x>")
        moved = re.sub(rb"<sender>KAR0@example.org<x>[^<]*", b"<sender>KAR0@example.org", moved)
        outside = await ingestor.ingest(moved, {})
        assert [d.reason for d in outside.dead] == ["outside_jurisdiction"]
    finally:
        await client.aclose()


async def test_counters_survive_at_least_once_redelivery(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    store = AlertStore(client)
    try:
        # Shard 0 answers twice (its match request was redelivered), shard 1 once.
        await store.add_matched("k", {"sms": 3}, 3, partition=0)
        await store.add_matched("k", {"sms": 3}, 3, partition=0)
        await store.add_matched("k", {"sms": 2}, 2, partition=1)
        receipt = Receipt(
            "k", "sms", "outbox", [RecipientResult(f"s{i}", "sent") for i in range(5)]
        )
        await store.apply_receipt(receipt)
        # The same batch again after a crash: every recipient now reports "duplicate".
        again = Receipt(
            "k", "sms", "outbox", [RecipientResult(f"s{i}", "duplicate") for i in range(5)]
        )
        await store.apply_receipt(again)
        progress = await store.progress("k", partitions=2)
        assert progress.matched == 5 and progress.expected == {"sms": 5}
        assert progress.outcomes == {"sms:sent": 5} and progress.complete
    finally:
        await client.aclose()
