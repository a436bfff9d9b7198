"""The Redis token bucket: shared by every worker, never exceeded at the provider.

Two "workers" -- two Redis clients, two provider stacks built from the same settings,
each running the sender on its own half of an alert -- push through the FCM stand-in
at a configured rate; the stand-in's arrival timestamps must never show more than
``rate + burst`` messages in any one-second window.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence

import pytest
import redis.asyncio as aioredis

from channels.base import SEND_GATE, OutgoingMessage, Provider, ProviderError, SendResult
from channels.contacts import Contact, ContactStore
from channels.idempotency import IdempotencyGuard
from channels.ratelimit import RateLimitedProvider, RateLimiter
from channels.registry import build_providers
from channels.sender import send_batch
from ops.settings import Settings
from streams.records import Alert, DeliveryBatch, Info, Receipt, Recipient
from templates.render import Renderer
from tests.standins.fcm import FcmStandIn

pytestmark = pytest.mark.integration

ALERT = Alert(
    identifier="TOCSIN-RATE-1",
    sender="ops@tocsin.example",
    sent="2024-05-01T10:00:00+00:00",
    status="Test",
    msg_type="Alert",
    scope="Public",
    infos=[Info(event="Tornado Warning", severity="Extreme", expires="2999-01-01T00:00:00Z")],
)


@pytest.fixture
async def clients(redis_url: str) -> AsyncIterator[list[aioredis.Redis]]:
    pair = [aioredis.Redis.from_url(redis_url) for _ in range(2)]
    yield pair
    for client in pair:
        await client.aclose()  # type: ignore[attr-defined]


def max_in_window(times: Sequence[float], window: float = 1.0) -> int:
    """The most events in any half-open interval ``[t, t + window)``."""
    ordered = sorted(times)
    best = lo = 0
    for hi, t in enumerate(ordered):
        while ordered[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


async def test_bucket_grants_burst_then_rate(clients: list[aioredis.Redis]) -> None:
    limiter = RateLimiter(clients[0], "unit", rate=50, burst=10)
    assert await limiter.try_acquire(10) == 0.0  # a full bucket
    wait = await limiter.try_acquire(5)
    assert 0.05 < wait <= 0.11  # 5 tokens at 50/s: ~0.1 s
    started = time.monotonic()
    await limiter.acquire(5)
    assert time.monotonic() - started >= 0.05
    with pytest.raises(ValueError):
        await limiter.try_acquire(11)  # larger than the bucket: could never be granted
    with pytest.raises(ValueError):
        RateLimiter(clients[0], "unit", rate=0)


async def test_two_workers_never_exceed_the_configured_rate(
    clients: list[aioredis.Redis],
) -> None:
    rate, burst, n = 150, 30, 480
    async with FcmStandIn(project="tocsin-test").running() as fcm:
        settings = Settings(
            channel_providers="push=fcm",
            fcm_base_url=fcm.url,
            fcm_project_id=fcm.project,
            fcm_access_token="standin-token",
            fcm_rate_per_s=rate,
            fcm_rate_burst=burst,
        )
        store = ContactStore(clients[0])
        await store.put_many({f"s{i}": Contact(push_token=f"tok-{i:05d}-rate") for i in range(n)})
        workers = []
        for k, client in enumerate(clients):
            providers = build_providers(settings, "push", client)
            assert isinstance(providers[0], RateLimitedProvider)
            # Each worker gets batches of its own half, as Kafka partitions would.
            batches = [
                DeliveryBatch(
                    alert_key=ALERT.key,
                    channel="push",
                    recipients=[Recipient(f"s{i}", "en") for i in range(s, s + 60)],
                )
                for s in range(k * n // 2, (k + 1) * n // 2, 60)
            ]
            workers.append((client, providers, batches))

        async def run(
            client: aioredis.Redis, providers: list[Provider], batches: list[DeliveryBatch]
        ) -> list[Receipt]:
            guard = IdempotencyGuard(client, 3600, 5.0)
            receipts = await asyncio.gather(
                *(
                    send_batch(
                        b,
                        ALERT,
                        contacts=ContactStore(client),
                        guard=guard,
                        providers=providers,
                        renderer=Renderer(),
                    )
                    for b in batches
                )
            )
            for p in providers:
                await p.aclose()
            return receipts

        started = time.monotonic()
        async with asyncio.timeout(30):
            results = await asyncio.gather(*(run(*w) for w in workers))
        elapsed = time.monotonic() - started
    statuses = Counter(x.status for receipts in results for rc in receipts for x in rc.results)
    assert statuses == {"sent": n}
    assert Counter(x.address for x in fcm.received) == {f"tok-{i:05d}-rate": 1 for i in range(n)}
    peak = max_in_window([x.at for x in fcm.received])
    print(f"peak {peak} per 1 s window (limit {rate} + {burst}), {elapsed:.2f} s")
    # The bucket bounds when tokens are taken; the stand-in stamps arrival, which
    # scheduling on this shared 2-core machine can shift by tens of milliseconds (up to
    # ~100 ms seen with a dozen other processes busy). Allow that shift (100 ms of rate)
    # on top of the bucket's own bound, and no more; test_bucket_grants_burst_then_rate
    # holds the bucket itself to the exact bound.
    assert peak <= rate + burst + rate * 0.1
    assert elapsed >= (n - burst) / rate * 0.9  # the limit really was what held them back


class _Flaky:
    """Fails every second chunk as a whole call."""

    name, channel = "flaky", "push"

    def __init__(self) -> None:
        self.calls = 0

    async def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        self.calls += 1
        if self.calls % 2 == 0:
            raise ProviderError("503 from upstream", retry_after_s=2.0)
        return [SendResult(m.subscriber_id, ok=True) for m in messages]

    async def aclose(self) -> None:
        pass


async def test_a_failed_chunk_does_not_fail_delivered_ones(clients: list[aioredis.Redis]) -> None:
    provider = RateLimitedProvider(
        _Flaky(),  # type: ignore[arg-type]
        RateLimiter(clients[0], "flaky", rate=10_000, burst=30),  # chunks of 10
    )
    msgs = [OutgoingMessage(f"s{i}", f"a{i}", "push", "k", "en", "", "") for i in range(30)]
    results = await provider.send_batch(msgs)
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    assert len(ok) == 20 and len(failed) == 10
    assert all(r.retriable and r.retry_after_s == 2.0 for r in failed)


async def test_a_batch_waiting_for_tokens_stops_when_its_gate_closes(
    clients: list[aioredis.Redis],
) -> None:
    """An alert cancelled while its batch waits for rate-limit tokens: the chunks not yet
    sent never reach the provider and settle as ``cancelled`` (no retry, no failover)."""
    n = 40
    async with FcmStandIn(project="tocsin-test").running() as fcm:
        settings = Settings(
            channel_providers="push=fcm", fcm_base_url=fcm.url, fcm_project_id=fcm.project,
            fcm_access_token="standin-token", fcm_rate_per_s=40, fcm_rate_burst=6,
        )  # fmt: skip
        store = ContactStore(clients[0])
        await store.put_many({f"g{i}": Contact(push_token=f"tok-{i:05d}-gate") for i in range(n)})
        batch = DeliveryBatch(alert_key=ALERT.key, channel="push",
                              recipients=[Recipient(f"g{i}", "en") for i in range(n)])

        async def gate() -> bool:  # "cancelled" once a quarter is out
            return len(fcm.received) < n // 4

        providers = build_providers(settings, "push", clients[0])
        token = SEND_GATE.set(gate)
        try:
            receipt = await send_batch(
                batch, ALERT, contacts=store, guard=IdempotencyGuard(clients[0], 3600, 5.0),
                providers=providers, renderer=Renderer(),
            )  # fmt: skip
        finally:
            SEND_GATE.reset(token)
            for p in providers:
                await p.aclose()
    statuses = Counter(x.status for x in receipt.results)
    assert statuses["sent"] == len(fcm.received) and n // 4 <= len(fcm.received) < n // 2
    assert statuses["cancelled"] == n - len(fcm.received)
    assert all(x.error.startswith("withdrawn") for x in receipt.results
               if x.status == "cancelled")  # fmt: skip
