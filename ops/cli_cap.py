"""``tocsin cap ...``: CAP tooling for agencies and integrators.

``tocsin cap validate [--json] [--strict] FILE...`` is a stable contract used by checks
outside the test suite:

* exit 0 when every file holds valid CAP (areas may be unresolved), 1 otherwise;
* one line ``FILE: error: REASON`` on stderr per problem, never a traceback (every
  failure of a file, unreadable files included, is caught and reported on one line);
* with ``--json``, one JSON object per alert on stdout (JSON Lines; a file holding
  several alerts prints several lines), keys as in :func:`alert_json`.

``tocsin cap poll URL [--kind K] [--interval S]`` polls an agency feed and publishes
what is new to ``hazards.raw`` (see :mod:`streams.feeds`).

Heavy imports (shapely/pyproj, geopandas for the gazetteer) are deferred until a file
actually needs them, so refusing a hostile file costs only the CLI start-up.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from streams.cap import DEFAULT_LIMITS, CapError, parse_cap
from streams.records import Alert, Area

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry

    from geofencing.gazetteer import Gazetteer

app = typer.Typer(help="CAP tools: validate messages before publishing them.", no_args_is_help=True)

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1] / "data"


@app.callback()
def _group() -> None:
    """CAP tools: validate messages, poll agency feeds."""  # keeps `cap` a command group


class LazyGazetteer:
    """Loads the standard gazetteer on the first geocode lookup, once per process.

    Most CAP areas carry a polygon or circle and never need it; loading the layers costs
    about a second, which a validation of polygon-only files should not pay.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._gazetteer: Gazetteer | None = None

    def lookup(self, value_name: str, value: str) -> BaseGeometry | None:
        """Geometry of a geocode, or None (see :meth:`Gazetteer.lookup`)."""
        if self._gazetteer is None:
            from geofencing.gazetteer import standard_gazetteer

            self._gazetteer = standard_gazetteer(self.data_dir)
        return self._gazetteer.lookup(value_name, value)


def _references(alert: Alert) -> list[dict[str, str]]:
    out = []
    for ref in alert.references:
        sender, identifier, sent = ref.split(",")  # the parser checked the triple shape
        out.append({"sender": sender, "identifier": identifier, "sent": sent})
    return out


def _area_json(area: Area, gazetteer: LazyGazetteer, label: str,
               warnings: list[str]) -> dict[str, Any]:
    from geofencing.areas import resolve_area  # shapely/pyproj only when there are areas

    geometry: dict[str, Any] | None = None
    geom, area_warnings = resolve_area(area, gazetteer, label)
    warnings.extend(area_warnings)
    if geom is not None:
        import shapely

        geometry = json.loads(shapely.to_geojson(geom))
    return {"areaDesc": area.desc,
            "geocodes": [{"valueName": g.value_name, "value": g.value} for g in area.geocodes],
            "geometry": geometry}


def alert_json(alert: Alert, gazetteer: LazyGazetteer) -> dict[str, Any]:
    """The ``--json`` view of one alert: CAP element names, areas with a GeoJSON geometry.

    Area-resolution warnings (unknown geocodes, repaired polygons) are appended to the
    alert's parser warnings.
    """
    warnings = list(alert.warnings)
    infos = []
    for i, info in enumerate(alert.infos):
        areas = [_area_json(area, gazetteer, f"info {i} area {k}", warnings)
                 for k, area in enumerate(info.areas)]
        infos.append({
            "language": info.language, "category": list(info.categories), "event": info.event,
            "urgency": info.urgency, "severity": info.severity, "certainty": info.certainty,
            "headline": info.headline, "description": info.description,
            "instruction": info.instruction, "expires": info.expires, "areas": areas,
        })
    return {
        "identifier": alert.identifier, "sender": alert.sender, "sent": alert.sent,
        "status": alert.status, "msgType": alert.msg_type, "scope": alert.scope,
        "references": _references(alert), "warnings": list(dict.fromkeys(warnings)),
        "info": infos,
    }


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _read(path: Path, max_bytes: int) -> bytes:
    # Read one byte past the limit (not the whole file): a multi-GB file or /dev/zero is
    # refused by the parser's size check without being loaded into memory.
    with path.open("rb") as f:
        return f.read(max_bytes + 1)


def validate_file(path: Path, *, strict: bool, gazetteer: LazyGazetteer
                  ) -> tuple[list[dict[str, Any]], list[str]]:
    """Validate one file: (JSON views of its alerts, problems). Never raises."""
    try:
        data = _read(path, DEFAULT_LIMITS.max_bytes)
        alerts = parse_cap(data, source=str(path))
        problems: list[str] = []
        if strict:
            from streams.cap_schema import validate_schema

            schema_warnings: list[str] = []
            problems = [f"schema_invalid: {v}"
                        for v in validate_schema(data, warnings=schema_warnings)]
            for alert in alerts:
                alert.warnings.extend(schema_warnings)
        return [alert_json(a, gazetteer) for a in alerts], problems
    except CapError as exc:
        return [], [f"{exc.reason}: {exc}"]
    except OSError as exc:
        return [], [f"unreadable: {exc.strerror or exc}"]
    except Exception as exc:  # the contract: one line per problem, never a traceback
        return [], [f"internal_error: {type(exc).__name__}: {exc}"]


@app.command()
def validate(
    files: list[Path] = typer.Argument(..., help="CAP XML files to check"),
    as_json: bool = typer.Option(False, "--json", help="print each alert as JSON Lines"),
    strict: bool = typer.Option(
        False, "--strict", help="also validate against the OASIS CAP XSD (element order...)"
    ),
    data_dir: Path = typer.Option(
        DEFAULT_DATA_DIR, "--data-dir", help="directory holding geodata/ for geocode lookups"
    ),
) -> None:
    """Check CAP files; exit 0 only if every file is valid CAP.

    Problems go to stderr as ``FILE: error: REASON``. Areas whose geocodes are unknown
    are not errors: they get ``geometry: null`` and a warning.
    """
    gazetteer = LazyGazetteer(data_dir)
    failed = False
    for path in files:
        alerts, problems = validate_file(path, strict=strict, gazetteer=gazetteer)
        for problem in problems:
            sys.stderr.write(f"{path}: error: {_one_line(problem)}\n")
        failed = failed or bool(problems)
        if problems:
            continue
        if as_json:
            for view in alerts:
                sys.stdout.write(json.dumps(view, ensure_ascii=False) + "\n")
        else:
            n_warn = sum(len(a["warnings"]) for a in alerts)
            sys.stdout.write(f"{path}: ok: {len(alerts)} alert(s), {n_warn} warning(s)\n")
    sys.stdout.flush()
    raise typer.Exit(1 if failed else 0)


@app.command()
def poll(
    urls: list[str] = typer.Argument(..., help="feed URLs (CAP Atom/RSS, USGS GeoJSON, NWS API)"),
    kind: str = typer.Option("auto", help="atom, rss, usgs, nws or auto (guessed from the URL)"),
    interval: float = typer.Option(60.0, min=1.0, help="seconds between polls"),
    once: bool = typer.Option(False, "--once", help="poll every feed once and exit"),
    source: str = typer.Option("", help="source header (default: the feed URL)"),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="print new items instead of producing them to hazards.raw"
    ),
) -> None:
    """Poll agency feeds and publish what is new to ``hazards.raw``.

    Seen entries and HTTP validators are kept in Redis when ``REDIS_URL`` is set (a
    restart re-emits nothing), in memory otherwise. One line per poll and per problem.
    """
    import asyncio

    from ops.settings import get_settings

    settings = get_settings()
    if kind not in ("auto", "atom", "rss", "usgs", "nws"):
        sys.stderr.write(f"error: unknown feed kind {kind!r}\n")
        raise typer.Exit(2)
    if not dry_run and not settings.kafka_bootstrap_servers:
        sys.stderr.write("error: KAFKA_BOOTSTRAP_SERVERS is not set (or use --dry-run)\n")
        raise typer.Exit(2)
    try:
        failed = asyncio.run(_poll(settings, urls, kind, interval, once, source, dry_run))
    except KeyboardInterrupt:
        failed = False
    raise typer.Exit(1 if failed else 0)


async def _poll(settings: Any, urls: list[str], kind: str, interval: float, once: bool,
                source: str, dry_run: bool) -> bool:
    """The poll loop of ``tocsin cap poll``; True if the last round had problems."""
    import asyncio
    import time

    import aiohttp
    import redis.asyncio as aioredis

    from streams.feeds import POLLERS, FeedItem, MemoryStore, PollReport, RedisStore, poller_kind
    from streams.publish import hazard_record
    from streams.topics import HAZARDS_RAW

    producer: Any = None
    redis_client = aioredis.Redis.from_url(settings.redis_url) if settings.redis_url else None
    store = RedisStore(redis_client) if redis_client is not None else MemoryStore()
    if not dry_run:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                    acks="all", linger_ms=5)
        await producer.start()

    async def produce(item: FeedItem) -> None:
        if producer is None:
            sys.stdout.write(f"{item.source}: {item.content_type}: {len(item.payload)} bytes\n")
            return
        _, value, headers = hazard_record(item.payload, item.content_type, item.source,
                                          time.time())
        # Wait for the broker's ack: only then may the poller mark the item seen.
        await producer.send_and_wait(settings.topic(HAZARDS_RAW), value=value, headers=headers)

    problems = False

    def report(r: PollReport) -> None:
        nonlocal problems
        problems = problems or bool(r.problems)
        state = "304 not modified" if r.not_modified else f"HTTP {r.status or '-'}"
        sys.stderr.write(f"{r.url}: {state}: {r.produced} new, {r.skipped} seen, "
                         f"{len(r.problems)} problem(s)\n")
        for p in r.problems:
            sys.stderr.write(f"{r.url}: problem: {_one_line(p)}\n")
        sys.stderr.flush()

    health = None
    if settings.metrics_port and not once:  # /healthz, /readyz, /metrics as the worker's
        from ops.metrics import serve_health

        health = await serve_health(settings.metrics_host, settings.metrics_port, lambda: True)
    try:
        async with aiohttp.ClientSession() as session:
            pollers = [POLLERS[poller_kind(u) if kind == "auto" else kind](
                u, session, store, source=source) for u in urls]
            if once:
                for r in await asyncio.gather(*(p.poll(produce) for p in pollers)):
                    report(r)
            else:
                from streams.feeds import run_pollers

                await run_pollers(pollers, produce, interval, asyncio.Event(), report)
    finally:
        if health is not None:
            await health.cleanup()
        if producer is not None:
            await producer.stop()
        if redis_client is not None:
            await redis_client.aclose()
    return problems
