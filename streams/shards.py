"""A matcher shard's subscriptions: per-partition state read from the compacted topic.

Each worker owns some partitions of ``match.requests``; faust's co-partitioned
assignment makes partition p of ``subscriptions`` that worker's too. The worker reads
its partitions of the compacted ``subscriptions`` topic from the beginning (the topic
*is* the state) with its own consumer, then keeps tailing it, and holds per partition a
dict of subscriptions plus an immutable ``SubscriptionIndex`` rebuilt when it is stale.

Why not a faust Table: table recovery stops at the partition's reported high watermark,
and the in-memory test broker (tansu) under-reports it after batched produces, so a
recovered table silently missed subscriptions. Reading until a fetch comes back empty
works on tansu and on Kafka alike.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from geofencing.gazetteer import Gazetteer
from geofencing.matcher import SubscriptionIndex
from streams.records import Subscription, decoder

log = logging.getLogger(__name__)
_sub_decoder = decoder(Subscription)


@dataclass
class Shard:
    """The subscriptions of one partition and its (lazily rebuilt) index."""

    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    index: SubscriptionIndex | None = None
    caught_up: asyncio.Event = field(default_factory=asyncio.Event)
    rejected: int = 0

    def apply(self, key: str, value: bytes | None) -> str | None:
        """Upsert or delete (tombstone) one subscription; return a reason if rejected."""
        if value is None:
            if self.subscriptions.pop(key, None) is not None:
                self.index = None
            return None
        try:
            sub = _sub_decoder.decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.rejected += 1
            return f"invalid subscription record: {exc}"
        if sub.id != key:
            self.rejected += 1
            return "subscription id does not match the record key"
        self.subscriptions[key] = sub
        self.index = None
        return None

    def get_index(self, gazetteer: Gazetteer) -> SubscriptionIndex:
        """The current immutable index, rebuilt first if subscriptions changed."""
        if self.index is None:
            self.index = SubscriptionIndex.build(list(self.subscriptions.values()), gazetteer)
        return self.index


class ShardSet:
    """All shards one worker owns, keyed by partition number."""

    def __init__(self, gazetteer: Gazetteer) -> None:
        self.gazetteer = gazetteer
        self.shards: dict[int, Shard] = {}

    def assign(self, partitions: Iterable[int]) -> tuple[set[int], set[int]]:
        """Make ``partitions`` the owned set; return (added, removed)."""
        wanted = set(partitions)
        current = set(self.shards)
        for p in current - wanted:
            del self.shards[p]
        for p in wanted - current:
            self.shards[p] = Shard()
        return wanted - current, current - wanted

    def shard(self, partition: int) -> Shard | None:
        """The shard for a partition, or None when this worker does not own it."""
        return self.shards.get(partition)


class SubscriptionReader:
    """Keeps a ShardSet in step with the ``subscriptions`` topic for the owned partitions."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        shards: ShardSet,
        *,
        on_size: Callable[[int, int], object] | None = None,
    ) -> None:
        self.topic = topic
        self.shards = shards
        self.on_size = on_size
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            key_deserializer=None,
            value_deserializer=None,
        )
        self._assigned: set[int] = set()
        self._reassign = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect and start tailing in the background."""
        await self.consumer.start()
        self._task = asyncio.create_task(self._run(), name="subscription-reader")

    async def stop(self) -> None:
        """Stop tailing and close the consumer."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.consumer.stop()

    def follow(self, partitions: Iterable[int]) -> None:
        """Follow a new partition assignment (called from the rebalance signal)."""
        added, _removed = self.shards.assign(partitions)
        self._assigned = set(self.shards.shards)
        if added or _removed:
            self._reassign.set()

    async def _apply_assignment(self) -> None:
        tps = [TopicPartition(self.topic, p) for p in sorted(self._assigned)]
        self.consumer.assign(tps)
        fresh = [tp for tp in tps if not self.shards.shards[tp.partition].subscriptions]
        if fresh:
            await self.consumer.seek_to_beginning(*fresh)

    async def _run(self) -> None:
        while True:
            if self._reassign.is_set():
                self._reassign.clear()
                await self._apply_assignment()
            if not self._assigned:
                await self._reassign.wait()
                continue
            batch = await self.consumer.getmany(timeout_ms=200, max_records=5000)
            self._absorb(batch)

    def _absorb(self, batch: dict[TopicPartition, list]) -> None:  # type: ignore[type-arg]
        if not batch:
            # A whole fetch round with nothing new for any owned partition: every shard
            # has reached its log end (the broker's reported end offsets are not
            # trusted, see the module docstring).
            for p, shard in self.shards.shards.items():
                if not shard.caught_up.is_set():
                    shard.caught_up.set()
                    if self.on_size is not None:
                        self.on_size(p, len(shard.subscriptions))
            return
        for tp, records in batch.items():
            owner = self.shards.shard(tp.partition)
            if owner is None:
                continue  # revoked while the fetch was in flight
            for record in records:
                key = record.key.decode() if record.key is not None else ""
                reason = owner.apply(key, record.value)
                if reason:
                    # Never log the record: it may hold a citizen's home location.
                    log.warning("subscription rejected (partition %s): %s", tp.partition, reason)
            if self.on_size is not None:
                self.on_size(tp.partition, len(owner.subscriptions))
