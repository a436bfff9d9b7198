"""The emergency manager's web console: static files and the map's base layer.

The console is a single page (``ops/console/static``, plain ES modules) served at
``/console/``. Its map library (Leaflet) is vendored from npm at build time into
``static/vendor/`` (``npm ci`` in ``ops/console``, run by ``make install``): nothing is
loaded from a CDN and there are no tile servers, so it works on an isolated network.
The base layer is the gazetteer's own counties, served by :func:`counties` as simplified
GeoJSON: the states the caller's jurisdiction touches, each county flagged
``in_jurisdiction`` (or every county for an organisation that may alert anywhere).

Console pages carry a strict Content-Security-Policy (``'self'`` only), which also
proves in the browser tests that nothing external is loaded.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio
import shapely
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import RedirectResponse
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from geofencing.gazetteer import US_COUNTIES_FILE, Gazetteer
from ops.api.auth import Principal, require
from ops.api.identity import Jurisdiction

STATIC_DIR = Path(__file__).resolve().parent.parent / "console" / "static"
VENDOR_HINT = "run `make install` (or `npm ci` in ops/console) to vendor the map library"
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
       "form-action 'self'")
# Simplification tolerance (degrees, ~250 m) and coordinate grid (~10 m): a base layer to
# orient and pick by, not the geometry alerts are routed with.
_TOLERANCE = 0.0025
_GRID = 1e-4
_DIGITS = 4

# USPS abbreviation by state FIPS, to name counties for people ("Los Angeles, CA").
_USPS = dict(zip(
    "01 02 04 05 06 08 09 10 11 12 13 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 "
    "33 34 35 36 37 38 39 40 41 42 44 45 46 47 48 49 50 51 53 54 55 56 60 66 69 72 78".split(),
    "AL AK AZ AR CA CO CT DE DC FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE NV "
    "NH NJ NM NY NC ND OH OK OR PA RI SC SD TN TX UT VT VA WA WV WI WY AS GU MP PR VI".split(),
    strict=True,
))


class ConsoleFiles(StaticFiles):
    """Static files with the console's security headers (and no caching of the app)."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        """The file, with CSP, no sniffing and no framing."""
        response = super().file_response(*args, **kwargs)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-cache"
        return response

    async def get_response(self, path: str, scope: Scope) -> Response:
        """A clear 404 for the vendored library when the build step has not run."""
        if path.startswith("vendor/") and not (Path(str(self.directory)) / "vendor").is_dir():
            return Response(f"the console's map library is missing: {VENDOR_HINT}\n",
                            status_code=404, media_type="text/plain")
        return await super().get_response(path, scope)


@functools.lru_cache(maxsize=4)
def _county_features(path: Path, gazetteer: Gazetteer
                     ) -> tuple[tuple[str, str, str, BaseGeometry, str], ...]:
    """(code, name, state, geometry, simplified GeoJSON geometry) of every county.

    Geometries are the gazetteer's own (already valid); names come from the county file's
    properties. Simplification and rounding are vectorised (about 0.5 s for 3,221 counties).
    """
    props = pyogrio.read_dataframe(path, read_geometry=False, columns=["id", "NAME", "LSAD"])
    rows = []
    for fid, name, lsad in zip(props["id"], props["NAME"], props["LSAD"], strict=True):
        fips = str(fid)[-5:].zfill(5)
        geom = gazetteer.get(f"FIPS:{fips}") if fips.isdigit() else None
        if geom is not None:
            rows.append((f"FIPS:{fips}", f"{name} {lsad or ''}".strip(), fips, geom))
    geoms = np.array([r[3] for r in rows], dtype=object)
    simple = shapely.set_precision(shapely.simplify(geoms, _TOLERANCE, preserve_topology=True),
                                   _GRID)
    texts = shapely.to_geojson(simple)
    return tuple((code, name, _USPS.get(fips[:2], fips[:2]), geom, str(text))
                 for (code, name, fips, geom), text in zip(rows, texts, strict=True))


def jurisdiction_geometry(jurisdiction: Jurisdiction, gazetteer: Gazetteer
                          ) -> BaseGeometry | None:
    """The union of a jurisdiction's codes and geometry (None: anywhere)."""
    parts = [g for g in (gazetteer.get(c) for c in jurisdiction.codes) if g is not None]
    if jurisdiction.geometry:
        geo = jurisdiction.geometry
        parts.append(shape(geo.get("geometry", geo) if geo.get("type") == "Feature" else geo))
    if not parts:
        return None
    return shapely.union_all(parts)


@functools.lru_cache(maxsize=64)
def _layer(path: Path, jurisdiction_json: str, gazetteer: Gazetteer) -> bytes:
    """The gzipped FeatureCollection for one jurisdiction (cached: it rarely changes)."""
    jurisdiction = Jurisdiction.model_validate_json(jurisdiction_json)
    counties = _county_features(path, gazetteer)
    area = jurisdiction_geometry(jurisdiction, gazetteer)
    inside: set[str] = set()
    if area is not None:
        shapely.prepare(area)
        for code, _, _, geom, _ in counties:
            # A county is in when a real share of it is: a shared border is not.
            if area.intersects(geom) and area.intersection(geom).area > 0.01 * geom.area:
                inside.add(code)
    states = {c[5:7] for c in inside}
    chosen = [c for c in counties if area is None or c[0][5:7] in states]
    features = ",".join(
        json.dumps({"type": "Feature", "id": code,
                    "properties": {"code": code, "name": name, "state": state,
                                   "in_jurisdiction": area is None or code in inside}},
                   separators=(",", ":"))[:-1] + f',"geometry":{geo}}}'
        for code, name, state, _, geo in chosen)
    bounds = (area.bounds if area is not None
              else shapely.union_all([c[3] for c in chosen]).bounds if chosen else None)
    bbox = json.dumps([round(b, _DIGITS) for b in bounds]) if bounds else "null"
    body = f'{{"type":"FeatureCollection","jurisdiction_bbox":{bbox},"features":[{features}]}}'
    return gzip.compress(body.encode(), compresslevel=6)


def county_file(data_dir: Path) -> Path:
    """The gazetteer's county layer under a data directory."""
    for candidate in (data_dir / "geodata" / US_COUNTIES_FILE, data_dir / US_COUNTIES_FILE):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"no {US_COUNTIES_FILE} under {data_dir}")


router = APIRouter(tags=["console"])


@router.get("/geo/counties", responses={200: {"content": {"application/geo+json": {}}}})
async def counties(request: Request, principal: Principal = Depends(require())) -> Response:
    """The map's base layer: counties of the states your jurisdiction touches (GeoJSON).

    Each feature has ``code`` (``FIPS:SSCCC``, usable as an alert area code), ``name``,
    ``state`` and ``in_jurisdiction``; ``jurisdiction_bbox`` frames the jurisdiction.
    """
    import asyncio

    ctx = request.app.state.ctx
    org = await ctx.identity.get_org(principal.org)
    jurisdiction = org.jurisdiction if org is not None else Jurisdiction()
    path = county_file(Path(ctx.settings.data_dir))
    body = await asyncio.to_thread(_layer, path, jurisdiction.model_dump_json(), ctx.gazetteer)
    headers = {"Cache-Control": "private, max-age=300", "Vary": "Authorization"}
    if "gzip" in request.headers.get("accept-encoding", ""):
        headers["Content-Encoding"] = "gzip"
        return Response(body, media_type="application/geo+json", headers=headers)
    return Response(gzip.decompress(body), media_type="application/geo+json", headers=headers)


def install(app: FastAPI) -> None:
    """Add the base-layer endpoint and serve the console at ``/console/``."""
    app.include_router(router)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/console/")

    app.mount("/console", ConsoleFiles(directory=STATIC_DIR, html=True), name="console")
