"""Place subscriptions: Morton-sorted coordinate arrays and the quadtree walk that matches
them against an alert area.

**Layout.** ``lon``/``lat``/``radius_m`` sorted by (radius class, Morton code on a 2^24 x
2^24 lon/lat grid): every quadtree cell of a class is one contiguous slice.

**Semantics.** Radius 0: ``shapely.intersects_xy(area, lon, lat)`` (boundary included).
Radius ``r > 0``: inside, or the distance to the area in an azimuthal-equidistant
:class:`~geofencing.geodesy.LocalFrame` centred on the area is ``<= r`` (the geodesic
distance to ~1e-4 of ``r`` for county-sized areas).

**Walk.** A query starts from the cells (two levels below the one that fits the area's
bbox grown by the largest radius) and walks down depth first, compiled with numba
(:mod:`geofencing.walk`). A cell is accepted whole (all its points match), dropped
whole, or split; small or undecidable cells become leaves whose points are tested one by
one. Verdicts come from the distance between the cell centre and the *boundary* of the
projected area, against a list of boundary segments that shrinks as the walk descends
(see below), and from inside tests by ray parity in lon/lat for cells and points more
than :data:`MARGIN_M` from the boundary; the few points within it go to GEOS
(``intersects_xy``). No shapely geometry is created per cell or per point.

**Segment lists** (the invariant that keeps this exact). Every cell carries a list ``L``
of boundary segments such that for every point ``p`` of the cell with boundary distance
``d(p) <= T`` (``T`` = largest radius + :data:`MARGIN_M`), the segment nearest to ``p`` is
in ``L``. The root lists hold every segment. With ``D`` = the smallest distance from the
cell centre to a segment of ``L`` and ``h`` an upper bound of the frame distance from the
centre to any point of the cell, every ``p`` in the cell has ``d(p) >= min(D - h, T)``
and ``d(p) <= D + h``; a segment farther than ``min(D + 2h, T + h)`` from the centre can
be nobody's nearest relevant segment, so children inherit the list filtered by that bound.
At a leaf, the minimum over the list equals ``d(p)`` whenever ``d(p) <= T``, and exceeds
``T`` (hence every radius) otherwise: the per-point test ``min <= r`` is exact.

Lon/lat versus frame: shapely treats edges as straight in lon/lat; the projected area is
densified first (see ``LocalFrame.project``) so the two boundaries differ by ~0.1 m.
Verdicts that must agree with the lon/lat test keep :data:`MARGIN_M` (10 m) away from the
projected boundary; anything closer is decided per point with ``intersects_xy``.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry.base import BaseGeometry

from geofencing.arrays import grid_cell, group_min, morton, ranges_to_index
from geofencing.geodesy import BOW_M, DENSIFY_DEG, LocalFrame, covering_boxes, unit_vectors
from geofencing.walk import project_rings, start_nodes, walk

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
CodeArray = npt.NDArray[np.uint64]
AnyFloats = npt.NDArray[np.floating[Any]]
Box = tuple[float, float, float, float]  # lon/lat x0, y0, x1, y1

LEVELS: Final = 24  # quadtree depth: finest cell 360/2**24 deg of lon (~2 m)
# Cells this small go to the per-point test (radius 0; radius classes). Not Final: the
# property test shrinks them to force deep walks.
LEAF_POINTS: int = 128
LEAF_POINTS_RADIUS: int = 64
DIRECT_PLACES: int = 256  # this few places near an area are tested directly, no walk
MARGIN_M: Final = 10.0  # keep lon/lat-sensitive verdicts this far from the frame boundary
# Places are grouped by radius class (upper bounds, metres; class 0 is radius 0) ahead of
# the Morton code, so a walk only widens its search by the radii actually in each class.
RADIUS_CLASSES_M: Final = np.array([0.0, 1e3, 5e3, 2e4, 1e5, 1e6])
_BUCKET_SHIFT: Final = 2 * LEVELS
_START_EXTRA: Final = 2  # the walk starts 2 levels below the box's (_start_level)
_EPS: Final = 1e-9  # degrees: lon/lat cell boxes grow by this (float rounding of edges)


def _fit_level(boxes: list[Box]) -> int:
    """The deepest level whose cell is at least as large as every box."""
    level = LEVELS
    for x0, y0, x1, y1 in boxes:
        w, h = max(x1 - x0, 1e-12), max(y1 - y0, 1e-12)
        level = min(level, math.floor(min(math.log2(360.0 / w), math.log2(180.0 / h))))
    return min(max(level, 0), LEVELS)


def _start_cells(
    boxes: list[Box], level: int
) -> tuple[IntArray, IntArray]:
    """The cells of ``level`` covering the boxes, in Morton order.

    One level for all boxes, so start cells never nest (no double counting); Morton order
    keeps the walk's keys sorted (``np.searchsorted`` is faster on sorted needles).
    """
    n = 1 << level
    gx, gy = [], []
    for x0, y0, x1, y1 in boxes:  # the arithmetic of grid_cell, on scalars
        ix0, ix1 = (min(max(math.floor((x + 180.0) * (n / 360.0)), 0), n - 1) for x in (x0, x1))
        iy0, iy1 = (min(max(math.floor((y + 90.0) * (n / 180.0)), 0), n - 1) for y in (y0, y1))
        gx.append(np.tile(np.arange(ix0, ix1 + 1), iy1 - iy0 + 1))
        gy.append(np.repeat(np.arange(iy0, iy1 + 1), ix1 - ix0 + 1))
    ix, iy = np.concatenate(gx), np.concatenate(gy)
    _, first = np.unique(morton(ix, iy), return_index=True)  # sorted, boxes may overlap
    return ix[first], iy[first]


def _start_level(
    codes: CodeArray, classes: IntArray, boxes: list[Box]
) -> tuple[int, IntArray, IntArray]:
    """Where to start the walk, and the ranges of the places in the cells of the level
    that fits the boxes (at most four per box; they decide whether to walk at all).

    The compiled walk pays little per node, so it starts shallow (_START_EXTRA levels
    below the fitting level, at most 16 cells per box): deeper starts hand every start
    cell the whole boundary, and its points then measure against all of it. Measured on
    Iowa counties at 1M places: +2 levels 1.4 ms, +0 1.9 ms, the earlier count-based
    depth (up to +5) 2.2 ms.
    """
    level = _fit_level(boxes)
    ix, iy = _start_cells(boxes, level)
    shift = np.uint64(2 * (LEVELS - level))
    cells = morton(ix, iy)
    key = np.concatenate([(np.uint64(c) << np.uint64(2 * level)) | cells for c in classes])
    found = np.searchsorted(codes, np.concatenate([key << shift, (key + np.uint64(1)) << shift]))
    start, stop = found[: len(key)].astype(np.int64), found[len(key) :].astype(np.int64)
    return min(level + _START_EXTRA, LEVELS), start, stop


class Boundary:
    """The segments of a projected (frame metres) geometry's boundary: polygon rings, and
    the lines and points themselves for a (degenerate) line or point area.

    Kept as five contiguous columns ``ax, ay, dx, dy, 1/|d|^2``: gathering columns with
    ``np.take`` and computing on contiguous arrays is ~10x faster than slicing the
    columns of a gathered ``(P, 5)`` array (strided views).
    """

    def __init__(self, projected: BaseGeometry) -> None:
        parts = shapely.get_parts(projected)
        while (multi := shapely.get_type_id(parts) >= 4).any():  # Multi*, collections
            parts = np.concatenate([parts[~multi], shapely.get_parts(parts[multi])])
        kind = shapely.get_type_id(parts)  # 0 point, 1 line, 2 ring, 3 polygon
        lines = np.concatenate(
            [shapely.get_rings(parts[kind == 3]), parts[(kind == 1) | (kind == 2)]]
        )
        xy, ring = shapely.get_coordinates(lines, return_index=True)
        same = ring[1:] == ring[:-1]
        dots = shapely.get_coordinates(parts[kind == 0])  # a point: a zero-length segment
        a = np.vstack([xy[:-1][same], dots])
        self._set(a, np.vstack([xy[1:][same], dots]) - a)

    @classmethod
    def from_rings(cls, x: FloatArray, y: FloatArray, ring: IntArray) -> Boundary:
        """The boundary of projected polygon rings given as vertex arrays."""
        self = cls.__new__(cls)
        same = ring[1:] == ring[:-1]
        a = np.column_stack([x[:-1][same], y[:-1][same]])
        self._set(a, np.column_stack([x[1:][same], y[1:][same]]) - a)
        return self

    def _set(self, a: FloatArray, d: FloatArray) -> None:
        len2 = d[:, 0] ** 2 + d[:, 1] ** 2
        inv = np.divide(1.0, len2, out=np.zeros_like(len2), where=len2 > 0.0)
        self.matrix: FloatArray = np.ascontiguousarray(
            np.vstack([a[:, 0], a[:, 1], d[:, 0], d[:, 1], inv])
        )
        self.cols: tuple[FloatArray, ...] = tuple(self.matrix)
        self.n = len(inv)

    def dist2(self, px: FloatArray, py: FloatArray, seg: IntArray) -> FloatArray:
        """Squared distance from each point (px[i], py[i]) to segment ``seg[i]``."""
        ax, ay, dx, dy, inv = (np.take(c, seg) for c in self.cols)
        wx, wy = px - ax, py - ay
        t = (wx * dx + wy * dy) * inv
        np.clip(t, 0.0, 1.0, out=t)  # nearest point of the segment, as a fraction of it
        wx -= t * dx
        wy -= t * dy
        return np.asarray(wx * wx + wy * wy)


class PlaceGrid:
    """Immutable Morton-sorted place arrays and the exact vectorised matcher over them.

    ``order`` maps sorted positions to the caller's input positions (``lon`` here is
    ``lon_in[order]``).
    """

    def __init__(self, lon: FloatArray, lat: FloatArray, radius: FloatArray) -> None:
        bucket = np.searchsorted(RADIUS_CLASSES_M, radius).astype(np.uint64)
        ix, iy = grid_cell(lon, lat, LEVELS)
        codes = (bucket << np.uint64(_BUCKET_SHIFT)) | morton(ix, iy)
        order = np.argsort(codes, kind="stable")
        self.order: IntArray = order
        self.codes: CodeArray = codes[order]
        self.lon: FloatArray = lon[order]
        self.lat: FloatArray = lat[order]
        self.radius_m: FloatArray = radius[order]
        # Unit vectors: projecting a place into a query's frame needs no trigonometry.
        self.unit: tuple[FloatArray, ...] = unit_vectors(self.lon, self.lat)
        # class -> (smallest, largest) radius actually present in it
        self.classes = {
            int(b): (float(radius[bucket == b].min()), float(radius[bucket == b].max()))
            for b in np.unique(bucket)
        }
        for arr in (self.order, self.codes, self.lon, self.lat, self.radius_m, *self.unit):
            arr.flags.writeable = False

    def __len__(self) -> int:
        return len(self.codes)

    def match(self, area: BaseGeometry) -> IntArray:
        """Sorted-order positions of the places ``area`` reaches (``area`` prepared)."""
        if len(self.codes) == 0:
            return np.empty(0, dtype=np.int64)
        if max(self.classes) == 0:  # radius 0 only: lon/lat boxes suffice, no frame
            return _plain_walk(self, area)
        return _Walk(self, area, LocalFrame.for_geometry(area)).run()


def _plain_walk(grid: PlaceGrid, area: BaseGeometry) -> IntArray:
    """The walk when every place has radius 0: cells are lon/lat boxes tested against the
    (prepared) area itself - no frame, no distances - and leaves use ``intersects_xy``."""
    boxes = covering_boxes(area, 0.0)
    level = min(_fit_level(boxes) + 3, LEVELS)
    ix, iy = _start_cells(boxes, level)
    key = morton(ix, iy)
    accepted, cand = [], []
    while len(key):
        shift = np.uint64(2 * (LEVELS - level))
        found = np.searchsorted(grid.codes, np.concatenate([key << shift, (key + 1) << shift]))
        start, stop = found[: len(key)].astype(np.int64), found[len(key) :].astype(np.int64)
        live = np.flatnonzero(stop > start)
        key, ix, iy, start, stop = key[live], ix[live], iy[live], start[live], stop[live]
        cw = 360.0 / (1 << level)
        x0, y0 = ix * cw - 180.0, iy * (cw / 2.0) - 90.0
        # Grown by _EPS degrees so float rounding of cell edges can never wrongly accept.
        boxes = shapely.box(x0 - _EPS, y0 - _EPS, x0 + cw + _EPS, y0 + cw / 2.0 + _EPS)
        meets = np.asarray(shapely.intersects(area, boxes))
        inside = np.zeros(len(key), dtype=bool)
        inside[meets] = shapely.contains(area, boxes[meets])
        accepted.append((start[inside], stop[inside]))
        edge = meets & ~inside
        leaf = edge & ((stop - start <= LEAF_POINTS) | (level >= LEVELS))
        cand.append((start[leaf], stop[leaf]))
        split = np.flatnonzero(edge & ~leaf)
        quad = np.tile(np.arange(4, dtype=np.int64), len(split))
        key = (np.repeat(key[split], 4) << np.uint64(2)) | quad.astype(np.uint64)
        ix, iy = np.repeat(ix[split], 4) * 2 + (quad & 1), np.repeat(iy[split], 4) * 2 + (quad >> 1)
        level += 1
    acc = ranges_to_index(*(np.concatenate([a[i] for a in accepted]) for i in (0, 1)))
    idx = ranges_to_index(*(np.concatenate([c[i] for c in cand]) for i in (0, 1)))
    return np.concatenate([acc, idx[shapely.intersects_xy(area, grid.lon[idx], grid.lat[idx])]])


class _Walk:
    """One query's quadtree descent (see the module docstring for the rules): the start
    nodes are built here, the descent itself runs compiled (:func:`geofencing.walk.walk`).
    """

    def __init__(self, grid: PlaceGrid, area: BaseGeometry, frame: LocalFrame) -> None:
        self.grid, self.area, self.frame = grid, area, frame
        lam0 = math.radians(frame.lon0)
        self.fr = np.array([frame.lon0, frame._sin0, frame._cos0, frame.n_radius,
                            frame.m_radius, math.sin(lam0), math.cos(lam0)])
        self._rings: tuple[FloatArray, FloatArray, IntArray, IntArray] | None = None
        if area.geom_type in ("Polygon", "MultiPolygon") and not area.is_empty:
            # LocalFrame.project's arithmetic, compiled; the shapely geometry is built
            # only if a point lands within the margin (see ``projected``).
            parts = shapely.get_parts(shapely.segmentize(area, DENSIFY_DEG))
            rings, owner = shapely.get_rings(parts, return_index=True)
            xy, ring = shapely.get_coordinates(rings, return_index=True)
            # Lon/lat edges for the inside test (the segmentized edges: collinear pieces
            # of the same edges, so parity is unchanged).
            same = ring[1:] == ring[:-1]
            a, b = xy[:-1][same], xy[1:][same]
            self.edges: FloatArray = np.ascontiguousarray(np.vstack([a.T, (b - a).T]))
            x, y, ring = project_rings(xy, ring, self.fr, BOW_M)
            self._rings = (x, y, ring, owner)
            self.boundary = Boundary.from_rings(x, y, ring)
        else:  # a line or point area: nothing is inside it
            self.edges = np.empty((4, 0), dtype=np.float64)
            self.boundary = Boundary(self.projected)

    @cached_property
    def projected(self) -> BaseGeometry:
        """The area in the frame (as :meth:`LocalFrame.project`), prepared."""
        if self._rings is None:
            projected = self.frame.project(self.area)
        else:
            x, y, ring, owner = self._rings
            polys = shapely.polygons(
                shapely.linearrings(np.column_stack([x, y]), indices=ring), indices=owner
            )
            multi = self.area.geom_type == "MultiPolygon"
            projected = shapely.multipolygons(polys) if multi else polys[0]
        shapely.prepare(projected)
        return projected

    def run(self) -> IntArray:
        grid = self.grid
        classes = np.array(list(grid.classes), dtype=np.int64)
        bounds = np.array(list(grid.classes.values()), dtype=np.float64).reshape(-1, 2)
        r_top = float(bounds[:, 1].max())
        boxes = covering_boxes(self.area, r_top)
        level = min(_fit_level(boxes) + _START_EXTRA, LEVELS)
        cix, ciy, key, start, stop = start_nodes(
            grid.codes, np.array(boxes, dtype=np.float64), classes, level, LEVELS
        )
        if int((stop - start).sum()) <= DIRECT_PLACES:
            return self._direct(ranges_to_index(start, stop))
        rep = np.repeat(np.arange(len(classes)), len(cix) // len(classes))
        limit = np.where(classes[rep] == 0, LEAF_POINTS, LEAF_POINTS_RADIUS).astype(np.int64)
        fr = self.fr
        ranges, n_ranges, hits, n_hits, rest, n_rest = walk(
            grid.codes, grid.lon, grid.lat, grid.radius_m, *grid.unit,
            self.boundary.matrix, self.edges, fr, level, cix, ciy, key, start, stop,
            bounds[rep, 0], bounds[rep, 1], limit, r_top + MARGIN_M, MARGIN_M, LEVELS,
        )
        out = [ranges_to_index(ranges[:n_ranges, 0], ranges[:n_ranges, 1]), hits[:n_hits]]
        if n_rest:  # the few points within the margin of the boundary: shapely decides
            i = rest[:n_rest, 0].astype(np.int64)
            inside = shapely.intersects_xy(self.area, grid.lon[i], grid.lat[i])
            ring = rest[:n_rest, 3] > 0.0
            inside[ring] |= shapely.intersects_xy(
                self.projected, rest[:n_rest, 1][ring], rest[:n_rest, 2][ring]
            )
            out.append(i[inside])
        return np.concatenate(out)

    def _direct(self, idx: IntArray) -> IntArray:
        """Few places near the area: test each against every segment, no walk."""
        grid = self.grid
        hit = np.asarray(shapely.intersects_xy(self.area, grid.lon[idx], grid.lat[idx]))
        idx_r = idx[~hit & (grid.radius_m[idx] > 0.0)]
        x, y = self.frame.forward_unit(*(u[idx_r] for u in grid.unit))
        m = self.boundary.n
        point = np.repeat(np.arange(len(idx_r)), m)
        d2 = group_min(self.boundary.dist2(x[point], y[point], np.tile(np.arange(m), len(idx_r))),
                       point, len(idx_r))
        near = d2 <= grid.radius_m[idx_r] ** 2
        near |= np.asarray(shapely.intersects_xy(self.projected, x, y))
        return np.concatenate([idx[hit], idx_r[near]])

