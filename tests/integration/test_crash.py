"""A fan-out worker SIGKILLed twice mid-send: nobody lost, nobody warned twice.

Real parts: tansu, redis-server, the FCM and Twilio-shaped stand-ins as processes, an
aiosmtpd SMTP server, a real ``tocsin api`` process serving the SMS status webhook,
and real ``tocsin worker`` processes that are killed with SIGKILL while they send and
restarted.

What the citizen gets, counted at the stand-ins:

- **SMS**: exactly one text per phone. Each text's StatusCallback names it by an
  opaque token; the stand-in posts Twilio's ``queued``/``sent``/``delivered``
  callbacks to the API, which records the acknowledgement; the restarted worker finds
  the texts the killed one had handed over and marks them sent instead of re-sending;
- **push**: every device shows exactly one notification: all messages of the alert
  carry one collapse key (Android, APNs and webpush alike), so a re-sent message
  replaces the first. Raw repeats -- the requests in flight at each kill plus marks
  not yet flushed -- are counted and bounded;
- **email**: exactly one distinct Message-ID per mailbox (a re-send is the same
  message to clients that deduplicate by Message-ID); raw repeats bounded likewise.
"""

from __future__ import annotations

import asyncio
import mailbox
import os
import re
import signal
import subprocess
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from channels.contacts import Contact
from channels.idempotency import FLUSH_MAX_KEYS
from ops.dev import spawn_child, spawn_worker
from ops.devstack import Service, free_port, port_open
from streams.records import Channel, Subscription
from streams.topics import ensure_topics
from tests.integration.pipeline_helpers import RunningWorker, wait_indexed, wait_until
from tests.integration.test_pipeline import (
    load,
    publish,
    settings_for,
    storm_bytes,
)
from tests.standins import StandInProcess

pytestmark = pytest.mark.integration
N = 20_000
SID = "AC" + "c" * 32


def subscribers() -> tuple[list[Subscription], dict[str, Contact], dict[str, set[str]]]:
    """N citizens inside the storm; channel mix across all three; expected addresses."""
    subs, contacts = [], {}
    expected: dict[str, set[str]] = {"push": set(), "sms": set(), "email": set()}
    for i in range(N):
        sid = f"c{i:05d}"
        channels: list[Channel] = (
            ["push", "sms", "email"] if i % 10 == 0 else [("push", "sms", "email")[i % 3]]
        )  # type: ignore[list-item]
        contact = Contact(push_token=f"tok-{i:05d}", phone=f"+1555{i:07d}",
                          email=f"c{i:05d}@example.org")  # fmt: skip
        subs.append(Subscription(id=sid, kind="place", lon=-119.93 + (i % 100) * 1e-4,
                                 lat=38.48 + (i // 100) * 1e-5, channels=channels))  # fmt: skip
        contacts[sid] = contact
        for channel in channels:
            address = {"push": contact.push_token, "sms": contact.phone, "email": contact.email}
            expected[channel].add(address[channel])
    return subs, contacts, expected


def email_ids(maildir: str) -> list[tuple[str, str]]:
    box = mailbox.Maildir(maildir, factory=None, create=False)
    return [(str(m["To"]), str(m["Message-ID"])) for m in box]


def collapse_key(message: dict[str, Any]) -> str:
    """The one collapse key a push message carries on every platform (else fail)."""
    android = message["android"]["collapse_key"]
    apns = message["apns"]["headers"]["apns-collapse-id"]
    webpush = message["webpush"]["headers"]["Topic"]
    assert android == apns == webpush == message["android"]["notification"]["tag"], message
    return str(android)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_sigkilled_workers_lose_nobody(
    broker: str, redis_url: str, tmp_path: Path, data_dir: Path, smtp_server: Service
) -> None:
    fcm = StandInProcess.start(
        "tests.standins.fcm", ["--project", "crash", "--token", "tk", "--keep-bodies"]
    )
    sms = StandInProcess.start(
        "tests.standins.sms", ["--sid", SID, "--auth-token", "at", "--callbacks"]
    )
    api_port = free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    settings = settings_for(broker, redis_url, tmp_path, data_dir).model_copy(
        update={
            "partitions": 2,
            "delivery_batch_size": 250,
            "claim_lease_s": 2.0,  # a dead worker's claims lapse quickly
            "channel_providers": "push=fcm,sms=sms,email=smtp",
            "fcm_base_url": fcm.url, "fcm_project_id": "crash", "fcm_access_token": "tk",
            "sms_base_url": sms.url, "sms_account_sid": SID, "sms_auth_token": "at",
            "sms_from": "+15550001111",
            "sms_status_callback_url": f"{api_url}/webhooks/sms/status",
            "smtp_host": "127.0.0.1", "smtp_port": smtp_server.port,
            # The API serves the status webhook and checks the stand-in's signatures.
            "api_host": "127.0.0.1", "api_port": api_port, "api_public_url": api_url,
            "api_token_secret": "crash-test-secret",
        }
    )  # fmt: skip
    quiet = settings.model_copy(update={"log_level": "WARNING"})  # no access log per callback
    api = spawn_child(["api"], quiet, tmp_path / "api.log")
    subs, contacts, expected = subscribers()
    total = sum(len(v) for v in expected.values())
    maildir = smtp_server.extra["maildir"]
    kills: list[int] = []

    def accepted() -> int:
        new = os.path.join(maildir, "new")
        emails = len(os.listdir(new)) if os.path.isdir(new) else 0  # cheap: no parsing
        return fcm.stats()["accepted"] + sms.stats()["accepted"] + emails

    async def scenario() -> None:
        await ensure_topics(broker, partitions=settings.partitions)

        def start(n: int) -> RunningWorker:
            log_path = tmp_path / f"worker-{n}.log"
            return RunningWorker(settings, spawn_worker(settings, log_path), log_path)

        async def api_up() -> bool:
            assert api.poll() is None, (tmp_path / "api.log").read_text()[-3000:]
            return port_open(api_port, "127.0.0.1")

        await wait_until(api_up, 60, "the API to listen")
        worker = start(0)
        try:
            await load(settings, subs, contacts)
            await wait_indexed(settings, len(subs), worker)
            await publish(settings, (storm_bytes(data_dir), "application/cap+xml"))
            for n, share in enumerate((0.15, 0.5), start=1):

                async def progressed(share: float = share) -> bool:
                    return await asyncio.to_thread(accepted) >= total * share

                await wait_until(progressed, 120, f"{share:.0%} sent", worker.log())
                worker.proc.send_signal(signal.SIGKILL)  # no drain, no commit, claims kept
                worker.proc.wait(10)
                kills.append(await asyncio.to_thread(accepted))
                worker = start(n)

            async def everyone() -> bool:
                return await asyncio.to_thread(accepted) >= total

            await wait_until(everyone, 240, "every message", worker.log())
            # Not asserted here: the per-alert counters reaching "complete". A receipt
            # produced just before a SIGKILL can be lost with the producer's buffer
            # while its batch's offset was already committed (see the issue notes);
            # what the citizen receives, counted at the stand-ins, is what this proves.
        finally:
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)
                try:
                    worker.proc.wait(30)
                except subprocess.TimeoutExpired:
                    worker.proc.kill()

    logs = ""
    try:
        asyncio.run(scenario())
        pushes = [(row[0], collapse_key(row[3])) for row in fcm.received(bodies=True)]
        texts = Counter(address for address, _, _ in sms.received())
        callbacks = sms.stats()
    finally:
        fcm.stop()
        sms.stop()
        stop(api)
        logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("worker-*.log"))
    emails = email_ids(maildir)
    assert len(kills) == 2 and kills[0] < total and kills[1] < total, "the kills came too late"
    # Nobody lost, on any channel.
    assert {token for token, _ in pushes} == expected["push"]
    assert set(texts) == expected["sms"]
    assert {to for to, _ in emails} == expected["email"]
    # SMS: exactly one text per phone.
    assert [phone for phone, n in texts.items() if n > 1] == [], "a phone got two texts"
    # Push: one visible notification per device -- every message a device got for the
    # alert has the same collapse key, so a repeat replaces the first.
    visible: dict[str, set[str]] = defaultdict(set)
    for token, key in pushes:
        visible[token].add(key)
    assert all(len(keys) == 1 for keys in visible.values()), "two notifications on a device"
    # Email: one distinct Message-ID per mailbox.
    ids: dict[str, set[str]] = defaultdict(set)
    for to, mid in emails:
        ids[to].add(mid)
    assert all(len(m) == 1 for m in ids.values()), "two Message-IDs for one mailbox"
    # Raw repeats: only what was in flight at a kill -- requests on the wire (at most the
    # provider's concurrency) plus answers waiting for their mark (about as many again
    # on a loaded loopback; see channels/idempotency.py).
    push_repeats = len(pushes) - len(visible)
    email_repeats = len(emails) - len(ids)
    acked = sum(int(n) for n in re.findall(r"(\d+) messages a crashed sender", logs))
    print(
        f"kills at {kills} of {total}; raw repeats: push {push_repeats}, email "
        f"{email_repeats}, sms 0 ({acked} acknowledged texts of the killed workers not "
        f"re-sent; {callbacks['callbacks_sent']} status callbacks posted)"
    )
    assert push_repeats <= len(kills) * 2 * (settings.fcm_max_concurrency + FLUSH_MAX_KEYS)
    assert email_repeats <= len(kills) * 2 * (settings.smtp_pool_size + FLUSH_MAX_KEYS)
