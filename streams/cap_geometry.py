"""CAP ``<polygon>`` and ``<circle>`` text -> validated WGS84 coordinates.

A polygon is ``"lat,lon lat,lon ..."`` (at least 4 points, first == last, every value a
finite number in range); a circle is ``"lat,lon radius_km"`` with radius >= 0. Real
messages hold up to ~93,000 vertices, so the common well-formed case is parsed in C
(see :func:`parse_polygon_text`); anything unusual takes a slower path that finds the
offending pair for the error message. Re-exported by ``streams.cap``.
"""

from __future__ import annotations

import itertools
import math
import operator
import re
from typing import Annotated

import msgspec

from streams.cap_checks import Budget, CapError
from streams.records import Circle


def _range_error(lons: list[float], lats: list[float], where: str) -> CapError:
    for lon, lat in zip(lons, lats, strict=True):
        # The chained comparisons are False for NaN, so NaN is reported here too.
        if not -90.0 <= lat <= 90.0:
            return CapError("bad_polygon", f"{where}: latitude {lat} is not in [-90, 90]")
        if not -180.0 <= lon <= 180.0:
            hint = " (ring crosses the antimeridian)" if math.isfinite(lon) else ""
            return CapError("bad_polygon", f"{where}: longitude {lon} is not in [-180, 180]{hint}")
    return CapError("bad_polygon", f"{where}: coordinates are not finite numbers")


def check_ring(lons: list[float], lats: list[float], where: str, *, checked: bool = False
               ) -> list[tuple[float, float]]:
    """Validate a polygon ring given as parallel lists; return it as ``(lon, lat)`` tuples.

    Rules: every coordinate finite and in range, at least 4 points, first == last.
    The common all-valid case is checked with C-level sum/min/max, not a Python loop.
    ``checked=True``: the caller already checked the range (see :func:`_flat_ring`).
    """
    if lons and not checked and not (
        math.isfinite(sum(lons) + sum(lats))  # any NaN/inf poisons the sum
        and -90.0 <= min(lats) and max(lats) <= 90.0
        and -180.0 <= min(lons) and max(lons) <= 180.0
    ):
        raise _range_error(lons, lats, where)
    if len(lons) < 4:
        raise CapError("bad_polygon", f"{where}: {len(lons)} points; a polygon needs at least 4 "
                                      "(first point repeated last)")
    if lons[0] != lons[-1] or lats[0] != lats[-1]:
        raise CapError("bad_polygon", f"{where}: not closed, first point (lat {lats[0]}, lon "
                                      f"{lons[0]}) != last point (lat {lats[-1]}, lon {lons[-1]})")
    return list(zip(lons, lats, strict=True))


def check_circle(lon: float, lat: float, radius_km: float, where: str) -> Circle:
    """Validate a circle centre (WGS84) and radius in km."""
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        raise CapError("bad_circle", f"{where}: centre lat {lat}, lon {lon} is out of range")
    if not (math.isfinite(radius_km) and radius_km >= 0.0):
        raise CapError("bad_circle", f"{where}: radius {radius_km} km must be finite and >= 0")
    return Circle(lon=lon, lat=lat, radius_km=radius_km)


_WS_COMMA = re.compile(r"\s,|,\s")
_STRAY_WS = re.compile(r"\s*,\s*")


def _number(text: str) -> float:
    if "_" in text:  # float() also accepts "1_0"; CAP coordinates never contain "_"
        raise ValueError(text)
    return float(text)


def _well_formed(text: str, pairs: list[str]) -> bool:
    # Every whitespace-separated token holds exactly one comma. Done with str.count and a
    # C-level map (no Python loop per vertex): big rings are the hot path.
    return text.count(",") == len(pairs) and all(map(operator.contains, pairs, _COMMAS))


_COMMAS = itertools.repeat(",")
_FLOAT_ARRAY = msgspec.json.Decoder(list[float])
_LON_RANGE_ARRAY = msgspec.json.Decoder(list[Annotated[float, msgspec.Meta(ge=-180.0, le=180.0)]])


# Every byte a CAP coordinate may hold; deleting them from "lat,lon lat,lon" leaves ", , ,".
_NUMBER_BYTES = b"0123456789.+-eE"


def _plain_pairs(text: str) -> int:
    """Pairs in ``text`` if it is exactly ``"n,n n,n ... n,n"`` (single spaces), else 0.

    The shape is checked in C: delete every number byte and what remains must be the
    separators alone, alternating ", " (bytes.translate and one comparison, no Python
    loop per vertex and no list of 93,000 pair strings). Real agencies send this shape.
    """
    n = text.count(" ") + 1
    seps = text.encode("utf-8", "replace").translate(None, _NUMBER_BYTES)
    return n if seps == b", " * (n - 1) + b"," else 0


def parse_polygon_text(text: str, where: str, budget: Budget, warnings: list[str]
                       ) -> list[tuple[float, float]]:
    """Parse and validate CAP polygon text (``"lat,lon lat,lon ..."``) into a (lon, lat) ring."""
    plain = text.strip()
    n = _plain_pairs(plain)
    if n:
        budget.polygon(n)
        json_text = "[" + plain.replace(" ", ",") + "]"
        try:
            # Fast path: one JSON array parsed in C by msgspec, which also checks that every
            # number is within [-180, 180] (finite, and a valid longitude; latitudes are
            # checked below). JSON numbers are a subset of what float() reads and both round
            # correctly, so values are identical. Anything else ("+1", ".5", "nan", "5,",
            # out of range) takes the general path, which finds the error to report.
            coords = _LON_RANGE_ARRAY.decode(json_text)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return _flat_ring(_coords(json_text, plain, plain.split(), where), where)
        lats, lons = coords[0::2], coords[1::2]
        if not (-90.0 <= min(lats) and max(lats) <= 90.0):
            raise _range_error(lons, lats, where)
        return check_ring(lons, lats, where, checked=True)
    pairs = text.split()
    if not _well_formed(text, pairs):
        if _WS_COMMA.search(text):  # "38.47, -120.14": whitespace around the comma
            warnings.append("stray whitespace inside polygon coordinates ignored")
            text = _STRAY_WS.sub(",", text)
            pairs = text.split()
        if not _well_formed(text, pairs):
            bad = next((p for p in pairs if p.count(",") != 1), text.strip())
            raise CapError("bad_polygon", f"{where}: {bad[:64]!r} is not a 'lat,lon' pair")
    budget.polygon(len(pairs))
    return _flat_ring(_coords("[" + ",".join(pairs) + "]", text, pairs, where), where)


def _coords(json_text: str, text: str, pairs: list[str], where: str) -> list[float]:
    """Every number of the ring in CAP order: as JSON in C, else float() per number."""
    try:
        return _FLOAT_ARRAY.decode(json_text)
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    try:
        coords = list(map(_number if "_" in text else float, text.replace(",", " ").split()))
    except ValueError:
        coords = []
    if len(coords) != 2 * len(pairs):  # a bad number, or a side missing as in "38.4,"
        bad = next((p for p in pairs if not _numeric_pair(p)), text.strip())
        raise CapError("bad_polygon", f"{where}: {bad[:64]!r} is not numeric")
    return coords


def _flat_ring(coords: list[float], where: str) -> list[tuple[float, float]]:
    """:func:`check_ring` for flat ``[lat, lon, lat, lon, ...]`` (CAP order; we store lon,lat).

    One sum over the flat list instead of one per axis; the rules and messages are
    check_ring's own.
    """
    lats, lons = coords[0::2], coords[1::2]
    if lons and not (
        math.isfinite(sum(coords))  # any NaN/inf poisons the sum
        and -90.0 <= min(lats) and max(lats) <= 90.0
        and -180.0 <= min(lons) and max(lons) <= 180.0
    ):
        raise _range_error(lons, lats, where)
    return check_ring(lons, lats, where, checked=True)


def _numeric_pair(pair: str) -> bool:
    try:
        for part in pair.split(","):
            _number(part)
    except ValueError:
        return False
    return True


def parse_circle_text(text: str, where: str, warnings: list[str]) -> Circle:
    """Parse and validate CAP circle text (``"lat,lon radius_km"``)."""
    if _WS_COMMA.search(text):
        warnings.append("stray whitespace inside circle coordinates ignored")
        text = _STRAY_WS.sub(",", text)
    parts = text.split()
    centre = parts[0].split(",") if len(parts) == 2 else []
    if len(centre) != 2:
        raise CapError("bad_circle", f"{where}: {text.strip()[:64]!r} is not 'lat,lon radius_km'")
    try:
        lat, lon, radius = _number(centre[0]), _number(centre[1]), _number(parts[1])
    except ValueError:
        raise CapError("bad_circle", f"{where}: {text.strip()[:64]!r} is not numeric") from None
    return check_circle(lon, lat, radius, where)
