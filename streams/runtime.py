"""Per-worker resources (Redis, gazetteer, shards, providers), built once from Settings.

Built lazily inside the worker's running event loop, because Redis and HTTP clients
bind to the loop that first uses them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass

import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from channels import registry
from channels.base import Provider
from channels.contacts import ContactStore
from channels.idempotency import IdempotencyGuard
from geofencing.gazetteer import Gazetteer, standard_gazetteer
from ops.metrics import SHARD_SIZE, serve_health
from ops.settings import Settings
from streams.authority import SenderRegistry
from streams.cap import CapLimits
from streams.pipeline import Ingestor
from streams.records import CHANNELS
from streams.shards import ShardSet, SubscriptionReader
from streams.state import AlertStore
from streams.topics import SUBSCRIPTIONS
from templates.render import Budgets, Renderer


def cap_limits(settings: Settings) -> CapLimits:
    """The CAP parser's limits from the settings (the worker and the API ingest share it)."""
    return CapLimits(
        max_bytes=settings.max_message_bytes,
        max_depth=settings.max_depth,
        max_areas=settings.max_areas,
        max_polygons=settings.max_polygons,
        max_vertices=settings.max_vertices,
        max_markup=settings.max_markup,
    )

log = logging.getLogger(__name__)


def build_providers(
    settings: Settings, channel: str, redis: aioredis.Redis | None = None
) -> list[Provider]:
    """The configured providers for one channel, in failover order, rate-limited
    through ``redis`` when limits are configured (see ``channels.registry``)."""
    return registry.build_providers(settings, channel, redis)


def redis_retry() -> Retry:
    """Reconnect and retry a command for about half a minute when Redis goes away.

    redis-py's default gives up after ~1 s, which a Redis restart (AOF reload) outlasts:
    a mark-sent or receipt then failed and its batch was settled as failed. Every
    command the pipeline sends is safe to repeat (Lua claims/marks keyed by token,
    HSETNX-guarded counters, per-partition match answers, plain reads). Longer outages
    surface as errors that the agents retry per record (see ``streams.app``).
    """
    return Retry(ExponentialWithJitterBackoff(base=0.1, cap=2.0), retries=25)


@dataclass
class Runtime:
    """Everything the agents share inside one worker process."""

    settings: Settings
    redis: aioredis.Redis
    store: AlertStore
    gazetteer: Gazetteer
    ingestor: Ingestor
    shards: ShardSet
    reader: SubscriptionReader
    contacts: ContactStore
    guard: IdempotencyGuard
    renderer: Renderer
    providers: dict[str, list[Provider]]
    health: web.AppRunner | None = None

    @classmethod
    async def create(cls, settings: Settings) -> Runtime:
        """Connect to Redis, load the gazetteer, start the subscription reader."""
        client = aioredis.Redis.from_url(settings.redis_url, retry=redis_retry())
        store = AlertStore(client)
        gazetteer = standard_gazetteer(settings.data_dir)
        senders = (
            SenderRegistry.load(settings.senders_file, gazetteer)
            if settings.senders_file
            else SenderRegistry()
        )
        limits = cap_limits(settings)
        shards = ShardSet(
            gazetteer, standbys=settings.shard_standbys, partitions=settings.partitions
        )
        owner = f"{socket.gethostname()}:{os.getpid()}"

        def publish_size(partition: int, size: int) -> None:
            SHARD_SIZE.labels(str(partition)).set(size)
            task = asyncio.ensure_future(store.set_shard_size(partition, size, owner))
            task.add_done_callback(lambda t: t.exception())

        reader = SubscriptionReader(
            settings.kafka_bootstrap_servers,
            settings.topic(SUBSCRIPTIONS),
            shards,
            on_size=publish_size,
        )
        await reader.start()
        health = None
        if settings.metrics_port:

            def ready() -> bool:
                return all(s.caught_up.is_set() for s in shards.shards.values())

            health = await serve_health(settings.metrics_host, settings.metrics_port, ready)
        return cls(
            health=health,
            settings=settings,
            redis=client,
            store=store,
            gazetteer=gazetteer,
            ingestor=Ingestor(
                gazetteer,
                store,
                limits=limits,
                senders=senders,
                strict_schema=settings.cap_strict_schema,
            ),
            shards=shards,
            reader=reader,
            contacts=ContactStore(client),
            guard=IdempotencyGuard(
                client, ttl_s=settings.idempotency_ttl_s, lease_s=settings.claim_lease_s
            ),
            renderer=Renderer(budgets=Budgets(sms_segments=settings.sms_max_segments)),
            providers={c: build_providers(settings, c, client) for c in CHANNELS},
        )

    async def close(self) -> None:
        """Stop the reader, close providers and Redis."""
        await self.reader.stop()
        if self.health is not None:
            await self.health.cleanup()
        for providers in self.providers.values():
            for provider in providers:
                await provider.aclose()
        await self.redis.aclose()
