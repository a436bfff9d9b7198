"""Two workers share the matcher shards; rebalances while alerts flow lose nobody."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis

from channels.contacts import Contact
from channels.outbox import read_outbox
from ops.settings import Settings
from streams.records import Subscription, alert_key
from streams.state import AlertStore
from tests.integration.pipeline_helpers import (
    RunningWorker,
    running_worker,
    wait_delivered,
    wait_indexed,
    wait_until,
)
from tests.integration.test_pipeline import load, publish, settings_for, storm_bytes

pytestmark = pytest.mark.integration
SENDER = "KSTO@NWS.NOAA.GOV"


def storm_variant(data_dir: Path, n: int) -> tuple[bytes, str]:
    ident = f"KSTO1055887203-{n}"
    payload = storm_bytes(data_dir).replace(b"KSTO1055887203", ident.encode())
    return payload, alert_key(SENDER, ident)


async def wait_owned_by_both(settings: Settings, *workers: RunningWorker) -> None:
    """Wait until each worker reports holding at least one shard."""
    client = aioredis.Redis.from_url(settings.redis_url)
    store = AlertStore(client)
    pids = {str(w.proc.pid) for w in workers}

    async def both() -> bool:
        owners = {o.rsplit(":", 1)[-1] for o in (await store.shard_owners()).values()}
        return pids <= owners

    try:
        await wait_until(both, 60, "both workers holding shards", workers[-1].log())
    finally:
        await client.aclose()


def test_two_workers_and_rebalances_answer_for_everyone_exactly_once(
    broker: str, redis_url: str, tmp_path: Path, data_dir: Path
) -> None:
    settings = settings_for(broker, redis_url, tmp_path, data_dir).model_copy(
        update={"partitions": 4}
    )
    rng = np.random.default_rng(5)
    # All inside the storm polygon's core, so every alert reaches every subscriber.
    subs = [
        Subscription(id=f"p{i:04d}", kind="place", lon=float(rng.uniform(-119.97, -119.90)),
                     lat=float(rng.uniform(38.45, 38.52)), channels=["sms"])  # type: ignore[list-item]
        for i in range(1500)
    ]
    contacts = {s.id: Contact(phone=f"+1555{i:07d}") for i, s in enumerate(subs)}
    alerts = [storm_variant(data_dir, n) for n in range(5)]

    async def scenario() -> None:
        async with running_worker(settings, tmp_path / "a") as first:
            await load(settings, subs, contacts)
            await wait_indexed(settings, len(subs), first)
            await publish(settings, (alerts[0][0], "application/cap+xml"))
            await wait_delivered(settings, alerts[0][1], first)
            async with running_worker(settings, tmp_path / "b") as second:
                # Alerts published while the second worker joins and the group rebalances.
                await publish(settings, *((p, "application/cap+xml") for p, _ in alerts[1:3]))
                for _, key in alerts[1:3]:
                    await wait_delivered(settings, key, second)
                await wait_owned_by_both(settings, first, second)
                await publish(settings, (alerts[3][0], "application/cap+xml"))
                await wait_delivered(settings, alerts[3][1], second)
                logs = first.log() + second.log()
            # The first worker has the whole group again after the second one left.
            await publish(settings, (alerts[4][0], "application/cap+xml"))
            await wait_delivered(settings, alerts[4][1], first)
        assert "Traceback" not in logs

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    asyncio.run(scenario())
    lines = read_outbox(settings.outbox_path)
    per_alert = Counter(x["alert_key"] for x in lines)
    pairs = Counter((x["alert_key"], x["subscriber_id"]) for x in lines)
    assert max(pairs.values()) == 1, "someone was warned twice about one alert"
    for _, key in alerts:
        assert per_alert[key] == len(subs), f"alert {key}: {per_alert[key]} of {len(subs)}"


def test_standby_shards_take_over_without_rereading(
    broker: str, redis_url: str, tmp_path: Path, data_dir: Path
) -> None:
    """With warm standbys, a worker whose peer leaves answers for the peer's shards from
    the copies it already holds (read and indexed), and everyone is still warned once."""
    settings = settings_for(broker, redis_url, tmp_path, data_dir).model_copy(
        update={"partitions": 4, "shard_standbys": 3}
    )
    rng = np.random.default_rng(9)
    subs = [
        Subscription(id=f"s{i:04d}", kind="place", lon=float(rng.uniform(-119.97, -119.90)),
                     lat=float(rng.uniform(38.45, 38.52)), channels=["sms"])  # type: ignore[list-item]
        for i in range(800)
    ]
    contacts = {s.id: Contact(phone=f"+1555{i:07d}") for i, s in enumerate(subs)}
    alerts = [storm_variant(data_dir, n) for n in (10, 11)]

    async def scenario() -> str:
        async with running_worker(settings, tmp_path / "a") as first:
            await load(settings, subs, contacts)
            await wait_indexed(settings, len(subs), first)
            async with running_worker(settings, tmp_path / "b") as second:
                await wait_owned_by_both(settings, first, second)
                await publish(settings, (alerts[0][0], "application/cap+xml"))
                await wait_delivered(settings, alerts[0][1], second)
            # The second worker left: its partitions were the first one's standbys.
            await publish(settings, (alerts[1][0], "application/cap+xml"))
            await wait_delivered(settings, alerts[1][1], first)
            return first.log()

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    log = asyncio.run(scenario())
    assert "Traceback" not in log
    taken = re.findall(r"taken over from a standby shard \((\d+) subscriptions", log)
    assert taken and all(int(n) > 0 for n in taken), log[-2000:]
    lines = read_outbox(settings.outbox_path)
    pairs = Counter((x["alert_key"], x["subscriber_id"]) for x in lines)
    assert max(pairs.values()) == 1, "someone was warned twice about one alert"
    for _, key in alerts:
        assert sum(1 for a, _ in pairs if a == key) == len(subs)
