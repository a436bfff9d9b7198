"""Agencies POST CAP XML with their token; it goes to ``hazards.raw`` like any feed.

The pipeline validates every message again (and dead-letters what it refuses); here we
parse it first with the same parser so an integrator gets the reason at once (422), and
apply the same authority rules with the caller's organisation as the registered sender:
the CAP ``<sender>`` must be the organisation's, the area inside its jurisdiction and the
events among its allowed ones (403 with the reason). The body limit is the pipeline's
``max_message_bytes`` (413 above it).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel

from geofencing.areas import resolve_alert_geometry
from ops.api.audit import record
from ops.api.auth import Principal, require
from ops.api.compose import authority_problems, refuse_unauthorised
from ops.api.context import ApiContext
from streams.cap import CapError, parse_cap
from streams.runtime import cap_limits

router = APIRouter(tags=["ingest"])


class Accepted(BaseModel):
    """What was queued for the pipeline."""

    accepted: bool
    identifier: str
    sender: str
    key: str
    status: str
    is_test: bool
    msg_type: str
    warnings: list[str]


@router.post("/ingest/cap", response_model=list[Accepted], status_code=202,
             openapi_extra={"requestBody": {"content": {"application/cap+xml": {}}}})
async def ingest_cap(request: Request,
                     principal: Principal = Depends(require("agency", "originator"))
                     ) -> list[Accepted]:
    """Queue one CAP 1.2 (or 1.1/1.0) XML message for ingest."""
    ctx: ApiContext = request.app.state.ctx
    s = ctx.settings
    payload = await request.body()
    limits = cap_limits(s)
    try:
        alerts = parse_cap(payload, limits=limits, source=f"api:{principal.org}")
    except CapError as exc:
        await record(request, principal, "ingest.cap", outcome="denied",
                     detail=f"{exc.reason}: {exc}")
        raise HTTPException(422, f"invalid CAP ({exc.reason}): {exc}") from exc
    org = await ctx.identity.get_org(principal.org)
    if org is None:
        raise HTTPException(403, f"organisation {principal.org!r} does not exist any more")
    out = []
    for alert in alerts:
        if alert.sender.casefold() != org.sender.casefold():
            detail = (f"the CAP sender {alert.sender!r} is not your organisation's sender "
                      f"{org.sender!r}")
            await record(request, principal, "ingest.cap", alert=alert.key, outcome="denied",
                         detail=detail)
            raise HTTPException(403, detail)
        geometry, _ = resolve_alert_geometry(alert, ctx.gazetteer)
        problems = authority_problems(alert, geometry, org, ctx.gazetteer,
                                      s.api_jurisdiction_tolerance_m, pipeline=ctx.senders,
                                      payload=payload)
        if problems:
            await record(request, principal, "ingest.cap", alert=alert.key, outcome="denied",
                         detail="; ".join(problems))
        refuse_unauthorised(problems, org)
        out.append(Accepted(accepted=True, identifier=alert.identifier, sender=alert.sender,
                            key=alert.key, status=alert.status,
                            is_test=alert.status != "Actual", msg_type=alert.msg_type,
                            warnings=alert.warnings))
    try:
        await ctx.bus.hazard(payload, f"api:{org.id}")
    except Exception as exc:
        raise HTTPException(503, "the message broker could not be reached; nothing was queued"
                            ) from exc
    for accepted in out:
        await record(request, principal, "ingest.cap", alert=accepted.key,
                     detail=f"{accepted.status} {accepted.msg_type} {accepted.identifier}")
    return out
