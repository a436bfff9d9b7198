"""Sender, contact vault and idempotency guard against a real redis-server.

Waiting is always on a condition with a deadline (``asyncio.timeout``), never a fixed
sleep: the crashed-worker case polls until the stale lease lapses.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from channels.base import OutgoingMessage, Provider, ProviderError, SendResult
from channels.contacts import Contact, ContactStore
from channels.idempotency import ClaimState, IdempotencyGuard
from channels.outbox import OutboxProvider, read_outbox
from channels.sender import send_batch
from streams.records import Alert, Channel, DeliveryBatch, Info, Receipt, Recipient
from templates.render import Renderer

pytestmark = pytest.mark.integration

ALERT = Alert(
    identifier="TOCSIN-TEST-1",
    sender="ops@tocsin.example",
    sent="2024-05-01T10:00:00+00:00",
    status="Test",
    msg_type="Alert",
    scope="Public",
    infos=[
        Info(
            language="en-US",
            event="Flood Warning",
            headline="River flooding",
            instruction="Move to higher ground.",
            expires="2999-01-01T00:00:00+00:00",
        ),
        Info(language="es-US", event="Aviso de inundación", headline="Inundación"),
    ],
)
FAST = {"backoff_base_s": 0.001, "backoff_max_s": 0.01}


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()  # type: ignore[attr-defined]  # (types-redis predates aclose)


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    return tmp_path / "outbox.jsonl"


def sid(i: int) -> str:
    return f"sub-{i:05d}"


def contact_for(i: int) -> Contact:
    return Contact(push_token=f"tok-{i:05d}-x9", phone=f"+1555{i:07d}", email=f"c{i}@mail.example")


async def seed(store: ContactStore, n: int, skip: Sequence[int] = ()) -> None:
    await store.put_many({sid(i): contact_for(i) for i in range(n) if i not in skip})


def make_batch(
    n: int, channel: Channel = "push", order: Sequence[int] | None = None
) -> DeliveryBatch:
    ids = list(order) if order is not None else list(range(n))
    return DeliveryBatch(
        alert_key=ALERT.key,
        channel=channel,
        recipients=[Recipient(sid(i), "es" if i % 3 == 0 else "en-US") for i in ids],
    )


def assert_no_addresses(receipt: Receipt, n: int) -> None:
    text = msgspec.json.encode(receipt).decode()
    for i in range(n):
        c = contact_for(i)
        assert c.push_token not in text and c.phone not in text and c.email not in text


def per_subscriber(path: Path) -> Counter[str]:
    return Counter(line["subscriber_id"] for line in read_outbox(path))


async def deliver(
    r: aioredis.Redis,
    batch: DeliveryBatch,
    providers: Sequence[Provider],
    guard: IdempotencyGuard | None = None,
    **kw: float,
) -> Receipt:
    return await send_batch(
        batch,
        ALERT,
        contacts=ContactStore(r),
        guard=guard or IdempotencyGuard(r, 3600, 5.0),
        providers=providers,
        renderer=Renderer(),
        **{**FAST, **kw},  # type: ignore[arg-type]
    )


class ScriptedProvider:
    """A provider that fails as told, then hands the messages to an outbox."""

    def __init__(
        self,
        inner: OutboxProvider,
        *,
        raise_times: int = 0,
        retriable: bool = True,
        per_recipient_failures: int = 0,
        name: str = "scripted",
    ) -> None:
        self.inner, self.name, self.channel = inner, name, inner.channel
        self.raise_times, self.retriable = raise_times, retriable
        self.per_recipient_failures = per_recipient_failures
        self.calls = 0
        self.delay_s = 0.0
        self.entered = asyncio.Event()

    async def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        self.calls += 1
        self.entered.set()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.calls <= self.raise_times:
            # Echo an address, as careless providers do; the receipt must not show it.
            raise ProviderError(
                f"503 from upstream for {messages[0].address}", retriable=self.retriable
            )
        if self.calls <= self.per_recipient_failures:
            # Odd subscribers fail retriably this time; the rest go through.
            odd = [m for m in messages if int(m.subscriber_id[-1]) % 2]
            even = [m for m in messages if not int(m.subscriber_id[-1]) % 2]
            return [
                *await self.inner.send_batch(even),
                *(
                    SendResult(
                        m.subscriber_id, ok=False, retriable=True, error=f"throttled {m.address}"
                    )
                    for m in odd
                ),
            ]
        return await self.inner.send_batch(messages)

    async def aclose(self) -> None:
        await self.inner.aclose()


# -- the contact vault and the guard ------------------------------------------------------------


async def test_contact_store_roundtrip(r: aioredis.Redis) -> None:
    store = ContactStore(r)
    await store.put("a", Contact(push_token="tokA", email="a@x.example"))
    await store.put_many({"b": Contact(phone="+15550001"), "c": Contact()})
    assert await store.get_addresses(["a", "b", "c", "zz"], "push") == {"a": "tokA"}
    assert await store.get_addresses(["a", "b"], "sms") == {"b": "+15550001"}
    assert await store.get_addresses(["a", "a"], "email") == {"a": "a@x.example"}
    # put replaces: a cleared field does not linger.
    await store.put("a", Contact(email="a2@x.example"))
    assert await store.get("a") == Contact(email="a2@x.example")
    # invalidate only prunes the address that failed, not a fresh one.
    assert not await store.invalidate("a", "email", expected="a@x.example")
    assert await store.invalidate("a", "email", expected="a2@x.example")
    assert await store.get("a") is None
    await store.delete("b")
    assert await store.get_addresses(["b"], "sms") == {}


async def test_guard_states_and_ownership(r: aioredis.Redis) -> None:
    guard = IdempotencyGuard(r, ttl_s=60, lease_s=30)
    k = [guard.key("alert", "push", s) for s in ("x", "y")]
    mine, theirs = guard.new_token(), guard.new_token()
    assert await guard.claim_many(k, mine) == [ClaimState.CLAIMED] * 2
    assert await guard.claim_many(k, mine) == [ClaimState.CLAIMED] * 2  # re-entrant
    assert await guard.claim_many(k, theirs) == [ClaimState.BUSY] * 2
    assert await guard.release_many(k, theirs) == 0  # cannot drop someone else's claim
    assert await guard.mark_sent_many(k[:1], mine) == 0
    assert await guard.release_many(k, mine) == 1  # "sent" is never released
    assert await guard.claim_many(k, theirs) == [ClaimState.DONE, ClaimState.CLAIMED]
    # our lease "lapsed" and the other sender took y: still marked sent, reported lost.
    assert await guard.mark_sent_many(k[1:], mine) == 1
    assert await r.get(k[1]) == b"sent"
    assert 50 < await r.ttl(k[1]) <= 60


# -- send_batch ----------------------------------------------------------------------------------


async def test_batch_of_1000_delivered_once_then_duplicate(r: aioredis.Redis, outbox: Path) -> None:
    await seed(ContactStore(r), 1000)
    provider = OutboxProvider(outbox, "push")
    receipt = await deliver(r, make_batch(1000), [provider])
    assert receipt.provider == "outbox"
    assert len(receipt.results) == 1000
    assert Counter(x.status for x in receipt.results) == {"sent": 1000}
    lines = read_outbox(outbox)
    assert per_subscriber(outbox) == {sid(i): 1 for i in range(1000)}
    by_sub = {line["subscriber_id"]: line for line in lines}
    assert by_sub[sid(1)]["to"] == contact_for(1).push_token
    assert by_sub[sid(1)]["subject"] == "TEST: Flood Warning"
    assert by_sub[sid(3)]["language"] == "es-US"
    assert "Inundación" in by_sub[sid(3)]["body"]
    assert_no_addresses(receipt, 1000)

    again = await deliver(r, make_batch(1000), [provider])
    assert Counter(x.status for x in again.results) == {"duplicate": 1000}
    assert len(read_outbox(outbox)) == 1000


async def test_a_citizen_with_several_places_in_the_area_is_warned_once(
    r: aioredis.Redis, outbox: Path
) -> None:
    store = ContactStore(r)
    for place in ("home", "work", "school"):
        await store.put(f"ana:{place}", Contact(phone="+15550100001"))
    await store.put("bo:home", Contact(phone="+15550100002"))
    provider = OutboxProvider(outbox, "sms")
    first = DeliveryBatch(
        alert_key=ALERT.key,
        channel="sms",
        recipients=[Recipient(s, "en") for s in ("ana:home", "bo:home", "ana:work")],
    )
    receipt = await deliver(r, first, [provider])
    assert [(x.subscriber_id, x.status) for x in receipt.results] == [
        ("ana:home", "sent"), ("bo:home", "sent"), ("ana:work", "duplicate"),
    ]  # fmt: skip
    # Another batch (another shard) naming a third place of hers: still once.
    later = DeliveryBatch(
        alert_key=ALERT.key, channel="sms", recipients=[Recipient("ana:school", "en")]
    )
    assert [x.status for x in (await deliver(r, later, [provider])).results] == ["duplicate"]
    assert per_subscriber(outbox) == {"ana:home": 1, "bo:home": 1}


async def test_missing_contact_is_no_contact(r: aioredis.Redis, outbox: Path) -> None:
    store = ContactStore(r)
    await seed(store, 10, skip=[2, 5])
    await store.put(sid(7), Contact(email="only-email@x.example"))  # nothing for SMS
    receipt = await deliver(r, make_batch(10, "sms"), [OutboxProvider(outbox, "sms")])
    status = {x.subscriber_id: x.status for x in receipt.results}
    assert [s for s, v in status.items() if v == "no_contact"] == [sid(2), sid(5), sid(7)]
    assert set(per_subscriber(outbox)) == {sid(i) for i in range(10)} - {sid(2), sid(5), sid(7)}
    assert {line["channel"] for line in read_outbox(outbox)} == {"sms"}


async def test_retriable_provider_error_then_success(r: aioredis.Redis, outbox: Path) -> None:
    await seed(ContactStore(r), 50)
    flaky = ScriptedProvider(OutboxProvider(outbox, "push"), raise_times=2)
    receipt = await deliver(r, make_batch(50), [flaky])
    assert flaky.calls == 3
    assert receipt.provider == "scripted"
    assert Counter(x.status for x in receipt.results) == {"sent": 50}
    assert per_subscriber(outbox) == {sid(i): 1 for i in range(50)}


async def test_per_recipient_retriable_failures_are_retried(
    r: aioredis.Redis, outbox: Path
) -> None:
    await seed(ContactStore(r), 40)
    flaky = ScriptedProvider(OutboxProvider(outbox, "push"), per_recipient_failures=2)
    receipt = await deliver(r, make_batch(40), [flaky])
    assert flaky.calls == 3
    assert Counter(x.status for x in receipt.results) == {"sent": 40}
    assert per_subscriber(outbox) == {sid(i): 1 for i in range(40)}


async def test_failing_provider_fails_over_to_outbox(r: aioredis.Redis, outbox: Path) -> None:
    await seed(ContactStore(r), 30)
    down = ScriptedProvider(OutboxProvider(outbox, "push"), raise_times=10**6, name="fcm")
    receipt = await deliver(r, make_batch(30), [down, OutboxProvider(outbox, "push")])
    assert down.calls == 3  # max_attempts on the first provider, then failover
    assert receipt.provider == "outbox"
    assert Counter(x.status for x in receipt.results) == {"sent": 30}
    assert per_subscriber(outbox) == {sid(i): 1 for i in range(30)}


async def test_non_retriable_error_fails_over_at_once(r: aioredis.Redis, outbox: Path) -> None:
    await seed(ContactStore(r), 5)
    bad = ScriptedProvider(OutboxProvider(outbox, "push"), raise_times=10**6, retriable=False)
    receipt = await deliver(r, make_batch(5), [bad, OutboxProvider(outbox, "push")])
    assert bad.calls == 1
    assert Counter(x.status for x in receipt.results) == {"sent": 5}


async def test_all_providers_failing_releases_claims(r: aioredis.Redis, outbox: Path) -> None:
    await seed(ContactStore(r), 20)
    down = ScriptedProvider(OutboxProvider(outbox, "push"), raise_times=10**6)
    receipt = await deliver(r, make_batch(20), [down])
    assert Counter(x.status for x in receipt.results) == {"failed": 20}
    assert all(x.error.startswith("scripted: 503") for x in receipt.results)
    assert "<address>" in receipt.results[0].error  # the echoed token was scrubbed
    assert_no_addresses(receipt, 20)
    assert read_outbox(outbox) == []
    # Claims were released, so a redelivered batch goes out at once.
    again = await deliver(r, make_batch(20), [OutboxProvider(outbox, "push")], busy_wait_s=0)
    assert Counter(x.status for x in again.results) == {"sent": 20}


async def test_per_recipient_errors_are_scrubbed(r: aioredis.Redis, outbox: Path) -> None:
    await seed(ContactStore(r), 10)
    throttled = ScriptedProvider(OutboxProvider(outbox, "email"), per_recipient_failures=99)
    receipt = await deliver(r, make_batch(10, "email"), [throttled])
    failed = [x for x in receipt.results if x.status == "failed"]
    assert len(failed) == 5 and all(x.error == "scripted: throttled <address>" for x in failed)
    assert_no_addresses(receipt, 10)


async def test_invalid_address_is_pruned(r: aioredis.Redis, outbox: Path) -> None:
    store = ContactStore(r)
    await seed(store, 3)

    class Unregistered:
        name, channel = "fcm", "push"

        async def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
            return [
                SendResult(
                    m.subscriber_id,
                    ok=m.subscriber_id != sid(1),
                    invalid_address=m.subscriber_id == sid(1),
                    error="UNREGISTERED",
                )
                for m in messages
            ]

        async def aclose(self) -> None:
            pass

    receipt = await deliver(r, make_batch(3), [Unregistered()])  # type: ignore[list-item]
    status = {x.subscriber_id: (x.status, x.error) for x in receipt.results}
    assert status[sid(1)] == ("failed", "fcm: invalid address")
    assert status[sid(0)][0] == status[sid(2)][0] == "sent"
    assert await store.get_addresses([sid(1)], "push") == {}
    assert await store.get_addresses([sid(1)], "sms") == {sid(1): contact_for(1).phone}


async def test_crashed_workers_claim_is_taken_over(r: aioredis.Redis, outbox: Path) -> None:
    await seed(ContactStore(r), 100)
    guard = IdempotencyGuard(r, 3600, 5.0)
    crashed = [sid(i) for i in range(0, 100, 7)]
    for s in crashed:  # a worker claimed these, then died before sending
        await r.set(guard.key(ALERT.key, "push", s), "claim:deadworker", px=300)
    async with asyncio.timeout(10):
        receipt = await deliver(r, make_batch(100), [OutboxProvider(outbox, "push")], guard)
    assert Counter(x.status for x in receipt.results) == {"sent": 100}
    assert per_subscriber(outbox) == {sid(i): 1 for i in range(100)}


async def test_busy_wait_is_bounded(r: aioredis.Redis, outbox: Path) -> None:
    await seed(ContactStore(r), 2)
    guard = IdempotencyGuard(r, 3600, 5.0)
    await r.set(guard.key(ALERT.key, "push", sid(0)), "claim:alive", px=60_000)
    async with asyncio.timeout(5):
        receipt = await deliver(
            r, make_batch(2), [OutboxProvider(outbox, "push")], guard, busy_wait_s=0.3
        )
    status = {x.subscriber_id: (x.status, x.error) for x in receipt.results}
    assert status == {sid(0): ("failed", "claim busy"), sid(1): ("sent", "")}


async def test_two_racing_senders_deliver_each_recipient_once(
    r: aioredis.Redis, outbox: Path
) -> None:
    await seed(ContactStore(r), 1000)
    orders = [random.Random(seed).sample(range(1000), 1000) for seed in (1, 2)]
    # Small chunks make the two senders' claim scripts interleave.
    receipts = await asyncio.gather(
        *(
            deliver(
                r,
                make_batch(1000, order=order),
                [OutboxProvider(outbox, "push")],
                IdempotencyGuard(r, 3600, 5.0, chunk_size=50),
            )
            for order in orders
        )
    )
    assert per_subscriber(outbox) == {sid(i): 1 for i in range(1000)}
    statuses: dict[str, list[str]] = {}
    for receipt in receipts:
        for x in receipt.results:
            statuses.setdefault(x.subscriber_id, []).append(x.status)
    assert all(sorted(v) == ["duplicate", "sent"] for v in statuses.values())


async def test_slow_provider_keeps_its_lease(r: aioredis.Redis, outbox: Path) -> None:
    """A provider call longer than the lease must not let a second sender resend."""
    await seed(ContactStore(r), 20)
    slow = ScriptedProvider(OutboxProvider(outbox, "push"))
    slow.delay_s = 0.8  # > lease below; the lease keeper renews every lease/3
    guard_a, guard_b = IdempotencyGuard(r, 3600, 0.3), IdempotencyGuard(r, 3600, 0.3)
    first = asyncio.create_task(deliver(r, make_batch(20), [slow], guard_a))
    async with asyncio.timeout(10):
        await slow.entered.wait()  # the first sender holds its claims and is sending
        second = await deliver(r, make_batch(20), [OutboxProvider(outbox, "push")], guard_b)
        await first
    assert Counter(x.status for x in second.results) == {"duplicate": 20}
    assert per_subscriber(outbox) == {sid(i): 1 for i in range(20)}


async def test_mismatched_alert_is_refused(r: aioredis.Redis, outbox: Path) -> None:
    batch = DeliveryBatch(alert_key="not-this-alert", channel="push", recipients=[])
    with pytest.raises(ValueError, match="different alert keys"):
        await deliver(r, batch, [OutboxProvider(outbox, "push")])


async def test_outbox_reader_skips_torn_last_line(outbox: Path) -> None:
    provider = OutboxProvider(outbox, "email", fsync=True)
    msg = OutgoingMessage("s1", "a@x.example", "email", "k", "en", "subj", "body")
    assert (await provider.send_batch([msg]))[0].ok
    with outbox.open("a") as fh:
        fh.write('{"channel": "email", "subscr')
    lines = read_outbox(outbox)
    assert len(lines) == 1 and lines[0]["to"] == "a@x.example" and lines[0]["subject"] == "subj"
    assert isinstance(provider, Provider)
