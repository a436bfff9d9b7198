"""The manager workflow's state in Redis: alert records and the CAP messages issued.

Keys (under ``tocsin:api:``):

- ``alert:<id>``        JSON :class:`~ops.api.models.AlertRecord`
- ``alerts``            sorted set of record ids by creation time (the history)
- ``cap-of:<cap key>``  the record id a CAP alert key was issued for
- ``cap:<cap key>``     the exact CAP XML produced to ``hazards.raw`` (served by the feed)
- ``issued``            sorted set of issued CAP keys by send time (the Atom feed)

Transitions are optimistic transactions (``WATCH`` the record, check, ``MULTI``/``SET``):
two approvers clicking at once cannot both move an alert to ``sending``, so an alert is
produced once. The check function may raise an ``HTTPException`` to refuse.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from fastapi import HTTPException
from redis.exceptions import WatchError

from ops.api.models import AlertRecord, HistoryItem

PREFIX = "tocsin:api:"


def _s(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def new_id() -> str:
    """A short random record id (also used in CAP identifiers: no spaces or commas)."""
    return secrets.token_hex(8)


def note(rec: AlertRecord, actor: str, action: str, detail: str = "") -> None:
    """Append a step to a record's own history (the audit log is the authoritative one)."""
    rec.history.append(HistoryItem(at=time.time(), actor=actor, action=action, detail=detail))


class WorkflowStore:
    """Alert records and issued CAP messages (see the module docstring)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def create(self, rec: AlertRecord) -> None:
        """Store a new record and add it to the history."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(f"{PREFIX}alert:{rec.id}", rec.model_dump_json())
            pipe.zadd(f"{PREFIX}alerts", {rec.id: rec.created_at})
            await pipe.execute()

    async def get(self, rec_id: str) -> AlertRecord | None:
        """A record by id, or None."""
        if not rec_id.isalnum() or len(rec_id) > 32:
            return None
        raw = await self.redis.get(f"{PREFIX}alert:{rec_id}")
        return AlertRecord.model_validate_json(raw) if raw else None

    async def update(self, rec_id: str,
                     change: Callable[[AlertRecord], AlertRecord]) -> AlertRecord:
        """Apply ``change`` atomically to a record (404 if missing); return the result."""
        key = f"{PREFIX}alert:{rec_id}"
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if not raw:
                        raise HTTPException(404, f"no alert {rec_id!r}")
                    rec = change(AlertRecord.model_validate_json(raw))
                    pipe.multi()
                    pipe.set(key, rec.model_dump_json())
                    await pipe.execute()
                    return rec
                except WatchError:
                    continue

    async def history(self, *, org: str = "", state: str = "", status: str = "",
                      since: float = 0.0, limit: int = 100) -> list[AlertRecord]:
        """Records newest first, filtered by organisation, state, CAP status, time."""
        out: list[AlertRecord] = []
        offset = 0
        while len(out) < limit:
            ids = await self.redis.zrevrangebyscore(f"{PREFIX}alerts", "+inf", since,
                                                    start=offset, num=200)
            if not ids:
                break
            offset += len(ids)
            for rid in ids:
                rec = await self.get(_s(rid))
                if rec is None or (org and rec.org != org):
                    continue
                if (state and rec.state != state) or (status and rec.draft.status != status):
                    continue
                out.append(rec)
                if len(out) >= limit:
                    break
        return out

    async def record_issue(self, cap_key: str, rec_id: str, payload: bytes) -> None:
        """Remember a CAP message we produced: its record and its exact XML."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(f"{PREFIX}cap-of:{cap_key}", rec_id)
            pipe.set(f"{PREFIX}cap:{cap_key}", payload)
            pipe.zadd(f"{PREFIX}issued", {cap_key: time.time()})
            await pipe.execute()

    async def cap_xml(self, cap_key: str) -> bytes | None:
        """The CAP XML issued under a key, or None."""
        if not cap_key.isalnum() or len(cap_key) > 64:
            return None
        raw = await self.redis.get(f"{PREFIX}cap:{cap_key}")
        return raw if isinstance(raw, bytes) else (raw.encode() if raw else None)

    async def issued(self, limit: int = 100) -> list[str]:
        """Issued CAP keys, newest first."""
        keys = await self.redis.zrevrange(f"{PREFIX}issued", 0, limit - 1)
        return [_s(k) for k in keys]
