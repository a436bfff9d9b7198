"""Who a sent alert reaches, on real parts: test opt-in, and erasure as the pipeline sees it.

Citizens register through the API (places and zones, with and without the test opt-in);
a real worker process matches and fans out; the outbox shows who received what.

- Test and Exercise alerts reach only citizens who opted in to tests. The Actual alert
  over the same area is the control: it reaches everyone, so the opted-out citizens were
  in reach and were left out only because the alert was a test.
- An erased citizen's tombstones reach the worker's shards: the next alert over their
  place does not reach them, and delivering it leaves nothing about them in Redis.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from channels.outbox import read_outbox
from streams.state import AlertStore
from tests.api.conftest import Api, draft, make_settings, start_api, stop_api, wait_for
from tests.api.test_audit_and_secrets import _everything_in_redis
from tests.integration.pipeline_helpers import (
    RunningWorker,
    running_worker,
    wait_delivered,
    wait_indexed,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


@dataclass
class Stack:
    api: Api
    worker: RunningWorker
    subs: dict[str, bool]  # subscription id -> opted in to tests
    citizens: list[dict[str, Any]]  # registration replies (id, token, subscriptions)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(module_broker: str, redis_server: str, data_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """A worker and the API; four citizens in Los Angeles County, two opted in to tests."""
    import redis

    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    client.close()
    workdir = tmp_path_factory.mktemp("reach")
    settings = make_settings(module_broker, redis_server, workdir, data_dir)
    async with running_worker(settings, workdir) as worker:
        api = await start_api(settings)
        try:
            subs: dict[str, bool] = {}
            citizens = []
            for n, (accept, where) in enumerate([
                    (True, {"places": [{"name": "Home", "lon": -118.25, "lat": 34.05}]}),
                    (False, {"places": [{"name": "Home", "lon": -118.26, "lat": 34.06}]}),
                    (True, {"zones": ["FIPS:06037"]}),
                    (False, {"zones": ["SAME:006037"]})]):
                r = await api.client.post("/citizens", json={
                    "push_token": f"device-token-{n:04d}", "prefs": {"accept_tests": accept},
                    **where})
                assert r.status_code == 201, r.text
                citizens.append(r.json())
                for sid in r.json()["subscriptions"]:
                    subs[sid] = accept
            assert len(subs) == 4
            await wait_indexed(settings, len(subs), worker)
            yield Stack(api, worker, subs, citizens)
        finally:
            await stop_api(api)


async def send(api: Api, status: str) -> str:
    """Compose, submit (and approve when needed) an alert over the county; its CAP key."""
    r = await api.call("POST", "/alerts", "originator", json=draft(status=status))
    rid = r.json()["id"]
    r = await api.call("POST", f"/alerts/{rid}/submit", "originator")
    if r.json()["state"] == "pending_approval":
        r = await api.call("POST", f"/alerts/{rid}/approve", "approver", json={})
    assert r.json()["state"] == "sent", r.text
    return str(r.json()["cap"]["key"])


def messages_for(stack: Stack, key: str) -> list[dict[str, Any]]:
    return [m for m in read_outbox(stack.api.settings.outbox_path) if m["alert_key"] == key]


async def test_tests_and_exercises_reach_only_the_opted_in(stack: Stack) -> None:
    sent = {status: await send(stack.api, status) for status in ("Test", "Exercise", "Actual")}
    for key in sent.values():
        await wait_delivered(stack.api.settings, key, stack.worker)
    for status, key in sent.items():
        messages = messages_for(stack, key)
        got = {m["subscriber_id"] for m in messages}
        opted_in = {s for s, ok in stack.subs.items() if ok}
        assert got == (set(stack.subs) if status == "Actual" else opted_in), (status, got)
        for m in messages:  # a test says so in the message itself
            marks = set(re.findall(r"\b(TEST|EXERCISE)\b", json.dumps(m).upper()))
            assert marks == (set() if status == "Actual" else {status.upper()}), m


async def test_an_erased_citizen_is_not_reached_and_leaves_no_trace(stack: Stack) -> None:
    api, gone = stack.api, stack.citizens[0]
    r = await api.client.delete("/citizens/me",
                                headers={"Authorization": f"Bearer {gone['token']}"})
    assert r.status_code == 204
    client = aioredis.Redis.from_url(api.settings.redis_url)
    try:
        store = AlertStore(client)

        async def shards_forgot() -> bool:
            return sum((await store.shard_sizes()).values()) == len(stack.subs) - 1

        await wait_for(shards_forgot, 60, "the worker's shards to apply the tombstone")
    finally:
        await client.aclose()
    key = await send(api, "Actual")
    await wait_delivered(api.settings, key, stack.worker)
    got = {m["subscriber_id"] for m in messages_for(stack, key)}
    assert got == set(stack.subs) - set(gone["subscriptions"])
    blob = await _everything_in_redis(api.ctx.redis)
    for secret in (gone["id"], gone["token"], "device-token-0000"):
        assert secret.encode() not in blob, f"{secret} is in Redis after erasure and an alert"
