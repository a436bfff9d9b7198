"""Small vectorised helpers of the matcher: Morton (Z-order) codes, grid cells, ranges."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
CodeArray = npt.NDArray[np.uint64]


def spread_bits(v: CodeArray) -> CodeArray:
    """Insert a zero bit between each of the low 32 bits (Morton interleave helper)."""
    v = v & np.uint64(0xFFFFFFFF)
    v = (v | (v << np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
    v = (v | (v << np.uint64(8))) & np.uint64(0x00FF00FF00FF00FF)
    v = (v | (v << np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    v = (v | (v << np.uint64(2))) & np.uint64(0x3333333333333333)
    return (v | (v << np.uint64(1))) & np.uint64(0x5555555555555555)


def morton(ix: npt.ArrayLike, iy: npt.ArrayLike) -> CodeArray:
    """Z-order code: x bits on even positions, y bits on odd positions."""
    x = spread_bits(np.asarray(ix, dtype=np.uint64))
    y = spread_bits(np.asarray(iy, dtype=np.uint64))
    return x | (y << np.uint64(1))


def grid_cell(lon: FloatArray, lat: FloatArray, level: int) -> tuple[IntArray, IntArray]:
    """Integer cell coordinates of points on the 2**level grid."""
    n = 1 << level
    ix = np.clip(np.floor((lon + 180.0) * (n / 360.0)), 0, n - 1).astype(np.int64)
    iy = np.clip(np.floor((lat + 90.0) * (n / 180.0)), 0, n - 1).astype(np.int64)
    return ix, iy


def ranges_to_index(starts: IntArray, stops: IntArray) -> IntArray:
    """Concatenate ``arange(s, e)`` for every (s, e) pair without a Python loop."""
    lengths = stops - starts
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) - np.repeat(offsets - starts, lengths)


def group_min(values: FloatArray, groups: IntArray, n: int) -> FloatArray:
    """Per-group minimum of ``values`` whose group ids are sorted; ``inf`` for empty groups."""
    out = np.full(n, np.inf)
    if len(values):
        counts = np.bincount(groups, minlength=n)
        nonempty = np.flatnonzero(counts)
        out[nonempty] = np.minimum.reduceat(values, (np.cumsum(counts) - counts)[nonempty])
    return out
