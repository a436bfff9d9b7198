"""Resolve a CAP alert's ``<area>`` blocks into one routable WGS84 geometry.

Rules (per ``<area>``):

* ``<polygon>`` rings become polygons. Invalid ones (bow-ties, spikes, repeated points)
  are repaired with ``shapely.make_valid`` and the repair is recorded as a warning; rings
  that jump across the antimeridian are unwrapped and split at +-180.
* ``<circle>`` becomes :func:`geofencing.geodesy.geodesic_circle` (``radius_km * 1000``).
* ``<geocode>`` values are looked up in the gazetteer **only when the area has no usable
  polygon or circle**. CAP producers (NWS, IPAWS) send both a warning polygon and the
  SAME/UGC codes of every county it touches; the polygon is the precise hazard area and
  the codes are the coarse envelope for legacy (EAS/NWR) receivers, so unioning them would
  warn whole counties that are outside the hazard. Unknown codes are warnings, not errors.

Every area of every info block is unioned (identical areas repeated per language are
resolved once). The result is ``(geometry, warnings)`` with ``geometry=None`` when nothing
was routable.
"""

from __future__ import annotations

import math
from typing import Protocol

import msgspec
import numpy as np
import shapely
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from geofencing.geodesy import geodesic_circle, polygonal, split_antimeridian
from streams.records import Alert, Area


class GeocodeLookup(Protocol):
    """What the resolver needs from a gazetteer."""

    def lookup(self, value_name: str, value: str) -> BaseGeometry | None: ...


def geometry_to_wkb(geom: BaseGeometry) -> bytes:
    """Serialise a geometry as little-endian 2D WKB for ``Alert.geometry_wkb``."""
    return bytes(shapely.to_wkb(geom, byte_order=1))


def wkb_to_geometry(data: bytes) -> BaseGeometry:
    """Parse WKB produced by :func:`geometry_to_wkb`."""
    geom: BaseGeometry = shapely.from_wkb(data)
    return geom


def polygon_from_ring(
    ring: list[tuple[float, float]] | list[list[float]], label: str = "polygon"
) -> tuple[BaseGeometry | None, list[str]]:
    """Build a valid polygonal geometry from one CAP ring of (lon, lat) pairs.

    Returns ``(None, warnings)`` for rings that cannot make an area (fewer than three
    distinct points, non-finite or out-of-range coordinates, or a ring that collapses to a
    line). Unclosed rings are closed (CAP requires first == last; many producers forget).
    """
    warnings: list[str] = []
    try:
        coords = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        return None, [f"{label}: not a list of (lon, lat) pairs; ignored"]
    if not np.isfinite(coords).all():
        return None, [f"{label}: non-finite coordinate; ignored"]
    if (np.abs(coords[:, 1]) > 90.0).any() or (np.abs(coords[:, 0]) > 360.0).any():
        return None, [f"{label}: coordinate out of range (is it lat,lon swapped?); ignored"]
    if len(np.unique(coords, axis=0)) < 3:
        return None, [f"{label}: fewer than 3 distinct points; ignored"]
    if not np.array_equal(coords[0], coords[-1]):
        coords = np.vstack([coords, coords[:1]])
        warnings.append(f"{label}: ring was not closed; closed it")
    # A step of more than 180 degrees between vertices means the ring crosses the
    # antimeridian; unwrap so the ring is continuous, then split it back at +-180.
    steps = np.diff(coords[:, 0])
    crosses = bool((np.abs(steps) > 180.0).any())
    if crosses:
        steps = (steps + 180.0) % 360.0 - 180.0
        coords[1:, 0] = coords[0, 0] + np.cumsum(steps)
    poly: BaseGeometry = shapely.Polygon(coords)
    if not poly.is_valid:
        reason = shapely.is_valid_reason(poly)
        poly = shapely.make_valid(poly)
        warnings.append(f"{label}: invalid ({reason}); repaired with make_valid")
    result = polygonal(poly)
    if result is None:
        warnings.append(f"{label}: has no area after repair; ignored")
        return None, warnings
    if crosses or result.bounds[0] < -180.0 or result.bounds[2] > 180.0:
        result = split_antimeridian(result)
    return result, warnings


def geojson_to_geometry(data: object) -> tuple[BaseGeometry | None, str]:
    """A valid polygonal WGS84 geometry from a GeoJSON geometry (or Feature) mapping.

    Returns ``(None, reason)`` for malformed GeoJSON, coordinates out of range, or a
    geometry without area (points, lines, collapsed rings). Invalid polygons are repaired
    with ``make_valid``; longitudes beyond +-180 are folded back and split there.
    """
    if isinstance(data, dict) and data.get("type") == "Feature":
        data = data.get("geometry")
    try:
        geom = shape(data)
    except Exception as exc:  # shapely raises a zoo of types on bad GeoJSON
        return None, f"invalid GeoJSON geometry: {exc}"
    if geom.is_empty:
        return None, "empty geometry"
    xmin, ymin, xmax, ymax = geom.bounds
    if not np.isfinite(geom.bounds).all() or ymin < -90.0 or ymax > 90.0:
        return None, "coordinates out of range"
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    poly = polygonal(geom)
    if poly is None or poly.area <= 0.0:
        return None, "geometry has no area"
    if xmin < -180.0 or xmax > 180.0:
        poly = split_antimeridian(poly)
    return poly, ""


def resolve_area(
    area: Area, gazetteer: GeocodeLookup, label: str = "area"
) -> tuple[BaseGeometry | None, list[str]]:
    """Resolve one CAP ``<area>`` (see the module docstring for the precedence rules)."""
    warnings: list[str] = []
    shapes: list[BaseGeometry] = []
    for j, ring in enumerate(area.polygons):
        geom, w = polygon_from_ring(ring, f"{label} polygon {j}")
        warnings.extend(w)
        if geom is not None:
            shapes.append(geom)
    for j, circle in enumerate(area.circles):
        radius_m = circle.radius_km * 1000.0
        try:
            shapes.append(geodesic_circle(circle.lon, circle.lat, radius_m))
        except ValueError as exc:
            warnings.append(f"{label} circle {j}: {exc}; ignored")
    if shapes:
        return shapely.union_all(shapes), warnings
    if area.polygons or area.circles:
        warnings.append(f"{label}: no usable polygon/circle; falling back to geocodes")
    seen: dict[int, BaseGeometry] = {}  # gazetteer geometries are shared objects
    for gc in area.geocodes:
        geom = gazetteer.lookup(gc.value_name, gc.value)
        if geom is None:
            warnings.append(f"{label}: unknown geocode {gc.value_name}={gc.value!r}")
        else:
            seen[id(geom)] = geom
    if not seen:
        return None, warnings
    return shapely.union_all(list(seen.values())), warnings


def resolve_alert_geometry(
    alert: Alert, gazetteer: GeocodeLookup
) -> tuple[BaseGeometry | None, list[str]]:
    """Union of every routable area of every info block, plus warnings.

    Returns ``(None, warnings)`` when no area could be resolved (an alert with no
    ``<area>`` at all, e.g. a Cancel, gets no warning).
    """
    warnings: list[str] = []
    parts: list[BaseGeometry] = []
    done: set[bytes] = set()
    for i, info in enumerate(alert.infos):
        for k, area in enumerate(info.areas):
            key = msgspec.json.encode((area.polygons, area.circles, area.geocodes))
            if key in done:  # same area repeated in another language's info block
                continue
            done.add(key)
            desc = f" ({area.desc})" if area.desc else ""
            geom, w = resolve_area(area, gazetteer, f"info {i} area {k}{desc}")
            warnings.extend(w)
            if geom is not None:
                parts.append(geom)
    if not parts:
        return None, warnings
    merged = parts[0] if len(parts) == 1 else shapely.union_all(parts)
    if not merged.is_valid:
        merged = shapely.make_valid(merged)
        warnings.append("union of areas was invalid; repaired with make_valid")
    result = polygonal(merged)
    if result is None or not math.isfinite(result.area):
        return None, [*warnings, "resolved areas have no extent"]
    return result, warnings
