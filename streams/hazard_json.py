"""Hazard feeds in JSON -> validated :class:`~streams.records.Alert` records.

Three shapes are accepted, each validated with the same rules as CAP XML (the
``check_*`` helpers and :class:`~streams.cap.Budget` from ``streams.cap``):

(a) a GeoJSON ``Feature`` / ``FeatureCollection`` whose ``properties`` carry CAP-like
    fields (this includes the api.weather.gov alerts feed: ``messageType``, a
    ``geocode`` dict, ``references`` objects); the geometry is the area;
(b) USGS earthquake GeoJSON features (``properties.mag`` + ``properties.time``);
(c) a plain JSON object with CAP-like fields and an ``"area"`` object (or a list of them).

Errors raise :class:`~streams.cap.CapError` (``not_json``, ``unknown_shape``,
``bad_field``, ``bad_geometry`` plus every CAP reason code).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import msgspec

from streams.cap import (
    CATEGORIES,
    DEFAULT_LIMITS,
    Budget,
    CapError,
    CapLimits,
    check_circle,
    check_datetime,
    check_enum,
    check_references,
    check_ring,
    dedupe,
    parse_circle_text,
    parse_polygon_text,
)
from streams.records import (
    CERTAINTIES,
    MSG_TYPES,
    SCOPES,
    SEVERITIES,
    STATUSES,
    URGENCIES,
    Alert,
    Area,
    Circle,
    Geocode,
    Info,
)

USGS_SENDER = "usgs.gov"
# Any of these in a properties object marks it as CAP-like (shape a / c).
_CAP_KEYS = ("identifier", "event", "sent", "msgType", "messageType")
_decoder = msgspec.json.Decoder()


# Depth bands (km) of the usual seismological classes: shallow < 70 <= intermediate < 300
# <= deep. The deeper the source, the weaker the strongest shaking at the surface.
INTERMEDIATE_DEPTH_KM = 70.0
DEEP_DEPTH_KM = 300.0


def usgs_severity(mag: float | None, depth_km: float | None = None) -> str:
    """CAP severity for an earthquake from its magnitude and (optionally) depth.

    Magnitude bands (product team): M7+ Extreme, M6+ Severe, M4.5+ Moderate, else Minor.
    Depth lowers the band: one step for an intermediate-depth source (70-300 km), two
    for a deep one (>= 300 km), never below Minor. A deep M7 (e.g. 600 km under Fiji) is
    felt widely but rarely damages; a shallow M6 can. Unknown depth = shallow (the
    conservative reading).
    """
    if mag is None:
        return "Unknown"
    bands = ("Minor", "Moderate", "Severe", "Extreme")
    band = 3 if mag >= 7.0 else 2 if mag >= 6.0 else 1 if mag >= 4.5 else 0
    if depth_km is not None and depth_km >= DEEP_DEPTH_KM:
        band -= 2
    elif depth_km is not None and depth_km >= INTERMEDIATE_DEPTH_KM:
        band -= 1
    return bands[max(band, 0)]


def usgs_radius_km(mag: float | None, depth_km: float | None = None) -> float:
    """Radius (km) of the circle around an epicentre that we warn.

    ``r = 10 ** (0.5 * M - 0.5)``: M3 -> 10 km, M4 -> 32 km, M5 -> 100 km, M6 -> 316 km,
    M7 -> 1000 km. A rough "felt at all" distance, in line with USGS "Did You Feel It?"
    reports for shallow events, so that everyone likely to feel shaking is told. With a
    depth ``d`` we read ``r`` as the distance from the *hypocentre* and warn the surface
    circle within it: ``sqrt(r**2 - d**2)`` (a 100 km-deep M4 is barely felt anywhere).
    The result is clamped to [1, 1000] km. It ignores local geology; a ShakeMap polygon
    should replace it when one is published. Unknown magnitude -> 10 km.
    """
    if mag is None:
        return 10.0
    r = 10.0 ** (0.5 * mag - 0.5)
    if depth_km is not None and depth_km > 0.0:
        r = math.sqrt(max(r * r - depth_km * depth_km, 0.0))
    return min(1000.0, max(1.0, r))


def parse_hazard_json(data: bytes, *, source: str = "",
                      limits: CapLimits = DEFAULT_LIMITS) -> list[Alert]:
    """Parse one JSON hazard document into alerts (one per feature / object).

    An empty FeatureCollection yields ``[]``. Raises :class:`CapError` on bad input.
    """
    if len(data) > limits.max_bytes:
        raise CapError("too_large", f"document is {len(data)} bytes; limit {limits.max_bytes}")
    warnings: list[str] = []
    if data[:3] == b"\xef\xbb\xbf":
        warnings.append("UTF-8 byte-order mark")
        data = data[3:]
    try:
        doc = _decoder.decode(data)
    except msgspec.DecodeError as e:
        raise CapError("not_json", f"not valid JSON: {e}") from None
    except RecursionError:
        raise CapError("too_deep", "JSON nested too deeply") from None
    items = _items(doc)
    if len(items) > limits.max_alerts:
        raise CapError("too_many_alerts", f"{len(items)} alerts; limit {limits.max_alerts}")
    budget = Budget(limits)
    return [_alert(item, budget, source, list(warnings)) for item in items]


def _items(doc: Any, top: bool = True) -> list[dict[str, Any]]:
    if isinstance(doc, list) and top:  # a batch: each element must be a known object shape
        return [item for element in doc for item in _items(element, top=False)]
    if not isinstance(doc, dict):
        raise CapError("unknown_shape", f"JSON {type(doc).__name__} is not a GeoJSON Feature/"
                                        "FeatureCollection or a CAP-like object")
    kind = doc.get("type")
    if kind == "FeatureCollection":
        features = doc.get("features")
        if not isinstance(features, list) or not all(isinstance(f, dict) for f in features):
            raise CapError("unknown_shape", "FeatureCollection without a list of features")
        return features
    if kind == "Feature" or any(k in doc for k in _CAP_KEYS):
        return [doc]
    raise CapError("unknown_shape", "JSON object is neither a GeoJSON Feature/FeatureCollection "
                                    f"nor CAP-like (needs one of {', '.join(_CAP_KEYS)})")


def _alert(item: dict[str, Any], budget: Budget, source: str, warnings: list[str]) -> Alert:
    if item.get("type") != "Feature":
        return _cap_like(item, None, budget, source, warnings)
    props = item.get("properties")
    if not isinstance(props, dict):
        raise CapError("unknown_shape", "GeoJSON Feature without a properties object")
    if "mag" in props and "time" in props:
        budget.area()
        return _usgs(item, props, source, warnings)
    if not any(k in props for k in _CAP_KEYS):
        raise CapError("unknown_shape", "Feature properties carry neither CAP fields "
                                        f"({', '.join(_CAP_KEYS)}) nor USGS mag/time")
    areas = _feature_area(item.get("geometry"), props, budget, warnings)
    return _cap_like(props, item.get("id"), budget, source, warnings, areas)


def _text(obj: dict[str, Any], key: str, default: str | None = None) -> str | None:
    value = obj.get(key)
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise CapError("bad_field", f"{key!r} must be a string, not {type(value).__name__}")


def _required(obj: dict[str, Any], key: str, fallback: Any = None) -> str:
    value = _text(obj, key) or (_text({key: fallback}, key) if fallback is not None else None)
    if not value:
        raise CapError("missing_element", f"required {key!r} is missing or empty")
    return value


def _number(value: Any, what: str, reason: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise CapError(reason, f"{what}: {value!r} is not a number")


def _references(value: Any) -> str | list[str] | None:
    # api.weather.gov gives objects; CAP-JSON gives a string or a list of triples.
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise CapError("bad_references", "references must be a string or a list")
    out = []
    for ref in value:
        if isinstance(ref, dict):
            ref = ",".join(str(ref.get(k, "")) for k in ("sender", "identifier", "sent"))
        if not isinstance(ref, str):
            raise CapError("bad_references", f"reference {ref!r} is not a string")
        out.append(ref.strip())
    return out


def _cap_like(p: dict[str, Any], feature_id: Any, budget: Budget, source: str, w: list[str],
              feature_areas: list[Area] | None = None) -> Alert:
    identifier = _required(p, "identifier", p.get("id", feature_id))
    sender = _required(p, "sender")
    sent = check_datetime(_required(p, "sent"), "sent", w)
    status = check_enum(_text(p, "status"), STATUSES, "status", w)
    msg_type = check_enum(_text(p, "msgType", _text(p, "messageType")), MSG_TYPES, "msgType", w)
    scope = check_enum(_text(p, "scope", "Public"), SCOPES, "scope", w)
    references = check_references(_references(p.get("references")), msg_type, w)
    raw_infos = p.get("info")
    if raw_infos is None:  # flat object: the info fields sit beside the alert fields
        infos = [_info(p, "", budget, w, feature_areas)]
    else:  # CAP-as-JSON (e.g. the German BBK warning API): "info" is a list of objects
        raw_infos = [raw_infos] if isinstance(raw_infos, dict) else raw_infos
        if not isinstance(raw_infos, list) or not all(isinstance(i, dict) for i in raw_infos):
            raise CapError("bad_field", "info must be an object or a list of objects")
        infos = [_info(i, f"info[{n}]/", budget, w, None) for n, i in enumerate(raw_infos, 1)]
    return Alert(identifier=identifier, sender=sender, sent=sent, status=status,
                 msg_type=msg_type, scope=scope, source=source, references=references,
                 note=_text(p, "note", "") or "", infos=infos, warnings=dedupe(w))


def _info(p: dict[str, Any], where: str, budget: Budget, w: list[str],
          areas: list[Area] | None) -> Info:
    event = _required(p, "event")
    raw_categories = p.get("category", p.get("categories"))
    if raw_categories is None:
        w.append("no category given: Other assumed")
        raw_categories = "Other"
    if isinstance(raw_categories, str):
        raw_categories = [raw_categories]
    if not isinstance(raw_categories, list):
        raise CapError("bad_field", "category must be a string or a list of strings")
    categories = [check_enum(c if isinstance(c, str) else repr(c), CATEGORIES, "category", w)
                  for c in raw_categories]
    enums = {}
    for key, allowed in (("urgency", URGENCIES), ("severity", SEVERITIES),
                         ("certainty", CERTAINTIES)):
        if p.get(key) is None:  # JSON feeds often omit them; CAP's own "Unknown" is honest
            w.append(f"no {key} given: Unknown assumed")
        enums[key] = check_enum(_text(p, key, "Unknown"), allowed, key, w)
    times = {}
    for key in ("effective", "onset", "expires"):
        value = _text(p, key)
        times[key] = check_datetime(value, key, w) if value else None
    if areas is None:
        spec = p.get("area", p.get("areas"))
        specs = spec if isinstance(spec, list) else [spec] if spec else []
        areas = [_plain_area(s, f"{where}area[{n}]", budget, w) for n, s in enumerate(specs, 1)]

    def text(key: str) -> str:
        return _text(p, key, "") or ""

    return Info(language=text("language") or "en-US", categories=categories, event=event,
                urgency=enums["urgency"], severity=enums["severity"],
                certainty=enums["certainty"], sender_name=text("senderName"),
                headline=text("headline"), description=text("description"),
                instruction=text("instruction"), web=text("web"), effective=times["effective"],
                onset=times["onset"], expires=times["expires"], areas=areas)


def _ring(positions: Any, where: str, budget: Budget) -> list[tuple[float, float]]:
    if not isinstance(positions, list):
        raise CapError("bad_polygon", f"{where}: a ring must be a list of [lon, lat] positions")
    budget.polygon(len(positions))
    lons: list[float] = []
    lats: list[float] = []
    for pos in positions:
        if not isinstance(pos, list) or len(pos) < 2:
            raise CapError("bad_polygon", f"{where}: position {pos!r} is not [lon, lat]")
        lons.append(_number(pos[0], where, "bad_polygon"))
        lats.append(_number(pos[1], where, "bad_polygon"))
    return check_ring(lons, lats, where)


def _geocodes(value: Any, w: list[str]) -> list[Geocode]:
    # Either CAP-JSON [{"valueName", "value"}] or the api.weather.gov {"UGC": [...]} form.
    if value is None:
        return []
    if isinstance(value, dict):
        pairs = [(name, v) for name, vs in value.items()
                 for v in (vs if isinstance(vs, list) else [vs])]
    elif isinstance(value, list) and all(isinstance(g, dict) for g in value):
        pairs = [(g.get("valueName"), g.get("value")) for g in value]
    else:
        raise CapError("bad_field", "geocodes must be a list of {valueName, value} objects")
    out = []
    for name, v in pairs:
        if not (isinstance(name, str) and name.strip() and isinstance(v, str | int)
                and not isinstance(v, bool)):
            raise CapError("bad_field", f"geocode {name!r}={v!r} needs a valueName and a value")
        if name.islower():
            w.append(f"lower-case geocode valueName {name!r} upper-cased")
        out.append(Geocode(value_name=name.strip().upper(), value=str(v).strip()))
    return out


def _feature_area(geometry: Any, p: dict[str, Any], budget: Budget, w: list[str]) -> list[Area]:
    polygons: list[list[tuple[float, float]]] = []
    circles: list[Circle] = []
    if geometry is not None:
        if not isinstance(geometry, dict):
            raise CapError("bad_geometry", "geometry must be a GeoJSON object or null")
        kind, coords = geometry.get("type"), geometry.get("coordinates")
        if kind == "Polygon":
            parts = [coords]
        elif kind == "MultiPolygon" and isinstance(coords, list):
            parts = coords
        elif kind == "Point":
            if p.get("radius_km") is None:
                raise CapError("bad_circle", "Point geometry needs properties.radius_km")
            circles.append(_point_circle(coords, p["radius_km"], "geometry"))
            parts = []
        else:
            raise CapError("bad_geometry", f"unsupported geometry type {kind!r} (Polygon, "
                                           "MultiPolygon or Point with radius_km)")
        for n, rings in enumerate(parts, 1):
            if not isinstance(rings, list) or not rings:
                raise CapError("bad_polygon", f"geometry polygon {n} has no rings")
            if len(rings) > 1:  # CAP has no holes: warn a superset rather than drop the area
                w.append("polygon holes ignored (CAP polygons have none)")
            polygons.append(_ring(rings[0], f"geometry polygon {n}", budget))
    geocodes = _geocodes(p.get("geocode", p.get("geocodes")), w)
    desc = _text(p, "areaDesc", "") or ""
    if not (polygons or circles or geocodes or desc):
        return []
    budget.area()
    return [Area(desc=desc, polygons=polygons, circles=circles, geocodes=geocodes)]


def _point_circle(coords: Any, radius: Any, where: str) -> Circle:
    if not isinstance(coords, list) or len(coords) < 2:
        raise CapError("bad_circle", f"{where}: Point coordinates must be [lon, lat]")
    return check_circle(_number(coords[0], where, "bad_circle"),
                        _number(coords[1], where, "bad_circle"),
                        _number(radius, f"{where} radius_km", "bad_circle"), where)


def _as_list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str | dict):
        return [value]
    if isinstance(value, list):
        return value
    raise CapError("bad_field", f"{what} must be a list")


def _plain_area(spec: Any, where: str, budget: Budget, w: list[str]) -> Area:
    """``{"desc", "polygons": [[[lon, lat], ...]], "circles": [{"lon", "lat", "radius_km"}],
    "geocodes": [...]}``; CAP-as-JSON keys (areaDesc, polygon/circle text, geocode) also work.
    """
    if not isinstance(spec, dict):
        raise CapError("bad_field", f"{where} must be an object")
    budget.area()
    area = Area(desc=_text(spec, "desc", _text(spec, "areaDesc", "")) or "",
                geocodes=_geocodes(spec.get("geocodes", spec.get("geocode")), w))
    for n, ring in enumerate(_as_list(spec.get("polygons"), "polygons"), 1):
        area.polygons.append(_ring(ring, f"{where}/polygon[{n}]", budget))
    for n, c in enumerate(_as_list(spec.get("circles"), "circles"), 1):
        cw = f"{where}/circle[{n}]"
        if not isinstance(c, dict):
            raise CapError("bad_circle", f"{cw}: must be an object with lon, lat, radius_km")
        area.circles.append(_point_circle([c.get("lon"), c.get("lat")], c.get("radius_km"), cw))
    for text in _as_list(spec.get("polygon"), "polygon"):  # CAP text form
        if not isinstance(text, str):
            raise CapError("bad_polygon", f"{where}: polygon must be 'lat,lon ...' text")
        if text.strip():
            pw = f"{where}/polygon[{len(area.polygons) + 1}]"
            area.polygons.append(parse_polygon_text(text, pw, budget, w))
    for n, text in enumerate(_as_list(spec.get("circle"), "circle"), 1):
        if not isinstance(text, str):
            raise CapError("bad_circle", f"{where}: circle must be 'lat,lon radius' text")
        area.circles.append(parse_circle_text(text, f"{where}/circle[{n}]", w))
    return area


def _usgs(f: dict[str, Any], p: dict[str, Any], source: str, w: list[str]) -> Alert:
    identifier = _required(f, "id")
    time_ms = p.get("time")
    if not isinstance(time_ms, int) or isinstance(time_ms, bool):
        raise CapError("bad_datetime", f"USGS time {time_ms!r} is not epoch milliseconds")
    try:
        # CAP 1.2 date-times have whole seconds and a numeric offset.
        sent = datetime.fromtimestamp(time_ms / 1000, tz=UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        raise CapError("bad_datetime", f"USGS time {time_ms} ms is out of range") from None
    mag_raw = p.get("mag")
    mag = None if mag_raw is None else _number(mag_raw, "USGS mag", "bad_field")
    if mag is None:
        w.append("USGS event without magnitude: severity Unknown, 10 km radius")
    geometry = f.get("geometry")
    if not isinstance(geometry, dict) or geometry.get("type") != "Point":
        raise CapError("bad_geometry", "USGS feature needs a Point epicentre")
    coords = geometry.get("coordinates")
    depth = None  # GeoJSON [lon, lat, depth_km]; USGS reports depth positive downwards
    if isinstance(coords, list) and len(coords) >= 3 and coords[2] is not None:
        depth = _number(coords[2], "USGS depth", "bad_geometry")
        if not math.isfinite(depth):
            raise CapError("bad_geometry", f"USGS depth {depth} is not finite")
    circle = _point_circle(coords, usgs_radius_km(mag, depth), "USGS epicentre")
    kind = _text(p, "type", "earthquake") or "earthquake"
    # Quarry blasts and explosions share the feed; naming them as such avoids a false
    # "Earthquake" alert. Automatic solutions are not yet reviewed by a seismologist.
    event = "Earthquake" if kind == "earthquake" else kind.title()
    title = _text(p, "title", "") or f"M {mag} - {_text(p, 'place', '')}"
    description = title + (f", depth {depth:g} km" if depth is not None else "") + (
        " (tsunami flag set: check official tsunami warnings)" if p.get("tsunami") == 1 else "")
    info = Info(language="en-US", categories=["Geo"], event=event, urgency="Past",
                severity=usgs_severity(mag, depth),
                certainty="Observed" if p.get("status") == "reviewed" else "Likely",
                sender_name="U.S. Geological Survey", headline=title, description=description,
                web=_text(p, "url", "") or "",
                areas=[Area(desc=_text(p, "place", "") or "", circles=[circle])])
    return Alert(identifier=identifier, sender=USGS_SENDER, sent=sent, status="Actual",
                 msg_type="Alert", scope="Public", source=source, infos=[info],
                 warnings=dedupe(w))
