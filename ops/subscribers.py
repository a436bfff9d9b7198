"""Reading subscriber files (GeoJSON or CSV) into subscriptions and contacts.

A subscriber file names, per citizen, an ``id``; a place (``lon``/``lat`` or a GeoJSON
Point, optional ``radius_m``), a custom zone (a GeoJSON Polygon/MultiPolygon) or a
gazetteer ``zone`` code (``FIPS:06075``, ``SAME:006075``...); optional ``channels``
(``push|sms|email``; default: every channel with an address), ``language``,
``min_severity``, ``accept_tests``; and the addresses ``push_token``, ``phone``,
``email``. Addresses go to the contact store only, never onto a topic.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Mapping
from datetime import time as dt_time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from channels.contacts import Contact
from streams.records import CHANNELS, SEVERITIES, Channel, Subscription


class SubscriberFileError(ValueError):
    """A subscriber file or one of its rows is unusable; the message names the row."""


def _channels(value: Any, contact: Contact) -> list[Channel]:
    if value in (None, ""):
        have = {"push": contact.push_token, "sms": contact.phone, "email": contact.email}
        return [c for c in CHANNELS if have[c]]
    names = value if isinstance(value, list) else str(value).replace(";", "|").split("|")
    out: list[Channel] = []
    for name in (str(n).strip().lower() for n in names):
        if name not in CHANNELS:
            raise ValueError(f"unknown channel {name!r}")
        out.append(name)  # type: ignore[arg-type]
    return out


def _float(value: Any, name: str) -> float | None:
    if value in (None, ""):
        return None
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} is not a finite number")
    return number


def _quiet_hours(props: Mapping[str, Any]) -> dict[str, str]:
    window = str(props.get("quiet_hours") or "").strip()
    zone = str(props.get("timezone") or "UTC").strip()
    try:
        ZoneInfo(zone)
    except (ValueError, ZoneInfoNotFoundError) as exc:
        raise ValueError(f"unknown timezone {zone!r}") from exc
    if window:
        try:
            start, end = window.split("-")
            dt_time.fromisoformat(start.strip())
            dt_time.fromisoformat(end.strip())
        except ValueError as exc:
            raise ValueError(f"quiet_hours {window!r} is not HH:MM-HH:MM") from exc
    return {"quiet_hours": window, "timezone": zone}


def build(
    props: Mapping[str, Any], geometry: Mapping[str, Any] | None
) -> tuple[Subscription, Contact]:
    """One subscription and its contact from a row's properties and optional geometry."""
    sub_id = str(props.get("id") or "").strip()
    if not sub_id:
        raise ValueError("missing id")
    contact = Contact(
        push_token=str(props.get("push_token") or ""),
        phone=str(props.get("phone") or ""),
        email=str(props.get("email") or ""),
    )
    severity = str(props.get("min_severity") or "Unknown")
    if severity not in SEVERITIES:
        raise ValueError(f"min_severity {severity!r} is not a CAP severity")
    common: dict[str, Any] = {
        "id": sub_id,
        "channels": _channels(props.get("channels"), contact),
        "language": str(props.get("language") or "en"),
        "min_severity": severity,
        "accept_tests": str(props.get("accept_tests", "")).lower() in ("1", "true", "yes"),
        **_quiet_hours(props),
    }
    zone = str(props.get("zone") or "").strip()
    if geometry and geometry.get("type") == "Point":
        x, y = (float(c) for c in geometry["coordinates"][:2])
        props = {**props, "lon": x, "lat": y}
    lon, lat = _float(props.get("lon"), "lon"), _float(props.get("lat"), "lat")
    radius = _float(props.get("radius_m"), "radius_m") or 0.0
    if lon is not None and lat is not None:
        if not (-180 <= lon <= 180 and -90 <= lat <= 90):
            raise ValueError(f"lon/lat out of range: {lon}, {lat}")
        if radius < 0:
            raise ValueError("radius_m must be >= 0")
        return Subscription(kind="place", lon=lon, lat=lat, radius_m=radius, **common), contact
    if geometry and geometry.get("type") in ("Polygon", "MultiPolygon"):
        return Subscription(kind="zone", geometry=dict(geometry), **common), contact
    if zone:
        return Subscription(kind="zone", zone=zone, **common), contact
    raise ValueError("needs lon/lat, a Point, a Polygon/MultiPolygon, or a zone code")


def read_subscribers(path: Path) -> Iterator[tuple[Subscription, Contact]]:
    """Yield (subscription, contact) per row of a GeoJSON or CSV subscriber file."""
    if path.suffix.lower() in (".geojson", ".json"):
        yield from _read_geojson(path)
    elif path.suffix.lower() == ".csv":
        yield from _read_csv(path)
    else:
        raise SubscriberFileError(f"{path}: expected a .geojson, .json or .csv file")


def _read_geojson(path: Path) -> Iterator[tuple[Subscription, Contact]]:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise SubscriberFileError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("type") != "FeatureCollection":
        raise SubscriberFileError(f"{path}: expected a GeoJSON FeatureCollection")
    for n, feature in enumerate(doc.get("features") or []):
        try:
            yield build(feature.get("properties") or {}, feature.get("geometry"))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise SubscriberFileError(f"{path}: feature {n}: {exc}") from exc


def _read_csv(path: Path) -> Iterator[tuple[Subscription, Contact]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "id" not in reader.fieldnames:
            raise SubscriberFileError(f"{path}: CSV needs a header with an 'id' column")
        for line, row in enumerate(reader, start=2):
            try:
                yield build(row, None)
            except (ValueError, TypeError) as exc:
                raise SubscriberFileError(f"{path}: line {line}: {exc}") from exc
