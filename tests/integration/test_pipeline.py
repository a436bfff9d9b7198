"""End to end on real parts: tansu broker, redis-server, a real worker process.

Subscriptions go in through the ``subscriptions`` topic, real CAP messages through
``hazards.raw``; what comes out is checked at the outbox (what citizens would receive)
against an independent oracle computed here with shapely and pyproj.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import numpy as np
import pyproj
import pytest
import redis.asyncio as aioredis
import shapely
from shapely.geometry import Point, Polygon, shape

from channels.contacts import Contact, ContactStore
from channels.outbox import read_outbox
from ops.devstack import free_port
from ops.settings import Settings
from streams.publish import (
    hazard_record,
    produce,
    rebase_cap_times,
    subscription_records,
    tombstones,
)
from streams.records import CHANNELS, DeadLetter, Subscription, alert_key, decoder
from streams.state import AlertStore
from streams.topics import (
    ALERTS,
    DELIVERIES,
    HAZARDS_DLQ,
    HAZARDS_RAW,
    MATCH_REQUESTS,
    RECEIPTS,
    SUBSCRIPTIONS,
)
from tests.integration.pipeline_helpers import (
    read_topic,
    running_worker,
    wait_delivered,
    wait_indexed,
    wait_until,
)

pytestmark = pytest.mark.integration

THUNDERSTORM = "cap/cap12/oasiscap__spec12_A2_severe_thunderstorm.xml"
# The alert polygon as the CAP file gives it (lat,lon pairs), for the oracle.
STORM_RING = "38.47,-120.14 38.34,-119.95 38.52,-119.74 38.62,-119.89 38.47,-120.14"
STORM_KEY = alert_key("KSTO@NWS.NOAA.GOV", "KSTO1055887203")
CA_COUNTIES = [
    "06109",
    "06003",
    "06051",
    "06043",
    "06009",
    "06005",
    "06039",
    "06019",
    "06017",
    "06061",
    "06037",
    "06075",
]


def storm_polygon() -> Polygon:
    return Polygon([(float(p.split(",")[1]), float(p.split(",")[0])) for p in STORM_RING.split()])


def counties(data_dir: Path) -> dict[str, shapely.Geometry]:
    doc = json.loads((data_dir / "geodata/us_counties_fips_plotly.geojson").read_bytes())
    return {f["id"]: shapely.make_valid(shape(f["geometry"])) for f in doc["features"]}


def make_subscribers(n: int, data_dir: Path) -> tuple[list[Subscription], dict[str, Contact], set]:
    """n subscribers around the storm polygon and an oracle of (id, channel) pairs to warn."""
    rng = np.random.default_rng(2024)
    area = storm_polygon()
    local = pyproj.Transformer.from_crs(
        "EPSG:4326",
        f"+proj=aeqd +lat_0={area.centroid.y} +lon_0={area.centroid.x} +units=m",
        always_xy=True,
    ).transform
    area_m = shapely.transform(area, local, interleaved=False)
    county_geoms = counties(data_dir)
    subs: list[Subscription] = []
    contacts: dict[str, Contact] = {}
    expected: set[tuple[str, str]] = set()
    for i in range(n):
        sid = f"sub-{i:05d}"
        channels = [c for c in CHANNELS if rng.random() < 0.5] or ["email"]
        contacts[sid] = Contact(
            push_token=f"tok-{i}", phone=f"+1555{i:07d}", email=f"p{i}@example.org"
        )
        if i < int(n * 0.7):
            lon = float(rng.uniform(-120.35, -119.55))
            lat = float(rng.uniform(38.20, 38.75))
            radius = float(rng.choice([0.0, 0.0, 3000.0]))
            distance = area_m.distance(Point(*local(lon, lat)))
            if radius and abs(distance - radius) < 100:
                radius = 0.0  # keep the oracle away from its own rounding
            if radius == 0.0 and distance < 1.0 and not area.contains(Point(lon, lat)):
                continue  # on the boundary within a metre: not a fair question
            hit = area.intersects(Point(lon, lat)) if radius == 0 else distance <= radius
            sub = Subscription(
                id=sid, kind="place", lon=lon, lat=lat, radius_m=radius, channels=channels
            )  # type: ignore[arg-type]
        else:
            fips = str(rng.choice(CA_COUNTIES))
            overlap = county_geoms[fips].intersection(area).area
            if 0 < overlap < 1e-5:
                continue  # a sliver: tolerance territory, not asserted here
            hit = overlap > 0
            sub = Subscription(id=sid, kind="zone", zone=f"FIPS:{fips}", channels=channels)  # type: ignore[arg-type]
        subs.append(sub)
        if hit:
            expected.update((sid, c) for c in channels)
    return subs, contacts, expected


def settings_for(broker: str, redis_url: str, tmp_path: Path, data_dir: Path) -> Settings:
    return Settings(
        kafka_bootstrap_servers=broker,
        redis_url=redis_url,
        partitions=3,
        outbox_path=tmp_path / "outbox.jsonl",
        data_dir=data_dir,
        broker_rebalance_timeout_s=2.0,
    )


async def load(settings: Settings, subs: list[Subscription], contacts: dict[str, Contact]) -> None:
    client = aioredis.Redis.from_url(settings.redis_url)
    await ContactStore(client).put_many(contacts)
    await client.aclose()
    await produce(
        settings.kafka_bootstrap_servers, settings.topic(SUBSCRIPTIONS), subscription_records(subs)
    )


def storm_bytes(data_dir: Path) -> bytes:
    return rebase_cap_times((data_dir / THUNDERSTORM).read_bytes(), datetime.now(UTC))


async def publish(settings: Settings, *payloads: tuple[bytes, str]) -> None:
    await produce(
        settings.kafka_bootstrap_servers,
        settings.topic(HAZARDS_RAW),
        [hazard_record(p, ctype, "test", 0.0) for p, ctype in payloads],
    )


def delivered_pairs(path: Path) -> list[tuple[str, str]]:
    return [(line["subscriber_id"], line["channel"]) for line in read_outbox(path)]


def test_exactly_the_subscribers_inside_the_area_are_warned_once_per_channel(
    broker: str, redis_url: str, tmp_path: Path, data_dir: Path
) -> None:
    settings = settings_for(broker, redis_url, tmp_path, data_dir)
    subs, contacts, expected = make_subscribers(1000, data_dir)
    assert len(expected) > 100 and len(subs) > 900  # the fixture exercises both outcomes

    async def scenario() -> None:
        async with running_worker(settings, tmp_path) as worker:
            await load(settings, subs, contacts)
            await wait_indexed(settings, len(subs), worker)
            await publish(settings, (storm_bytes(data_dir), "application/cap+xml"))
            state = await wait_delivered(settings, STORM_KEY, worker)
            assert state.outcomes.get("push:failed", 0) == 0
            seen = b""
            for name in (ALERTS, MATCH_REQUESTS, RECEIPTS, *DELIVERIES.values()):
                seen += b"".join(r.value or b"" for r in await read_topic(broker, name))
            log = worker.log_path.read_bytes()
        assert b"sub-" in seen, "the pipeline topics were not read"
        for contact in contacts.values():
            for address in (contact.push_token, contact.phone, contact.email):
                assert address.encode() not in seen, "a contact detail reached a pipeline topic"
                assert address.encode() not in log, "a contact detail reached the worker log"
        # One JSON object per line, the alert id on every stage's lines (ops/logging.py).
        lines = [json.loads(line) for line in log.splitlines() if line.strip()]
        assert {x["stage"] for x in lines if x["alert_id"] == STORM_KEY} >= {"match", "send"}

    asyncio.run(scenario())
    delivered = delivered_pairs(settings.outbox_path)
    assert len(delivered) == len(set(delivered)), "someone was warned twice on one channel"
    missing = expected - set(delivered)
    extra = set(delivered) - expected
    assert not missing, f"{len(missing)} subscribers inside the area were not warned"
    assert not extra, f"{len(extra)} subscribers outside the area were warned"
    zones = {s.id for s in subs if s.kind == "zone"}
    assert any(sid in zones for sid, _ in delivered), "no county-zone subscriber was warned"


def test_bad_input_goes_to_the_dlq_with_a_reason_and_the_stream_keeps_flowing(
    broker: str, redis_url: str, tmp_path: Path, data_dir: Path
) -> None:
    metrics_port = free_port()
    settings = settings_for(broker, redis_url, tmp_path, data_dir).model_copy(
        update={"metrics_port": metrics_port}
    )
    subs = [Subscription(id="inside", kind="place", lon=-119.95, lat=38.47, channels=["sms"])]
    malformed = (
        data_dir / "cap/invalid/google-cap-library__invalid_missing_scope.cap"
    ).read_bytes()

    base = f"http://127.0.0.1:{metrics_port}"
    metrics: list[str] = []

    async def scenario() -> list[DeadLetter]:
        async with running_worker(settings, tmp_path) as worker, aiohttp.ClientSession() as http:
            await load(settings, subs, {"inside": Contact(phone="+15550000001")})
            await wait_indexed(settings, 1, worker)

            async def ready() -> bool:
                try:
                    async with http.get(f"{base}/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_until(ready, 30, "/readyz", worker.log())
            await publish(
                settings,
                (malformed, "application/cap+xml"),
                (b"\x00\x01 this is not XML or JSON \xff", ""),
                (storm_bytes(data_dir), "application/cap+xml"),
            )
            await wait_delivered(settings, STORM_KEY, worker)
            records = await read_topic(broker, settings.topic(HAZARDS_DLQ), expected=2)
            async with http.get(f"{base}/metrics") as response:
                metrics.append(await response.text())
        return [decoder(DeadLetter).decode(r.value) for r in records]

    letters = asyncio.run(scenario())
    text = metrics[0]
    assert 'tocsin_ingest_total{outcome="accepted",reason=""} 1.0' in text
    assert 'tocsin_ingest_total{outcome="rejected",reason="unknown_content_type"} 1.0' in text
    assert 'tocsin_sends_total{channel="sms",provider="outbox",status="sent"} 1.0' in text
    assert 'tocsin_end_to_end_seconds_count{channel="sms"} 1.0' in text
    assert "+15550000001" not in text
    reasons = sorted(letter.reason for letter in letters)
    assert len(letters) == 2, reasons
    assert all(letter.stage == "ingest" and letter.detail for letter in letters)
    assert any("scope" in letter.detail.lower() for letter in letters), reasons
    assert "unknown_content_type" in reasons
    assert delivered_pairs(settings.outbox_path) == [("inside", "sms")]


def test_republishing_the_same_cap_message_delivers_nothing_twice(
    broker: str, redis_url: str, tmp_path: Path, data_dir: Path
) -> None:
    settings = settings_for(broker, redis_url, tmp_path, data_dir)
    subs = [
        Subscription(
            id=f"s{i}", kind="place", lon=-119.95 + i * 0.001, lat=38.47, channels=["push", "email"]
        )  # type: ignore[list-item]
        for i in range(20)
    ]
    contacts = {s.id: Contact(push_token=f"t{s.id}", email=f"{s.id}@example.org") for s in subs}
    payload = storm_bytes(data_dir)

    async def scenario() -> None:
        async with running_worker(settings, tmp_path) as worker:
            await load(settings, subs, contacts)
            await wait_indexed(settings, len(subs), worker)
            await publish(settings, (payload, "application/cap+xml"))
            await wait_delivered(settings, STORM_KEY, worker)
            # The same message again, twice, then a marker alert to know they were processed.
            await publish(
                settings, (payload, "application/cap+xml"), (payload, "application/cap+xml")
            )
            marker = payload.replace(b"KSTO1055887203", b"KSTO1055887203-marker")
            await publish(settings, (marker, "application/cap+xml"))
            await wait_delivered(
                settings, alert_key("KSTO@NWS.NOAA.GOV", "KSTO1055887203-marker"), worker
            )

    asyncio.run(scenario())
    lines = read_outbox(settings.outbox_path)
    storm = [(x["subscriber_id"], x["channel"]) for x in lines if x["alert_key"] == STORM_KEY]
    assert len(storm) == 40 and len(set(storm)) == 40


CANCEL = """<?xml version="1.0" encoding="UTF-8"?>
<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2">
  <identifier>{identifier}</identifier>
  <sender>KSTO@NWS.NOAA.GOV</sender>
  <sent>{sent}</sent>
  <status>Actual</status>
  <msgType>Cancel</msgType>
  <scope>Public</scope>
  <references>{references}</references>
</alert>"""


def cancel_for(identifier: str, references: str) -> bytes:
    sent = datetime.now(UTC).replace(microsecond=0).isoformat()
    return CANCEL.format(identifier=identifier, sent=sent, references=references).encode()


def test_a_cancel_reaches_everyone_already_warned_and_unknown_references_are_rejected(
    broker: str, redis_url: str, tmp_path: Path, data_dir: Path
) -> None:
    settings = settings_for(broker, redis_url, tmp_path, data_dir)
    subs = [
        Subscription(
            id=f"w{i}",
            kind="place",
            lon=-119.95 + i * 0.001,
            lat=38.47,
            channels=["sms", "email"],
            language="es" if i % 2 else "en",
        )  # type: ignore[list-item]
        for i in range(10)
    ] + [Subscription(id="far", kind="place", lon=-100.0, lat=40.0, channels=["sms"])]
    contacts = {
        s.id: Contact(phone=f"+1555{i:07d}", email=f"{s.id}@example.org")
        for i, s in enumerate(subs)
    }
    storm = storm_bytes(data_dir)
    storm_sent = re.search(rb"<sent>([^<]+)</sent>", storm).group(1).decode()  # type: ignore[union-attr]
    cancel = cancel_for("KSTO-cancel-1", f"KSTO@NWS.NOAA.GOV,KSTO1055887203,{storm_sent}")
    orphan = cancel_for("KSTO-cancel-2", "KSTO@NWS.NOAA.GOV,never-sent,2020-01-01T00:00:00-00:00")
    cancel_key = alert_key("KSTO@NWS.NOAA.GOV", "KSTO-cancel-1")

    async def scenario() -> list[DeadLetter]:
        async with running_worker(settings, tmp_path) as worker:
            await load(settings, subs, contacts)
            await wait_indexed(settings, len(subs), worker)
            await publish(settings, (storm, "application/cap+xml"))
            await wait_delivered(settings, STORM_KEY, worker)
            await publish(
                settings, (orphan, "application/cap+xml"), (cancel, "application/cap+xml")
            )

            async def notices_out() -> bool:
                lines = read_outbox(settings.outbox_path)
                return sum(x["alert_key"] == cancel_key for x in lines) >= 20

            await wait_until(notices_out, 60, "cancellation notices", worker.log())
            records = await read_topic(broker, settings.topic(HAZARDS_DLQ), expected=1)
        return [decoder(DeadLetter).decode(r.value) for r in records]

    letters = asyncio.run(scenario())
    assert [x.reason for x in letters] == ["unknown_reference"]
    assert "never-sent" in letters[0].detail
    lines = read_outbox(settings.outbox_path)
    notices = [x for x in lines if x["alert_key"] == cancel_key]
    assert sorted((x["subscriber_id"], x["channel"]) for x in notices) == sorted(
        (s.id, c) for s in subs[:10] for c in ("sms", "email")
    )
    assert all("far" != x["subscriber_id"] for x in lines)
    # The storm has English text only: every notice names what was cancelled (in the
    # storm's words) and says it is cancelled in the reader's own language.
    language = {s.id: s.language or "en" for s in subs}
    word = {"en": "CANCELLED", "es": "CANCELADA", "fr": "ANNULÉE"}
    assert all(word[language[x["subscriber_id"]]] in x["body"] for x in notices)
    assert all("SEVERE THUNDERSTORM" in x["body"].upper() for x in notices)


def test_subscription_changes_reach_matching_within_a_second(
    broker: str, redis_url: str, tmp_path: Path, data_dir: Path
) -> None:
    settings = settings_for(broker, redis_url, tmp_path, data_dir)
    inside = {"kind": "place", "lat": 38.47, "channels": ["push"]}
    subs = [Subscription(id=f"old{i}", lon=-119.95 + i * 0.001, **inside) for i in range(5)]  # type: ignore[arg-type]
    contacts = {
        f"{p}{i}": Contact(push_token=f"tok-{p}{i}") for p in ("old", "new") for i in range(5)
    }
    late = [Subscription(id=f"new{i}", lon=-119.94 + i * 0.001, **inside) for i in range(2)]  # type: ignore[arg-type]

    async def scenario() -> float:
        async with running_worker(settings, tmp_path) as worker:
            await load(settings, subs, contacts)
            await wait_indexed(settings, len(subs), worker)
            client = aioredis.Redis.from_url(settings.redis_url)
            store = AlertStore(client)
            started = time.monotonic()
            # Two new subscribers and one erasure (a tombstone) on the compacted topic.
            await produce(
                settings.kafka_bootstrap_servers,
                settings.topic(SUBSCRIPTIONS),
                [*subscription_records(late), *tombstones(["old0"])],
            )

            async def visible() -> bool:
                return sum((await store.shard_sizes()).values()) == len(subs) + 1

            await wait_until(visible, 10, "the subscription changes", worker.log())
            elapsed = time.monotonic() - started
            await client.aclose()
            await publish(settings, (storm_bytes(data_dir), "application/cap+xml"))
            await wait_delivered(settings, STORM_KEY, worker)
        return elapsed

    elapsed = asyncio.run(scenario())
    assert elapsed < 1.0, f"changes took {elapsed:.2f}s to reach the matcher"
    warned = {x["subscriber_id"] for x in read_outbox(settings.outbox_path)}
    assert warned == {"old1", "old2", "old3", "old4", "new0", "new1"}
