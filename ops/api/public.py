"""Public transparency: issued alerts, their areas, timing and k-anonymous reach.

The city promised to justify its alerts with anonymous data. For every alert the
pipeline ingested (Actual by default; Test/Exercise on request, flagged) this serves the
area, when it was issued and first/last handed to a provider, and how many people it
reached per channel - never an address, a place or a subscriber id.

k-anonymity (k = ``api_public_k``, 10 by default), by construction:

1. numbers appear only once an alert's delivery is *final* (every shard answered and
   every recipient settled): live numbers could be subtracted over time to single out
   the few people served between two looks;
2. any count below k (zero included) is ``null`` with ``suppressed: true``;
3. complementary suppression: a count is also hidden when subtracting it from its parent
   would leave fewer than k (``reached - matched_on_channel``, ``matched - sent``); the
   ``sent``/``not_sent`` pair of a channel is shown together or not at all;
4. filters (time, status, event, zone) only choose *which alerts* are listed; they
   never split an alert's numbers, and no totals across alerts are served, so no
   combination of filters yields a number that is not one of the protected ones above.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import Any

import shapely
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse
from pydantic import BaseModel
from shapely.geometry import mapping

from geofencing.areas import wkb_to_geometry
from ops.api.compose import normalise_code
from ops.api.context import ApiContext
from ops.api.models import BANNERS
from ops.api.ratelimit import limit_ip
from streams.atom import atom_feed
from streams.cap import CapError, parse_cap
from streams.records import CHANNELS, Alert

router = APIRouter(tags=["public"],
                   dependencies=[Depends(limit_ip("public",
                                                  lambda c: c.settings.api_rate_public_per_min))])


class Count(BaseModel):
    """A published count: ``value`` is null when suppressed."""

    value: int | None
    suppressed: bool


def protect(value: int, k: int, parent: Count | None = None) -> Count:
    """Rules 2 and 3 of the module docstring for one count."""
    if value < k:
        return Count(value=None, suppressed=True)
    if parent is not None:
        if parent.value is None:
            return Count(value=None, suppressed=True)
        rest = parent.value - value
        if 0 < rest < k:
            return Count(value=None, suppressed=True)
    return Count(value=value, suppressed=False)


def reach_stats(counters: dict[str, int], k: int) -> dict[str, Any]:
    """Protected reach per channel from an alert's pipeline counters."""
    reached = protect(counters.get("matched", 0), k)
    channels: dict[str, Any] = {}
    for channel in CHANNELS:
        matched_n = counters.get(f"matched:{channel}", 0)
        matched = protect(matched_n, k, reached)
        sent_n = counters.get(f"{channel}:sent", 0)
        sent = protect(sent_n, k, matched)
        not_sent = protect(max(0, matched_n - sent_n), k, matched)
        if sent.suppressed or not_sent.suppressed:  # a pair: either reveals the other
            sent = not_sent = Count(value=None, suppressed=True)
        channels[channel] = {"matched": matched, "sent": sent, "not_sent": not_sent}
    return {"reached": reached, "channels": channels}


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else None


async def public_entry(ctx: ApiContext, alert: Alert) -> dict[str, Any]:
    """One alert as the public sees it."""
    k = ctx.settings.api_public_k
    info = alert.infos[0] if alert.infos else None
    progress = await ctx.alerts.progress(alert.key, ctx.settings.partitions)
    final = progress.complete and alert.msg_type in ("Alert", "Update")
    times = await ctx.times.get(alert.key)
    area = None
    if alert.geometry_wkb:
        geom = shapely.simplify(wkb_to_geometry(alert.geometry_wkb), 0.001,
                                preserve_topology=True)
        area = mapping(geom)
    reach: dict[str, Any] = {"final": final}
    if final:
        reach.update(reach_stats(await ctx.alerts.counters(alert.key), k))
    return {
        "key": alert.key, "identifier": alert.identifier, "sender": alert.sender,
        "sender_name": info.sender_name if info else "", "status": alert.status,
        "is_test": alert.status != "Actual", "status_banner": BANNERS.get(alert.status),
        "msg_type": alert.msg_type, "event": info.event if info else "",
        "headline": info.headline if info else "", "severity": alert.max_severity,
        "area_desc": sorted({a.desc for i in alert.infos for a in i.areas if a.desc}),
        "area": area, "references": alert.references,
        "cancelled_by": await ctx.alerts.cancelled_by(alert.key),
        "timing": {"issued": alert.sent, "expires": info.expires if info else None,
                   "received": _iso(alert.received_at),
                   "first_delivery": _iso(times[0]) if times else None,
                   "last_delivery": _iso(times[1]) if times else None},
        "reach": reach, "k": k,
    }


async def select(ctx: ApiContext, *, since: str, until: str, status: str, event: str,
                 zone: str, include_tests: bool, limit: int) -> list[Alert]:
    """The alerts a filter combination lists (filters choose alerts, never split counts)."""
    try:
        lo = datetime.fromisoformat(since).timestamp() if since else None
        hi = datetime.fromisoformat(until).timestamp() if until else None
    except ValueError as exc:
        raise HTTPException(422, "since/until must be ISO 8601 times") from exc
    zone_geom = None
    if zone:
        scheme, value = normalise_code(zone)
        zone_geom = ctx.gazetteer.lookup(scheme, value) if scheme else None
        if zone_geom is None:
            raise HTTPException(422, f"unknown zone {zone!r}")
    out = []
    for key in await ctx.alerts.recent(2000):
        alert = await ctx.alerts.get(key)
        if alert is None or alert.status not in ("Actual", "Exercise", "Test"):
            continue
        if alert.status != "Actual" and not include_tests:
            continue
        if status and alert.status != status:
            continue
        sent = datetime.fromisoformat(alert.sent).timestamp()
        if (lo is not None and sent < lo) or (hi is not None and sent > hi):
            continue
        if event and not any(i.event.casefold() == event.casefold() for i in alert.infos):
            continue
        if zone_geom is not None and (alert.geometry_wkb is None or not shapely.intersects(
                zone_geom, wkb_to_geometry(alert.geometry_wkb))):
            continue
        out.append(alert)
        if len(out) >= limit:
            break
    return out


@router.get("/public/alerts")
async def public_alerts(
    request: Request, since: str = "", until: str = "", status: str = "", event: str = "",
    zone: str = Query("", description="FIPS:06037 / SAME:006037: alerts touching it"),
    include_tests: bool = False, limit: int = Query(50, ge=1, le=200),
) -> dict[str, Any]:
    """Issued alerts with areas, timing and k-anonymous reach (see the module docstring)."""
    ctx: ApiContext = request.app.state.ctx
    alerts = await select(ctx, since=since, until=until, status=status, event=event, zone=zone,
                          include_tests=include_tests, limit=limit)
    return {"k": ctx.settings.api_public_k,
            "note": "counts below k, and counts that would reveal a group smaller than k, "
                    "are suppressed; counts appear once delivery is final",
            "alerts": [await public_entry(ctx, a) for a in alerts]}


def _cell(count: Any) -> str:
    if not isinstance(count, Count):
        return ""
    return "&lt;k" if count.suppressed else str(count.value)


@router.get("/public", response_class=HTMLResponse)
async def public_page(request: Request, include_tests: bool = False) -> HTMLResponse:
    """A minimal, accessible HTML page of the same data."""
    ctx: ApiContext = request.app.state.ctx
    alerts = await select(ctx, since="", until="", status="", event="", zone="",
                          include_tests=include_tests, limit=100)
    rows = []
    for alert in alerts:
        e = await public_entry(ctx, alert)
        reach = e["reach"]
        cells = [html.escape(str(e["timing"]["issued"])),
                 html.escape(("[" + e["status"].upper() + "] " if e["is_test"] else "")
                             + str(e["event"])),
                 html.escape(str(e["msg_type"])), html.escape("; ".join(e["area_desc"]))]
        if reach["final"]:
            cells.append(_cell(reach["reached"]))
            cells += [_cell(reach["channels"][c]["sent"]) for c in CHANNELS]
        else:
            cells += ["in progress"] * (1 + len(CHANNELS))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(f'<th scope="col">{h}</th>' for h in
                   ("Issued", "Event", "Type", "Area", "People reached", *CHANNELS))
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Tocsin - issued '
        'alerts</title><meta name="viewport" content="width=device-width"></head><body>'
        "<h1>Issued alerts</h1><p>Counts below "
        f"{ctx.settings.api_public_k} people are shown as &lt;k to protect privacy. "
        'JSON: <a href="/public/alerts">/public/alerts</a>.</p>'
        f"<table><caption>Most recent first</caption><thead><tr>{head}</tr></thead><tbody>"
        + "".join(rows) + "</tbody></table></body></html>"
    )
    return HTMLResponse(page)


def _base(request: Request, ctx: ApiContext) -> str:
    return (ctx.settings.api_public_url or str(request.base_url)).rstrip("/")


@router.get("/feeds/alerts.atom", response_class=Response,
            responses={200: {"content": {"application/atom+xml": {}}}})
async def feed(request: Request, include_tests: bool = False) -> Response:
    """CAP Atom index feed of the alerts issued from this console."""
    ctx: ApiContext = request.app.state.ctx
    base = _base(request, ctx)
    alerts = []
    for key in await ctx.workflow.issued(200):
        payload = await ctx.workflow.cap_xml(key)
        if payload is None:
            continue
        try:
            alert = parse_cap(payload, source="feed")[0]
        except (CapError, IndexError):
            continue
        if alert.status == "Actual" or include_tests:
            alerts.append(alert)
    body = atom_feed(alerts, feed_id=f"{base}/feeds/alerts.atom", title="Tocsin issued alerts",
                     self_url=f"{base}/feeds/alerts.atom",
                     cap_url=lambda a: f"{base}/feeds/alerts/{a.key}.xml")
    return Response(body, media_type="application/atom+xml")


@router.get("/feeds/alerts/{key}.xml", response_class=Response,
            responses={200: {"content": {"application/cap+xml": {}}}})
async def feed_item(key: str, request: Request) -> Response:
    """The CAP XML of one issued alert."""
    payload = await request.app.state.ctx.workflow.cap_xml(key)
    if payload is None:
        raise HTTPException(404, f"no issued alert {key!r}")
    return Response(payload, media_type="application/cap+xml")
