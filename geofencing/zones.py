"""Zone subscriptions: distinct zone geometries and the overlap test against an alert area.

**Semantics.** A zone matches when its interior overlaps the area's interior by more than
a sliver: ``overlap > max(1 m2, 1e-4 x the smaller of the two areas)``, areas in the
approximate m2 of :func:`geofencing.geodesy.approx_area_m2` (planar deg2 x cos(centroid
latitude)). The overlap of a zone the area covers is the zone's own area.

**Speed without changing an answer.** An overlay (``shapely.intersection``) of a small zone
with a county costs ~20 us, and a county alert meets hundreds of custom zones, so when
there are more than a few candidates most are decided from exact lon/lat facts first, and
only the rest pay for the overlay:

1. The area's boundary, cut into pieces of at most 0.1 deg, is queried against the zone
   tree: a zone whose envelope meets no piece's envelope lies wholly inside or wholly
   outside the area, which one point of it decides (``intersects_xy``): inside means
   covered (overlap = its area), outside means no overlap.
2. A zone the boundary may cross is accepted if a disc around one of its precomputed
   interior probe points lies inside both the zone (radius ``rho``: the probe's planar
   distance to the zone's boundary) and the area (the probe's distance to the boundary
   pieces near the zone: any boundary point closer than ``rho`` lies in the zone's
   envelope): the overlap is then at least the disc, ``pi r^2`` deg2 x cos(the zone's
   largest latitude) in the same approximate m2 (:func:`disc_area_lower_bound_m2`), and
   if that bound already exceeds the tolerance the zone matches.
3. The rest pay for the overlay's approximate area; a big zone first tries ``covers``
   (overlap = its area) and ``relate_pattern`` (interiors meet at all?), which for a
   county-sized zone are cheaper than its overlay.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry.base import BaseGeometry

from geofencing.arrays import group_min, ranges_to_index
from geofencing.geodesy import approx_area_m2

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

ZONE_OVERLAP_REL_TOL: Final = 1e-4
ZONE_OVERLAP_MIN_M2: Final = 1.0
# Up to this many candidates, overlays straight away (not Final: the property test sets it
# to -1 to check the fast path on small examples).
DIRECT_ZONES: int = 24
SMALL_ZONE_VERTICES: Final = 64  # up to this size, an overlay beats covers + relate first
PIECE_DEG: Final = 0.1  # boundary pieces (degrees): fewer, longer pieces query faster
_GRID: Final = np.array([1.0, 3.0, 5.0]) / 6.0  # probe grid over a zone's envelope
_EPS: Final = 1e-9  # degrees: piece envelopes grow by this so rounding cannot hide a crossing
_M2_PER_DEG2: Final = (math.pi / 180.0 * 6_371_008.8) ** 2  # approx_area_m2's constant


def disc_area_lower_bound_m2(r_deg: npt.ArrayLike, cos_max: npt.ArrayLike) -> FloatArray:
    """A lower bound, in approximate m2, of any region containing a planar disc of radius
    ``r_deg`` degrees whose points all have cos(latitude) >= ``cos_max``.

    approx_area_m2 is planar deg2 x K x cos(centroid latitude); the region has at least
    pi r^2 deg2 and its centroid's cos(latitude) is at least ``cos_max``.
    """
    r = np.asarray(r_deg, dtype=np.float64)
    return np.asarray(math.pi * r * r * _M2_PER_DEG2 * np.asarray(cos_max) * (1.0 - 1e-9))


def tolerance_m2(zone_m2: npt.ArrayLike, area_m2: float) -> FloatArray:
    """The sliver tolerance: ``max(1 m2, 1e-4 x the smaller area)``."""
    smaller = np.minimum(np.asarray(zone_m2, dtype=np.float64), area_m2)
    return np.asarray(np.maximum(ZONE_OVERLAP_MIN_M2, ZONE_OVERLAP_REL_TOL * smaller))


class ZoneSet:
    """Immutable distinct zone geometries (polygonal, WGS84) with an STRtree and probes."""

    def __init__(self, geoms: Sequence[BaseGeometry]) -> None:
        self.geoms = np.array(list(geoms), dtype=object)
        self.area_m2 = approx_area_m2(self.geoms)
        self.vertices = shapely.get_num_coordinates(self.geoms)
        self.tree = shapely.STRtree(self.geoms)
        # Probes: the zone's interior point (first) plus the centres of its envelope's
        # quadrants that fall inside it (more probes, more straddling zones decided
        # without an overlay), each with its planar distance to the zone's boundary.
        bounds = shapely.bounds(self.geoms).reshape(-1, 4)
        first = shapely.point_on_surface(self.geoms)
        fx, fy = np.meshgrid(_GRID, _GRID)
        qx = bounds[:, [0]] + (bounds[:, [2]] - bounds[:, [0]]) * fx.ravel()
        qy = bounds[:, [1]] + (bounds[:, [3]] - bounds[:, [1]]) * fy.ravel()
        px = np.column_stack([shapely.get_x(first), qx]).ravel()
        py = np.column_stack([shapely.get_y(first), qy]).ravel()
        per = 1 + len(_GRID) ** 2
        owner = np.repeat(np.arange(len(self.geoms)), per)
        keep = np.asarray(shapely.contains_xy(self.geoms[owner], px, py))
        keep[::per] = True  # GEOS's interior point: inside (on the rim only when degenerate)
        self.probe_zone: IntArray = owner[keep]
        self.px: FloatArray = px[keep]
        self.py: FloatArray = py[keep]
        rims = shapely.boundary(self.geoms)[self.probe_zone]
        self.rho = np.asarray(shapely.distance(shapely.points(self.px, self.py), rims))
        counts = np.bincount(self.probe_zone, minlength=len(self.geoms))
        self.probe_first: IntArray = np.cumsum(counts) - counts
        self.probe_count: IntArray = counts
        top = np.minimum(np.maximum(np.abs(bounds[:, 1]), np.abs(bounds[:, 3])), 90.0)
        self.cos_max = np.cos(np.radians(top))  # the smallest cos(latitude) in the zone

    def __len__(self) -> int:
        return len(self.geoms)

    def match(self, area: BaseGeometry) -> IntArray:
        """Indices of the zones whose interior overlaps ``area`` beyond the tolerance."""
        cand = self.tree.query(area)
        if len(cand) == 0:
            return np.empty(0, dtype=np.int64)
        area_m2 = float(approx_area_m2([area])[0])
        if area_m2 <= 0.0:  # a line/point "area": interiors must still meet
            cand = cand[shapely.intersects(self.geoms[cand], area)]
            return cand[shapely.relate_pattern(self.geoms[cand], area, "T********")]
        tol = tolerance_m2(self.area_m2[cand], area_m2)
        ok = np.zeros(len(cand), dtype=bool)
        if len(cand) <= DIRECT_ZONES:  # few candidates: the overlays cost less than the set-up
            ok[:] = self._overlap(area, cand) > tol
            return cand[ok]
        seg = _boundary_pieces(area)
        pair_piece, pair_zone = self.tree.query(shapely.box(*_grown(seg).T))
        crossed = np.zeros(len(self.geoms), dtype=bool)
        crossed[pair_zone] = True

        # 1. Envelope clear of the boundary: wholly inside (covered) or wholly outside.
        clear = np.flatnonzero(~crossed[cand])
        z = self.probe_first[cand[clear]]
        inside = np.asarray(shapely.intersects_xy(area, self.px[z], self.py[z]))
        ok[clear] = inside & (self.area_m2[cand[clear]] > tol[clear])

        # 2. A disc around a probe inside both: a lower bound of the overlap.
        maybe = np.flatnonzero(crossed[cand])
        if len(maybe) == 0:
            return cand[ok]
        ok[maybe] = self._disc_bound(area, cand[maybe], tol[maybe], seg, pair_piece, pair_zone)

        # 3. The rest: the overlay.
        rest = maybe[~ok[maybe]]
        ok[rest] = self._overlap(area, cand[rest]) > tol[rest]
        return cand[ok]

    def _overlap(self, area: BaseGeometry, z: IntArray) -> FloatArray:
        """Overlap (approximate m2) of zones ``z`` with ``area``, by overlay.

        A big zone (a county...) tries cheaper tests first: the area covers it (overlap =
        its area), or their interiors do not meet (a neighbour sharing a border: 0). A
        small zone goes straight to the overlay, then cheaper than the tests and saying
        the same (a covered zone's intersection is itself, a touching one's has no area).
        """
        zones = self.geoms[z]
        overlap = np.zeros(len(z), dtype=np.float64)
        big = self.vertices[z] > SMALL_ZONE_VERTICES
        covered = np.zeros(len(z), dtype=bool)
        covered[big] = shapely.covers(area, zones[big])
        overlap[covered] = self.area_m2[z[covered]]
        part = np.flatnonzero(~covered)
        meet = ~big[part]
        meet[~meet] = shapely.relate_pattern(zones[part[~meet]], area, "T********")
        part = part[meet]
        inter = shapely.intersection(zones[part], area)
        some = ~shapely.is_empty(inter)  # (an empty result has no centroid to measure at)
        overlap[part[some]] = approx_area_m2(inter[some])
        return overlap

    def _disc_bound(
        self,
        area: BaseGeometry,
        z: IntArray,
        tol: FloatArray,
        seg: FloatArray,
        pair_piece: IntArray,
        pair_zone: IntArray,
    ) -> npt.NDArray[np.bool_]:
        """Whether a disc around one of its probes proves zone ``z[i]`` overlaps > tol[i]."""
        slot = np.full(len(self.geoms), -1, dtype=np.int64)
        slot[z] = np.arange(len(z))
        keep = np.flatnonzero(slot[pair_zone] >= 0)
        zs, pieces = slot[pair_zone[keep]], pair_piece[keep]
        order = np.argsort(zs, kind="stable")
        zs, pieces = zs[order], pieces[order]
        n_piece = np.bincount(zs, minlength=len(z))
        n_probe = self.probe_count[z]
        probe = ranges_to_index(self.probe_first[z], self.probe_first[z] + n_probe)
        owner = np.repeat(np.arange(len(z)), n_probe)
        # (probe, piece) pairs: each probe of a zone meets every piece near that zone.
        k = n_piece[owner]
        pair_probe = np.repeat(np.arange(len(probe)), k)
        offset = np.arange(len(pair_probe)) - np.repeat(np.cumsum(k) - k, k)
        first = np.repeat((np.cumsum(n_piece) - n_piece)[owner], k)
        px, py = self.px[probe], self.py[probe]
        d2 = _piece_dist2(seg[pieces[first + offset]], px[pair_probe], py[pair_probe])
        near = np.sqrt(group_min(d2, pair_probe, len(probe)))
        # (less 1e-12 deg, ~1e-7 m, for the rounding of the pieces' cut points)
        r = np.maximum(np.minimum(self.rho[probe], near) - 1e-12, 0.0)
        inside = np.asarray(shapely.intersects_xy(area, px, py))
        good = inside & (disc_area_lower_bound_m2(r, self.cos_max[z[owner]]) > tol[owner])
        out = np.zeros(len(z), dtype=bool)
        out[owner[good]] = True
        return out


def _boundary_pieces(area: BaseGeometry) -> FloatArray:
    """Segments ``[ax, ay, bx, by]`` of the (polygonal) area's rings cut to <= PIECE_DEG."""
    rings = shapely.get_rings(shapely.get_parts(area))
    xy, ring = shapely.get_coordinates(shapely.segmentize(rings, PIECE_DEG), return_index=True)
    same = ring[1:] == ring[:-1]
    return np.column_stack([xy[:-1][same], xy[1:][same]])


def _grown(seg: FloatArray) -> FloatArray:
    """Envelopes ``[x0, y0, x1, y1]`` of segments, grown by _EPS."""
    lo = np.minimum(seg[:, :2], seg[:, 2:]) - _EPS
    hi = np.maximum(seg[:, :2], seg[:, 2:]) + _EPS
    return np.column_stack([lo, hi])


def _piece_dist2(seg: FloatArray, px: FloatArray, py: FloatArray) -> FloatArray:
    """Squared planar distance from (px[i], py[i]) to segment ``seg[i]``."""
    ax, ay = seg[:, 0], seg[:, 1]
    dx, dy = seg[:, 2] - ax, seg[:, 3] - ay
    len2 = dx * dx + dy * dy
    t = np.divide((px - ax) * dx + (py - ay) * dy, len2, out=np.zeros_like(len2), where=len2 > 0)
    np.clip(t, 0.0, 1.0, out=t)
    ex, ey = px - ax - t * dx, py - ay - t * dy
    return np.asarray(ex * ex + ey * ey)
