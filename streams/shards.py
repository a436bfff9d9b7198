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
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from shapely.geometry.base import BaseGeometry

from geofencing.gazetteer import Gazetteer
from geofencing.matcher import SubscriptionIndex
from streams.records import Subscription, decoder

log = logging.getLogger(__name__)
_sub_decoder = decoder(Subscription)


# A rebuild folds the delta into a new immutable index once it holds this many changes
# (or once the oldest change is REBUILD_AGE_S old); until then matching pays for a small
# delta index instead of stalling on a full rebuild (seconds at a million subscriptions).
REBUILD_DELTA = 2_000
REBUILD_AGE_S = 30.0


@dataclass(frozen=True)
class ShardView:
    """An immutable picture of a shard for one match: base index plus the delta.

    ``changed`` ids are answered by ``delta`` only (an upsert's new record, or nothing
    for a deletion), never by the base, whose record for them is stale.
    """

    base: SubscriptionIndex
    delta: SubscriptionIndex | None
    changed: frozenset[str]

    def match(self, area: BaseGeometry) -> list[Subscription]:
        """Subscriptions the area reaches, as of this view."""
        hits = self.base.records(self.base.match_positions(area))
        if self.changed:
            hits = [s for s in hits if s.id not in self.changed]
        if self.delta is not None and len(self.delta):
            hits += self.delta.records(self.delta.match_positions(area))
        return hits


@dataclass
class Shard:
    """The subscriptions of one partition, an immutable base index and a live delta.

    Upserts and tombstones land in ``subscriptions`` and in ``changed`` at once, so a
    match sees them immediately through a small delta index. ``rebuild`` builds a new
    base from a snapshot in a thread and swaps it in on the event loop (atomically for
    every match), keeping as delta only what changed after the snapshot was taken.
    """

    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    base: SubscriptionIndex | None = None
    changed: set[str] = field(default_factory=set)
    changed_at: float = 0.0
    caught_up: asyncio.Event = field(default_factory=asyncio.Event)
    rejected: int = 0
    rebuilds: int = 0
    _since_snapshot: set[str] | None = None
    _delta: SubscriptionIndex | None = None
    _rebuilding: asyncio.Lock = field(default_factory=asyncio.Lock)

    def apply(self, key: str, value: bytes | None) -> str | None:
        """Upsert or delete (tombstone) one subscription; return a reason if rejected."""
        if value is None:
            if self.subscriptions.pop(key, None) is not None:
                self._touch(key)
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
        self._touch(key)
        return None

    def _touch(self, key: str) -> None:
        if not self.changed:
            self.changed_at = time.monotonic()
        self.changed.add(key)
        if self._since_snapshot is not None:
            self._since_snapshot.add(key)
        self._delta = None

    def needs_rebuild(self, now: float) -> bool:
        """True when the delta is big or old enough to fold into a new base."""
        if self.base is None:
            return self.caught_up.is_set()
        if not self.changed:
            return False
        return len(self.changed) >= REBUILD_DELTA or now - self.changed_at >= REBUILD_AGE_S

    async def rebuild(self, gazetteer: Gazetteer) -> None:
        """Build a new base index from a snapshot off the event loop, then swap it in."""
        async with self._rebuilding:
            snapshot = list(self.subscriptions.values())
            self._since_snapshot = set()
            try:
                base = await asyncio.to_thread(SubscriptionIndex.build, snapshot, gazetteer)
            except BaseException:
                self._since_snapshot = None
                raise
            # The swap: one step on the event loop, so no match sees half of it.
            self.base, self.changed = base, self._since_snapshot
            self._since_snapshot, self._delta = None, None
            self.changed_at = time.monotonic()
            self.rebuilds += 1

    async def view(self, gazetteer: Gazetteer) -> ShardView:
        """The current base plus delta; builds the first base if there is none yet."""
        if self.base is None:
            await self.rebuild(gazetteer)
        assert self.base is not None
        if self.changed and self._delta is None:
            current = [self.subscriptions[k] for k in self.changed if k in self.subscriptions]
            self._delta = SubscriptionIndex.build(current, gazetteer)
        return ShardView(self.base, self._delta, frozenset(self.changed))


class ShardSet:
    """All shards one worker holds, keyed by partition number: the ones it owns (answers
    for) and, with ``standbys`` > 0, warm standbys it keeps read and indexed but does not
    answer for, so that taking one over after a rebalance is a swap, not a re-read.

    The standbys are the ``standbys`` partitions after each owned one, in ring order of
    ``partitions`` (``partitions - 1`` keeps every shard warm on every worker).
    """

    def __init__(self, gazetteer: Gazetteer, *, standbys: int = 0, partitions: int = 0) -> None:
        self.gazetteer = gazetteer
        self.shards: dict[int, Shard] = {}
        self.owned: set[int] = set()
        self.standbys = standbys
        self.partitions = partitions

    def standby_for(self, owned: set[int]) -> set[int]:
        """The partitions to keep warm besides ``owned``."""
        if not (self.standbys and self.partitions and owned):
            return set()
        ring = {(p + i) % self.partitions for p in owned for i in range(1, self.standbys + 1)}
        return ring - owned

    def assign(self, partitions: Iterable[int]) -> tuple[set[int], set[int]]:
        """Make ``partitions`` the owned set (plus its standbys); return the shards
        (added, removed). A standby that becomes owned is neither: it is kept as it is."""
        owned = set(partitions)
        current = set(self.shards)
        if owned or not self.standbys:
            wanted = owned | self.standby_for(owned)
        else:
            # An empty assignment is a rebalance in progress (faust may hand this worker
            # none of the topic for a moment): keep every shard warm for what comes next.
            wanted = current
        for p in current - wanted:
            del self.shards[p]
        for p in wanted - current:
            self.shards[p] = Shard()
        self.owned = owned
        return wanted - current, current - wanted

    def shard(self, partition: int) -> Shard | None:
        """The shard for a partition, or None when this worker does not own it."""
        return self.shards.get(partition) if partition in self.owned else None


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
        # Partitions the consumer is actually fetching (assignment applied): only their
        # silence means "caught up". A shard that follow() just added is not among them
        # until _apply_assignment ran; an empty fetch for the old assignment finishing in
        # between used to mark it caught up with nothing read, and its match requests
        # were answered "0 subscribers" (seen in a rolling restart: half the citizens).
        self._fetching: set[int] = set()
        self._reassign = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Connect and start tailing in the background."""
        await self.consumer.start()
        self._tasks = [
            asyncio.create_task(self._run(), name="subscription-reader"),
            asyncio.create_task(self._maintain(), name="shard-rebuilds"),
        ]

    async def stop(self) -> None:
        """Stop tailing and close the consumer."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.consumer.stop()

    def follow(self, partitions: Iterable[int]) -> None:
        """Follow a new partition assignment (called from the rebalance signal)."""
        before, warm = set(self.shards.owned), set(self.shards.shards)
        added, _removed = self.shards.assign(partitions)
        self._assigned = set(self.shards.shards)
        self._fetching -= added
        if added or _removed:
            self._reassign.set()
        for p in sorted((self.shards.owned - before) & warm):
            shard = self.shards.shards[p]
            log.info("partition %s taken over from a standby shard (%d subscriptions, "
                     "no re-read)", p, len(shard.subscriptions))  # fmt: skip
            if shard.caught_up.is_set() and self.on_size is not None:
                self.on_size(p, len(shard.subscriptions))

    async def _maintain(self, interval_s: float = 0.5) -> None:
        """Fold deltas into new base indexes in the background (see ``Shard.rebuild``)."""
        while True:
            await asyncio.sleep(interval_s)
            now = time.monotonic()
            for partition, shard in list(self.shards.shards.items()):
                if shard.needs_rebuild(now):
                    try:
                        await shard.rebuild(self.shards.gazetteer)
                    except Exception:  # keep serving from the old base and delta
                        log.exception("rebuilding shard %s failed", partition)

    async def _apply_assignment(self) -> None:
        tps = [TopicPartition(self.topic, p) for p in sorted(self._assigned)]
        self.consumer.assign(tps)
        self._fetching = set(self._assigned)
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
            if not batch and self._reassign.is_set():
                # The assignment changed during this fetch: its emptiness says nothing
                # about the shards just added (not read yet), so it must not mark them
                # caught up; the next round reads them from the beginning.
                continue
            self._absorb(batch)

    def _absorb(self, batch: dict[TopicPartition, list]) -> None:  # type: ignore[type-arg]
        if not batch:
            # A whole fetch round with nothing new for any owned partition: every shard
            # has reached its log end (the broker's reported end offsets are not
            # trusted, see the module docstring).
            for p, shard in self.shards.shards.items():
                if p in self._fetching and not shard.caught_up.is_set():
                    shard.caught_up.set()
                    if self.on_size is not None and p in self.shards.owned:
                        self.on_size(p, len(shard.subscriptions))
            return
        for tp, records in batch.items():
            owner = self.shards.shards.get(tp.partition)  # owned or standby
            if owner is None:
                continue  # revoked while the fetch was in flight
            for record in records:
                key = record.key.decode() if record.key is not None else ""
                reason = owner.apply(key, record.value)
                if reason:
                    # Never log the record: it may hold a citizen's home location.
                    log.warning("subscription rejected (partition %s): %s", tp.partition, reason)
            if self.on_size is not None and tp.partition in self.shards.owned:
                self.on_size(tp.partition, len(owner.subscriptions))
