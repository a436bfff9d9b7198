"""Sender registry: who may alert where, about what, and how (signature, IPAWS profile).

The registry is a YAML or JSON file::

    policy: open            # open: unknown senders pass with a warning; strict: rejected
    tolerance_m: 2000       # how far an alert area may stray outside a jurisdiction
    senders:
      - sender: w-nws.webmaster@noaa.gov      # the CAP <sender>, case-insensitive
        name: NWS
        jurisdiction:
          codes: ["SAME:006000", "UGC:ORZ006"]  # gazetteer codes, and/or
          geometry: {"type": "Polygon", ...}   # a GeoJSON geometry (lon/lat)
        event_codes: [TOR, SVR]                # allowed SAME event codes (empty: any)
        events: ["Flood Watch"]                # allowed <event> names (empty: any)
        require_signature: true
        certificate: certs/nws.pem             # relative to the registry file
        legacy_signature: false                # allow SHA-1 / NAAD-style signatures
        ipaws_profile: true                    # IPAWS-OPEN CAP profile checks (below)

The IPAWS profile: ``<code>IPAWSv1.0</code>``, ``expires`` and one SAME event code
(:func:`ipaws_problems`, part of :func:`authorise`), and an Update or Cancel must
reference every unexpired message of its thread (:func:`check_ipaws_thread`, which needs
the alert registry and so runs in the pipeline after the lifecycle check).

:func:`authorise` returns the problems of one parsed alert as ``"reason: detail"``
strings (the part before the first colon is the DLQ reason code); an empty list means
authorised. ``open`` mode is the default for the demo: an unregistered sender is
accepted and a warning is appended to ``alert.warnings``.

Jurisdiction rule: the alert's resolved geometry must be covered by the jurisdiction
grown by ``tolerance_m`` metres. Agencies draw warning polygons by hand along borders
and the county layer is generalised (1:20M), so an exact containment test would reject
legitimate alerts for a few hundred metres; two kilometres is far below any real
cross-border mistake. The test runs in an azimuthal-equidistant frame centred on the
jurisdiction (:class:`geofencing.geodesy.LocalFrame`), so metres mean metres anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import msgspec
import shapely
import yaml
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from geofencing.areas import GeocodeLookup
from geofencing.geodesy import LocalFrame, polygonal
from streams.lifecycle import expired, parse_references, thread_of
from streams.records import Alert
from streams.signature import SignatureError, load_certificate, verify_signature
from streams.state import AlertStore

Policy = Literal["open", "strict"]
IPAWS_CODE = "IPAWSv1.0"
DEFAULT_TOLERANCE_M = 2_000.0


class RegistryError(ValueError):
    """The registry file is malformed or names something that does not exist."""


@dataclass(frozen=True)
class Jurisdiction:
    """Where a sender may alert: gazetteer codes (``"SAME:006000"``) and/or a geometry."""

    codes: tuple[str, ...] = ()
    geometry: dict[str, Any] | None = None


@dataclass(frozen=True)
class Sender:
    """One registered alerting authority."""

    sender: str
    name: str = ""
    jurisdiction: Jurisdiction | None = None
    event_codes: tuple[str, ...] = ()
    events: tuple[str, ...] = ()
    require_signature: bool = False
    certificate: Path | None = None
    legacy_signature: bool = False
    ipaws_profile: bool = False


@dataclass(frozen=True)
class _Area:
    """A jurisdiction prepared for coverage tests: its frame and grown projected shape."""

    frame: LocalFrame
    grown: BaseGeometry


@dataclass
class SenderRegistry:
    """Registered senders, looked up by CAP ``<sender>`` (case-insensitive).

    ``gazetteer`` resolves jurisdiction codes; it is needed only when a sender lists
    codes. Geometries and certificates are prepared once per sender, on first use.
    """

    senders: list[Sender] = field(default_factory=list)
    policy: Policy = "open"
    tolerance_m: float = DEFAULT_TOLERANCE_M
    gazetteer: GeocodeLookup | None = None

    def __post_init__(self) -> None:
        self._by_sender = {s.sender.casefold(): s for s in self.senders}
        if len(self._by_sender) != len(self.senders):
            raise RegistryError("a sender is registered twice")
        self._areas: dict[str, _Area | None] = {}
        self._certs: dict[str, Any] = {}

    def get(self, sender: str) -> Sender | None:
        """The registration of a CAP ``<sender>``, or None."""
        return self._by_sender.get(sender.casefold())

    @classmethod
    def load(cls, path: str | Path, gazetteer: GeocodeLookup | None = None) -> SenderRegistry:
        """Read a YAML (``.yaml``/``.yml``) or JSON registry file and check it eagerly.

        Raises :class:`RegistryError` naming the problem (unknown key, unknown code,
        unreadable certificate, invalid geometry).
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            doc = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
            spec = msgspec.convert(doc, _RegistryFile, strict=True)
        except (OSError, ValueError, yaml.YAMLError, msgspec.ValidationError) as exc:
            raise RegistryError(f"{path}: {exc}") from exc
        senders = [s.to_sender(path.parent) for s in spec.senders]
        registry = cls(senders, spec.policy, spec.tolerance_m, gazetteer)
        for sender in senders:  # fail at start-up, not on the first alert of a sender
            registry.area_of(sender)
            registry.certificate_of(sender)
        return registry

    def area_of(self, sender: Sender) -> _Area | None:
        """The prepared jurisdiction of a sender (None: no jurisdiction = anywhere)."""
        key = sender.sender.casefold()
        if key not in self._areas:
            self._areas[key] = self._prepare(sender)
        return self._areas[key]

    def certificate_of(self, sender: Sender) -> Any:
        """The sender's parsed certificate (None if it has none)."""
        key = sender.sender.casefold()
        if key not in self._certs:
            cert = None
            if sender.certificate is not None:
                try:
                    cert = load_certificate(sender.certificate.read_bytes())
                except (OSError, SignatureError) as exc:
                    raise RegistryError(f"{sender.sender}: certificate {sender.certificate}: "
                                        f"{exc}") from exc
            elif sender.require_signature:
                raise RegistryError(f"{sender.sender}: require_signature needs a certificate")
            self._certs[key] = cert
        return self._certs[key]

    def _prepare(self, sender: Sender) -> _Area | None:
        j = sender.jurisdiction
        if j is None or (not j.codes and j.geometry is None):
            return None
        parts: list[BaseGeometry] = []
        if j.geometry is not None:
            try:
                geom = polygonal(shapely.make_valid(shape(j.geometry)))
            except (ValueError, TypeError, AttributeError, KeyError) as exc:
                raise RegistryError(f"{sender.sender}: bad jurisdiction geometry: {exc}") from exc
            if geom is None:
                raise RegistryError(f"{sender.sender}: jurisdiction geometry has no area")
            parts.append(geom)
        for code in j.codes:
            scheme, sep, value = code.partition(":")
            found = self.gazetteer.lookup(scheme, value) if sep and self.gazetteer else None
            if found is None:
                raise RegistryError(f"{sender.sender}: jurisdiction code {code!r} is unknown "
                                    "(or no gazetteer was given)")
            parts.append(found)
        union = shapely.union_all(parts)
        frame = LocalFrame.for_geometry(union)
        return _Area(frame, frame.project(union).buffer(self.tolerance_m))


class _SenderSpec(msgspec.Struct, forbid_unknown_fields=True):
    sender: str
    name: str = ""
    jurisdiction: dict[str, Any] | None = None
    event_codes: list[str] = []
    events: list[str] = []
    require_signature: bool = False
    certificate: str | None = None
    legacy_signature: bool = False
    ipaws_profile: bool = False

    def to_sender(self, base: Path) -> Sender:
        j = None
        if self.jurisdiction is not None:
            unknown = set(self.jurisdiction) - {"codes", "geometry"}
            if unknown:
                raise RegistryError(f"{self.sender}: unknown jurisdiction keys {sorted(unknown)}")
            j = Jurisdiction(tuple(self.jurisdiction.get("codes") or ()),
                             self.jurisdiction.get("geometry"))
        cert = base / self.certificate if self.certificate else None
        return Sender(self.sender, self.name, j, tuple(c.upper() for c in self.event_codes),
                      tuple(self.events), self.require_signature, cert, self.legacy_signature,
                      self.ipaws_profile)


class _RegistryFile(msgspec.Struct, forbid_unknown_fields=True):
    senders: list[_SenderSpec] = []
    policy: Literal["open", "strict"] = "open"
    tolerance_m: float = DEFAULT_TOLERANCE_M


# ------------------------------------------------------------------------- the checks
def authorise(alert: Alert, geometry: BaseGeometry | None, registry: SenderRegistry, *,
              payload: bytes | None = None) -> list[str]:
    """Problems that forbid publishing ``alert`` for its sender (``[]``: authorised).

    ``geometry`` is the alert's resolved WGS84 geometry (None when nothing resolved, e.g.
    a Cancel without areas: no jurisdiction test then). ``payload`` is the raw CAP bytes,
    needed when the sender requires a signature. Reason codes: ``unknown_sender``,
    ``outside_jurisdiction``, ``event_not_allowed``, ``signature_required`` /
    ``unsigned`` / ``bad_signature`` / ``signature_scope``, ``ipaws_profile``.
    """
    sender = registry.get(alert.sender)
    if sender is None:
        if registry.policy == "strict":
            return [f"unknown_sender: {alert.sender!r} is not a registered sender"]
        alert.warnings.append(f"sender {alert.sender!r} is not registered (open mode)")
        return []
    problems = []
    problems += _signature(sender, registry, payload)
    problems += _jurisdiction(sender, registry, geometry)
    problems += _events(sender, alert)
    if sender.ipaws_profile:
        problems += [f"ipaws_profile: {p}" for p in ipaws_problems(alert)]
    return problems


def _signature(sender: Sender, registry: SenderRegistry, payload: bytes | None) -> list[str]:
    if not sender.require_signature:
        return []
    if payload is None:
        return ["signature_required: the raw message is needed to verify its signature"]
    try:
        verify_signature(payload, registry.certificate_of(sender), legacy=sender.legacy_signature)
    except SignatureError as exc:
        return [f"{exc.reason}: {exc}"]
    return []


def _jurisdiction(sender: Sender, registry: SenderRegistry,
                  geometry: BaseGeometry | None) -> list[str]:
    area = registry.area_of(sender)
    if area is None or geometry is None:
        return []
    projected = area.frame.project(geometry)
    if area.grown.covers(projected):
        return []
    outside = projected.difference(area.grown).area
    share = outside / projected.area if projected.area > 0 else 1.0
    return [f"outside_jurisdiction: {share:.0%} of the alert area ({outside / 1e6:.1f} km2) is "
            f"more than {registry.tolerance_m:g} m outside the jurisdiction of {sender.sender!r}"]


def _same_codes(codes: Iterable[Any]) -> list[str]:
    return [c.value.strip().upper() for c in codes if c.value_name.strip().upper() == "SAME"]


def _events(sender: Sender, alert: Alert) -> list[str]:
    if not sender.event_codes and not sender.events:
        return []
    allowed_events = {e.casefold() for e in sender.events}
    problems = []
    for n, info in enumerate(alert.infos, 1):
        same = _same_codes(info.event_codes)
        if any(c in sender.event_codes for c in same) or info.event.casefold() in allowed_events:
            continue
        what = f"SAME event code(s) {same}" if same else "no SAME event code"
        problems.append(f"event_not_allowed: info {n} ({info.event!r}, {what}) is not among the "
                        f"events {sender.sender!r} may alert")
    return problems


def ipaws_problems(alert: Alert) -> list[str]:
    """IPAWS-OPEN CAP profile v1.0 checks that need only the message itself.

    ``<code>IPAWSv1.0</code>``; every ``<info>`` has ``<expires>`` and exactly one SAME
    ``<eventCode>``. (Whether ``references`` name every related unexpired message
    needs the alert registry: :func:`check_ipaws_thread`, run by the pipeline.)
    """
    problems = []
    if IPAWS_CODE not in alert.codes:
        problems.append(f"<code>{IPAWS_CODE}</code> is missing (codes: {alert.codes})")
    for n, info in enumerate(alert.infos, 1):
        if info.expires is None:
            problems.append(f"info {n} has no <expires>")
        same = _same_codes(info.event_codes)
        if len(same) != 1:
            problems.append(f"info {n} has {len(same)} SAME event codes, exactly one required")
    return problems


def _sent_ts(message: Alert) -> float:
    return datetime.fromisoformat(message.sent).timestamp()  # validated by the parser


def missing_from_thread(alert: Alert, thread: Mapping[str, Alert], now: float) -> list[Alert]:
    """Messages of ``alert``'s thread that its ``references`` should name but do not.

    ``thread`` is the other registered messages of the thread, by key (see
    :func:`streams.lifecycle.thread_of`). Those still unexpired at ``now`` and sent no
    later than ``alert`` (a sender cannot name what it had not sent yet) must be
    referenced; they are returned oldest first. References match on sender+identifier.
    """
    named = {ref.key for ref in parse_references(alert)}
    sent = _sent_ts(alert)
    missing = [m for key, m in thread.items()
               if key not in named and not expired(m, now) and _sent_ts(m) <= sent]
    return sorted(missing, key=lambda m: (_sent_ts(m), m.identifier))


async def check_ipaws_thread(alert: Alert, registry: SenderRegistry, store: AlertStore,
                             now: float) -> tuple[str, str]:
    """IPAWS profile: an Update or Cancel references every unexpired message of its thread.

    Applies to senders registered with ``ipaws_profile``. Returns ``("ipaws_profile",
    detail)`` naming each missing message as a ``sender,identifier,sent`` triple, or
    ``("", "")``. A message already registered is left to the registry (a republished
    message is a duplicate, whatever was added to its thread since).
    """
    sender = registry.get(alert.sender)
    if sender is None or not sender.ipaws_profile or alert.msg_type not in ("Update", "Cancel"):
        return "", ""
    if await store.get(alert.key) is not None:
        return "", ""
    missing = missing_from_thread(alert, await thread_of(alert, store), now)
    if not missing:
        return "", ""
    triples = " ".join(f"{m.sender},{m.identifier},{m.sent}" for m in missing)
    return "ipaws_profile", (f"{alert.msg_type} {alert.identifier!r} must reference every "
                             f"unexpired message of its thread; missing {len(missing)}: {triples}")
