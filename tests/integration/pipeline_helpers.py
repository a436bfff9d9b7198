"""Helpers for the end-to-end tests: a worker process, waiting, reading topics."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition

from ops.dev import spawn_worker
from ops.settings import Settings
from streams.state import AlertStore, Progress
from streams.topics import ensure_topics


@dataclass
class RunningWorker:
    settings: Settings
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, workdir: Path) -> AsyncIterator[RunningWorker]:
    """A real ``tocsin worker`` child process; SIGTERM and reap on exit."""
    await ensure_topics(settings.kafka_bootstrap_servers, partitions=settings.partitions)
    log_path = workdir / "worker.log"
    proc = spawn_worker(settings, log_path)
    try:
        yield RunningWorker(settings, proc, log_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, on_fail: str = ""
) -> None:
    """Poll an async condition until true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{on_fail}")


async def wait_indexed(settings: Settings, expected: int, worker: RunningWorker) -> None:
    """Wait until the worker's shards hold ``expected`` subscriptions."""
    client = aioredis.Redis.from_url(settings.redis_url)
    store = AlertStore(client)
    try:

        async def indexed() -> bool:
            return sum((await store.shard_sizes()).values()) >= expected

        await wait_until(indexed, 60, f"{expected} subscriptions indexed", worker.log())
    finally:
        await client.aclose()


async def wait_delivered(settings: Settings, key: str, worker: RunningWorker) -> Progress:
    """Wait until every shard matched the alert and every recipient has a result."""
    client = aioredis.Redis.from_url(settings.redis_url)
    store = AlertStore(client)
    state: list[Progress] = []
    try:

        async def complete() -> bool:
            state.append(await store.progress(key, settings.partitions))
            return state[-1].complete

        await wait_until(complete, 60, f"alert {key} delivered", worker.log())
    finally:
        await client.aclose()
    return state[-1]


async def read_topic(
    bootstrap: str, topic: str, expected: int | None = None, timeout: float = 30
) -> list:  # type: ignore[type-arg]
    """Records of a topic from the beginning (all partitions).

    With ``expected``, read until that many arrived; without, until a fetch round
    comes back empty (the end of every partition).
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    records = []
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await consumer._client.force_metadata_update()  # first metadata may be empty
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=300)
            for tp_records in batch.values():
                records.extend(tp_records)
            if expected is None and not batch:
                break
            if expected is not None and len(records) >= expected:
                break
    finally:
        await consumer.stop()
    return records
