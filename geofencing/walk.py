"""The compiled quadtree walk of :mod:`geofencing.places` (numba).

The walk's rules, and the invariant that keeps them exact, are documented in
:mod:`geofencing.places`; this module is the same walk as a depth-first loop compiled
with numba. Why compiled: expressed in numpy, every level of the walk cost some forty
array operations on small arrays, and their fixed cost (~5 us each) dominated a
county-sized query (~3 ms of a 1M-place index); here a query costs what its cells and
points cost.

Two things stay outside: building the start cells (a handful of numpy operations per
query) and the lon/lat inside test of the few points that sit within
:data:`~geofencing.places.MARGIN_M` of the boundary, which goes to GEOS
(``shapely.intersects_xy``) so that the boundary semantics are exactly shapely's.

Inside tests here are ray-crossing parity in lon/lat over the area's ring edges bucketed
by rows (half-open rule, so a ray through a vertex counts once): shapely's own
semantics, edges straight in lon/lat. They only decide cells and points more than
``MARGIN_M`` from the boundary, where parity is not ambiguous; closer points go to GEOS.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numba import njit

_R_MIN = 6_356_752.0  # polar radius: overestimates angles, so distortion bounds hold
_MAX_C = 3.0  # beyond ~19 000 km from the frame centre no distortion bound is used
_ROWS = 64  # row buckets of the ring segments, for the inside test


@njit(cache=True, nogil=True)
def _grow(a: np.ndarray, n: int) -> np.ndarray:
    """``a`` with room for index ``n`` (doubled when full; numba compiles one per dtype)."""
    if n < len(a):
        return a
    b = np.empty(max(2 * len(a), 64), dtype=a.dtype)
    b[: len(a)] = a
    return b


@njit(cache=True, nogil=True)
def _grow_stack(a: np.ndarray, n: int) -> np.ndarray:
    if n < a.shape[0]:
        return a
    b = np.empty((max(2 * a.shape[0], 64), a.shape[1]), dtype=a.dtype)
    b[: a.shape[0]] = a
    return b


@njit(cache=True, nogil=True, inline="always")
def _forward(lon: float, lat: float, fr: np.ndarray) -> tuple[float, float]:
    """LocalFrame.forward for one point; ``fr`` = lon0, sin0, cos0, n_radius, m_radius."""
    phi = math.radians(lat)
    dlam = math.radians(lon - fr[0])
    sin_p, cos_p, cos_l = math.sin(phi), math.cos(phi), math.cos(dlam)
    u = cos_p * math.sin(dlam)
    v = fr[2] * sin_p - fr[1] * cos_p * cos_l
    sin_c = math.sqrt(u * u + v * v)
    c = math.atan2(sin_c, fr[1] * sin_p + fr[2] * cos_p * cos_l)
    k = c / sin_c if sin_c > 0.0 else 1.0
    return k * u * fr[3], k * v * fr[4]


@njit(cache=True, nogil=True, inline="always")
def _forward_unit(ux: float, uy: float, uz: float, fr: np.ndarray) -> tuple[float, float]:
    """LocalFrame.forward_unit for one point; ``fr[5:7]`` = sin, cos of lon0."""
    sl, cl = fr[5], fr[6]
    u = uy * cl - ux * sl
    q = ux * cl + uy * sl
    v = fr[2] * uz - fr[1] * q
    sin_c = math.sqrt(u * u + v * v)
    c = math.atan2(sin_c, fr[1] * uz + fr[2] * q)
    k = c / sin_c if sin_c > 0.0 else 1.0
    return k * u * fr[3], k * v * fr[4]


@njit(cache=True, nogil=True)
def _project_rings(
    xy: np.ndarray, ring: np.ndarray, fr: np.ndarray, bow_m: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LocalFrame.project's ring arithmetic, compiled: vertices ``xy`` (lon/lat, rows;
    ``ring`` = each vertex's ring) to frame metres, every edge split evenly into
    ``ceil(sqrt(bow / bow_m))`` pieces where its image bows ``bow`` metres from its chord.
    Returns (x, y, ring) of the split vertices.
    """
    n = len(xy)
    x = np.empty(n)
    y = np.empty(n)
    for i in range(n):
        x[i], y[i] = _forward(xy[i, 0], xy[i, 1], fr)
    pieces = np.ones(n, dtype=np.int64)
    for i in range(n - 1):
        if ring[i + 1] != ring[i]:
            continue
        mx, my = _forward((xy[i, 0] + xy[i + 1, 0]) / 2.0, (xy[i, 1] + xy[i + 1, 1]) / 2.0, fr)
        dx, dy = x[i + 1] - x[i], y[i + 1] - y[i]
        length = math.sqrt(dx * dx + dy * dy)
        if length > 0.0:
            bow = abs(dx * (my - y[i]) - dy * (mx - x[i])) / length
            pieces[i] = max(math.ceil(math.sqrt(bow / bow_m)), 1)
    total = int(pieces.sum())
    ox, oy = np.empty(total), np.empty(total)
    oring = np.empty(total, dtype=np.int64)
    o = 0
    for i in range(n):
        ox[o], oy[o], oring[o] = x[i], y[i], ring[i]
        o += 1
        m = pieces[i]
        for step in range(1, m):
            frac = step / m
            lon = xy[i, 0] + frac * (xy[i + 1, 0] - xy[i, 0])
            lat = xy[i, 1] + frac * (xy[i + 1, 1] - xy[i, 1])
            ox[o], oy[o] = _forward(lon, lat, fr)
            oring[o] = ring[i]
            o += 1
    return ox, oy, oring


@njit(cache=True, nogil=True, inline="always")
def _spread(v: int) -> np.uint64:
    """Insert a zero bit between each of the low 32 bits (arrays.spread_bits, scalar)."""
    x = np.uint64(v) & np.uint64(0xFFFFFFFF)
    x = (x | (x << np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
    x = (x | (x << np.uint64(8))) & np.uint64(0x00FF00FF00FF00FF)
    x = (x | (x << np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    x = (x | (x << np.uint64(2))) & np.uint64(0x3333333333333333)
    return (x | (x << np.uint64(1))) & np.uint64(0x5555555555555555)


@njit(cache=True, nogil=True)
def _start_nodes(
    codes: np.ndarray, boxes: np.ndarray, classes: np.ndarray, level: int, levels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The walk's start nodes: every (class, cell of ``level`` meeting a box) pair, class
    major, cells in Morton order without repeats: (ix, iy, key, start, stop), where
    start:stop is the run of the node's places in ``codes``."""
    n = 1 << level
    count = 0
    for b in range(boxes.shape[0]):
        ix0 = min(max(math.floor((boxes[b, 0] + 180.0) * (n / 360.0)), 0), n - 1)
        ix1 = min(max(math.floor((boxes[b, 2] + 180.0) * (n / 360.0)), 0), n - 1)
        iy0 = min(max(math.floor((boxes[b, 1] + 90.0) * (n / 180.0)), 0), n - 1)
        iy1 = min(max(math.floor((boxes[b, 3] + 90.0) * (n / 180.0)), 0), n - 1)
        count += (ix1 - ix0 + 1) * (iy1 - iy0 + 1)
    cells = np.empty(count, dtype=np.uint64)
    k = 0
    for b in range(boxes.shape[0]):
        ix0 = min(max(math.floor((boxes[b, 0] + 180.0) * (n / 360.0)), 0), n - 1)
        ix1 = min(max(math.floor((boxes[b, 2] + 180.0) * (n / 360.0)), 0), n - 1)
        iy0 = min(max(math.floor((boxes[b, 1] + 90.0) * (n / 180.0)), 0), n - 1)
        iy1 = min(max(math.floor((boxes[b, 3] + 90.0) * (n / 180.0)), 0), n - 1)
        for iy in range(iy0, iy1 + 1):
            for ix in range(ix0, ix1 + 1):
                cells[k] = _spread(ix) | (_spread(iy) << np.uint64(1))
                k += 1
    cells = np.unique(cells)  # sorted; boxes may overlap
    m = len(cells)
    cx = np.empty(m * len(classes), dtype=np.int64)
    cy = np.empty(m * len(classes), dtype=np.int64)
    key = np.empty(m * len(classes), dtype=np.uint64)
    start = np.empty(m * len(classes), dtype=np.int64)
    stop = np.empty(m * len(classes), dtype=np.int64)
    shift = np.uint64(2 * (levels - level))
    for c in range(len(classes)):
        top = np.uint64(classes[c]) << np.uint64(2 * level)
        for j in range(m):
            code = cells[j]
            x = 0
            y = 0
            for bit in range(level):  # de-interleave (levels <= 32)
                x |= int((code >> np.uint64(2 * bit)) & np.uint64(1)) << bit
                y |= int((code >> np.uint64(2 * bit + 1)) & np.uint64(1)) << bit
            o = c * m + j
            cx[o], cy[o] = x, y
            key[o] = top | code
            start[o] = np.searchsorted(codes, key[o] << shift)
            stop[o] = np.searchsorted(codes, (key[o] + np.uint64(1)) << shift)
    return cx, cy, key, start, stop


@njit(cache=True, nogil=True, inline="always")
def _seg_d2(px: float, py: float, s: int, seg: np.ndarray) -> float:
    """Squared distance from (px, py) to segment ``s`` (columns ax, ay, dx, dy, 1/|d|^2)."""
    ax, ay, dx, dy, inv = seg[0, s], seg[1, s], seg[2, s], seg[3, s], seg[4, s]
    wx, wy = px - ax, py - ay
    t = (wx * dx + wy * dy) * inv
    t = min(max(t, 0.0), 1.0)
    wx -= t * dx
    wy -= t * dy
    return wx * wx + wy * wy


@njit(cache=True, nogil=True)
def _rows(seg: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Ring edges bucketed by rows of y: (first, ids, y0, row height)."""
    n_ring = seg.shape[1]
    if n_ring == 0:
        return np.zeros(_ROWS + 1, dtype=np.int64), np.empty(0, dtype=np.int64), 0.0, 1.0
    y0, y1 = np.inf, -np.inf
    for s in range(n_ring):
        a, b = seg[1, s], seg[1, s] + seg[3, s]
        y0, y1 = min(y0, a, b), max(y1, a, b)
    step = max((y1 - y0) / _ROWS, 1e-9)
    count = np.zeros(_ROWS + 1, dtype=np.int64)
    for s in range(n_ring):
        a, b = seg[1, s], seg[1, s] + seg[3, s]
        lo = min(int((min(a, b) - y0) / step), _ROWS - 1)
        hi = min(int((max(a, b) - y0) / step), _ROWS - 1)
        for r in range(lo, hi + 1):
            count[r + 1] += 1
    first = np.cumsum(count)
    ids = np.empty(first[-1], dtype=np.int64)
    fill = first[:-1].copy()
    for s in range(n_ring):
        a, b = seg[1, s], seg[1, s] + seg[3, s]
        lo = min(int((min(a, b) - y0) / step), _ROWS - 1)
        hi = min(int((max(a, b) - y0) / step), _ROWS - 1)
        for r in range(lo, hi + 1):
            ids[fill[r]] = s
            fill[r] += 1
    return first, ids, y0, step


@njit(cache=True, nogil=True, inline="always")
def _inside(
    px: float, py: float, seg: np.ndarray, first: np.ndarray, ids: np.ndarray, y0: float,
    step: float,
) -> bool:
    """Ray-crossing parity of (px, py) against the ring edges of its row (lon/lat)."""
    if len(ids) == 0:
        return False
    r = math.floor((py - y0) / step)
    if r < 0 or r >= _ROWS:
        return False
    odd = False
    for j in range(first[r], first[r + 1]):
        s = ids[j]
        ay, by = seg[1, s], seg[1, s] + seg[3, s]
        if (ay > py) != (by > py):
            ax, dx, dy = seg[0, s], seg[2, s], seg[3, s]
            if px < ax + (py - ay) * dx / dy:
                odd = not odd
    return odd


@njit(cache=True, nogil=True, inline="always")
def _cell_bounds(
    x0: float, y0: float, cw: float, px: float, py: float
) -> tuple[float, float, float]:
    """places._cell_bounds for one cell: h, metres per degree of lon and of lat."""
    ch = cw / 2.0
    south, north = y0, y0 + ch
    low = 0.0 if south * north <= 0.0 else min(abs(south), abs(north))
    wide = 111_325.0 * math.cos(math.radians(low))
    half = math.hypot(cw / 2.0 * wide, ch / 2.0 * 111_700.0)
    c = (math.hypot(px, py) + half) / _R_MIN
    k = c / math.sin(min(c, _MAX_C)) if c > 1e-9 else 1.0
    k = k * 1.01 if c < _MAX_C else np.inf
    return half * k + 2.0, wide * k, 111_700.0 * k


@njit(cache=True, nogil=True)
def _walk(
    codes: np.ndarray, lon: np.ndarray, lat: np.ndarray, radius: np.ndarray,
    ux: np.ndarray, uy: np.ndarray, uz: np.ndarray,
    seg: np.ndarray, edges: np.ndarray, fr: np.ndarray,
    node_level: int, node_ix: np.ndarray, node_iy: np.ndarray, node_key: np.ndarray,
    node_start: np.ndarray, node_stop: np.ndarray, node_rlo: np.ndarray,
    node_rhi: np.ndarray, node_limit: np.ndarray,
    threshold: float, margin: float, levels: int,
) -> tuple[np.ndarray, int, np.ndarray, int, np.ndarray, int]:
    """Walk the start nodes; see :mod:`geofencing.places` for the rules.

    Returns ``(ranges, n_ranges, hits, n_hits, rest, n_rest)``: ``ranges`` rows are
    accepted (start, stop) runs; ``hits`` are positions matched one by one; ``rest``
    rows are (position, frame x, frame y, has radius) of points within the margin of
    the boundary and not within their radius: the caller tests them in lon/lat (and, for
    a place with a radius, in the frame too).
    """
    n_seg = seg.shape[1]
    row_first, row_ids, row_y0, row_step = _rows(edges)
    ranges = np.empty((64, 2), dtype=np.int64)
    hits = np.empty(1024, dtype=np.int64)
    rest = np.empty((64, 4), dtype=np.float64)
    n_ranges = n_hits = n_rest = 0
    d2 = np.empty(max(n_seg, 1), dtype=np.float64)
    # The lists: one shared buffer; a node's list is buf[off:off + len].
    buf = np.empty(max(n_seg, 64), dtype=np.int64)
    for s in range(n_seg):
        buf[s] = s
    n_buf = n_seg
    # Stack rows: level, ix, iy, start, stop, list off, list len, limit; keys apart
    # (uint64), radii apart (float64).
    stack = np.empty((max(len(node_ix), 64), 8), dtype=np.int64)
    skey = np.empty(stack.shape[0], dtype=np.uint64)
    srad = np.empty((stack.shape[0], 2), dtype=np.float64)
    top = 0
    for i in range(len(node_ix)):
        if node_stop[i] > node_start[i]:
            stack[top, 0], stack[top, 1], stack[top, 2] = node_level, node_ix[i], node_iy[i]
            stack[top, 3], stack[top, 4] = node_start[i], node_stop[i]
            stack[top, 5], stack[top, 6], stack[top, 7] = 0, n_seg, node_limit[i]
            skey[top] = node_key[i]
            srad[top, 0], srad[top, 1] = node_rlo[i], node_rhi[i]
            top += 1
    while top > 0:
        top -= 1
        level, ix, iy = stack[top, 0], stack[top, 1], stack[top, 2]
        start, stop, off, k, limit = (stack[top, 3], stack[top, 4], stack[top, 5],
                                      stack[top, 6], stack[top, 7])
        key, r_lo, r_hi = skey[top], srad[top, 0], srad[top, 1]
        cw = 360.0 / (1 << level)
        x0, y0 = ix * cw - 180.0, iy * (cw / 2.0) - 90.0
        clon, clat = x0 + cw / 2.0, y0 + cw / 4.0
        px, py = _forward(clon, clat, fr)
        h, wscale, hscale = _cell_bounds(x0, y0, cw, px, py)
        dmin2 = np.inf
        for j in range(k):
            v = _seg_d2(px, py, buf[off + j], seg)
            d2[j] = v
            dmin2 = min(dmin2, v)
        dist = math.sqrt(dmin2)
        inn = _inside(clon, clat, edges, row_first, row_ids, row_y0, row_step)
        low = dist - h
        ring = r_hi > 0.0
        accept = (inn and low > margin) or (
            ring and ((dist + h <= r_lo) or (inn and h <= r_lo))
        )
        if accept:
            ranges = _grow_stack(ranges, n_ranges)
            ranges[n_ranges, 0], ranges[n_ranges, 1] = start, stop
            n_ranges += 1
            continue
        if (not inn) and low > r_hi + margin:
            continue  # dropped
        band = ring and (not inn) and low > r_lo and dist + h <= r_hi
        if stop - start <= limit or band or level >= levels:
            may_inside = inn or not (low > margin)
            for i in range(start, stop):
                r = radius[i] if ring else 0.0
                # delta bounds the point's frame distance to the centre, so its boundary
                # distance is within dist +- delta (or beyond T).
                dx = (lon[i] - clon) * wscale
                dy = (lat[i] - clat) * hscale
                delta = math.sqrt(dx * dx + dy * dy) + 2.0
                if ring and r >= dist + delta:
                    hit = True
                elif r < dist - delta and not may_inside:
                    continue
                elif r < dist - delta and dist - delta > margin:
                    # Beyond its radius and clear of the boundary: inside decides, and
                    # lon/lat parity is exact this far from an edge.
                    hit = _inside(lon[i], lat[i], edges, row_first, row_ids, row_y0, row_step)
                else:
                    x, y = _forward_unit(ux[i], uy[i], uz[i], fr)
                    # The list holds the point's nearest segment whenever that is within
                    # T: the minimum over it is the boundary distance (or above T).
                    # Only segments within max(r, margin) + delta of the centre can be
                    # within r or within the margin of the point.
                    r2 = r * r if ring else -1.0
                    reach = max(r, margin) + delta + 1.0
                    reach2 = reach * reach if math.isfinite(reach) else np.inf
                    dp2 = np.inf
                    for j in range(k):
                        if d2[j] <= reach2:
                            dp2 = min(dp2, _seg_d2(x, y, buf[off + j], seg))
                            if dp2 <= r2:
                                break
                    if dp2 <= r2:
                        hit = True
                    elif dp2 > margin * margin:
                        hit = _inside(lon[i], lat[i], edges, row_first, row_ids, row_y0,
                                      row_step)
                    else:  # within the margin: GEOS decides (lon/lat, and the frame)
                        rest = _grow_stack(rest, n_rest)
                        rest[n_rest, 0], rest[n_rest, 1], rest[n_rest, 2] = i, x, y
                        rest[n_rest, 3] = 1.0 if ring else 0.0
                        n_rest += 1
                        continue
                if hit:
                    hits = _grow(hits, n_hits)
                    hits[n_hits] = i
                    n_hits += 1
            continue
        # Split: children inherit the list shrunk by the invariant's bound.
        bound = min(dist + 2.0 * h, threshold + h)
        bound2 = bound * bound
        new_off = n_buf
        for j in range(k):
            if d2[j] <= bound2:
                buf = _grow(buf, n_buf)
                buf[n_buf] = buf[off + j]
                n_buf += 1
        new_k = n_buf - new_off
        shift = np.uint64(2 * (levels - level - 1))
        child_start = start
        for q in range(4):
            ckey = (key << np.uint64(2)) | np.uint64(q)
            if q < 3:
                child_stop = np.searchsorted(codes, (ckey + np.uint64(1)) << shift)
                child_stop = min(max(child_stop, child_start), stop)
            else:
                child_stop = stop
            if child_stop > child_start:
                stack = _grow_stack(stack, top)
                if top >= len(skey):
                    skey = _grow(skey, top)
                    srad = _grow_stack(srad, top)
                stack[top, 0] = level + 1
                stack[top, 1], stack[top, 2] = ix * 2 + (q & 1), iy * 2 + (q >> 1)
                stack[top, 3], stack[top, 4] = child_start, child_stop
                stack[top, 5], stack[top, 6], stack[top, 7] = new_off, new_k, limit
                skey[top] = ckey
                srad[top, 0], srad[top, 1] = r_lo, r_hi
                top += 1
            child_start = child_stop
    return ranges, n_ranges, hits, n_hits, rest, n_rest


# The compiled function, typed for callers (numba's dispatcher has no useful signature).
walk: Callable[..., tuple[np.ndarray, int, np.ndarray, int, np.ndarray, int]] = _walk
project_rings: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]] = _project_rings
start_nodes: Callable[..., tuple[np.ndarray, ...]] = _start_nodes
