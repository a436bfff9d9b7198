"""Zone subscriptions: distinct zone geometries and the overlap test against an alert area.

**Semantics.** A zone matches when its interior overlaps the area's interior by more than
a sliver: ``overlap > max(1 m2, 1e-4 x the smaller of the two areas)``, areas in the
approximate m2 of :func:`geofencing.geodesy.approx_area_m2` (planar deg2 x cos(centroid
latitude)). The overlap of a zone the area covers is the zone's own area.

**Speed without changing an answer.** A county alert meets hundreds of custom zones; each
candidate from the tree has its overlap measured by compiled code
(:mod:`geofencing.overlap`): a zone whose envelope meets no edge of the area is wholly
inside (overlap = its own area) or wholly outside (0), which one vertex decides; the
others are clipped against the area's edges (~4 us against a county). Where clipping
meets a degenerate configuration (shared vertices, collinear borders: zones cut from the
same boundary data as the area) the GEOS overlay decides; a big zone first tries
``covers`` (overlap = its area) and ``relate_pattern`` (interiors meet at all?), cheaper
than its overlay.
"""

from __future__ import annotations

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
        return cand[self._overlap(area, cand) > tol]

    def _overlap(self, area: BaseGeometry, z: IntArray) -> FloatArray:
        """Overlap (approximate m2) of zones ``z`` with ``area``: compiled edge clipping
        (:mod:`geofencing.overlap`), and the GEOS overlay where that is degenerate."""
        overlap = overlap_m2(self.rings, z, Rings([area]), self.area_m2)
        bad = np.isnan(overlap)
        if bad.any():
            overlap[bad] = self._overlay(area, z[bad])
        return overlap

    def _overlay(self, area: BaseGeometry, z: IntArray) -> FloatArray:
        """Overlap (approximate m2) of zones ``z`` with ``area``, by overlay.

        These are the degenerate cases of the clipping: mostly zones cut from the same
        boundary data as the area (the alerted county itself, its neighbours), so the
        cheaper tests come first: the area covers the zone (overlap = its area), or their
        interiors do not meet (a neighbour sharing a border: 0).
        """
        zones = self.geoms[z]
        overlap = np.zeros(len(z), dtype=np.float64)
        covered = np.asarray(shapely.covers(area, zones))
        overlap[covered] = self.area_m2[z[covered]]
        part = np.flatnonzero(~covered)
        part = part[shapely.relate_pattern(zones[part], area, "T********")]
        inter = shapely.intersection(zones[part], area)
        some = ~shapely.is_empty(inter)  # (an empty result has no centroid to measure at)
        overlap[part[some]] = approx_area_m2(inter[some])
        return overlap
