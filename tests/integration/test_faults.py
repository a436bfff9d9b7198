"""Faults survived on real processes, each ending "nothing lost, nothing duplicated".

One stack for the module (see ``fault_stack``): tansu behind a cuttable TCP proxy,
redis-server with AOF (``appendfsync everysec``, the production setting), the FCM and
Twilio-shaped stand-ins, an SMTP server, and real ``tocsin worker`` processes. Each case
publishes its own variant of a real NWS storm warning to 1,200 citizens (~1,300
messages over push, SMS and email), injects the fault while the alert is being sent,
and then checks at the stand-ins that every citizen got it exactly once per channel.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.records import DeadLetter, decoder
from streams.topics import HAZARDS_DLQ
from tests.integration.fault_stack import FaultStack, redis_client, storm_variant
from tests.integration.pipeline_helpers import RunningWorker, read_topic, wait_until
from tests.integration.test_pipeline import publish
from tests.integration.test_sharding import wait_owned_by_both

pytestmark = pytest.mark.integration
CITIZENS = 1200
CAP = "application/cap+xml"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[FaultStack]:
    s = FaultStack.start(tmp_path_factory.mktemp("faults"), data_dir, CITIZENS)
    try:
        yield s
    finally:
        s.close()


async def sent_share(stack: FaultStack, start: int, share: float, what: str) -> None:
    """Wait until ``share`` of one alert's messages were accepted since ``start``."""
    goal = start + stack.expected_total() * share

    deadline = time.monotonic() + 60
    while await asyncio.to_thread(stack.accepted) < goal:
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def slow_providers(stack: FaultStack, latency_s: float) -> None:
    """Stretch an alert's sending over a few seconds so a fault lands in the middle."""
    stack.fcm.set_faults(latency_s=latency_s)
    stack.sms.set_faults(latency_s=latency_s)


def test_redis_restarted_mid_alert(stack: FaultStack) -> None:
    worker = stack.live_worker()
    payload, key = storm_variant(stack.data_dir, "Fredis")
    slow_providers(stack, 0.1)

    async def scenario() -> None:
        start = await asyncio.to_thread(stack.accepted)
        await publish(stack.settings, (payload, CAP))
        await sent_share(stack, start, 0.2, "a fifth of the alert sent")
        at_fault = await asyncio.to_thread(stack.accepted)
        await asyncio.to_thread(stack.restart_redis)
        assert at_fault - start < stack.expected_total(), "the restart came after the alert"
        slow_providers(stack, 0.0)
        await stack.wait_received(key, "Fredis", 90, worker)

    asyncio.run(scenario())
    assert worker.proc.poll() is None, f"the worker died\n{worker.log()}"
    stack.assert_once(key, "Fredis")


def test_a_hanging_provider_recovers_and_everything_arrives_once(stack: FaultStack) -> None:
    worker = stack.live_worker()
    payload, key = storm_variant(stack.data_dir, "Fhang")
    before = stack.fcm.stats()

    async def scenario() -> None:
        # FCM stops answering: every push request hangs until the sender's 2 s timeout.
        stack.fcm.set_faults(hang=True)
        await publish(stack.settings, (payload, CAP))

        async def hanging() -> bool:
            return stack.fcm.stats()["requests"] - before["requests"] >= 20

        await wait_until(hanging, 60, "push requests hanging", worker.log())
        await asyncio.sleep(3.5)  # the outage itself (a fault's duration, not a sync)
        stack.fcm.set_faults(hang=False)
        await stack.wait_received(key, "Fhang", 90, worker)

    asyncio.run(scenario())
    assert worker.proc.poll() is None, f"the worker died\n{worker.log()}"
    stack.assert_once(key, "Fhang")
    after = stack.fcm.stats()
    pushes = len(stack.citizens.expected["push"])
    # The hung requests were retried: more requests than messages accepted.
    assert after["requests"] - before["requests"] > pushes
    assert after["accepted"] - before["accepted"] == pushes


def test_broker_connections_cut_and_restored_mid_alert(stack: FaultStack) -> None:
    worker = stack.live_worker()
    payload, key = storm_variant(stack.data_dir, "Fcut")
    slow_providers(stack, 0.1)

    async def scenario() -> None:
        start = await asyncio.to_thread(stack.accepted)
        await publish(stack.settings, (payload, CAP))
        await sent_share(stack, start, 0.2, "a fifth of the alert sent")
        at_fault = await asyncio.to_thread(stack.accepted)
        before = stack.proxy.connections
        cut = await asyncio.to_thread(stack.proxy.cut)
        assert cut > 0, "the worker had no broker connection to cut"
        await asyncio.sleep(4)  # the outage itself
        await asyncio.to_thread(stack.proxy.restore)
        slow_providers(stack, 0.0)
        await stack.wait_received(key, "Fcut", 90, worker)
        # A second alert after the cut proves every stage reconnected, not just senders.
        payload2, key2 = storm_variant(stack.data_dir, "Fcut2")
        await publish(stack.settings, (payload2, CAP))
        await stack.wait_received(key2, "Fcut2", 90, worker)
        assert stack.proxy.connections > before, "nothing reconnected through the proxy"
        assert at_fault - start < stack.expected_total(), "the cut came after the alert"

    asyncio.run(scenario())
    assert worker.proc.poll() is None, f"the worker died\n{worker.log()}"
    stack.assert_once(key, "Fcut")
    stack.assert_once(storm_variant(stack.data_dir, "Fcut2")[1], "Fcut2")


def poison(i: int) -> tuple[bytes, str]:
    """The i-th malformed hazard message: broken XML, broken JSON, invalid CAP, noise."""
    kind = i % 4
    if kind == 0:
        return f"<alert><identifier>p{i}</identifier><sent>".encode(), CAP
    if kind == 1:
        return f'{{"type": "Feature", "id": {i}, "geometry": '.encode(), "application/json"
    if kind == 2:
        return (
            b'<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2"><identifier>p%d'
            b"</identifier><status>Actual</status></alert>" % i,
            CAP,
        )
    return bytes([i % 256, 0, 255, 7]) * 8, ""


POISON = 10_000
POISON_DEADLINE_S = 60.0  # produce -> every citizen warned, for each real alert


def test_poison_flood_goes_to_the_dlq_and_real_alerts_still_arrive(stack: FaultStack) -> None:
    worker = stack.live_worker()
    slow_providers(stack, 0.0)
    real = [storm_variant(stack.data_dir, f"Fpoison{n}") for n in range(3)]
    records: list[tuple[bytes, str]] = [poison(i) for i in range(POISON)]
    for n, (payload, _) in enumerate(real):  # a real alert at 1/4, 2/4 and 3/4 of the flood
        records.insert((n + 1) * POISON // 4 + n, (payload, CAP))
    took: list[float] = []

    async def scenario() -> list[DeadLetter]:
        started = time.monotonic()
        await publish(stack.settings, *records)
        for n, (_, key) in enumerate(real):
            await stack.wait_received(key, f"Fpoison{n}", POISON_DEADLINE_S, worker)
            took.append(time.monotonic() - started)
        dlq = stack.settings.topic(HAZARDS_DLQ)
        rows = await read_topic(stack.settings.kafka_bootstrap_servers, dlq, POISON, 120)
        return [decoder(DeadLetter).decode(r.value) for r in rows]

    letters = asyncio.run(scenario())
    assert worker.proc.poll() is None, f"the worker died\n{worker.log()}"
    for n, (_, key) in enumerate(real):
        stack.assert_once(key, f"Fpoison{n}")
    reasons = Counter(x.reason for x in letters)
    print(f"poison flood: real alerts complete after {[round(t, 1) for t in took]} s; "
          f"DLQ reasons {dict(reasons)}")  # fmt: skip
    assert len(letters) == POISON, f"{len(letters)} dead letters for {POISON} poison records"
    assert all(x.reason and x.stage == "ingest" and x.detail for x in letters)
    assert {x.payload for x in letters} == {p for p, _ in records} - {p for p, _ in real}


def outcome_counts(stack: FaultStack, key: str) -> dict[str, int]:
    """The alert's per-channel outcome counters (``push:sent``, ``sms:duplicate``...)."""
    client = redis_client(stack)
    try:
        raw = client.hgetall(f"tocsin:counters:{key}")
    finally:
        client.close()
    return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}


def test_sigterm_mid_send_drains_and_a_restart_sends_nothing_twice(stack: FaultStack) -> None:
    worker = stack.live_worker()
    payload, key = storm_variant(stack.data_dir, "Fterm")
    slow_providers(stack, 0.1)

    async def scenario() -> tuple[int, int]:
        start = await asyncio.to_thread(stack.accepted)
        await publish(stack.settings, (payload, CAP))
        await sent_share(stack, start, 0.2, "a fifth of the alert sent")
        at_signal = await asyncio.to_thread(stack.accepted)
        code = await asyncio.to_thread(stack.stop_worker, worker)
        assert code == 0, f"worker exited with {code}\n{worker.log()}"
        at_exit = await asyncio.to_thread(stack.accepted)
        slow_providers(stack, 0.0)
        # Two successors: the pair the rolling-restart case starts from.
        successor = stack.spawn_worker()
        stack.spawn_worker()
        await stack.wait_received(key, "Fterm", 90, successor)
        return at_signal - start, at_exit - start

    at_signal, at_exit = asyncio.run(scenario())
    print(f"SIGTERM after {at_signal}, exit after {at_exit} of {stack.expected_total()} messages")
    assert at_signal < stack.expected_total(), "the signal came after the alert was sent"
    assert at_exit > at_signal, "the worker did not drain its in-flight sends"
    stack.assert_once(key, "Fterm")
    counters = outcome_counts(stack, key)
    # Offsets were committed on the way out: the successor was handed no batch the first
    # worker had finished (each would have come back as idempotency "duplicate"s).
    assert not {k: v for k, v in counters.items() if k.endswith(":duplicate")}, counters


async def wait_holding_shards(stack: FaultStack, worker: RunningWorker) -> None:
    """Wait until a (new) worker has joined the group and holds a matcher shard."""
    client = redis_client(stack)
    pid = str(worker.proc.pid)

    async def holding() -> bool:
        owners = await asyncio.to_thread(client.hvals, "tocsin:shard-owners")
        names = [o.decode() if isinstance(o, bytes) else o for o in owners]
        return any(name.rsplit(":", 1)[-1] == pid for name in names)

    try:
        await wait_until(holding, 90, f"worker {pid} holding a shard", worker.log())
    finally:
        client.close()


def test_rolling_restart_of_two_workers_loses_and_repeats_nothing(stack: FaultStack) -> None:
    live = [w for w in stack.workers if w.proc.poll() is None]
    first = live[0] if live else stack.spawn_worker()
    second = live[1] if len(live) > 1 else stack.spawn_worker()
    slow_providers(stack, 0.02)
    alerts = [storm_variant(stack.data_dir, f"Froll{n}") for n in range(6)]

    async def flow() -> None:
        for payload, _ in alerts:
            await publish(stack.settings, (payload, CAP))
            await asyncio.sleep(2.5)  # a steady trickle of alerts during the restarts

    async def scenario() -> None:
        await wait_owned_by_both(stack.settings, first, second)
        publishing = asyncio.create_task(flow())
        for old in (first, second):
            code = await asyncio.to_thread(stack.stop_worker, old)
            assert code == 0, f"worker exited with {code}\n{old.log()}"
            await wait_holding_shards(stack, stack.spawn_worker())
        await publishing
        slow_providers(stack, 0.0)
        for n, (_, key) in enumerate(alerts):
            await stack.wait_received(key, f"Froll{n}", 90, stack.workers[-1])

    asyncio.run(scenario())
    assert len(stack.workers) == 2 and all(w.proc.poll() is None for w in stack.workers)
    for n, (_, key) in enumerate(alerts):
        stack.assert_once(key, f"Froll{n}")
