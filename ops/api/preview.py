"""Reach preview: exactly who an alert would reach, per channel, and what they would read.

The API process keeps its own picture of every subscription: a ``ShardSet`` fed by a
``SubscriptionReader`` that follows *all* partitions of the compacted ``subscriptions``
topic (the workers follow only theirs), with the same base-plus-delta indexes the matcher
shards use. A preview runs the pipeline's own ``streams.pipeline.match`` against every
partition's view with a ``MatchRequest`` built exactly as ``scatter`` builds it, so the
counts apply the same preferences as delivery (minimum severity, quiet hours, test
opt-in): the preview is the truth, not an estimate. Messages are rendered by the same
``templates.render.Renderer`` the sender uses, per channel and per language present.

Memory: the API holds every subscription once (the workers together hold them once
too). Past what one API process can hold, run the preview against the workers instead.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, Field
from shapely.geometry.base import BaseGeometry

from geofencing.areas import geometry_to_wkb
from geofencing.gazetteer import Gazetteer
from ops.api.audit import record
from ops.api.auth import Principal, require
from ops.api.compose import area_km2, authority_problems, build_alert, refuse_unauthorised, resolve
from ops.api.models import BANNERS, DraftIn
from ops.settings import Settings
from streams.pipeline import match
from streams.records import CHANNELS, Alert, MatchRequest
from streams.shards import ShardSet, ShardView, SubscriptionReader
from streams.topics import SUBSCRIPTIONS
from templates.render import Renderer, sms_segments

if TYPE_CHECKING:
    from ops.api.context import ApiContext

_MAX_LANGUAGES = 12


class PreviewIndex:
    """Every partition of ``subscriptions``, indexed in the API process."""

    def __init__(self, settings: Settings, gazetteer: Gazetteer) -> None:
        self.partitions = settings.partitions
        self.shards = ShardSet(gazetteer)
        self.reader = SubscriptionReader(settings.kafka_bootstrap_servers,
                                         settings.topic(SUBSCRIPTIONS), self.shards)

    async def start(self) -> None:
        """Start reading every partition from the beginning, then keep tailing."""
        await self.reader.start()
        self.reader.follow(range(self.partitions))

    async def stop(self) -> None:
        """Stop the reader."""
        await self.reader.stop()

    def size(self) -> int:
        """Subscriptions currently held."""
        return sum(len(s.subscriptions) for s in self.shards.shards.values())

    def caught_up(self) -> bool:
        """True once every partition was read to its end at least once."""
        return all(s.caught_up.is_set() for s in self.shards.shards.values())

    async def wait(self, timeout: float) -> bool:
        """Wait (bounded) until caught up; return whether it is."""
        waits = [s.caught_up.wait() for s in self.shards.shards.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout)
        except TimeoutError:
            return False
        return True

    async def views(self) -> list[tuple[int, ShardView]]:
        """One consistent view per partition (built on first use)."""
        gazetteer = self.shards.gazetteer
        return [(p, await s.view(gazetteer)) for p, s in sorted(self.shards.shards.items())]


class RenderedOut(BaseModel):
    """One rendered message as a citizen would receive it."""

    channel: str
    language: str
    subject: str
    body: str
    sms_segments: int | None = None


class ReachOut(BaseModel):
    """Who the alert reaches after preferences (severity, quiet hours, test opt-in)."""

    subscriptions: int
    citizens: int = Field(description="distinct citizens (a citizen may have several places)")
    channels: dict[str, int] = Field(description="messages per channel, as the sender sends "
                                     "today (one per matched subscription)")
    citizen_channels: dict[str, int] = Field(description="distinct citizens per channel")
    languages: dict[str, int]


class InAreaOut(BaseModel):
    """Subscriptions geometrically inside the area, before any preference."""

    subscriptions: int
    places: int
    zones: int


class PreviewOut(BaseModel):
    """A preview: reach per channel and the rendered messages."""

    status: str
    is_test: bool
    status_banner: str | None
    area_km2: float
    in_area: InAreaOut
    reach: ReachOut
    messages: list[RenderedOut]
    warnings: list[str]
    indexed_subscriptions: int
    computed_in_ms: float


def _citizen(subscriber_id: str) -> str:
    # Citizens registered through the API have one subscription per place or zone,
    # ``<citizen id>:<place>``; file-loaded subscribers are one citizen per id.
    return subscriber_id.split(":", 1)[0]


async def compute_preview(index: PreviewIndex, renderer: Renderer, alert: Alert,
                          geometry: BaseGeometry, warnings: list[str]) -> PreviewOut:
    """Match against every partition and render the messages (see the module docstring)."""
    started = time.perf_counter()
    request = MatchRequest(alert_key=alert.key, geometry_wkb=geometry_to_wkb(geometry),
                           severity=alert.max_severity, status=alert.status,
                           urgent=alert.urgent)
    channels: Counter[str] = Counter()
    languages: Counter[str] = Counter()
    by_channel_lang: dict[str, set[str]] = {c: set() for c in CHANNELS}
    citizens: set[str] = set()
    citizen_channel: set[tuple[str, str]] = set()
    reached = places = zones = 0
    for partition, view in await index.views():
        inside = view.match(geometry)
        places += sum(1 for s in inside if s.kind == "place")
        zones += sum(1 for s in inside if s.kind == "zone")
        batches, counts, n = match(request, view, batch_size=1 << 30, partition=partition)
        reached += n
        for channel, count in counts.items():
            channels[channel] += count
        seen: set[str] = set()
        for batch in batches:
            for r in batch.recipients:
                by_channel_lang[batch.channel].add(r.language)
                citizen_channel.add((_citizen(r.subscriber_id), batch.channel))
                if r.subscriber_id not in seen:
                    seen.add(r.subscriber_id)
                    languages[r.language] += 1
                    citizens.add(_citizen(r.subscriber_id))
    messages = []
    own = [i.language for i in alert.infos]
    for channel in CHANNELS:
        wanted = list(dict.fromkeys([*own, *sorted(by_channel_lang[channel])]))
        for language in wanted[:_MAX_LANGUAGES]:
            msg = renderer.render(alert, channel, language)
            messages.append(RenderedOut(
                channel=channel, language=language, subject=msg.subject, body=msg.body,
                sms_segments=sms_segments(msg.body) if channel == "sms" else None,
            ))
    return PreviewOut(
        status=alert.status, is_test=alert.status != "Actual",
        status_banner=BANNERS.get(alert.status), area_km2=area_km2(geometry),
        in_area=InAreaOut(subscriptions=places + zones, places=places, zones=zones),
        reach=ReachOut(subscriptions=reached, citizens=len(citizens),
                       channels={c: channels.get(c, 0) for c in CHANNELS},
                       citizen_channels={c: sum(1 for _, ch in citizen_channel if ch == c)
                                         for c in CHANNELS},
                       languages=dict(languages)),
        messages=messages, warnings=warnings, indexed_subscriptions=index.size(),
        computed_in_ms=round((time.perf_counter() - started) * 1000, 2),
    )


async def preview_draft(ctx: ApiContext, draft: DraftIn, org_id: str) -> PreviewOut:
    """Preview a draft for an organisation: 403 outside its authority, 503 while loading."""
    org = await ctx.identity.get_org(org_id)
    if org is None:
        raise HTTPException(403, f"your organisation {org_id!r} no longer exists")
    alert, warnings = build_alert(draft, org, ctx.gazetteer, identifier=f"preview.{org.id}",
                                  sent=datetime.now(UTC),
                                  expiry_min=ctx.settings.api_default_expiry_min)
    geometry, more = resolve(alert, ctx.gazetteer)
    refuse_unauthorised(authority_problems(alert, geometry, org, ctx.gazetteer,
                                           ctx.settings.api_jurisdiction_tolerance_m,
                                           pipeline=ctx.senders), org)
    if not await ctx.index.wait(ctx.settings.api_preview_wait_s):
        raise HTTPException(503, f"the subscription index is still loading "
                                 f"({ctx.index.size()} subscriptions so far); retry shortly",
                            headers={"Retry-After": "2"})
    return await compute_preview(ctx.index, ctx.renderer, alert, geometry, warnings + more)


router = APIRouter(tags=["alerts"])


@router.post("/alerts/preview", response_model=PreviewOut)
async def preview_adhoc(draft: DraftIn, request: Request,
                        principal: Principal = Depends(require("originator", "approver"))
                        ) -> PreviewOut:
    """Preview a draft without saving it (the console calls this as the area changes)."""
    ctx: ApiContext = request.app.state.ctx
    try:
        return await preview_draft(ctx, draft, principal.org)
    except HTTPException as exc:
        if exc.status_code == 403:
            await record(request, principal, "alert.preview", outcome="denied",
                         detail=str(exc.detail))
        raise
