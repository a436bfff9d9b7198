"""Place subscriptions: Morton-sorted coordinate arrays and the quadtree walk that matches
them against an alert area.

**Layout.** ``lon``/``lat``/``radius_m`` sorted by (radius class, Morton code on a 2^24 x
2^24 lon/lat grid): every quadtree cell of a class is one contiguous slice.

**Semantics.** Radius 0: ``shapely.intersects_xy(area, lon, lat)`` (boundary included).
Radius ``r > 0``: inside, or the distance to the area in an azimuthal-equidistant
:class:`~geofencing.geodesy.LocalFrame` centred on the area is ``<= r`` (the geodesic
distance to ~1e-4 of ``r`` for county-sized areas).

**Walk.** A query starts from cells covering the area's bbox grown by the largest radius
and walks down, every class and cell vectorised per depth. A cell is accepted whole (all
its points match), dropped whole, or split; small or undecidable cells become leaves whose
points are tested one by one, still vectorised. Verdicts come from the distance between
the cell centre and the *boundary* of the projected area, in numpy, against a list of
boundary segments that shrinks as the walk descends (see :class:`Boundary`): no shapely
geometry is created per cell or per point, which is what made radius subscriptions cost
~1 us each before (a shapely point is ~0.5 us to create, a prepared ``dwithin`` ~0.2 us).

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
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry.base import BaseGeometry

from geofencing.arrays import grid_cell, group_min, morton, ranges_to_index
from geofencing.geodesy import LocalFrame, covering_boxes, unit_vectors

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
_START_EXTRA: Final = 5  # the walk starts at most 5 levels below the box's (_start_level)
_R_MIN: Final = 6_356_752.0  # polar radius: overestimates angles, so distortion bounds hold
_MAX_C: Final = 3.0  # beyond ~19 000 km from the frame centre no distortion bound is used
_EPS: Final = 1e-9  # degrees: lon/lat cell boxes grow by this (float rounding of edges)
_BIG_M: Final = 1e9  # metres: beyond any frame distance, to sort (leaf, distance) as one key


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
    """Where to start the walk: deep enough that start cells hold about a leaf of points;
    also the ranges of the places in the cells of the level that fits the boxes.

    Starting too high costs a numpy pass per level over cells that would all be split;
    too deep, many cells and their segment lists for nothing. Count the places in the
    (at most four per box) cells of the level that fits the boxes, one searchsorted per
    class and cell, and go down log4(count / leaf) levels, between 2 and _START_EXTRA.
    """
    level = _fit_level(boxes)
    ix, iy = _start_cells(boxes, level)
    shift = np.uint64(2 * (LEVELS - level))
    cells = morton(ix, iy)
    key = np.concatenate([(np.uint64(c) << np.uint64(2 * level)) | cells for c in classes])
    found = np.searchsorted(codes, np.concatenate([key << shift, (key + np.uint64(1)) << shift]))
    start, stop = found[: len(key)].astype(np.int64), found[len(key) :].astype(np.int64)
    extra = round(math.log(max(float((stop - start).sum()), 1.0) / LEAF_POINTS_RADIUS, 4))
    return min(level + min(max(extra, 2), _START_EXTRA), LEVELS), start, stop


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
        d = np.vstack([xy[1:][same], dots]) - a
        len2 = d[:, 0] ** 2 + d[:, 1] ** 2
        inv = np.divide(1.0, len2, out=np.zeros_like(len2), where=len2 > 0.0)
        self.cols: tuple[FloatArray, ...] = tuple(
            np.ascontiguousarray(c) for c in (a[:, 0], a[:, 1], d[:, 0], d[:, 1], inv)
        )
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


def _cell_bounds(
    x0: AnyFloats, y0: AnyFloats, cw: float, px: FloatArray, py: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Frame-metre bounds for cells: ``h``, and metres per degree of lon and of lat.

    A point ``dlon, dlat`` degrees from a cell's centre is at most
    ``hypot(dlon * wscale, dlat * hscale) + 2`` frame metres from it, and ``h`` bounds that
    over the whole cell (the half-diagonal). The scales are conservative degree lengths
    (the widest parallel of the cell; the longest degree of latitude) times the frame's
    largest scale distortion over the cell (k = c / sin c at the cell's farthest angular
    distance c from the frame centre), plus 1 % (ellipsoid vs sphere); the 2 m cover float
    rounding of cell edges and the lon/lat-vs-frame edge bow. Cells too far from the frame
    centre for a bound get ``inf``: they are never decided whole.
    """
    ch = cw / 2.0
    south, north = y0, y0 + ch
    low = np.where(south * north <= 0.0, 0.0, np.minimum(abs(south), abs(north)))
    wide = 111_325.0 * np.cos(np.radians(low))
    half = np.hypot(cw / 2.0 * wide, ch / 2.0 * 111_700.0)
    c = (np.hypot(px, py) + half) / _R_MIN
    k = np.divide(c, np.sin(np.minimum(c, _MAX_C)), out=np.ones_like(c), where=c > 1e-9)
    k = np.where(c < _MAX_C, k * 1.01, np.inf)
    return half * k + 2.0, wide * k, 111_700.0 * k


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
        frame = LocalFrame.for_geometry(area)
        projected = frame.project(area)
        shapely.prepare(projected)
        walk = _Walk(self, area, frame, projected)
        return walk.run()


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
    """One query's quadtree descent (see the module docstring for the rules).

    Nodes are (radius class, cell) pairs; the geometry of a cell (centre, ``h``, ``D``,
    inside flag, segment list) is computed once per level and shared by its classes.
    """

    def __init__(
        self, grid: PlaceGrid, area: BaseGeometry, frame: LocalFrame, projected: BaseGeometry
    ) -> None:
        self.grid, self.area, self.frame, self.projected = grid, area, frame, projected
        self.boundary = Boundary(projected)
        self.accepted: list[tuple[IntArray, IntArray]] = []
        self.plain: list[tuple[IntArray, IntArray]] = []
        # Leaves of radius classes ("ring" leaves), one tuple of columns per level: start,
        # stop, may hold inside points, list length, D, centre lon/lat, wscale, hscale.
        self.ring: list[tuple[npt.NDArray[Any], ...]] = []
        self.ring_segs: list[IntArray] = []
        self.ring_seg_d: list[FloatArray] = []  # each segment's distance to its leaf's centre

    def run(self) -> IntArray:
        grid = self.grid
        classes = np.array(list(grid.classes), dtype=np.int64)
        bounds = np.array(list(grid.classes.values()), dtype=np.float64).reshape(-1, 2)
        r_top = float(bounds[:, 1].max())
        threshold = r_top + MARGIN_M  # T of the segment-list invariant
        boxes = covering_boxes(self.area, r_top)
        level, near_start, near_stop = _start_level(grid.codes, classes, boxes)
        if int((near_stop - near_start).sum()) <= DIRECT_PLACES:
            return self._direct(ranges_to_index(near_start, near_stop))
        cix, ciy = _start_cells(boxes, level)
        n_cells, n_segs = len(cix), self.boundary.n
        pair_cell = np.repeat(np.arange(n_cells), n_segs)
        pair_seg = np.tile(np.arange(n_segs), n_cells)
        rep = np.repeat(np.arange(len(classes)), n_cells)
        node_cell = np.tile(np.arange(n_cells), len(classes))
        r_lo, r_hi = bounds[rep, 0], bounds[rep, 1]
        limit = np.where(classes[rep] == 0, LEAF_POINTS, LEAF_POINTS_RADIUS)
        # key = class bits above the cell's 2*level-bit Morton prefix: at `level` a
        # cell's points are the codes in [key << shift, (key + 1) << shift), and a
        # child's key is (key << 2) | quadrant.
        cell_code = morton(cix, ciy)[node_cell]
        key = (classes[rep].astype(np.uint64) << np.uint64(2 * level)) | cell_code
        codes = grid.codes
        shift = np.uint64(2 * (LEVELS - level))
        found = np.searchsorted(codes, np.concatenate([key << shift, (key + 1) << shift]))
        start, stop = found[: len(key)].astype(np.int64), found[len(key) :].astype(np.int64)
        while True:
            live = np.flatnonzero(stop > start)
            key, node_cell, limit = key[live], node_cell[live], limit[live]
            r_lo, r_hi, start, stop = r_lo[live], r_hi[live], start[live], stop[live]
            # Keep only the cells some live node still uses, renumbered in order.
            used = np.zeros(n_cells, dtype=bool)
            used[node_cell] = True
            renum = np.cumsum(used) - 1
            cells = np.flatnonzero(used)
            cix, ciy, node_cell = cix[cells], ciy[cells], renum[node_cell]
            keep = used[pair_cell]
            pair_cell, pair_seg = renum[pair_cell[keep]], pair_seg[keep]
            n_cells = len(cells)

            cw = 360.0 / (1 << level)
            x0, y0 = cix * cw - 180.0, ciy * (cw / 2.0) - 90.0
            px, py = self.frame.forward(x0 + cw / 2.0, y0 + cw / 4.0)
            h, wscale, hscale = _cell_bounds(x0, y0, cw, px, py)
            d2 = self.boundary.dist2(px[pair_cell], py[pair_cell], pair_seg)
            dist = np.sqrt(group_min(d2, pair_cell, n_cells))
            inside = np.asarray(shapely.intersects_xy(self.projected, px, py))
            # Shrink the lists (invariant in the module docstring); children inherit them.
            bound = np.minimum(dist + 2.0 * h, threshold + h)
            keep = d2 <= (bound * bound)[pair_cell]
            pair_cell, pair_seg, pair_d2 = pair_cell[keep], pair_seg[keep], d2[keep]

            d, hh, inn = dist[node_cell], h[node_cell], inside[node_cell]
            low = d - hh  # every point's boundary distance is >= min(low, T)
            ring = r_hi > 0.0
            accept = inn & (low > MARGIN_M)
            accept |= ring & ((d + hh <= r_lo) | (inn & (hh <= r_lo)))
            drop = ~inn & (low > r_hi + MARGIN_M)
            edge = ~accept & ~drop
            # Outside, beyond r_lo yet within r_hi everywhere: no descendant can be
            # accepted or dropped whole, so splitting would only cost node tests.
            band = ring & ~inn & (low > r_lo) & (d + hh <= r_hi)
            leaf = edge & ((stop - start <= limit) | band | (level >= LEVELS))
            self.accepted.append((start[accept], stop[accept]))
            plain_leaf = leaf & ~ring
            self.plain.append((start[plain_leaf], stop[plain_leaf]))
            ring_leaf = np.flatnonzero(leaf & ring)
            if len(ring_leaf):
                counts = np.bincount(pair_cell, minlength=n_cells)
                first = (np.cumsum(counts) - counts)[node_cell[ring_leaf]]
                k = counts[node_cell[ring_leaf]]
                at = ranges_to_index(first, first + k)
                self.ring_segs.append(pair_seg[at])
                self.ring_seg_d.append(np.sqrt(pair_d2[at]))
                cell, r = node_cell[ring_leaf], ring_leaf
                may_inside = inn[r] | ~(low[r] > MARGIN_M)  # (nan-safe)
                centre = (x0[cell] + cw / 2.0, y0[cell] + cw / 4.0)
                columns = (start[r], stop[r], may_inside, k, d[r], *centre)
                self.ring.append((*columns, wscale[cell], hscale[cell]))

            split = np.flatnonzero(edge & ~leaf)
            if len(split) == 0:  # (always so at LEVELS: every edge node is a leaf there)
                break
            # Children: four per split cell (Morton order (dx, dy) = 00, 10, 01, 11), each
            # inheriting the cell's list; four per split node, pointing at them.
            split_cell = np.zeros(n_cells, dtype=bool)
            split_cell[node_cell[split]] = True
            rank = np.cumsum(split_cell) - 1
            parents = np.flatnonzero(split_cell)
            counts = np.bincount(pair_cell, minlength=n_cells)
            first = np.cumsum(counts) - counts
            p_first, p_count = np.repeat(first[parents], 4), np.repeat(counts[parents], 4)
            pair_seg = pair_seg[ranges_to_index(p_first, p_first + p_count)]
            pair_cell = np.repeat(np.arange(4 * len(parents)), p_count)
            quad4 = np.tile(np.arange(4, dtype=np.int64), len(parents))
            cix = np.repeat(cix[parents], 4) * 2 + (quad4 & 1)
            ciy = np.repeat(ciy[parents], 4) * 2 + (quad4 >> 1)
            n_cells = len(cix)
            rep = np.repeat(split, 4)
            quad = np.tile(np.arange(4, dtype=np.int64), len(split))
            key = (key[rep] << np.uint64(2)) | quad.astype(np.uint64)
            node_cell = rank[node_cell[rep]] * 4 + quad
            r_lo, r_hi, limit = r_lo[rep], r_hi[rep], limit[rep]
            level += 1
            # A child's points lie within its parent's range: quadrant 0 starts where the
            # parent starts, quadrant q stops where q + 1 starts, quadrant 3 stops where
            # the parent stops; so three searches per parent instead of eight.
            start, stop = np.repeat(start[split], 4), np.repeat(stop[split], 4)
            inner = quad != 0
            shift = np.uint64(2 * (LEVELS - level))
            start[inner] = np.searchsorted(codes, key[inner] << shift)
            stop[:-1] = np.where(quad[:-1] != 3, start[1:], stop[:-1])
        return self._finish()

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

    def _finish(self) -> IntArray:
        grid, out = self.grid, []
        acc_s, acc_e = (np.concatenate([a[i] for a in self.accepted]) for i in (0, 1))
        out.append(ranges_to_index(acc_s, acc_e))
        if self.plain:
            idx = ranges_to_index(*(np.concatenate([p[i] for p in self.plain]) for i in (0, 1)))
            out.append(idx[shapely.intersects_xy(self.area, grid.lon[idx], grid.lat[idx])])
        if self.ring:
            out.append(self._ring_hits())
        return np.concatenate(out)

    def _ring_hits(self) -> IntArray:
        """Per-point test of the ring leaves: boundary distance <= radius, or inside.

        A point ``delta`` frame metres from its leaf's centre has a boundary distance
        within ``D +- delta`` (or beyond every radius): radii outside that window are
        decided without projecting the point; the others are measured against the
        segments of the leaf's list that can be within their radius.
        """
        grid = self.grid
        start, stop, may_inside, k, dist, clon, clat, wscale, hscale = (
            np.concatenate([r[i] for r in self.ring]) for i in range(9)
        )
        segs = np.concatenate(self.ring_segs)
        n = stop - start
        idx = ranges_to_index(start, stop)
        leaf = np.repeat(np.arange(len(start)), n)
        dx = (grid.lon[idx] - clon[leaf]) * wscale[leaf]
        dy = (grid.lat[idx] - clat[leaf]) * hscale[leaf]
        delta = np.hypot(dx, dy) + 2.0
        radius = grid.radius_m[idx]
        centre = dist[leaf]
        hit = radius >= centre + delta
        # (nan, from a cell without a distortion bound, compares False: tested exactly)
        exact = np.flatnonzero(~hit & (~(radius < centre - delta) | may_inside[leaf]))
        idx_e, leaf_e = idx[exact], leaf[exact]
        x, y = self.frame.forward_unit(*(u[idx_e] for u in grid.unit))
        # A segment within r of the point is within r + delta of the centre, so each point
        # meets only the head of its leaf's list sorted by distance to the centre: sort
        # keys "leaf * BIG + distance" (+1 m for the keys' rounding), one searchsorted.
        seg_first = np.cumsum(k) - k
        owner = np.repeat(np.arange(len(k)), k)
        sort_key = owner * _BIG_M + np.concatenate(self.ring_seg_d)
        order = np.argsort(sort_key, kind="stable")
        segs, sort_key = segs[order], sort_key[order]
        reach = radius[exact] + delta[exact] + 1.0
        reach = leaf_e * _BIG_M + np.where(np.isfinite(reach), reach, _BIG_M)  # nan: all
        kp = np.minimum(np.searchsorted(sort_key, reach, side="right"), (seg_first + k)[leaf_e])
        kp -= seg_first[leaf_e]
        point = np.repeat(np.arange(len(exact)), kp)
        offset = np.arange(len(point)) - np.repeat(np.cumsum(kp) - kp, kp)
        seg = segs[np.repeat(seg_first[leaf_e], kp) + offset]
        d2 = group_min(self.boundary.dist2(x[point], y[point], seg), point, len(exact))
        near = d2 <= radius[exact] ** 2
        hit[exact] = near
        rest = np.flatnonzero(~near & may_inside[leaf_e])
        if len(rest):
            i = idx_e[rest]
            inside = shapely.intersects_xy(self.area, grid.lon[i], grid.lat[i])
            inside |= shapely.intersects_xy(self.projected, x[rest], y[rest])
            hit[exact[rest]] = inside
        return idx[hit]
