"""Prometheus metrics of every stage, and the worker's /metrics, /healthz, /readyz server.

Labels never carry contact details or citizen locations: only channels, providers,
reasons, outcomes, statuses, topics and partitions.

Where each number comes from:

- ingest outcomes, DLQ records, match latency and reach, sends, receipts, idempotency
  hits and end-to-end latency are counted by the agents in ``streams.app``;
- provider attempts, retries, failovers, failures and rate-limit waits are reported by
  ``channels.sender`` and ``channels.ratelimit`` through ``channels.events`` (channels/
  knows nothing of Prometheus); ``observe_app`` installs :class:`PrometheusDeliveryEvents`;
- consumer lag is sampled by a faust timer (``observe_app``), see ``record_consumer_lag``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

from channels.events import DeliveryEvents, set_delivery_events

log = logging.getLogger(__name__)

INGESTED = Counter(
    "tocsin_ingest_total", "Hazard messages by ingest outcome", ["outcome", "reason"]
)
MATCH_SECONDS = Histogram(
    "tocsin_match_seconds",
    "Time to match one request against one shard",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
MATCHED = Counter("tocsin_matched_total", "Recipients matched, by channel", ["channel"])
MATCH_REACH = Histogram(
    "tocsin_match_reach",
    "Subscribers one shard's answer to one match request reaches",
    buckets=(0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000),
)
SENDS = Counter(
    "tocsin_sends_total", "Per-recipient send outcomes", ["channel", "provider", "status"]
)
IDEMPOTENCY_HITS = Counter(
    "tocsin_idempotency_hits_total",
    "Recipients skipped as already sent (idempotency key held), by channel",
    ["channel"],
)
RECEIPTS = Counter(
    "tocsin_receipts_total",
    "Per-recipient results read from the receipts topic, by final status",
    ["channel", "status"],
)
PROVIDER_ATTEMPTS = Counter(
    "tocsin_provider_attempts_total",
    "Messages handed to a provider, every call counted (retries included)",
    ["channel", "provider"],
)
SEND_RETRIES = Counter(
    "tocsin_send_retries_total",
    "Messages handed again to the same provider after a retriable failure",
    ["channel", "provider"],
)
SEND_FAILOVERS = Counter(
    "tocsin_send_failovers_total",
    "Messages moved on to this provider after the previous ones did not deliver them",
    ["channel", "provider"],
)
PROVIDER_FAILURES = Counter(
    "tocsin_provider_failures_total",
    "Messages a provider call failed, by kind (see channels.events)",
    ["channel", "provider", "kind"],
)
RATE_LIMIT_WAITS = Counter(
    "tocsin_ratelimit_waits_total",
    "Times a sender slept for a provider's rate-limit tokens",
    ["provider"],
)
RATE_LIMIT_WAIT_SECONDS = Counter(
    "tocsin_ratelimit_wait_seconds_total",
    "Seconds senders slept for a provider's rate-limit tokens",
    ["provider"],
)
FIRST_SEND_SECONDS = Histogram(
    "tocsin_end_to_end_seconds",
    "From the hazard message reaching hazards.raw to a delivery batch being sent",
    ["channel"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
SHARD_SIZE = Gauge("tocsin_shard_subscriptions", "Subscriptions held per shard", ["partition"])
DEAD_LETTERS = Counter("tocsin_dead_letters_total", "Records sent to the DLQ", ["stage", "reason"])
CONSUMER_LAG = Gauge(
    "tocsin_consumer_lag",
    "Records on this worker's assigned partitions not yet processed and committed",
    ["topic", "partition"],
)


def exposed_names() -> set[str]:
    """Every series name a scrape of this module's metrics can contain.

    Dashboards and alert rules may use only these (checked by the tests).
    """
    names: set[str] = set()
    for value in globals().values():
        if not isinstance(value, MetricWrapperBase):
            continue
        base = value._name
        if isinstance(value, Counter):
            names.update({f"{base}_total", f"{base}_created"})
        elif isinstance(value, Histogram):
            names.update(f"{base}{s}" for s in ("_bucket", "_sum", "_count", "_created"))
        else:
            names.add(base)
    return names


class PrometheusDeliveryEvents(DeliveryEvents):
    """Counts the sender's and rate limiter's events (see ``channels.events``)."""

    def attempt(self, channel: str, provider: str, messages: int, *, retry: bool) -> None:
        PROVIDER_ATTEMPTS.labels(channel, provider).inc(messages)
        if retry:
            SEND_RETRIES.labels(channel, provider).inc(messages)

    def failover(self, channel: str, provider: str, messages: int) -> None:
        SEND_FAILOVERS.labels(channel, provider).inc(messages)

    def failure(self, channel: str, provider: str, kind: str, messages: int = 1) -> None:
        PROVIDER_FAILURES.labels(channel, provider, kind).inc(messages)

    def rate_limit_wait(self, bucket: str, seconds: float) -> None:
        RATE_LIMIT_WAITS.labels(bucket).inc()
        RATE_LIMIT_WAIT_SECONDS.labels(bucket).inc(seconds)


def count_receipt(channel: str, statuses: list[str]) -> None:
    """One receipt record's per-recipient statuses."""
    for status in statuses:
        RECEIPTS.labels(channel, status).inc()


def count_sends(channel: str, provider: str, statuses: list[str]) -> None:
    """One sent batch's per-recipient outcomes; ``duplicate`` is an idempotency hit."""
    for status in statuses:
        SENDS.labels(channel, provider, status).inc()
        if status == "duplicate":
            IDEMPOTENCY_HITS.labels(channel).inc()


# -- consumer lag ----------------------------------------------------------------------

_lag_series: set[tuple[str, str]] = set()


def _fetched_highwater(consumer: Any, tp: Any) -> int:
    """The high watermark the last fetch response reported (0 when unknown)."""
    try:
        return int(consumer.highwater(tp) or 0)
    except Exception:  # not fetched yet, or the partition just moved away
        return 0


async def consumer_lag(consumer: Any) -> dict[tuple[str, int], int]:
    """Lag per assigned (topic, partition) of a faust consumer: end offset - committed.

    The end offset is the largest of the broker's ListOffsets answer
    (``consumer.highwaters``), the high watermark of the last fetch response and the
    last offset read + 1. On Kafka the first is exact. tansu (the test broker)
    answers ListOffsets with the base offset of the partition's last record batch + 1,
    so after a batched produce it under-reports by up to the batch size; the other two
    make up for it as soon as the worker has fetched the batch, so on tansu the gauge
    is a lower bound while a batch is not yet fetched, and exact after.

    "Committed" is faust's in-process committed offset (the next offset to process,
    committed every ``broker_commit_every``/``broker_commit_interval``): between two
    commits the lag includes records already processed. Before any commit the
    partition's earliest offset stands in for it.
    """
    assigned = set(consumer.assignment())
    if not assigned:
        return {}
    ends: Mapping[Any, int] = await consumer.highwaters(*assigned)
    committed: Mapping[Any, int | None] = getattr(consumer, "_committed_offset", {})
    read: Mapping[Any, int | None] = getattr(consumer, "_read_offset", {})
    fresh = [tp for tp in assigned if committed.get(tp) is None]
    earliest: Mapping[Any, int] = await consumer.earliest_offsets(*fresh) if fresh else {}
    lags = {}
    for tp in assigned:
        last_read = read.get(tp)
        end = max(
            int(ends.get(tp) or 0),
            _fetched_highwater(consumer, tp),
            -1 if last_read is None else last_read + 1,
        )
        done = committed.get(tp)
        if done is None:
            done = int(earliest.get(tp) or 0)
        lags[(tp.topic, tp.partition)] = max(0, end - done)
    return lags


async def record_consumer_lag(consumer: Any) -> None:
    """Sample ``consumer_lag`` into the gauge; forget partitions no longer assigned."""
    lags = await consumer_lag(consumer)
    current = {(topic, str(p)) for topic, p in lags}
    for gone in _lag_series - current:
        CONSUMER_LAG.remove(*gone)
    _lag_series.clear()
    _lag_series.update(current)
    for (topic, number), lag in lags.items():
        CONSUMER_LAG.labels(topic, str(number)).set(lag)


def observe_app(app: Any, lag_interval_s: float) -> None:
    """Count delivery events into Prometheus and sample a faust app's consumer lag."""
    set_delivery_events(PrometheusDeliveryEvents())

    async def sample_consumer_lag() -> None:
        try:
            await record_consumer_lag(app.consumer)
        except Exception as exc:  # not started, rebalancing, broker away: next time
            log.debug("consumer lag not sampled: %r", exc)

    app.timer(lag_interval_s, name="tocsin.consumer_lag")(sample_consumer_lag)


async def serve_health(host: str, port: int, ready: Callable[[], bool]) -> web.AppRunner:
    """Serve /metrics, /healthz (the process is up) and /readyz (``ready()``) on host:port."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ok = ready()
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    app = web.Application()
    app.add_routes(
        [web.get("/metrics", metrics), web.get("/healthz", healthz), web.get("/readyz", readyz)]
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
