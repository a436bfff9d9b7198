"""``tocsin dev``: the embedded default stack, demo data, replay and a live display.

Starts (unless configured to use external ones) a tansu broker and a redis-server on
free loopback ports, creates the topics, starts a stream worker as a child process with
the outbox provider on every channel, loads the US county zones and a few thousand
synthetic citizens, replays real CAP messages, and shows per alert how many citizens
matched and what was delivered on each channel. Ctrl-C (or ``--exit-after-replay``)
stops the worker and the services and waits for each to exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import redis.asyncio as aioredis
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table

from channels.contacts import ContactStore
from geofencing.areas import resolve_alert_geometry
from geofencing.gazetteer import default_gazetteer
from ops.demo import demo_alert_paths, synthetic_citizens
from ops.devstack import Service, free_port, port_open, start_broker, start_redis
from ops.settings import Settings
from streams import topics as T
from streams.cap import parse_cap
from streams.publish import hazard_record, produce, rebase_cap_times, subscription_records
from streams.records import CHANNELS, Alert
from streams.state import AlertStore
from streams.state import Progress as AlertProgress


class DevError(RuntimeError):
    """The dev stack could not reach a working state; the message says which step."""


@dataclass
class DevStack:
    """The processes ``tocsin dev`` owns, stopped in reverse order on exit."""

    workdir: Path
    services: list[Service] = field(default_factory=list)
    worker: subprocess.Popen[bytes] | None = None
    api: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        """Stop the API and the worker (SIGTERM: drain and commit), then the services."""
        for child in (self.api, self.worker):
            if child is not None and child.poll() is None:
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(30)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait(10)
        for service in reversed(self.services):
            service.stop()


def start_stack(settings: Settings, workdir: Path) -> tuple[DevStack, Settings]:
    """Start whatever the settings do not point at, then the worker; return final settings."""
    stack = DevStack(workdir)
    updates: dict[str, object] = {}
    try:
        if not settings.kafka_bootstrap_servers:
            broker = start_broker(workdir / "broker")
            stack.services.append(broker)
            updates["kafka_bootstrap_servers"] = broker.url
        if not settings.redis_url:
            redis_service = start_redis(workdir / "redis")
            stack.services.append(redis_service)
            updates["redis_url"] = redis_service.url
        if settings.outbox_path == Path("tocsin-outbox.jsonl"):
            updates["outbox_path"] = workdir / "outbox.jsonl"
        if not settings.api_token_secret:
            # One key for this session's API process and the demo tokens seeded below.
            updates["api_token_secret"] = secrets.token_hex(32)
        if port_open(settings.api_port, settings.api_host):
            updates["api_port"] = free_port()
        settings = settings.model_copy(update=updates)
        asyncio.run(
            T.ensure_topics(
                settings.kafka_bootstrap_servers,
                partitions=settings.partitions,
                replication=settings.replication_factor,
                prefix=settings.topic_prefix,
            )
        )
        stack.worker = spawn_worker(settings, workdir / "worker.log")
        stack.api = spawn_child(["api"], settings, workdir / "api.log")
    except BaseException:
        stack.stop()
        raise
    return stack, settings


def spawn_worker(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    """Run ``tocsin worker`` as a child process configured by ``settings``."""
    return spawn_child(["worker"], settings, log_path)


def spawn_child(args: list[str], settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    """Run ``tocsin ARGS`` as a child process configured by ``settings``."""
    env = {**os.environ, **settings.to_env()}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "ops.cli", *args],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # see ops.devstack: the parent stops it in order
        )  # fmt: skip


async def load_demo(settings: Settings, citizens: int, console: Console) -> list[Alert]:
    """Load synthetic citizens around the demo alerts; return the parsed demo alerts."""
    gazetteer = default_gazetteer(settings.data_dir)
    alerts: list[Alert] = []
    focus = []
    for path in demo_alert_paths(settings.data_dir):
        for alert in parse_cap(path.read_bytes(), source=path.name):
            alerts.append(alert)
            geometry, _ = resolve_alert_geometry(alert, gazetteer)
            if geometry is not None:
                focus.append(geometry)
    zone_codes = [c for c in gazetteer if c.startswith("FIPS:")]
    people = synthetic_citizens(
        citizens, focus_areas=focus, zone_codes=zone_codes,
        focus_zones=["FIPS:06037", "FIPS:06109", "FIPS:24031", "FIPS:06059", "FIPS:06111"],
    )  # fmt: skip
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        await ContactStore(client).put_many({c.subscription.id: c.contact for c in people})
    finally:
        await client.aclose()
    await produce(
        settings.kafka_bootstrap_servers,
        settings.topic(T.SUBSCRIPTIONS),
        subscription_records(c.subscription for c in people),
    )
    console.print(f"[green]loaded[/] {len(people):,} synthetic citizens and their contacts")
    return alerts


async def seed_console_users(settings: Settings) -> dict[str, str]:
    """The demo organisation's users and their API tokens (shown once, here)."""
    from ops.api.identity import IdentityStore, seed_demo

    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        return await seed_demo(IdentityStore(client, settings.api_token_secret.encode()))
    finally:
        await client.aclose()


def wait_for_api(settings: Settings, stack: DevStack, timeout: float = 30) -> None:
    """Block until the API listens (or fail with the tail of its log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stack.api is not None and stack.api.poll() is not None:
            raise DevError(f"the API exited; see {stack.workdir}/api.log")
        if port_open(settings.api_port, settings.api_host):
            return
        time.sleep(0.05)
    raise DevError(f"the API did not listen in {timeout:.0f}s; see {stack.workdir}/api.log")


async def wait_for_shards(settings: Settings, expected: int, timeout: float) -> None:
    """Wait until the worker's shards hold every loaded subscription."""
    client = aioredis.Redis.from_url(settings.redis_url)
    store = AlertStore(client)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if sum((await store.shard_sizes()).values()) >= expected:
                return
            await asyncio.sleep(0.1)
    finally:
        await client.aclose()
    raise DevError(f"the worker did not index {expected} subscriptions in {timeout:.0f}s")


async def replay(settings: Settings, paths: list[Path]) -> None:
    """Publish real CAP files to ``hazards.raw`` with their times rebased to now."""
    now = datetime.now(UTC)
    records = [
        hazard_record(rebase_cap_times(p.read_bytes(), now), "application/cap+xml",
                      f"replay:{p.name}", time.time())
        for p in paths
    ]  # fmt: skip
    await produce(settings.kafka_bootstrap_servers, settings.topic(T.HAZARDS_RAW), records)


def progress_table(alerts: list[Alert], states: dict[str, AlertProgress]) -> Table:
    """One row per alert: matched citizens and the outcome per channel."""
    table = Table(title="Tocsin — replayed alerts")
    for column in ("alert", "status", "matched", *CHANNELS):
        table.add_column(column)
    for alert in alerts:
        state = states.get(alert.key)
        event = alert.infos[0].event if alert.infos else alert.msg_type
        if state is None:
            table.add_row(event, "waiting", "-", *("-" for _ in CHANNELS))
            continue
        cells = []
        for channel in CHANNELS:
            sent = state.outcomes.get(f"{channel}:sent", 0)
            expected = state.expected.get(channel, 0)
            cells.append(f"{sent}/{expected} sent" if expected else "-")
        status = "[green]delivered[/]" if state.complete else "[yellow]delivering[/]"
        table.add_row(event, status, str(state.matched), *cells)
    return table


async def watch(
    settings: Settings, alerts: list[Alert], console: Console, timeout: float
) -> dict[str, AlertProgress]:
    """Show live progress until every alert is delivered (or the timeout)."""
    client = aioredis.Redis.from_url(settings.redis_url)
    store = AlertStore(client)
    states: dict[str, AlertProgress] = {}
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn())
    task = bar.add_task("alerts delivered", total=len(alerts))
    deadline = time.monotonic() + timeout
    try:
        with Live(console=console, refresh_per_second=8, transient=False) as live:
            while time.monotonic() < deadline:
                for alert in alerts:
                    states[alert.key] = await store.progress(alert.key, settings.partitions)
                done = sum(s.complete for s in states.values())
                bar.update(task, completed=done)
                grid = Table.grid()
                grid.add_row(progress_table(alerts, states))
                grid.add_row(bar)
                live.update(grid)
                if done == len(alerts):
                    break
                await asyncio.sleep(0.1)
    finally:
        await client.aclose()
    return states


def run_dev(settings: Settings, *, citizens: int, exit_after_replay: bool, console: Console) -> int:
    """The whole ``tocsin dev`` session; returns the process exit code."""
    workdir = Path(tempfile.mkdtemp(prefix="tocsin-dev-"))
    started = time.monotonic()
    console.print(f"[bold]Tocsin dev stack[/] — working directory {workdir}")
    stack, settings = start_stack(settings, workdir)
    try:
        console.print(
            f"broker [cyan]{settings.kafka_bootstrap_servers}[/]  "
            f"redis [cyan]{settings.redis_url}[/]  "
            f"worker pid {stack.worker.pid if stack.worker else '-'}  "
            f"outbox {settings.outbox_path}"
        )
        tokens = asyncio.run(seed_console_users(settings))
        wait_for_api(settings, stack)
        base = f"http://{settings.api_host}:{settings.api_port}"
        console.print(f"API [cyan]{base}[/] (OpenAPI {base}/docs, public page {base}/public)")
        console.print(f"console [cyan]{base}/console/[/] (sign in with a token below)")
        console.print(f"  demo originator token: {tokens['originator']}")
        console.print(f"  demo approver token:   {tokens['approver']}")
        alerts = asyncio.run(load_demo(settings, citizens, console))
        asyncio.run(wait_for_shards(settings, citizens, timeout=90))
        asyncio.run(replay(settings, demo_alert_paths(settings.data_dir)))
        states = asyncio.run(watch(settings, alerts, console, timeout=90))
        delivered = sum(s.complete for s in states.values())
        console.print(
            f"{delivered}/{len(alerts)} alerts delivered in {time.monotonic() - started:.1f}s "
            f"(outbox: {settings.outbox_path})"
        )
        if delivered != len(alerts):
            console.print(
                f"[red]not every alert was delivered[/]; worker log: {workdir}/worker.log"
            )
            return 1
        if exit_after_replay:
            return 0
        console.print("running — publish more with `tocsin publish FILE` (Ctrl-C to stop)")
        with contextlib.suppress(KeyboardInterrupt):
            while stack.worker is None or stack.worker.poll() is None:
                time.sleep(0.5)
        return 0
    finally:
        console.print("stopping worker and services…")
        stack.stop()
