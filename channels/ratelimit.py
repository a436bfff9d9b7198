"""Provider rate limits shared by every worker: a token bucket in Redis.

One bucket per provider (``tocsin:ratelimit:<provider>``), a hash holding ``tokens``
and ``ts`` (microseconds). One Lua script refills the bucket from the time elapsed
since ``ts`` and takes ``n`` tokens when there are enough, atomically; the clock is
Redis ``TIME``, so workers on machines with skewed clocks still share one timeline.
When there are not enough tokens the script answers how long until there will be,
and the caller sleeps that long (plus a little jitter so competing workers do not
retry in lock-step).

A bucket starts full: ``burst`` messages may go at once, then ``rate`` per second.
So over any interval of ``T`` seconds at most ``burst + rate * T`` tokens are handed
out, whatever the number of workers.

:class:`RateLimitedProvider` wraps a provider: it cuts each batch into chunks of at
most a third of the bucket and sends a chunk as soon as its tokens are granted,
so messages leave at the rate the tokens arrive instead of in one lump at the end.

What the provider sees is arrival times, which trail the grants by the request
latency; its jitter (a few ms on a LAN) is the only way the count in a window at the
provider can exceed ``burst + rate * T``, by at most ``rate`` times that jitter.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence

import redis.asyncio as aioredis

from channels.base import (
    WITHDRAWN,
    OutgoingMessage,
    Provider,
    ProviderError,
    SendResult,
    gate_open,
)
from channels.events import delivery_events
from streams.records import Channel

__all__ = ["RateLimitedProvider", "RateLimiter"]

# KEYS[1] = bucket; ARGV = rate (tokens/s), capacity, n.
# Returns {granted (1/0), microseconds to wait before asking again}.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rate = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1])
local ts = tonumber(b[2])
if tokens == nil or ts == nil then
  tokens = cap
  ts = now
end
if now > ts then
  tokens = math.min(cap, tokens + (now - ts) * rate / 1000000)
  ts = now
end
local granted = 0
local wait = 0
if tokens >= n then
  tokens = tokens - n
  granted = 1
else
  wait = math.ceil((n - tokens) * 1000000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts))
-- An idle bucket refills to full anyway; let it expire instead of lingering.
redis.call('PEXPIRE', KEYS[1], math.ceil(cap * 1000 / rate) + 60000)
return {granted, wait}
"""


class RateLimiter:
    """A token bucket of ``rate`` messages/s with capacity ``burst``, kept in Redis.

    ``burst=0`` means one second's worth (``ceil(rate)``). Every process creating a
    limiter with the same ``name`` and ``prefix`` shares the bucket.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        name: str,
        rate: float,
        burst: int = 0,
        *,
        prefix: str = "tocsin:ratelimit:",
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive (use no limiter for 'unlimited')")
        self.redis = redis
        self.name = name
        self.rate = float(rate)
        self.burst = int(burst) if burst > 0 else max(1, int(-(-rate // 1)))
        self.key = f"{prefix}{name}"
        self._take = redis.register_script(_TAKE)

    async def try_acquire(self, n: int = 1) -> float:
        """Take ``n`` tokens if available: 0.0 on success, else seconds to wait."""
        if n > self.burst:
            raise ValueError(f"cannot take {n} tokens at once from a bucket of {self.burst}")
        granted, wait_us = await self._take(keys=[self.key], args=[self.rate, self.burst, n])
        return 0.0 if int(granted) else max(int(wait_us), 1) / 1e6

    async def acquire(self, n: int = 1) -> None:
        """Wait until ``n`` tokens (at most ``burst``) are granted."""
        while True:
            wait = await self.try_acquire(n)
            if not wait:
                return
            # Jitter spreads competing workers so one does not always lose the race.
            pause = wait + random.uniform(0, min(0.01, wait))
            delivery_events().rate_limit_wait(self.name, pause)
            await asyncio.sleep(pause)


class RateLimitedProvider:
    """A provider whose requests go out no faster than its :class:`RateLimiter` allows.

    Keeps the wrapped provider's ``name`` and ``channel``. A batch is split into
    chunks of at most ``chunk`` messages (and a third of the bucket); each chunk
    is sent as soon as its tokens are granted, concurrently with the waits for the
    next ones. A chunk whose call raises :class:`ProviderError` yields per-message
    failures instead, because other chunks of the same batch may already be
    delivered and must not be reported as failed; only when every chunk raised is
    the error re-raised.
    """

    def __init__(self, inner: Provider, limiter: RateLimiter, *, chunk: int = 100) -> None:
        self.inner = inner
        self.limiter = limiter
        self.name: str = inner.name
        self.channel: Channel = inner.channel
        # Per-message results and provider acknowledgements pass straight through.
        self.streams_results: bool = getattr(inner, "streams_results", False)
        self.acknowledges: bool = getattr(inner, "acknowledges", False)
        # A third of the bucket at most: a granted chunk goes out as one burst of
        # concurrent requests whose arrival spreads over a few ms; small chunks keep
        # that spread (and so any overshoot seen at the provider) small.
        self.chunk = max(1, min(chunk, limiter.burst // 3))

    async def send_batch(
        self,
        messages: Sequence[OutgoingMessage],
        on_result: Callable[[SendResult], None] | None = None,
    ) -> list[SendResult]:
        """Send ``messages`` chunk by chunk, each after its tokens are granted
        (``on_result`` is handed to the wrapped provider when it streams results)."""
        if not messages:
            return []
        chunks = [messages[i : i + self.chunk] for i in range(0, len(messages), self.chunk)]
        tasks: list[asyncio.Task[list[SendResult]]] = []
        extra = {"on_result": on_result} if on_result and self.streams_results else {}
        withdrawn: list[SendResult] = []
        try:
            for k, part in enumerate(chunks):
                await self.limiter.acquire(len(part))
                if not await gate_open():  # cancelled while it waited: the rest stays
                    held = [m for rest in chunks[k:] for m in rest]
                    withdrawn = [SendResult(m.subscriber_id, ok=False, error=WITHDRAWN)
                                 for m in held]
                    chunks = chunks[:k]
                    break
                tasks.append(asyncio.create_task(self.inner.send_batch(part, **extra)))
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        if not tasks:
            return withdrawn
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if len(failures) == len(outcomes):
            raise failures[0]
        results: list[SendResult] = []
        for part, outcome in zip(chunks, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome  # cancellation and friends are not send failures
                is_provider_error = isinstance(outcome, ProviderError)
                results.extend(
                    SendResult(
                        m.subscriber_id,
                        ok=False,
                        error=str(outcome) if is_provider_error else type(outcome).__name__,
                        retriable=getattr(outcome, "retriable", False),
                        retry_after_s=getattr(outcome, "retry_after_s", None),
                    )
                    for m in part
                )
            else:
                results.extend(outcome)
        return results + withdrawn

    async def aclose(self) -> None:
        """Close the wrapped provider (the bucket lives on in Redis)."""
        await self.inner.aclose()
