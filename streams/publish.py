"""Producing to the pipeline's input topics: hazard messages and subscriptions.

Used by ``tocsin publish``, ``tocsin subscribers load``, the dev stack and the tests.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

from aiokafka import AIOKafkaProducer

from streams.records import Subscription, encode
from streams.topics import H_CONTENT_TYPE, H_PRODUCED_AT, H_SOURCE

_CAP_TIMES = re.compile(
    rb"<((?:[A-Za-z_][\w.-]*:)?(?:sent|effective|onset|expires))>\s*([^<\s]+)\s*</\1>"
)


def content_type_for(path: Path, payload: bytes) -> str:
    """The content type to declare for a hazard file, by extension then by sniffing."""
    suffix = path.suffix.lower()
    if suffix in (".xml", ".cap"):
        return "application/cap+xml"
    if suffix == ".geojson":
        return "application/geo+json"
    if suffix == ".json":
        return "application/json"
    head = payload.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    return "application/cap+xml" if head == b"<" else "application/json"


def rebase_cap_times(payload: bytes, now: datetime) -> bytes:
    """Shift every CAP timestamp so ``sent`` becomes ``now`` (exercise replays of real alerts).

    Durations between sent, effective, onset and expires are kept, so a replayed
    historical alert is live for as long as the original was. Timestamps that do not
    parse are left as they are (ingest then reports them).
    """
    match = re.search(rb"<(?:[A-Za-z_][\w.-]*:)?sent>\s*([^<\s]+)\s*<", payload)
    if match is None:
        return payload
    try:
        delta = now - datetime.fromisoformat(match.group(1).decode())
    except (ValueError, TypeError):
        return payload

    def shift(m: re.Match[bytes]) -> bytes:
        try:
            shifted = datetime.fromisoformat(m.group(2).decode()) + delta
        except (ValueError, TypeError):
            return m.group(0)
        stamp = shifted.isoformat(timespec="seconds").encode()
        return b"<%s>%s</%s>" % (m.group(1), stamp, m.group(1))

    return _CAP_TIMES.sub(shift, payload)


async def produce(
    bootstrap: str,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes | None, Sequence[tuple[str, bytes]]]],
) -> int:
    """Produce (key, value, headers) records and wait until all are acknowledged."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    await producer.start()
    count = 0
    try:
        futures = []
        for key, value, headers in records:
            futures.append(await producer.send(topic, value=value, key=key, headers=list(headers)))
            count += 1
        for fut in futures:
            await fut
    finally:
        await producer.stop()
    return count


def hazard_record(
    payload: bytes, content_type: str, source: str, produced_at: float
) -> tuple[None, bytes, list[tuple[str, bytes]]]:
    """A ``hazards.raw`` record: the bytes as sent, with content type and source headers."""
    headers = [
        (H_CONTENT_TYPE, content_type.encode()),
        (H_SOURCE, source.encode()),
        (H_PRODUCED_AT, repr(produced_at).encode()),
    ]
    return None, payload, headers


def subscription_records(
    subs: Iterable[Subscription],
) -> Iterable[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    """``subscriptions`` records keyed by subscriber id (the compaction key)."""
    for sub in subs:
        yield sub.id.encode(), encode(sub), []


def tombstones(ids: Iterable[str]) -> Iterable[tuple[bytes, None, list[tuple[str, bytes]]]]:
    """Tombstones that erase subscriptions from the compacted topic."""
    for sub_id in ids:
        yield sub_id.encode(), None, []
