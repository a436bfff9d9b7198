"""Gazetteer: CAP geocodes (SAME, FIPS, FIPS6, UGC, EMMA_ID, ...) -> WGS84 geometries.

Codes are stored as ``"SCHEME:value"`` with the scheme upper-cased. Layers are read with
geopandas through the pyogrio engine (Arrow transport when pyarrow is installed), made
valid with ``shapely.make_valid`` and reprojected to WGS84 if they are not already.

US county codes (:meth:`Gazetteer.load_us_counties`):

* ``FIPS:SSCCC`` - the 5-digit state+county FIPS code.
* ``FIPS6:0SSCCC`` and ``SAME:0SSCCC`` - the 6-digit SAME / FIPS6 form ``PSSCCC``. ``P`` is
  the county subdivision (1..9 = a part such as "northwest" of the county). We have no
  subdivision geometries, so **P=1..9 resolves to the whole county** (over-warning a part
  of a county beats not warning it). ``CCC=000`` means the whole state and resolves to the
  union of that state's counties.

More layers (:func:`standard_gazetteer` loads every one present under ``data/geodata``):

* ``UGC:SSZnnn`` - NWS public forecast and marine zones (:meth:`Gazetteer.load_ugc_zones`,
  a simplified copy of the NWS zone shapefiles, see ``data/geodata/simplify_layers.py``).
  County-type UGC codes ``SSCnnn`` resolve through the county layer: ``SS`` is the
  USPS state abbreviation and ``nnn`` the county FIPS (``NVC013`` -> ``FIPS:32013``).
* ``EMMA_ID:CCnnn`` - MeteoAlarm warning regions (35 European countries).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path

import geopandas as gpd
import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from geofencing.geodesy import polygonal

US_COUNTIES_FILE = "us_counties_fips_plotly.geojson"
UGC_ZONES_FILE = "nws_ugc_zones_simplified.geojson"
EMMA_ID_FILE = "meteoalarm_emma_id_simplified.geojson"

# USPS abbreviation -> state FIPS, for county-type UGC codes (SSCnnn). Territories too.
_STATE_FIPS = dict(
    zip(
        "AL AK AZ AR CA CO CT DE DC FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE NV "
        "NH NJ NM NY NC ND OH OK OR PA RI SC SD TN TX UT VT VA WA WV WI WY AS GU MP PR VI".split(),
        "01 02 04 05 06 08 09 10 11 12 13 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 "
        "33 34 35 36 37 38 39 40 41 42 44 45 46 47 48 49 50 51 53 54 55 56 60 66 69 72 78".split(),
        strict=True,
    )
)

_HAVE_ARROW = importlib.util.find_spec("pyarrow") is not None
# Schemes whose 6-digit values follow the SAME ``PSSCCC`` layout.
_SAME_LIKE = ("SAME", "FIPS6")


def _normalise_value(scheme: str, value: str) -> str:
    """Canonical form of a code value: stripped, upper-cased, FIPS zero-padded."""
    value = value.strip().upper()
    if scheme == "FIPS" and value.isdigit() and len(value) < 5:
        # Spreadsheets drop the leading zero of state FIPS 01..09 ("6075" for 06075).
        value = value.zfill(5)
    return value


class Gazetteer:
    """Mapping of ``SCHEME:value`` codes to WGS84 shapely geometries.

    Several codes may share one geometry object (a county is registered under FIPS, FIPS6
    and SAME); matchers rely on that identity to deduplicate work.
    """

    def __init__(self) -> None:
        self._codes: dict[str, BaseGeometry] = {}
        self._states: dict[str, list[BaseGeometry]] = {}  # state FIPS -> county geometries
        self._state_union: dict[str, BaseGeometry] = {}

    # -- registration -------------------------------------------------------------------

    def add(self, scheme: str, value: str, geometry: BaseGeometry) -> None:
        """Register one geometry under ``scheme:value`` (replacing an earlier one)."""
        scheme = scheme.strip().upper()
        self._codes[f"{scheme}:{_normalise_value(scheme, value)}"] = geometry

    def add_layer(
        self,
        path: str | Path,
        scheme: str,
        code_property: str,
        *,
        transform_code: Callable[[str], str] | None = None,
    ) -> int:
        """Register every feature of a GeoJSON / GeoPackage / Shapefile layer.

        ``code_property`` names the attribute holding the code (GeoJSON feature ``id``
        values appear as an ``id`` column). ``transform_code`` may rewrite each value, e.g.
        to strip a prefix. Features with an empty code or no polygonal geometry are
        skipped. Returns the number of codes registered.
        """
        codes, geoms = _read_layer(path, code_property)
        added = 0
        for code, geom in zip(codes, geoms, strict=True):
            if transform_code is not None:
                code = transform_code(code)
            if code:
                self.add(scheme, code, geom)
                added += 1
        return added

    @classmethod
    def load_us_counties(cls, path: str | Path, into: Gazetteer | None = None) -> Gazetteer:
        """Load a US-county layer whose ``id`` (or ``GEO_ID``) carries the 5-digit FIPS.

        Registers ``FIPS:SSCCC``, ``FIPS6:0SSCCC`` and ``SAME:0SSCCC`` for each county (see
        the module docstring for SAME subdivisions and whole-state codes).
        """
        gaz = into if into is not None else cls()
        codes, geoms = _read_layer(path, "id")
        for code, geom in zip(codes, geoms, strict=True):
            fips = code[-5:].zfill(5)  # tolerate GEO_ID-style "0500000US06075" ids
            if not fips.isdigit():
                continue
            gaz.add("FIPS", fips, geom)
            gaz.add("FIPS6", "0" + fips, geom)
            gaz.add("SAME", "0" + fips, geom)
            gaz._states.setdefault(fips[:2], []).append(geom)
        return gaz

    def load_ugc_zones(self, path: str | Path) -> int:
        """Register an NWS zone layer whose feature ``id`` is the UGC code (``ORZ006``)."""
        return self.add_layer(path, "UGC", "id")

    def load_emma_id(self, path: str | Path) -> int:
        """Register a MeteoAlarm region layer whose feature ``id`` is the EMMA_ID code."""
        return self.add_layer(path, "EMMA_ID", "id")

    # -- lookups ------------------------------------------------------------------------

    def lookup(self, value_name: str, value: str) -> BaseGeometry | None:
        """Geometry of a CAP ``<geocode>`` (``value_name`` is case-insensitive), or None."""
        scheme = value_name.strip().upper()
        value = _normalise_value(scheme, value)
        geom = self._codes.get(f"{scheme}:{value}")
        if geom is not None:
            return geom
        if scheme == "UGC":
            return self._ugc_county(value)
        if scheme not in _SAME_LIKE:
            return None
        if len(value) != 6 or not value.isdigit():
            return None
        if value[0] != "0":  # county subdivision -> whole county (documented above)
            geom = self._codes.get(f"{scheme}:0{value[1:]}")
            if geom is not None:
                return geom
        if value[3:] == "000":  # whole state
            return self._state(value[1:3])
        return None

    def get(self, code: str) -> BaseGeometry | None:
        """Geometry for a ``"SCHEME:value"`` string such as ``"FIPS:06075"``, or None."""
        scheme, sep, value = code.partition(":")
        if not sep:
            return None
        return self.lookup(scheme, value)

    def _ugc_county(self, value: str) -> BaseGeometry | None:
        """County-type UGC ``SSCnnn`` -> the county with FIPS state(SS) + nnn."""
        state = _STATE_FIPS.get(value[:2])
        if len(value) != 6 or value[2] != "C" or state is None or not value[3:].isdigit():
            return None
        return self._codes.get(f"FIPS:{state}{value[3:]}")

    def _state(self, state_fips: str) -> BaseGeometry | None:
        """Union of a state's counties, computed once on first use."""
        if state_fips not in self._state_union:
            counties = self._states.get(state_fips)
            if not counties:
                return None
            self._state_union[state_fips] = shapely.union_all(counties)
        return self._state_union[state_fips]

    def schemes(self) -> set[str]:
        """The schemes with at least one registered code."""
        return {code.partition(":")[0] for code in self._codes}

    def __contains__(self, code: object) -> bool:
        return isinstance(code, str) and self.get(code) is not None

    def __len__(self) -> int:
        """Number of registered codes (a county counts once per scheme)."""
        return len(self._codes)

    def __iter__(self) -> Iterator[str]:
        return iter(self._codes)


def _read_layer(path: str | Path, code_property: str) -> tuple[list[str], list[BaseGeometry]]:
    """Read (codes, valid polygonal WGS84 geometries) from a vector file."""
    kwargs: dict[str, object] = {"use_arrow": True} if _HAVE_ARROW else {}
    df = gpd.read_file(path, engine="pyogrio", columns=[code_property], **kwargs)
    if code_property not in df.columns:
        raise KeyError(f"{path}: no property {code_property!r} (have {list(df.columns)})")
    if df.crs is not None and not df.crs.equals("EPSG:4326") and not df.crs.equals("OGC:CRS84"):
        df = df.to_crs("EPSG:4326")
    geoms = np.asarray(df.geometry.values, dtype=object)
    bad = ~shapely.is_valid(geoms)
    if bad.any():
        geoms[bad] = shapely.make_valid(geoms[bad])
    codes: list[str] = []
    out: list[BaseGeometry] = []
    for code, geom in zip(df[code_property].tolist(), geoms, strict=True):
        geom = polygonal(geom)
        if geom is None or code is None:
            continue
        codes.append(str(code).strip())
        out.append(geom)
    return codes, out


@functools.lru_cache(maxsize=8)
def _cached_gazetteer(data_dir: Path) -> Gazetteer:
    for candidate in (data_dir / "geodata" / US_COUNTIES_FILE, data_dir / US_COUNTIES_FILE):
        if candidate.exists():
            return Gazetteer.load_us_counties(candidate)
    raise FileNotFoundError(f"no {US_COUNTIES_FILE} under {data_dir} or {data_dir}/geodata")


def default_gazetteer(data_dir: Path) -> Gazetteer:
    """The US-county gazetteer for a data directory, loaded once per (resolved) path.

    ``data_dir`` is the project's ``data/`` directory (the county file is looked up in
    ``data_dir/geodata/`` then ``data_dir/``). The returned object is shared: treat it as
    read-only.
    """
    return _cached_gazetteer(Path(data_dir).resolve())


@functools.lru_cache(maxsize=8)
def _cached_standard(data_dir: Path) -> Gazetteer:
    gaz = Gazetteer()
    Gazetteer.load_us_counties(_find(data_dir, US_COUNTIES_FILE), into=gaz)
    for name, load in ((UGC_ZONES_FILE, gaz.load_ugc_zones), (EMMA_ID_FILE, gaz.load_emma_id)):
        path = data_dir / "geodata" / name
        if path.exists():
            load(path)
    return gaz


def _find(data_dir: Path, name: str) -> Path:
    for candidate in (data_dir / "geodata" / name, data_dir / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"no {name} under {data_dir} or {data_dir}/geodata")


def standard_gazetteer(data_dir: Path) -> Gazetteer:
    """US counties plus every optional layer present in ``data_dir/geodata`` (UGC, EMMA_ID).

    Loaded once per resolved path (about 0.5 s more than :func:`default_gazetteer`, which
    stays counties-only for callers that want exactly that). Shared: treat as read-only.
    """
    return _cached_standard(Path(data_dir).resolve())
