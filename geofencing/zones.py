"""Zone subscriptions: distinct zone geometries and the overlap test against an alert area.

**Semantics.** A zone matches when its interior overlaps the area's interior by more than
a sliver: ``overlap > max(1 m2, 1e-4 x the smaller of the two areas)``, areas in the
approximate m2 of :func:`geofencing.geodesy.approx_area_m2` (planar deg2 x cos(centroid
latitude)). The overlap of a zone the area covers is the zone's own area.

**Speed without changing an answer.** A county alert meets hundreds of custom zones, so
when there are more than a few candidates most are decided from exact lon/lat facts, and
only the zones the area's boundary may cross have their overlap measured:

1. The area's boundary, cut into pieces of at most 0.1 deg, is queried against the zone
   tree: a zone whose envelope meets no piece's envelope lies wholly inside or wholly
   outside the area, which one point of it decides (``intersects_xy``): inside means
   covered (overlap = its area), outside means no overlap.
2. The rest have their overlap measured by compiled edge clipping
   (:mod:`geofencing.overlap`, ~4 us against a county) and, where that meets a degenerate
   configuration (shared vertices or collinear borders), by the GEOS overlay; a big zone
   first tries ``covers`` (overlap = its area) and ``relate_pattern`` (interiors meet at
   all?), cheaper than its overlay.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry.base import BaseGeometry

from geofencing.geodesy import approx_area_m2
from geofencing.overlap import Rings, overlap_m2

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

ZONE_OVERLAP_REL_TOL: Final = 1e-4
ZONE_OVERLAP_MIN_M2: Final = 1.0
# Up to this many candidates, overlays straight away (not Final: the property test sets it
# to -1 to check the fast path on small examples).
DIRECT_ZONES: int = 24
SMALL_ZONE_VERTICES: Final = 64  # up to this size, an overlay beats covers + relate first
PIECE_DEG: Final = 0.1  # boundary pieces (degrees): fewer, longer pieces query faster
_EPS: Final = 1e-9  # degrees: piece envelopes grow by this so rounding cannot hide a crossing
_M2_PER_DEG2: Final = (math.pi / 180.0 * 6_371_008.8) ** 2  # approx_area_m2's constant


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
        self.rings = Rings(self.geoms)
        # One interior point per zone decides the zones the boundary cannot cross.
        probe = shapely.point_on_surface(self.geoms)
        self.px: FloatArray = np.asarray(shapely.get_x(probe), dtype=np.float64)
        self.py: FloatArray = np.asarray(shapely.get_y(probe), dtype=np.float64)

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
        crossed = np.zeros(len(self.geoms), dtype=bool)
        crossed[self.tree.query(shapely.box(*_grown(seg).T))[1]] = True

        # 1. Envelope clear of the boundary: wholly inside (covered) or wholly outside.
        clear = np.flatnonzero(~crossed[cand])
        z = cand[clear]
        inside = np.asarray(shapely.intersects_xy(area, self.px[z], self.py[z]))
        ok[clear] = inside & (self.area_m2[z] > tol[clear])

        # 2. The boundary may cross it: measure the overlap.
        maybe = np.flatnonzero(crossed[cand])
        if len(maybe):
            ok[maybe] = self._overlap(area, cand[maybe]) > tol[maybe]
        return cand[ok]

    def _overlap(self, area: BaseGeometry, z: IntArray) -> FloatArray:
        """Overlap (approximate m2) of zones ``z`` with ``area``: compiled edge clipping
        (:mod:`geofencing.overlap`), and the GEOS overlay where that is degenerate."""
        overlap = overlap_m2(self.rings, z, Rings([area]))
        bad = np.isnan(overlap)
        if bad.any():
            overlap[bad] = self._overlay(area, z[bad])
        return overlap

    def _overlay(self, area: BaseGeometry, z: IntArray) -> FloatArray:
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
