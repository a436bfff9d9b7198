"""Citizens: registration, one-time codes, places and zones on the topic, and erasure.

Codes are read from the outbox they were sent to (the dev/test provider). Erasure is
checked the hard way: every Redis key and value is scanned for the citizen's id,
addresses and token, and the compacted topic is read back to see tombstones.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from channels.outbox import read_outbox
from streams.records import Receipt, RecipientResult, Subscription, decoder
from streams.state import AlertStore
from streams.topics import SUBSCRIPTIONS
from tests.api.conftest import Api
from tests.api.test_audit_and_secrets import _everything_in_redis
from tests.integration.pipeline_helpers import read_topic

pytestmark = pytest.mark.integration
_sub = decoder(Subscription)
PHONE, EMAIL, PUSH = "+15557654321", "jo.citizen@example.org", "fcm-device-token-abcdef"


def code_sent_to(api: Api, address: str) -> str:
    """The last verification code the outbox received for an address."""
    lines = [m for m in read_outbox(api.settings.outbox_path)
             if m["alert_key"] == "otp" and m["to"] == address]
    assert lines, f"no code was sent to {address}"
    return next(w.strip(".") for w in lines[-1]["body"].split() if w.strip(".").isdigit())


async def latest_subscriptions(api: Api) -> dict[str, Subscription | None]:
    """The compacted view of the subscriptions topic: id -> record (None = tombstone)."""
    out: dict[str, Subscription | None] = {}
    for rec in await read_topic(api.settings.kafka_bootstrap_servers, SUBSCRIPTIONS):
        out[rec.key.decode()] = _sub.decode(rec.value) if rec.value is not None else None
    return out


async def register(api: Api, **extra: Any) -> dict[str, Any]:
    body = {"prefs": {"language": "es", "min_severity": "Moderate", "accept_tests": True,
                      "quiet_hours": "22:00-07:00", "timezone": "America/Los_Angeles"},
            "places": [{"name": "Home", "lon": -118.25, "lat": 34.05, "radius_m": 500},
                       {"name": "Work", "lon": -118.4, "lat": 33.95}],
            "zones": ["FIPS:06109"], "push_token": PUSH, "phone": PHONE, "email": EMAIL}
    body.update(extra)
    r = await api.client.post("/citizens", json=body)
    assert r.status_code == 201, r.text
    return r.json()


async def test_register_verify_and_publish_subscriptions(
        api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    me = await register(api)
    cid, token = me["id"], me["token"]
    headers = {"Authorization": f"Bearer {token}"}
    assert sorted(me["pending_verification"]) == ["email", "sms"]
    assert me["active_channels"] == ["push"] and me["contacts"] == {"push": "registered"}
    subs = await latest_subscriptions(api)
    home = subs[f"{cid}:home"]
    assert home is not None and home.kind == "place" and home.radius_m == 500
    assert home.channels == ["push"] and home.language == "es" and home.accept_tests
    assert home.quiet_hours == "22:00-07:00" and home.timezone == "America/Los_Angeles"
    assert subs[f"{cid}:zone-same-006109"].zone == "SAME:006109"  # type: ignore[union-attr]
    # Wrong code, then the right one; the phone becomes a channel everywhere.
    r = await api.client.post("/citizens/me/verify", headers=headers,
                              json={"channel": "sms", "code": "000000"})
    assert r.status_code in (400, 200)
    code = code_sent_to(api, PHONE)
    if code != "000000":
        assert r.status_code == 400 and "attempts left" in r.json()["detail"]
    r = await api.client.post("/citizens/me/verify", headers=headers,
                              json={"channel": "sms", "code": code})
    assert r.status_code == 200, r.text
    assert r.json()["active_channels"] == ["push", "sms"]
    assert r.json()["contacts"]["sms"] == "+1******21"  # masked, never echoed in full
    r = await api.client.post("/citizens/me/verify", headers=headers,
                              json={"channel": "sms", "code": code})
    assert r.status_code == 410  # a code works once
    subs = await latest_subscriptions(api)
    assert subs[f"{cid}:work"].channels == ["push", "sms"]  # type: ignore[union-attr]
    # Addresses are in the vault under every subscription id, never on the topic.
    vault = await api.ctx.contacts.get(f"{cid}:work")
    assert vault is not None and vault.phone == PHONE and vault.push_token == PUSH
    raw = b"".join(r.value or b"" for r in await read_topic(
        api.settings.kafka_bootstrap_servers, SUBSCRIPTIONS))
    for address in (PHONE, EMAIL, PUSH):
        assert address.encode() not in raw
    # Change preferences, move a place, drop one, pause and resume.
    r = await api.client.patch("/citizens/me", headers=headers,
                               json={"min_severity": "Severe", "channels": ["sms"]})
    assert r.json()["prefs"]["min_severity"] == "Severe"
    r = await api.client.delete("/citizens/me/places/Work", headers=headers)
    assert f"{cid}:work" not in r.json()["subscriptions"]
    r = await api.client.post("/citizens/me/unsubscribe", headers=headers)
    assert r.json()["paused"] is True and r.json()["subscriptions"] == []
    subs = await latest_subscriptions(api)
    assert subs[f"{cid}:work"] is None and subs[f"{cid}:home"] is None
    r = await api.client.patch("/citizens/me", headers=headers, json={"paused": False})
    assert r.json()["subscriptions"] == [f"{cid}:home", f"{cid}:zone-same-006109"]
    subs = await latest_subscriptions(api)
    assert subs[f"{cid}:home"].channels == ["sms"]  # type: ignore[union-attr]
    assert subs[f"{cid}:home"].min_severity == "Severe"  # type: ignore[union-attr]
    for address in (PHONE, EMAIL, PUSH):
        assert address not in caplog.text, "a contact detail reached the log"


async def test_too_many_wrong_codes_voids_the_code(api: Api) -> None:
    me = await register(api, phone=None, push_token=None)
    headers = {"Authorization": f"Bearer {me['token']}"}
    good = code_sent_to(api, EMAIL)
    wrong = "111111" if good != "111111" else "222222"
    statuses = []
    for _ in range(api.settings.api_otp_max_attempts):
        r = await api.client.post("/citizens/me/verify", headers=headers,
                                  json={"channel": "email", "code": wrong})
        statuses.append(r.status_code)
    assert statuses[-1] == 429 and set(statuses[:-1]) == {400}
    r = await api.client.post("/citizens/me/verify", headers=headers,
                              json={"channel": "email", "code": good})
    assert r.status_code == 410 and "request a new code" in r.json()["detail"]


async def test_bad_registrations_are_refused_with_reasons(api: Api) -> None:
    for body, why in (({"zones": ["FIPS:00000"]}, "unknown zone code"),
                      ({"phone": "555-1234"}, "phone"),
                      ({"prefs": {"quiet_hours": "late"}}, "quiet_hours"),
                      ({"prefs": {"timezone": "Mars/Olympus"}}, "timezone"),
                      ({"places": [{"name": "Home", "lon": 200, "lat": 0}]}, "lon")):
        r = await api.client.post("/citizens", json=body)
        assert r.status_code == 422 and why in r.json()["detail"], (body, r.text)
    r = await api.client.get("/citizens/me", headers={"Authorization": "Bearer tocsin_cit_x"})
    assert r.status_code == 401


async def test_erasure_leaves_nothing_behind(api: Api) -> None:
    me = await register(api)
    cid = me["id"]
    headers = {"Authorization": f"Bearer {me['token']}"}
    for channel, address in (("sms", PHONE), ("email", EMAIL)):
        r = await api.client.post("/citizens/me/verify", headers=headers,
                                  json={"channel": channel, "code": code_sent_to(api, address)})
        assert r.status_code == 200
    # The pipeline has warned this citizen about an alert and claimed idempotency keys.
    store = AlertStore(api.ctx.redis)
    await store.record_warned("a1b2c3", "sms", {f"{cid}:home": "es", "someone-else": "en"})
    await store.record_warned("a1b2c3", "push", {f"{cid}:work": "es"})
    await store.apply_receipt(Receipt("a1b2c3", "sms", "outbox", [
        RecipientResult(f"{cid}:home", "sent"), RecipientResult("someone-else", "sent"),
    ]))  # fmt: skip
    await api.ctx.redis.set(f"tocsin:idem:a1b2c3:sms:{cid}:home", "sent")
    await api.ctx.redis.set("tocsin:idem:a1b2c3:sms:someone-else", "sent")
    # A pending code for a new address, too.
    await api.client.put("/citizens/me/contact", headers=headers,
                         json={"email": "new.address@example.org"})
    before = await _everything_in_redis(api.ctx.redis)
    assert cid.encode() in before and PHONE.encode() in before

    r = await api.client.delete("/citizens/me", headers=headers)
    assert r.status_code == 204
    after = await _everything_in_redis(api.ctx.redis)
    for secret in (cid, PHONE, EMAIL, PUSH, "new.address@example.org", me["token"]):
        assert secret.encode() not in after, f"{secret} is still in Redis after erasure"
    assert api.ctx.identity.token_hash(me["token"]).encode() not in after
    assert b"someone-else" in after  # other people's records are untouched
    subs = await latest_subscriptions(api)
    mine = {k: v for k, v in subs.items() if k.startswith(cid)}
    assert set(mine) == {f"{cid}:home", f"{cid}:work", f"{cid}:zone-same-006109"}
    assert all(v is None for v in mine.values()), "a subscription was not tombstoned"
    r = await api.client.get("/citizens/me", headers=headers)
    assert r.status_code == 401
