"""Fan-out benchmark: one alert to N recipients per channel, through the real sender.

    python benchmarks/fanout.py [--n 100000] [--admin-n 2000] [--concurrency 100]

Starts a redis-server, the FCM and SMS stand-ins (tests/standins, each in its own
process so client and server do not share an event loop) and a recording aiosmtpd
SMTP sink (this file, ``--serve-smtp``), loads N citizens into the contact vault, and
cuts the alert into ``DeliveryBatch`` records of 500 per channel, encoded as they are
on ``deliveries.*`` and decoded just before sending. ``--parallel`` batches per channel
are in flight at once (the send agent's concurrency). No rate limit. Then, in one run:

* push through Tocsin's default path (``channels.fcm``, pooled aiohttp);
* push through firebase-admin's ``send_each_async`` (``channels.fcm_admin``) on a
  sample of ``--admin-n`` recipients (2,000; it manages a few hundred per second);
* a bare aiohttp client posting the very same FCM request bodies (no Redis, no
  sender): the practical limit of this machine -- half of them before Tocsin's run
  and half after, so background load on the shared machine hits both alike;
* SMS (``channels.sms``) and email (``channels.email``, ``--smtp-pool`` connections,
  on half the recipients unless ``--email-n`` says otherwise);

and prints messages/s per path, the ratios, the time from the first delivery record
to the last receipt per channel, and a final JSON line with ``*_per_s`` keys plus
``lost`` and ``duplicates`` counted at the stand-ins (for the Tocsin paths).

The machine has 2 cores shared by client, stand-ins and Redis: the figures are what
the sender achieves next to its own stand-ins, not a provider's capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from channels.base import OutgoingMessage, Provider  # noqa: E402
from channels.contacts import Contact, ContactStore  # noqa: E402
from channels.email import SmtpProvider  # noqa: E402
from channels.fcm import FcmProvider, StaticToken  # noqa: E402
from channels.fcm_admin import FcmAdminProvider  # noqa: E402
from channels.idempotency import IdempotencyGuard  # noqa: E402
from channels.sender import send_batch  # noqa: E402
from channels.sms import SmsProvider  # noqa: E402
from ops.devstack import Service, free_port, start_redis  # noqa: E402
from streams.records import (  # noqa: E402
    Alert,
    Channel,
    DeliveryBatch,
    Info,
    Receipt,
    Recipient,
    decoder,
    encode,
)
from templates.render import Renderer  # noqa: E402
from tests.standins import StandInProcess  # noqa: E402

BATCH = 500
PROJECT, FCM_TOKEN = "tocsin-bench", "bench-token"
SMS_SID, SMS_TOKEN = "AC" + "b" * 32, "bench-auth-token"


def make_alert(tag: str) -> Alert:
    """One Extreme alert in English and Spanish; ``tag`` makes its key unique."""
    return Alert(
        identifier=f"TOCSIN-BENCH-{tag}",
        sender="bench@tocsin.example",
        sent="2024-05-01T10:00:00+00:00",
        status="Actual",
        msg_type="Alert",
        scope="Public",
        infos=[
            Info(
                language="en-US",
                event="Tsunami Warning",
                headline="Tsunami expected on the coast",
                severity="Extreme",
                urgency="Immediate",
                instruction="Move inland or to high ground now.",
                expires="2999-01-01T00:00:00+00:00",
            ),
            Info(
                language="es-US",
                event="Aviso de tsunami",
                headline="Se espera un tsunami en la costa",
                severity="Extreme",
                urgency="Immediate",
                instruction="Diríjase tierra adentro o a un lugar alto ahora.",
                expires="2999-01-01T00:00:00+00:00",
            ),
        ],
    )


# -- SMTP sink (runs as a child process) ----------------------------------------------------

_MSGID = re.compile(rb"^Message-ID:\s*(\S+)", re.MULTILINE | re.IGNORECASE)


def serve_smtp(port: int, out: Path) -> None:
    """aiosmtpd recording each message's recipient and Message-ID; on SIGTERM the
    counts go to ``out`` as JSON. No Maildir: the client is what is measured."""
    from aiosmtpd.smtp import SMTP

    class Recorder:
        def __init__(self) -> None:
            self.rcpt: Counter[str] = Counter()
            self.ids: Counter[str] = Counter()

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            self.rcpt.update(envelope.rcpt_tos)
            head = bytes(envelope.original_content or b"")[:4096]
            found = _MSGID.search(head)
            self.ids[found.group(1).decode() if found else ""] += 1
            return "250 OK"

    async def run() -> Recorder:
        loop = asyncio.get_running_loop()
        handler = Recorder()
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="sink.invalid", ident="bench-sink"), "127.0.0.1", port
        )
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        print("READY", flush=True)
        await stop.wait()
        server.close()
        return handler

    recorded = asyncio.run(run())
    out.write_text(json.dumps({"rcpt": recorded.rcpt, "ids": recorded.ids}))


class SmtpSink:
    """The sink as a child process."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.out = workdir / "smtp-sink.json"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-smtp", str(self.port), "--sink-out", str(self.out)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if not self.proc.stdout.readline().startswith("READY"):
            raise RuntimeError("SMTP sink did not start")

    def stop(self) -> dict[str, Counter[str]]:
        """Stop the sink and return what it recorded."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        data = json.loads(self.out.read_text()) if self.out.exists() else {}
        return {k: Counter(v) for k, v in data.items()}


# -- the run ---------------------------------------------------------------------------------------


def sid(i: int) -> str:
    return f"cit-{i:07d}"


def token(i: int) -> str:
    return f"bench-token-{i:07d}-fcm"


async def seed(store: ContactStore, n: int) -> None:
    chunk = 5000
    for start in range(0, n, chunk):
        await store.put_many(
            {
                sid(i): Contact(
                    push_token=token(i),
                    phone=f"+1555{i:07d}",
                    email=f"citizen{i}@mail.example",
                )
                for i in range(start, min(n, start + chunk))
            }
        )


def records(alert: Alert, channel: Channel, n: int) -> list[bytes]:
    """The alert's delivery records for ``channel``, encoded as on deliveries.*."""
    return [
        encode(
            DeliveryBatch(
                alert_key=alert.key,
                channel=channel,
                recipients=[
                    Recipient(sid(i), "es" if i % 5 == 0 else "en")
                    for i in range(start, min(n, start + BATCH))
                ],
                produced_at=time.time(),
            )
        )
        for start in range(0, n, BATCH)
    ]


async def fan_out(
    redis: aioredis.Redis,
    alert: Alert,
    raw: Sequence[bytes],
    providers: Sequence[Provider],
    parallel: int,
) -> tuple[float, Counter[str]]:
    """Send every record through ``send_batch``; seconds from the first record to the
    last receipt, and the recipient statuses."""
    contacts, guard, renderer = ContactStore(redis), IdempotencyGuard(redis), Renderer()
    dec = decoder(DeliveryBatch)
    gate = asyncio.Semaphore(parallel)

    async def one(data: bytes) -> Receipt:
        async with gate:
            return await send_batch(
                dec.decode(data),
                alert,
                contacts=contacts,
                guard=guard,
                providers=providers,
                renderer=renderer,
            )

    started = time.perf_counter()
    receipts = await asyncio.gather(*(one(r) for r in raw))
    elapsed = time.perf_counter() - started
    return elapsed, Counter(x.status for rc in receipts for x in rc.results)


async def bare_aiohttp(url: str, bodies: Sequence[bytes], concurrency: int) -> tuple[float, int]:
    """Post the bodies with nothing but one pooled aiohttp session."""
    headers = {"Authorization": f"Bearer {FCM_TOKEN}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    ok = 0
    async with aiohttp.ClientSession(connector=connector) as session:
        gate = asyncio.Semaphore(concurrency)

        async def post(body: bytes) -> None:
            nonlocal ok
            async with gate, session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                ok += resp.status == 200

        started = time.perf_counter()
        await asyncio.gather(*(post(b) for b in bodies))
        return time.perf_counter() - started, ok


def line(label: str, n: int, seconds: float, cpu: float, extra: str = "") -> float:
    rate = n / seconds if seconds else 0.0
    print(
        f"  {label:<34} {n:>7} msgs {seconds:7.2f} s {rate:9,.0f} msg/s"
        f"  client CPU {cpu / max(n, 1) * 1e6:6.0f} us/msg {extra}",
        flush=True,
    )
    return rate


async def run(
    args: argparse.Namespace, redis_url: str, fcm_url: str, sms_url: str, smtp_port: int
) -> dict[str, Any]:
    redis = aioredis.Redis.from_url(redis_url)
    n = args.n
    t0 = time.perf_counter()
    await seed(ContactStore(redis), n)
    print(f"seeded {n} citizens in {time.perf_counter() - t0:.1f} s", flush=True)
    out: dict[str, Any] = {"n": n}

    print("push", flush=True)
    fcm = FcmProvider(fcm_url, PROJECT, StaticToken(FCM_TOKEN), max_concurrency=args.concurrency)
    push_alert = make_alert("push")
    bare_alert = make_alert("bare")
    # The bare client posts the exact bodies Tocsin posts (for its own alert key).
    text = Renderer().render(bare_alert, "push", "en")
    bare_msgs = [
        OutgoingMessage(
            sid(i), token(i), "push", bare_alert.key, text.language, text.subject, text.body,
            collapse_key=bare_alert.key, ttl_s=28 * 24 * 3600, severity="Extreme",
            urgency="Immediate",
        )
        for i in range(args.bare_n)
    ]  # fmt: skip
    bodies = [fcm.body(m) for m in bare_msgs]
    # The bare client runs half before and half after Tocsin's run, so a neighbour's
    # load on this shared machine weighs on both sides alike.
    half = len(bodies) // 2
    c = time.process_time()
    bare_s, bare_ok = await bare_aiohttp(str(fcm.url), bodies[:half], args.concurrency)
    bare_cpu_s = time.process_time() - c

    c = time.process_time()
    secs, st = await fan_out(
        redis, push_alert, records(push_alert, "push", n), [fcm], args.parallel
    )
    push_cpu = (time.process_time() - c) / max(st["sent"], 1) * 1e6
    push_rate = line("tocsin fcm (send_batch)", st["sent"], secs, time.process_time() - c)
    out["push_first_record_to_last_receipt_s"] = round(secs, 2)

    c = time.process_time()
    more_s, more_ok = await bare_aiohttp(str(fcm.url), bodies[half:], args.concurrency)
    bare_cpu_s += time.process_time() - c
    bare_s, bare_ok = bare_s + more_s, bare_ok + more_ok
    bare_cpu = bare_cpu_s / max(bare_ok, 1) * 1e6
    bare_rate = line("bare aiohttp (same requests)", bare_ok, bare_s, bare_cpu_s)
    await fcm.aclose()

    admin = FcmAdminProvider(fcm_url, PROJECT, access_token=FCM_TOKEN, timeout_s=60)
    admin_alert = make_alert("admin")
    c = time.process_time()
    secs, ast = await fan_out(
        redis, admin_alert, records(admin_alert, "push", args.admin_n), [admin], args.parallel
    )
    admin_rate = line("firebase-admin send_each_async", ast["sent"], secs, time.process_time() - c)
    await admin.aclose()

    print("sms", flush=True)
    sms = SmsProvider(
        sms_url, SMS_SID, SMS_TOKEN, from_="+15550000001", max_concurrency=args.sms_concurrency
    )
    sms_alert = make_alert("sms")
    c = time.process_time()
    secs, sst = await fan_out(
        redis, sms_alert, records(sms_alert, "sms", args.sms_n), [sms], args.parallel
    )
    sms_rate = line("tocsin sms (send_batch)", sst["sent"], secs, time.process_time() - c)
    out["sms_first_record_to_last_receipt_s"] = round(secs, 2)
    await sms.aclose()

    print("email", flush=True)
    smtp = SmtpProvider(
        "127.0.0.1", smtp_port, sender="alerts@tocsin.example", pool_size=args.smtp_pool,
        unsubscribe_url="https://tocsin.example/unsubscribe", unsubscribe_secret="bench",
    )  # fmt: skip
    email_alert = make_alert("email")
    c = time.process_time()
    secs, est = await fan_out(
        redis, email_alert, records(email_alert, "email", args.email_n), [smtp], args.parallel
    )
    email_rate = line("tocsin smtp (send_batch)", est["sent"], secs, time.process_time() - c)
    out["email_first_record_to_last_receipt_s"] = round(secs, 2)
    await smtp.aclose()
    await redis.aclose()

    out.update(
        push_per_s=round(push_rate),
        push_firebase_admin_per_s=round(admin_rate),
        push_bare_aiohttp_per_s=round(bare_rate),
        sms_per_s=round(sms_rate),
        email_per_s=round(email_rate),
        push_vs_firebase_admin=round(push_rate / admin_rate, 1) if admin_rate else None,
        push_vs_bare_aiohttp=round(push_rate / bare_rate, 2) if bare_rate else None,
        # CPU per message is what a shared machine's noise does not move much.
        push_client_cpu_us_per_msg=round(push_cpu),
        push_bare_aiohttp_client_cpu_us_per_msg=round(bare_cpu),
        statuses={"push": dict(st), "push_admin": dict(ast), "sms": dict(sst), "email": dict(est)},
        keys={"push": push_alert.key, "admin": admin_alert.key, "bare": bare_alert.key},
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="recipients per channel")
    parser.add_argument("--admin-n", type=int, default=0, help="firebase-admin sample (2000)")
    parser.add_argument("--bare-n", type=int, default=0, help="bare aiohttp requests (n)")
    parser.add_argument("--sms-n", type=int, default=0, help="SMS recipients (n)")
    parser.add_argument("--email-n", type=int, default=0, help="email recipients (n/2)")
    # Loopback answers in well under a millisecond: 100 requests in flight saturate it
    # (more only adds connections to poll); production's fcm_max_concurrency is 200.
    parser.add_argument("--concurrency", type=int, default=100, help="push requests in flight")
    parser.add_argument("--sms-concurrency", type=int, default=100)
    parser.add_argument("--smtp-pool", type=int, default=8)
    parser.add_argument("--parallel", type=int, default=4, help="batches in flight")
    parser.add_argument("--serve-smtp", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--sink-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_smtp:
        serve_smtp(args.serve_smtp, Path(args.sink_out))
        return
    # SIGTERM unwinds through the finally below, so no stand-in outlives the run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.admin_n = args.admin_n or min(args.n, 2000)
    args.bare_n = args.bare_n or args.n
    args.sms_n = args.sms_n or args.n
    # SMTP costs four round trips a message: half the alert measures its rate as well
    # and keeps a default run under three minutes on a busy 2-core machine.
    args.email_n = args.email_n or max(1, args.n // 2)

    workdir = Path(tempfile.mkdtemp(prefix="tocsin-fanout-"))
    services: list[Service] = []
    standins: list[StandInProcess] = []
    sink: SmtpSink | None = None
    started = time.perf_counter()
    try:
        services.append(start_redis(workdir / "redis"))
        standins.append(
            StandInProcess.start("tests.standins.fcm", ["--project", PROJECT, "--token", FCM_TOKEN])
        )
        standins.append(
            StandInProcess.start(
                "tests.standins.sms", ["--sid", SMS_SID, "--auth-token", SMS_TOKEN]
            )
        )
        sink = SmtpSink(workdir)
        print(
            f"fan-out of one alert to {args.n:,} recipients per channel "
            f"({os.cpu_count()} cores, stand-ins in their own processes)",
            flush=True,
        )
        out = asyncio.run(run(args, services[0].url, standins[0].url, standins[1].url, sink.port))
        fcm_stats = {k: standins[0].stats(v) for k, v in out.pop("keys").items()}
        sms_stats = standins[1].stats()
        mail = sink.stop()
        sink = None
    finally:
        if sink is not None:
            sink.stop()
        for s in standins:
            s.stop()
        for svc in services:
            svc.stop()

    push, admin = fcm_stats["push"], fcm_stats["admin"]
    lost_push = out["n"] - push["distinct"]
    lost_sms = args.sms_n - sms_stats["distinct"]
    rcpt = mail.get("rcpt", Counter())
    lost_email = args.email_n - len(rcpt)
    dup_email = sum(rcpt.values()) - len(rcpt)
    lost = lost_push + lost_sms + lost_email
    duplicates = push["duplicates"] + sms_stats["duplicates"] + dup_email
    print("at the stand-ins:")
    for label, accepted, lost_n, dups in (
        ("push", push["accepted"], lost_push, push["duplicates"]),
        (
            "push firebase-admin",
            admin["accepted"],
            args.admin_n - admin["distinct"],
            admin["duplicates"],
        ),
        ("sms", sms_stats["accepted"], lost_sms, sms_stats["duplicates"]),
        ("email", sum(rcpt.values()), lost_email, dup_email),
    ):
        print(f"  {label:<20} accepted {accepted:>7}  lost {lost_n}  duplicates {dups}")
    print(
        f"push: {out['push_per_s']:,}/s = {out['push_vs_firebase_admin']}x firebase-admin "
        f"({out['push_firebase_admin_per_s']:,}/s), {out['push_vs_bare_aiohttp']:.0%} of bare "
        f"aiohttp ({out['push_bare_aiohttp_per_s']:,}/s); sms {out['sms_per_s']:,}/s; "
        f"email {out['email_per_s']:,}/s; total run {time.perf_counter() - started:.0f} s"
    )
    out.update(lost=lost, duplicates=duplicates)
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
