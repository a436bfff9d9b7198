"""The emergency manager's workflow: compose, preview, submit, approve, send, follow up.

Rules enforced here (the reasons are the 2018 Hawaii false alarm and the law after it):

- only originators compose, edit, submit and update; only approvers approve or reject;
  originators and approvers may cancel and correct (stopping harm must be fast);
- everyone acts only on their own organisation's alerts, inside its jurisdiction and
  for its allowed event codes (403 with the reason otherwise);
- an Actual alert that policy says needs approval is sent only after a *different*
  person approves it: nobody who composed, edited or submitted it may approve it, even
  if they also hold the approver role;
- Test and Exercise are flagged in every response (``is_test``, ``status_banner``).

Every action, allowed or refused, is appended to the audit log.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response

from ops.api import issue
from ops.api.audit import record
from ops.api.auth import Principal, require
from ops.api.compose import authority_problems, build_alert, refuse_unauthorised, resolve
from ops.api.context import ApiContext
from ops.api.identity import Organisation
from ops.api.models import (
    AlertRecord,
    ApproveIn,
    CancelIn,
    CorrectionIn,
    DraftIn,
    RejectIn,
    State,
)
from ops.api.preview import PreviewOut, preview_draft
from ops.api.workflow import new_id, note
from streams.records import severity_rank

router = APIRouter(prefix="/alerts", tags=["alerts"])
READERS = ("originator", "approver", "auditor", "admin")
EDITABLE: tuple[State, ...] = ("draft", "rejected")


def _ctx(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


@contextlib.asynccontextmanager
async def audited(request: Request, principal: Principal, action: str,
                  alert: str = "") -> AsyncIterator[dict[str, str]]:
    """Audit an action: ``ok`` (with ``detail``), ``denied`` (4xx) or ``failed`` (5xx)."""
    info: dict[str, str] = {"alert": alert, "detail": ""}
    try:
        yield info
    except HTTPException as exc:
        outcome = "denied" if exc.status_code < 500 else "failed"
        await record(request, principal, action, alert=info["alert"], outcome=outcome,
                     detail=str(exc.detail))
        raise
    await record(request, principal, action, alert=info["alert"], detail=info["detail"])


async def _org(ctx: ApiContext, org_id: str) -> Organisation:
    org = await ctx.identity.get_org(org_id)
    if org is None:
        raise HTTPException(403, f"organisation {org_id!r} does not exist any more")
    return org


async def _load(ctx: ApiContext, rec_id: str, principal: Principal, *,
                write: bool) -> AlertRecord:
    rec = await ctx.workflow.get(rec_id)
    if rec is None:
        raise HTTPException(404, f"no alert {rec_id!r}")
    if rec.org != principal.org and (write or not principal.has("admin", "auditor")):
        raise HTTPException(403, f"alert {rec_id} belongs to another organisation")
    return rec


def needs_approval(ctx: ApiContext, draft: DraftIn) -> bool:
    """Whether policy requires a second person for this draft."""
    if draft.status != "Actual":
        return False
    if ctx.settings.api_approval_policy == "every_actual":
        return True
    return severity_rank(draft.severity) >= severity_rank(ctx.settings.api_approval_min_severity)


async def _check(ctx: ApiContext, draft: DraftIn, org: Organisation) -> list[str]:
    """Build and resolve a draft as it would be sent; 403/422 if it could not be."""
    alert, warnings = build_alert(draft, org, ctx.gazetteer, identifier=f"check.{org.id}",
                                  sent=datetime.now(UTC),
                                  expiry_min=ctx.settings.api_default_expiry_min)
    geometry, more = resolve(alert, ctx.gazetteer)
    refuse_unauthorised(authority_problems(alert, geometry, org, ctx.gazetteer,
                                           ctx.settings.api_jurisdiction_tolerance_m,
                                           pipeline=ctx.senders), org)
    return warnings + more


@router.post("", response_model=AlertRecord, status_code=201)
async def compose(draft: DraftIn, request: Request,
                  principal: Principal = Depends(require("originator"))) -> AlertRecord:
    """Compose a draft (checked against the organisation's jurisdiction and events)."""
    ctx = _ctx(request)
    rec_id = new_id()
    async with audited(request, principal, "alert.compose", rec_id) as info:
        warnings = await _check(ctx, draft, await _org(ctx, principal.org))
        rec = AlertRecord(id=rec_id, org=principal.org, draft=draft,
                          created_by=principal.user_id, created_at=time.time(),
                          needs_approval=needs_approval(ctx, draft), warnings=warnings)
        note(rec, principal.user_id, "composed")
        await ctx.workflow.create(rec)
        info["detail"] = f"{draft.status} {draft.event}"
    return rec


@router.get("", response_model=list[AlertRecord])
async def history(request: Request,
                  state: str = Query("", max_length=32), status: str = Query("", max_length=16),
                  since: str = Query("", description="epoch seconds or ISO 8601 time"),
                  org: str = Query("", max_length=64), limit: int = Query(100, ge=1, le=1000),
                  principal: Principal = Depends(require(*READERS))) -> list[AlertRecord]:
    """Alert history, newest first; other organisations only for admins and auditors."""
    if org and org != principal.org and not principal.has("admin", "auditor"):
        raise HTTPException(403, "you can only list your own organisation's alerts")
    if not org and not principal.has("admin", "auditor"):
        org = principal.org
    try:
        since_ts = float(since) if since.replace(".", "", 1).isdigit() else (
            datetime.fromisoformat(since).timestamp() if since else 0.0)
    except ValueError as exc:
        raise HTTPException(422, f"since: {since!r} is neither epoch seconds nor ISO 8601"
                            ) from exc
    return await _ctx(request).workflow.history(org=org, state=state, status=status,
                                                since=since_ts, limit=limit)


@router.get("/{rec_id}", response_model=AlertRecord)
async def get_alert(rec_id: str, request: Request,
                    principal: Principal = Depends(require(*READERS))) -> AlertRecord:
    """One alert record with its history."""
    return await _load(_ctx(request), rec_id, principal, write=False)


@router.put("/{rec_id}", response_model=AlertRecord)
async def edit(rec_id: str, draft: DraftIn, request: Request,
               principal: Principal = Depends(require("originator"))) -> AlertRecord:
    """Change a draft (or a rejected alert, which becomes a draft again)."""
    ctx = _ctx(request)
    async with audited(request, principal, "alert.edit", rec_id):
        current = await _load(ctx, rec_id, principal, write=True)
        if current.kind == "update" and draft.status != current.draft.status:
            raise HTTPException(422, "an update keeps the status of the alert it updates")
        warnings = await _check(ctx, draft, await _org(ctx, principal.org))

        def change(rec: AlertRecord) -> AlertRecord:
            if rec.state not in EDITABLE:
                raise HTTPException(409, f"alert {rec.id} is {rec.state}; only drafts and "
                                         "rejected alerts can be edited")
            rec.draft, rec.state, rec.warnings = draft, "draft", warnings
            rec.needs_approval = needs_approval(ctx, draft)
            rec.approved_by = ""
            if principal.user_id not in rec.editors:
                rec.editors.append(principal.user_id)
            note(rec, principal.user_id, "edited")
            return rec

        return await ctx.workflow.update(rec_id, change)


@router.get("/{rec_id}/preview", response_model=PreviewOut)
async def preview(rec_id: str, request: Request,
                  principal: Principal = Depends(require("originator", "approver"))
                  ) -> PreviewOut:
    """Exact reach per channel and the rendered messages of a stored alert."""
    ctx = _ctx(request)
    rec = await _load(ctx, rec_id, principal, write=True)
    return await preview_draft(ctx, rec.draft, rec.org)


@router.post("/{rec_id}/submit", response_model=AlertRecord)
async def submit(rec_id: str, request: Request,
                 principal: Principal = Depends(require("originator"))) -> AlertRecord:
    """Submit: to the approvers if policy says so, else it is sent at once."""
    ctx = _ctx(request)
    async with audited(request, principal, "alert.submit", rec_id) as info:
        await _load(ctx, rec_id, principal, write=True)

        def change(rec: AlertRecord) -> AlertRecord:
            if rec.state != "draft":
                raise HTTPException(409, f"alert {rec.id} is {rec.state}; only a draft can be "
                                         "submitted")
            rec.needs_approval = needs_approval(ctx, rec.draft)
            rec.submitted_by = principal.user_id
            rec.state = "pending_approval" if rec.needs_approval else "approved"
            note(rec, principal.user_id, "submitted")
            return rec

        rec = await ctx.workflow.update(rec_id, change)
        info["detail"] = rec.state
    if rec.state == "approved":  # no second person needed: sending is part of submitting
        async with audited(request, principal, "alert.send", rec_id) as info:
            rec = await issue.send(ctx, rec_id, principal)
            info["detail"] = rec.cap.key if rec.cap else ""
    return rec


@router.post("/{rec_id}/approve", response_model=AlertRecord)
async def approve(rec_id: str, body: ApproveIn, request: Request,
                  principal: Principal = Depends(require("approver"))) -> AlertRecord:
    """Approve (and by default send). Never by someone who composed or submitted it."""
    ctx = _ctx(request)
    async with audited(request, principal, "alert.approve", rec_id):
        await _load(ctx, rec_id, principal, write=True)

        def change(rec: AlertRecord) -> AlertRecord:
            if rec.state != "pending_approval":
                raise HTTPException(409, f"alert {rec.id} is {rec.state}; only alerts pending "
                                         "approval can be approved")
            authors = {rec.created_by, rec.submitted_by, *rec.editors}
            if rec.draft.status == "Actual" and principal.user_id in authors:
                raise HTTPException(403, "two-person rule: you composed, edited or submitted "
                                         "this Actual alert, so a different approver must "
                                         "approve it")
            rec.state, rec.approved_by = "approved", principal.user_id
            note(rec, principal.user_id, "approved", body.comment)
            return rec

        rec = await ctx.workflow.update(rec_id, change)
    if body.send:
        async with audited(request, principal, "alert.send", rec_id) as info:
            rec = await issue.send(ctx, rec_id, principal)
            info["detail"] = rec.cap.key if rec.cap else ""
    return rec


@router.post("/{rec_id}/reject", response_model=AlertRecord)
async def reject(rec_id: str, body: RejectIn, request: Request,
                 principal: Principal = Depends(require("approver"))) -> AlertRecord:
    """Reject with a reason; the originator may edit and resubmit."""
    ctx = _ctx(request)
    async with audited(request, principal, "alert.reject", rec_id) as info:
        await _load(ctx, rec_id, principal, write=True)

        def change(rec: AlertRecord) -> AlertRecord:
            if rec.state != "pending_approval":
                raise HTTPException(409, f"alert {rec.id} is {rec.state}; only alerts pending "
                                         "approval can be rejected")
            rec.state, rec.rejected_by, rec.reject_reason = "rejected", principal.user_id, \
                body.reason
            note(rec, principal.user_id, "rejected", body.reason)
            return rec

        rec = await ctx.workflow.update(rec_id, change)
        info["detail"] = body.reason
    return rec


@router.post("/{rec_id}/send", response_model=AlertRecord)
async def send(rec_id: str, request: Request,
               principal: Principal = Depends(require("originator", "approver"))
               ) -> AlertRecord:
    """Send an approved alert (when it was approved without sending)."""
    ctx = _ctx(request)
    async with audited(request, principal, "alert.send", rec_id) as info:
        await _load(ctx, rec_id, principal, write=True)
        rec = await issue.send(ctx, rec_id, principal)
        info["detail"] = rec.cap.key if rec.cap else ""
    return rec


@router.post("/{rec_id}/update", response_model=AlertRecord, status_code=201)
async def update(rec_id: str, draft: DraftIn, request: Request,
                 principal: Principal = Depends(require("originator"))) -> AlertRecord:
    """Start an Update of a sent alert: a new draft that goes through approval again."""
    ctx = _ctx(request)
    new = new_id()
    async with audited(request, principal, "alert.update", new) as info:
        current = await _load(ctx, rec_id, principal, write=True)
        root = await issue.root_of(ctx, current)
        if root.state != "sent":
            raise HTTPException(409, f"alert {root.id} is {root.state}; only a sent alert can "
                                     "be updated")
        if draft.status != root.draft.status:
            raise HTTPException(422, f"an update keeps the status of the alert it updates "
                                     f"({root.draft.status})")
        warnings = await _check(ctx, draft, await _org(ctx, principal.org))
        rec = AlertRecord(id=new, org=root.org, kind="update", draft=draft, parent=root.id,
                          created_by=principal.user_id, created_at=time.time(),
                          needs_approval=needs_approval(ctx, draft), warnings=warnings)
        note(rec, principal.user_id, "composed", f"update of {root.id}")
        await ctx.workflow.create(rec)
        info["detail"] = f"update of {root.id}"
    return rec


@router.post("/{rec_id}/cancel", response_model=AlertRecord)
async def cancel(rec_id: str, body: CancelIn, request: Request,
                 principal: Principal = Depends(require("originator", "approver"))
                 ) -> AlertRecord:
    """Cancel: a CAP Cancel for a sent alert (no approval: stopping is always allowed),
    or withdrawal of one not sent yet."""
    ctx = _ctx(request)
    async with audited(request, principal, "alert.cancel", rec_id) as info:
        rec = await _load(ctx, rec_id, principal, write=True)
        out = await issue.withdraw_or_cancel(ctx, rec, principal, correction=False,
                                             text=body.reason)
        info["detail"] = out.cap.key if out.cap else "withdrawn before sending"
    return out


@router.post("/{rec_id}/correct", response_model=AlertRecord)
async def correct(rec_id: str, body: CorrectionIn, request: Request,
                  principal: Principal = Depends(require("originator", "approver"))
                  ) -> AlertRecord:
    """One-step correction: 'the earlier alert was sent in error', to everyone it reached."""
    ctx = _ctx(request)
    async with audited(request, principal, "alert.correct", rec_id) as info:
        rec = await _load(ctx, rec_id, principal, write=True)
        out = await issue.withdraw_or_cancel(ctx, rec, principal, correction=True,
                                             text=body.message)
        info["detail"] = out.cap.key if out.cap else ""
    return out


@router.get("/{rec_id}/cap", response_class=Response,
            responses={200: {"content": {"application/cap+xml": {}}}})
async def cap_xml(rec_id: str, request: Request,
                  principal: Principal = Depends(require(*READERS))) -> Response:
    """The exact CAP XML produced for a sent record."""
    ctx = _ctx(request)
    rec = await _load(ctx, rec_id, principal, write=False)
    payload = await ctx.workflow.cap_xml(rec.cap.key) if rec.cap else None
    if payload is None:
        raise HTTPException(404, f"alert {rec_id} has not been sent")
    return Response(payload, media_type="application/cap+xml")
