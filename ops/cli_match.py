"""``tocsin match``: who would an area reach? Offline, against a subscriber file.

The contract (used by checks outside the test suite; keep it stable)::

    tocsin match --subscriptions FILE --area FILE [--count]

* ``--subscriptions``: a GeoJSON FeatureCollection (each feature has ``properties.id``;
  Points are places, with an optional ``properties.radius_m``; Polygons/MultiPolygons are
  custom zones; ``properties.zone`` may name a gazetteer code such as ``FIPS:19153``,
  ``SAME:019153`` or ``UGC:IAZ062`` instead of a geometry) or a CSV with a header
  ``id,lon,lat[,radius_m]`` (and optionally ``zone``). Rows are read by
  :mod:`ops.subscribers`; contacts and channels are optional here (a subscriber without
  any channel still matches). The format follows the suffix (``.geojson``/``.json``,
  ``.csv``), else the content (``{`` starts GeoJSON).
* ``--area``: a GeoJSON geometry, Feature or FeatureCollection (the union of its
  polygonal features), or a CAP XML file (the union of the areas of its first
  ``<info>``, resolved like the pipeline does: polygons and circles, else geocodes).
* Output: the matched subscriber ids, one per line, sorted; with ``--count`` only their
  number. Exit 0 on success, even when nobody matches.
* Errors (a missing or unreadable file, bad JSON/CSV/CAP, a malformed subscriber row, an
  area with no extent): one line ``error: ...`` on stderr, exit 1; never a traceback.
* Warnings (one line each, ``warning: ...``, exit status unaffected): subscriptions that
  are well-formed but cannot be resolved - an unknown zone code, a polygon without area -
  are reported and never match (a stale code must not stop everybody else's answer; the
  pipeline treats them the same way); repaired invalid area geometry; area parts ignored.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry

    from streams.records import Subscription

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1] / "data"
MAX_WARNINGS = 20  # printed one per line; the rest are counted on one more line
MAX_AREA_BYTES = 512 * 1024 * 1024


class MatchError(Exception):
    """A problem that ends ``tocsin match`` with one line on stderr."""


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def match(
    subscriptions: Path | None = typer.Option(
        None, "--subscriptions", help="GeoJSON FeatureCollection or CSV id,lon,lat[,radius_m]"
    ),
    area: Path | None = typer.Option(
        None, "--area", help="GeoJSON geometry/Feature/FeatureCollection, or CAP XML"
    ),
    count: bool = typer.Option(False, "--count", help="print only the number of matches"),
    data_dir: Path = typer.Option(
        DEFAULT_DATA_DIR, "--data-dir", help="directory holding geodata/ (zone codes, geocodes)"
    ),
) -> None:
    """Print the ids of the subscribers an area reaches, one per line, sorted.

    A place matches when its geodesic distance to the area is <= its radius_m (radius 0:
    inside or on the boundary); a zone when its interior overlaps the area's by more than
    a sliver (max(1 m2, 1e-4 x the smaller area)), so neighbours sharing only a border do
    not. Errors: one line on stderr, exit 1. An unknown zone code (or any subscription
    that cannot be resolved) is a warning on stderr, not an error: that subscriber is
    reported and never matched, everybody else is answered.
    """
    warnings: list[str] = []
    try:
        ids = run_match(subscriptions, area, data_dir, warnings)
    except MatchError as exc:  # only the error: warnings that led to it are in its text
        sys.stderr.write(f"error: {_one_line(str(exc))}\n")
        raise typer.Exit(1) from None
    except Exception as exc:  # the contract: one line, never a traceback
        sys.stderr.write(f"error: internal error: {_one_line(f'{type(exc).__name__}: {exc}')}\n")
        raise typer.Exit(1) from None
    for w in warnings[:MAX_WARNINGS]:
        sys.stderr.write(f"warning: {_one_line(w)}\n")
    if len(warnings) > MAX_WARNINGS:
        sys.stderr.write(f"warning: ... and {len(warnings) - MAX_WARNINGS} more warnings\n")
    out = f"{len(ids)}\n" if count else "".join(f"{i}\n" for i in ids)
    sys.stdout.write(out)
    sys.stdout.flush()


def run_match(
    subscriptions: Path | None, area: Path | None, data_dir: Path, warnings: list[str]
) -> list[str]:
    """The sorted ids ``area`` reaches among ``subscriptions``; raises :class:`MatchError`.

    Warnings are appended to ``warnings`` (printed by the caller on success only).
    """
    if subscriptions is None:
        raise MatchError("missing --subscriptions FILE")
    if area is None:
        raise MatchError("missing --area FILE")
    for path in (subscriptions, area):
        if not path.is_file():
            raise MatchError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    gazetteer = _LazyGazetteer(data_dir)
    geom = read_area(area, gazetteer, warnings)
    subs = read_subscriptions(subscriptions, warnings)

    from geofencing.matcher import SubscriptionIndex

    needs_codes = any(s.kind == "zone" and s.geometry is None and s.zone for s in subs)
    index = SubscriptionIndex.build(subs, gazetteer.get_gazetteer() if needs_codes else None)
    warnings += [f"subscription {u.id}: {u.reason}; it never matches" for u in index.unresolved]
    return sorted(index.match(geom))


class _LazyGazetteer:
    """The standard gazetteer, loaded (about a second) only when a code needs it."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._gaz: Any = None

    def get_gazetteer(self) -> Any:
        """The loaded gazetteer (a :class:`MatchError` if the data cannot be read)."""
        if self._gaz is None:
            from geofencing.gazetteer import standard_gazetteer

            try:
                self._gaz = standard_gazetteer(self.data_dir)
            except (OSError, KeyError, ValueError) as exc:
                raise MatchError(f"cannot load the gazetteer from {self.data_dir}: {exc}") from exc
        return self._gaz

    def lookup(self, value_name: str, value: str) -> BaseGeometry | None:
        """A CAP geocode's geometry (the resolver's ``GeocodeLookup`` protocol)."""
        geom: BaseGeometry | None = self.get_gazetteer().lookup(value_name, value)
        return geom


# -- subscriptions ------------------------------------------------------------------------


def read_subscriptions(path: Path, warnings: list[str]) -> list[Subscription]:
    """Subscriptions from a GeoJSON or CSV subscriber file (see the module docstring)."""
    from ops import subscribers

    suffix = path.suffix.lower()
    try:
        if suffix in (".geojson", ".json", ".csv"):
            rows = subscribers.read_subscribers(path)
        elif _first_byte(path) in (b"{", b"["):
            rows = subscribers._read_geojson(path)  # unusual suffix: sniffed as JSON
        else:
            rows = subscribers._read_csv(path)
        subs = [sub for sub, _ in rows]
    except subscribers.SubscriberFileError as exc:
        raise MatchError(str(exc)) from exc
    except UnicodeDecodeError as exc:
        raise MatchError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    except csv.Error as exc:
        raise MatchError(f"{path}: bad CSV ({exc})") from exc
    except OSError as exc:
        raise MatchError(f"{path}: {exc.strerror or exc}") from exc
    duplicates = len(subs) - len({s.id for s in subs})
    if duplicates:
        warnings.append(f"{path}: {duplicates} duplicate id(s): the last row of each wins")
    return subs


def _first_byte(path: Path) -> bytes:
    with path.open("rb") as f:
        head = f.read(4096)
    return head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]


# -- area ---------------------------------------------------------------------------------


def read_area(path: Path, gazetteer: _LazyGazetteer, warnings: list[str]) -> BaseGeometry:
    """The alert area of a GeoJSON or CAP XML file, as one polygonal WGS84 geometry."""
    from streams.cap import DEFAULT_LIMITS

    try:
        with path.open("rb") as f:
            data = f.read(max(DEFAULT_LIMITS.max_bytes, MAX_AREA_BYTES) + 1)
    except OSError as exc:
        raise MatchError(f"{path}: {exc.strerror or exc}") from exc
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if head == b"<":
        geom = _cap_area(path, data, gazetteer, warnings)
    elif head in (b"{", b"["):
        geom = _geojson_area(path, data, warnings)
    elif not head:
        raise MatchError(f"{path}: empty file")
    else:
        raise MatchError(f"{path}: neither GeoJSON nor CAP XML")
    return geom


def _geojson_area(path: Path, data: bytes, warnings: list[str]) -> BaseGeometry:
    import shapely
    from shapely.geometry import shape

    from geofencing.areas import geojson_to_geometry
    from geofencing.geodesy import polygonal

    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise MatchError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("type"), str):
        raise MatchError(f"{path}: not a GeoJSON object (no 'type')")
    collection = doc["type"] == "FeatureCollection"
    items = doc.get("features") if collection else [doc]
    if not isinstance(items, list):
        raise MatchError(f"{path}: FeatureCollection without a 'features' list")
    parts, skipped = [], []
    for n, item in enumerate(items):
        label = f"{path}: feature {n}" if collection else str(path)
        if not isinstance(item, dict):
            raise MatchError(f"{label}: not a GeoJSON object")
        raw = item.get("geometry") if item.get("type") == "Feature" else item
        if raw is None:
            skipped.append(f"{label}: no geometry")
            continue
        geom, problem = geojson_to_geometry(item)
        if geom is None:
            if problem.startswith("invalid GeoJSON") or "out of range" in problem:
                raise MatchError(f"{label}: {problem}")
            skipped.append(f"{label}: {problem}")
            continue
        source = shape(raw)  # parsed once more only to report a repair
        if not source.is_valid:
            reason = shapely.is_valid_reason(source)
            warnings.append(f"{label}: invalid geometry ({reason}); repaired with make_valid")
        parts.append(geom)
    merged = polygonal(shapely.union_all(parts)) if parts else None
    if merged is None:
        why = f" ({'; '.join(skipped[:3])})" if skipped else ""
        raise MatchError(f"{path}: the area is empty: no polygon with an extent{why}")
    warnings += [f"{s}; ignored" for s in skipped]
    return merged


def _cap_area(
    path: Path, data: bytes, gazetteer: _LazyGazetteer, warnings: list[str]
) -> BaseGeometry:
    import shapely

    from geofencing.areas import resolve_area
    from geofencing.geodesy import polygonal
    from streams.cap import CapError, parse_cap

    try:
        alerts = parse_cap(data, source=str(path))
    except CapError as exc:
        raise MatchError(f"{path}: not usable CAP ({exc.reason}: {exc})") from exc
    if len(alerts) > 1:
        warnings.append(f"{path}: {len(alerts)} alerts in the file; using the first")
    alert = alerts[0]
    if not alert.infos:
        raise MatchError(f"{path}: the alert has no <info>, so no area (msgType {alert.msg_type})")
    info = alert.infos[0]
    if not info.areas:
        raise MatchError(f"{path}: the area is empty: the first <info> has no <area>")
    shapes, notes = [], []
    for k, cap_area in enumerate(info.areas):
        geom, area_warnings = resolve_area(cap_area, gazetteer, f"info 0 area {k}")
        notes += area_warnings
        if geom is not None:
            shapes.append(geom)
    merged = shapely.union_all(shapes) if shapes else None
    if merged is not None and not merged.is_valid:
        merged = shapely.make_valid(merged)
        notes.append("union of the areas was invalid; repaired with make_valid")
    result = polygonal(merged)
    if result is None:
        why = f" ({'; '.join(notes[:3])})" if notes else ""
        raise MatchError(f"{path}: the area is empty: nothing in the first <info> resolves{why}")
    warnings += [f"{path}: {n}" for n in notes]
    return result
