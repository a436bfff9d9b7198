"""SMS keyword opt-in/opt-out (JOIN, STOP, HELP) and delivery status callbacks."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from channels.sms import twilio_signature
from tests.api.conftest import Api, make_settings, start_api, stop_api
from tests.api.test_audit_and_secrets import _everything_in_redis
from tests.api.test_citizens import PHONE, code_sent_to, latest_subscriptions, register

pytestmark = pytest.mark.integration
FROM = "+15550001111"


async def sms(api: Api, body: str, sender: str = FROM, **headers: str) -> str:
    r = await api.client.post("/webhooks/sms/inbound", data={"From": sender, "Body": body},
                              headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/xml")
    return etree.fromstring(r.content).findtext("Message")


async def test_join_subscribes_the_number_and_stop_erases_it(api: Api) -> None:
    reply = await sms(api, "join 006037")
    assert "SAME:006037" in reply and "STOP" in reply
    assert "SAME:024031" in await sms(api, "JOIN SAME:024031")
    assert "SAME:006109" in await sms(api, "JOIN FIPS:06109")
    cid = api.ctx.citizens.sms_citizen_id(FROM)
    subs = await latest_subscriptions(api)
    zone = subs[f"{cid}:zone-same-006037"]
    assert zone is not None and zone.kind == "zone" and zone.channels == ["sms"]
    assert zone.zone == "SAME:006037"
    vault = await api.ctx.contacts.get(f"{cid}:zone-same-006037")
    assert vault is not None and vault.phone == FROM
    assert "ZIP codes are not supported" in await sms(api, "JOIN 90210")
    assert "unknown zone" in await sms(api, "JOIN 999999")
    assert "JOIN followed by" in await sms(api, "HELP")
    assert "JOIN followed by" in await sms(api, "what is this")

    assert "unsubscribed" in await sms(api, "Stop")
    subs = await latest_subscriptions(api)
    mine = {k: v for k, v in subs.items() if k.startswith(cid)}
    assert len(mine) == 3 and all(v is None for v in mine.values())
    blob = await _everything_in_redis(api.ctx.redis)
    assert FROM.encode() not in blob and cid.encode() not in blob


async def test_stop_removes_sms_from_an_app_citizen_but_keeps_their_other_channels(
        api: Api) -> None:
    me = await register(api, email=None)
    headers = {"Authorization": f"Bearer {me['token']}"}
    r = await api.client.post("/citizens/me/verify", headers=headers,
                              json={"channel": "sms", "code": code_sent_to(api, PHONE)})
    assert r.json()["active_channels"] == ["push", "sms"]
    await sms(api, "STOP", sender=PHONE)
    r = await api.client.get("/citizens/me", headers=headers)
    assert r.status_code == 200
    assert r.json()["active_channels"] == ["push"] and "sms" not in r.json()["contacts"]
    subs = await latest_subscriptions(api)
    assert subs[f"{me['id']}:home"].channels == ["push"]  # type: ignore[union-attr]
    assert PHONE.encode() not in await _everything_in_redis(api.ctx.redis)


async def test_signed_webhooks_when_an_auth_token_is_configured(
        broker: str, redis_url: str, tmp_path: Path, data_dir: Path) -> None:
    settings = make_settings(broker, redis_url, tmp_path, data_dir, sms_auth_token="tw-secret",
                             api_public_url="https://alerts.example.gov")
    api = await start_api(settings)
    try:
        form = {"From": FROM, "Body": "HELP"}
        r = await api.client.post("/webhooks/sms/inbound", data=form)
        assert r.status_code == 403 and "X-Twilio-Signature" in r.json()["detail"]
        good = twilio_signature("https://alerts.example.gov/webhooks/sms/inbound", form,
                                "tw-secret")
        assert "JOIN" in await sms(api, "HELP", **{"X-Twilio-Signature": good})
    finally:
        await stop_api(api)


async def test_status_callbacks_are_counted_per_alert(api: Api) -> None:
    for status in ("delivered", "delivered", "undelivered"):
        r = await api.client.post("/webhooks/sms/status", params={"alert": "abc123"},
                                  data={"MessageSid": "SM1", "MessageStatus": status})
        assert r.status_code == 204
    r = await api.client.post("/webhooks/sms/status", data={"MessageSid": "SM9",
                                                            "MessageStatus": "sent"})
    assert r.status_code == 204
    counts = await api.ctx.redis.hgetall("tocsin:api:callbacks:abc123")
    assert counts == {b"sms:delivered": b"2", b"sms:failed": b"1"}
    assert await api.ctx.redis.hget("tocsin:api:callbacks:unattributed", "sms:sent") == b"1"
    r = await api.client.post("/webhooks/sms/status", data={"MessageSid": "SM1",
                                                            "MessageStatus": "teleported"})
    assert r.status_code == 422 and "unknown message status" in r.json()["detail"]
