"""Typed, versioned records that travel on Tocsin's Kafka topics.

Every record is a ``msgspec.Struct`` encoded as JSON. Each carries ``v`` (its schema
version) so a consumer can refuse, with a DLQ reason, a record it does not understand.
This module imports neither faust nor any I/O library, so geofencing/, channels/ and
templates/ may use the records without pulling Kafka in.

Privacy: contact details (push tokens, phone numbers, email addresses) appear in *no*
record here. They live in the contact store (``channels.contacts``) and the sender
resolves them at send time.
"""

from __future__ import annotations

import hashlib
from typing import Literal, TypeVar

import msgspec

SCHEMA_VERSION = 1

Channel = Literal["push", "sms", "email"]
CHANNELS: tuple[Channel, ...] = ("push", "sms", "email")

# CAP 1.2 enumerations, ordered from least to most severe where order matters.
SEVERITIES = ("Unknown", "Minor", "Moderate", "Severe", "Extreme")
URGENCIES = ("Unknown", "Past", "Future", "Expected", "Immediate")
CERTAINTIES = ("Unknown", "Unlikely", "Possible", "Likely", "Observed")
STATUSES = ("Actual", "Exercise", "System", "Test", "Draft")
MSG_TYPES = ("Alert", "Update", "Cancel", "Ack", "Error")
SCOPES = ("Public", "Restricted", "Private")


def severity_rank(severity: str) -> int:
    """Rank of a CAP severity; unknown strings rank as ``Unknown`` (0)."""
    try:
        return SEVERITIES.index(severity)
    except ValueError:
        return 0


def alert_key(sender: str, identifier: str) -> str:
    """Stable short key for a CAP alert: CAP identifies an alert by sender + identifier."""
    return hashlib.sha1(f"{sender}\x1f{identifier}".encode()).hexdigest()[:20]


class Geocode(msgspec.Struct, frozen=True):
    """A CAP ``<geocode>``: ``value_name`` such as SAME, FIPS6, UGC, EMMA_ID."""

    value_name: str
    value: str


class Circle(msgspec.Struct, frozen=True):
    """A CAP ``<circle>``: centre in WGS84 and radius in kilometres."""

    lon: float
    lat: float
    radius_km: float


class Area(msgspec.Struct):
    """A CAP ``<area>``. Polygons are rings of ``(lon, lat)`` pairs (GeoJSON order)."""

    desc: str = ""
    polygons: list[list[tuple[float, float]]] = msgspec.field(default_factory=list)
    circles: list[Circle] = msgspec.field(default_factory=list)
    geocodes: list[Geocode] = msgspec.field(default_factory=list)


class Info(msgspec.Struct):
    """A CAP ``<info>`` block: one per language."""

    language: str = "en-US"
    categories: list[str] = msgspec.field(default_factory=list)
    event: str = ""
    urgency: str = "Unknown"
    severity: str = "Unknown"
    certainty: str = "Unknown"
    sender_name: str = ""
    headline: str = ""
    description: str = ""
    instruction: str = ""
    web: str = ""
    effective: str | None = None
    onset: str | None = None
    expires: str | None = None
    areas: list[Area] = msgspec.field(default_factory=list)
    # Added for the CAP ingest issue (at the end so positional callers keep working):
    # ``<eventCode>`` pairs (e.g. SAME "TOR") and ``<parameter>`` pairs, names as sent.
    event_codes: list[Geocode] = msgspec.field(default_factory=list)
    parameters: list[Geocode] = msgspec.field(default_factory=list)


class Alert(msgspec.Struct):
    """The normalised CAP 1.2 alert that ingest publishes on ``alerts``.

    ``geometry_wkb`` is the union of every routable area of every info block, resolved
    to one WGS84 geometry (polygons, geodesic circle buffers, gazetteer geocodes).
    ``None`` means nothing was routable.
    """

    identifier: str
    sender: str
    sent: str
    status: str
    msg_type: str
    scope: str
    v: int = SCHEMA_VERSION
    source: str = ""
    cap_version: str = "1.2"
    references: list[str] = msgspec.field(default_factory=list)
    note: str = ""
    infos: list[Info] = msgspec.field(default_factory=list)
    geometry_wkb: bytes | None = None
    warnings: list[str] = msgspec.field(default_factory=list)
    received_at: float = 0.0
    origin_ts: float = 0.0  # when the message reached hazards.raw (end-to-end latency)
    # ``<code>`` values (special handling profiles such as "IPAWSv1.0"); added last.
    codes: list[str] = msgspec.field(default_factory=list)

    @property
    def key(self) -> str:
        """Stable alert key (sender + identifier)."""
        return alert_key(self.sender, self.identifier)

    @property
    def urgent(self) -> bool:
        """Extreme severity or Immediate urgency in any info block: the priority lane."""
        return any(i.severity == "Extreme" or i.urgency == "Immediate" for i in self.infos)

    @property
    def max_severity(self) -> str:
        """The highest severity across info blocks (CAP allows one per language)."""
        if not self.infos:
            return "Unknown"
        return max((i.severity for i in self.infos), key=severity_rank)


class Subscription(msgspec.Struct):
    """A citizen's subscription as carried on the compacted ``subscriptions`` topic.

    ``kind`` is ``place`` (``lon``/``lat`` with ``radius_m``) or ``zone`` (either a
    gazetteer ``zone`` code such as ``FIPS:06075`` or a custom GeoJSON ``geometry``).
    ``channels`` names the channels the citizen wants; the addresses for those channels
    are in the contact store, never here. A tombstone (null value) erases it.
    """

    id: str
    kind: Literal["place", "zone"]
    v: int = SCHEMA_VERSION
    lon: float | None = None
    lat: float | None = None
    radius_m: float = 0.0
    zone: str | None = None
    geometry: dict[str, object] | None = None
    channels: list[Channel] = msgspec.field(default_factory=list)
    language: str = "en"
    min_severity: str = "Unknown"
    accept_tests: bool = False
    quiet_hours: str = ""  # "22:00-07:00" in ``timezone``; Severe/Extreme still get through
    timezone: str = "UTC"
    # The citizen's own label for this place or zone ("Home"), shown in the warning
    # ("Affects your place: Home"). A label, not a contact detail; added last.
    name: str = ""


class MatchRequest(msgspec.Struct):
    """Scatter record: one copy per ``match.requests`` partition for every alert."""

    alert_key: str
    geometry_wkb: bytes
    severity: str
    status: str
    v: int = SCHEMA_VERSION
    produced_at: float = 0.0
    urgent: bool = False  # Extreme severity or Immediate urgency: the priority lane


class Recipient(msgspec.Struct, array_like=True):
    """A matched subscriber on one channel; no contact details.

    ``place`` (the subscription's ``name``) and ``timezone`` are rendering inputs: the
    warning names the matched place and shows the expiry in the citizen's local time.
    They travel only on ``deliveries.*`` (never on hazard or match topics); "" means
    unknown (records from before they were added decode with the defaults, and older
    readers ignore the extra trailing array items).
    """

    subscriber_id: str
    language: str
    place: str = ""
    timezone: str = ""


class DeliveryBatch(msgspec.Struct):
    """Work for the sender: subscribers to warn about one alert on one channel."""

    alert_key: str
    channel: Channel
    recipients: list[Recipient]
    v: int = SCHEMA_VERSION
    partition: int = 0
    produced_at: float = 0.0
    urgent: bool = False


DeliveryStatus = Literal["sent", "failed", "duplicate", "no_contact", "cancelled", "expired"]


class RecipientResult(msgspec.Struct, array_like=True):
    """Outcome for one recipient; ``error`` is a reason, never a contact detail."""

    subscriber_id: str
    status: DeliveryStatus
    error: str = ""


class Receipt(msgspec.Struct):
    """What the sender did for one delivery batch; feeds the per-alert counters."""

    alert_key: str
    channel: Channel
    provider: str
    results: list[RecipientResult]
    v: int = SCHEMA_VERSION
    sent_at: float = 0.0


class DeadLetter(msgspec.Struct):
    """A rejected input on ``hazards.dlq`` with the reason it was rejected."""

    reason: str
    stage: str
    payload: bytes
    v: int = SCHEMA_VERSION
    content_type: str = ""
    source: str = ""
    detail: str = ""
    rejected_at: float = 0.0


_encoder = msgspec.json.Encoder()


def encode(record: msgspec.Struct) -> bytes:
    """Encode a record as JSON bytes for a Kafka value."""
    return _encoder.encode(record)


T = TypeVar("T")


def decoder(cls: type[T]) -> msgspec.json.Decoder[T]:
    """A reusable strict JSON decoder for one record type."""
    return msgspec.json.Decoder(cls)


# -- HTTP API (issue 6) -------------------------------------------------------------------
class AuditEvent(msgspec.Struct):
    """One entry of the API's append-only audit log (Redis stream and ``audit`` topic).

    ``prev`` is the ``hash`` of the entry before it (``""`` for the first) and ``hash``
    the SHA-256 of this entry encoded with ``hash=""``: changing, removing or reordering
    any entry breaks every later link. ``alert`` is a draft id or CAP alert key; ``ip``
    is the client address. Never a citizen's contact detail or place.
    """

    seq: int
    at: float
    actor: str
    roles: list[str]
    org: str
    action: str
    v: int = SCHEMA_VERSION
    alert: str = ""
    ip: str = ""
    outcome: str = "ok"  # ok | denied | failed
    detail: str = ""
    prev: str = ""
    hash: str = ""
