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
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from geofencing.gazetteer import standard_gazetteer
from streams.pipeline import Ingestor
from streams.publish import hazard_record
from streams.records import Alert, DeadLetter, decoder
from streams.state import AlertStore
from streams.topics import ALERTS, HAZARDS_DLQ, HAZARDS_RAW
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


# -- SIGKILL during ingest and during match ----------------------------------------------


@contextlib.contextmanager
def providers_held(stack: FaultStack) -> Iterator[None]:
    """Hold every provider while a worker is killed, so the kill lands before any send.

    FCM and SMS hang each request (released requests are dropped unrecorded, as by a
    provider that never accepted them); the SMTP server is stopped (SIGSTOP), so a
    connection never gets its greeting and no mail can be half-sent. What the killed
    worker had in flight therefore never reaches anyone, and "exactly once" below is
    exact, not "once plus the requests on the wire at the kill" (test_crash.py covers
    that window for a kill mid-send).
    """
    stack.fcm.set_faults(hang=True, latency_s=0.0)
    stack.sms.set_faults(hang=True, latency_s=0.0)
    os.kill(stack.smtp.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(stack.smtp.proc.pid, signal.SIGCONT)
        stack.fcm.set_faults(hang=False)
        stack.sms.set_faults(hang=False)


def text(value: object) -> str:
    """A Redis reply as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def sigkill(worker: RunningWorker) -> None:
    """SIGKILL one worker: no drain, no commit, its claims kept until their lease ends."""
    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait(10)


async def alert_keys_on_topic(stack: FaultStack) -> Counter[str]:
    """How many times each alert key was published to ``alerts``."""
    topic = stack.settings.topic(ALERTS)
    rows = await read_topic(stack.settings.kafka_bootstrap_servers, topic, None, 30)
    return Counter(decoder(Alert).decode(r.value).key for r in rows)


def test_worker_sigkilled_during_match_loses_and_repeats_nothing(stack: FaultStack) -> None:
    live = [w for w in stack.workers if w.proc.poll() is None]
    first = live[0] if live else stack.spawn_worker()
    second = live[1] if len(live) > 1 else stack.spawn_worker()
    alerts = [storm_variant(stack.data_dir, f"Fmatch{n}") for n in range(3)]
    client = redis_client(stack)
    answered: list[int] = []

    async def shard_answers() -> int:
        """(alert, shard) match answers recorded so far for the burst."""
        keys = [f"tocsin:matched:{key}" for _, key in alerts]
        return sum(await asyncio.gather(*(asyncio.to_thread(client.hlen, k) for k in keys)))

    async def scenario() -> RunningWorker:
        await wait_owned_by_both(stack.settings, first, second)
        owners = await asyncio.to_thread(client.hgetall, "tocsin:shard-owners")
        owner0 = text(owners.get(b"0", b"")).rsplit(":", 1)[-1]
        victim, survivor = (first, second) if owner0 == str(first.proc.pid) else (second, first)
        with providers_held(stack):
            await publish(stack.settings, *[(payload, CAP) for payload, _ in alerts])
            # Kill as soon as the first shard answered: the burst's other match.requests
            # copies are in flight or done but not committed (commit interval 2.8 s).
            deadline = time.monotonic() + 60
            while await shard_answers() == 0:
                assert time.monotonic() < deadline, f"nothing matched\n{victim.log()}"
                await asyncio.sleep(0.005)
            await asyncio.to_thread(sigkill, victim)
            answered.append(await shard_answers())
            stack.workers.remove(victim)
        for n, (_, key) in enumerate(alerts):
            await stack.wait_received(key, f"Fmatch{n}", 90, survivor)
        return survivor

    try:
        survivor = asyncio.run(scenario())
        matched = [outcome_counts(stack, key).get("matched") for _, key in alerts]
    finally:
        client.close()
    print(f"match kill: {answered[0]} of {2 * len(alerts)} shard answers in at the kill")
    assert survivor.proc.poll() is None, f"the survivor died\n{survivor.log()}"
    for n, (_, key) in enumerate(alerts):
        stack.assert_once(key, f"Fmatch{n}")
    # A shard answer given again replaces the first: the reach is not counted twice.
    assert matched == [CITIZENS] * len(alerts), matched


async def publish_one(stack: FaultStack, payload: bytes) -> str:
    """Produce one CAP message to ``hazards.raw``; return its ``topic:partition:offset``."""
    topic = stack.settings.topic(HAZARDS_RAW)
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap_servers)
    await producer.start()
    try:
        _, value, headers = hazard_record(payload, CAP, "test", 0.0)
        meta = await producer.send_and_wait(topic, value=value, headers=headers)
    finally:
        await producer.stop()
    return f"{topic}:{meta.partition}:{meta.offset}"


async def register_as_a_dead_worker(stack: FaultStack, payload: bytes, origin: str) -> None:
    """Run the ingest step a worker runs for one raw record, and publish nothing: the
    registry is left as by a worker SIGKILLed between registering and publishing."""
    client = aioredis.Redis.from_url(stack.settings.redis_url)
    try:
        ingestor = Ingestor(standard_gazetteer(stack.data_dir), AlertStore(client))
        outcome = await ingestor.ingest(payload, {"content-type": CAP.encode()}, record_id=origin)
        assert len(outcome.alerts) == 1, outcome.dead
    finally:
        await client.aclose()


def test_worker_sigkilled_during_ingest_loses_and_repeats_nothing(stack: FaultStack) -> None:
    burst = [storm_variant(stack.data_dir, f"Fingest{n}") for n in range(4)]
    client = redis_client(stack)

    def registered() -> set[str]:
        return {key for _, key in burst if client.exists(f"tocsin:alert:{key}")}

    state: dict[str, object] = {}

    async def scenario() -> RunningWorker:
        with providers_held(stack):
            await publish(stack.settings, *[(payload, CAP) for payload, _ in burst[1:]])
            # Kill every worker as soon as the first alert of the burst is registered.
            deadline = time.monotonic() + 60
            while not await asyncio.to_thread(registered):
                assert time.monotonic() < deadline, "nothing ingested"
                await asyncio.sleep(0.005)
            for worker in [w for w in stack.workers if w.proc.poll() is None]:
                await asyncio.to_thread(sigkill, worker)
                stack.workers.remove(worker)
            state["registered"] = len(await asyncio.to_thread(registered))
            state["published"] = await alert_keys_on_topic(stack)
            # The narrowest window of all, made certain: one more record, taken by the
            # registry as the killed worker would have, never published.
            origin = await publish_one(stack, burst[0][0])
            await register_as_a_dead_worker(stack, burst[0][0], origin)
        successor = stack.spawn_worker()
        for n, (_, key) in enumerate(burst):
            await stack.wait_received(key, f"Fingest{n}", 90, successor)
        state["after"] = await alert_keys_on_topic(stack)
        return successor

    try:
        successor = asyncio.run(scenario())
        # One registry entry per alert, however often its record was ingested.
        entries = client.zrangebyscore("tocsin:alerts", "-inf", "+inf")
    finally:
        client.close()
    before, after = state["published"], state["after"]
    assert isinstance(before, Counter) and isinstance(after, Counter)
    keys = [key for _, key in burst]
    print(f"ingest kill: {state['registered']} of {len(burst) - 1} registered and "
          f"{sum(before[k] for k in keys)} published at the kill; alerts records in the "
          f"end {[after[k] for k in keys]}")  # fmt: skip
    assert successor.proc.poll() is None, f"the worker died\n{successor.log()}"
    for n, (_, key) in enumerate(burst):
        stack.assert_once(key, f"Fingest{n}")
    assert sorted(k for k in map(text, entries) if k in keys) == sorted(keys)
    # Records the killed worker had not committed came back: those already published
    # were published again (a redelivery is not a duplicate: it may never have got
    # out), and the copies reached nobody twice (asserted above).
    assert all(after[k] >= 1 for k in keys), after
