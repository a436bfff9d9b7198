"""The SMS status webhook records which messages the provider accepted.

A status callback's URL carries the message's opaque token (``k``); any status for it
is proof that the provider accepted the message, which a sender taking over after a
crash consults instead of texting the citizen again. Signed callbacks are never cut
by the per-IP webhook limit: they come in bulk from the provider's few addresses.
"""

from __future__ import annotations

from pathlib import Path

from channels.idempotency import IdempotencyGuard, dedupe_token
from channels.sms import twilio_signature
from tests.api.conftest import Api, make_settings, start_api, stop_api

PUBLIC = "https://alerts.example.gov"


def callback(sid: str, status: str) -> dict[str, str]:
    return {"AccountSid": "AC" + "1" * 32, "ApiVersion": "2010-04-01", "From": "+15550000001",
            "MessageSid": sid, "MessageStatus": status, "To": "+15551234567"}


async def test_a_status_callback_acknowledges_its_message(api: Api) -> None:
    token = dedupe_token("a1b2c3", "sms", "citizen-1")
    guard = IdempotencyGuard(api.ctx.redis)
    assert await guard.acknowledged([token]) == [False]
    r = await api.client.post("/webhooks/sms/status", params={"alert": "a1b2c3", "k": token},
                              data=callback("SM1", "queued"))
    assert r.status_code == 204
    assert await guard.acknowledged([token]) == [True]
    assert await api.ctx.redis.hget("tocsin:api:callbacks:a1b2c3", "sms:queued") == b"1"
    # A malformed token is counted but records nothing.
    r = await api.client.post("/webhooks/sms/status", params={"alert": "a1b2c3", "k": "+1555"},
                              data=callback("SM2", "sent"))
    assert r.status_code == 204
    assert await api.ctx.redis.keys("tocsin:ack:*") == [f"tocsin:ack:{token}".encode()]


async def test_signed_status_callbacks_bypass_the_per_ip_limit(
        broker: str, redis_url: str, tmp_path: Path, data_dir: Path) -> None:
    settings = make_settings(broker, redis_url, tmp_path, data_dir, sms_auth_token="tw-secret",
                             api_public_url=PUBLIC, api_rate_webhook_per_min=2)
    api = await start_api(settings)
    try:
        guard = IdempotencyGuard(api.ctx.redis)
        tokens = [dedupe_token("a1b2c3", "sms", f"citizen-{i}") for i in range(6)]
        for i, token in enumerate(tokens):
            query = f"alert=a1b2c3&k={token}"
            form = callback(f"SM{i}", "queued")
            signature = twilio_signature(f"{PUBLIC}/webhooks/sms/status?{query}", form,
                                         "tw-secret")
            r = await api.client.post(f"/webhooks/sms/status?{query}", data=form,
                                      headers={"X-Twilio-Signature": signature})
            assert r.status_code == 204, r.text
        assert await guard.acknowledged(tokens) == [True] * 6
        # A forged callback acknowledges nothing.
        forged = dedupe_token("a1b2c3", "sms", "victim")
        r = await api.client.post(f"/webhooks/sms/status?alert=a1b2c3&k={forged}",
                                  data=callback("SM9", "delivered"),
                                  headers={"X-Twilio-Signature": "bm9wZQ=="})
        assert r.status_code == 403
        assert await guard.acknowledged([forged]) == [False]
    finally:
        await stop_api(api)
