"""Pollers for agency feeds: CAP Atom/RSS indexes, the USGS GeoJSON summary, NWS API alerts.

A poller fetches its feed and hands every *new* item, as a ``FeedItem(payload,
content_type, source)`` tuple, to an async ``produce`` callback (the pipeline wires it
to ``hazards.raw``; ingest validates, so pollers forward bytes as published and the
DLQ keeps the rejects for audit). Rules shared by all pollers:

* conditional GET: the feed's ``ETag`` / ``Last-Modified`` are sent back as
  ``If-None-Match`` / ``If-Modified-Since``; a ``304`` costs nothing more;
* an item is new when its ``(id, version)`` was not seen before (Atom ``id`` +
  ``updated``, RSS ``guid`` + ``pubDate``, USGS ``id`` + ``updated``, NWS ``id`` +
  ``sent``). It is marked seen only after ``produce`` returned, and the feed's
  validators are stored only once every item was handed over, so a failed produce is
  retried on the next poll (at-least-once; ingest's registry makes repeats idempotent);
* problems (malformed feed, entry without id or link, unreachable CAP link, CAP that
  ingest will reject) are reported in :class:`PollReport` with a reason, never raised.

State lives behind :class:`SeenStore`: :class:`MemoryStore` for tests and one-shot
runs, :class:`RedisStore` (``redis.asyncio``) so a restarted poller does not re-emit.
Only ``http(s)`` links are followed.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple, Protocol
from urllib.parse import urljoin, urlparse

import aiohttp
import msgspec
from lxml import etree

from streams.cap import CAP_NAMESPACES, CapError, CapLimits, parse_cap, parse_xml

ATOM_NS = "http://www.w3.org/2005/Atom"
CAP_MIME = "application/cap+xml"
# Index feeds of national services are big: the NWS national Atom feed embeds ~30 cap:
# elements per entry for thousands of entries.
FEED_LIMITS = CapLimits(max_bytes=16_000_000, max_markup=2_000_000)
_json = msgspec.json.Decoder()


class FeedItem(NamedTuple):
    """One message for ``hazards.raw``: the bytes as published, their type, their origin."""

    payload: bytes
    content_type: str
    source: str


Produce = Callable[[FeedItem], Awaitable[None]]


# ----------------------------------------------------------------------------- state
class SeenStore(Protocol):
    """What a poller remembers between polls."""

    async def is_seen(self, scope: str, item_id: str, version: str) -> bool: ...
    async def mark_seen(self, scope: str, item_id: str, version: str) -> None: ...
    async def validators(self, url: str) -> tuple[str | None, str | None]: ...
    async def set_validators(self, url: str, etag: str | None, modified: str | None) -> None: ...


class MemoryStore:
    """In-process :class:`SeenStore` (lost on restart)."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], str] = {}
        self.http: dict[str, tuple[str | None, str | None]] = {}

    async def is_seen(self, scope: str, item_id: str, version: str) -> bool:
        """True if this version of the item was handed over before."""
        return self.seen.get((scope, item_id)) == version

    async def mark_seen(self, scope: str, item_id: str, version: str) -> None:
        """Remember the item's current version."""
        self.seen[(scope, item_id)] = version

    async def validators(self, url: str) -> tuple[str | None, str | None]:
        """(ETag, Last-Modified) last stored for a URL."""
        return self.http.get(url, (None, None))

    async def set_validators(self, url: str, etag: str | None, modified: str | None) -> None:
        """Store a URL's validators."""
        self.http[url] = (etag, modified)


def _digest(*parts: str) -> str:
    return hashlib.sha1("\x1f".join(parts).encode()).hexdigest()


class RedisStore:
    """:class:`SeenStore` in Redis; entries expire after ``ttl_s`` (feeds drop old items)."""

    def __init__(self, client: Any, prefix: str = "tocsin:feeds:", ttl_s: int = 30 * 86400):
        self.client, self.prefix, self.ttl_s = client, prefix, ttl_s

    async def is_seen(self, scope: str, item_id: str, version: str) -> bool:
        """True if this version of the item was handed over before."""
        value = await self.client.get(f"{self.prefix}seen:{_digest(scope, item_id)}")
        return value is not None and bytes(value).decode() == version

    async def mark_seen(self, scope: str, item_id: str, version: str) -> None:
        """Remember the item's current version (with the TTL)."""
        await self.client.set(f"{self.prefix}seen:{_digest(scope, item_id)}", version,
                              ex=self.ttl_s)

    async def validators(self, url: str) -> tuple[str | None, str | None]:
        """(ETag, Last-Modified) last stored for a URL."""
        raw = await self.client.hgetall(f"{self.prefix}http:{_digest(url)}")
        got = {bytes(k).decode(): bytes(v).decode() for k, v in raw.items()}
        return got.get("etag") or None, got.get("modified") or None

    async def set_validators(self, url: str, etag: str | None, modified: str | None) -> None:
        """Store a URL's validators."""
        key = f"{self.prefix}http:{_digest(url)}"
        await self.client.hset(key, mapping={"etag": etag or "", "modified": modified or ""})
        await self.client.expire(key, self.ttl_s)


# ------------------------------------------------------------------- index parsing
@dataclass
class Entry:
    """One entry of a CAP index feed: where its CAP document is (link or embedded)."""

    id: str
    updated: str = ""
    title: str = ""
    link: str | None = None
    embedded: bytes | None = None


@dataclass
class FeedIndex:
    """A parsed Atom/RSS index: usable entries and what was wrong with the others."""

    entries: list[Entry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _pick_link(links: Sequence[etree._Element], base: str) -> str | None:
    # A typed CAP link wins (USGS: rel="related" type="application/cap+xml"); else an
    # untyped or any XML-typed alternate (NWS sends none; Krisinformation labels its CAP
    # links application/atom+xml). text/html pages are never CAP.
    best: tuple[int, str] | None = None
    for link in links:
        href, kind = link.get("href"), (link.get("type") or "").split(";")[0].strip()
        if not href or link.get("rel", "alternate") not in ("alternate", "related", "enclosure"):
            continue
        rank = 0 if kind == CAP_MIME else 1 if not kind or "xml" in kind else 2
        if rank < 2 and (best is None or rank < best[0]):
            best = (rank, urljoin(base, href))
    return best[1] if best else None


def _embedded_alert(el: etree._Element | None) -> bytes | None:
    if el is None:
        return None
    for child in el.iter():
        tag = child.tag if isinstance(child.tag, str) else ""
        if tag.endswith("}alert") and tag[1:].split("}")[0] in CAP_NAMESPACES:
            return bytes(etree.tostring(child, xml_declaration=True, encoding="UTF-8"))
    return None


def _atom(root: etree._Element, base: str, index: FeedIndex) -> None:
    a = f"{{{ATOM_NS}}}"
    allowed = {f"{a}{n}" for n in ("id", "title", "updated", "author", "link", "entry",
                                   "subtitle", "category", "contributor", "generator",
                                   "icon", "logo", "rights")}
    for child in root:
        if isinstance(child.tag, str) and child.tag.startswith(a) and child.tag not in allowed:
            index.problems.append(f"unknown Atom element <{child.tag[len(a):]}> in <feed>")
    for n, el in enumerate(root.iter(f"{a}entry"), 1):
        entry_id = (el.findtext(f"{a}id") or "").strip()
        if not entry_id:
            index.problems.append(f"entry {n}: no <id>; skipped")
            continue
        entry = Entry(entry_id, (el.findtext(f"{a}updated") or el.findtext(f"{a}published")
                                 or "").strip(), (el.findtext(f"{a}title") or "").strip())
        entry.embedded = _embedded_alert(el.find(f"{a}content"))
        entry.link = _pick_link(el.findall(f"{a}link"), base)
        _add(index, entry)


def _rss(root: etree._Element, base: str, index: FeedIndex) -> None:
    channel = root.find("channel")
    if channel is None:
        index.problems.append("RSS without <channel>")
        return
    for n, item in enumerate(channel.iter("item"), 1):
        link = (item.findtext("link") or "").strip()
        for enclosure in item.findall("enclosure"):
            if enclosure.get("type", "").startswith(CAP_MIME) and enclosure.get("url"):
                link = enclosure.get("url", "")
        item_id = (item.findtext("guid") or "").strip() or link
        if not item_id:
            index.problems.append(f"item {n}: no <guid> or <link>; skipped")
            continue
        entry = Entry(item_id, (item.findtext("pubDate") or "").strip(),
                      (item.findtext("title") or "").strip(),
                      urljoin(base, link) if link else None)
        _add(index, entry)


def _add(index: FeedIndex, entry: Entry) -> None:
    if entry.link and urlparse(entry.link).scheme not in ("http", "https"):
        index.problems.append(f"entry {entry.id}: link {entry.link!r} is not http(s); ignored")
        entry.link = None
    if entry.embedded is None and entry.link is None:
        index.problems.append(f"entry {entry.id}: no link to a CAP document and no embedded "
                              "<alert>; skipped")
        return
    index.entries.append(entry)


def parse_index(data: bytes, base_url: str, limits: CapLimits = FEED_LIMITS) -> FeedIndex:
    """Parse an Atom or RSS 2.0 CAP index (hardened parser: no DTD, size/depth limits)."""
    index = FeedIndex()
    try:
        root = parse_xml(data, limits)
    except CapError as exc:
        index.problems.append(f"feed_invalid: {exc.reason}: {exc}")
        return index
    if root.tag == f"{{{ATOM_NS}}}feed":
        _atom(root, base_url, index)
    elif root.tag == "rss":
        _rss(root, base_url, index)
    else:
        index.problems.append(f"feed_invalid: root <{etree.QName(root).localname}> is neither "
                              "an Atom <feed> nor an RSS <rss>")
    return index


def _order_key(entry: Entry) -> float:
    for parse in (datetime.fromisoformat, parsedate_to_datetime):
        try:
            return parse(entry.updated).timestamp()
        except (ValueError, TypeError):
            continue
    return 0.0


# --------------------------------------------------------------------------- pollers
@dataclass
class PollReport:
    """What one poll did."""

    url: str
    status: int = 0
    not_modified: bool = False
    produced: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)


class Response(NamedTuple):
    """An HTTP answer: status, body, content type and the validators for the next GET."""

    status: int
    body: bytes
    content_type: str
    etag: str | None
    last_modified: str | None


class FetchError(Exception):
    """A failed HTTP fetch; ``retry`` is False for client errors that will not heal."""

    def __init__(self, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


class Poller:
    """Base poller: conditional GET, seen-state, produce; subclasses turn a body into items."""

    default_type = "application/octet-stream"

    def __init__(self, url: str, session: aiohttp.ClientSession, store: SeenStore, *,
                 source: str = "", max_bytes: int = FEED_LIMITS.max_bytes,
                 timeout_s: float = 30.0) -> None:
        self.url, self.session, self.store = url, session, store
        self.source = source or url
        self.max_bytes = max_bytes
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def fetch(self, url: str, conditional: bool = False) -> Response:
        """GET ``url``; raises :class:`FetchError` unless 200 (or 304 when conditional)."""
        headers = {"Accept-Encoding": "gzip, deflate"}
        if conditional:
            etag, modified = await self.store.validators(url)
            if etag:
                headers["If-None-Match"] = etag
            if modified:
                headers["If-Modified-Since"] = modified
        try:
            async with self.session.get(url, headers=headers, timeout=self.timeout,
                                        allow_redirects=True, max_redirects=5) as resp:
                if resp.status == 304:
                    return Response(304, b"", "", None, None)
                if resp.status != 200:
                    raise FetchError(f"GET {url} -> HTTP {resp.status}", resp.status >= 500)
                chunks, size = [], 0
                async for chunk in resp.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > self.max_bytes:  # refuse before buffering a flood
                        raise FetchError(f"GET {url}: body larger than {self.max_bytes} bytes",
                                         False)
                    chunks.append(chunk)
                body = b"".join(chunks)
                return Response(200, body, resp.headers.get("Content-Type", ""),
                                resp.headers.get("ETag"), resp.headers.get("Last-Modified"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FetchError(f"GET {url}: {type(exc).__name__}: {exc}") from None

    async def poll(self, produce: Produce) -> PollReport:
        """Fetch the feed once and hand every new item to ``produce`` (never raises)."""
        report = PollReport(self.url)
        try:
            resp = await self.fetch(self.url, conditional=True)
        except FetchError as exc:
            report.problems.append(f"fetch_failed: {exc}")
            return report
        report.status = resp.status
        if resp.status == 304:
            report.not_modified = True
            return report
        complete = await self.handle(resp.body, produce, report)
        if complete:  # only now is it safe to skip this body next time
            await self.store.set_validators(self.url, resp.etag, resp.last_modified)
        return report

    async def handle(self, body: bytes, produce: Produce, report: PollReport) -> bool:
        """Produce the new items of a feed body; False if some must be retried."""
        raise NotImplementedError

    async def emit(self, item_id: str, version: str, item: FeedItem, produce: Produce,
                   report: PollReport) -> bool:
        """Produce one item unless seen; mark it seen afterwards. False if produce failed."""
        if await self.store.is_seen(self.url, item_id, version):
            report.skipped += 1
            return True
        try:
            await produce(item)
        except Exception as exc:  # the sink's failure must not kill the poll loop
            report.problems.append(f"produce_failed: {item_id}: {type(exc).__name__}: {exc}")
            return False
        await self.store.mark_seen(self.url, item_id, version)
        report.produced += 1
        return True


class CapIndexPoller(Poller):
    """Atom / RSS CAP index: each new entry's CAP document, produced oldest first.

    An ``<alert>`` embedded in the entry's ``<content>`` is taken as is (no fetch);
    otherwise the entry's CAP link is fetched (see ``_pick_link`` for which link).
    """

    concurrency = 4  # linked documents fetched in parallel, produced in feed order

    async def handle(self, body: bytes, produce: Produce, report: PollReport) -> bool:
        """Fetch new entries' CAP documents and produce them, oldest first."""
        index = parse_index(body, self.url)
        report.problems.extend(index.problems)
        entries = [e for e in index.entries
                   if not await self.store.is_seen(self.url, e.id, e.updated)]
        report.skipped += len(index.entries) - len(entries)
        entries.sort(key=_order_key)  # feeds list newest first; an Update follows its Alert
        gate = asyncio.Semaphore(self.concurrency)

        async def document(entry: Entry) -> tuple[bytes, str] | FetchError:
            if entry.embedded is not None:
                return entry.embedded, CAP_MIME
            assert entry.link is not None
            async with gate:
                try:
                    resp = await self.fetch(entry.link)
                except FetchError as exc:
                    return exc
            return resp.body, resp.content_type.split(";")[0].strip() or CAP_MIME

        complete = True
        for entry, doc in zip(entries, await asyncio.gather(*map(document, entries)),
                              strict=True):
            if isinstance(doc, FetchError):
                report.problems.append(f"entry {entry.id}: {doc}")
                if doc.retry:
                    complete = False
                else:  # a 404 will not heal until the entry changes
                    await self.store.mark_seen(self.url, entry.id, entry.updated)
                continue
            payload, ctype = doc
            try:
                parse_cap(payload)
            except CapError as exc:  # still forwarded: the DLQ keeps it with the reason
                report.problems.append(f"entry {entry.id}: CAP rejected: {exc.reason}: {exc}")
            item = FeedItem(payload, ctype, self.source)
            complete = await self.emit(entry.id, entry.updated, item, produce, report) and complete
        return complete


class _GeoJsonPoller(Poller):
    """A GeoJSON FeatureCollection whose features each become one ``hazards.raw`` record."""

    default_type = "application/geo+json"

    def identity(self, feature: dict[str, Any]) -> tuple[str, str]:
        """(id, version) of a feature; empty id = unusable."""
        raise NotImplementedError

    async def handle(self, body: bytes, produce: Produce, report: PollReport) -> bool:
        """Produce every new feature as its own GeoJSON Feature document."""
        try:
            doc = _json.decode(body)
        except (msgspec.DecodeError, RecursionError) as exc:
            report.problems.append(f"feed_invalid: not JSON: {exc}")
            return True
        features = doc.get("features") if isinstance(doc, dict) else None
        if not isinstance(features, list):
            report.problems.append("feed_invalid: not a GeoJSON FeatureCollection")
            return True
        complete = True
        for n, feature in enumerate(reversed(features), 1):  # newest first in both feeds
            if not isinstance(feature, dict):
                report.problems.append(f"feature {n}: not an object; skipped")
                continue
            item_id, version = self.identity(feature)
            if not item_id:
                report.problems.append(f"feature {n}: no id; skipped")
                continue
            item = FeedItem(msgspec.json.encode(feature), self.default_type, self.source)
            complete = await self.emit(item_id, version, item, produce, report) and complete
        return complete


class UsgsPoller(_GeoJsonPoller):
    """USGS earthquake summary feed; ingest maps each event with :mod:`streams.hazard_json`
    (severity from magnitude and depth, shaking radius; see ``usgs_severity``)."""

    def identity(self, feature: dict[str, Any]) -> tuple[str, str]:
        """USGS event id + its ``updated`` time (a revised magnitude is a new version)."""
        props = feature.get("properties") or {}
        return str(feature.get("id") or ""), str(props.get("updated", ""))


class NwsAlertsPoller(_GeoJsonPoller):
    """api.weather.gov ``/alerts`` JSON; each alert feature is one record."""

    def identity(self, feature: dict[str, Any]) -> tuple[str, str]:
        """NWS alert id + ``sent``."""
        props = feature.get("properties") or {}
        return str(props.get("id") or feature.get("id") or ""), str(props.get("sent", ""))


POLLERS: dict[str, type[Poller]] = {"atom": CapIndexPoller, "rss": CapIndexPoller,
                                    "usgs": UsgsPoller, "nws": NwsAlertsPoller}


def poller_kind(url: str) -> str:
    """Guess the poller for a URL: USGS GeoJSON, NWS API, else a CAP Atom/RSS index."""
    host, path = urlparse(url).netloc, urlparse(url).path
    if "earthquake.usgs.gov" in host or path.endswith(".geojson"):
        return "usgs"
    if host == "api.weather.gov":
        return "nws"
    return "atom"


async def run_pollers(pollers: Sequence[Poller], produce: Produce, interval_s: float,
                      stop: asyncio.Event,
                      on_report: Callable[[PollReport], None] | None = None) -> None:
    """Poll every feed each ``interval_s`` seconds until ``stop`` is set."""
    while not stop.is_set():
        for report in await asyncio.gather(*(p.poll(produce) for p in pollers)):
            if on_report is not None:
                on_report(report)
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
        except TimeoutError:
            pass
