"""Issuing CAP messages for workflow records: send, update, cancel, correct.

The API never delivers anything itself: issuing means producing the CAP XML to
``hazards.raw`` with source ``console:<org>``; ingest, matching and the sender do the
rest exactly as for an agency's message. A record moves to ``sending`` in an atomic
transition before the produce (so it is produced once even if two people click), and
back to where it was if the broker cannot be reached (nothing was sent; the error says
so). Kafka delivery is at-least-once; a retried produce carries the same identifier and
``sent``, which the pipeline's registry recognises as the same message.

Cancel and correction reference every still-live CAP message of the alert (the original
and its updates): the pipeline's Cancel handling then withdraws what is still queued and
notifies everyone already warned by any of them, once per person and channel. A
correction is that Cancel with the text "the earlier alert was sent in error".
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from fastapi import HTTPException

from ops.api.auth import Principal
from ops.api.compose import (
    authority_problems,
    build_alert,
    cap_document,
    refuse_unauthorised,
    resolve,
)
from ops.api.context import ApiContext
from ops.api.models import AlertRecord, CapRef, DraftIn, State
from ops.api.workflow import new_id, note

log = logging.getLogger(__name__)

SENDABLE: tuple[State, ...] = ("approved",)
UNSENT: tuple[State, ...] = ("draft", "pending_approval", "approved", "rejected")


def identifier(org_id: str, rec_id: str) -> str:
    """The CAP identifier of a record's message (unique per sender, CAP-safe)."""
    return f"tocsin.{org_id}.{rec_id}"


def live(caps: list[CapRef], now: float) -> list[CapRef]:
    """The messages not expired yet (the pipeline refuses references to expired ones)."""
    out = []
    for cap in caps:
        try:
            if not cap.expires or datetime.fromisoformat(cap.expires).timestamp() > now:
                out.append(cap)
        except ValueError:
            out.append(cap)
    return out


def ref(cap: CapRef) -> str:
    """A CAP ``references`` entry: ``sender,identifier,sent``."""
    return f"{cap.sender},{cap.identifier},{cap.sent}"


async def root_of(ctx: ApiContext, rec: AlertRecord) -> AlertRecord:
    """The thread's root record (the original alert)."""
    if not rec.parent:
        return rec
    root = await ctx.workflow.get(rec.parent)
    if root is None:
        raise HTTPException(409, f"the original alert {rec.parent!r} of this record is gone")
    return root


async def chain_caps(ctx: ApiContext, root: AlertRecord) -> list[CapRef]:
    """CAP messages sent so far in a thread (original, then updates)."""
    caps = []
    for rid in root.chain:
        rec = await ctx.workflow.get(rid)
        if rec is not None and rec.cap is not None:
            caps.append(rec.cap)
    return caps


async def _produce(ctx: ApiContext, rec: AlertRecord, *, msg_type: str, references: list[str],
                   note_text: str = "") -> tuple[CapRef, list[str]]:
    """Build, check and produce one CAP message for a record; return its reference."""
    org = await ctx.identity.get_org(rec.org)
    if org is None:
        raise HTTPException(409, f"organisation {rec.org!r} no longer exists")
    now = datetime.now(UTC)
    alert, warnings = build_alert(rec.draft, org, ctx.gazetteer,
                                  identifier=identifier(org.id, rec.id), sent=now,
                                  msg_type=msg_type, references=references, note=note_text,
                                  expiry_min=ctx.settings.api_default_expiry_min)
    geometry, more = resolve(alert, ctx.gazetteer)
    refuse_unauthorised(authority_problems(alert, geometry, org, ctx.gazetteer,
                                           ctx.settings.api_jurisdiction_tolerance_m,
                                           pipeline=ctx.senders), org)
    payload = cap_document(alert)
    try:
        await ctx.bus.hazard(payload, f"console:{org.id}")
    except Exception as exc:
        log.exception("producing alert %s failed", alert.key)
        raise HTTPException(503, "the message broker could not be reached; nothing was sent "
                                 "- try again") from exc
    await ctx.workflow.record_issue(alert.key, rec.id, payload)
    expires = alert.infos[0].expires if alert.infos else None
    cap = CapRef(identifier=alert.identifier, sender=alert.sender, sent=alert.sent,
                 key=alert.key, msg_type=msg_type, references=references,
                 expires=expires or "")
    return cap, warnings + more


async def send(ctx: ApiContext, rec_id: str, principal: Principal, *,
               allowed: tuple[State, ...] = SENDABLE) -> AlertRecord:
    """Issue an alert or update record; it must be in one of ``allowed`` states."""
    before: list[State] = []

    def start(rec: AlertRecord) -> AlertRecord:
        if rec.state not in allowed:
            raise HTTPException(409, f"alert {rec.id} is {rec.state}; it can be sent only when "
                                     f"{' or '.join(allowed)}")
        before.append(rec.state)
        rec.state = "sending"
        return rec

    rec = await ctx.workflow.update(rec_id, start)
    try:
        root = await root_of(ctx, rec)
        references: list[str] = []
        if rec.kind == "update":
            if root.state != "sent":
                raise HTTPException(409, f"the original alert is {root.state}; it cannot be "
                                         "updated any more")
            references = [ref(c) for c in live(await chain_caps(ctx, root), time.time())]
        msg_type = "Update" if rec.kind == "update" else "Alert"
        cap, warnings = await _produce(ctx, rec, msg_type=msg_type, references=references)
    except BaseException:
        await ctx.workflow.update(rec_id, lambda r: _restore(r, before[0]))
        raise

    def done(r: AlertRecord) -> AlertRecord:
        r.state, r.cap, r.sent_at = "sent", cap, time.time()
        r.warnings = list(dict.fromkeys([*r.warnings, *warnings]))
        if r.kind == "alert":
            r.chain = [r.id]
        note(r, principal.user_id, "sent", f"{cap.msg_type} {cap.identifier}")
        return r

    rec = await ctx.workflow.update(rec_id, done)
    if rec.kind == "update":
        await ctx.workflow.update(root.id, lambda r: _chain(r, rec.id))
    return rec


def _restore(rec: AlertRecord, state: State) -> AlertRecord:
    rec.state = state
    return rec


def _chain(root: AlertRecord, rec_id: str) -> AlertRecord:
    if rec_id not in root.chain:
        root.chain.append(rec_id)
    return root


async def withdraw_or_cancel(ctx: ApiContext, rec: AlertRecord, principal: Principal, *,
                             correction: bool, text: str) -> AlertRecord:
    """Cancel (or correct) a thread; an unsent record is just withdrawn (no CAP)."""
    if rec.state in UNSENT and not correction:

        def withdraw(r: AlertRecord) -> AlertRecord:
            if r.state not in UNSENT:
                raise HTTPException(409, f"alert {r.id} is {r.state} now; reload and retry")
            r.state = "cancelled"
            note(r, principal.user_id, "withdrawn", text)
            return r

        return await ctx.workflow.update(rec.id, withdraw)
    root = await root_of(ctx, rec)
    allowed: tuple[State, ...] = ("sent", "cancelled") if correction else ("sent",)
    caps = live(await chain_caps(ctx, root), time.time())
    if root.state not in allowed or not root.chain:
        what = "corrected" if correction else "cancelled"
        raise HTTPException(409, f"alert {root.id} is {root.state}; it cannot be {what}")
    if not caps:
        raise HTTPException(409, f"alert {root.id} has expired: there is nothing left to "
                                 "cancel (the pipeline refuses references to expired alerts)")
    latest = await ctx.workflow.get(root.chain[-1]) or root
    draft = _followup_draft(latest.draft, correction=correction, text=text)
    kind = "correction" if correction else "cancel"
    follow = AlertRecord(id=new_id(), org=root.org, kind=kind, state="sending", draft=draft,
                         created_by=principal.user_id, created_at=time.time(),
                         parent=root.id, needs_approval=False)
    previous: list[State] = []

    def mark(r: AlertRecord) -> AlertRecord:
        if r.state not in allowed:
            raise HTTPException(409, f"alert {r.id} is {r.state} now; it cannot be {kind}ed")
        previous.append(r.state)
        r.state = "corrected" if correction else "cancelled"
        r.followups.append(follow.id)
        note(r, principal.user_id, kind, text)
        return r

    await ctx.workflow.update(root.id, mark)
    await ctx.workflow.create(follow)
    note_text = ("CORRECTION: the earlier alert was sent in error. " if correction
                 else "CANCELLED. ") + text
    try:
        cap, warnings = await _produce(ctx, follow, msg_type="Cancel",
                                       references=[ref(c) for c in caps], note_text=note_text)
    except BaseException:
        await ctx.workflow.update(root.id, lambda r: _undo_mark(r, previous[0], follow.id))
        await ctx.workflow.update(follow.id, lambda r: _restore(r, "failed"))
        raise

    def done(r: AlertRecord) -> AlertRecord:
        r.state, r.cap, r.sent_at, r.warnings = "sent", cap, time.time(), warnings
        note(r, principal.user_id, "sent", f"Cancel {cap.identifier}")
        return r

    return await ctx.workflow.update(follow.id, done)


def _undo_mark(root: AlertRecord, state: State, follow_id: str) -> AlertRecord:
    root.state = state
    root.followups = [f for f in root.followups if f != follow_id]
    return root


def _followup_draft(draft: DraftIn, *, correction: bool, text: str) -> DraftIn:
    """The text of a Cancel: the original's, or the correction message."""
    # A fresh expiry: the Cancel must outlive the moment it is sent, whatever the original's.
    fresh = {"expires": None, "expires_in_minutes": 60}
    if not correction:
        desc = text or "This alert has been cancelled."
        return draft.model_copy(update={"description": desc, "instruction": "", **fresh})
    # Only the main language: a translation of the *original* text would contradict the
    # correction, and a wrong text is worse than one in the main language.
    return draft.model_copy(update={
        "headline": "Correction: the earlier alert was sent in error",
        "description": text, "instruction": text, "translations": [], **fresh,
    })
