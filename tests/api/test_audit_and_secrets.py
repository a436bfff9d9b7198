"""The audit log's hash chain (and tamper detection), its Kafka copy, its read-only HTTP
surface, and tokens hashed at rest."""

from __future__ import annotations

import msgspec
import pytest
import redis.asyncio as aioredis

from ops.api.audit import HEAD, STREAM, entry_hash
from streams.records import AuditEvent, decoder, encode
from streams.topics import AUDIT
from tests.api.conftest import Api, composed
from tests.integration.pipeline_helpers import read_topic

pytestmark = pytest.mark.integration
_event = decoder(AuditEvent)


async def _some_actions(api: Api) -> None:
    rid = await composed(api, "pending")
    await api.call("POST", f"/alerts/{rid}/reject", "approver", json={"reason": "not now"})
    await api.call("POST", f"/alerts/{rid}/approve", "originator", json={})  # denied: role
    await api.call("POST", "/alerts", "originator", json={"status": "Actual"})  # 422


async def test_every_action_is_chained_and_the_chain_verifies(api: Api) -> None:
    await _some_actions(api)
    r = await api.call("GET", "/audit", "auditor", params={"limit": 1000})
    assert r.status_code == 200
    events = [e["event"] for e in r.json()]
    actions = [e["action"] for e in events]
    assert actions[:3] == ["alert.compose", "alert.submit", "alert.reject"]
    first = events[0]
    assert first["actor"] == "demo-originator" and first["roles"] == ["originator"]
    assert first["org"] == "demo-county" and first["ip"] == "127.0.0.1" and first["at"] > 0
    assert first["prev"] == "" and events[1]["prev"] == first["hash"]
    r = await api.call("GET", "/audit/verify", "admin")
    assert r.json()["ok"] is True and r.json()["problems"] == []
    # The same entries, in order, on the audit topic (an independent copy).
    copies = await read_topic(api.settings.kafka_bootstrap_servers, AUDIT, len(events))
    chain = [_event.decode(rec.value) for rec in copies]
    assert [e.hash for e in chain][: len(events)] == [e["hash"] for e in events]


async def test_tampering_is_detected(api: Api) -> None:
    await _some_actions(api)
    redis = api.ctx.redis
    entries = await redis.xrange(STREAM)
    assert len(entries) >= 4
    # 1. An "edited" entry: the last one replaced by a copy with another detail.
    last_id, fields = entries[-1]
    forged = msgspec.structs.replace(_event.decode(fields[b"e"]), detail="nothing happened")
    await redis.xdel(STREAM, last_id)
    await redis.xadd(STREAM, {"e": encode(forged)})
    report = (await api.call("GET", "/audit/verify", "auditor")).json()
    assert report["ok"] is False
    assert any("altered" in p for p in report["problems"]), report
    # 2. A forger who also recomputes the hash still breaks the link to the head... and
    #    removing an entry in the middle breaks the sequence and the next entry's link.
    await redis.xdel(STREAM, entries[1][0])
    report = (await api.call("GET", "/audit/verify", "auditor")).json()
    assert any("sequence jumps" in p for p in report["problems"]), report
    assert any("prev does not match" in p for p in report["problems"]), report


async def test_a_rehashed_forgery_and_a_truncated_tail_are_detected(api: Api) -> None:
    await _some_actions(api)
    redis = api.ctx.redis
    entries = await redis.xrange(STREAM)
    last_id, fields = entries[-1]
    forged = msgspec.structs.replace(_event.decode(fields[b"e"]), actor="someone-else")
    forged.hash = entry_hash(forged)  # internally consistent...
    await redis.xdel(STREAM, last_id)
    await redis.xadd(STREAM, {"e": encode(forged)})
    report = (await api.call("GET", "/audit/verify", "auditor")).json()
    assert report["ok"] is False and any("head says" in p for p in report["problems"])
    await redis.xdel(STREAM, (await redis.xrange(STREAM))[-1][0])
    report = (await api.call("GET", "/audit/verify", "auditor")).json()
    assert any("removed at the end" in p for p in report["problems"]), report


@pytest.mark.parametrize("method", ["DELETE", "PUT", "PATCH", "POST"])
async def test_nobody_can_change_the_audit_log_over_http(api: Api, method: str) -> None:
    await _some_actions(api)
    before = await api.ctx.redis.xlen(STREAM)
    first_id = (await api.ctx.redis.xrange(STREAM, count=1))[0][0].decode()
    for path in ("/audit", f"/audit/{first_id}", "/audit/verify"):
        r = await api.call(method, path, "admin", json={})
        assert r.status_code in (404, 405), (method, path, r.status_code)
        assert "detail" in r.json()
    assert await api.ctx.redis.xlen(STREAM) == before
    assert (await api.call("GET", "/audit/verify", "admin")).json()["ok"] is True


async def _everything_in_redis(client: aioredis.Redis) -> bytes:
    """Every key and value in the database, concatenated (for 'is X stored' checks)."""
    blob = bytearray()
    async for key in client.scan_iter(count=1000):
        blob += key + b"\n"
        kind = (await client.type(key)).decode()
        if kind == "string":
            blob += await client.get(key) or b""
        elif kind == "hash":
            for k, v in (await client.hgetall(key)).items():
                blob += k + b"=" + v + b"\n"
        elif kind == "set":
            blob += b"\n".join(await client.smembers(key))
        elif kind == "zset":
            blob += b"\n".join(await client.zrange(key, 0, -1))
        elif kind == "stream":
            for _, fields in await client.xrange(key):
                blob += b"".join(fields.values())
        elif kind == "list":
            blob += b"\n".join(await client.lrange(key, 0, -1))
    return bytes(blob)


async def test_tokens_are_stored_only_as_hmacs(api: Api) -> None:
    r = await api.call("POST", "/admin/users/demo-auditor/tokens", "admin", json={"label": "t"})
    token = r.json()["token"]
    assert token.startswith("tocsin_") and "cannot be shown again" in r.json()["note"]
    citizen = (await api.client.post("/citizens", json={"push_token": "device-token-123"})).json()
    await api.call("GET", "/me", "originator")  # the rate-limit bucket exists too
    blob = await _everything_in_redis(api.ctx.redis)
    for plain in [*api.tokens.values(), token, citizen["token"]]:
        assert plain.encode() not in blob, "a plaintext token is stored in Redis"
        assert api.ctx.identity.token_hash(plain).encode() in blob  # the HMAC is what's kept
    # The listing shows token ids, never tokens.
    r = await api.call("GET", "/admin/users/demo-auditor/tokens", "admin")
    assert r.json() and all(not t.startswith("tocsin_") for t in r.json())
    assert HEAD.encode() in blob
