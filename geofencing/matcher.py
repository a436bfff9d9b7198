"""Match an alert area against every subscription at once.

:class:`SubscriptionIndex` is built once from the subscriptions and never mutated.

**Places** live in a :class:`geofencing.places.PlaceGrid`: numpy arrays sorted by (radius
class, Morton code), walked as a quadtree per query by compiled code (numba,
:mod:`geofencing.walk`); whole cells are accepted or dropped from their distance to the
area's boundary, and only points in boundary cells are tested one by one (no shapely
geometry per point). A place matches when it is inside the area (``shapely.intersects_xy``
semantics, boundary included) or, with a radius, when its distance to the area in an
azimuthal-equidistant frame centred on the area is <= ``radius_m`` (the geodesic distance
to ~1e-4 of the radius for county-sized areas, see :class:`geofencing.geodesy.LocalFrame`).
No Python loop runs over subscribers.

**Zones** (a gazetteer code or a custom GeoJSON geometry) are deduplicated by geometry into
a :class:`geofencing.zones.ZoneSet` (an STRtree plus interior probe points). A zone matches
when its interior overlaps the area's interior by more than a sliver: overlap (approx. m2)
> max(1 m2, 1e-4 x the smaller of the two areas). Zones that only share a border (overlap
0) never match, nor does a 0.25 km2 sliver between two 2 500 km2 counties digitised
differently; a small alert inside a huge zone still matches because the tolerance scales
with the *smaller* area. Overlaps are measured by compiled edge clipping (GEOS only for
degenerate configurations), see :mod:`geofencing.zones` and :mod:`geofencing.overlap`.

The answers are exactly those of evaluating each subscription alone (the property test
``tests/unit/test_match_property.py`` holds the index to a brute-force reference).

Results are integer positions into :attr:`SubscriptionIndex.subscriptions` (places first,
then zones grouped by geometry); :meth:`~SubscriptionIndex.match` gives subscriber ids and
:meth:`~SubscriptionIndex.records` the records (channels, language, ...).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry.base import BaseGeometry

from geofencing.areas import geojson_to_geometry
from geofencing.arrays import ranges_to_index
from geofencing.geodesy import polygonal, wrap_lon
from geofencing.places import PlaceGrid
from geofencing.zones import ZONE_OVERLAP_MIN_M2 as ZONE_OVERLAP_MIN_M2  # re-exported
from geofencing.zones import ZONE_OVERLAP_REL_TOL as ZONE_OVERLAP_REL_TOL  # re-exported
from geofencing.zones import ZoneSet
from streams.records import CHANNELS, Subscription

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

class ZoneLookup(Protocol):
    """What the index needs from a gazetteer: ``"SCHEME:value"`` -> geometry."""

    def get(self, code: str) -> BaseGeometry | None: ...


@dataclass(frozen=True, slots=True)
class Unresolved:
    """A subscription left out of the index, and why."""

    id: str
    reason: str


class SubscriptionIndex:
    """Immutable spatial index over place and zone subscriptions (see module docstring).

    Attributes: ``subscriptions`` (records in index order), ``ids`` (object array, same
    order), ``lon``/``lat``/``radius_m`` (float64, the first ``n_places`` positions),
    ``unresolved`` (subscriptions left out, with reasons).
    """

    def __init__(
        self,
        places: Sequence[Subscription],
        zones: Sequence[tuple[Subscription, BaseGeometry, object]],
        unresolved: Iterable[Unresolved] = (),
    ) -> None:
        """Prefer :meth:`build`. ``places`` must have valid coordinates and radii;
        ``zones`` are (record, polygonal geometry, dedup key) rows."""
        lon = wrap_lon(np.array([s.lon for s in places], dtype=np.float64))
        lat = np.array([s.lat for s in places], dtype=np.float64)
        radius = np.array([s.radius_m for s in places], dtype=np.float64)
        self._grid = PlaceGrid(lon, lat, radius)
        self.lon: FloatArray = self._grid.lon
        self.lat: FloatArray = self._grid.lat
        self.radius_m: FloatArray = self._grid.radius_m
        self.n_places = len(places)

        # Zones: one tree entry per distinct geometry; subscribers of a geometry are a
        # contiguous run of positions so a hit expands with ranges_to_index.
        groups: dict[object, list[Subscription]] = {}
        geoms: dict[object, BaseGeometry] = {}
        for sub, geom, key in zones:
            groups.setdefault(key, []).append(sub)
            geoms.setdefault(key, geom)
        zone_subs = [s for members in groups.values() for s in members]
        sizes = np.array([len(v) for v in groups.values()], dtype=np.int64)
        self._zones = ZoneSet(list(geoms.values()))
        self._zone_stop = self.n_places + np.cumsum(sizes)
        self._zone_start = self._zone_stop - sizes
        self.n_zones = len(zone_subs)

        ordered = [places[i] for i in self._grid.order.tolist()]
        ordered += zone_subs
        self.subscriptions: tuple[Subscription, ...] = tuple(ordered)
        self.ids: npt.NDArray[np.object_] = np.array([s.id for s in ordered], dtype=object)
        # Few distinct channel lists exist: one bit mask per list, looked up per record.
        lists = [tuple(s.channels) for s in ordered]
        lut = {key: _channel_bits(key) for key in set(lists)}
        bits = np.fromiter((lut[key] for key in lists), dtype=np.uint8, count=len(lists))
        self._channel_mask = {ch: (bits & (1 << k)) != 0 for k, ch in enumerate(CHANNELS)}
        self.unresolved: tuple[Unresolved, ...] = tuple(unresolved)
        for arr in (self.ids,):
            arr.flags.writeable = False

    @classmethod
    def build(
        cls, subscriptions: Iterable[Subscription], gazetteer: ZoneLookup | None = None
    ) -> SubscriptionIndex:
        """Validate and index subscriptions.

        Duplicate ids keep the last record (compacted-topic semantics). Places need finite
        ``lon``/``lat`` (lon is wrapped into [-180, 180)) and ``radius_m >= 0``. Zones take
        ``geometry`` (GeoJSON geometry or Feature) if present, else the gazetteer ``zone``
        code; they must be polygonal. Anything else goes to ``unresolved``.
        """
        latest = {sub.id: sub for sub in subscriptions}
        places: list[Subscription] = []
        zones: list[tuple[Subscription, BaseGeometry, object]] = []
        unresolved: list[Unresolved] = []
        for sub in latest.values():
            if sub.kind == "place":
                places.append(sub)
            elif sub.kind == "zone":
                geom, key, problem = _zone_geometry(sub, gazetteer)
                if geom is None:
                    unresolved.append(Unresolved(sub.id, problem))
                else:
                    zones.append((sub, geom, key))
            else:
                unresolved.append(Unresolved(sub.id, f"unknown kind {sub.kind!r}"))
        # Validate places vectorised; only the (rare) bad rows pay for a Python message.
        lon = np.array([s.lon for s in places], dtype=np.float64)
        lat = np.array([s.lat for s in places], dtype=np.float64)
        radius = np.array([s.radius_m for s in places], dtype=np.float64)
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(lon) & np.isfinite(lat) & (np.abs(lat) <= 90.0)
            ok &= np.isfinite(radius) & (radius >= 0.0)
        if not ok.all():
            unresolved += [
                Unresolved(places[i].id, _place_problem(places[i]))
                for i in np.flatnonzero(~ok).tolist()
            ]
            places = [places[i] for i in np.flatnonzero(ok).tolist()]
        return cls(places, zones, unresolved)

    def __len__(self) -> int:
        """Number of indexed (resolved) subscriptions."""
        return len(self.subscriptions)

    # -- queries ------------------------------------------------------------------------

    def match_positions(self, area: BaseGeometry | None) -> IntArray:
        """Positions (into :attr:`subscriptions`) of every subscription ``area`` reaches.

        ``area`` is WGS84 lon/lat within +-180 (antimeridian-crossing areas split, as
        :mod:`geofencing.areas` produces them). Places come first, then zones; the order
        within each is the index order, not the input order.
        """
        if area is None or area.is_empty:
            return np.empty(0, dtype=np.int64)
        poly = polygonal(area)
        if poly is not None:
            area = poly
        shapely.prepare(area)
        return np.concatenate([self._match_places(area), self._match_zones(area)])

    def match(self, area: BaseGeometry | None) -> list[str]:
        """Subscriber ids reached by ``area``."""
        return list(self.ids[self.match_positions(area)])

    def records(self, positions: IntArray) -> list[Subscription]:
        """The subscription records at ``positions`` (channels, language, ...)."""
        subs = self.subscriptions
        return [subs[i] for i in positions.tolist()]

    def channel_counts(self, positions: IntArray) -> dict[str, int]:
        """How many of ``positions`` want each channel."""
        return {
            ch: int(np.count_nonzero(mask[positions])) for ch, mask in self._channel_mask.items()
        }

    def _match_places(self, area: BaseGeometry) -> IntArray:
        return self._grid.match(area)

    def _match_zones(self, area: BaseGeometry) -> IntArray:
        hit = self._zones.match(area)
        return ranges_to_index(self._zone_start[hit], self._zone_stop[hit])


def _channel_bits(channels: Sequence[str]) -> int:
    return sum(1 << k for k, ch in enumerate(CHANNELS) if ch in channels)


def _place_problem(sub: Subscription) -> str:
    """Why a place subscription cannot be indexed."""
    if sub.lon is None or sub.lat is None:
        return "place without lon/lat"
    if not (math.isfinite(sub.lon) and math.isfinite(sub.lat)) or abs(sub.lat) > 90.0:
        return f"invalid place coordinates ({sub.lon}, {sub.lat})"
    return f"invalid radius_m {sub.radius_m}"


def _zone_geometry(
    sub: Subscription, gazetteer: ZoneLookup | None
) -> tuple[BaseGeometry | None, object, str]:
    """(geometry, dedup key, problem) for a zone subscription."""
    if sub.geometry is not None:
        geom, problem = geojson_to_geometry(sub.geometry)
        return geom, None if geom is None else shapely.to_wkb(geom), problem
    if sub.zone:
        if gazetteer is None:
            return None, None, f"zone code {sub.zone!r} but no gazetteer"
        found = gazetteer.get(sub.zone)
        if found is None:
            return None, None, f"unknown zone code {sub.zone!r}"
        return found, id(found), ""
    return None, None, "zone without code or geometry"


def preview(index: SubscriptionIndex, area: BaseGeometry | None) -> dict[str, object]:
    """Dry-run count of who an area would reach: totals and per channel."""
    pos = index.match_positions(area)
    places = int(np.count_nonzero(pos < index.n_places))
    return {
        "subscribers": len(pos),
        "places": places,
        "zones": len(pos) - places,
        "channels": index.channel_counts(pos),
    }
