"""Acceptance 4 of the fan-out issue: a cancel mid-send stops the rest and notifies
those already warned.

Real parts: tansu, redis-server, the FCM and Twilio-shaped stand-ins as processes, an
aiosmtpd SMTP server and a real ``tocsin worker``. The providers are slowed by a low
configured rate limit (the shared Redis token bucket), so the severe thunderstorm
warning is still going out when a real CAP ``Cancel`` referencing it is published.
Counted at the stand-ins and the SMTP server, per channel and address:

- nobody receives the original twice;
- the original stops: what was still queued is not sent;
- everyone who received the original receives exactly one cancellation on that
  channel, and nobody else receives one;
- the alert's counters settle every matched recipient, the ones stopped as
  ``cancelled``.

Bounded window, asserted: batches already handed to a provider when the cancellation
is recorded finish (a provider call is not interrupted half-way); their recipients
are warned and then told of the cancellation like everyone warned before.

The matched place's name and the citizen's time zone travel on the delivery records
and show in the text ("Affects your place: Home", the expiry in Chicago time).
"""

from __future__ import annotations

import asyncio
import mailbox
import os
import re
import time
from collections import Counter
from email.message import Message
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from channels.contacts import Contact
from ops.devstack import Service
from streams.records import CHANNELS, Channel, Subscription, alert_key
from streams.state import CANCELLED, AlertStore
from tests.integration.pipeline_helpers import running_worker, wait_indexed, wait_until
from tests.integration.test_pipeline import (
    STORM_KEY,
    cancel_for,
    load,
    publish,
    settings_for,
    storm_bytes,
)
from tests.standins import StandInProcess

pytestmark = pytest.mark.integration

N = 120
SID = "AC" + "d" * 32
RATE = 8.0  # messages per second per provider: about 9 s for the whole alert
BATCH = 2  # recipients per delivery batch: what one provider call may still finish
CANCEL_KEY = alert_key("KSTO@NWS.NOAA.GOV", "KSTO-midsend-cancel")
PLACES = {"en": "Home", "es": "Casa", "fr": "Chalet"}
PLACE_LINE = {
    "en": "Affects your place: Home",
    "es": "Afecta a su lugar: Casa",
    "fr": "Concerne votre lieu : Chalet",
}


def citizens() -> tuple[list[Subscription], dict[str, Contact], dict[str, dict[str, str]]]:
    """N citizens inside the storm, on one or all three channels, in three languages;
    and per channel, address -> language."""
    subs, contacts = [], {}
    addresses: dict[str, dict[str, str]] = {c: {} for c in CHANNELS}
    for i in range(N):
        sid = f"m{i:04d}"
        lang = ("en", "es", "fr")[i % 3]
        channels: list[Channel] = list(CHANNELS) if i % 5 == 0 else [CHANNELS[(i // 3) % 3]]
        contact = Contact(push_token=f"tok-{i:04d}", phone=f"+1555{i:07d}",
                          email=f"m{i:04d}@example.org")  # fmt: skip
        subs.append(Subscription(id=sid, kind="place", lon=-119.93 + (i % 30) * 1e-3,
                                 lat=38.48 + (i // 30) * 1e-3, channels=channels,
                                 language=lang, timezone="America/Chicago",
                                 name=PLACES[lang]))  # fmt: skip
        contacts[sid] = contact
        for channel in channels:
            address = {"push": contact.push_token, "sms": contact.phone, "email": contact.email}
            addresses[channel][address[channel]] = lang
    return subs, contacts, addresses


def emails(maildir: str) -> list[Message]:
    if not os.path.isdir(maildir):
        return []
    return list(mailbox.Maildir(maildir, factory=None, create=False))


class Seen:
    """What the stand-ins and the SMTP server accepted, split into original and notice."""

    def __init__(self, fcm: StandInProcess, sms: StandInProcess, maildir: str) -> None:
        self.original: dict[str, Counter[str]] = {c: Counter() for c in CHANNELS}
        self.notice: dict[str, Counter[str]] = {c: Counter() for c in CHANNELS}
        self.bodies: dict[tuple[str, str], str] = {}  # (channel, address) -> original text
        for address, key, _at, body in fcm.received(bodies=True):
            self._add("push", address, key == CANCEL_KEY, body["notification"]["body"])
        for address, _key, _at, body in sms.received(bodies=True):
            notice = body["Body"].startswith(("CANCELLED", "CANCELADA", "ANNULÉE"))
            self._add("sms", address, notice, body["Body"])
        for msg in emails(maildir):
            notice = f"<{CANCEL_KEY}." in str(msg["Message-ID"])
            part = msg.get_payload(0) if msg.is_multipart() else msg
            text = part.get_payload(decode=True).decode()  # type: ignore[union-attr]
            self._add("email", str(msg["To"]), notice, text)

    def _add(self, channel: str, address: str, notice: bool, text: str) -> None:
        (self.notice if notice else self.original)[channel][address] += 1
        if not notice:
            self.bodies[(channel, address)] = text

    def originals(self) -> int:
        return sum(sum(c.values()) for c in self.original.values())

    def notices(self) -> int:
        return sum(sum(c.values()) for c in self.notice.values())


def test_a_cancel_mid_send_stops_the_rest_and_notifies_those_already_warned(
    broker: str, redis_url: str, tmp_path: Path, data_dir: Path, smtp_server: Service
) -> None:
    started = time.monotonic()
    fcm = StandInProcess.start(
        "tests.standins.fcm", ["--project", "midsend", "--token", "tk", "--keep-bodies"]
    )
    sms = StandInProcess.start(
        "tests.standins.sms", ["--sid", SID, "--auth-token", "at", "--keep-bodies"]
    )
    settings = settings_for(broker, redis_url, tmp_path, data_dir).model_copy(
        update={
            "partitions": 1,
            "delivery_batch_size": BATCH,
            "channel_providers": "push=fcm,sms=sms,email=smtp",
            "fcm_base_url": fcm.url, "fcm_project_id": "midsend", "fcm_access_token": "tk",
            "sms_base_url": sms.url, "sms_account_sid": SID, "sms_auth_token": "at",
            "sms_from": "+15550001111",
            "smtp_host": "127.0.0.1", "smtp_port": smtp_server.port,
            "fcm_rate_per_s": RATE, "fcm_rate_burst": 2,
            "sms_rate_per_s": RATE, "sms_rate_burst": 2,
            "smtp_rate_per_s": RATE, "smtp_rate_burst": 2,
        }
    )  # fmt: skip
    subs, contacts, addresses = citizens()
    total = sum(len(a) for a in addresses.values())
    maildir = smtp_server.extra["maildir"]
    storm = storm_bytes(data_dir)
    storm_sent = re.search(rb"<sent>([^<]+)</sent>", storm).group(1).decode()  # type: ignore[union-attr]
    cancel = cancel_for("KSTO-midsend-cancel", f"KSTO@NWS.NOAA.GOV,KSTO1055887203,{storm_sent}")
    marks: dict[str, int] = {}
    phases: dict[str, float] = {}

    def seen() -> Seen:
        return Seen(fcm, sms, maildir)

    async def scenario() -> dict[str, dict[str, int]]:
        client = aioredis.Redis.from_url(settings.redis_url)
        store = AlertStore(client)
        try:
            async with running_worker(settings, tmp_path) as worker:
                await load(settings, subs, contacts)
                await wait_indexed(settings, len(subs), worker)
                phases["indexed"] = time.monotonic() - started
                await publish(settings, (storm, "application/cap+xml"))

                async def mid_send() -> bool:
                    return (await asyncio.to_thread(seen)).originals() >= total * 0.2

                await wait_until(mid_send, 30, "the warning to be a fifth out", worker.log())
                marks["published"] = (await asyncio.to_thread(seen)).originals()
                await publish(settings, (cancel, "application/cap+xml"))

                async def recorded() -> bool:
                    return bool(await client.exists(CANCELLED + STORM_KEY))

                await wait_until(recorded, 15, "the cancellation to be recorded", worker.log())
                marks["recorded"] = (await asyncio.to_thread(seen)).originals()
                phases["cancel recorded"] = time.monotonic() - started

                async def settled() -> bool:
                    progress = await store.progress(STORM_KEY, settings.partitions)
                    now = await asyncio.to_thread(seen)
                    settled = Counter[str]()
                    for field, n in (await store.counters(CANCEL_KEY)).items():
                        settled[field.split(":")[0]] += n
                    return (
                        progress.complete
                        and now.notices() >= now.originals()
                        and all(settled[c] >= len(now.original[c]) for c in CHANNELS)
                    )

                await wait_until(settled, 30, "every recipient settled and notified", worker.log())
                phases["settled"] = time.monotonic() - started
                return {
                    "storm": await store.counters(STORM_KEY),
                    "cancel": await store.counters(CANCEL_KEY),
                }
        finally:
            await client.aclose()

    try:
        counters = asyncio.run(scenario())
        final = seen()
    finally:
        fcm.stop()
        sms.stop()
    originals = final.originals()
    print(f"originals at cancel publish {marks['published']}, at cancel recorded "
          f"{marks['recorded']}, final {originals} of {total}; notices {final.notices()}; "
          f"{time.monotonic() - started:.1f} s {phases}; counters {counters}")  # fmt: skip

    # Nobody gets the original twice.
    for channel in CHANNELS:
        assert all(n == 1 for n in final.original[channel].values()), channel
    # The rest was stopped: only provider calls already under way when the cancellation
    # was recorded could still finish. Batches waiting for rate-limit tokens check the
    # cancellation between chunks (a chunk is one message with a burst of 2), so that is
    # at most one message per concurrent send task and channel.
    in_flight = 3 * 8  # channels x urgent-lane agent concurrency x one-message chunk
    assert originals - marks["recorded"] <= in_flight
    assert originals < total, "the cancellation stopped nothing"
    # Everyone warned is told, exactly once per channel they were warned on; nobody else.
    for channel in CHANNELS:
        assert final.notice[channel] == Counter(dict.fromkeys(final.original[channel], 1)), channel
    # The counters: every matched recipient settled; those stopped count as cancelled.
    storm_counts, cancel_counts = counters["storm"], counters["cancel"]
    for channel in CHANNELS:
        warned = len(final.original[channel])
        assert storm_counts.get(f"{channel}:sent", 0) == warned
        assert storm_counts.get(f"{channel}:cancelled", 0) == len(addresses[channel]) - warned
        assert storm_counts.get(f"{channel}:cancelled", 0) > 0
        # Each warned recipient's notice settles once: "sent", or "duplicate" when the
        # Cancel's own fan-out and the sender's post-send check both queued it and the
        # idempotency key absorbed the second (the first reported outcome is kept).
        notices = cancel_counts.get(f"{channel}:sent", 0)
        assert notices + cancel_counts.get(f"{channel}:duplicate", 0) == warned
        assert notices > 0
    # The original named the citizen's place, in their language, with the expiry in
    # their time zone (the storm's rebased expiry, shown in Chicago time).
    for (where, address), text in final.bodies.items():
        assert PLACE_LINE[addresses[where][address]] in text, (where, text)
        assert "CDT" in text or "CST" in text, (where, text)
