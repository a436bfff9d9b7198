"""Benchmark the geofencing matcher against PostGIS and geopandas.sjoin, answers compared.

    python benchmarks/match.py [--n 1000000] [--state 19] [--scenario state conus]
                               [--peers postgis sjoin] [--runs 5] [--install-postgis]

Two scenarios, each with ``--n`` subscriptions (default 1,000,000):

* ``state`` - concentrated in one state (``--state``, FIPS; 19 = Iowa): 90 % places (half
  uniform over the state, half in 300 Gaussian "towns" of sigma 4 km; radius 0 for 20 %,
  otherwise uniform in (0, 5 km]), 5 % custom zones (star-shaped polygons of 0.3-5 km, one
  in ten with a hole, one in ten a two-part MultiPolygon) and 5 % named zones (the state's
  county FIPS and NWS UGC zone codes). Alerts: every county of the state, every NWS zone
  of the state (``data/geodata/nws_ugc_zones_simplified.geojson``) and 20 geodesic circles
  of 2-30 km.
* ``conus`` - the same mix spread over the contiguous US; alerts: 150 random counties,
  100 random public NWS zones and 20 circles.

Peers, each timed per alert on one core, with the same semantics:

* ``tocsin`` - ``SubscriptionIndex.match_positions`` (median/p99 over ``--runs`` runs per
  alert, after a warm-up). Build = ``SubscriptionIndex.build`` from the records.
* ``postgis`` - a throw-away PostgreSQL + PostGIS started by this script (``initdb`` into a
  temp dir as ``postgres``, a free port, unix socket in the temp dir, fsync, JIT and
  parallel query off; the machine's own PostgreSQL is never touched). Places load with
  COPY; radius-0 places get a GiST index on ``geometry``, the others one on ``geography``.
  Radius 0: ``ST_Intersects(geom, area)``; radius r: ``ST_Intersects(geom, area) OR
  ST_DWithin(geog, area_geog, r)`` (spheroid; the area is segmentized to 0.01 deg first so
  its geography edges follow the lon/lat-straight edges within 2 cm), behind an indexable
  ``ST_DWithin`` on the largest radius. Zones: GiST on the distinct geometries; overlap =
  the zone's area if ``ST_Covers`` else the area of ``ST_Intersection``, both in the
  matcher's approximate m2, > max(1 m2, 1e-4 x the smaller area). Build = COPY, geometry
  columns, GiST indexes, ANALYZE.
* ``sjoin`` - ``geopandas.sjoin`` on warm spatial indexes: radius-0 points by
  ``intersects``; radius points by ``intersects`` with the area's box grown by the largest
  radius, then ``distance`` in an ellipsoidal azimuthal-equidistant CRS centred on the area
  (area segmentized to 0.01 deg); zones by ``intersects``, then the overlap rule.

Answers are compared per alert. A differing place is accepted only inside the tolerance
band ``|d - r| <= 0.5 m + 1e-3 r`` of its radius, ``d`` measured independently (the area's
boundary densified to 0.001 deg and projected into an ellipsoidal azimuthal-equidistant
CRS centred on the place, where distances from the centre are geodesic); a differing zone
only when its overlap is within 0.1 % of the tolerance. Anything else is a mismatch: it is
printed and the script exits 1. The last line is one JSON object: the top-level figures
are the first scenario's (``state`` by default), ``scenarios`` holds all of them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from geofencing.gazetteer import Gazetteer, standard_gazetteer  # noqa: E402
from geofencing.geodesy import approx_area_m2, geodesic_circle  # noqa: E402
from geofencing.matcher import SubscriptionIndex  # noqa: E402
from streams.records import Subscription  # noqa: E402

MAX_RADIUS_M = 5_000.0
M2_PER_DEG2 = (math.pi / 180.0 * 6_371_008.8) ** 2  # approx_area_m2's constant
CONUS = set("01 04 05 06 08 09 10 11 12 13 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 "
            "33 34 35 36 37 38 39 40 41 42 44 45 46 47 48 49 50 51 53 54 55 56".split())
CONUS_USPS = set("AL AZ AR CA CO CT DE DC FL GA ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE "
                 "NV NH NJ NM NY NC ND OH OK OR PA RI SC SD TN TX UT VT VA WA WV WI WY".split())
STATE_USPS = {"19": "IA", "06": "CA", "48": "TX", "17": "IL", "12": "FL", "36": "NY"}
Alerts = list[tuple[str, BaseGeometry]]


# -- workload -----------------------------------------------------------------------------


@dataclass
class Workload:
    """Subscriptions and alerts of one scenario, plus flat views for the peers."""

    name: str
    describe: str
    subs: list[Subscription]
    alerts: Alerts
    place_ids: list[str]
    lon: np.ndarray
    lat: np.ndarray
    radius: np.ndarray
    zone_geoms: list[BaseGeometry]  # distinct zone geometries
    zone_members: list[tuple[int, str]]  # (index into zone_geoms, subscriber id)
    counts: dict[str, int] = field(default_factory=dict)


def points_in(region: BaseGeometry, n: int, rng: np.random.Generator, towns: int = 0) -> Any:
    """``n`` points inside ``region``: uniform in lon/lat, or around ``towns`` Gaussian
    centres (sigma 4 km), by rejection sampling."""
    shapely.prepare(region)
    x0, y0, x1, y1 = region.bounds
    centres = points_in(region, towns, rng) if towns else None
    chunks, have = [], 0
    while have < n:
        if centres is None:
            xy = np.column_stack([rng.uniform(x0, x1, 2 * n), rng.uniform(y0, y1, 2 * n)])
        else:
            c = centres[rng.integers(0, len(centres), 2 * n)]
            deg = np.column_stack([111_320.0 * np.cos(np.radians(c[:, 1])), [110_540.0] * len(c)])
            xy = c + rng.normal(0.0, 4_000.0, (2 * n, 2)) / deg  # metres -> degrees
        xy = xy[shapely.contains_xy(region, xy[:, 0], xy[:, 1])]
        chunks.append(xy)
        have += len(xy)
    return np.vstack(chunks)[:n]


def custom_zones(region: BaseGeometry, n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """``n`` GeoJSON star-shaped polygons of 0.3-5 km; 10 % with a hole, 10 % two-part."""
    centres = points_in(region, n, rng)
    step = 2 * np.pi / 10
    angles = np.arange(10) * step + rng.uniform(-0.3, 0.3, (n, 10)) * step
    radius = rng.uniform(300.0, 5_000.0, (n, 1)) * rng.uniform(0.6, 1.0, (n, 10))
    kx = 1.0 / (111_320.0 * np.cos(np.radians(centres[:, 1:2])))
    dx, dy = radius * np.cos(angles) * kx, radius * np.sin(angles) / 110_540.0
    kind = rng.random(n)
    out: list[dict[str, Any]] = []
    for i in range(n):
        x, y = centres[i, 0] + dx[i], centres[i, 1] + dy[i]
        ring = np.column_stack([np.append(x, x[0]), np.append(y, y[0])])
        if kind[i] < 0.1:  # a hole: the ring shrunk to 30 % (inside: radii >= 0.6 x)
            hole = centres[i] + (ring - centres[i]) * 0.3
            out.append({"type": "Polygon", "coordinates": [ring.tolist(), hole[::-1].tolist()]})
        elif kind[i] < 0.2:  # a second blob 2.5 radii east: disjoint parts
            shifted = ring + np.array([2.5 * radius[i].max() * kx[i, 0], 0.0])
            parts = [[ring.tolist()], [shifted.tolist()]]
            out.append({"type": "MultiPolygon", "coordinates": parts})
        else:
            out.append({"type": "Polygon", "coordinates": [ring.tolist()]})
    return out


def make_workload(name: str, describe: str, gaz: Gazetteer, region: BaseGeometry,
                  codes: list[str], alerts: Alerts, n: int, rng: np.random.Generator) -> Workload:
    """90 % places, 5 % custom zones, 5 % named zones (see the module docstring)."""
    n_places = int(n * 0.9)
    n_custom = (n - n_places) // 2
    n_named = n - n_places - n_custom
    half = n_places // 2
    xy = np.vstack([points_in(region, half, rng), points_in(region, n_places - half, rng, 300)])
    radius = np.where(rng.random(n_places) < 0.2, 0.0, rng.uniform(0.0, MAX_RADIUS_M, n_places))
    channels: list[list[Any]] = [["push"], ["push", "sms"], ["email"]]
    ids = [f"p{i}" for i in range(n_places)]
    rows = zip(ids, xy[:, 0].tolist(), xy[:, 1].tolist(), radius.tolist(), strict=True)
    subs = [Subscription(id=i, kind="place", lon=x, lat=y, radius_m=r, channels=channels[k % 3])
            for k, (i, x, y, r) in enumerate(rows)]
    shapes = custom_zones(region, n_custom, rng)
    subs += [Subscription(id=f"c{i}", kind="zone", geometry=g, channels=["sms"])
             for i, g in enumerate(shapes)]
    named = [codes[k] for k in rng.integers(0, len(codes), n_named).tolist()]
    subs += [Subscription(id=f"z{i}", kind="zone", zone=c, channels=["push"])
             for i, c in enumerate(named)]
    # Distinct zone geometries for the peers: each custom one; each gazetteer object once.
    geoms: list[BaseGeometry] = [shapely.geometry.shape(g) for g in shapes]
    members = [(i, f"c{i}") for i in range(n_custom)]
    slot: dict[int, int] = {}
    for i, code in enumerate(named):
        geom = _get(gaz, code)
        slot.setdefault(id(geom), len(geoms))
        if slot[id(geom)] == len(geoms):
            geoms.append(geom)
        members.append((slot[id(geom)], f"z{i}"))
    counts = {"places": n_places, "custom_zones": n_custom, "named_zones": n_named}
    return Workload(name, describe, subs, alerts, ids, xy[:, 0].copy(), xy[:, 1].copy(), radius,
                    geoms, members, counts)


def circles(region: BaseGeometry, k: int, rng: np.random.Generator) -> Alerts:
    """``k`` geodesic circles of 2-30 km centred inside ``region``."""
    out = []
    for x, y in points_in(region, k, rng).tolist():
        r = float(rng.uniform(2_000.0, 30_000.0))
        out.append((f"circle {r / 1000:.0f} km @ {x:.3f},{y:.3f}", geodesic_circle(x, y, r)))
    return out


def _get(gaz: Gazetteer, code: str) -> BaseGeometry:
    geom = gaz.get(code)
    assert geom is not None, code
    return geom


def scenario(name: str, gaz: Gazetteer, state: str, n: int, rng: np.random.Generator) -> Workload:
    if name == "state":
        region = gaz.lookup("SAME", f"0{state}000")
        if region is None:
            raise SystemExit(f"unknown state FIPS {state}")
        counties = sorted(c for c in gaz if c.startswith(f"FIPS:{state}"))
        usps = STATE_USPS.get(state, "")
        ugc = sorted(c for c in gaz if usps and c.startswith(f"UGC:{usps}Z"))
        picks, describe = counties + ugc, f"state {state}: {len(counties)} county"
    else:
        region = shapely.union_all([_get(gaz, f"SAME:0{s}000") for s in sorted(CONUS)])
        counties = sorted(c for c in gaz if c.startswith("FIPS:") and c[5:7] in CONUS)
        ugc = sorted(c for c in gaz if c.startswith("UGC:") and c[4:6] in CONUS_USPS)
        picks = [counties[i] for i in rng.choice(len(counties), 150, replace=False)]
        picks += [ugc[i] for i in rng.choice(len(ugc), 100, replace=False)]
        describe = "contiguous US: 150 random county"
    alerts = [(f"{'county' if c.startswith('FIPS') else 'zone'} {c}", _get(gaz, c)) for c in picks]
    alerts += circles(region, 20, rng)
    n_zone = sum(c.startswith("UGC") for c in picks)
    describe += f" + {n_zone} NWS zone alerts + 20 circles"
    return make_workload(name, describe, gaz, region, counties + ugc, alerts, n, rng)


# -- peers (each: name, build_s, query(area) timed, ids(result) not timed) ----------------


class Tocsin:
    name = "tocsin"

    def __init__(self, w: Workload, gaz: Gazetteer) -> None:
        t = time.perf_counter()
        self.index = SubscriptionIndex.build(w.subs, gaz)
        self.build_s = time.perf_counter() - t
        assert not self.index.unresolved, self.index.unresolved[:3]

    def query(self, area: BaseGeometry) -> Any:
        return self.index.match_positions(area)

    def ids(self, result: Any) -> set[str]:
        return set(self.index.ids[result].tolist())


def postgis_bindir(install: bool) -> Path:
    """The PostgreSQL bin dir of a cluster version with PostGIS installed (or install it)."""
    for base in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        ext = Path("/usr/share/postgresql") / base.parent.name / "extension"
        if (ext / "postgis.control").exists():
            return base
    versions = sorted(p.parent.name for p in Path("/usr/lib/postgresql").glob("*/bin"))
    package = f"postgresql-{versions[-1] if versions else 15}-postgis-3"
    if not install:
        raise SystemExit(f"PostGIS missing: apt-get install -y {package} (or --install-postgis)")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run([*sudo, "apt-get", "install", "-y", "-q", package], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return postgis_bindir(False)


class PostGIS:
    name = "postgis"
    # approx_area_m2 in SQL: planar deg2 x K x cos(centroid latitude)
    _AREA = ("(ST_Area({g}) * " + repr(M2_PER_DEG2)
             + " * cos(radians(COALESCE(ST_Y(ST_Centroid({g})), 0))))")

    def __init__(self, bindir: Path) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="tocsin-pg-"))
        with socket.socket() as s:  # a free port (we listen on it; the client uses the socket)
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.bindir, self.as_pg = bindir, []
        if os.geteuid() == 0:  # initdb refuses root: run the cluster as `postgres`
            shutil.chown(self.tmp, "postgres")
            self.as_pg = ["runuser", "-u", "postgres", "--"]
        data = str(self.tmp / "data")
        self._run("initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
        opts = (f"-p {self.port} -k {self.tmp} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c shared_buffers=1GB "
                "-c work_mem=64MB -c maintenance_work_mem=1GB -c jit=off "
                "-c max_parallel_workers_per_gather=0 -c max_parallel_maintenance_workers=0")
        self._run("pg_ctl", "-D", data, "-l", str(self.tmp / "log"), "-w", "-o", opts, "start")
        import psycopg

        self.conn = psycopg.connect(host=str(self.tmp), port=self.port, user="postgres",
                                    dbname="postgres", autocommit=True)
        self.conn.execute("CREATE EXTENSION postgis")

    def _run(self, tool: str, *args: str, check: bool = True) -> None:
        subprocess.run([*self.as_pg, str(self.bindir / tool), *args], check=check,
                       capture_output=True)

    def close(self) -> None:
        self.conn.close()
        self._run("pg_ctl", "-D", str(self.tmp / "data"), "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _copy(self, sql: str, text: str) -> None:
        with self.conn.cursor() as cur, cur.copy(sql) as copy:
            copy.write(text.encode())

    def load(self, w: Workload) -> None:
        t = time.perf_counter()
        c = self.conn
        c.execute("DROP TABLE IF EXISTS places, zone_geoms, zone_subs")
        c.execute("CREATE UNLOGGED TABLE places_in (id text, lon float8, lat float8, r float8)")
        rows = zip(w.place_ids, w.lon.tolist(), w.lat.tolist(), w.radius.tolist(), strict=True)
        self._copy("COPY places_in FROM STDIN", "".join(f"{i}\t{x!r}\t{y!r}\t{r!r}\n"
                                                        for i, x, y, r in rows))
        c.execute("CREATE UNLOGGED TABLE places AS SELECT id, r AS radius_m, "
                  "ST_SetSRID(ST_MakePoint(lon, lat), 4326) AS geom, "
                  "ST_SetSRID(ST_MakePoint(lon, lat), 4326)::geography AS geog FROM places_in")
        c.execute("DROP TABLE places_in")
        c.execute("CREATE INDEX ON places USING gist (geom) WHERE radius_m = 0")
        c.execute("CREATE INDEX ON places USING gist (geog) WHERE radius_m > 0")
        c.execute("CREATE UNLOGGED TABLE zone_geoms (gid int, geom geometry, area_m2 float8)")
        hexes = shapely.to_wkb(np.array(w.zone_geoms, dtype=object), hex=True).tolist()
        self._copy("COPY zone_geoms (gid, geom) FROM STDIN",
                   "".join(f"{g}\tSRID=4326;{h}\n" for g, h in enumerate(hexes)))
        c.execute(f"UPDATE zone_geoms SET area_m2 = {self._AREA.format(g='geom')}")
        c.execute("CREATE INDEX ON zone_geoms USING gist (geom)")
        c.execute("CREATE UNLOGGED TABLE zone_subs (gid int, id text)")
        self._copy("COPY zone_subs FROM STDIN", "".join(f"{g}\t{i}\n" for g, i in w.zone_members))
        c.execute("CREATE INDEX ON zone_subs (gid)")
        c.execute("ANALYZE")
        self.build_s = time.perf_counter() - t
        self.sql = f"""
WITH a AS MATERIALIZED (
  SELECT g, ST_Segmentize(g, 0.01)::geography AS gg, {self._AREA.format(g="g")} AS am2
  FROM (SELECT ST_SetSRID(ST_GeomFromWKB(%(wkb)s), 4326) AS g) s)
SELECT p.id FROM a JOIN places p ON p.radius_m = 0 AND ST_Intersects(p.geom, a.g)
UNION ALL
SELECT p.id FROM a JOIN places p ON p.radius_m > 0 AND ST_DWithin(p.geog, a.gg, {MAX_RADIUS_M})
  WHERE ST_Intersects(p.geom, a.g) OR ST_DWithin(p.geog, a.gg, p.radius_m)
UNION ALL
SELECT s.id FROM a JOIN zone_geoms z ON ST_Intersects(z.geom, a.g)
  CROSS JOIN LATERAL (SELECT CASE WHEN ST_Covers(a.g, z.geom) THEN z.area_m2 ELSE
      (SELECT {self._AREA.format(g="i")} FROM (SELECT ST_Intersection(z.geom, a.g) AS i) q)
      END AS overlap) o
  JOIN zone_subs s ON s.gid = z.gid
  WHERE o.overlap > GREATEST(1.0, 1e-4 * LEAST(z.area_m2, a.am2))"""

    def query(self, area: BaseGeometry) -> Any:
        return self.conn.execute(self.sql, {"wkb": shapely.to_wkb(area)}).fetchall()

    def ids(self, result: Any) -> set[str]:
        return {r[0] for r in result}


class Sjoin:
    name = "sjoin"

    def __init__(self, w: Workload) -> None:
        import geopandas as gpd

        self.gpd = gpd
        t = time.perf_counter()
        ids = np.array(w.place_ids, dtype=object)
        pts = gpd.points_from_xy(w.lon, w.lat, crs="EPSG:4326")
        zero = w.radius == 0.0
        self.plain = gpd.GeoDataFrame({"id": ids[zero]}, geometry=pts[zero])
        self.ring = gpd.GeoDataFrame({"id": ids[~zero], "r": w.radius[~zero]}, geometry=pts[~zero])
        self.zones = gpd.GeoDataFrame({"gid": np.arange(len(w.zone_geoms))},
                                      geometry=w.zone_geoms, crs="EPSG:4326")
        self.zone_m2 = self._approx_m2(self.zones.geometry)
        self.members: dict[int, list[str]] = {}
        for g, sid in w.zone_members:
            self.members.setdefault(g, []).append(sid)
        for df in (self.plain, self.ring, self.zones):
            df.sindex  # noqa: B018 - build the STRtree now, not in the first query
        self.build_s = time.perf_counter() - t

    @staticmethod
    def _approx_m2(s: Any) -> np.ndarray:
        with warnings.catch_warnings():  # "area in a geographic CRS": the formula scales it
            warnings.simplefilter("ignore")
            lat = np.nan_to_num(s.centroid.y.to_numpy())
            return np.asarray(s.area.to_numpy() * M2_PER_DEG2 * np.cos(np.radians(lat)))

    def query(self, area: BaseGeometry) -> set[str]:
        gpd = self.gpd
        alert = gpd.GeoDataFrame(geometry=[area], crs="EPSG:4326")
        out = set(gpd.sjoin(alert, self.plain, predicate="intersects")["id"].tolist())
        x0, y0, x1, y1 = area.bounds
        dlat = MAX_RADIUS_M / 110_000.0
        top = min(89.0, max(abs(y0), abs(y1)) + dlat)
        dlon = MAX_RADIUS_M / (111_000.0 * math.cos(math.radians(top)))
        box = shapely.box(x0 - dlon, y0 - dlat, x1 + dlon, y1 + dlat)
        box_df = gpd.GeoDataFrame(geometry=[box], crs="EPSG:4326")
        near = self.ring.iloc[gpd.sjoin(box_df, self.ring, predicate="intersects")["index_right"]]
        crs = f"+proj=aeqd +lat_0={area.centroid.y} +lon_0={area.centroid.x} +ellps=WGS84"
        dense = alert.geometry.segmentize(0.01).to_crs(crs).iloc[0]
        d = near.geometry.to_crs(crs).distance(dense).to_numpy()
        hit = (d <= near["r"].to_numpy()) | near.geometry.intersects(area).to_numpy()
        out.update(near["id"].to_numpy()[hit].tolist())
        cand = self.zones.iloc[gpd.sjoin(alert, self.zones, predicate="intersects")["index_right"]]
        overlap = self._approx_m2(cand.geometry.intersection(area))
        zone_m2 = self.zone_m2[cand["gid"].to_numpy()]
        area_m2 = float(self._approx_m2(alert.geometry)[0])
        ok = overlap > np.maximum(1.0, 1e-4 * np.minimum(zone_m2, area_m2))
        for gid in cand["gid"].to_numpy()[ok].tolist():
            out.update(self.members[gid])
        return out

    def ids(self, result: Any) -> set[str]:
        return set(result)


# -- checking -----------------------------------------------------------------------------


def geodesic_distance(area: BaseGeometry, lon: float, lat: float) -> float:
    """Reference metres from a point to ``area`` (0 inside), independent of the matcher."""
    if shapely.intersects_xy(area, lon, lat):
        return 0.0
    from pyproj import Proj

    proj = Proj(f"+proj=aeqd +lat_0={lat} +lon_0={lon} +ellps=WGS84")
    dense = shapely.segmentize(area.boundary, 0.001)
    local = shapely.transform(dense, lambda xy: np.column_stack(proj(xy[:, 0], xy[:, 1])))
    return float(shapely.distance(shapely.Point(0.0, 0.0), local))


def classify(w: Workload, area: BaseGeometry, diff: list[str]) -> tuple[int, list[str]]:
    """(ids within the tolerance band, descriptions of real mismatches) for differing ids."""
    band, bad = 0, []
    place = {sid: i for i, sid in enumerate(w.place_ids)}
    zone_of = {sid: g for g, sid in w.zone_members}
    area_m2 = float(approx_area_m2([area])[0])
    for sid in diff:
        if sid in place:
            i = place[sid]
            d, r = geodesic_distance(area, float(w.lon[i]), float(w.lat[i])), float(w.radius[i])
            ok, what = abs(d - r) <= 0.5 + 1e-3 * r, f"distance {d:.2f} m, radius {r:.2f} m"
        else:
            zone = w.zone_geoms[zone_of[sid]]
            overlap = float(approx_area_m2([shapely.intersection(zone, area)])[0])
            tol = max(1.0, 1e-4 * min(float(approx_area_m2([zone])[0]), area_m2))
            ok, what = abs(overlap - tol) <= 1e-3 * tol, f"overlap {overlap:.1f} m2 vs {tol:.1f}"
        band += ok
        if not ok:
            bad.append(f"{sid}: {what}")
    return band, bad


# -- run ----------------------------------------------------------------------------------


def run_scenario(w: Workload, gaz: Gazetteer, peers: list[str], runs: int,
                 pg: PostGIS | None) -> tuple[dict[str, Any], int]:
    print(f"\n== {w.name}: {len(w.subs):,} subscriptions ({w.counts['places']:,} places, "
          f"{w.counts['custom_zones']:,} custom zones, {w.counts['named_zones']:,} named "
          f"zones); {len(w.alerts)} alerts ({w.describe})", flush=True)
    impls: list[Any] = [Tocsin(w, gaz)]
    if pg is not None:
        pg.load(w)
        impls.append(pg)
    if "sjoin" in peers:
        impls.append(Sjoin(w))
    for impl in impls:
        print(f"  build  {impl.name:8} {impl.build_s:8.2f} s", flush=True)
    times: dict[str, list[float]] = {impl.name: [] for impl in impls}
    answers: dict[str, list[set[str]]] = {impl.name: [] for impl in impls}
    for _, area in w.alerts:
        for impl in impls:
            impl.query(area)  # warm-up (prepares the area, fills caches)
            for _ in range(runs if impl.name == "tocsin" else 1):
                t = time.perf_counter()
                got = impl.query(area)
                times[impl.name].append((time.perf_counter() - t) * 1e3)
            answers[impl.name].append(impl.ids(got))
    matched = [len(a) for a in answers["tocsin"]]
    print(f"  matched per alert: median {statistics.median(matched):,.0f}, max {max(matched):,}")
    print(f"  {'peer':8} {'median ms':>10} {'p99 ms':>9}")
    result: dict[str, Any] = {"subscriptions": len(w.subs), "alerts": len(w.alerts)}
    for impl in impls:
        ms = times[impl.name]
        median, p99 = statistics.median(ms), float(np.percentile(ms, 99))
        result[impl.name] = {"median_ms": round(median, 3), "p99_ms": round(p99, 3),
                             "build_s": round(impl.build_s, 2)}
        print(f"  {impl.name:8} {median:10.3f} {p99:9.3f}")
    for impl in impls[1:]:
        ratio = result[impl.name]["median_ms"] / result["tocsin"]["median_ms"]
        result[f"ratio_{impl.name}"] = round(ratio, 1)
        print(f"  RATIO {impl.name} / tocsin (median) = {ratio:,.1f}x")
    failures = 0
    for impl in impls[1:]:
        same = band = 0
        for (name, area), a, b in zip(w.alerts, answers["tocsin"], answers[impl.name], strict=True):
            if a == b:
                same += 1
                continue
            in_band, bad = classify(w, area, sorted(a ^ b))
            band += in_band
            failures += len(bad)
            if bad:
                print(f"  MISMATCH {impl.name} on {name}: {len(a ^ b)} differing ids, {len(bad)} "
                      f"outside the tolerance band, e.g. {bad[:3]}")
        result[f"identical_{impl.name}"], result[f"band_ids_{impl.name}"] = same, band
        print(f"  answers tocsin vs {impl.name}: {same}/{len(w.alerts)} alerts identical; "
              f"{band} differing ids, within the tolerance band")
    return result, failures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="subscriptions per scenario")
    ap.add_argument("--state", default="19", help="state FIPS of the 'state' scenario")
    both = ["state", "conus"]
    ap.add_argument("--scenario", nargs="+", default=both, choices=both)
    peers = ["postgis", "sjoin"]
    ap.add_argument("--peers", nargs="*", default=peers, choices=peers, help="default: both")
    ap.add_argument("--runs", type=int, default=5, help="tocsin runs per alert (peers: 1)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--install-postgis", action="store_true", help="apt-get it if missing")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    gaz = standard_gazetteer(ROOT / "data")
    pg = PostGIS(postgis_bindir(args.install_postgis)) if "postgis" in args.peers else None
    results: dict[str, Any] = {}
    failures = 0
    try:
        for name in args.scenario:
            w = scenario(name, gaz, args.state, args.n, rng)
            results[name], bad = run_scenario(w, gaz, args.peers, args.runs, pg)
            failures += bad
            del w
    finally:
        if pg is not None:
            pg.close()
    head = results[args.scenario[0]]
    summary = {
        "tocsin_median_ms": head["tocsin"]["median_ms"],
        "tocsin_p99_ms": head["tocsin"]["p99_ms"],
        "postgis_median_ms": head.get("postgis", {}).get("median_ms"),
        "sjoin_median_ms": head.get("sjoin", {}).get("median_ms"),
        "ratio_vs_postgis": head.get("ratio_postgis"),
        "n": args.n,
        "mismatches": failures,
        "scenarios": results,
    }
    print(json.dumps(summary))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
