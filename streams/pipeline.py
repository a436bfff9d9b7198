"""The pipeline's stages as plain async functions, testable without Kafka.

The faust agents in ``streams.app`` are thin loops around these: each takes decoded
input and returns what to produce next. Nothing here raises on bad input; a bad input
becomes a ``DeadLetter`` with its reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from datetime import time as dt_time
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from geofencing.areas import geometry_to_wkb, resolve_alert_geometry, wkb_to_geometry
from geofencing.gazetteer import Gazetteer
from streams.authority import SenderRegistry, authorise, check_ipaws_thread
from streams.cap import CapError, CapLimits, parse_cap
from streams.hazard_json import parse_hazard_json
from streams.lifecycle import check_references, expired, parse_references, record_references
from streams.records import (
    CHANNELS,
    Alert,
    Channel,
    DeadLetter,
    DeliveryBatch,
    MatchRequest,
    Recipient,
    Subscription,
    severity_rank,
)
from streams.shards import ShardView
from streams.state import AlertStore, Registration

XML_TYPES = ("application/cap+xml", "application/xml", "text/xml")
JSON_TYPES = ("application/json", "application/geo+json")
# Statuses that ever reach citizens; System and Draft never do.
DELIVERABLE_STATUSES = ("Actual", "Exercise", "Test")


def detect_content_type(payload: bytes, declared: str = "") -> str:
    """``xml`` or ``json`` from the declared content type, else by sniffing the bytes."""
    declared = declared.split(";")[0].strip().lower()
    if declared in XML_TYPES or declared.endswith("+xml"):
        return "xml"
    if declared in JSON_TYPES or declared.endswith("+json"):
        return "json"
    head = payload[:64].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"<"):
        return "xml"
    if head.startswith((b"{", b"[")):
        return "json"
    return ""


@dataclass
class IngestOutcome:
    """What one raw hazard message became."""

    alerts: list[Alert] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    duplicates: int = 0


class Ingestor:
    """Parses, validates, resolves areas and registers hazard messages."""

    def __init__(
        self,
        gazetteer: Gazetteer,
        store: AlertStore,
        *,
        limits: CapLimits | None = None,
        senders: SenderRegistry | None = None,
        strict_schema: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.gazetteer = gazetteer
        self.store = store
        self.limits = limits or CapLimits()
        self.senders = senders or SenderRegistry()
        self.strict_schema = strict_schema
        self.clock = clock

    def _dead(
        self, reason: str, payload: bytes, ctype: str, source: str, detail: str
    ) -> DeadLetter:
        return DeadLetter(
            reason=reason,
            stage="ingest",
            payload=payload[:65536],  # enough to diagnose; a DLQ must not amplify floods
            content_type=ctype,
            source=source,
            detail=detail[:2000],
            rejected_at=self.clock(),
        )

    def parse(self, payload: bytes, ctype: str, source: str) -> list[Alert]:
        """Parse by content type; raises CapError with a reason code."""
        kind = detect_content_type(payload, ctype)
        if kind == "xml":
            return parse_cap(payload, limits=self.limits, source=source, strict=self.strict_schema)
        if kind == "json":
            return parse_hazard_json(payload, source=source)
        raise CapError("unknown_content_type", f"neither XML nor JSON (content-type {ctype!r})")

    async def ingest(
        self, payload: bytes, headers: Mapping[str, bytes], *, record_id: str = ""
    ) -> IngestOutcome:
        """One raw message from ``hazards.raw`` -> alerts to publish and dead letters.

        ``record_id`` names the raw record (``topic:partition:offset``): ingesting the
        same record again after a crash publishes its alerts again (see
        ``AlertStore.register``).
        """
        ctype = headers.get("content-type", b"").decode("latin-1")
        source = headers.get("source", b"").decode("latin-1")
        try:
            origin = float(headers.get("tocsin-produced-at", b"0"))
        except ValueError:
            origin = 0.0
        outcome = IngestOutcome()
        try:
            alerts = self.parse(payload, ctype, source)
        except CapError as exc:
            outcome.dead.append(self._dead(exc.reason, payload, ctype, source, str(exc)))
            return outcome
        now = self.clock()
        for alert in alerts:
            alert.received_at = now
            alert.origin_ts = origin or now
            reason, detail = self._route(alert, now)
            if not reason:
                reason, detail = self._authorise(alert, payload)
            if not reason:
                reason, detail = await check_references(alert, self.store, now)
            if not reason:
                reason, detail = await check_ipaws_thread(alert, self.senders, self.store, now)
            if not reason and alert.msg_type == "Cancel" and not alert.infos:
                await self._borrow_infos(alert)
            if reason:
                outcome.dead.append(self._dead(reason, payload, ctype, source, detail))
                continue
            registration = await self.store.register(alert, record_id=record_id)
            if registration is Registration.DUPLICATE:
                outcome.duplicates += 1
            elif registration is Registration.CONFLICT:
                detail = f"identifier {alert.identifier!r} of {alert.sender!r} reused with new sent"
                outcome.dead.append(self._dead("identifier_reused", payload, ctype, source, detail))
            else:
                await record_references(alert, self.store)  # the thread's forward links
                if alert.msg_type == "Cancel":
                    refs = [ref.key for ref in parse_references(alert)]
                    await self.store.mark_cancelled(refs, alert.key)
                outcome.alerts.append(alert)
        return outcome

    async def _borrow_infos(self, alert: Alert) -> None:
        """A Cancel often has no <info>: tell people what is cancelled with the original's."""
        for ref in parse_references(alert):
            earlier = await self.store.get(ref.key)
            if earlier is not None and earlier.infos:
                alert.infos = [msgspec.structs.replace(i, areas=[]) for i in earlier.infos]
                alert.warnings.append(f"no <info>: cancellation text taken from {ref.identifier}")
                return

    def _authorise(self, alert: Alert, payload: bytes) -> tuple[str, str]:
        """The sender may alert this area and event (and signed it, where required)."""
        geometry = wkb_to_geometry(alert.geometry_wkb) if alert.geometry_wkb else None
        problems = authorise(alert, geometry, self.senders, payload=payload)
        if not problems:
            return "", ""
        reason = problems[0].split(":", 1)[0]
        return reason, "; ".join(problems)

    def _route(self, alert: Alert, now: float) -> tuple[str, str]:
        """Resolve the alert's geometry in place; return a rejection (reason, detail) or empty."""
        if expired(alert, now):
            return "expired", f"alert {alert.identifier!r} expired before it was received"
        geometry, warnings = resolve_alert_geometry(alert, self.gazetteer)
        alert.warnings.extend(warnings)
        if geometry is not None:
            alert.geometry_wkb = geometry_to_wkb(geometry)
        elif alert.msg_type in ("Alert", "Update") and alert.infos:
            return "no_routable_area", "; ".join(warnings) or "no polygon, circle or known geocode"
        return "", ""


def scatter(alert: Alert, partitions: int, now: float) -> list[tuple[int, MatchRequest]]:
    """One match request per ``match.requests`` partition, or none if nothing to match."""
    if alert.geometry_wkb is None or alert.status not in DELIVERABLE_STATUSES:
        return []
    if alert.msg_type not in ("Alert", "Update"):
        return []  # Cancel/Ack/Error: lifecycle handling arrives with the CAP ingest issue
    request = MatchRequest(
        alert_key=alert.key,
        geometry_wkb=alert.geometry_wkb,
        severity=alert.max_severity,
        status=alert.status,
        produced_at=now,
        urgent=alert.urgent,
    )
    return [(p, request) for p in range(partitions)]


SEVERE = severity_rank("Severe")


def in_quiet_hours(quiet_hours: str, timezone: str, now: datetime) -> bool:
    """True when ``now`` falls in a "HH:MM-HH:MM" window of the citizen's local time.

    A window may wrap midnight ("22:00-07:00"). A malformed window or unknown time zone
    counts as no quiet hours: when in doubt, warn.
    """
    try:
        start_s, end_s = quiet_hours.split("-")
        start = dt_time.fromisoformat(start_s.strip())
        end = dt_time.fromisoformat(end_s.strip())
        local = now.astimezone(ZoneInfo(timezone or "UTC")).time()
    except (ValueError, ZoneInfoNotFoundError):
        return False
    if start <= end:
        return start <= local < end
    return local >= start or local < end


def _wants(sub: Subscription, severity: int, status: str, now: datetime) -> bool:
    if status != "Actual" and not sub.accept_tests:
        return False  # Test/Exercise alerts reach only citizens who opted in
    if severity < severity_rank(sub.min_severity):
        return False
    if sub.quiet_hours and severity < SEVERE:
        # The citizen asked for silence; Severe and Extreme alerts override it.
        return not in_quiet_hours(sub.quiet_hours, sub.timezone, now)
    return True


def match(
    request: MatchRequest, view: ShardView, *, batch_size: int, partition: int
) -> tuple[list[DeliveryBatch], dict[Channel, int], int]:
    """Match one request against one shard's view; return batches, counts per channel and
    the number of subscribers reached."""
    area = wkb_to_geometry(request.geometry_wkb)
    matched = view.match(area)
    severity = severity_rank(request.severity)
    wall_clock = datetime.now(UTC)
    per_channel: dict[Channel, list[Recipient]] = {c: [] for c in CHANNELS}
    subscribers = 0
    for sub in matched:
        if not _wants(sub, severity, request.status, wall_clock):
            continue
        subscribers += 1
        for channel in sub.channels:
            per_channel[channel].append(Recipient(sub.id, sub.language, sub.name, sub.timezone))
    batches = []
    now = time.time()
    for channel, recipients in per_channel.items():
        for start in range(0, len(recipients), batch_size):
            batches.append(
                DeliveryBatch(
                    alert_key=request.alert_key,
                    channel=channel,
                    recipients=recipients[start : start + batch_size],
                    partition=partition,
                    produced_at=now,
                    urgent=request.urgent,
                )
            )
    counts = {c: len(r) for c, r in per_channel.items() if r}
    return batches, counts, subscribers


async def cancel_followups(
    cancel: Alert, store: AlertStore, *, batch_size: int
) -> list[DeliveryBatch]:
    """Delivery batches telling everyone already warned by the cancelled alerts.

    The batches carry the Cancel's own key, so the sender's idempotency keys make each
    notice once per person and channel even when a sender also notices the cancellation
    right after sending (see ``streams.app``).
    """
    batches = []
    now = time.time()
    for ref in parse_references(cancel):
        for channel in CHANNELS:
            warned = await store.warned(ref.key, channel)
            recipients = [Recipient(sid, lang) for sid, lang in sorted(warned.items())]
            for start in range(0, len(recipients), batch_size):
                batches.append(
                    DeliveryBatch(
                        alert_key=cancel.key,
                        channel=channel,
                        recipients=recipients[start : start + batch_size],
                        produced_at=now,
                        urgent=True,  # a cancellation must outrun the alert it withdraws
                    )
                )
    return batches
