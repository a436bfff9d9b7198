"""What operators see: delivery metrics, consumer lag and structured logs, on real parts.

- the sender's and rate limiter's events reach Prometheus (real redis-server);
- consumer lag is computed right on tansu, whose ListOffsets under-reports the end of a
  partition after a batched produce (real broker, real aiokafka consumer);
- a real worker process serves every stage's metrics on /metrics, samples its lag, and
  writes JSON log lines that carry the alert id and no contact detail.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client import REGISTRY

from channels.base import OutgoingMessage, ProviderError, SendResult
from channels.contacts import Contact, ContactStore
from channels.events import set_delivery_events
from channels.idempotency import IdempotencyGuard
from channels.ratelimit import RateLimiter
from channels.sender import send_batch
from ops.devstack import free_port
from ops.metrics import (
    CONSUMER_LAG,
    PrometheusDeliveryEvents,
    consumer_lag,
    record_consumer_lag,
)
from ops.settings import Settings
from streams.publish import hazard_record, produce, rebase_cap_times, subscription_records
from streams.records import Alert, Channel, DeliveryBatch, Info, Recipient, Subscription, alert_key
from streams.topics import DELIVERIES, HAZARDS_RAW, SUBSCRIPTIONS, URGENT_DELIVERIES, ensure_topics
from templates.render import Renderer
from tests.integration.pipeline_helpers import (
    read_topic,
    running_worker,
    wait_delivered,
    wait_indexed,
    wait_until,
)

pytestmark = pytest.mark.integration


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def prometheus_events() -> Iterator[None]:
    previous = set_delivery_events(PrometheusDeliveryEvents())
    yield
    set_delivery_events(previous)


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


class Primary:
    """Down on the first call; then one dead number, one permanent rejection, rest sent."""

    name = "obs-primary"
    channel: Channel = "sms"

    def __init__(self) -> None:
        self.calls = 0

    async def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        self.calls += 1
        if self.calls == 1:
            raise ProviderError("503 upstream", retriable=True)
        results = []
        for m in messages:
            if m.subscriber_id == "s0":
                results.append(SendResult(m.subscriber_id, ok=False, invalid_address=True))
            elif m.subscriber_id == "s1":
                results.append(SendResult(m.subscriber_id, ok=False, error="carrier says no"))
            else:
                results.append(SendResult(m.subscriber_id, ok=True))
        return results

    async def aclose(self) -> None:
        pass


class Backup:
    name = "obs-backup"
    channel: Channel = "sms"

    async def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        return [SendResult(m.subscriber_id, ok=True) for m in messages]

    async def aclose(self) -> None:
        pass


async def test_sender_and_rate_limiter_report_to_prometheus(
    r: aioredis.Redis, prometheus_events: None
) -> None:
    alert = Alert(
        identifier="OBS-1", sender="ops", sent="2024-05-01T10:00:00+00:00", status="Test",
        msg_type="Alert", scope="Public",
        infos=[Info(language="en-US", event="Flood Warning", headline="Flooding")],
    )  # fmt: skip
    ids = [f"s{i}" for i in range(5)]
    await ContactStore(r).put_many({s: Contact(phone=f"+1555000000{i}") for i, s in enumerate(ids)})
    batch = DeliveryBatch(alert.key, "sms", [Recipient(s, "en-US") for s in ids])
    p, b = ("sms", "obs-primary"), ("sms", "obs-backup")
    before = {
        "attempts": sample("tocsin_provider_attempts_total", channel=p[0], provider=p[1]),
        "retries": sample("tocsin_send_retries_total", channel=p[0], provider=p[1]),
        "failover": sample("tocsin_send_failovers_total", channel=b[0], provider=b[1]),
        "down": sample("tocsin_provider_failures_total", channel="sms", provider=p[1],
                       kind="retriable"),
        "dead": sample("tocsin_provider_failures_total", channel="sms", provider=p[1],
                       kind="invalid_address"),
        "rejected": sample("tocsin_provider_failures_total", channel="sms", provider=p[1],
                           kind="permanent"),
    }  # fmt: skip

    receipt = await send_batch(
        batch, alert, contacts=ContactStore(r), guard=IdempotencyGuard(r, 3600, 5.0),
        providers=[Primary(), Backup()], renderer=Renderer(),
        backoff_base_s=0.001, backoff_max_s=0.01,
    )  # fmt: skip

    statuses = {x.subscriber_id: x.status for x in receipt.results}
    assert statuses == {"s0": "failed", "s1": "sent", "s2": "sent", "s3": "sent", "s4": "sent"}
    after = {
        "attempts": sample("tocsin_provider_attempts_total", channel=p[0], provider=p[1]),
        "retries": sample("tocsin_send_retries_total", channel=p[0], provider=p[1]),
        "failover": sample("tocsin_send_failovers_total", channel=b[0], provider=b[1]),
        "down": sample("tocsin_provider_failures_total", channel="sms", provider=p[1],
                       kind="retriable"),
        "dead": sample("tocsin_provider_failures_total", channel="sms", provider=p[1],
                       kind="invalid_address"),
        "rejected": sample("tocsin_provider_failures_total", channel="sms", provider=p[1],
                           kind="permanent"),
    }  # fmt: skip
    delta = {k: after[k] - before[k] for k in before}
    # 5 handed over and refused as a whole (503), the same 5 retried: 1 dead number,
    # 1 rejected, 3 sent; the rejected one moves on to the backup.
    assert delta == {
        "attempts": 10, "retries": 5, "failover": 1, "down": 5, "dead": 1, "rejected": 1,
    }  # fmt: skip

    # A bucket of 1 message at 20/s: three messages wait for two refills.
    waits = sample("tocsin_ratelimit_waits_total", provider="obs-bucket")
    seconds = sample("tocsin_ratelimit_wait_seconds_total", provider="obs-bucket")
    limiter = RateLimiter(r, "obs-bucket", rate=20, burst=1)
    for _ in range(3):
        await limiter.acquire()
    assert sample("tocsin_ratelimit_waits_total", provider="obs-bucket") - waits >= 2
    waited = sample("tocsin_ratelimit_wait_seconds_total", provider="obs-bucket") - seconds
    assert 0.05 < waited < 2.0


class AiokafkaConsumerView:
    """The part of faust's consumer that ``consumer_lag`` reads, over a plain aiokafka
    consumer (faust's own driver delegates these very calls to one)."""

    def __init__(self, consumer: AIOKafkaConsumer, committed: dict, read: dict) -> None:
        self.consumer = consumer
        self._committed_offset = committed
        self._read_offset = read

    def assignment(self) -> set[TopicPartition]:
        return self.consumer.assignment()

    async def highwaters(self, *tps: TopicPartition) -> dict[TopicPartition, int]:
        return await self.consumer.end_offsets(list(tps))

    async def earliest_offsets(self, *tps: TopicPartition) -> dict[TopicPartition, int]:
        return await self.consumer.beginning_offsets(list(tps))

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.consumer.highwater(tp)


async def test_consumer_lag_survives_tansu_under_reporting_the_end_offset(broker: str) -> None:
    await ensure_topics(broker, partitions=2)
    producer = AIOKafkaProducer(bootstrap_servers=broker, linger_ms=100)
    await producer.start()
    try:  # one batch of 500 records on partition 0, one record on partition 1
        sent = [await producer.send(HAZARDS_RAW, b"x", partition=0) for _ in range(500)]
        await asyncio.gather(*sent, await producer.send(HAZARDS_RAW, b"y", partition=1))
    finally:
        await producer.stop()
    tp0, tp1 = TopicPartition(HAZARDS_RAW, 0), TopicPartition(HAZARDS_RAW, 1)
    consumer = AIOKafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp0, tp1])
        await consumer.seek_to_beginning(tp0, tp1)
        listed = await consumer.end_offsets([tp0, tp1])
        view = AiokafkaConsumerView(consumer, committed={tp0: 100}, read={})
        last_read: dict[TopicPartition, int] = {}
        while sum(last_read.values()) < 499:
            for tp, records in (await consumer.getmany(timeout_ms=1000)).items():
                last_read[tp] = records[-1].offset
        view._read_offset = last_read
        lags = await consumer_lag(view)
        await record_consumer_lag(view)
        gauge = sample("tocsin_consumer_lag", topic=HAZARDS_RAW, partition="0")
        consumer.assign([tp1])  # a rebalance took partition 0 away
        await record_consumer_lag(view)
    finally:
        await consumer.stop()
    # Kafka lists 500; tansu lists the last batch's base offset + 1, here 1, so end
    # offset - committed alone would say "no lag" with 400 records unprocessed.
    assert listed[tp0] in (1, 500)
    # 500 records, the first 100 committed: 400 behind, wherever the broker's count is.
    assert lags == {(HAZARDS_RAW, 0): 400, (HAZARDS_RAW, 1): 1}  # partition 1: not committed
    assert gauge == 400
    series = {s.labels["partition"] for m in CONSUMER_LAG.collect() for s in m.samples}
    assert series == {"1"}, "a revoked partition's lag must not linger"


THUNDERSTORM = "cap/cap12/oasiscap__spec12_A2_severe_thunderstorm.xml"
STORM_KEY = alert_key("KSTO@NWS.NOAA.GOV", "KSTO1055887203")
PHONE, EMAIL = "+15550000001", "inside.citizen@example.org"


def test_a_worker_exposes_every_stage_and_logs_json_with_the_alert_id(
    broker: str, redis_url: str, tmp_path: Path, data_dir: Path
) -> None:
    from datetime import UTC, datetime

    port = free_port()
    settings = Settings(
        kafka_bootstrap_servers=broker, redis_url=redis_url, partitions=3,
        outbox_path=tmp_path / "outbox.jsonl", data_dir=data_dir,
        broker_rebalance_timeout_s=2.0, metrics_port=port, consumer_lag_interval_s=0.5,
        log_format="json",
    )  # fmt: skip
    sub = Subscription(id="inside", kind="place", lon=-119.95, lat=38.47, channels=["sms", "email"])
    storm = rebase_cap_times((data_dir / THUNDERSTORM).read_bytes(), datetime.now(UTC))
    metrics: list[str] = []

    async def scrape(http: aiohttp.ClientSession) -> str:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
            metrics.append(await response.text())
        return metrics[-1]

    async def scenario() -> None:
        async with running_worker(settings, tmp_path) as worker, aiohttp.ClientSession() as http:
            client = aioredis.Redis.from_url(redis_url)
            await ContactStore(client).put("inside", Contact(phone=PHONE, email=EMAIL))
            await client.aclose()
            await produce(broker, SUBSCRIPTIONS, subscription_records([sub]))
            await wait_indexed(settings, 1, worker)
            await produce(broker, HAZARDS_RAW, [hazard_record(storm, "application/cap+xml",
                                                              "test", 0.0)])  # fmt: skip
            await wait_delivered(settings, STORM_KEY, worker)
            # Redeliver one SMS batch, as Kafka may after a crash: an idempotency hit.
            for topic in (DELIVERIES["sms"], URGENT_DELIVERIES["sms"]):
                records = await read_topic(broker, topic)
                if records:
                    await produce(broker, topic, [(records[0].key, records[0].value, [])])
                    break

            async def settled() -> bool:
                try:
                    text = await scrape(http)
                except aiohttp.ClientError:
                    return False
                raw_lag = f'tocsin_consumer_lag{{partition="0",topic="{HAZARDS_RAW}"}}'
                lags = [line for line in text.splitlines() if line.startswith(raw_lag)]
                return (
                    'tocsin_idempotency_hits_total{channel="sms"} 1.0' in text
                    and bool(lags)
                    and all(line.endswith(" 0.0") for line in lags)
                )

            await wait_until(settled, 60, "idempotency hit and a drained hazards.raw", worker.log())

    asyncio.run(scenario())
    text = metrics[-1]
    for expected in (
        'tocsin_ingest_total{outcome="accepted",reason=""} 1.0',
        "tocsin_match_seconds_count 3.0",
        "tocsin_match_reach_count 3.0",
        "tocsin_match_reach_sum 1.0",
        'tocsin_matched_total{channel="sms"} 1.0',
        'tocsin_provider_attempts_total{channel="sms",provider="outbox"} 1.0',
        'tocsin_provider_attempts_total{channel="email",provider="outbox"} 1.0',
        'tocsin_sends_total{channel="sms",provider="outbox",status="sent"} 1.0',
        'tocsin_sends_total{channel="sms",provider="outbox",status="duplicate"} 1.0',
        'tocsin_receipts_total{channel="email",status="sent"} 1.0',
        'tocsin_end_to_end_seconds_count{channel="sms"} 2.0',
    ):
        assert expected in text, expected
    assert f'tocsin_consumer_lag{{partition="2",topic="{DELIVERIES["sms"]}"}}' in text
    for secret in (PHONE, EMAIL):
        assert secret not in text

    log = (tmp_path / "worker.log").read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]  # all JSON
    assert all({"ts", "level", "logger", "msg", "alert_id", "stage"} <= set(x) for x in lines)
    stages = {x["stage"] for x in lines if x["alert_id"] == STORM_KEY}
    assert {"ingest", "match", "send"} <= stages, stages
    assert any(x["logger"].startswith("faust") for x in lines), "faust's own lines are JSON too"
    assert PHONE not in log and EMAIL not in log
