"""Sender authority and lifecycle at ingest, on real parts: tansu, redis-server, a worker.

One broker and one ``tocsin worker`` serve the whole module (a sender registry with a
jurisdiction-bound sender, a sender that must sign, and an IPAWS-profile sender); one
citizen lives inside the test polygon. Each test publishes raw CAP to ``hazards.raw``
and checks what a person would see: a ``hazards.dlq`` record with its reason, or the
message in the outbox. (Accepted-alert delivery, unknown references and Cancel are
covered by test_pipeline.py; jurisdiction and expiry without Kafka by test_stages.py.)
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from channels.contacts import Contact, ContactStore
from channels.outbox import read_outbox
from geofencing.gazetteer import default_gazetteer
from ops.dev import spawn_worker
from ops.devstack import start_broker
from ops.settings import Settings
from streams.authority import SenderRegistry
from streams.pipeline import Ingestor
from streams.publish import hazard_record, produce, subscription_records
from streams.records import DeadLetter, Subscription, alert_key, decoder
from streams.state import AlertStore
from streams.topics import HAZARDS_DLQ, HAZARDS_RAW, SUBSCRIPTIONS, ensure_topics
from tests.integration.pipeline_helpers import RunningWorker, read_topic, wait_indexed, wait_until
from tests.unit.test_signature import Identity, make_identity, sign

pytestmark = pytest.mark.integration

RING = "38.47,-120.14 38.34,-119.95 38.52,-119.74 38.62,-119.89 38.47,-120.14"  # Sierra, CA
LOCAL = "ksto@nws.example.gov"  # may alert the Sierra counties
CITY = "sf@city.example.gov"  # may alert San Francisco only
SIGNER = "signed@agency.example.gov"  # must sign with its registered certificate
IPAWS = "ipaws@agency.example.gov"  # IPAWS profile
REGISTRY = f"""
policy: strict
senders:
  - sender: {LOCAL}
    jurisdiction: {{codes: ['FIPS:06003', 'FIPS:06005', 'FIPS:06009', 'FIPS:06017', 'FIPS:06109']}}
  - sender: {CITY}
    jurisdiction: {{codes: ['FIPS:06075']}}
  - sender: {SIGNER}
    require_signature: true
    certificate: agency.pem
  - sender: {IPAWS}
    ipaws_profile: true
"""
CAP = """<?xml version="1.0" encoding="UTF-8"?>
<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2">
  <identifier>{identifier}</identifier>
  <sender>{sender}</sender>
  <sent>{sent}</sent>
  <status>Actual</status>
  <msgType>{msg_type}</msgType>
  <scope>Public</scope>
  <code>IPAWSv1.0</code>{references}
  <info>
    <category>Met</category>
    <event>Severe Thunderstorm Warning</event>
    <urgency>Immediate</urgency>
    <severity>Severe</severity>
    <certainty>Observed</certainty>
    <eventCode><valueName>SAME</valueName><value>SVR</value></eventCode>
    <expires>{expires}</expires>
    <headline>SEVERE THUNDERSTORM WARNING {identifier}</headline>
    <area><areaDesc>Sierra test polygon</areaDesc><polygon>{ring}</polygon></area>
  </info>
</alert>"""


@dataclass
class Message:
    """One CAP message built for a test, with what the checks need to find it."""

    sender: str
    identifier: str
    sent: str
    payload: bytes

    @property
    def key(self) -> str:
        return alert_key(self.sender, self.identifier)

    @property
    def triple(self) -> str:
        return f"{self.sender},{self.identifier},{self.sent}"


def cap(sender: str, identifier: str, *, msg_type: str = "Alert", refs: tuple[Message, ...] = (),
        sent: datetime | None = None, lifetime: timedelta = timedelta(hours=1)) -> Message:
    when = (sent or datetime.now(UTC)).replace(microsecond=0)
    references = ("\n  <references>" + " ".join(r.triple for r in refs) + "</references>"
                  if refs else "")
    text = CAP.format(identifier=identifier, sender=sender, sent=when.isoformat(),
                      msg_type=msg_type, references=references,
                      expires=(when + lifetime).isoformat(), ring=RING)
    return Message(sender, identifier, when.isoformat(), text.encode())


@dataclass
class Stack:
    settings: Settings
    worker: RunningWorker
    agency: Identity


@pytest.fixture(scope="module")
def stack(redis_server: str, tmp_path_factory: pytest.TempPathFactory,
          data_dir: Path) -> Iterator[Stack]:
    """One broker and one worker for the module, one citizen inside the polygon."""
    workdir = tmp_path_factory.mktemp("ingest-authority")
    agency = make_identity("signed.agency.example.gov")
    (workdir / "agency.pem").write_bytes(agency.cert_pem)
    (workdir / "senders.yaml").write_text(REGISTRY)
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    broker = None if external else start_broker(workdir / "broker")
    client = redis.Redis.from_url(redis_server)
    client.flushdb()  # whatever earlier modules left; this module owns the db until it ends
    client.close()
    settings = Settings(kafka_bootstrap_servers=external or broker.url,  # type: ignore[union-attr]
                        redis_url=redis_server, partitions=2, data_dir=data_dir,
                        outbox_path=workdir / "outbox.jsonl", broker_rebalance_timeout_s=2.0,
                        senders_file=str(workdir / "senders.yaml"))
    asyncio.run(ensure_topics(settings.kafka_bootstrap_servers, partitions=settings.partitions))
    log_path = workdir / "worker.log"
    worker = RunningWorker(settings, spawn_worker(settings, log_path), log_path)
    try:
        asyncio.run(_load_citizen(settings, worker))
        yield Stack(settings, worker, agency)
    finally:
        worker.proc.send_signal(signal.SIGTERM)
        try:
            worker.proc.wait(30)
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            worker.proc.wait(10)
        if broker is not None:
            broker.stop()


async def _load_citizen(settings: Settings, worker: RunningWorker) -> None:
    client = aioredis.Redis.from_url(settings.redis_url)
    await ContactStore(client).put_many({"inside": Contact(phone="+15550000001")})
    await client.aclose()
    sub = Subscription(id="inside", kind="place", lon=-119.95, lat=38.47, channels=["sms"])
    await produce(settings.kafka_bootstrap_servers, settings.topic(SUBSCRIPTIONS),
                  subscription_records([sub]))
    await wait_indexed(settings, 1, worker)


async def publish(stack: Stack, *messages: Message | bytes) -> None:
    payloads = [m.payload if isinstance(m, Message) else m for m in messages]
    await produce(stack.settings.kafka_bootstrap_servers, stack.settings.topic(HAZARDS_RAW),
                  [hazard_record(p, "application/cap+xml", "test", 0.0) for p in payloads])


async def rejected(stack: Stack, *identifiers: str) -> dict[str, DeadLetter]:
    """The DLQ record of each message named by identifier (waits for all of them)."""
    found: dict[str, list[DeadLetter]] = {}

    async def arrived() -> bool:
        records = await read_topic(stack.settings.kafka_bootstrap_servers,
                                   stack.settings.topic(HAZARDS_DLQ))
        letters = [decoder(DeadLetter).decode(r.value) for r in records]
        for i in identifiers:
            needle = f"<identifier>{i}</identifier>".encode()
            found[i] = [x for x in letters if needle in x.payload]
        return all(found.values())

    await wait_until(arrived, 60, f"{identifiers} in the DLQ", stack.worker.log())
    assert all(len(x) == 1 for x in found.values()), found
    return {i: x[0] for i, x in found.items()}


async def delivered(stack: Stack, message: Message) -> None:
    """Wait until the citizen inside the polygon got ``message`` by SMS."""

    async def arrived() -> bool:
        return any(x["alert_key"] == message.key for x in read_outbox(stack.settings.outbox_path))

    await wait_until(arrived, 60, f"{message.identifier} delivered", stack.worker.log())


async def registered(stack: Stack, message: Message) -> None:
    """Wait until ingest accepted ``message`` into the alert registry."""
    client = aioredis.Redis.from_url(stack.settings.redis_url)
    store = AlertStore(client)
    try:

        async def stored() -> bool:
            return await store.get(message.key) is not None

        await wait_until(stored, 60, f"{message.identifier} registered", stack.worker.log())
    finally:
        await client.aclose()


def outbox_keys(stack: Stack) -> set[str]:
    return {x["alert_key"] for x in read_outbox(stack.settings.outbox_path)}


def test_an_alert_outside_its_senders_jurisdiction_goes_to_the_dlq(stack: Stack) -> None:
    outside = cap(CITY, "city-1")  # San Francisco's sender, a Sierra polygon
    inside = cap(LOCAL, "local-1")

    async def scenario() -> DeadLetter:
        await publish(stack, outside, inside)
        await delivered(stack, inside)
        return (await rejected(stack, "city-1"))["city-1"]

    letter = asyncio.run(scenario())
    assert letter.reason == "outside_jurisdiction" and letter.stage == "ingest"
    assert CITY in letter.detail and "outside the jurisdiction" in letter.detail
    assert outside.key not in outbox_keys(stack)


def test_a_signing_sender_gets_only_its_validly_signed_alert_delivered(stack: Stack) -> None:
    unsigned = cap(SIGNER, "sig-unsigned")
    tampered = sign(cap(SIGNER, "sig-tampered").payload, stack.agency)
    tampered = tampered.replace(b"<urgency>Immediate", b"<urgency>Past", 1)  # after signing
    forged = sign(cap(SIGNER, "sig-forged").payload, make_identity("impostor.example"))
    valid = cap(SIGNER, "sig-valid")
    valid.payload = sign(valid.payload, stack.agency)

    async def scenario() -> dict[str, DeadLetter]:
        await publish(stack, unsigned, tampered, forged, valid)
        await delivered(stack, valid)
        return await rejected(stack, "sig-unsigned", "sig-tampered", "sig-forged")

    letters = asyncio.run(scenario())
    assert {i: x.reason for i, x in letters.items()} == {
        "sig-unsigned": "unsigned", "sig-tampered": "bad_signature", "sig-forged": "bad_signature"}
    assert all(x.detail for x in letters.values())
    keys = outbox_keys(stack)
    assert valid.key in keys
    assert not {alert_key(SIGNER, i) for i in letters} & keys


def test_expired_alerts_are_never_delivered_nor_updated(stack: Stack) -> None:
    long_ago = datetime.now(UTC) - timedelta(hours=3)
    stale = cap(LOCAL, "exp-stale", sent=long_ago)  # expired two hours ago
    brief = cap(LOCAL, "exp-brief", lifetime=timedelta(seconds=4))

    async def scenario() -> tuple[DeadLetter, DeadLetter]:
        await publish(stack, stale, brief)
        await registered(stack, brief)
        gone = (await rejected(stack, "exp-stale"))["exp-stale"]
        expiry = datetime.fromisoformat(brief.sent).timestamp() + 4

        async def past_expiry() -> bool:  # the condition is the wall clock itself
            return time.time() > expiry + 0.2

        await wait_until(past_expiry, 30, "exp-brief to expire")
        await publish(stack, cap(LOCAL, "exp-update", msg_type="Update", refs=(brief,)))
        return gone, (await rejected(stack, "exp-update"))["exp-update"]

    gone, late = asyncio.run(scenario())
    assert gone.reason == "expired" and "exp-stale" in gone.detail
    assert late.reason == "reference_expired" and "exp-brief" in late.detail
    keys = outbox_keys(stack)
    assert stale.key not in keys and alert_key(LOCAL, "exp-update") not in keys


def test_an_ipaws_update_must_reference_the_whole_unexpired_thread(stack: Stack) -> None:
    first = cap(IPAWS, "ip-alert")
    update = cap(IPAWS, "ip-update-1", msg_type="Update", refs=(first,))
    # Names the original but not the update in between (a forward link of the thread).
    partial = cap(IPAWS, "ip-update-2", msg_type="Update", refs=(first,))
    complete = cap(IPAWS, "ip-update-3", msg_type="Update", refs=(first, update))

    async def scenario() -> DeadLetter:
        await publish(stack, first)
        await registered(stack, first)
        await publish(stack, update)
        await registered(stack, update)
        await publish(stack, partial, complete)
        await delivered(stack, complete)
        return (await rejected(stack, "ip-update-2"))["ip-update-2"]

    letter = asyncio.run(scenario())
    assert letter.reason == "ipaws_profile"
    assert update.triple in letter.detail and first.triple not in letter.detail
    assert partial.key not in outbox_keys(stack)


async def test_a_republished_ipaws_update_stays_a_duplicate(
        redis_server: str, data_dir: Path, tmp_path: Path) -> None:
    # Without Kafka, on a private Redis database: an update republished after a newer one
    # joined its thread is a duplicate (idempotent), not an incomplete-references error.
    client = aioredis.Redis.from_url(re.sub(r"/\d+$", "", redis_server) + "/5")
    await client.flushdb()
    (tmp_path / "senders.yaml").write_text(f"senders: [{{sender: {IPAWS}, ipaws_profile: true}}]")
    gazetteer = default_gazetteer(data_dir)
    ingestor = Ingestor(gazetteer, AlertStore(client),
                        senders=SenderRegistry.load(tmp_path / "senders.yaml", gazetteer))
    try:
        first = cap(IPAWS, "d-alert")
        update = cap(IPAWS, "d-update-1", msg_type="Update", refs=(first,))
        newer = cap(IPAWS, "d-update-2", msg_type="Update", refs=(first, update))
        for message in (first, update, newer):
            outcome = await ingestor.ingest(message.payload, {})
            assert outcome.alerts and not outcome.dead, outcome.dead
        again = await ingestor.ingest(update.payload, {})
        assert (again.duplicates, again.dead, again.alerts) == (1, [], [])
        stale = cap(IPAWS, "d-update-3", msg_type="Update", refs=(newer,))
        [letter] = (await ingestor.ingest(stale.payload, {})).dead
        assert letter.reason == "ipaws_profile"
        assert "missing 2: " + " ".join((first.triple, update.triple)) in letter.detail
    finally:
        await client.flushdb()
        await client.aclose()
