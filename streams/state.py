"""Pipeline state kept in Redis: the alert registry and the per-alert counters.

Plain asyncio Redis code (no faust), shared by the agents, the CLI's progress display
and the tests. Keys:

- ``tocsin:alert:<key>``      the normalised Alert (JSON), written once by ingest
- ``tocsin:alert-sent:<key>`` the ``sent`` value ingest registered first (dedup), a
                              newline and the raw record it came from
- ``tocsin:alerts``           sorted set of alert keys by time received
- ``tocsin:counters:<key>``   hash of counters: ``matched``, ``matched:<channel>``,
                              ``shards``, ``<channel>:<status>`` (sent, failed, ...)
- ``tocsin:matched:<key>``    hash partition -> that shard's answer (JSON), the source
                              of the ``matched`` totals (idempotent per partition)
- ``tocsin:outcome:<key>:<channel>``  hash subscriber id -> first reported status
- ``tocsin:shards``           hash ``<partition>`` -> subscriptions indexed by that shard
- ``tocsin:shard-owners``     hash ``<partition>`` -> ``host:pid`` of the worker holding it
- ``tocsin:cancelled:<key>``  the key of the Cancel message that withdrew this alert
- ``tocsin:warned:<key>:<channel>``  hash subscriber id -> language of everyone warned
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis

from streams.records import Alert, Channel, Receipt, decoder, encode

ALERT = "tocsin:alert:"
ALERT_SENT = "tocsin:alert-sent:"
ALERTS = "tocsin:alerts"
COUNTERS = "tocsin:counters:"
SHARDS = "tocsin:shards"
SHARD_OWNERS = "tocsin:shard-owners"
MATCHED = "tocsin:matched:"
OUTCOME = "tocsin:outcome:"

# One shard's answer replaces its earlier one; the totals are recomputed from all.
_MATCHED_LUA = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
local answers = redis.call('HVALS', KEYS[1])
local total, channels = 0, {}
for _, raw in ipairs(answers) do
  local answer = cjson.decode(raw)
  total = total + answer.n
  for channel, n in pairs(answer.c) do channels[channel] = (channels[channel] or 0) + n end
end
redis.call('HSET', KEYS[2], 'matched', total, 'shards', #answers)
for channel, n in pairs(channels) do redis.call('HSET', KEYS[2], 'matched:' .. channel, n) end
redis.call('EXPIRE', KEYS[2], ARGV[3])
return total
"""

# Count a recipient's outcome only the first time one is reported for it.
_SETTLE_LUA = """
local channel = ARGV[1]
for i = 3, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('HINCRBY', KEYS[2], channel .. ':' .. ARGV[i + 1], 1)
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""
CANCELLED = "tocsin:cancelled:"
WARNED = "tocsin:warned:"

_alert_decoder = decoder(Alert)


class Registration(enum.Enum):
    """What the registry said about an incoming alert."""

    NEW = "new"
    DUPLICATE = "duplicate"  # same sender, identifier and sent: already ingested
    CONFLICT = "conflict"  # same sender and identifier, different sent: CAP forbids reuse


@dataclass(frozen=True)
class Progress:
    """Delivery progress of one alert, derived from its counters."""

    matched: int
    expected: dict[str, int]  # channel -> recipients matched on that channel
    settled: dict[str, int]  # channel -> recipients with a final result
    outcomes: dict[str, int]  # "<channel>:<status>" -> count
    complete: bool

    @classmethod
    def from_counters(cls, counters: dict[str, int], partitions: int) -> Progress:
        """Read the counters hash; complete when every shard answered and all settled."""
        expected: dict[str, int] = {}
        settled: dict[str, int] = {}
        outcomes: dict[str, int] = {}
        for field, n in counters.items():
            if field.startswith("matched:"):
                expected[field.split(":", 1)[1]] = n
            elif ":" in field:
                channel = field.split(":", 1)[0]
                settled[channel] = settled.get(channel, 0) + n
                outcomes[field] = n
        answered = counters.get("shards", 0) >= partitions
        done = all(settled.get(c, 0) >= n for c, n in expected.items())
        return cls(counters.get("matched", 0), expected, settled, outcomes, answered and done)


class AlertStore:
    """The alert registry and counters in Redis, with a small in-process read cache."""

    def __init__(self, client: aioredis.Redis, *, ttl_s: int = 30 * 24 * 3600) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._matched = client.register_script(_MATCHED_LUA)
        self._settle = client.register_script(_SETTLE_LUA)
        self._cache: dict[str, Alert] = {}

    async def register(self, alert: Alert, *, record_id: str = "") -> Registration:
        """Record an alert once; tell a republished message from a reused identifier.

        ``record_id`` names the raw record (``topic:partition:offset``) being ingested. The
        same record delivered again is NEW again, not a duplicate: the worker that
        registered it may have died before its alert reached ``alerts`` (the offset was
        not committed, so the record came back), and every step after registration is
        idempotent. A republished message is a new record, so still a DUPLICATE.
        """
        key = alert.key
        claim = f"{alert.sent}\n{record_id}"  # one SET NX: no window between the two parts
        claimed = await self.redis.set(ALERT_SENT + key, claim, nx=True, ex=self.ttl_s)
        if not claimed:
            first = await self.redis.get(ALERT_SENT + key)
            first_sent, _, first_record = _s(first or b"").partition("\n")
            if first_sent != alert.sent:
                return Registration.CONFLICT
            if not record_id or first_record != record_id:
                return Registration.DUPLICATE
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(ALERT + key, encode(alert), ex=self.ttl_s, nx=True)  # the first stays
            pipe.zadd(ALERTS, {key: alert.received_at or time.time()}, nx=True)
            await pipe.execute()
        self._cache[key] = alert
        return Registration.NEW

    async def get(self, key: str) -> Alert | None:
        """The stored alert, cached in-process (an alert never changes once stored)."""
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        raw = await self.redis.get(ALERT + key)
        if raw is None:
            return None
        alert = _alert_decoder.decode(raw)
        if len(self._cache) > 10_000:
            self._cache.clear()  # bounded; alerts are few and reloading one is cheap
        self._cache[key] = alert
        return alert

    async def recent(self, limit: int = 50) -> list[str]:
        """Alert keys, most recent first."""
        keys = await self.redis.zrevrange(ALERTS, 0, limit - 1)
        return [k.decode() if isinstance(k, bytes) else str(k) for k in keys]

    async def add_matched(
        self,
        key: str,
        per_channel: Mapping[Channel, int],
        subscribers: int,
        *,
        partition: int = 0,
    ) -> None:
        """Record what one matcher shard found for an alert.

        Idempotent per partition: a match request that is processed again (at-least-once
        delivery after a crash or rebalance) replaces that shard's answer instead of
        adding to it, so ``matched`` stays the number of people reached.
        """
        answer = json.dumps({"n": subscribers, "c": dict(per_channel)})
        await self._matched(
            keys=[MATCHED + key, COUNTERS + key], args=[str(partition), answer, self.ttl_s]
        )

    async def apply_receipt(self, receipt: Receipt) -> None:
        """Fold one sender receipt into the alert's counters, once per recipient.

        A recipient's first reported outcome is its outcome: a batch sent again after a
        crash reports ``duplicate`` for those already handled, which must not count twice.
        """
        args: list[str | int] = [receipt.channel, self.ttl_s]
        for result in receipt.results:
            args += [result.subscriber_id, result.status]
        await self._settle(
            keys=[OUTCOME + f"{receipt.alert_key}:{receipt.channel}", COUNTERS + receipt.alert_key],
            args=args,
        )

    async def counters(self, key: str) -> dict[str, int]:
        """All counters of one alert."""
        raw = await self.redis.hgetall(COUNTERS + key)
        return {_s(k): int(v) for k, v in raw.items()}

    async def progress(self, key: str, partitions: int) -> Progress:
        """How far one alert has got: matched by every shard, and every recipient settled."""
        return Progress.from_counters(await self.counters(key), partitions)

    async def mark_cancelled(self, keys: list[str], cancel_key: str) -> None:
        """Record that a Cancel (``cancel_key``) withdrew the alerts ``keys``."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.set(CANCELLED + key, cancel_key, ex=self.ttl_s)
            await pipe.execute()

    async def cancelled_by(self, key: str) -> str | None:
        """The Cancel message's key if this alert was withdrawn, else None."""
        raw = await self.redis.get(CANCELLED + key)
        return _s(raw) if raw is not None else None

    async def record_warned(self, key: str, channel: str, warned: Mapping[str, str]) -> None:
        """Remember who was warned on a channel (subscriber -> language) for a later Cancel."""
        if warned:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(WARNED + f"{key}:{channel}", mapping=cast(dict[Any, Any], warned))
                pipe.expire(WARNED + f"{key}:{channel}", self.ttl_s)
                await pipe.execute()

    async def warned(self, key: str, channel: str) -> dict[str, str]:
        """Everyone warned about an alert on a channel, with their language."""
        raw = await self.redis.hgetall(WARNED + f"{key}:{channel}")
        return {_s(k): _s(v) for k, v in raw.items()}

    async def set_shard_size(self, partition: int, size: int, owner: str = "") -> None:
        """Publish how many subscriptions one shard holds and which worker holds it."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(SHARDS, str(partition), size)
            if owner:
                pipe.hset(SHARD_OWNERS, str(partition), owner)
            await pipe.execute()

    async def shard_owners(self) -> dict[int, str]:
        """Which worker (``host:pid``) last reported holding each shard."""
        raw = await self.redis.hgetall(SHARD_OWNERS)
        return {int(_s(k)): _s(v) for k, v in raw.items()}

    async def shard_sizes(self) -> dict[int, int]:
        """Subscriptions held per shard partition."""
        raw = await self.redis.hgetall(SHARDS)
        return {int(_s(k)): int(v) for k, v in raw.items()}


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
