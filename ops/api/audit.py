"""The append-only audit log: who did what, for which organisation and alert, from where.

Every entry (:class:`streams.records.AuditEvent`) carries the SHA-256 of the entry
before it, so the log is a hash chain: editing, deleting or reordering any entry breaks
every later link, and truncating the tail is caught by the separately kept head. Entries
go to two places:

- the Redis stream ``tocsin:audit`` (``XADD``; field ``e`` = the entry's JSON), which the
  API reads and verifies, with ``tocsin:audit:head`` holding ``{seq, hash}`` of the last
  entry. Appends are optimistic transactions on the head (``WATCH``/``MULTI``), so
  concurrent API processes still produce one unbroken chain;
- the Kafka topic ``audit`` (one partition, ordered), an independent copy for archiving
  outside the reach of anyone who can write to Redis.

The HTTP surface is read-only on purpose: ``GET /audit`` and ``GET /audit/verify`` for
auditors and admins; there is no route that updates or deletes an entry, for anyone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel
from redis.exceptions import WatchError

from ops.api.auth import Principal, client_ip, require
from streams.records import AuditEvent, decoder, encode

if TYPE_CHECKING:
    from ops.api.context import ApiContext

log = logging.getLogger(__name__)

STREAM = "tocsin:audit"
HEAD = "tocsin:audit:head"
_event = decoder(AuditEvent)


def entry_hash(event: AuditEvent) -> str:
    """SHA-256 (hex) of an entry encoded with an empty ``hash`` field."""
    return hashlib.sha256(encode(msgspec.structs.replace(event, hash=""))).hexdigest()


class VerifyReport(BaseModel):
    """The outcome of walking the chain."""

    ok: bool
    entries: int
    head_seq: int
    problems: list[str]


def _s(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _payload(fields: Any) -> bytes:
    raw = (fields.get(b"e") or fields.get("e") or b"") if fields else b""
    return raw if isinstance(raw, bytes) else str(raw).encode()


def _head(raw: Any) -> tuple[int, str]:
    """(seq, hash) of the stored head; (0, "") before the first entry."""
    if not raw:
        return 0, ""
    head = json.loads(raw)
    return int(head["seq"]), str(head["hash"])


class AuditLog:
    """Appends to and verifies the hash-chained audit log (see the module docstring)."""

    def __init__(self, redis: aioredis.Redis,
                 publish: Callable[[bytes, bytes], Awaitable[None]] | None = None) -> None:
        self.redis = redis
        self.publish = publish

    async def append(self, *, actor: str, roles: list[str] | frozenset[str], org: str,
                     action: str, alert: str = "", ip: str = "", outcome: str = "ok",
                     detail: str = "") -> AuditEvent:
        """Append one entry to the chain (and the ``audit`` topic); return it."""
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(HEAD)
                    seq, prev = _head(await pipe.get(HEAD))
                    event = AuditEvent(
                        seq=seq + 1, at=time.time(), actor=actor,
                        roles=sorted(roles), org=org, action=action, alert=alert, ip=ip,
                        outcome=outcome, detail=detail[:1000], prev=prev,
                    )
                    event.hash = entry_hash(event)
                    pipe.multi()
                    pipe.xadd(STREAM, {"e": encode(event)})
                    pipe.set(HEAD, json.dumps({"seq": event.seq, "hash": event.hash}))
                    await pipe.execute()
                    break
                except WatchError:
                    continue  # another process appended first: chain onto its entry
        if self.publish is not None:
            try:
                await self.publish(org.encode(), encode(event))
            except Exception:  # the Redis chain is the record of truth; the copy can lag
                log.exception("audit entry %s not copied to Kafka", event.seq)
        return event

    async def entries(self, *, after: str = "-", limit: int = 100, action: str = "",
                      org: str = "", alert: str = "") -> list[tuple[str, AuditEvent]]:
        """Entries in order (stream ids after ``after``), filtered, at most ``limit``."""
        out: list[tuple[str, AuditEvent]] = []
        start = after if after == "-" else f"({after}"
        while len(out) < limit:
            page = await self.redis.xrange(STREAM, min=start, max="+", count=500)
            if not page:
                break
            for sid, fields in page:
                event = _event.decode(_payload(fields))
                if action and not event.action.startswith(action):
                    continue
                if (org and event.org != org) or (alert and event.alert != alert):
                    continue
                out.append((_s(sid), event))
                if len(out) >= limit:
                    break
            start = f"({_s(page[-1][0])}"
        return out

    async def verify(self) -> VerifyReport:
        """Walk the whole chain; report every broken link, bad hash or gap."""
        problems: list[str] = []
        prev_hash, prev_seq, count = "", 0, 0
        start = "-"
        while True:
            page = await self.redis.xrange(STREAM, min=start, max="+", count=1000)
            if not page:
                break
            for sid, fields in page:
                count += 1
                try:
                    event = _event.decode(_payload(fields))
                except (msgspec.DecodeError, msgspec.ValidationError):
                    problems.append(f"entry {_s(sid)} is not a valid audit event")
                    continue
                if event.seq != prev_seq + 1:
                    problems.append(f"entry {_s(sid)}: sequence jumps from {prev_seq} to "
                                    f"{event.seq} (entries removed or reordered)")
                if event.prev != prev_hash:
                    problems.append(f"entry {_s(sid)} (seq {event.seq}): prev does not match "
                                    "the previous entry's hash")
                if entry_hash(event) != event.hash:
                    problems.append(f"entry {_s(sid)} (seq {event.seq}): content does not "
                                    "match its hash (entry altered)")
                prev_hash, prev_seq = event.hash, event.seq
            start = f"({_s(page[-1][0])}"
        head_seq, head_hash = _head(await self.redis.get(HEAD))
        if head_seq != prev_seq or head_hash != prev_hash:
            problems.append(f"the chain ends at seq {prev_seq} but the head says "
                            f"{head_seq} (entries removed at the end)")
        return VerifyReport(ok=not problems, entries=count, head_seq=head_seq,
                            problems=problems[:100])


async def record(request: Request, principal: Principal | None, action: str, *,
                 alert: str = "", outcome: str = "ok", detail: str = "",
                 actor: str = "", org: str = "") -> None:
    """Audit one action of the current request (actor, roles, org and client IP)."""
    ctx: ApiContext = request.app.state.ctx
    ip = client_ip(request, ctx.settings.api_trust_forwarded_for)
    await ctx.audit.append(
        actor=actor or (principal.user_id if principal else "anonymous"),
        roles=principal.roles if principal else [],
        org=org or (principal.org if principal else ""),
        action=action, alert=alert, ip=ip, outcome=outcome, detail=detail,
    )


router = APIRouter(prefix="/audit", tags=["audit"])


class AuditEntry(BaseModel):
    """One audit entry as served (stream id plus the event)."""

    id: str
    event: dict[str, Any]


@router.get("", response_model=list[AuditEntry])
async def list_entries(
    request: Request,
    after: str = Query("-", pattern=r"^(-|\d+-\d+)$", description="stream id to start after"),
    limit: int = Query(100, ge=1, le=1000),
    action: str = Query("", max_length=64),
    org: str = Query("", max_length=64),
    alert: str = Query("", max_length=64),
    principal: Principal = Depends(require("auditor", "admin")),
) -> list[AuditEntry]:
    """Audit entries in order; auditors and admins only. There is no way to change them."""
    ctx: ApiContext = request.app.state.ctx
    found = await ctx.audit.entries(after=after, limit=limit, action=action, org=org,
                                    alert=alert)
    await record(request, principal, "audit.read", detail=f"{len(found)} entries")
    return [AuditEntry(id=sid, event=msgspec.to_builtins(ev)) for sid, ev in found]


@router.get("/verify", response_model=VerifyReport)
async def verify_chain(request: Request,
                       principal: Principal = Depends(require("auditor", "admin"))
                       ) -> VerifyReport:
    """Recompute the hash chain and report whether the log was tampered with."""
    ctx: ApiContext = request.app.state.ctx
    report = await ctx.audit.verify()
    await record(request, principal, "audit.verify", outcome="ok" if report.ok else "failed",
                 detail=f"{report.entries} entries")
    return report
