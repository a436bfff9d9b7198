"""Prometheus metrics of every stage, and the worker's /metrics, /healthz, /readyz server.

Labels never carry contact details or citizen locations: only channels, providers,
reasons, outcomes and partitions.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

INGESTED = Counter(
    "tocsin_ingest_total", "Hazard messages by ingest outcome", ["outcome", "reason"]
)
MATCH_SECONDS = Histogram(
    "tocsin_match_seconds",
    "Time to match one request against one shard",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
MATCHED = Counter("tocsin_matched_total", "Recipients matched, by channel", ["channel"])
SENDS = Counter(
    "tocsin_sends_total", "Per-recipient send outcomes", ["channel", "provider", "status"]
)
FIRST_SEND_SECONDS = Histogram(
    "tocsin_end_to_end_seconds",
    "From the hazard message reaching hazards.raw to a delivery batch being sent",
    ["channel"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
SHARD_SIZE = Gauge("tocsin_shard_subscriptions", "Subscriptions held per shard", ["partition"])
DEAD_LETTERS = Counter("tocsin_dead_letters_total", "Records sent to the DLQ", ["stage", "reason"])


async def serve_health(host: str, port: int, ready: Callable[[], bool]) -> web.AppRunner:
    """Serve /metrics, /healthz (the process is up) and /readyz (``ready()``) on host:port."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ok = ready()
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    app = web.Application()
    app.add_routes(
        [web.get("/metrics", metrics), web.get("/healthz", healthz), web.get("/readyz", readyz)]
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
