"""Match an alert area against every subscription at once.

:class:`SubscriptionIndex` is built once from the ``subscriptions`` table and never
mutated; rebuild (or build a delta index) when subscriptions change.

**Places** (``kind="place"``) live in numpy arrays ``lon``/``lat``/``radius_m`` sorted by a
Morton (Z-order) code on a 2^24 x 2^24 lon/lat grid, so every quadtree cell is one
contiguous slice found with ``np.searchsorted``. A query walks the quadtree from the cells
covering the area's bounding box (expanded by the largest radius, converted conservatively
to degrees): empty cells cost nothing, cells wholly inside the area are accepted as whole
slices without touching their points, cells that cannot come within the largest radius of
the area are dropped, and only points in boundary cells (or cells of <= 64 points) reach
the exact predicate. A place matches when its geodesic distance to the area is <=
``radius_m``: ``shapely.intersects_xy`` (inside or on the boundary) and, for the rest
with a radius, ``shapely.dwithin`` in an azimuthal-equidistant frame centred on the area
(error bound in :class:`geofencing.geodesy.LocalFrame`: ~1e-4 of the radius for county-
sized areas). No Python loop runs over subscribers.

**Zones** (``kind="zone"``: a gazetteer code or a custom GeoJSON geometry) are
deduplicated by geometry and put in a ``shapely.STRtree``. A zone matches when its
interior overlaps the area's interior by more than a sliver: the overlap, in approximate
m2, must exceed ``ZONE_OVERLAP_REL_TOL`` (1e-4) of the smaller of the two areas and
``ZONE_OVERLAP_MIN_M2`` (1 m2). Zones that only share a border (overlap 0) never match,
nor does a 25-hectare sliver between two 2 500 km2 counties whose borders were digitised
differently; yet a small alert lying inside a huge zone does match, because the tolerance
scales with the *smaller* area.

Match results are integer positions into :attr:`SubscriptionIndex.subscriptions` (places
first, in Morton order, then zones grouped by geometry); :meth:`SubscriptionIndex.match`
turns them into subscriber ids and :meth:`SubscriptionIndex.records` into records.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from geofencing.geodesy import (
    degree_margins,
    polygonal,
    split_antimeridian,
    within_distance,
    wrap_lon,
)
from streams.records import CHANNELS, Subscription

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
CodeArray = npt.NDArray[np.uint64]

LEVELS: Final = 24  # quadtree depth: finest cell 360/2**24 deg of lon (~2 m)
LEAF_POINTS: Final = 64  # cells this small go straight to the exact predicate
ZONE_OVERLAP_REL_TOL: Final = 1e-4
ZONE_OVERLAP_MIN_M2: Final = 1.0
_M2_PER_DEG2: Final = (math.pi / 180.0 * 6_371_008.8) ** 2  # mean-radius sphere
_EPS: Final = 1e-9  # degrees: cells grow by this before "wholly inside" so rounding can't lie
# Places are grouped by radius class (upper bounds, metres; class 0 is radius 0) ahead of
# the Morton code, so a walk only widens its search by the radii actually in each class.
RADIUS_CLASSES_M: Final = np.array([0.0, 500.0, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 1e6])
_BUCKET_SHIFT: Final = 2 * LEVELS
_START_EXTRA: Final = 2  # start 2 levels below the one whose cell covers the box


class ZoneLookup(Protocol):
    """What the index needs from a gazetteer: ``"SCHEME:value"`` -> geometry."""

    def get(self, code: str) -> BaseGeometry | None: ...


@dataclass(frozen=True, slots=True)
class Unresolved:
    """A subscription left out of the index, and why."""

    id: str
    reason: str


def approx_area_m2(geoms: npt.ArrayLike) -> FloatArray:
    """Approximate areas in m2 of lon/lat geometries (planar deg2 scaled at the centroid
    latitude). Within ~1 % for county-sized shapes; only used for sliver thresholds."""
    arr = np.asarray(geoms, dtype=object)
    lat = shapely.get_y(shapely.centroid(arr))
    scale = _M2_PER_DEG2 * np.cos(np.radians(np.nan_to_num(lat)))
    return np.asarray(shapely.area(arr) * scale, dtype=np.float64)


def _spread(v: CodeArray) -> CodeArray:
    """Insert a zero bit between each of the low 32 bits (Morton interleave helper)."""
    v = v & np.uint64(0xFFFFFFFF)
    v = (v | (v << np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
    v = (v | (v << np.uint64(8))) & np.uint64(0x00FF00FF00FF00FF)
    v = (v | (v << np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    v = (v | (v << np.uint64(2))) & np.uint64(0x3333333333333333)
    return (v | (v << np.uint64(1))) & np.uint64(0x5555555555555555)


def _morton(ix: npt.ArrayLike, iy: npt.ArrayLike) -> CodeArray:
    """Z-order code: x bits on even positions, y bits on odd positions."""
    x = _spread(np.asarray(ix, dtype=np.uint64))
    y = _spread(np.asarray(iy, dtype=np.uint64))
    return x | (y << np.uint64(1))


def _cell(lon: FloatArray, lat: FloatArray, level: int) -> tuple[IntArray, IntArray]:
    """Integer cell coordinates of points on the 2**level grid."""
    n = 1 << level
    ix = np.clip(np.floor((lon + 180.0) * (n / 360.0)), 0, n - 1).astype(np.int64)
    iy = np.clip(np.floor((lat + 90.0) * (n / 180.0)), 0, n - 1).astype(np.int64)
    return ix, iy


def _ranges_to_index(starts: IntArray, stops: IntArray) -> IntArray:
    """Concatenate ``arange(s, e)`` for every (s, e) pair without a Python loop."""
    lengths = stops - starts
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) - np.repeat(offsets - starts, lengths)


def _part_bounds(area: BaseGeometry) -> list[FloatArray]:
    """Bounds of the area's parts, grouped east/west if the area straddles +-180."""
    bounds = shapely.bounds(shapely.get_parts(area))
    if bounds[:, 2].max() - bounds[:, 0].min() <= 180.0:
        return [bounds]
    east = (bounds[:, 0] + bounds[:, 2]) >= 0.0
    return [b for b in (bounds[east], bounds[~east]) if len(b)]


def _query_boxes(
    groups: list[FloatArray], dlon: float, dlat: float
) -> list[tuple[float, float, float, float]]:
    """Lon/lat boxes (within +-180) covering each bounds group grown by (dlon, dlat).

    An antimeridian-split area gets one box per side instead of a globe-wide one, and a
    grown box that spills over +-180 is wrapped into two.
    """
    boxes: list[tuple[float, float, float, float]] = []
    for g in groups:
        x0, x1 = float(g[:, 0].min()) - dlon, float(g[:, 2].max()) + dlon
        y0 = max(-90.0, float(g[:, 1].min()) - dlat)
        y1 = min(90.0, float(g[:, 3].max()) + dlat)
        if x1 - x0 >= 360.0:
            boxes.append((-180.0, y0, 180.0, y1))
        elif x0 < -180.0:
            boxes += [(x0 + 360.0, y0, 180.0, y1), (-180.0, y0, x1, y1)]
        elif x1 > 180.0:
            boxes += [(-180.0, y0, x1 - 360.0, y1), (x0, y0, 180.0, y1)]
        else:
            boxes.append((x0, y0, x1, y1))
    return boxes


def _start_cells(
    boxes: list[tuple[float, float, float, float]],
) -> tuple[int, IntArray, IntArray]:
    """The coarsest level at which each box spans <= START_SPAN cells a side, and those
    cells. Starting this deep skips the top levels where every cell would just be split.

    One level for all boxes of a class, so start cells never nest (no double counting).
    """
    level = LEVELS
    for x0, y0, x1, y1 in boxes:
        w, h = max(x1 - x0, 1e-12), max(y1 - y0, 1e-12)
        fit = math.floor(min(math.log2(360.0 / w), math.log2(180.0 / h)))
        level = min(level, fit + _START_EXTRA)
    level = min(max(level, 0), LEVELS)
    ixs, iys = [], []
    for x0, y0, x1, y1 in boxes:
        (ix0, ix1), (iy0, iy1) = _cell(np.array([x0, x1]), np.array([y0, y1]), level)
        gx, gy = np.meshgrid(np.arange(ix0, ix1 + 1), np.arange(iy0, iy1 + 1))
        ixs.append(gx.ravel())
        iys.append(gy.ravel())
    cells = np.unique(np.column_stack([np.concatenate(ixs), np.concatenate(iys)]), axis=0)
    return level, cells[:, 0].astype(np.int64), cells[:, 1].astype(np.int64)


def _near(
    area: BaseGeometry, x0: FloatArray, y0: FloatArray, x1: FloatArray, y1: FloatArray
) -> npt.NDArray[np.bool_]:
    """Whether each (radius-grown) cell box touches the area, modulo 360 in lon."""
    y0, y1 = np.maximum(y0, -90.0), np.minimum(y1, 90.0)
    out = np.asarray(shapely.intersects(area, shapely.box(x0, y0, x1, y1)))
    for shift, over in ((-360.0, x1 > 180.0), (360.0, x0 < -180.0)):
        todo = over & ~out
        if todo.any():
            wrapped = shapely.box(x0[todo] + shift, y0[todo], x1[todo] + shift, y1[todo])
            out[todo] = shapely.intersects(area, wrapped)
    return out


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
        # Sort by (radius class, Morton code): each class is a contiguous run, so the
        # quadtree walk grows its search box by that class's radius, not the global max.
        bucket = np.searchsorted(RADIUS_CLASSES_M, radius).astype(np.uint64)
        ix, iy = _cell(lon, lat, LEVELS)
        codes = (bucket << np.uint64(_BUCKET_SHIFT)) | _morton(ix, iy)
        order = np.argsort(codes, kind="stable")
        self._codes: CodeArray = codes[order]
        self.lon: FloatArray = lon[order]
        self.lat: FloatArray = lat[order]
        self.radius_m: FloatArray = radius[order]
        self.n_places = len(places)
        self._bucket_radius = {  # class -> largest radius actually present in it
            int(b): float(radius[bucket == b].max()) for b in np.unique(bucket)
        }

        # Zones: one tree entry per distinct geometry; subscribers of a geometry are a
        # contiguous run of positions so a hit expands with _ranges_to_index.
        groups: dict[object, list[Subscription]] = {}
        geoms: dict[object, BaseGeometry] = {}
        for sub, geom, key in zones:
            groups.setdefault(key, []).append(sub)
            geoms.setdefault(key, geom)
        zone_subs = [s for members in groups.values() for s in members]
        sizes = np.array([len(v) for v in groups.values()], dtype=np.int64)
        self._zone_geoms = np.array(list(geoms.values()), dtype=object)
        self._zone_area = approx_area_m2(self._zone_geoms)
        self._zone_stop = self.n_places + np.cumsum(sizes)
        self._zone_start = self._zone_stop - sizes
        self._tree = shapely.STRtree(self._zone_geoms)
        self.n_zones = len(zone_subs)

        self.subscriptions: tuple[Subscription, ...] = (
            *(places[i] for i in order.tolist()),
            *zone_subs,
        )
        self.ids: npt.NDArray[np.object_] = np.array(
            [s.id for s in self.subscriptions], dtype=object
        )
        bits = np.array([_channel_bits(s.channels) for s in self.subscriptions], dtype=np.uint8)
        self._channel_mask = {ch: (bits & (1 << k)) != 0 for k, ch in enumerate(CHANNELS)}
        self.unresolved: tuple[Unresolved, ...] = tuple(unresolved)
        for arr in (self._codes, self.lon, self.lat, self.radius_m, self.ids):
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
            ch: int(np.count_nonzero(mask[positions]))
            for ch, mask in self._channel_mask.items()
        }

    def _match_places(self, area: BaseGeometry) -> IntArray:
        if self.n_places == 0:
            return np.empty(0, dtype=np.int64)
        accept, cand = self._walk(area)
        idx = _ranges_to_index(*cand)
        lon, lat = self.lon[idx], self.lat[idx]
        hit = np.asarray(shapely.intersects_xy(area, lon, lat))
        radius = self.radius_m[idx]
        near = ~hit & (radius > 0.0)
        if near.any():
            hit[near] = within_distance(area, lon[near], lat[near], radius[near])
        return np.concatenate([_ranges_to_index(*accept), idx[hit]])

    def _walk(self, area: BaseGeometry) -> tuple[tuple[IntArray, IntArray], ...]:
        """Quadtree descent over every radius class at once.

        Returns (accepted slices, candidate slices), each as (starts, stops) arrays.
        Nodes carry their own class, level and degree margins so one vectorised pass per
        depth serves all classes.
        """
        groups = _part_bounds(area)
        max_abs_lat = max(float(np.abs(g[:, [1, 3]]).max()) for g in groups)
        cols: list[list[npt.NDArray[np.generic]]] = [[] for _ in range(6)]
        for b, radius in self._bucket_radius.items():
            dlon, dlat = degree_margins(radius, max_abs_lat)
            level, cix, ciy = _start_cells(_query_boxes(groups, dlon, dlat))
            n = len(cix)
            for col, val in zip(
                cols,
                (np.full(n, b), np.full(n, level), cix, ciy, np.full(n, dlon), np.full(n, dlat)),
                strict=True,
            ):
                col.append(val)
        bucket, level, ix, iy = (np.concatenate(c).astype(np.int64) for c in cols[:4])
        dlon, dlat = (np.concatenate(c).astype(np.float64) for c in cols[4:])

        acc_s, acc_e, cand_s, cand_e = [], [], [], []
        codes = self._codes
        # key = class bits above the cell's 2*level-bit Morton prefix, so that at `level`
        # a cell's points are the codes in [key << shift, (key + 1) << shift) and a
        # child's key is (key << 2) | quadrant.
        key = (bucket.astype(np.uint64) << (2 * level).astype(np.uint64)) | _morton(ix, iy)
        while len(ix):
            shift = (2 * (LEVELS - level)).astype(np.uint64)
            bounds = np.searchsorted(codes, np.concatenate([key << shift, (key + 1) << shift]))
            start, stop = bounds[: len(key)].astype(np.int64), bounds[len(key) :].astype(np.int64)
            # Every non-empty cell is classified (a box test costs about as much as the
            # exact test of two or three points): wholly inside -> accept the slice;
            # out of reach -> drop; on the boundary -> split, or test its points once
            # the cell holds <= LEAF_POINTS.
            live = np.flatnonzero(stop > start)
            key, level, ix, iy = key[live], level[live], ix[live], iy[live]
            dlon, dlat, start, stop = dlon[live], dlat[live], start[live], stop[live]
            cw = 360.0 / np.left_shift(1, level).astype(np.float64)
            x0, y0 = ix * cw - 180.0, iy * (cw / 2.0) - 90.0
            x1, y1 = x0 + cw, y0 + cw / 2.0
            relevant = _near(area, x0 - dlon, y0 - dlat, x1 + dlon, y1 + dlat)
            r = np.flatnonzero(relevant)
            inside = np.zeros(len(live), dtype=bool)
            inside[r] = shapely.contains(
                area,
                shapely.box(x0[r] - _EPS, y0[r] - _EPS, x1[r] + _EPS, y1[r] + _EPS),
            )
            acc_s.append(start[inside])
            acc_e.append(stop[inside])
            edge = relevant & ~inside
            leaf = edge & ((stop - start <= LEAF_POINTS) | (level >= LEVELS))
            cand_s.append(start[leaf])
            cand_e.append(stop[leaf])
            split = np.flatnonzero(edge & ~leaf)
            # Four children per split cell, in Morton order (dx, dy) = 00, 10, 01, 11.
            rep = np.repeat(split, 4)
            quad = np.tile(np.arange(4, dtype=np.int64), len(split))
            key = (key[rep] << np.uint64(2)) | quad.astype(np.uint64)
            level, dlon, dlat = level[rep] + 1, dlon[rep], dlat[rep]
            ix, iy = ix[rep] * 2 + (quad & 1), iy[rep] * 2 + (quad >> 1)
        empty = [np.empty(0, dtype=np.int64)]
        return (
            (np.concatenate(acc_s + empty), np.concatenate(acc_e + empty)),
            (np.concatenate(cand_s + empty), np.concatenate(cand_e + empty)),
        )

    def _match_zones(self, area: BaseGeometry) -> IntArray:
        if len(self._zone_geoms) == 0:
            return np.empty(0, dtype=np.int64)
        cand = self._tree.query(area, predicate="intersects")
        if len(cand) == 0:
            return np.empty(0, dtype=np.int64)
        zones = self._zone_geoms[cand]
        zone_area = self._zone_area[cand]
        area_m2 = float(approx_area_m2([area])[0])
        if area_m2 <= 0.0:  # a line/point "area": interiors must still meet
            ok = np.asarray(shapely.relate_pattern(zones, area, "T********"))
        else:
            overlap = np.empty(len(cand), dtype=np.float64)
            # Cheap exact case first: zone wholly inside the area overlaps by its own area.
            within = np.asarray(shapely.contains_properly(area, zones))
            overlap[within] = zone_area[within]
            rest = ~within
            overlap[rest] = approx_area_m2(shapely.intersection(zones[rest], area))
            tol = np.maximum(
                ZONE_OVERLAP_MIN_M2, ZONE_OVERLAP_REL_TOL * np.minimum(zone_area, area_m2)
            )
            ok = overlap > tol
        hit = cand[ok]
        return _ranges_to_index(self._zone_start[hit], self._zone_stop[hit])


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
        data: object = sub.geometry
        if isinstance(data, dict) and data.get("type") == "Feature":
            data = data.get("geometry")
        try:
            geom = shape(data)
        except Exception as exc:  # shapely raises a zoo of types on bad GeoJSON
            return None, None, f"invalid zone geometry: {exc}"
        if geom.is_empty or not np.isfinite(geom.bounds).all() or abs(geom.bounds[1]) > 90:
            return None, None, "zone geometry empty or out of range"
        if not geom.is_valid:
            geom = shapely.make_valid(geom)
        poly = polygonal(geom)
        if poly is None or poly.area <= 0.0:
            return None, None, "zone geometry has no area"
        if poly.bounds[0] < -180.0 or poly.bounds[2] > 180.0:
            poly = split_antimeridian(poly)
        return poly, shapely.to_wkb(poly), ""
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
