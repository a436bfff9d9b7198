"""End to end on real parts: the API, a real worker process, tansu and redis-server.

An originator composes an Actual alert over a demo county and previews it (non-zero
reach), submits it; an approver approves it; the CAP lands on ``hazards.raw``; the real
pipeline delivers it to the outbox - to exactly the people and channels the preview
counted - while the SSE progress stream runs to ``done``. Then the one-step correction
reaches everyone the original reached.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis

from channels.contacts import Contact, ContactStore
from channels.outbox import read_outbox
from streams.publish import produce, subscription_records
from streams.records import CHANNELS, Subscription
from streams.topics import HAZARDS_RAW, SUBSCRIPTIONS
from tests.api.conftest import Api, draft, make_settings, start_api, stop_api, wait_for
from tests.integration.pipeline_helpers import read_topic, running_worker, wait_indexed

pytestmark = pytest.mark.integration


def citizens(n: int) -> tuple[list[Subscription], dict[str, Contact]]:
    rng = np.random.default_rng(11)
    subs, contacts = [], {}
    for i in range(n):
        inside = i % 4 != 0  # a quarter live in Orange County, outside the alert
        lon = float(rng.uniform(-118.35, -118.15)) if inside else float(rng.uniform(-117.9,
                                                                                  -117.7))
        lat = float(rng.uniform(34.0, 34.15)) if inside else float(rng.uniform(33.6, 33.75))
        channels = [c for c in CHANNELS if rng.random() < 0.5] or ["sms"]
        sid = f"e2e-{i:04d}"
        subs.append(Subscription(id=sid, kind="place", lon=lon, lat=lat,
                                 channels=channels))  # type: ignore[arg-type]
        contacts[sid] = Contact(push_token=f"tok-{i}", phone=f"+1555{i:07d}",
                                email=f"p{i}@example.org")
    return subs, contacts


def sse_events(text: str) -> list[tuple[str, dict[str, object]]]:
    out = []
    for block in text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line
                     and not line.startswith(":"))
        if "event" in lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


def delivered(outbox: Path, key: str) -> set[tuple[str, str]]:
    return {(m["subscriber_id"], m["channel"]) for m in read_outbox(outbox)
            if m["alert_key"] == key}


async def test_compose_preview_approve_deliver_and_correct(broker: str, redis_url: str,
                                                           tmp_path: Path,
                                                           data_dir: Path) -> None:
    settings = make_settings(broker, redis_url, tmp_path, data_dir)
    subs, contacts = citizens(160)
    async with running_worker(settings, tmp_path) as worker:
        client = aioredis.Redis.from_url(redis_url)
        await ContactStore(client).put_many(contacts)
        await client.aclose()
        await produce(broker, SUBSCRIPTIONS, subscription_records(subs))
        api: Api = await start_api(settings)
        try:
            # A citizen registered through the API, with two places in the county.
            r = await api.client.post("/citizens", json={
                "push_token": "app-device-token-1", "places": [
                    {"name": "Home", "lon": -118.3, "lat": 34.1},
                    {"name": "Work", "lon": -118.2, "lat": 34.05, "radius_m": 200}]})
            assert r.status_code == 201
            total = len(subs) + 2
            await wait_indexed(settings, total, worker)

            async def api_indexed() -> bool:
                return bool((await api.client.get("/health")).json()["indexed_subscriptions"]
                            == total)

            await wait_for(api_indexed, 30, "the API's preview index")
            body = draft(area={"codes": ["FIPS:06037"], "desc": "Los Angeles County"})
            rid = (await api.call("POST", "/alerts", "originator", json=body)).json()["id"]
            preview = (await api.call("GET", f"/alerts/{rid}/preview", "originator")).json()
            assert preview["reach"]["subscriptions"] > 50, preview["reach"]
            r = await api.call("POST", f"/alerts/{rid}/submit", "originator")
            assert r.json()["state"] == "pending_approval"
            r = await api.call("POST", f"/alerts/{rid}/approve", "approver", json={})
            assert r.json()["state"] == "sent", r.text
            key = r.json()["cap"]["key"]
            raw = await read_topic(broker, HAZARDS_RAW, 1)
            assert dict(raw[0].headers)["source"] == b"console:demo-county"

            stream = api.call("GET", f"/alerts/{rid}/progress/stream", "approver")
            response = await asyncio.wait_for(stream, 90)
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response.text)
            assert events[0][0] == "progress" and events[-1][0] == "done", worker.log()
            final = events[-1][1]
            assert final["complete"] is True
            got = delivered(settings.outbox_path, key)
            # One message per citizen and channel: a citizen whose several places are in
            # the area is warned once, as the preview's citizen counts say.
            reach = preview["reach"]["citizen_channels"]
            assert len(got) == sum(reach.values()), "the outbox differs from the preview"
            per_channel = {c: sum(1 for _, ch in got if ch == c) for c in CHANNELS}
            assert per_channel == reach

            # The correction reaches everyone the original reached, on every channel.
            r = await api.call("POST", f"/alerts/{rid}/correct", "originator", json={})
            assert r.status_code == 200, r.text
            cancel_key = r.json()["cap"]["key"]

            async def corrected() -> bool:
                return delivered(settings.outbox_path, cancel_key) == got

            await wait_for(corrected, 60, "the correction to reach everyone warned")
            texts = [m["body"] for m in read_outbox(settings.outbox_path)
                     if m["alert_key"] == cancel_key and m["channel"] == "sms"]
            assert texts and all("sent in error" in t for t in texts)
            progress = (await api.call("GET", f"/alerts/{rid}/progress", "auditor")).json()
            assert progress["state"] == "corrected"
            assert [m["msg_type"] for m in progress["messages"]] == ["Alert", "Cancel"]
        finally:
            await stop_api(api)
