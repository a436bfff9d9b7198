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
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.fault_stack import FaultStack, storm_variant
from tests.integration.pipeline_helpers import wait_until
from tests.integration.test_pipeline import publish

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

    async def reached() -> bool:
        return await asyncio.to_thread(stack.accepted) >= goal

    await wait_until(reached, 60, what, stack.live_worker().log())


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
