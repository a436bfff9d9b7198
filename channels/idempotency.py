"""Idempotency keys that make at-least-once Kafka delivery look exactly-once to a citizen.

Kafka redelivers a delivery batch whenever a worker dies or a rebalance happens before
its offset is committed, and two workers may briefly process the same batch. Each
(alert, channel, citizen) therefore has one Redis key,
``tocsin:idem:{alert_key}:{channel}:{citizen}``, whose value is the state:

``claim:<token>:<deadline ms>``
    a sender owns the message. The lease runs until the deadline (Redis server time,
    so every worker reads the same clock); a live sender keeps pushing it forward
    while a provider call or a retry is in progress. A claim whose deadline passed is
    *lapsed*: the next claimant takes it over and is told so (:attr:`ClaimState.LAPSED`),
    because the crashed owner may have handed the message to the provider already.
    The key itself lives as long as a ``sent`` marker, so a lapse is still recognised
    when the batch is redelivered much later.
``sent`` (TTL = ``ttl_s``, days)
    the provider accepted the message; nobody sends it again.
*absent*
    never claimed, or the claim was released after a failed send.

Every transition is a Lua script, so "check the value and change it" is atomic per key
and a batch costs one round trip (a few concurrent scripts for big batches). A token
identifies one claimant (one ``send_batch`` call), not one process.

**Settling per message.** A message is marked ``sent`` as soon as *its* provider answer
arrives, not when its batch ends: :class:`SentMarker` collects the keys of accepted
messages from every concurrent batch of the process and writes them in one Lua call
every ``max_delay_s`` (5 ms) or every ``max_keys`` (64) answers, whichever comes first
(one Lua call costs the client about 120 us of CPU whatever its size up to ~16 keys:
written one by one, the marks would add some 60% to a message's cost).

**Provider acknowledgements (SMS).** Every SMS request carries a status-callback URL
holding :func:`dedupe_token` -- an opaque hash of (alert, channel, citizen), never a
phone number. The status webhook (``ops/api/webhooks.py``) records each callback under
``tocsin:ack:<token>``. A sender that takes over a
*lapsed* SMS claim first looks for that record, waiting for callbacks until
``ack_wait_s`` (default: one lease) after the lapse; an acknowledged message is marked
sent, not sent again.

What can still repeat, and how many at most, when a worker dies (``kill -9``): the
messages whose acceptance is not yet recorded, i.e. the requests on the wire (at most
the provider's concurrency, C) plus the answers waiting for their mark -- those of the
open 5 ms flush window and of the writes in flight, about
C x (5 ms + Redis write time) / provider round trip: a few dozen against real FCM
(50-100 ms round trips), up to about C more against a loopback stand-in on a loaded
machine (the crash test measured 200-290 per kill with C = 200).

- **push** (C = ``fcm_max_concurrency``, 200): those are sent again after the lease;
  every FCM message of an alert carries the same collapse key
  (``android.collapse_key`` and notification tag, ``apns-collapse-id``, webpush
  ``Topic``), so the device replaces the first with the second: the citizen sees one
  notification;
- **email** (C = ``smtp_pool_size``, 6; a handful measured): the re-sent message has
  the same ``Message-ID`` (per alert and citizen), which mail systems and clients that
  deduplicate by Message-ID collapse;
- **SMS**: only a message the provider accepted but whose first status callback
  (``queued``) did not reach the webhook within ``ack_wait_s`` after the lease lapsed
  -- the webhook down or far behind, or no ``sms_status_callback_url`` configured (then
  SMS has the push window with C = ``sms_max_concurrency``); or a request whose answer
  was lost (timeout, reset) and whose callback had not arrived by the end of the
  retry backoff (0.2-5 s) -- the same sender consults the records before retrying.
  Twilio takes no idempotency key, so a callback is the only proof of acceptance;
- on every channel, a sender whose lease lapsed while it was still alive (an event loop
  stalled for over two thirds of a lease) races its successor: ``mark_sent_many``
  counts those keys and the sender logs them as possible duplicates.

A crash *before* a provider call never loses a message: it only costs one lease of
delay.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import secrets
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

__all__ = [
    "ACK_PREFIX",
    "FLUSH_MAX_DELAY_S",
    "FLUSH_MAX_KEYS",
    "ClaimState",
    "IdempotencyGuard",
    "SentMarker",
    "dedupe_token",
    "idem_key",
    "record_provider_ack",
]

SENT = "sent"
_CLAIM_PREFIX = "claim:"
#: A :class:`SentMarker` writes its marks after this long or once this many are waiting.
FLUSH_MAX_DELAY_S = 0.005
FLUSH_MAX_KEYS = 64
#: Where the status webhook records "the provider accepted the message with this token".
ACK_PREFIX = "tocsin:ack:"


class ClaimState(enum.Enum):
    """Outcome of trying to claim one idempotency key."""

    CLAIMED = "claimed"  # we own it now and must send (then mark sent or release)
    DONE = "done"  # already sent: skip
    BUSY = "busy"  # another live claim holds it: wait for it to finish or expire
    # We own it now, but another sender's lease on it lapsed: that sender may have
    # handed the message to the provider before it died.
    LAPSED = "lapsed"


_CODES = {1: ClaimState.CLAIMED, 2: ClaimState.DONE, 3: ClaimState.BUSY, 4: ClaimState.LAPSED}

# Redis server time in ms, so every worker judges leases by the same clock. TIME before
# a write needs effects replication (the default since Redis 5, the only mode in 7).
_NOW = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# ARGV[1] = our claim value ("claim:<token>"), ARGV[2] = lease in ms, ARGV[3] = how long
# a claim key lives (ms; a lapsed claim is remembered that long). Returns the codes of
# _CODES and, per key, how many ms ago a lapsed claim ran out (0 otherwise).
# Re-claiming a key we already own just renews the lease (idempotent retries). A value
# without a deadline (written by an older version) is live until its key expires.
_CLAIM = (
    _NOW
    + """
local mine = ARGV[1]
local value = mine .. ':' .. (now + tonumber(ARGV[2]))
local codes, ages = {}, {}
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  ages[i] = 0
  if not v then
    redis.call('SET', key, value, 'PX', ARGV[3])
    codes[i] = 1
  elseif v == 'sent' then
    codes[i] = 2
  else
    local owner, deadline = string.match(v, '^(.*):(%d+)$')
    if owner == mine or v == mine then
      redis.call('SET', key, value, 'PX', ARGV[3])
      codes[i] = 1
    elseif deadline and tonumber(deadline) <= now then
      redis.call('SET', key, value, 'PX', ARGV[3])
      codes[i] = 4
      ages[i] = now - tonumber(deadline)
    else
      codes[i] = 3
    end
  end
end
return {codes, ages}
"""
)

# ARGV[1] = "sent" TTL in ms, ARGV[1 + i] = the claim value of the sender marking
# KEYS[i] (one flush carries keys of several batches). Returns, per key, 1 when
# another sender had claimed it after its marker's lease lapsed (a lapsed key nobody
# took is harmless). Those are still marked sent: the message *was* delivered, and
# recording it stops a third sender from delivering it yet again if the sender that
# took over fails and releases.
_MARK_SENT = """
local lost = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  local mine = ARGV[i + 1]
  lost[i] = 0
  if v ~= 'sent' then
    if v and v ~= mine and string.sub(v, 1, #mine + 1) ~= mine .. ':' then lost[i] = 1 end
    redis.call('SET', key, 'sent', 'PX', ARGV[1])
  end
end
return lost
"""

# ARGV[1] = our claim value. Only our own claims are dropped: never a "sent" marker
# and never a claim another sender took after our lease lapsed.
_RELEASE = """
local n = 0
local mine = ARGV[1]
for _, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if v and (v == mine or string.sub(v, 1, #mine + 1) == mine .. ':') then
    redis.call('DEL', key)
    n = n + 1
  end
end
return n
"""


def _citizen(subscriber_id: str) -> str:
    return subscriber_id.split(":", 1)[0]


def idem_key(alert_key: str, channel: str, subscriber_id: str, prefix: str = "tocsin:idem:") -> str:
    """The idempotency key of one (alert, channel, citizen).

    A citizen's places are subscriptions ``<citizen>:<place>``; the key uses the citizen
    part, so someone whose home and work are both in the area is warned once.
    """
    return f"{prefix}{alert_key}:{channel}:{_citizen(subscriber_id)}"


def dedupe_token(alert_key: str, channel: str, subscriber_id: str) -> str:
    """An opaque, stable name for one (alert, channel, citizen): 32 hex digits.

    It travels where an idempotency key must leave our systems -- the SMS status
    callback URL, an email's Message-ID -- and says nothing about the citizen (a hash,
    never a phone number or an address). Every send of the same message carries the
    same token, so a re-send is recognisably the same message.
    """
    raw = f"{alert_key}\x1f{channel}\x1f{_citizen(subscriber_id)}".encode()
    return hashlib.sha256(raw).hexdigest()[:32]


async def record_provider_ack(
    redis: aioredis.Redis, token: str, provider_message_id: str, ttl_s: float
) -> None:
    """Record that the provider accepted the message named by ``token`` (webhooks)."""
    await redis.set(ACK_PREFIX + token, provider_message_id or "1", px=max(1, int(ttl_s * 1000)))


class SentMarker:
    """Marks keys ``sent`` in small batched flushes as provider answers arrive.

    One per guard and event loop, shared by every concurrent batch: :meth:`mark` is a
    plain (non-async) call a provider's per-message callback can make; the keys go
    to Redis in one Lua call after ``max_delay_s`` or once ``max_keys`` are waiting.
    Writes do not wait for each other: a mark is durable ``max_delay_s`` plus one
    Redis round trip after its answer (serialising the writes measured half as many
    repeats again after a kill on a loaded machine). Each mark returns the future of its
    flush, whose result is the set of keys another sender had claimed meanwhile (see
    ``_MARK_SENT``); a Redis error fails it.
    """

    def __init__(
        self,
        guard: IdempotencyGuard,
        max_keys: int = FLUSH_MAX_KEYS,
        max_delay_s: float = FLUSH_MAX_DELAY_S,
    ) -> None:
        self.guard = guard
        self.max_keys = max(1, max_keys)
        self.max_delay_s = max_delay_s
        self._keys: list[str] = []
        self._claims: list[str] = []
        self._future: asyncio.Future[frozenset[str]] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._writes: set[asyncio.Task[None]] = set()

    def mark(self, key: str, token: str) -> asyncio.Future[frozenset[str]]:
        """Queue ``key`` (claimed with ``token``) to be marked sent; its flush's future."""
        if self._future is None:
            loop = asyncio.get_running_loop()
            self._future = loop.create_future()
            self._timer = loop.call_later(self.max_delay_s, self._flush)
        future = self._future
        self._keys.append(key)
        self._claims.append(self.guard.claim_value(token))
        if len(self._keys) >= self.max_keys:
            self._flush()
        return future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        keys, claims, future = self._keys, self._claims, self._future
        if future is None:
            return
        self._keys, self._claims, self._future = [], [], None
        task = asyncio.get_running_loop().create_task(self._write(keys, claims, future))
        self._writes.add(task)  # keep a reference until it is done
        task.add_done_callback(self._writes.discard)

    async def _write(
        self, keys: list[str], claims: list[str], future: asyncio.Future[frozenset[str]]
    ) -> None:
        try:
            lost = await self.guard.mark_sent_each(keys, claims)
        except asyncio.CancelledError:
            # Left pending: a sender waiting on it writes its own marks after a lease
            # (a CancelledError handed to it would look like its own cancellation).
            raise
        except Exception as exc:  # handed to whoever awaits the flush
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(frozenset(lost))


class IdempotencyGuard:
    """Claim / mark-sent / release idempotency keys in batches.

    ``ttl_s`` is how long a ``sent`` marker (and a claim key) lives: longer than any
    redelivery or replay window, days. ``lease_s`` is how long a claim survives without
    being extended (longer than one provider call, short enough that a crashed sender's
    messages go out soon after). ``chunk_size`` bounds the keys per Lua call so a large
    batch never blocks Redis for long; chunks run concurrently.

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
        self._mark = redis.register_script(_MARK_SENT)
        self._release = redis.register_script(_RELEASE)
        self._markers: dict[asyncio.AbstractEventLoop, SentMarker] = {}

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

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl_s * 1000))

    def claim_value(self, token: str | None = None) -> str:
        """The value prefix our claims carry (``claim:<token>``)."""
        return f"{_CLAIM_PREFIX}{token or self.token}"

    def marker(self) -> SentMarker:
        """The running loop's :class:`SentMarker` (one per loop: tests use several)."""
        loop = asyncio.get_running_loop()
        marker = self._markers.get(loop)
        if marker is None:
            for old in [lp for lp in self._markers if lp.is_closed()]:
                del self._markers[old]
            marker = self._markers[loop] = SentMarker(self)
        return marker

    async def _run(self, script: Any, keys: Sequence[str], args: list[Any]) -> list[Any]:
        """Run ``script`` over ``keys`` in chunks, concurrently; one reply per chunk."""
        chunks = [keys[i : i + self.chunk_size] for i in range(0, len(keys), self.chunk_size)]
        return list(await asyncio.gather(*(script(keys=list(c), args=args) for c in chunks)))

    async def claim_batch(
        self, keys: Sequence[str], token: str | None = None
    ) -> list[tuple[ClaimState, float]]:
        """Try to claim every key: per key its state and, for :attr:`ClaimState.LAPSED`,
        how many seconds ago the previous claim's lease ran out (0.0 otherwise)."""
        if not keys:
            return []
        args = [self.claim_value(token), self._lease_ms, self._ttl_ms]
        replies = await self._run(self._claim, keys, args)
        return [
            (_CODES[int(code)], int(age) / 1000)
            for codes, ages in replies
            for code, age in zip(codes, ages, strict=True)
        ]

    async def claim_many(self, keys: Sequence[str], token: str | None = None) -> list[ClaimState]:
        """Try to claim every key; one :class:`ClaimState` per key, in order."""
        return [state for state, _ in await self.claim_batch(keys, token)]

    async def extend_many(self, keys: Sequence[str], token: str | None = None) -> list[ClaimState]:
        """Renew our leases before a long step (a retry, a failover).

        CLAIMED means the key is (still, or again) ours; DONE that it was sent
        meanwhile; BUSY that our lease lapsed and another sender holds it now, so we
        must not send it. (A key another sender took and then let lapse in turn is
        ours again: CLAIMED.)
        """
        states = await self.claim_many(keys, token)
        return [ClaimState.CLAIMED if s is ClaimState.LAPSED else s for s in states]

    async def mark_sent_each(self, keys: Sequence[str], claims: Sequence[str]) -> list[str]:
        """Mark ``keys[i]`` sent on behalf of the claim value ``claims[i]``; return the
        keys another sender had claimed meanwhile (possible duplicates)."""
        lost: list[str] = []
        for i in range(0, len(keys), self.chunk_size):
            part = list(keys[i : i + self.chunk_size])
            flags = await self._mark(
                keys=part, args=[self._ttl_ms, *claims[i : i + self.chunk_size]]
            )
            lost.extend(k for k, flag in zip(part, flags, strict=True) if int(flag))
        return lost

    async def mark_sent_many(self, keys: Sequence[str], token: str | None = None) -> int:
        """Record the keys as sent (TTL ``ttl_s``).

        Returns how many of them another sender had claimed after our lease lapsed:
        those are marked sent all the same, but that sender may deliver them too,
        so the caller should count/log a possible duplicate.
        """
        if not keys:
            return 0
        return len(await self.mark_sent_each(keys, [self.claim_value(token)] * len(keys)))

    async def release_many(self, keys: Sequence[str], token: str | None = None) -> int:
        """Drop our claims after a failed send so a later retry can claim them.

        Returns how many claims were ours and released.
        """
        if not keys:
            return 0
        replies = await self._run(self._release, keys, [self.claim_value(token)])
        return sum(int(r) for r in replies)

    async def acknowledged(self, tokens: Sequence[str]) -> list[bool]:
        """Whether the provider acknowledged each :func:`dedupe_token` (one MGET)."""
        if not tokens:
            return []
        values = await self.redis.mget([ACK_PREFIX + t for t in tokens])
        return [v is not None for v in values]
