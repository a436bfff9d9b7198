"""The faust app: thin agent loops that decode, call ``streams.pipeline``, and produce.

ingest:   hazards.raw      -> alerts (+ hazards.dlq)
scatter:  alerts           -> match.requests (one copy per partition)
match:    match.requests   -> deliveries.{push,sms,email}
send:     deliveries.*     -> providers, receipts
receipts: receipts         -> per-alert counters in Redis

No agent dies on a bad record: decode errors and unexpected exceptions become DLQ
records (ingest, scatter) or logged, counted failures (later stages), and the stream
moves on. Delivery is at-least-once (tansu has no transactions); the sender's Redis
idempotency keys make it exactly-once for the citizen.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import faust
import msgspec
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from channels.base import SEND_GATE
from channels.sender import send_batch
from ops.logging import bind, log_context
from ops.metrics import (
    DEAD_LETTERS,
    FIRST_SEND_SECONDS,
    INGESTED,
    MATCH_REACH,
    MATCH_SECONDS,
    MATCHED,
    count_receipt,
    count_sends,
    observe_app,
)
from ops.settings import Settings
from streams import topics as T
from streams.lifecycle import expired
from streams.pipeline import cancel_followups, match, scatter
from streams.records import (
    Alert,
    DeadLetter,
    DeliveryBatch,
    DeliveryStatus,
    MatchRequest,
    Receipt,
    Recipient,
    RecipientResult,
    decoder,
    encode,
)
from streams.runtime import Runtime

log = logging.getLogger(__name__)

_alert = decoder(Alert)
_match = decoder(MatchRequest)
_batch = decoder(DeliveryBatch)
_receipt = decoder(Receipt)

# How long a match request waits for its shard to finish reading the subscriptions
# topic after a (re)assignment before answering with what it has.
SHARD_CATCH_UP_S = 60.0

_T = TypeVar("_T")
_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)


async def _redis_patient(what: str, step: Callable[[], Awaitable[_T]]) -> _T:
    """Run one record's Redis-backed step, waiting out a Redis outage instead of failing.

    The Redis client already retries a command for ~20 s (``streams.runtime``); past
    that, failing the step would lose the record: an agent that raises has its
    in-flight record acked by faust on the way out, and a batch settled as ``failed``
    is never sent. Nothing can be done safely without Redis, so the record waits and
    the consumer catches up once Redis is back.
    """
    delay = 0.5
    while True:
        try:
            return await step()
        except _REDIS_DOWN as exc:
            log.warning("%s: Redis unavailable (%s), retrying in %.1fs",
                        what, type(exc).__name__, delay)  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


def _headers(event: Any) -> dict[str, bytes]:
    raw = event.message.headers or []
    items = raw.items() if isinstance(raw, dict) else raw
    return {str(k).lower(): (v or b"") for k, v in items}


def build_app(settings: Settings) -> faust.App:
    """A faust app wired to the configured broker, with every pipeline agent."""
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{h.strip()}" for h in settings.kafka_bootstrap_servers.split(",")],
        store="memory://",
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        broker_rebalance_timeout=settings.broker_rebalance_timeout_s,
        broker_session_timeout=settings.broker_session_timeout_s,
        broker_heartbeat_interval=settings.broker_heartbeat_interval_s,
        producer_linger_ms=settings.producer_linger_ms,
        producer_max_batch_size=settings.producer_max_batch_size,
        broker_commit_interval=settings.broker_commit_interval_s,
        stream_buffer_maxsize=settings.stream_buffer_maxsize,
        broker_max_poll_records=settings.broker_max_poll_records or None,
        web_enabled=False,  # ops.metrics serves /metrics, /healthz and /readyz instead
        topic_allow_declare=False,  # `tocsin` creates every topic with its own shape
    )
    observe_app(app, settings.consumer_lag_interval_s)  # delivery metrics, consumer lag
    _FETCH_MAX_WAIT_MS[id(app)] = settings.consumer_fetch_max_wait_ms

    def topic(name: str) -> faust.TopicT:
        return app.topic(
            settings.topic(name), key_type=bytes, value_type=bytes, value_serializer="raw"
        )

    raw, dlq, alerts = topic(T.HAZARDS_RAW), topic(T.HAZARDS_DLQ), topic(T.ALERTS)
    match_requests, receipts = topic(T.MATCH_REQUESTS), topic(T.RECEIPTS)
    routine = {c: topic(name) for c, name in T.DELIVERIES.items()}
    urgent = {c: topic(name) for c, name in T.URGENT_DELIVERIES.items()}

    async def deliver(batch: DeliveryBatch) -> None:
        lane = urgent if batch.urgent else routine
        await lane[batch.channel].send(key=batch.alert_key.encode(), value=encode(batch))

    match_topic_name = settings.topic(T.MATCH_REQUESTS)

    runtime: Runtime | None = None
    lock = asyncio.Lock()

    async def rt() -> Runtime:
        nonlocal runtime
        async with lock:
            if runtime is None:
                with log_context():  # its long-lived tasks must not inherit an alert's id
                    runtime = await Runtime.create(settings)
            return runtime

    async def dead(stage: str, reason: str, payload: bytes, detail: str) -> None:
        letter = DeadLetter(
            reason=reason, stage=stage, payload=payload[:65536], detail=detail[:2000],
            rejected_at=time.time(),
        )  # fmt: skip
        DEAD_LETTERS.labels(stage, reason).inc()
        await dlq.send(value=encode(letter))

    @app.on_partitions_assigned.connect
    async def on_assigned(sender: Any, /, *args: Any, signal: Any, **_: Any) -> None:
        assigned: set[Any] = args[0] if args else set()
        owned = {tp.partition for tp in assigned if tp.topic == match_topic_name}
        (await rt()).reader.follow(owned)

    @app.agent(raw)
    async def ingest(stream: faust.StreamT) -> None:
        async for event in stream.events():
            r = await rt()
            bind("ingest")
            payload = event.value or b""
            m = event.message
            record_id = f"{m.topic}:{m.partition}:{m.offset}"  # redelivered: published again
            try:
                step = partial(r.ingestor.ingest, payload, _headers(event), record_id=record_id)
                outcome = await _redis_patient("ingest", step)
            except Exception as exc:  # a bug must not stop ingest for everyone else
                log.exception("ingest failed on a record")
                await dead("ingest", "internal_error", payload, f"{exc!r}")
                continue
            for letter in outcome.dead:
                log.info("hazard rejected: %s (%s)", letter.reason, letter.detail[:200])
                INGESTED.labels("rejected", letter.reason).inc()
                DEAD_LETTERS.labels("ingest", letter.reason).inc()
                await dlq.send(value=encode(letter))
            INGESTED.labels("duplicate", "").inc(outcome.duplicates)
            for alert in outcome.alerts:
                bind("ingest", alert.key)
                INGESTED.labels("accepted", "").inc()
                log.info("alert %s accepted: %s %s from %s", alert.key, alert.status,
                         alert.msg_type, alert.sender)  # fmt: skip
                await alerts.send(key=alert.key.encode(), value=encode(alert))

    @app.agent(alerts)
    async def scatter_alerts(stream: faust.StreamT) -> None:
        async for payload in stream:
            bind("scatter")
            try:
                alert = _alert.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                await dead("scatter", "bad_alert_record", payload, str(exc))
                continue
            bind("scatter", alert.key)
            for partition, request in scatter(alert, settings.partitions, time.time()):
                await match_requests.send(
                    key=alert.key.encode(), value=encode(request), partition=partition
                )
            if alert.msg_type == "Cancel":
                r = await rt()
                followups = await _redis_patient(
                    "scatter",
                    partial(
                        cancel_followups, alert, r.store,
                        batch_size=settings.delivery_batch_size,
                    ),
                )  # fmt: skip
                for batch in followups:
                    await deliver(batch)

    @app.agent(match_requests)
    async def match_shard(stream: faust.StreamT) -> None:
        async for event in stream.events():
            r = await rt()
            partition = event.message.partition
            bind("match")
            try:
                request = _match.decode(event.value)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                await dead("match", "bad_match_request", event.value, str(exc))
                continue
            bind("match", request.alert_key)
            shard = r.shards.shard(partition)
            if shard is None:  # assignment moved on mid-flight; the new owner answers
                continue
            try:
                await asyncio.wait_for(shard.caught_up.wait(), SHARD_CATCH_UP_S)
            except TimeoutError:
                log.warning("shard %s not caught up; matching what it holds", partition)
            try:
                view = await shard.view(r.gazetteer)
                with MATCH_SECONDS.time():
                    batches, counts, n = match(
                        request, view, batch_size=settings.delivery_batch_size,
                        partition=partition,
                    )  # fmt: skip
            except Exception as exc:
                log.exception("match failed for alert %s", request.alert_key)
                await dead("match", "internal_error", event.value, f"{exc!r}")
                continue
            MATCH_REACH.observe(n)
            for channel, count in counts.items():
                MATCHED.labels(channel).inc(count)
            log.info("alert %s: shard %s matched %d subscribers", request.alert_key, partition, n)
            await _redis_patient(
                "match",
                partial(r.store.add_matched, request.alert_key, counts, n, partition=partition),
            )
            for batch in batches:
                await deliver(batch)

    async def send_loop(stream: faust.StreamT) -> None:
        async for payload in stream:
            r = await rt()
            bind("send")
            try:
                batch = _batch.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                await dead("send", "bad_delivery_batch", payload, str(exc))
                continue
            bind("send", batch.alert_key)
            picked_at = time.time()
            receipt, followup = await _redis_patient("send", partial(_send_one, r, batch))
            # When the sender took the batch: fan-out queueing vs send time (latency.py).
            started = {T.H_SEND_STARTED_AT: repr(picked_at).encode()}
            await receipts.send(
                key=batch.alert_key.encode(), value=encode(receipt), headers=started
            )
            if followup is not None:
                await deliver(followup)

    for channel in routine:
        app.agent(routine[channel], name=f"send_{channel}", concurrency=4)(send_loop)
        app.agent(urgent[channel], name=f"send_{channel}_urgent", concurrency=8)(send_loop)

    @app.agent(receipts)
    async def count_receipts(stream: faust.StreamT) -> None:
        async for payload in stream:
            r = await rt()
            bind("receipts")
            try:
                receipt = _receipt.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                await dead("receipts", "bad_receipt", payload, str(exc))
                continue
            bind("receipts", receipt.alert_key)
            count_receipt(receipt.channel, [x.status for x in receipt.results])
            await _redis_patient("receipts", partial(r.store.apply_receipt, receipt))

    @app.on_before_shutdown.connect
    async def close_runtime(sender: Any, /, *args: Any, signal: Any, **_: Any) -> None:
        if runtime is not None:
            await runtime.close()

    return app


def _patch_fetch_max_wait() -> None:
    """faust hard-codes its worker consumer's ``fetch_max_wait_ms`` (1500): apply the
    app's ``consumer_fetch_max_wait_ms`` to the aiokafka consumer before it starts."""
    from faust.transport.drivers import aiokafka as driver

    cls = driver.AIOKafkaConsumerThread
    original = cls._create_worker_consumer
    if getattr(original, "_tocsin", False):
        return

    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        wait = _FETCH_MAX_WAIT_MS.get(id(self.app))
        if wait is not None:
            consumer._fetch_max_wait_ms = wait
        return consumer

    create._tocsin = True  # type: ignore[attr-defined]
    cls._create_worker_consumer = create  # type: ignore[method-assign]


_FETCH_MAX_WAIT_MS: dict[int, int] = {}
_patch_fetch_max_wait()


def _settle(batch: DeliveryBatch, status: DeliveryStatus, reason: str) -> Receipt:
    """A receipt giving every recipient of the batch the same final status."""
    return Receipt(
        alert_key=batch.alert_key,
        channel=batch.channel,
        provider="none",
        results=[RecipientResult(x.subscriber_id, status, reason) for x in batch.recipients],
        sent_at=time.time(),
    )


async def _send_one(r: Runtime, batch: DeliveryBatch) -> tuple[Receipt, DeliveryBatch | None]:
    """Send one delivery batch; return its receipt and, if the alert was cancelled
    meanwhile, the cancellation notice owed to the people this batch just warned.

    An unexpected error fails the batch's recipients, never the agent.
    """
    alert = await r.store.get(batch.alert_key)
    if alert is None:
        return _settle(batch, "failed", "alert not found in registry"), None
    if expired(alert, time.time()):
        return _settle(batch, "expired", "alert expired before it could be sent"), None
    if await r.store.cancelled_by(batch.alert_key):
        return _settle(batch, "cancelled", "alert was cancelled before it was sent"), None
    if alert.origin_ts:
        FIRST_SEND_SECONDS.labels(batch.channel).observe(max(0.0, time.time() - alert.origin_ts))
    async def not_cancelled() -> bool:
        return not await r.store.cancelled_by(batch.alert_key)

    gate = SEND_GATE.set(not_cancelled)  # rate-limit waits stop there if it is cancelled
    try:
        receipt = await send_batch(
            batch, alert, contacts=r.contacts, guard=r.guard,
            providers=r.providers[batch.channel], renderer=r.renderer,
        )  # fmt: skip
    except _REDIS_DOWN:
        raise  # not the batch's fault: the caller waits for Redis and tries again
    except Exception:
        log.exception("send failed for alert %s", batch.alert_key)
        reason = "internal error: " + traceback.format_exc(limit=1).splitlines()[-1]
        return _settle(batch, "failed", reason), None
    finally:
        SEND_GATE.reset(gate)
    count_sends(batch.channel, receipt.provider, [x.status for x in receipt.results])
    languages = {x.subscriber_id: x.language for x in batch.recipients}
    warned = {x.subscriber_id: languages[x.subscriber_id] for x in receipt.results
              if x.status == "sent"}  # fmt: skip
    await r.store.record_warned(batch.alert_key, batch.channel, warned)
    # Re-check after recording: either the Cancel's fan-out read our record, or we see
    # its mark here; the notice's idempotency key absorbs the case where both happen.
    cancel_key = await r.store.cancelled_by(batch.alert_key)
    if cancel_key and warned:
        notice = DeliveryBatch(
            alert_key=cancel_key,
            channel=batch.channel,
            recipients=[Recipient(sid, lang) for sid, lang in warned.items()],
            produced_at=time.time(),
            urgent=True,
        )
        return receipt, notice
    return receipt, None
