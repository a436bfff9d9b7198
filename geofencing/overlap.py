"""Overlap areas of zones with an alert area, compiled (numba), with GEOS as the fallback.

The zone rule (:mod:`geofencing.zones`) needs, for a zone that straddles the area's
boundary, the approximate m2 of ``zone & area``. A GEOS overlay costs ~40 us for a
10-vertex zone against a county, and a county alert meets dozens of such zones. Here the
area and first moments of the intersection come from Green's theorem instead: the
intersection's boundary is made of the pieces of each polygon's edges that lie inside the
other, so with rings oriented (shells counter-clockwise, holes clockwise)

    2 * area = sum over those pieces of (x0 * y1 - x1 * y0)

and the centroid's latitude from the same sums (``approx_area_m2`` scales by
cos(centroid latitude)). Each edge is cut at its crossings with the other polygon's
edges and each piece is kept if its midpoint is inside the other polygon (ray parity).

This is exact in general position. Where it is not - an edge crossing at or next to a
vertex, collinear overlapping edges (two zones digitised from the same border) - the
kernel returns NaN and the caller uses the GEOS overlay, so answers never depend on a
degenerate floating-point decision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import shapely
from numba import njit
from shapely.geometry.base import BaseGeometry

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

_M2_PER_DEG2 = (math.pi / 180.0 * 6_371_008.8) ** 2  # approx_area_m2's constant
_EPS = 1e-9  # crossings this close (as edge fractions) to a vertex are "degenerate"
_ROWS = 64


class Rings:
    """Oriented rings of polygonal geometries as flat arrays (shells counter-clockwise,
    holes clockwise): ``xy`` rows, ``start`` (ring offsets into ``xy``, one extra at the
    end), ``first`` (geometry offsets into the rings, one extra) and ``box`` per geometry.
    """

    def __init__(self, geoms: Sequence[BaseGeometry] | npt.NDArray[np.object_]) -> None:
        arr = shapely.orient_polygons(np.asarray(geoms, dtype=object), exterior_cw=False)
        parts, part_owner = shapely.get_parts(arr, return_index=True)
        rings, ring_part = shapely.get_rings(parts, return_index=True)
        xy, ring = shapely.get_coordinates(rings, return_index=True)
        self.xy: FloatArray = np.ascontiguousarray(xy)
        counts = np.bincount(ring, minlength=len(rings))
        self.start: IntArray = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        ring_owner = part_owner[ring_part]
        per_geom = np.bincount(ring_owner, minlength=len(arr))
        self.first: IntArray = np.concatenate([[0], np.cumsum(per_geom)]).astype(np.int64)
        self.box: FloatArray = np.ascontiguousarray(shapely.bounds(arr).reshape(-1, 4))


def overlap_m2(
    zones: Rings, which: IntArray, area: Rings, zone_m2: FloatArray | None = None
) -> FloatArray:
    """Approximate m2 of ``zone & area`` for the zones ``which`` (NaN where degenerate:
    compute those with GEOS). ``area`` holds one geometry.

    A zone whose envelope meets no edge of the area is wholly inside or outside it: one
    vertex decides, and its overlap is ``zone_m2[zone]`` (its own approximate m2, so
    that a covered zone counts exactly its area) or 0, with no clipping.
    """
    own = np.full(len(zones.box), np.nan) if zone_m2 is None else zone_m2
    return _kernel_typed(zones.xy, zones.start, zones.first, zones.box, own,
                         which.astype(np.int64), area.xy, area.start)


@njit(cache=True, nogil=True)
def _area_rows(xy: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray, float,
                                                           float]:
    """The area's edges (starting vertex index) bucketed by rows of y."""
    n_r = len(start) - 1
    edges = np.empty(max(len(xy) - n_r, 0), dtype=np.int64)
    k = 0
    for r in range(n_r):
        for i in range(start[r], start[r + 1] - 1):
            edges[k] = i
            k += 1
    edges = edges[:k]
    y0, y1 = np.inf, -np.inf
    for e in edges:
        y0 = min(y0, xy[e, 1], xy[e + 1, 1])
        y1 = max(y1, xy[e, 1], xy[e + 1, 1])
    # About four edges per row: with more rows a long edge sits in many, and a zone edge
    # spanning several rows would test it once per row.
    step = max((y1 - y0) / min(_ROWS, max(len(edges) // 4, 1)), 1e-12)
    count = np.zeros(_ROWS + 1, dtype=np.int64)
    for e in edges:
        lo = min(int((min(xy[e, 1], xy[e + 1, 1]) - y0) / step), _ROWS - 1)
        hi = min(int((max(xy[e, 1], xy[e + 1, 1]) - y0) / step), _ROWS - 1)
        for r in range(lo, hi + 1):
            count[r + 1] += 1
    first = np.cumsum(count)
    ids = np.empty(first[-1], dtype=np.int64)
    fill = first[:-1].copy()
    for e in edges:
        lo = min(int((min(xy[e, 1], xy[e + 1, 1]) - y0) / step), _ROWS - 1)
        hi = min(int((max(xy[e, 1], xy[e + 1, 1]) - y0) / step), _ROWS - 1)
        for r in range(lo, hi + 1):
            ids[fill[r]] = e
            fill[r] += 1
    return first, ids, y0, step


@njit(cache=True, nogil=True, inline="always")
def _row(y: float, y0: float, step: float) -> int:
    r = math.floor((y - y0) / step)
    return min(max(r, 0), _ROWS - 1)


@njit(cache=True, nogil=True, inline="always")
def _crossing(
    px: float, py: float, dx: float, dy: float, qx: float, qy: float, ex: float, ey: float
) -> tuple[int, float]:
    """Edge p + t d against edge q + u e: (0 none, 1 crossing at t, 2 degenerate)."""
    # Disjoint boxes (grown by a hair for rounding) cannot meet: most pairs end here.
    hair = 1e-9 * (1.0 + abs(px) + abs(py))
    if (max(px, px + dx) + hair < min(qx, qx + ex) or max(qx, qx + ex) + hair < min(px, px + dx)
            or max(py, py + dy) + hair < min(qy, qy + ey)
            or max(qy, qy + ey) + hair < min(py, py + dy)):
        return 0, 0.0
    den = dx * ey - dy * ex
    wx, wy = qx - px, qy - py
    scale = (abs(dx) + abs(dy)) * (abs(ex) + abs(ey))
    if abs(den) <= 1e-12 * scale:  # parallel: collinear and overlapping is degenerate
        if abs(wx * dy - wy * dx) > 1e-12 * (abs(dx) + abs(dy)) * (abs(wx) + abs(wy) + 1.0):
            return 0, 0.0
        ll = dx * dx + dy * dy
        if ll == 0.0:
            return 2, 0.0
        a = (wx * dx + wy * dy) / ll
        b = ((wx + ex) * dx + (wy + ey) * dy) / ll
        if max(a, b) < -_EPS or min(a, b) > 1.0 + _EPS:
            return 0, 0.0
        return 2, 0.0
    t = (wx * ey - wy * ex) / den
    u = (wx * dy - wy * dx) / den
    if t < -_EPS or t > 1.0 + _EPS or u < -_EPS or u > 1.0 + _EPS:
        return 0, 0.0
    if t < _EPS or t > 1.0 - _EPS or u < _EPS or u > 1.0 - _EPS:
        return 2, 0.0
    return 1, t


@njit(cache=True, nogil=True, inline="always")
def _add_cut(ts: np.ndarray, k: int, kind: int, t: float,
             bad: bool) -> tuple[np.ndarray, int, bool]:
    """Record what _crossing found: a cut at ``t`` (growing ``ts``), or degeneracy."""
    if kind == 2:
        return ts, k, True
    if kind == 1:
        if k == len(ts):
            ts = np.concatenate((ts, np.empty(len(ts))))
        ts[k] = t
        k += 1
    return ts, k, bad


@njit(cache=True, nogil=True, inline="always")
def _inside_area(
    x: float, y: float, xy: np.ndarray, first: np.ndarray, ids: np.ndarray, y0: float,
    step: float,
) -> bool:
    r = math.floor((y - y0) / step)
    if r < 0 or r >= _ROWS:
        return False
    odd = False
    for j in range(first[r], first[r + 1]):
        i = ids[j]
        ay, by = xy[i, 1], xy[i + 1, 1]
        if (ay > y) != (by > y):
            ax, bx = xy[i, 0], xy[i + 1, 0]
            if x < ax + (y - ay) * (bx - ax) / (by - ay):
                odd = not odd
    return odd


@njit(cache=True, nogil=True, inline="always")
def _inside_zone(x: float, y: float, zxy: np.ndarray, zstart: np.ndarray, r0: int,
                 r1: int) -> bool:
    odd = False
    for r in range(r0, r1):
        for i in range(zstart[r], zstart[r + 1] - 1):
            ay, by = zxy[i, 1], zxy[i + 1, 1]
            if (ay > y) != (by > y):
                ax, bx = zxy[i, 0], zxy[i + 1, 0]
                if x < ax + (y - ay) * (bx - ax) / (by - ay):
                    odd = not odd
    return odd


@njit(cache=True, nogil=True, inline="always")
def _pieces(ts: np.ndarray, n: int, px: float, py: float, dx: float, dy: float,
            acc: np.ndarray, inside_kind: int, zxy: np.ndarray, zstart: np.ndarray, r0: int,
            r1: int, axy: np.ndarray, first: np.ndarray, ids: np.ndarray, y0: float,
            step: float) -> None:
    """Sort the cut fractions and add the pieces whose midpoint is inside the other."""
    for a in range(1, n):  # insertion sort: a handful of cuts per edge
        v = ts[a]
        b = a - 1
        while b >= 0 and ts[b] > v:
            ts[b + 1] = ts[b]
            b -= 1
        ts[b + 1] = v
    for a in range(n - 1):
        t0, t1 = ts[a], ts[a + 1]
        if t1 - t0 <= 0.0:
            continue
        mx, my = px + 0.5 * (t0 + t1) * dx, py + 0.5 * (t0 + t1) * dy
        if inside_kind == 0:
            inside = _inside_area(mx, my, axy, first, ids, y0, step)
        else:
            inside = _inside_zone(mx, my, zxy, zstart, r0, r1)
        if inside:
            # Relative to the origin acc[2:4] (the zone's corner): with absolute degrees
            # the cross products of a small zone cancel to ~1e-6 of its area.
            x0, y0_ = px + t0 * dx - acc[2], py + t0 * dy - acc[3]
            x1, y1 = px + t1 * dx - acc[2], py + t1 * dy - acc[3]
            c = x0 * y1 - x1 * y0_
            acc[0] += c
            acc[1] += (y0_ + y1) * c


@njit(cache=True, nogil=True, inline="always")
def _clear(bx0: float, by0: float, bx1: float, by1: float, axy: np.ndarray,
           first: np.ndarray, ids: np.ndarray, y0: float, step: float) -> bool:
    """Whether no edge of the area meets the box (grown by a hair for rounding)."""
    hair = 1e-9 * (1.0 + abs(bx0) + abs(by0))
    bx0, by0, bx1, by1 = bx0 - hair, by0 - hair, bx1 + hair, by1 + hair
    for row in range(_row(by0, y0, step), _row(by1, y0, step) + 1):
        for j in range(first[row], first[row + 1]):
            e = ids[j]
            qx, qy, sx, sy = axy[e, 0], axy[e, 1], axy[e + 1, 0], axy[e + 1, 1]
            if (max(qx, sx) >= bx0 and min(qx, sx) <= bx1 and max(qy, sy) >= by0
                    and min(qy, sy) <= by1):
                return False
    return True


@njit(cache=True, nogil=True)
def _kernel(zxy: np.ndarray, zstart: np.ndarray, zfirst: np.ndarray, zbox: np.ndarray,
            zone_m2: np.ndarray, which: np.ndarray, axy: np.ndarray,
            astart: np.ndarray) -> np.ndarray:
    first, ids, y0, step = _area_rows(axy, astart)
    out = np.empty(len(which))
    ts = np.empty(64)
    acc = np.zeros(4)
    for n in range(len(which)):
        z = which[n]
        r0, r1 = zfirst[z], zfirst[z + 1]
        bx0, by0, bx1, by1 = zbox[z, 0], zbox[z, 1], zbox[z, 2], zbox[z, 3]
        acc[0], acc[1], acc[2], acc[3] = 0.0, 0.0, bx0, by0
        if not math.isnan(zone_m2[z]) and _clear(bx0, by0, bx1, by1, axy, first, ids, y0,
                                                 step):
            v = zstart[r0]
            inside = _inside_area(zxy[v, 0], zxy[v, 1], axy, first, ids, y0, step)
            out[n] = zone_m2[z] if inside else 0.0
            continue
        bad = False
        # 1. Pieces of the zone's edges inside the area.
        for r in range(r0, r1):
            for i in range(zstart[r], zstart[r + 1] - 1):
                px, py = zxy[i, 0], zxy[i, 1]
                dx, dy = zxy[i + 1, 0] - px, zxy[i + 1, 1] - py
                ts[0], ts[1] = 0.0, 1.0
                k = 2
                for row in range(_row(min(py, py + dy), y0, step),
                                 _row(max(py, py + dy), y0, step) + 1):
                    for j in range(first[row], first[row + 1]):
                        e = ids[j]
                        qx, qy = axy[e, 0], axy[e, 1]
                        kind, t = _crossing(px, py, dx, dy, qx, qy, axy[e + 1, 0] - qx,
                                            axy[e + 1, 1] - qy)
                        ts, k, bad = _add_cut(ts, k, kind, t, bad)
                if bad:
                    break
                _pieces(ts, k, px, py, dx, dy, acc, 0, zxy, zstart, r0, r1, axy, first,
                        ids, y0, step)
            if bad:
                break
        # 2. Pieces of the area's edges inside the zone (only edges meeting its box; an
        # edge listed in several rows is taken in the first row of the zone's range).
        if not bad:
            lo_row, hi_row = _row(by0, y0, step), _row(by1, y0, step)
            for row in range(lo_row, hi_row + 1):
                for j in range(first[row], first[row + 1]):
                    e = ids[j]
                    qx, qy = axy[e, 0], axy[e, 1]
                    ex, ey = axy[e + 1, 0] - qx, axy[e + 1, 1] - qy
                    if max(_row(min(qy, qy + ey), y0, step), lo_row) != row:
                        continue
                    if (max(qx, qx + ex) < bx0 or min(qx, qx + ex) > bx1
                            or max(qy, qy + ey) < by0 or min(qy, qy + ey) > by1):
                        continue
                    ts[0], ts[1] = 0.0, 1.0
                    k = 2
                    for r in range(r0, r1):
                        for i in range(zstart[r], zstart[r + 1] - 1):
                            px, py = zxy[i, 0], zxy[i, 1]
                            kind, t = _crossing(qx, qy, ex, ey, px, py, zxy[i + 1, 0] - px,
                                                zxy[i + 1, 1] - py)
                            ts, k, bad = _add_cut(ts, k, kind, t, bad)
                    if bad:
                        break
                    _pieces(ts, k, qx, qy, ex, ey, acc, 1, zxy, zstart, r0, r1, axy, first,
                            ids, y0, step)
                if bad:
                    break
        if bad:
            out[n] = np.nan
            continue
        s = acc[0]
        if s <= 0.0:
            out[n] = 0.0
            continue
        lat = by0 + acc[1] / (3.0 * s)  # centroid: sum((y0 + y1) c) / (6 * area)
        out[n] = 0.5 * s * _M2_PER_DEG2 * math.cos(math.radians(lat))
    return out


# numba's dispatcher has no useful signature for mypy.
_kernel_typed: Callable[..., FloatArray] = _kernel
