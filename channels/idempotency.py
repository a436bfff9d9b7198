"""Idempotency keys that make at-least-once Kafka delivery look exactly-once to a citizen.

Kafka redelivers a delivery batch whenever a worker dies or a rebalance happens before
its offset is committed, and two workers may briefly process the same batch. Each
(alert, channel, subscriber) therefore has one Redis key,
``tocsin:idem:{alert_key}:{channel}:{subscriber_id}``, whose value is the state:

``claim:<token>`` (TTL = lease)
    a sender owns the message right now. The lease is short (seconds) so a crashed
    sender's claim simply expires and the next sender takes over; a live sender keeps
    extending it while a provider call or a retry is in progress.
``sent`` (TTL = ``ttl_s``, days)
    the message was handed to a provider; nobody sends it again.
*absent*
    never claimed, a claim expired, or a claim was released after a failed send.

Every transition is a Lua script, so "check the value and change it" is atomic per key
and a whole batch costs one round trip (a few concurrent scripts for big batches).
A token identifies one claimant (one ``send_batch`` call), not one process, so two
concurrent calls in the same process cannot mistake each other's claims for their own.

Crash semantics: a crash *before* the provider call costs at most one lease of delay
(the message is sent by whoever claims after expiry); a crash *between* the provider
accepting a message and ``mark_sent_many`` can send it twice. That window is
the provider round trip plus one Redis round trip; closing it would need idempotency
on the provider side (collapse keys, Message-ID), which the sender also sets.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

__all__ = ["ClaimState", "IdempotencyGuard", "idem_key"]

SENT = "sent"
_CLAIM_PREFIX = "claim:"


class ClaimState(enum.Enum):
    """Outcome of trying to claim one idempotency key."""

    CLAIMED = "claimed"  # we own it now and must send (then mark sent or release)
    DONE = "done"  # already sent: skip
    BUSY = "busy"  # another live claim holds it: wait for it to finish or expire


_CODES = {1: ClaimState.CLAIMED, 2: ClaimState.DONE, 3: ClaimState.BUSY}

# ARGV[1] = our claim value, ARGV[2] = lease in ms.
# Re-claiming a key we already own just renews the lease (idempotent retries).
_CLAIM = """
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if not v then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
    out[i] = 1
  elseif v == 'sent' then
    out[i] = 2
  elseif v == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    out[i] = 1
  else
    out[i] = 3
  end
end
return out
"""

# Same as _CLAIM; kept separate in name only so the intent at call sites is clear:
# extending a lease we hold, or re-taking a key whose lease lapsed with nobody else
# claiming it, are both "still ours"; another claimant means we lost it.
_EXTEND = _CLAIM

# ARGV[1] = our claim value, ARGV[2] = "sent" TTL in ms. Returns how many keys another
# sender had claimed after our lease lapsed (a lapsed key nobody took is harmless).
# Those are still marked sent: the message *was* delivered, and
# recording it stops a third sender from delivering it yet again if the sender that
# took over our lapsed lease fails and releases.
_MARK_SENT = """
local lost = 0
for _, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if v ~= 'sent' then
    if v and v ~= ARGV[1] then lost = lost + 1 end
    redis.call('SET', key, 'sent', 'PX', ARGV[2])
  end
end
return lost
"""

# ARGV[1] = our claim value. Only our own claims are dropped: never a "sent" marker
# and never a claim another sender took after our lease lapsed.
_RELEASE = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
    n = n + 1
  end
end
return n
"""


def idem_key(alert_key: str, channel: str, subscriber_id: str, prefix: str = "tocsin:idem:") -> str:
    """The idempotency key of one (alert, channel, citizen).

    A citizen's places are subscriptions ``<citizen>:<place>``; the key uses the citizen
    part, so someone whose home and work are both in the area is warned once.
    """
    citizen = subscriber_id.split(":", 1)[0]
    return f"{prefix}{alert_key}:{channel}:{citizen}"


class IdempotencyGuard:
    """Claim / mark-sent / release idempotency keys in batches.

    ``ttl_s`` is how long a ``sent`` marker lives (longer than any redelivery or
    replay window: days); ``lease_s`` is how long a claim survives without being
    extended (longer than one provider call, short enough that a crashed sender's
    messages go out soon after). ``chunk_size`` bounds the keys per Lua call so a
    large batch never blocks Redis for long; chunks run concurrently.

    Every method takes an optional ``token``; without it the guard's own token is
    used. The sender passes a fresh :meth:`new_token` per batch.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        ttl_s: float = 7 * 24 * 3600,
        lease_s: float = 15.0,
        *,
        prefix: str = "tocsin:idem:",
        chunk_size: int = 500,
    ) -> None:
        if lease_s <= 0 or ttl_s <= 0:
            raise ValueError("ttl_s and lease_s must be positive")
        self.redis = redis
        self.ttl_s = ttl_s
        self.lease_s = lease_s
        self.prefix = prefix
        self.chunk_size = max(1, chunk_size)
        self.token = self.new_token()
        self._claim = redis.register_script(_CLAIM)
        self._extend = redis.register_script(_EXTEND)
        self._mark = redis.register_script(_MARK_SENT)
        self._release = redis.register_script(_RELEASE)

    @staticmethod
    def new_token() -> str:
        """A fresh claimant token (random, so it never collides across processes)."""
        return secrets.token_hex(8)

    def key(self, alert_key: str, channel: str, subscriber_id: str) -> str:
        """The idempotency key of one (alert, channel, subscriber) with this prefix."""
        return idem_key(alert_key, channel, subscriber_id, self.prefix)

    @property
    def _lease_ms(self) -> int:
        return max(1, int(self.lease_s * 1000))

    def _claim_value(self, token: str | None) -> str:
        return f"{_CLAIM_PREFIX}{token or self.token}"

    async def _run(self, script: Any, keys: Sequence[str], args: list[Any]) -> list[Any]:
        """Run ``script`` over ``keys`` in chunks, concurrently; one reply per chunk."""
        chunks = [keys[i : i + self.chunk_size] for i in range(0, len(keys), self.chunk_size)]
        return list(await asyncio.gather(*(script(keys=list(c), args=args) for c in chunks)))

    async def claim_many(self, keys: Sequence[str], token: str | None = None) -> list[ClaimState]:
        """Try to claim every key; one :class:`ClaimState` per key, in order."""
        if not keys:
            return []
        replies = await self._run(self._claim, keys, [self._claim_value(token), self._lease_ms])
        return [_CODES[int(code)] for reply in replies for code in reply]

    async def extend_many(self, keys: Sequence[str], token: str | None = None) -> list[ClaimState]:
        """Renew our leases before a long step (a retry, a failover).

        CLAIMED means the key is (still, or again) ours; DONE that it was sent
        meanwhile; BUSY that our lease lapsed and another sender holds it now, so we
        must not send it.
        """
        if not keys:
            return []
        replies = await self._run(self._extend, keys, [self._claim_value(token), self._lease_ms])
        return [_CODES[int(code)] for reply in replies for code in reply]

    async def mark_sent_many(self, keys: Sequence[str], token: str | None = None) -> int:
        """Record the keys as sent (TTL ``ttl_s``).

        Returns how many of them another sender had claimed after our lease lapsed:
        those are marked sent all the same, but that sender may deliver them too,
        so the caller should count/log a possible duplicate.
        """
        if not keys:
            return 0
        ttl_ms = max(1, int(self.ttl_s * 1000))
        replies = await self._run(self._mark, keys, [self._claim_value(token), ttl_ms])
        return sum(int(r) for r in replies)

    async def release_many(self, keys: Sequence[str], token: str | None = None) -> int:
        """Drop our claims after a failed send so a later retry can claim them.

        Returns how many claims were ours and released.
        """
        if not keys:
            return 0
        replies = await self._run(self._release, keys, [self._claim_value(token)])
        return sum(int(r) for r in replies)
