"""One real stack for the fault and load tests, and the "once per citizen" ledger.

Processes: tansu behind a :class:`TcpProxy` (tansu advertises the proxy's port, so every
broker connection of the worker goes through it and can be cut), a redis-server with
the production persistence setting (AOF, ``appendfsync everysec``) on a fixed port so it
can be restarted in place, an aiosmtpd SMTP server, the FCM and Twilio-shaped stand-ins,
and ``tocsin worker`` processes. What citizens received is read back at the stand-ins:
push and email carry the alert key (FCM data, Message-ID); SMS carries none, so each
alert variant's headline carries a tag that the SMS body repeats.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import redis as syncredis

from channels.contacts import Contact
from ops.dev import spawn_worker
from ops.devstack import (
    Service,
    _spawn,
    broker_binary,
    free_port,
    redis_binary,
    start_smtp,
)
from ops.settings import Settings
from streams.records import Channel, Subscription, alert_key
from streams.topics import ensure_topics
from tests.integration.pipeline_helpers import RunningWorker, wait_indexed
from tests.integration.tcpproxy import TcpProxy
from tests.integration.test_pipeline import load, storm_bytes
from tests.standins import StandInProcess

SENDER = "KSTO@NWS.NOAA.GOV"
SID = "AC" + "f" * 32
CHANNELS: tuple[Channel, ...] = ("push", "sms", "email")


def start_broker_behind(workdir: Path, proxy_port: int) -> Service:
    """tansu on a free port, advertising ``proxy_port`` (where the proxy listens)."""
    port = free_port()
    argv = [
        broker_binary(), "broker",
        "--listener-url", f"tcp://127.0.0.1:{port}",
        "--advertised-listener-url", f"tcp://127.0.0.1:{proxy_port}",
        "--storage-engine", "memory://tansu/",
    ]  # fmt: skip
    return _spawn("broker", argv, workdir, port, f"127.0.0.1:{proxy_port}")


def start_redis_aof(workdir: Path, port: int) -> Service:
    """redis-server with the persistence production runs with: AOF, fsync every second.

    A restart (SIGTERM: Redis writes and fsyncs the AOF before exiting) keeps the
    idempotency keys, the alert registry and the contact vault.
    """
    argv = [
        redis_binary(), "--port", str(port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
        "--dir", str(workdir), "--protected-mode", "yes",
    ]  # fmt: skip
    return _spawn("redis", argv, workdir, port, f"redis://127.0.0.1:{port}/0")


@dataclass
class Citizens:
    """Subscriptions, their contacts, and the address each expects per channel."""

    subs: list[Subscription]
    contacts: dict[str, Contact]
    expected: dict[str, set[str]]


def storm_citizens(n: int) -> Citizens:
    """``n`` citizens inside the storm polygon's core, channels mixed across all three."""
    subs, contacts = [], {}
    expected: dict[str, set[str]] = {c: set() for c in CHANNELS}
    for i in range(n):
        sid = f"f{i:05d}"
        channels = list(CHANNELS) if i % 10 == 0 else [CHANNELS[i % 3]]
        contact = Contact(push_token=f"ftok-{i:05d}", phone=f"+1556{i:07d}",
                          email=f"f{i:05d}@example.org")  # fmt: skip
        subs.append(Subscription(id=sid, kind="place", lon=-119.97 + (i % 70) * 1e-3,
                                 lat=38.45 + (i // 70) * 1e-3, channels=channels))  # type: ignore[arg-type]  # fmt: skip
        contacts[sid] = contact
        address = {"push": contact.push_token, "sms": contact.phone, "email": contact.email}
        for channel in channels:
            expected[channel].add(address[channel])
    return Citizens(subs, contacts, expected)


def storm_variant(data_dir: Path, tag: str) -> tuple[bytes, str]:
    """The storm warning under a new identifier; its headline (and so SMS) carries tag."""
    ident = f"KSTO1055887203-{tag}"
    payload = storm_bytes(data_dir).replace(b"KSTO1055887203", ident.encode())
    payload = payload.replace(
        b"<headline>SEVERE THUNDERSTORM WARNING</headline>",
        f"<headline>SEVERE THUNDERSTORM WARNING [{tag}]</headline>".encode(),
    )
    return payload, alert_key(SENDER, ident)


@dataclass
class FaultStack:
    """The processes of one fault-test module and what they received."""

    workdir: Path
    data_dir: Path
    proxy: TcpProxy
    broker: Service
    redis: Service
    smtp: Service
    fcm: StandInProcess
    sms: StandInProcess
    settings: Settings
    citizens: Citizens
    workers: list[RunningWorker] = field(default_factory=list)
    _mail: dict[str, tuple[str, str]] = field(default_factory=dict)
    _spawned: int = 0

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def start(cls, workdir: Path, data_dir: Path, citizens: int) -> FaultStack:
        """Start every process, load the citizens, and one worker with them indexed."""
        proxy_port = free_port()
        broker = start_broker_behind(workdir / "broker", proxy_port)
        proxy = TcpProxy("127.0.0.1", broker.port, port=proxy_port).start()
        redis = start_redis_aof(workdir / "redis", free_port())
        smtp = start_smtp(workdir / "smtp")
        fcm = StandInProcess.start("tests.standins.fcm", ["--project", "faults", "--token", "tk"])
        sms = StandInProcess.start(
            "tests.standins.sms", ["--sid", SID, "--auth-token", "at", "--keep-bodies"]
        )
        settings = Settings(
            kafka_bootstrap_servers=broker.url,
            redis_url=redis.url,
            partitions=2,
            data_dir=data_dir,
            outbox_path=workdir / "outbox.jsonl",
            broker_rebalance_timeout_s=2.0,
            delivery_batch_size=100,
            claim_lease_s=3.0,  # a dead sender's claims lapse quickly
            channel_providers="push=fcm,sms=sms,email=smtp",
            fcm_base_url=fcm.url, fcm_project_id="faults", fcm_access_token="tk",
            fcm_timeout_s=2.0, fcm_max_concurrency=20,
            sms_base_url=sms.url, sms_account_sid=SID, sms_auth_token="at",
            sms_from="+15550001111", sms_timeout_s=2.0, sms_max_concurrency=20,
            smtp_host="127.0.0.1", smtp_port=smtp.port,
        )  # fmt: skip
        stack = cls(workdir, data_dir, proxy, broker, redis, smtp, fcm, sms, settings,
                     storm_citizens(citizens))  # fmt: skip
        try:
            asyncio.run(stack._boot())
        except BaseException:
            stack.close()
            raise
        return stack

    async def _boot(self) -> None:
        await ensure_topics(self.settings.kafka_bootstrap_servers, partitions=2)
        worker = self.spawn_worker()
        await load(self.settings, self.citizens.subs, self.citizens.contacts)
        await wait_indexed(self.settings, len(self.citizens.subs), worker)

    def spawn_worker(self) -> RunningWorker:
        """Start one more ``tocsin worker`` process."""
        self._spawned += 1
        log_path = self.workdir / f"worker-{self._spawned}.log"
        worker = RunningWorker(self.settings, spawn_worker(self.settings, log_path), log_path)
        self.workers.append(worker)
        return worker

    def stop_worker(self, worker: RunningWorker, timeout: float = 60) -> int:
        """SIGTERM one worker and wait for it to exit; return its exit code."""
        worker.proc.send_signal(signal.SIGTERM)
        try:
            code = worker.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            worker.proc.wait(10)
            raise AssertionError(f"worker did not stop in {timeout}s\n{worker.log()}") from None
        self.workers.remove(worker)
        return code

    def live_worker(self) -> RunningWorker:
        """The running worker (a test that left none gets a fresh one)."""
        for worker in self.workers:
            if worker.proc.poll() is None:
                return worker
        return self.spawn_worker()

    def restart_redis(self) -> None:
        """Stop redis-server (SIGTERM: it flushes the AOF) and start it on the same port."""
        self.redis.stop()
        self.redis = start_redis_aof(self.workdir / "redis", self.redis.port)

    def close(self) -> None:
        """Stop everything this stack started."""
        for worker in list(self.workers):
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)
                try:
                    worker.proc.wait(30)
                except subprocess.TimeoutExpired:
                    worker.proc.kill()
                    worker.proc.wait(10)
        for standin in (self.fcm, self.sms):
            standin.stop()
        for service in (self.smtp, self.redis, self.broker):
            service.stop()
        self.proxy.stop()

    # -- what citizens received -------------------------------------------------------

    def _emails(self) -> dict[str, tuple[str, str]]:
        """file name -> (To, Message-ID) of every email the SMTP server stored."""
        new = Path(self.smtp.extra["maildir"]) / "new"
        if not new.is_dir():
            return self._mail
        for name in os.listdir(new):
            if name in self._mail:
                continue
            head = (new / name).read_bytes()[:4096].decode(errors="replace")
            to = re.search(r"^To: (.+?)\r?$", head, re.M)
            mid = re.search(r"^Message-ID: (.+?)\r?$", head, re.M)
            if to and mid:
                self._mail[name] = (to.group(1).strip(), mid.group(1).strip())
        return self._mail

    def received(self, key: str, tag: str) -> dict[str, Counter[str]]:
        """Per channel, how many times each address received the alert ``key``."""
        push = Counter(a for a, k, _ in self.fcm.received() if k == key)
        texts = Counter(
            row[0] for row in self.sms.received(bodies=True)
            if f"[{tag}]" in (row[3] or {}).get("Body", "")
        )  # fmt: skip
        mails = Counter(to for to, mid in self._emails().values() if mid.startswith(f"<{key}."))
        return {"push": push, "sms": texts, "email": mails}

    def accepted(self) -> int:
        """Messages accepted by the three providers so far (all alerts)."""
        return (
            self.fcm.stats()["accepted"] + self.sms.stats()["accepted"] + len(self._emails())
        )

    def expected_total(self) -> int:
        """Messages one storm variant owes the citizens."""
        return sum(len(v) for v in self.citizens.expected.values())

    async def wait_received(
        self, key: str, tag: str, timeout: float, worker: RunningWorker
    ) -> None:
        """Wait until every citizen has the alert on each of their channels.

        Polls cheaply (the FCM stand-in's per-alert counter and the Maildir first; the
        SMS bodies only once those are complete) and every quarter second, so that the
        waiting does not take the CPU the worker needs.
        """
        want = self.citizens.expected

        def everyone() -> bool:
            if self.fcm.stats(key)["distinct"] < len(want["push"]):
                return False
            mails = {to for to, mid in self._emails().values() if mid.startswith(f"<{key}.")}
            if len(mails) < len(want["email"]):
                return False
            return len(self.received(key, tag)["sms"]) >= len(want["sms"])

        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(everyone):
            if time.monotonic() > deadline:
                got = {c: len(v) for c, v in self.received(key, tag).items()}
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {tag}: got {got} of "
                    f"{ {c: len(v) for c, v in want.items()} }\n{worker.log()}"
                )
            await asyncio.sleep(0.25)

    def assert_once(self, key: str, tag: str) -> dict[str, Counter[str]]:
        """Nothing lost, nothing duplicated: each expected address exactly once."""
        got = self.received(key, tag)
        for channel in CHANNELS:
            want = self.citizens.expected[channel]
            missing = want - set(got[channel])
            extra = set(got[channel]) - want
            repeats = {a: n for a, n in got[channel].items() if n > 1}
            assert not missing, f"{tag} {channel}: {len(missing)} citizens never warned"
            assert not extra, f"{tag} {channel}: {len(extra)} unexpected addresses"
            assert not repeats, f"{tag} {channel}: {len(repeats)} citizens warned twice"
        return got


def redis_client(stack: FaultStack) -> syncredis.Redis:
    """A plain client to the stack's redis-server."""
    return syncredis.Redis.from_url(stack.settings.redis_url)
