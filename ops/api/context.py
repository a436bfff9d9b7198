"""Everything one API process shares: Redis, the Kafka producer, the preview index.

:class:`ApiContext` is built once per process (by the app's lifespan, or by a test) and
hung on ``app.state.ctx``. Besides the stores it runs two background readers that follow
every partition from the beginning, like a matcher shard but for all of them:

- the preview index over ``subscriptions`` (``ops.api.preview.PreviewIndex``);
- :class:`DeliveryTimes` over ``receipts``, recording per alert the first and last time a
  message was handed to a provider (for the transparency page), with an idempotent
  min/max in Redis so a restart that re-reads the topic changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from channels.contacts import ContactStore
from geofencing.gazetteer import Gazetteer, standard_gazetteer
from ops.api.audit import AuditLog
from ops.api.auth import Authenticator
from ops.api.citizen_store import CitizenStore
from ops.api.identity import IdentityStore, ensure_bootstrap_admin
from ops.api.oidc import build_authenticator
from ops.api.otp import OtpNotifier, OtpService, ProviderOtpNotifier
from ops.api.preview import PreviewIndex
from ops.api.ratelimit import ApiRateLimiter
from ops.api.workflow import WorkflowStore
from ops.settings import Settings
from streams import topics as T
from streams.authority import SenderRegistry
from streams.publish import hazard_record
from streams.records import Receipt, Subscription, decoder, encode
from streams.state import AlertStore
from templates.render import Renderer

log = logging.getLogger(__name__)

TIMING = "tocsin:api:timing:"
_receipt = decoder(Receipt)

# KEYS[1] = timing hash; ARGV = time, ttl. Keeps the earliest and latest time seen.
_MINMAX = """
local t = tonumber(ARGV[1])
local f = tonumber(redis.call('HGET', KEYS[1], 'first'))
if not f or t < f then redis.call('HSET', KEYS[1], 'first', ARGV[1]) end
local l = tonumber(redis.call('HGET', KEYS[1], 'last'))
if not l or t > l then redis.call('HSET', KEYS[1], 'last', ARGV[1]) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


class EventBus:
    """The API's one Kafka producer: hazards, subscriptions, audit copies."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                         acks="all", linger_ms=2)

    async def start(self) -> None:
        """Connect the producer."""
        await self.producer.start()

    async def stop(self) -> None:
        """Flush and close."""
        await self.producer.stop()

    async def hazard(self, payload: bytes, source: str) -> None:
        """Produce one CAP message to ``hazards.raw`` and wait for the acknowledgement."""
        _, value, headers = hazard_record(payload, "application/cap+xml", source, time.time())
        await self.producer.send_and_wait(self.settings.topic(T.HAZARDS_RAW), value=value,
                                          headers=headers)

    async def audit(self, key: bytes, value: bytes) -> None:
        """Copy one audit entry to the ``audit`` topic."""
        await self.producer.send_and_wait(self.settings.topic(T.AUDIT), value=value, key=key)

    async def subscriptions(self, subs: Iterable[Subscription],
                            tombstones: Iterable[str] = ()) -> None:
        """Upsert subscriptions and tombstone ids on the compacted topic; wait for acks."""
        topic = self.settings.topic(T.SUBSCRIPTIONS)
        futures = [await self.producer.send(topic, key=sid.encode(), value=None)
                   for sid in tombstones]
        futures += [await self.producer.send(topic, key=s.id.encode(), value=encode(s))
                    for s in subs]
        for fut in futures:
            await fut


class DeliveryTimes:
    """First and last provider hand-off per alert, read from every ``receipts`` partition."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, ttl_s: int = 30 * 86400
                 ) -> None:
        self.settings = settings
        self.redis = redis
        self.ttl_s = ttl_s
        self.consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                         enable_auto_commit=False,
                                         auto_offset_reset="earliest")
        self._minmax = redis.register_script(_MINMAX)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Assign every partition and start reading in the background."""
        await self.consumer.start()
        topic = self.settings.topic(T.RECEIPTS)
        self.consumer.assign([TopicPartition(topic, p) for p in range(self.settings.partitions)])
        self._task = asyncio.create_task(self._run(), name="delivery-times")

    async def stop(self) -> None:
        """Stop reading."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.consumer.stop()

    async def _run(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=500, max_records=2000)
            for records in batch.values():
                for rec in records:
                    try:
                        receipt = _receipt.decode(rec.value or b"")
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        continue  # the pipeline dead-letters bad receipts; not our job
                    if any(r.status == "sent" for r in receipt.results):
                        await self._minmax(keys=[TIMING + receipt.alert_key],
                                           args=[repr(receipt.sent_at), self.ttl_s])

    async def get(self, alert_key: str) -> tuple[float, float] | None:
        """(first, last) delivery time of an alert, or None if nothing was sent yet."""
        raw = await self.redis.hgetall(TIMING + alert_key)
        if not raw:
            return None
        return float(raw[b"first"]), float(raw[b"last"])


@dataclass
class ApiContext:
    """The shared resources of one API process."""

    settings: Settings
    redis: aioredis.Redis
    secret: bytes
    gazetteer: Gazetteer
    senders: SenderRegistry | None  # the pipeline's sender registry, when configured
    identity: IdentityStore
    authenticator: Authenticator
    audit: AuditLog
    bus: EventBus
    index: PreviewIndex
    times: DeliveryTimes
    workflow: WorkflowStore
    alerts: AlertStore
    contacts: ContactStore
    citizens: CitizenStore
    otp: OtpService
    limiter: ApiRateLimiter
    renderer: Renderer

    @classmethod
    async def start(cls, settings: Settings, *, otp_notifier: OtpNotifier | None = None
                    ) -> ApiContext:
        """Connect to Redis and Kafka, create topics, start the background readers."""
        if settings.api_token_secret:
            secret = settings.api_token_secret.encode()
        else:
            log.warning("api_token_secret is not set: using a random key, so API and citizen "
                        "tokens will not survive a restart")
            secret = secrets.token_bytes(32)
        redis = aioredis.Redis.from_url(settings.redis_url)
        started: list[EventBus | PreviewIndex | DeliveryTimes] = []
        try:
            # The worker's gazetteer (counties, NWS UGC zones, EMMA_ID): codes resolve here
            # exactly as they will in ingest and in the matcher shards.
            gazetteer = await asyncio.to_thread(standard_gazetteer, settings.data_dir)
            senders = (SenderRegistry.load(settings.senders_file, gazetteer)
                       if settings.senders_file else None)
            await T.ensure_topics(settings.kafka_bootstrap_servers,
                                  partitions=settings.partitions,
                                  replication=settings.replication_factor,
                                  prefix=settings.topic_prefix)
            bus = EventBus(settings)
            await bus.start()
            started.append(bus)
            index = PreviewIndex(settings, gazetteer)
            await index.start()
            started.append(index)
            times = DeliveryTimes(settings, redis)
            await times.start()
            started.append(times)
        except BaseException:
            for part in reversed(started):  # leave no consumer or connection behind
                with contextlib.suppress(Exception):
                    await part.stop()
            await redis.aclose()
            raise
        identity = IdentityStore(redis, secret)
        authenticator = build_authenticator(settings, identity)  # tokens, JWT, OIDC
        if settings.api_bootstrap_admin_token:
            await ensure_bootstrap_admin(identity, settings.api_bootstrap_admin_token)
        contacts = ContactStore(redis)
        otp = OtpService(redis, secret, otp_notifier or ProviderOtpNotifier(settings, redis),
                         ttl_s=settings.api_otp_ttl_s,
                         max_attempts=settings.api_otp_max_attempts)
        return cls(
            settings=settings, redis=redis, secret=secret, gazetteer=gazetteer, senders=senders,
            identity=identity, authenticator=authenticator,
            audit=AuditLog(redis, bus.audit), bus=bus, index=index, times=times,
            workflow=WorkflowStore(redis), alerts=AlertStore(redis), contacts=contacts,
            citizens=CitizenStore(redis, secret, contacts, otp), otp=otp,
            limiter=ApiRateLimiter(redis, secret), renderer=Renderer(),
        )

    async def close(self) -> None:
        """Stop the readers, the producer, the OTP providers and Redis."""
        await self.index.stop()
        await self.times.stop()
        await self.bus.stop()
        await self.otp.notifier.aclose()
        await self.redis.aclose()
