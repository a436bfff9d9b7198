"""The pieces that keep a crash from warning a citizen twice, each on its own.

- a message is marked sent in Redis as soon as *its* provider answer arrives, while
  the rest of its batch is still on the wire;
- an SMS the provider acknowledged (status callback recorded) before the sender
  died is marked sent by the sender that takes over, not texted again -- even when
  the acknowledgement arrives while the new sender is waiting for it;
- every SMS names itself in its StatusCallback URL with an opaque token, never the
  number; push messages of one alert share one collapse key on every platform; an
  email's Message-ID depends on the alert and the citizen only.

Real redis-server, real HTTP stand-ins (in-process aiohttp servers).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from urllib.parse import parse_qs, urlsplit

import pytest
import redis.asyncio as aioredis
from firebase_admin import messaging

from channels.base import OutgoingMessage, SendResult
from channels.contacts import Contact, ContactStore
from channels.email import SmtpProvider
from channels.fcm import FcmProvider, StaticToken, build_message
from channels.idempotency import IdempotencyGuard, dedupe_token, record_provider_ack
from channels.sender import send_batch
from channels.sms import SmsProvider
from streams.records import Alert, DeliveryBatch, Info, Recipient
from templates.render import Renderer
from tests.standins.fcm import FcmStandIn
from tests.standins.sms import SmsStandIn

pytestmark = pytest.mark.integration

SID, AUTH = "AC" + "e" * 32, "exactly-once-token"
ALERT = Alert(
    identifier="EXACTLY-ONCE-1",
    sender="tests@tocsin.example",
    sent="2024-05-01T10:00:00+00:00",
    status="Actual",
    msg_type="Alert",
    scope="Public",
    infos=[
        Info(
            language="en-US",
            event="Flood Warning",
            headline="River flooding",
            severity="Severe",
            urgency="Immediate",
            expires="2999-01-01T00:00:00+00:00",
        )
    ],
)


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()  # type: ignore[attr-defined]


def sid(i: int) -> str:
    return f"cit-{i:04d}"


def phone(i: int) -> str:
    return f"+1555{i:07d}"


async def seed(r: aioredis.Redis, n: int) -> None:
    contacts = {
        sid(i): Contact(push_token=f"token-{i:04d}-x", phone=phone(i), email=f"c{i}@x.example")
        for i in range(n)
    }
    await ContactStore(r).put_many(contacts)


def batch(n: int, channel: str = "push") -> DeliveryBatch:
    return DeliveryBatch(
        alert_key=ALERT.key,
        channel=channel,  # type: ignore[arg-type]
        recipients=[Recipient(sid(i), "en") for i in range(n)],
    )


async def test_each_message_is_marked_sent_as_its_answer_arrives(r: aioredis.Redis) -> None:
    await seed(r, 40)
    guard = IdempotencyGuard(r, 3600, 5.0)
    keys = [guard.key(ALERT.key, "push", sid(i)) for i in range(40)]
    async with FcmStandIn(project="p", tokens={"t"}).running() as fcm:
        fcm.faults.latency_s = 0.02  # one request at a time: about a second for the batch
        provider = FcmProvider(fcm.url, "p", StaticToken("t"), max_concurrency=1)
        task = asyncio.create_task(
            send_batch(
                batch(40), ALERT, contacts=ContactStore(r), guard=guard,
                providers=[provider], renderer=Renderer(),
            )
        )  # fmt: skip
        marked_early = 0
        async with asyncio.timeout(30):
            while not task.done():
                values = await r.mget(keys)
                if not task.done():
                    marked_early = max(marked_early, sum(v == b"sent" for v in values))
                await asyncio.sleep(0.01)
        receipt = await task
        await provider.aclose()
    assert Counter(x.status for x in receipt.results) == {"sent": 40}
    # Before the batch ended, most of its messages were already recorded as sent: a
    # crash then could only have re-sent the one request in flight (and a flush).
    assert marked_early >= 20, marked_early


class StuckFirstWrite(IdempotencyGuard):
    """A guard whose first batched mark write never returns (a stuck connection)."""

    stuck = False

    async def mark_sent_each(self, keys: Sequence[str], claims: Sequence[str]) -> list[str]:
        if not self.stuck:
            self.stuck = True
            await asyncio.Event().wait()
        return await super().mark_sent_each(keys, claims)


async def test_a_stuck_mark_write_delays_a_batch_by_one_lease_at_most(
    r: aioredis.Redis,
) -> None:
    await seed(r, 30)
    guard = StuckFirstWrite(r, 3600, 0.5)
    async with FcmStandIn(project="p", tokens={"t"}).running() as fcm:
        provider = FcmProvider(fcm.url, "p", StaticToken("t"))
        async with asyncio.timeout(10):
            receipt = await send_batch(
                batch(30), ALERT, contacts=ContactStore(r), guard=guard,
                providers=[provider], renderer=Renderer(),
            )  # fmt: skip
        await provider.aclose()
    assert Counter(x.status for x in receipt.results) == {"sent": 30}
    values = await r.mget([guard.key(ALERT.key, "push", sid(i)) for i in range(30)])
    assert values == [b"sent"] * 30


async def _redis_ms(r: aioredis.Redis) -> int:
    seconds, micros = await r.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def test_acknowledged_sms_of_a_crashed_sender_is_not_sent_again(r: aioredis.Redis) -> None:
    n = 20
    await seed(r, n)
    guard = IdempotencyGuard(r, 3600, 5.0)
    now_ms = await _redis_ms(r)
    # A worker claimed 0..9 and died; its lease ran out just now. It had handed 0..4
    # to the provider, whose callbacks were recorded; 5's callback is still on its way.
    for i in range(10):
        await r.set(guard.key(ALERT.key, "sms", sid(i)), f"claim:deadbeef:{now_ms - 5}")
    for i in range(5):
        await record_provider_ack(r, dedupe_token(ALERT.key, "sms", sid(i)), f"SM{i}", 60)

    async def late_callback() -> None:
        await asyncio.sleep(0.5)
        await record_provider_ack(r, dedupe_token(ALERT.key, "sms", sid(5)), "SM5", 60)

    async with SmsStandIn(account_sid=SID, auth_token=AUTH).running() as sms:
        provider = SmsProvider(
            sms.url, SID, AUTH, from_="+15550000001",
            status_callback="https://alerts.example.gov/webhooks/sms/status",
        )  # fmt: skip
        late = asyncio.create_task(late_callback())
        started = time.monotonic()
        receipt = await send_batch(
            batch(n, "sms"), ALERT, contacts=ContactStore(r), guard=guard,
            providers=[provider], renderer=Renderer(), ack_wait_s=3.0,
        )  # fmt: skip
        elapsed = time.monotonic() - started
        await late
        await provider.aclose()
        texted = Counter(x.address for x in sms.received)
    assert Counter(x.status for x in receipt.results) == {"sent": n}
    assert texted == {phone(i): 1 for i in range(6, n)}, "0..5 were acknowledged"
    # 6..9 waited for callbacks that never came, up to ack_wait_s after the lapse.
    assert 2.5 <= elapsed < 10
    values = await r.mget([guard.key(ALERT.key, "sms", sid(i)) for i in range(n)])
    assert values == [b"sent"] * n


class LostAnswers:
    """An acknowledging SMS provider that accepts every message but whose first call's
    answers are lost on the way back (a timeout); its status callbacks still arrive."""

    name, channel, acknowledges = "lost-answers", "sms", True

    def __init__(self, r: aioredis.Redis) -> None:
        self.r = r
        self.calls: list[list[str]] = []

    async def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        self.calls.append([m.subscriber_id for m in messages])
        for m in messages:
            token = dedupe_token(m.alert_key, m.channel, m.subscriber_id)
            await record_provider_ack(self.r, token, "SM1", 60)
        ok = len(self.calls) > 1
        error = "" if ok else "no answer (TimeoutError)"
        return [SendResult(m.subscriber_id, ok=ok, error=error, retriable=True) for m in messages]

    async def aclose(self) -> None:
        pass


async def test_acknowledged_sms_is_not_retried_after_a_lost_answer(r: aioredis.Redis) -> None:
    await seed(r, 10)
    provider = LostAnswers(r)
    receipt = await send_batch(
        batch(10, "sms"), ALERT, contacts=ContactStore(r), guard=IdempotencyGuard(r, 3600, 5.0),
        providers=[provider], renderer=Renderer(), backoff_base_s=0.01,  # type: ignore[list-item]
    )  # fmt: skip
    assert Counter(x.status for x in receipt.results) == {"sent": 10}
    assert len(provider.calls) == 1, "the retry would have texted everyone twice"


async def test_sms_callback_url_names_the_message_opaquely() -> None:
    provider = SmsProvider(
        "http://127.0.0.1:9", SID, AUTH, from_="+15550000001",
        status_callback="https://alerts.example.gov/webhooks/sms/status",
    )  # fmt: skip
    home = OutgoingMessage(f"{sid(7)}:home", phone(7), "sms", ALERT.key, "en", "", "Flood")
    work = OutgoingMessage(f"{sid(7)}:work", phone(7), "sms", ALERT.key, "en", "", "Flood")
    form = parse_qs(provider.form(home).decode())
    callback = form["StatusCallback"][0]
    query = parse_qs(urlsplit(callback).query)
    assert callback.startswith("https://alerts.example.gov/webhooks/sms/status?")
    assert query == {"alert": [ALERT.key], "k": [dedupe_token(ALERT.key, "sms", sid(7))]}
    assert phone(7)[1:] not in callback and sid(7) not in callback
    # Whichever place of the citizen matched, the message has the same name.
    assert provider.callback_url(home) == provider.callback_url(work)
    assert provider.acknowledges


def test_one_collapse_key_per_alert_on_every_platform() -> None:
    msg = OutgoingMessage(
        sid(1), "token-1", "push", ALERT.key, "en", "Flood", "Move up", collapse_key=ALERT.key
    )
    encoded = messaging._MessagingService.encode_message(build_message(msg, "token-1"))
    android, apns, webpush = encoded["android"], encoded["apns"], encoded["webpush"]
    assert android["collapse_key"] == ALERT.key
    assert android["notification"]["tag"] == ALERT.key
    assert apns["headers"]["apns-collapse-id"] == ALERT.key
    assert webpush["headers"]["Topic"] == ALERT.key  # 20 hex digits: a valid RFC 8030 topic


def test_message_id_depends_on_alert_and_citizen_only() -> None:
    smtp = SmtpProvider("127.0.0.1", 25, sender="alerts@tocsin.example")
    other = SmtpProvider("127.0.0.1", 25, sender="alerts@tocsin.example")

    def mail(subscriber: str, alert: str = ALERT.key) -> OutgoingMessage:
        return OutgoingMessage(subscriber, "c1@x.example", "email", alert, "en", "S", "B")

    mid = smtp.message_id(mail(f"{sid(1)}:home"))
    assert mid == other.message_id(mail(f"{sid(1)}:work")) == smtp.message_id(mail(sid(1)))
    assert mid.startswith(f"<{ALERT.key}.") and mid.endswith("@tocsin.example>")
    assert sid(1) not in mid and "c1@x.example" not in mid
    assert mid != smtp.message_id(mail(sid(2)))
    assert mid != smtp.message_id(mail(sid(1), alert="0" * 20))
