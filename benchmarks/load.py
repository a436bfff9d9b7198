"""Sustained load on real processes: a tornado outbreak over central Iowa with churn.

tansu, redis-server, the FCM stand-in (a separate process) and one ``tocsin worker``.
12,000 citizens (push) are spread over a 1.5 x 1.0 degree box of central Iowa; for
``--duration`` seconds a steady stream of tornado warnings arrives: new warnings whose
parallelogram polygons (storm tracks, ~30 x 12 km) overlap each other, Updates that move
an earlier warning's polygon east, and Cancels of warnings issued a few seconds before;
meanwhile subscriptions churn continuously (other citizens subscribe, move and leave).

Sampled every two seconds: the worker group's consumer lag (committed vs end offsets of
every topic the worker consumes) and the worker's RSS (/proc/<pid>/status). Checked at
the FCM stand-in afterwards, per alert: every stable citizen inside the polygon (more
than ~50 m from its edge) warned exactly once, nobody outside it warned, nobody warned
twice; for a cancelled warning, the cancellation notice reached exactly those warned.

    python benchmarks/load.py                  # 10 minutes
    python benchmarks/load.py --duration 60    # a quick look

Prints the figures and ends with one JSON line. ``tests/integration/test_load.py`` runs
the same scenario for ~30 seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis
import shapely
from aiokafka import AIOKafkaConsumer, TopicPartition
from shapely.geometry import Polygon

from channels.contacts import Contact, ContactStore
from ops.dev import spawn_worker
from ops.devstack import start_broker, start_redis
from ops.settings import Settings
from streams import topics as T
from streams.publish import hazard_record, produce, subscription_records, tombstones
from streams.records import Subscription, alert_key
from streams.state import AlertStore
from streams.topics import ensure_topics
from tests.standins import StandInProcess

REPO = Path(__file__).resolve().parent.parent
SENDER = "KDMX@NWS.NOAA.GOV"
BOX = (-94.5, 41.5, -93.0, 42.5)  # lon/lat: central Iowa (Polk, Story, Dallas...)
EDGE = 0.0006  # degrees (~50 m): closer to a polygon's edge is not asserted
CAP_NS = "urn:oasis:names:tc:emergency:cap:1.2"


@dataclass
class LoadConfig:
    """How much load, for how long."""

    duration_s: float = 600.0
    alert_every_s: float = 1.5
    citizens: int = 12_000
    churn_per_s: float = 20.0
    partitions: int = 2
    seed: int = 7


@dataclass
class Issued:
    """One CAP message the generator published."""

    key: str
    ident: str
    sent: str
    kind: str  # Alert, Update, Cancel
    at: float
    polygon: Polygon | None = None
    cancels: str = ""  # for a Cancel: the key of the warning it withdraws


@dataclass
class Figures:
    """What a run measured."""

    duration_s: float = 0.0
    alerts: int = 0
    updates: int = 0
    cancels: int = 0
    churn_records: int = 0
    pushes: int = 0
    expected: int = 0
    lost: int = 0
    duplicates: int = 0
    unexpected: int = 0
    notice_mismatches: int = 0
    lag_first_third: float = 0.0
    lag_last_third: float = 0.0
    lag_max: int = 0
    final_lag: int = -1
    drain_s: float = 0.0
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_max_mb: float = 0.0
    complete_p50_s: float = 0.0
    complete_p95_s: float = 0.0
    lag_samples: list[int] = field(default_factory=list)
    rss_samples_mb: list[float] = field(default_factory=list)


def cap_alert(ident: str, sent: str, kind: str, polygon: Polygon | None, refs: str = "") -> bytes:
    """A CAP 1.2 tornado warning (or its Update/Cancel)."""
    references = f"<references>{refs}</references>" if refs else ""
    info = ""
    if polygon is not None:
        ring = " ".join(f"{y:.5f},{x:.5f}" for x, y in polygon.exterior.coords)
        expires = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0).isoformat()
        info = (
            "<info><category>Met</category><event>Tornado Warning</event>"
            "<urgency>Immediate</urgency><severity>Extreme</severity>"
            f"<certainty>Observed</certainty><expires>{expires}</expires>"
            "<headline>TORNADO WARNING</headline>"
            "<description>A confirmed tornado is moving east at 35 mph.</description>"
            "<instruction>TAKE COVER NOW IN A BASEMENT OR INTERIOR ROOM.</instruction>"
            f"<area><areaDesc>Central Iowa</areaDesc><polygon>{ring}</polygon></area></info>"
        )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><alert xmlns="{CAP_NS}">'
        f"<identifier>{ident}</identifier><sender>{SENDER}</sender><sent>{sent}</sent>"
        f"<status>Actual</status><msgType>{kind}</msgType><scope>Public</scope>"
        f"{references}{info}</alert>"
    ).encode()


def storm_track(rng: random.Random, start: tuple[float, float] | None = None) -> Polygon:
    """A storm-based warning polygon: a ~30 x 12 km parallelogram heading east-northeast."""
    x0 = start[0] if start else rng.uniform(BOX[0], BOX[2] - 0.4)
    y0 = start[1] if start else rng.uniform(BOX[1], BOX[3] - 0.15)
    dx, dy, w = 0.36, rng.uniform(0.0, 0.08), 0.11
    return Polygon([(x0, y0), (x0 + dx, y0 + dy), (x0 + dx + 0.03, y0 + dy + w),
                    (x0 + 0.03, y0 + w), (x0, y0)])  # fmt: skip


def citizens(n: int, rng: random.Random, prefix: str = "c") -> list[Subscription]:
    """Citizens' home places, uniform over the box, push only."""
    return [
        Subscription(id=f"{prefix}{i:06d}", kind="place", lon=rng.uniform(BOX[0], BOX[2]),
                     lat=rng.uniform(BOX[1], BOX[3]), channels=["push"])  # type: ignore[list-item]
        for i in range(n)
    ]  # fmt: skip


def token(sid: str) -> str:
    return f"tok-{sid}"


async def consumer_lag(bootstrap: str, group: str, topics: list[str]) -> int:
    """Records the group has not committed yet, summed over ``topics``' partitions.

    Committed offsets are read with OffsetFetch through a consumer of the group that
    never joins it (tansu does not answer the admin API's group-offsets call).
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()]
        if not tps:
            return 0
        ends = await consumer.end_offsets(tps)
        lag = 0
        for tp in tps:
            committed = await consumer.committed(tp)
            lag += max(0, ends[tp] - (committed or 0))
        return lag
    finally:
        await consumer.stop()


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class LoadRun:
    """The processes and the generator of one run."""

    def __init__(self, cfg: LoadConfig, workdir: Path, data_dir: Path) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.rng = random.Random(cfg.seed)
        self.broker = start_broker(workdir / "broker")
        self.redis = start_redis(workdir / "redis")
        self.fcm = StandInProcess.start("tests.standins.fcm", ["--project", "load", "--token", "t"])
        self.settings = Settings(
            kafka_bootstrap_servers=self.broker.url, redis_url=self.redis.url,
            partitions=cfg.partitions, data_dir=data_dir, outbox_path=workdir / "outbox.jsonl",
            broker_rebalance_timeout_s=2.0, channel_providers="push=fcm,sms=outbox,email=outbox",
            fcm_base_url=self.fcm.url, fcm_project_id="load", fcm_access_token="t",
        )  # fmt: skip
        self.stable = citizens(cfg.citizens, self.rng)
        self.issued: list[Issued] = []
        self.figures = Figures()
        self.worker: subprocess.Popen[bytes] | None = None

    def close(self) -> None:
        """Stop every process of the run."""
        if self.worker is not None and self.worker.poll() is None:
            self.worker.terminate()
            try:
                self.worker.wait(30)
            except Exception:
                self.worker.kill()
        self.fcm.stop()
        self.redis.stop()
        self.broker.stop()

    async def boot(self) -> None:
        """Topics, citizens, worker; wait until the shards hold everyone."""
        s = self.settings
        await ensure_topics(s.kafka_bootstrap_servers, partitions=s.partitions)
        client = aioredis.Redis.from_url(s.redis_url)
        await ContactStore(client).put_many(
            {x.id: Contact(push_token=token(x.id)) for x in self.stable}
        )
        worker = self.worker = spawn_worker(s, self.workdir / "worker.log")
        await produce(s.kafka_bootstrap_servers, s.topic(T.SUBSCRIPTIONS),
                      subscription_records(self.stable))  # fmt: skip
        store = AlertStore(client)
        deadline = time.monotonic() + 120
        while sum((await store.shard_sizes()).values()) < len(self.stable):
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError("the worker did not index the citizens")
            await asyncio.sleep(0.2)
        await client.aclose()

    def next_message(self, n: int) -> Issued:
        """Alert (70 %), Update of a live warning (20 %) or Cancel (10 %)."""
        now = datetime.now(UTC).replace(microsecond=0).isoformat()
        ident = f"LOAD-{n:05d}"
        live = [x for x in self.issued if x.kind != "Cancel" and not self._cancelled(x.key)]
        old = [x for x in live if time.time() - x.at > 6.0]
        draw = self.rng.random()
        if draw < 0.1 and old:
            target = self.rng.choice(old)
            issued = Issued(alert_key(SENDER, ident), ident, now, "Cancel", time.time(),
                            cancels=target.key)  # fmt: skip
            issued.polygon = None
            self._refs = f"{SENDER},{target.ident},{target.sent}"
            return issued
        if draw < 0.3 and live:
            target = self.rng.choice(live)
            assert target.polygon is not None
            x0, y0 = target.polygon.exterior.coords[0]
            polygon = storm_track(self.rng, (min(x0 + 0.1, BOX[2] - 0.4), y0))
            self._refs = f"{SENDER},{target.ident},{target.sent}"
            return Issued(alert_key(SENDER, ident), ident, now, "Update", time.time(), polygon)
        self._refs = ""
        return Issued(alert_key(SENDER, ident), ident, now, "Alert", time.time(),
                      storm_track(self.rng))  # fmt: skip

    def _cancelled(self, key: str) -> bool:
        return any(x.cancels == key for x in self.issued)

    async def generate(self) -> None:
        """Publish warnings at a steady rate, churn subscriptions, sample lag and RSS."""
        s = self.settings
        cfg = self.cfg
        client = aioredis.Redis.from_url(s.redis_url)
        contacts = ContactStore(client)
        names = (T.HAZARDS_RAW, T.ALERTS, T.MATCH_REQUESTS, T.RECEIPTS,
                 *T.DELIVERIES.values(), *T.URGENT_DELIVERIES.values())  # fmt: skip
        consumed = [s.topic(t) for t in names]
        churn_ids: list[str] = []
        started = time.monotonic()
        next_alert = next_sample = started
        n = churned = 0
        while (now := time.monotonic()) - started < cfg.duration_s:
            if now >= next_alert:
                issued = self.next_message(n)
                payload = cap_alert(issued.ident, issued.sent, issued.kind, issued.polygon,
                                    self._refs)  # fmt: skip
                issued.at = time.time()
                await produce(s.kafka_bootstrap_servers, s.topic(T.HAZARDS_RAW),
                              [hazard_record(payload, "application/cap+xml", "load",
                                             issued.at)])  # fmt: skip
                self.issued.append(issued)
                n += 1
                next_alert += cfg.alert_every_s
            # Churn: new citizens subscribe (or move), earlier ones leave.
            batch = max(1, int(cfg.churn_per_s / 4))
            movers = citizens(batch, self.rng, prefix=f"z{churned:07d}-")
            await contacts.put_many({x.id: Contact(push_token=token(x.id)) for x in movers})
            records: list[tuple[bytes, bytes | None, list[tuple[str, bytes]]]] = list(
                subscription_records(movers)
            )
            churn_ids += [x.id for x in movers]
            if len(churn_ids) > 4 * batch:
                leaving, churn_ids = churn_ids[:batch], churn_ids[batch:]
                records += list(tombstones(leaving))
            await produce(s.kafka_bootstrap_servers, s.topic(T.SUBSCRIPTIONS), records)
            churned += len(records)
            if now >= next_sample:
                self.figures.lag_samples.append(
                    await consumer_lag(s.kafka_bootstrap_servers, s.app_id, consumed)
                )
                assert self.worker is not None
                self.figures.rss_samples_mb.append(rss_mb(self.worker.pid))
                next_sample += 2.0
            await asyncio.sleep(0.25)
        self.figures.churn_records = churned
        # Drain: the lag must come back to zero.
        t0 = time.monotonic()
        lag = -1
        while time.monotonic() - t0 < 60:
            lag = await consumer_lag(s.kafka_bootstrap_servers, s.app_id, consumed)
            if lag == 0:
                break
            await asyncio.sleep(0.5)
        self.figures.final_lag = lag
        self.figures.drain_s = time.monotonic() - t0
        await client.aclose()

    def expected(self, polygon: Polygon) -> tuple[set[str], set[str]]:
        """Tokens that must be warned (inside, away from the edge) and that may be."""
        inner, outer = polygon.buffer(-EDGE), polygon.buffer(EDGE)
        xs = [x.lon for x in self.stable]
        ys = [x.lat for x in self.stable]
        pts = shapely.points(xs, ys)
        must = shapely.contains(inner, pts)
        may = shapely.contains(outer, pts)
        ids = [x.id for x in self.stable]
        return ({token(i) for i, m in zip(ids, must, strict=True) if m},
                {token(i) for i, m in zip(ids, may, strict=True) if m})  # fmt: skip

    async def settle(self, timeout: float) -> None:
        """Wait until every warning's expected citizens were reached (or timeout)."""
        deadline = time.monotonic() + timeout
        for issued in self.issued:
            if issued.polygon is None or self._cancelled(issued.key):
                continue
            must, _ = self.expected(issued.polygon)
            while time.monotonic() < deadline:
                got = (await asyncio.to_thread(self.fcm.stats, issued.key))["distinct"]
                if got >= len(must):
                    break
                await asyncio.sleep(0.25)

    def check(self) -> Figures:
        """Compare what the FCM stand-in received with the oracle."""
        f = self.figures
        rows = self.fcm.received()
        per_alert: dict[str, Counter[str]] = {}
        last_at: dict[str, float] = {}
        for address, key, at in rows:
            per_alert.setdefault(key, Counter())[address] += 1
            last_at[key] = max(last_at.get(key, 0.0), at)
        f.pushes = len(rows)
        f.duplicates = sum(n - 1 for c in per_alert.values() for n in c.values())
        completes = []
        for issued in self.issued:
            got = per_alert.get(issued.key, Counter())
            if issued.kind == "Cancel":
                f.cancels += 1
                warned = {a for a in per_alert.get(issued.cancels, Counter())}
                f.notice_mismatches += len(set(got) ^ warned)
                continue
            f.alerts += issued.kind == "Alert"
            f.updates += issued.kind == "Update"
            assert issued.polygon is not None
            must, may = self.expected(issued.polygon)
            stable = {a for a in got if not a.startswith("tok-z")}
            f.unexpected += len(stable - may)
            if self._cancelled(issued.key):
                continue  # withdrawn: whoever was not reached yet must not be
            f.expected += len(must)
            f.lost += len(must - stable)
            if issued.key in last_at:
                completes.append(last_at[issued.key] - issued.at)
        if completes:
            f.complete_p50_s = statistics.median(completes)
            f.complete_p95_s = sorted(completes)[int(0.95 * (len(completes) - 1))]
        third = max(1, len(f.lag_samples) // 3)
        f.lag_first_third = statistics.mean(f.lag_samples[:third] or [0])
        f.lag_last_third = statistics.mean(f.lag_samples[-third:] or [0])
        f.lag_max = max(f.lag_samples or [0])
        rss = f.rss_samples_mb
        if rss:
            warm = rss[len(rss) // 3 :] or rss
            f.rss_start_mb, f.rss_end_mb, f.rss_max_mb = warm[0], rss[-1], max(rss)
        f.duration_s = self.cfg.duration_s
        return f


def run_load(cfg: LoadConfig, workdir: Path, data_dir: Path) -> Figures:
    """Run the whole scenario; return the figures (raises if the stack fails)."""
    run = LoadRun(cfg, workdir, data_dir)
    try:

        async def scenario() -> None:
            await run.boot()
            await run.generate()
            await run.settle(60)

        asyncio.run(scenario())
        return run.check()
    finally:
        run.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--alert-every", type=float, default=1.5, help="seconds between CAPs")
    parser.add_argument("--citizens", type=int, default=12_000)
    parser.add_argument("--churn", type=float, default=20.0, help="subscription records/s")
    args = parser.parse_args()
    cfg = LoadConfig(args.duration, args.alert_every, args.citizens, args.churn)
    with tempfile.TemporaryDirectory(prefix="tocsin-load-") as tmp:
        f = run_load(cfg, Path(tmp), REPO / "data")
    print(f"{f.alerts} warnings, {f.updates} updates, {f.cancels} cancels in {f.duration_s:.0f} s; "
          f"{f.churn_records} subscription changes")  # fmt: skip
    print(f"pushes {f.pushes}: expected {f.expected}, lost {f.lost}, duplicates {f.duplicates}, "
          f"unexpected {f.unexpected}, cancel-notice mismatches {f.notice_mismatches}")  # fmt: skip
    print(f"alert complete p50 {f.complete_p50_s:.2f} s, p95 {f.complete_p95_s:.2f} s")
    print(f"consumer lag: first third {f.lag_first_third:.1f}, last third {f.lag_last_third:.1f}, "
          f"max {f.lag_max}, final {f.final_lag} after {f.drain_s:.1f} s")  # fmt: skip
    print(f"worker RSS: {f.rss_start_mb:.0f} MB after warm-up -> {f.rss_end_mb:.0f} MB "
          f"(max {f.rss_max_mb:.0f} MB)")  # fmt: skip
    out = asdict(f)
    out.pop("lag_samples")
    out.pop("rss_samples_mb")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
