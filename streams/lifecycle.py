"""CAP message lifecycle: Update and Cancel resolve their ``references``.

A CAP ``references`` entry is a ``sender,identifier,sent`` triple naming an earlier
message. An Update replaces the messages it references (it is delivered to its own
area); a Cancel withdraws them: what is still queued for them is not sent, and the
people already warned are told (see ``streams.pipeline.cancel_followups``).

The registry is the Redis ``AlertStore`` rather than a faust table: a faust table
recovers only up to the partition's reported high watermark, which the in-memory test
broker under-reports (see ``streams.shards``), and a registry that forgets an alert
would turn a legitimate Cancel into an "unknown reference".

A *thread* is every message linked to another by ``references``, transitively and in
either direction (an Alert, the Updates naming it, the Updates naming those...). The
stored alerts give the backward links; ``tocsin:referenced-by:<key>`` (a Redis set of
the keys of the messages that reference ``<key>``, written by :func:`record_references`
when a message is registered) gives the forward ones. The IPAWS profile needs the whole
thread (see ``streams.authority.check_ipaws_thread``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import datetime

from streams.records import Alert, alert_key
from streams.state import AlertStore

REFERENCED_BY = "tocsin:referenced-by:"
# A thread is a handful of messages; the bound keeps a hostile or looping chain cheap.
MAX_THREAD = 200


@dataclass(frozen=True)
class Reference:
    """One parsed ``references`` triple."""

    sender: str
    identifier: str
    sent: str

    @property
    def key(self) -> str:
        """The referenced alert's registry key."""
        return alert_key(self.sender, self.identifier)


def parse_references(alert: Alert) -> list[Reference]:
    """The alert's references as triples (the parser already validated their shape)."""
    out = []
    for item in alert.references:
        parts = item.split(",")
        if len(parts) == 3:
            out.append(Reference(parts[0].strip(), parts[1].strip(), parts[2].strip()))
    return out


def expired(alert: Alert, now: float) -> bool:
    """True when every info block has an ``expires`` in the past (no expires = open-ended)."""
    if not alert.infos:
        return False
    for info in alert.infos:
        if info.expires is None:
            return False
        try:
            if datetime.fromisoformat(info.expires).timestamp() > now:
                return False
        except ValueError:
            return False  # the parser validated it; be lenient rather than drop an alert
    return True


async def check_references(alert: Alert, store: AlertStore, now: float) -> tuple[str, str]:
    """For Update/Cancel: every reference must be a known, unexpired alert.

    Returns ``(reason, detail)`` for the DLQ, or ``("", "")`` when the lifecycle is sound.
    """
    if alert.msg_type not in ("Update", "Cancel"):
        return "", ""
    for ref in parse_references(alert):
        earlier = await store.get(ref.key)
        if earlier is None:
            return "unknown_reference", (
                f"{alert.msg_type} references {ref.identifier!r} of {ref.sender!r}, "
                "which this system has not received"
            )
        if expired(earlier, now):
            return "reference_expired", (
                f"{alert.msg_type} references {ref.identifier!r} of {ref.sender!r}, "
                "which has already expired"
            )
    return "", ""


async def record_references(alert: Alert, store: AlertStore) -> None:
    """Index a newly registered message under every message it references (forward links)."""
    refs = parse_references(alert)
    if not refs:
        return
    async with store.redis.pipeline(transaction=False) as pipe:
        for ref in refs:
            pipe.sadd(REFERENCED_BY + ref.key, alert.key)
            pipe.expire(REFERENCED_BY + ref.key, store.ttl_s)
        await pipe.execute()


async def thread_of(alert: Alert, store: AlertStore) -> dict[str, Alert]:
    """The registered messages of ``alert``'s thread, by key, ``alert`` itself excluded.

    Breadth-first from what ``alert`` references, following references backwards (the
    stored messages) and forwards (:data:`REFERENCED_BY`); at most :data:`MAX_THREAD`
    messages. Unknown references are skipped (:func:`check_references` reports them).
    """
    found: dict[str, Alert] = {}
    seen = {alert.key}
    queue = deque(ref.key for ref in parse_references(alert))
    while queue and len(found) < MAX_THREAD:
        key = queue.popleft()
        if key in seen:
            continue
        seen.add(key)
        message = await store.get(key)
        if message is None:
            continue
        found[key] = message
        queue.extend(ref.key for ref in parse_references(message))
        queue.extend(k.decode() if isinstance(k, bytes) else str(k)
                     for k in await store.redis.smembers(REFERENCED_BY + key))
    return found
