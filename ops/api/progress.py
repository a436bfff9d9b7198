"""Live delivery progress of an alert thread, as JSON and as Server-Sent Events.

A thread is the original alert, its updates, and its cancel/correction. For an Alert or
Update message the numbers are the pipeline's own per-alert counters
(``streams.state.AlertStore.progress``: matched by every shard, then every recipient
settled). A Cancel is never matched; its notices go to everyone already warned by the
messages it references, so its expected count is the size of those who-was-warned sets
and it is complete when that many notices are settled. Provider delivery reports (SMS
status callbacks) are shown beside the counters, never folded into them.

The SSE stream (``text/event-stream``) sends a ``progress`` event whenever the numbers
change, a comment every 15 s to keep proxies from closing it, and ``done`` when every
message of the thread is complete (or the thread ended without sending), then closes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from ops.api.auth import Principal, require
from ops.api.context import ApiContext
from ops.api.models import BANNERS, AlertRecord
from streams.lifecycle import parse_references
from streams.records import CHANNELS
from streams.state import WARNED

router = APIRouter(prefix="/alerts", tags=["alerts"])
CALLBACKS = "tocsin:api:callbacks:"
_READERS = ("originator", "approver", "auditor", "admin")


class MessageProgress(BaseModel):
    """Progress of one CAP message of the thread."""

    record: str
    kind: str
    msg_type: str
    cap_key: str
    ingested: bool
    matched: int
    expected: dict[str, int]
    settled: dict[str, int]
    outcomes: dict[str, int]
    provider_reports: dict[str, int]
    first_delivery: float | None
    last_delivery: float | None
    complete: bool


class ProgressOut(BaseModel):
    """Progress of a whole thread."""

    id: str
    state: str
    status: str
    is_test: bool
    status_banner: str | None
    messages: list[MessageProgress]
    complete: bool


async def _message(ctx: ApiContext, rec: AlertRecord) -> MessageProgress | None:
    if rec.cap is None:
        return None
    key = rec.cap.key
    alert = await ctx.alerts.get(key)
    times = await ctx.times.get(key)
    raw = await ctx.redis.hgetall(CALLBACKS + key)
    reports = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
    state = await ctx.alerts.progress(key, ctx.settings.partitions)
    expected, matched = dict(state.expected), state.matched
    complete = alert is not None and state.complete
    if rec.cap.msg_type == "Cancel" and alert is not None:
        expected = {}
        for ref in parse_references(alert):
            for channel in CHANNELS:
                n = int(await ctx.redis.hlen(f"{WARNED}{ref.key}:{channel}"))
                if n:
                    expected[channel] = expected.get(channel, 0) + n
        matched = sum(expected.values())
        complete = all(state.settled.get(c, 0) >= n for c, n in expected.items())
    return MessageProgress(
        record=rec.id, kind=rec.kind, msg_type=rec.cap.msg_type, cap_key=key,
        ingested=alert is not None, matched=matched, expected=expected,
        settled=dict(state.settled), outcomes=dict(state.outcomes), provider_reports=reports,
        first_delivery=times[0] if times else None, last_delivery=times[1] if times else None,
        complete=complete,
    )


async def progress_of(ctx: ApiContext, rec: AlertRecord) -> ProgressOut:
    """Progress of the thread ``rec`` belongs to."""
    root = rec
    if rec.parent:
        root = await ctx.workflow.get(rec.parent) or rec
    ids = list(dict.fromkeys([*(root.chain or [root.id]), *root.followups]))
    messages = []
    for rid in ids:
        member = root if rid == root.id else await ctx.workflow.get(rid)
        if member is not None:
            found = await _message(ctx, member)
            if found is not None:
                messages.append(found)
    return ProgressOut(id=root.id, state=root.state, status=root.draft.status,
                       is_test=root.draft.status != "Actual",
                       status_banner=BANNERS.get(root.draft.status), messages=messages,
                       complete=bool(messages) and all(m.complete for m in messages))


async def _load(request: Request, rec_id: str, principal: Principal) -> AlertRecord:
    ctx: ApiContext = request.app.state.ctx
    rec = await ctx.workflow.get(rec_id)
    if rec is None:
        raise HTTPException(404, f"no alert {rec_id!r}")
    if rec.org != principal.org and not principal.has("admin", "auditor"):
        raise HTTPException(403, f"alert {rec_id} belongs to another organisation")
    return rec


@router.get("/{rec_id}/progress", response_model=ProgressOut)
async def progress(rec_id: str, request: Request,
                   principal: Principal = Depends(require(*_READERS))) -> ProgressOut:
    """Delivery progress of an alert thread, per message and channel."""
    rec = await _load(request, rec_id, principal)
    return await progress_of(request.app.state.ctx, rec)


@router.get("/{rec_id}/progress/stream", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
async def progress_stream(
    rec_id: str, request: Request,
    max_s: float = Query(1800.0, gt=0, le=6 * 3600, description="close after this long"),
    principal: Principal = Depends(require(*_READERS)),
) -> StreamingResponse:
    """Server-Sent Events: ``progress`` on every change, ``done`` at the end."""
    ctx: ApiContext = request.app.state.ctx
    rec = await _load(request, rec_id, principal)

    async def events() -> AsyncIterator[str]:
        last, beat = "", time.monotonic()
        deadline = beat + max_s
        while True:
            current = await ctx.workflow.get(rec.id) or rec
            out = await progress_of(ctx, current)
            data = out.model_dump_json()
            if data != last:
                yield f"event: progress\ndata: {data}\n\n"
                last, beat = data, time.monotonic()
            ended = out.state in ("rejected", "failed") or (
                out.state == "cancelled" and not out.messages)
            if out.complete or ended:
                yield f"event: done\ndata: {data}\n\n"
                return
            if time.monotonic() > deadline:
                yield "event: timeout\ndata: {}\n\n"
                return
            if time.monotonic() - beat > 15:
                yield ": keep-alive\n\n"
                beat = time.monotonic()
            await asyncio.sleep(0.5)  # polling Redis counters; cheap, and bounded per client

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache",
                                      "X-Accel-Buffering": "no"})
