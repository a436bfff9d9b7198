"""Each provider against its stand-in, through the real sender and a real redis-server.

FCM and SMS talk to the local HTTP stand-ins (tests/standins), email to a real
aiosmtpd process (the ``smtp_server`` fixture) and, for refusals, an in-process
aiosmtpd with a scripted handler. Waiting is on conditions with deadlines only.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import mailbox
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiosmtpd.controller import Controller

from channels.base import OutgoingMessage, Provider, ProviderError
from channels.contacts import Contact, ContactStore
from channels.email import SmtpProvider, unsubscribe_token
from channels.fcm import FcmProvider, StaticToken
from channels.fcm_admin import FcmAdminProvider
from channels.idempotency import IdempotencyGuard
from channels.outbox import OutboxProvider, read_outbox
from channels.registry import build_providers
from channels.sender import send_batch
from channels.sms import SmsProvider, parse_status_callback, validate_signature
from ops import devstack
from ops.settings import Settings
from streams.records import Alert, Channel, DeliveryBatch, Info, Receipt, Recipient
from templates.render import Renderer
from tests.standins import SmtpRecorder, self_signed
from tests.standins.fcm import FcmStandIn, service_account
from tests.standins.sms import SmsStandIn

pytestmark = pytest.mark.integration

ALERT = Alert(
    identifier="TOCSIN-PROVIDERS-1",
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
            severity="Extreme",
            urgency="Immediate",
            instruction="Move to higher ground. See https://alerts.example/flood",
            expires="2999-01-01T00:00:00+00:00",
        ),
        Info(language="es-US", event="Aviso de inundación", headline="Inundación"),
    ],
)
FAST = {"backoff_base_s": 0.01, "backoff_max_s": 0.05}
SID, AUTH = "AC" + "1" * 32, "sms-secret"


def sid(i: int) -> str:
    return f"sub-{i:05d}"


def token(i: int) -> str:
    return f"tok-{i:05d}-standin"


def phone(i: int) -> str:
    return f"+1555{i:07d}"


def mail(i: int) -> str:
    return f"c{i}@mail.example"


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()  # type: ignore[attr-defined]


@pytest.fixture
async def fcm() -> AsyncIterator[FcmStandIn]:
    async with FcmStandIn(project="tocsin-test").running() as standin:
        yield standin


async def seed(r: aioredis.Redis, n: int) -> ContactStore:
    store = ContactStore(r)
    await store.put_many(
        {sid(i): Contact(push_token=token(i), phone=phone(i), email=mail(i)) for i in range(n)}
    )
    return store


def batch(n: int, channel: Channel, start: int = 0) -> DeliveryBatch:
    return DeliveryBatch(
        alert_key=ALERT.key,
        channel=channel,
        recipients=[Recipient(sid(i), "es" if i % 4 == 0 else "en") for i in range(start, n)],
    )


async def deliver(
    r: aioredis.Redis, b: DeliveryBatch, providers: Sequence[Provider], **kw: Any
) -> Receipt:
    return await send_batch(
        b,
        ALERT,
        contacts=ContactStore(r),
        guard=IdempotencyGuard(r, 3600, 5.0),
        providers=providers,
        renderer=Renderer(),
        **{**FAST, **kw},
    )


def statuses(receipt: Receipt) -> Counter[str]:
    return Counter(x.status for x in receipt.results)


def assert_no_contacts(receipt: Receipt, n: int) -> None:
    text = json.dumps([[x.subscriber_id, x.status, x.error] for x in receipt.results])
    for i in range(n):
        assert token(i) not in text and phone(i) not in text and mail(i) not in text


def fcm_provider(standin: FcmStandIn, **kw: Any) -> FcmProvider:
    return FcmProvider(standin.url, standin.project, StaticToken("standin-token"), **kw)


# -- push: FCM HTTP v1 -----------------------------------------------------------------------


async def test_fcm_sends_urgent_v1_messages_once(r: aioredis.Redis, fcm: FcmStandIn) -> None:
    await seed(r, 300)
    provider = fcm_provider(fcm, max_concurrency=50)
    receipt = await deliver(r, batch(300, "push"), [provider])
    await provider.aclose()
    assert statuses(receipt) == {"sent": 300} and receipt.provider == "fcm"
    assert Counter(x.address for x in fcm.received) == {token(i): 1 for i in range(300)}
    body = next(x.body for x in fcm.received if x.address == token(1))
    assert body is not None
    assert body["notification"]["title"] == "TEST: Flood Warning"
    assert body["android"]["priority"] == "high" and body["android"]["collapse_key"] == ALERT.key
    assert body["android"]["ttl"].endswith("s") and int(body["android"]["ttl"][:-1]) > 10**6
    apns = body["apns"]
    assert apns["headers"]["apns-priority"] == "10"
    assert apns["headers"]["apns-collapse-id"] == ALERT.key
    assert apns["payload"]["aps"]["interruption-level"] == "critical"  # Extreme
    assert body["webpush"]["headers"]["Urgency"] == "high"
    assert body["data"] == {
        "alert_key": ALERT.key,
        "language": "en-US",
        "severity": "Extreme",
        "urgency": "Immediate",
    }
    spanish = next(x.body for x in fcm.received if x.address == token(4))
    assert spanish is not None and "Inundación" in spanish["notification"]["body"]


async def test_fcm_unregistered_tokens_are_pruned(r: aioredis.Redis, fcm: FcmStandIn) -> None:
    store = await seed(r, 20)
    fcm.unregistered = {token(3), token(7)}
    provider = fcm_provider(fcm)
    receipt = await deliver(r, batch(20, "push"), [provider])
    await provider.aclose()
    by_sid = {x.subscriber_id: (x.status, x.error) for x in receipt.results}
    assert by_sid[sid(3)] == by_sid[sid(7)] == ("failed", "fcm: invalid address")
    assert statuses(receipt) == {"sent": 18, "failed": 2}
    # Dead tokens are gone from the vault; the other channels' addresses stay.
    assert await store.get_addresses([sid(3), sid(7), sid(8)], "push") == {sid(8): token(8)}
    assert await store.get_addresses([sid(3)], "sms") == {sid(3): phone(3)}
    assert len(fcm.received) == 18


async def test_fcm_503_429_and_dropped_connections_are_retried_exactly_once(
    r: aioredis.Redis, fcm: FcmStandIn
) -> None:
    await seed(r, 400)
    fcm.faults.update(
        {
            "share_503": 0.2,
            "share_429": 0.1,
            "share_close": 0.05,
            "retry_after_s": 1,
            "retry_after_on_503": False,
            "first_attempt_only": True,
        }
    )
    provider = fcm_provider(fcm)
    started = time.monotonic()
    receipt = await deliver(r, batch(400, "push"), [provider], max_attempts=4)
    elapsed = time.monotonic() - started
    await provider.aclose()
    assert fcm.answered[429] > 0 and fcm.answered[503] > 0
    assert statuses(receipt) == {"sent": 400}
    assert Counter(x.address for x in fcm.received) == {token(i): 1 for i in range(400)}
    assert elapsed >= 1.0  # the retry waited for Retry-After: 1, not the 10 ms backoff


async def test_fcm_down_fails_over_and_reports_no_answer(
    r: aioredis.Redis, fcm: FcmStandIn, tmp_path: Path
) -> None:
    await seed(r, 30)
    await fcm.stop()  # connection refused
    provider = fcm_provider(fcm)
    with pytest.raises(ProviderError) as err:
        await provider.send_batch([OutgoingMessage(sid(0), token(0), "push", "k", "en", "t", "b")])
    assert err.value.retriable and token(0) not in str(err.value)
    outbox = OutboxProvider(tmp_path / "outbox.jsonl", "push")
    receipt = await deliver(r, batch(30, "push"), [provider, outbox], max_attempts=2)
    await provider.aclose()
    assert statuses(receipt) == {"sent": 30} and receipt.provider == "outbox"
    assert len(read_outbox(tmp_path / "outbox.jsonl")) == 30


async def test_service_account_credentials_on_both_push_paths(
    r: aioredis.Redis, fcm: FcmStandIn, tmp_path: Path
) -> None:
    """google-auth's real JWT-bearer flow against the stand-in's token endpoint: the
    project comes from the key file, the token is fetched once and reused."""
    await seed(r, 40)
    key_file = service_account(tmp_path / "sa.json", f"{fcm.url}/token", fcm.project)
    fcm.tokens = set()  # only tokens the stand-in issues are accepted
    settings = Settings(
        channel_providers="push=fcm", fcm_base_url=fcm.url, fcm_credentials_file=str(key_file)
    )
    [provider] = build_providers(settings, "push")
    receipt = await deliver(r, batch(20, "push"), [provider])
    await provider.aclose()
    assert statuses(receipt) == {"sent": 20} and fcm.issued == 1

    admin = FcmAdminProvider(fcm.url, "", credentials_file=str(key_file))
    receipt = await deliver(r, batch(40, "push", start=20), [admin])
    await admin.aclose()
    assert statuses(receipt) == {"sent": 20} and receipt.provider == "fcm-admin"
    assert len({x.address for x in fcm.received}) == 40


async def test_firebase_admin_path_maps_errors(r: aioredis.Redis, fcm: FcmStandIn) -> None:
    store = await seed(r, 30)
    fcm.unregistered = {token(5)}
    admin = FcmAdminProvider(fcm.url, fcm.project, access_token="standin-token")
    receipt = await deliver(r, batch(30, "push"), [admin])
    by_sid = {x.subscriber_id: x.status for x in receipt.results}
    assert by_sid[sid(5)] == "failed" and statuses(receipt)["sent"] == 29
    assert await store.get_addresses([sid(5)], "push") == {}
    # A second event loop (a new worker loop, or the next test) gets a fresh client.
    results = await asyncio.to_thread(
        asyncio.run,
        admin.send_batch([OutgoingMessage("x", token(99), "push", ALERT.key, "en", "t", "b")]),
    )
    assert results[0].ok
    await admin.aclose()


# -- SMS: Twilio Messages API ------------------------------------------------------------------


def sms_settings(primary: str, backup: str) -> Settings:
    return Settings(
        channel_providers="sms=sms|sms-backup",
        sms_base_url=primary,
        sms_account_sid=SID,
        sms_auth_token=AUTH,
        sms_from="+15550000001",
        sms_backup_base_url=backup,
        sms_backup_account_sid="AC" + "2" * 32,
        sms_backup_auth_token="backup-secret",
        sms_backup_messaging_service_sid="MG" + "3" * 32,
    )


async def test_sms_primary_down_fails_over_to_backup_once(r: aioredis.Redis) -> None:
    await seed(r, 300)
    store = ContactStore(r)
    await store.put(sid(7), Contact(phone="+1555-not-a-number"))  # 21211
    await store.put(sid(8), Contact(phone="+15559990008"))  # 21614 at the backup
    dead_port = devstack.free_port()  # nothing listens: connection refused
    backup = SmsStandIn(account_sid="AC" + "2" * 32, auth_token="backup-secret")
    backup.invalid = {"+15559990008"}
    async with backup.running():
        providers = build_providers(
            sms_settings(f"http://127.0.0.1:{dead_port}", backup.url), "sms"
        )
        receipt = await deliver(r, batch(300, "sms"), providers, max_attempts=2)
        for p in providers:
            await p.aclose()
    by_sid = {x.subscriber_id: (x.status, x.error) for x in receipt.results}
    assert by_sid[sid(7)] == ("failed", "sms-backup: invalid address")
    assert by_sid[sid(8)] == ("failed", "sms-backup: invalid address")
    assert statuses(receipt) == {"sent": 298, "failed": 2}
    assert receipt.provider == "sms-backup"
    expected = {phone(i): 1 for i in range(300) if i not in (7, 8)}
    assert Counter(x.address for x in backup.received) == expected
    first = backup.received[0].body
    assert first is not None and first["Service"] == "MG" + "3" * 32 and not first["From"]
    assert_no_contacts(receipt, 300)
    assert "+1555-not-a-number" not in json.dumps([x.error for x in receipt.results])


async def test_sms_429_with_retry_after_and_5xx_are_retried(r: aioredis.Redis) -> None:
    await seed(r, 200)
    standin = SmsStandIn(account_sid=SID, auth_token=AUTH)
    standin.faults.update(
        {"share_429": 0.15, "share_503": 0.1, "retry_after_s": 1, "first_attempt_only": True}
    )
    async with standin.running():
        provider = SmsProvider(standin.url, SID, AUTH, from_="+15550000001")
        started = time.monotonic()
        receipt = await deliver(r, batch(200, "sms"), [provider], max_attempts=3)
        elapsed = time.monotonic() - started
        await provider.aclose()
    assert statuses(receipt) == {"sent": 200}
    assert Counter(x.address for x in standin.received) == {phone(i): 1 for i in range(200)}
    assert standin.answered[429] > 0 and elapsed >= 1.0


async def test_sms_status_callbacks_become_receipt_statuses() -> None:
    """The stand-in posts signed status callbacks, as Twilio does; we verify and map them."""
    got: list[tuple[str, dict[str, str], str]] = []
    all_in = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        got.append((str(request.url), form, request.headers.get("X-Twilio-Signature", "")))
        if len(got) == 9:  # three messages: "queued", "sent", then the final status
            all_in.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/sms/status", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = devstack.free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    callback = f"http://127.0.0.1:{port}/sms/status"
    standin = SmsStandIn(account_sid=SID, auth_token=AUTH, callbacks=True)
    standin.unreachable = {phone(2)}
    try:
        async with standin.running():
            provider = SmsProvider(
                standin.url, SID, AUTH, from_="+15550000001", status_callback=callback
            )
            msgs = [
                OutgoingMessage(sid(i), phone(i), "sms", "k", "en", "", "Test") for i in range(3)
            ]
            results = await provider.send_batch(msgs)
            await provider.aclose()
            async with asyncio.timeout(10):
                await all_in.wait()
    finally:
        await runner.cleanup()
    sms_ids = {x.subscriber_id: x.provider_message_id for x in results}
    assert all(x.ok and x.provider_message_id.startswith("SM") for x in results)
    final: dict[str, tuple[str, str]] = {}
    for url, form, signature in got:
        assert validate_signature(url, form, signature, AUTH)
        assert not validate_signature(url, form, signature, "wrong-token")
        message_id, status, error_code = parse_status_callback(form)
        final[message_id] = (status, error_code)  # "queued", "sent", then the final one
    assert final[sms_ids[sid(0)]] == ("delivered", "")
    assert final[sms_ids[sid(2)]] == ("failed", "30003")
    with pytest.raises(ValueError):
        parse_status_callback({"MessageSid": "SM1", "MessageStatus": "exploded"})


# -- email: SMTP ---------------------------------------------------------------------------------


def read_maildir(path: str) -> list[EmailMessage]:
    box = mailbox.Maildir(path, factory=None, create=False)
    return [
        email.message_from_bytes(box.get_bytes(key), policy=email.policy.default)  # type: ignore[misc]
        for key in box.keys()
    ]


def smtp_settings(port: int) -> Settings:
    return Settings(
        channel_providers="email=smtp",
        smtp_host="127.0.0.1",
        smtp_port=port,
        smtp_pool_size=4,
        email_from="alerts@tocsin.example",
        email_unsubscribe_url="https://tocsin.example/unsubscribe",
        email_unsubscribe_secret="s3cret",
    )


async def test_email_multipart_with_list_unsubscribe_one_per_recipient(
    r: aioredis.Redis, smtp_server: devstack.Service
) -> None:
    await seed(r, 30)
    [provider] = build_providers(smtp_settings(smtp_server.port), "email")
    receipt = await deliver(r, batch(30, "email"), [provider])
    await provider.aclose()
    assert statuses(receipt) == {"sent": 30}
    # aiosmtpd writes the Maildir before it answers 250 to DATA: no waiting needed.
    messages = read_maildir(smtp_server.extra["maildir"])
    assert Counter(str(m["To"]) for m in messages) == {mail(i): 1 for i in range(30)}
    assert len({m["Message-ID"] for m in messages}) == 30
    by_to = {str(m["To"]): m for m in messages}
    m = by_to[mail(1)]
    assert m["Subject"] == "TEST: Flood Warning: River flooding"
    assert m["Auto-Submitted"] == "auto-generated"
    assert m.get_content_type() == "multipart/alternative"
    text = m.get_body(("plain",))
    html = m.get_body(("html",))
    assert text is not None and html is not None
    assert "Move to higher ground." in text.get_content()
    assert '<a href="https://alerts.example/flood">' in html.get_content()
    signed = unsubscribe_token("s3cret", sid(1))
    assert str(m["List-Unsubscribe"]).startswith(
        f"<https://tocsin.example/unsubscribe?s={sid(1)}&t={signed}>, <mailto:unsubscribe@"
    )
    assert m["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "Inundación" in str(by_to[mail(4)]["Subject"])


async def test_email_pool_reconnects_after_server_restart(
    r: aioredis.Redis, smtp_server: devstack.Service, tmp_path: Path
) -> None:
    await seed(r, 20)
    [provider] = build_providers(smtp_settings(smtp_server.port), "email")
    assert isinstance(provider, SmtpProvider)
    first = await deliver(r, batch(10, "email"), [provider])
    assert statuses(first) == {"sent": 10} and provider.connects == 4
    smtp_server.stop()  # every pooled connection is now dead
    maildir = tmp_path / "maildir2"
    argv = [
        sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{smtp_server.port}",
        "-c", "aiosmtpd.handlers.Mailbox", str(maildir),
    ]  # fmt: skip
    restarted = devstack._spawn("smtp2", argv, tmp_path / "smtp2", smtp_server.port, "")
    try:
        second = await deliver(r, batch(20, "email", start=10), [provider], max_attempts=1)
        await provider.aclose()
        assert statuses(second) == {"sent": 10}  # no attempt was lost to a stale connection
        assert provider.connects == 8
        messages = read_maildir(str(maildir))
        assert sorted(str(m["To"]) for m in messages) == sorted(mail(i) for i in range(10, 20))
    finally:
        restarted.stop()


async def test_email_refusals_map_to_dead_address_and_retry(r: aioredis.Redis) -> None:
    store = await seed(r, 5)
    handler = SmtpRecorder(dead={mail(1)}, greylisted={mail(2)})
    port = devstack.free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        provider = SmtpProvider("127.0.0.1", port, sender="alerts@tocsin.example", pool_size=2)
        receipt = await deliver(r, batch(5, "email"), [provider], max_attempts=2)
        await provider.aclose()
    finally:
        controller.stop()
    by_sid = {x.subscriber_id: (x.status, x.error) for x in receipt.results}
    assert by_sid[sid(1)] == ("failed", "smtp: invalid address")
    assert by_sid[sid(2)][0] == "sent"  # 451 retried
    assert sorted(handler.delivered) == sorted(mail(i) for i in (0, 2, 3, 4))
    assert await store.get_addresses([sid(1)], "email") == {}
    assert_no_contacts(receipt, 5)


async def test_email_unreachable_server_is_a_retriable_provider_error() -> None:
    provider = SmtpProvider("127.0.0.1", devstack.free_port(), sender="a@tocsin.example")
    with pytest.raises(ProviderError) as err:
        await provider.send_batch([OutgoingMessage("s", mail(0), "email", "k", "en", "s", "b")])
    assert err.value.retriable
    await provider.aclose()


async def test_keep_alive_connections_are_reused_across_batches(fcm: FcmStandIn) -> None:
    provider = fcm_provider(fcm, max_concurrency=8)
    msgs = [OutgoingMessage(sid(i), token(i), "push", "k", "en", "t", "b") for i in range(200)]
    for start in range(0, 200, 50):
        assert all(x.ok for x in await provider.send_batch(msgs[start : start + 50]))
    await provider.aclose()
    assert len({x.peer for x in fcm.received}) <= 8  # 200 requests, at most 8 connections


async def test_email_starttls_and_auth(tmp_path: Path) -> None:
    import ssl

    from aiosmtpd.smtp import AuthResult, LoginPassword

    cert, key = self_signed(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    client_tls = ssl.create_default_context(cafile=str(cert))

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"tocsin", b"pw")
        return AuthResult(success=ok, handled=False)  # let aiosmtpd answer 535

    handler = SmtpRecorder()
    port = devstack.free_port()
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=port,
        tls_context=server_tls,
        require_starttls=True,
        authenticator=authenticate,
        auth_require_tls=True,
    )
    controller.start()
    try:
        msgs = [OutgoingMessage(sid(3), mail(3), "email", "k", "en", "Subject", "Body")]
        provider = SmtpProvider(
            "127.0.0.1", port, sender="alerts@tocsin.example", starttls=True,
            tls_context=client_tls, username="tocsin", password="pw",
        )  # fmt: skip
        results = await provider.send_batch(msgs)
        await provider.aclose()
        assert results[0].ok and handler.delivered == [mail(3)]
        wrong = SmtpProvider(
            "127.0.0.1", port, sender="alerts@tocsin.example", starttls=True,
            tls_context=client_tls, username="tocsin", password="nope",
        )  # fmt: skip
        with pytest.raises(ProviderError) as err:
            await wrong.send_batch(msgs)
        assert not err.value.retriable
        await wrong.aclose()
    finally:
        controller.stop()


def test_retry_after_and_fcm_error_mapping() -> None:
    from email.utils import formatdate

    from firebase_admin import exceptions as fb_exc
    from firebase_admin import messaging

    from channels.base import parse_retry_after
    from channels.fcm import _ok_decoder, classify, fcm_error
    from tests.standins import DATA_OTHER
    from tests.standins.fcm import INVALID_TOKEN, QUOTA, UNAVAILABLE, UNREGISTERED

    # FCM's real success answers (parts of a batch response) parse to their message id.
    sample = (DATA_OTHER / "fcm_v1_batch_response_success.txt").read_text()
    names = [
        _ok_decoder.decode(part[part.index("{") :].strip()).name
        for part in sample.split("--test_boundary")
        if "{" in part
    ]
    assert names == ["projects/test-project/messages/1", "projects/test-project/messages/2"]

    assert parse_retry_after("7") == 7.0 and parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    later = parse_retry_after(formatdate(time.time() + 30, usegmt=True))
    assert later is not None and 28 <= later <= 31
    cases = [
        (404, UNREGISTERED, messaging.UnregisteredError, "invalid"),
        (400, INVALID_TOKEN, fb_exc.InvalidArgumentError, "invalid"),  # FCM's own sample
        (429, QUOTA, messaging.QuotaExceededError, "retry"),
        (503, UNAVAILABLE, fb_exc.UnavailableError, "retry"),
        (500, b"<html>oops</html>", fb_exc.InternalError, "retry"),
        (403, b'{"error": {"status": "PERMISSION_DENIED"}}', fb_exc.PermissionDeniedError, "fail"),
    ]
    for status, body, exc_type, outcome in cases:
        exc = fcm_error(status, body)
        assert type(exc) is exc_type, (status, exc)
        result = classify("s", exc, 2.0)
        assert result.invalid_address == (outcome == "invalid")
        assert result.retriable == (outcome == "retry")
        assert result.retry_after_s == (2.0 if outcome == "retry" else None)
