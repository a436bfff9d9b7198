"""From a composed draft to the CAP message the pipeline will receive.

The console's alert is built as a :class:`streams.records.Alert` and resolved with the
*same* code ingest uses (``geofencing.areas.resolve_alert_geometry``), so the preview's
area is exactly the area the pipeline will route. Jurisdiction and event rules are the
colleague-maintained sender checks of ``streams.authority`` applied with the
organisation as the sender, so a console alert and an agency's CAP obey one rule set.
The CAP XML comes from ``streams.atom.alert_to_cap_xml`` and is parsed back with
``streams.cap.parse_cap`` before it is produced: what we send is what ingest accepts.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta

import shapely
from fastapi import HTTPException
from shapely.geometry.base import BaseGeometry

from geofencing.areas import geojson_to_geometry, resolve_alert_geometry
from geofencing.gazetteer import Gazetteer
from geofencing.geodesy import approx_area_m2
from ops.api.identity import Organisation
from ops.api.models import DraftIn
from streams.atom import alert_to_cap_xml
from streams.authority import Jurisdiction, RegistryError, Sender, SenderRegistry, authorise
from streams.cap import CapError, parse_cap
from streams.records import Alert, Area, Circle, Geocode, Info


def normalise_code(code: str) -> tuple[str, str]:
    """A zone code as CAP ``(valueName, value)``: ``FIPS:06037`` -> ``(SAME, 006037)``.

    County FIPS codes are written as SAME (what CAP producers and EAS receivers use); a
    bare six-digit code is SAME; other schemes (UGC, EMMA_ID...) pass through.
    """
    scheme, sep, value = code.strip().partition(":")
    if not sep:
        scheme, value = ("SAME", scheme) if scheme.isdigit() and len(scheme) == 6 else ("", "")
    scheme, value = scheme.strip().upper(), value.strip().upper()
    if scheme == "FIPS" and value.isdigit() and len(value) <= 5:
        return "SAME", "0" + value.zfill(5)
    return scheme, value


def draft_area(draft: DraftIn, gazetteer: Gazetteer) -> tuple[Area, list[str]]:
    """The CAP ``<area>`` of a draft, or 422 naming what is wrong with it."""
    area = Area(desc=draft.area.desc.strip() or "Alert area")
    warnings: list[str] = []
    if draft.area.polygon is not None:
        geom, problem = geojson_to_geometry(draft.area.polygon)
        if geom is None:
            raise HTTPException(422, f"area.polygon: {problem}")
        polygons = list(getattr(geom, "geoms", [geom]))
        for poly in polygons:
            if len(poly.interiors):
                warnings.append("area.polygon: holes dropped (CAP polygons have none)")
            area.polygons.append([(float(x), float(y)) for x, y in poly.exterior.coords])
    if draft.area.circle is not None:
        c = draft.area.circle
        area.circles.append(Circle(lon=c.lon, lat=c.lat, radius_km=c.radius_km))
    for code in draft.area.codes:
        scheme, value = normalise_code(code)
        if not scheme or gazetteer.lookup(scheme, value) is None:
            raise HTTPException(422, f"area.codes: unknown zone code {code!r} (use e.g. "
                                     "FIPS:06037 or SAME:006037)")
        area.geocodes.append(Geocode(scheme, value))
    return area, warnings


def cap_time(dt: datetime) -> str:
    """A CAP dateTime (seconds, explicit offset; CAP forbids the ``Z`` form)."""
    return dt.astimezone(UTC).replace(microsecond=0).isoformat()


def build_alert(draft: DraftIn, org: Organisation, gazetteer: Gazetteer, *, identifier: str,
                sent: datetime, msg_type: str = "Alert", references: list[str] | None = None,
                note: str = "", expiry_min: int = 60) -> tuple[Alert, list[str]]:
    """The CAP alert a draft becomes when sent at ``sent`` (one info per language)."""
    area, warnings = draft_area(draft, gazetteer)
    if draft.expires is not None:
        expires = draft.expires
    else:
        expires = sent + timedelta(minutes=draft.expires_in_minutes or expiry_min)
    if expires <= sent:
        raise HTTPException(422, "expires is in the past: the alert would be dropped as expired")
    codes = [Geocode("SAME", draft.event_code.upper())] if draft.event_code else []
    texts = [(draft.language, draft.event, draft.headline, draft.description,
              draft.instruction)]
    texts += [(t.language, t.event or draft.event, t.headline, t.description, t.instruction)
              for t in draft.translations]
    infos = [
        Info(language=lang, categories=[draft.category], event=event, urgency=draft.urgency,
             severity=draft.severity, certainty=draft.certainty, sender_name=org.name,
             headline=headline, description=description, instruction=instruction,
             web=draft.web, expires=cap_time(expires), areas=[area], event_codes=codes)
        for lang, event, headline, description, instruction in texts
    ]
    alert = Alert(identifier=identifier, sender=org.sender, sent=cap_time(sent),
                  status=draft.status, msg_type=msg_type, scope="Public",
                  references=list(references or []), note=note or draft.note, infos=infos)
    return alert, warnings


def resolve(alert: Alert, gazetteer: Gazetteer) -> tuple[BaseGeometry, list[str]]:
    """The routable geometry of an alert (exactly as ingest resolves it), or 422."""
    geometry, warnings = resolve_alert_geometry(alert, gazetteer)
    if geometry is None:
        raise HTTPException(422, "the area resolves to nothing routable: "
                                 + ("; ".join(warnings) or "empty"))
    return geometry, warnings


@functools.lru_cache(maxsize=256)
def _registry(org_json: str, tolerance_m: float, gazetteer: Gazetteer) -> SenderRegistry:
    org = Organisation.model_validate_json(org_json)
    j = org.jurisdiction
    jurisdiction = Jurisdiction(tuple(j.codes), j.geometry) if j.codes or j.geometry else None
    sender = Sender(org.sender, org.name, jurisdiction, tuple(org.event_codes),
                    tuple(org.events))
    return SenderRegistry([sender], "strict", tolerance_m, gazetteer)


def authority_problems(alert: Alert, geometry: BaseGeometry | None, org: Organisation,
                       gazetteer: Gazetteer, tolerance_m: float, *,
                       pipeline: SenderRegistry | None = None,
                       payload: bytes | None = None) -> list[str]:
    """Jurisdiction and event-code problems of an alert for its organisation.

    With ``pipeline`` (the worker's sender registry, when ``senders_file`` is set) the
    alert must also pass the rules ingest will apply, so the console never sends what the
    pipeline would dead-letter.
    """
    try:
        registry = _registry(org.model_dump_json(), tolerance_m, gazetteer)
        problems = authorise(alert, geometry, registry)
    except RegistryError as exc:
        return [f"organisation_misconfigured: {exc}"]
    if pipeline is not None:
        problems += [f"pipeline registry: {p}"
                     for p in authorise(alert, geometry, pipeline, payload=payload)]
    return problems


def refuse_unauthorised(problems: list[str], org: Organisation) -> None:
    """403 with every reason when the organisation may not send this alert."""
    if problems:
        reasons = "; ".join(p.replace("outside_jurisdiction: ", "area outside the "
                                      "jurisdiction: ").replace("event_not_allowed: ",
                                      "event not allowed: ") for p in problems)
        raise HTTPException(403, f"{org.name} may not send this alert: {reasons}")


def cap_document(alert: Alert) -> bytes:
    """The CAP 1.2 XML of an alert, checked by parsing it back as ingest will."""
    payload = alert_to_cap_xml(alert)
    try:
        parse_cap(payload, source="console-check")
    except CapError as exc:
        raise HTTPException(422, f"the composed CAP message is invalid ({exc.reason}): {exc}"
                            ) from exc
    return payload


def area_km2(geometry: BaseGeometry) -> float:
    """Approximate area in km2 (for people, not for routing)."""
    return round(float(approx_area_m2(shapely.get_parts(geometry)).sum()) / 1e6, 1)
