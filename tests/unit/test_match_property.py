"""Property test: the index answers exactly what a brute-force, one-object-at-a-time reference
answers, over random areas, places, radii and zones.

Reference, independent of the matcher's machinery (quadtree walk, local frame, segment
lists, zone probes):

* **place** - inside: ``area.intersects(Point)`` (boundary included). Otherwise the geodesic
  distance ``d``: the area's boundary densified to 0.001 deg (so its lon/lat-straight edges
  are followed within a millimetre) and projected into PROJ's ellipsoidal azimuthal-
  equidistant projection *centred on the place*, where the distance from the centre to any
  point is its geodesic distance (Karney's algorithm; checked against ``Geod.inv`` below);
  ``d`` is the planar distance from the origin. Matches when inside or ``d <= r``.
* **zone** - the documented rule evaluated per zone with plain shapely: interiors meet
  (``relate_pattern T********``) and the overlap (the zone's area if the area covers it,
  else the intersection's) in approximate m2 exceeds ``max(1 m2, 1e-4 x smaller area)``.

Tolerance band (cases not asserted): places with ``|d - r| < 0.5 m + 1e-3 r`` - the matcher
measures in a frame centred on the area whose error is ~1e-4 r for areas up to ~2 deg, plus
up to 0.1 m where its densified edges bow (``LocalFrame.project``); zones whose overlap is
within 1e-6 of the tolerance (overlay rounding). Everything else must agree exactly.

Hypothesis draws the scenario (area kind, place, size, a numpy seed); the seed places the
subscribers: uniform around the area, and at chosen geodesic distances from boundary points
(radii tied to that distance, so many sit near their threshold), plus zones straddling the
boundary (with holes, two-part), inside, outside, sharing an edge with the area (must not
match), the area itself, and slivers. Deterministic: ``derandomize=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import shapely
import shapely.affinity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyproj import Geod, Proj
from shapely.geometry import Point, mapping
from shapely.geometry.base import BaseGeometry

from geofencing import places
from geofencing.areas import geojson_to_geometry, polygon_from_ring
from geofencing.geodesy import approx_area_m2, geodesic_circle, wrap_lon
from geofencing.matcher import SubscriptionIndex
from geofencing.overlap import Rings, overlap_m2
from geofencing.zones import ZoneSet
from streams.records import Subscription

GEOD = Geod(ellps="WGS84")
KINDS = ("star", "holed", "multi", "circle", "antimeridian", "antimeridian-circle", "polar")
PLACES = 40


@dataclass
class Scenario:
    area: BaseGeometry
    subs: list[Subscription]
    zone_geoms: dict[str, BaseGeometry]
    leaf: int | None  # walk with leaves this small (deep walks); None: the defaults


def _star(rng: np.random.Generator, lon: float, lat: float, size_m: float, k: int) -> np.ndarray:
    """A star-shaped ring (closed, lon possibly beyond +-180) of ``k`` vertices."""
    step = 2 * math.pi / k
    az = np.degrees(np.arange(k) * step + rng.uniform(-0.3, 0.3, k) * step)
    dist = size_m * rng.uniform(0.5, 1.0, k)
    x, y, _ = GEOD.fwd(np.full(k, lon), np.full(k, lat), az, dist)
    x = lon + wrap_lon(np.asarray(x) - lon)  # continuous across the antimeridian
    ring = np.column_stack([x, y])
    return np.vstack([ring, ring[:1]])


def _area(
    rng: np.random.Generator, kind: str, lon: float, lat: float, size_m: float
) -> BaseGeometry:
    if kind in ("circle", "antimeridian-circle"):
        return geodesic_circle(lon, lat, size_m)
    ring = _star(rng, lon, lat, size_m, int(rng.integers(5, 30)))
    geom, _ = polygon_from_ring(ring.tolist())  # splits at the antimeridian, like real CAP
    assert geom is not None
    if kind == "holed":
        hole = _star(rng, lon, lat, size_m * 0.3, 8)
        geom = geom.difference(shapely.Polygon(hole))
    elif kind == "multi":
        far = GEOD.fwd(lon, lat, rng.uniform(0, 360), size_m * 2.6)
        other, _ = polygon_from_ring(_star(rng, far[0], far[1], size_m, 9).tolist())
        assert other is not None
        geom = shapely.union_all([geom, other])
    return geom


def _zone(ring_or_geom: object) -> dict[str, object]:
    if isinstance(ring_or_geom, np.ndarray):
        return {"type": "Polygon", "coordinates": [ring_or_geom.tolist()]}
    return dict(mapping(ring_or_geom))


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    kind = draw(st.sampled_from(KINDS))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind.startswith("antimeridian"):
        lon, lat = (
            draw(st.floats(179.0, 180.0)) * draw(st.sampled_from([1, -1])),
            draw(st.floats(-60, 60)),
        )
    elif kind == "polar":
        lon, lat = (
            draw(st.floats(-180, 179.9)),
            draw(st.floats(70, 84)) * draw(st.sampled_from([1, -1])),
        )
    else:
        lon, lat = draw(st.floats(-180, 179.9)), draw(st.floats(-65, 65))
    size_m = draw(st.floats(500.0, 80_000.0))
    area = _area(rng, kind, lon, lat, size_m)

    subs: list[Subscription] = []
    # Places: near boundary points at chosen distances (radii tied to them), and uniform.
    bnd = area.boundary
    for i in range(PLACES):
        if i % 3 == 0:
            x0, y0, x1, y1 = area.bounds
            pad = 0.3
            if x1 - x0 > 180:  # split area: sample across the antimeridian
                x = wrap_lon(rng.uniform(179.0 - pad, 181.0 + pad))
            else:
                x = rng.uniform(x0 - pad, x1 + pad)
            y = float(np.clip(rng.uniform(y0 - pad, y1 + pad), -89.9, 89.9))
            d = 0.0
        else:
            u = rng.random()
            b = bnd.interpolate(u, normalized=True)
            d = float(rng.choice([0.0, 1.0, 50.0, 500.0, 5_000.0, 20_000.0]) * rng.random())
            az = rng.uniform(0, 360)
            if i % 3 == 1:  # straight out, along the boundary's normal: distance ~ d
                a, c = (bnd.interpolate(u + e, normalized=True) for e in (-1e-6, 1e-6))
                az = GEOD.inv(a.x, a.y, c.x, c.y)[0] + 90.0
                if area.contains(Point(GEOD.fwd(b.x, b.y, az, 1.0)[:2])):
                    az += 180.0
            x, y, _ = GEOD.fwd(b.x, b.y, az, d)
        r = float(
            rng.choice([0.0, rng.uniform(1.0, 20_000.0), d * rng.uniform(0.95, 1.05), d + 1.0])
        )
        subs.append(
            Subscription(id=f"p{i}", kind="place", lon=float(wrap_lon(x)), lat=float(y), radius_m=r)
        )

    # Zones: stars straddling the boundary (some holed or two-part), the area itself, an
    # edge-sharing neighbour, and a sliver along an edge.
    shapes: dict[str, object] = {"self": _zone(area)}
    for j in range(8):
        b = bnd.interpolate(rng.random(), normalized=True)
        c = GEOD.fwd(b.x, b.y, rng.uniform(0, 360), rng.uniform(0, 3_000))
        ring = _star(rng, c[0], c[1], rng.uniform(200, 6_000), 10)
        shape: object = ring
        if j % 4 == 1:
            poly = shapely.Polygon(ring)
            shape = poly.difference(poly.centroid.buffer(0.2 * math.sqrt(poly.area)))
        elif j % 4 == 2:
            c2 = GEOD.fwd(c[0], c[1], 90.0, 15_000.0)
            ring2 = _star(rng, c2[0], c2[1], 3_000.0, 8)
            shape = shapely.MultiPolygon([shapely.Polygon(ring), shapely.Polygon(ring2)])
        shapes[f"z{j}"] = _zone(shape)
    ext = np.asarray(shapely.get_exterior_ring(shapely.get_parts(area)[0]).coords)
    k = int(rng.integers(0, len(ext) - 1))
    a, bb = ext[k], ext[k + 1]
    mid, edge = (a + bb) / 2, bb - a
    normal = np.array([edge[1], -edge[0]])
    for sign in (1.0, -1.0):  # which side is outside depends on the ring's orientation
        tri = shapely.Polygon([a, bb, mid + sign * 0.3 * normal])
        if shapely.intersection(tri, area).area < 1e-9 * tri.area:
            shapes["neighbour"] = _zone(tri)  # shares the edge only: must not match
            inward = -sign * 1e-6 * normal  # the same, its base pushed a hair inside
            shapes["sliver"] = _zone(
                shapely.Polygon([a + inward, bb + inward, mid + sign * 0.3 * normal])
            )
    zone_geoms = {}
    for name, gj in shapes.items():
        geom, _ = geojson_to_geometry(gj)
        if geom is not None:
            zone_geoms[name] = geom
            subs.append(Subscription(id=name, kind="zone", geometry=gj))  # type: ignore[arg-type]
    return Scenario(area, subs, zone_geoms, draw(st.sampled_from([None, 1, 3])))


def reference_distance(
    area: BaseGeometry, dense: BaseGeometry, lon: float, lat: float, reach_m: float
) -> float:
    """Geodesic metres from (lon, lat) to ``area`` (0 inside); ``inf`` beyond ``reach_m``.

    ``dense`` is the area's boundary segmentized to 0.001 deg.
    """
    if area.intersects(Point(lon, lat)):
        return 0.0
    # Only the boundary near the point matters: clip it (longitudes taken relative to the
    # point, so the antimeridian is no edge) to a box surely containing the reach.
    dlat = reach_m / 110_000.0 + 0.01
    dlon = dlat / max(math.cos(math.radians(min(89.9, abs(lat) + dlat))), 1e-3)
    bnd = shapely.transform(
        dense, lambda xy: np.column_stack([lon + wrap_lon(xy[:, 0] - lon), xy[:, 1]])
    )
    near = shapely.clip_by_rect(bnd, lon - dlon, lat - dlat, lon + dlon, lat + dlat)
    if near.is_empty:
        return math.inf
    proj = Proj(f"+proj=aeqd +lat_0={lat} +lon_0={lon} +ellps=WGS84")
    local = shapely.transform(near, lambda xy: np.column_stack(proj(xy[:, 0], xy[:, 1])))
    return float(shapely.distance(Point(0.0, 0.0), local))


def reference_zone(zone: BaseGeometry, area: BaseGeometry) -> tuple[bool, bool]:
    """(matches, too close to the tolerance to assert) by the documented rule."""
    area_m2 = float(approx_area_m2([area])[0])
    zone_m2 = float(approx_area_m2([zone])[0])
    tol = max(1.0, 1e-4 * min(zone_m2, area_m2))
    if not zone.intersects(area) or not zone.relate_pattern(area, "T********"):
        overlap = 0.0
    elif area.covers(zone):
        overlap = zone_m2
    else:
        overlap = float(approx_area_m2([zone.intersection(area)])[0])
    return overlap > tol, abs(overlap - tol) < 1e-6 * tol


def test_reference_distance_is_geodesic() -> None:
    """The reference's aeqd-at-the-point distances equal Geod.inv (to the nanometre)."""
    for lon, lat in ((179.9, -17.0), (-122.0, 37.0), (20.0, 80.0)):
        proj = Proj(f"+proj=aeqd +lat_0={lat} +lon_0={lon} +ellps=WGS84")
        lons, lats = np.array([-179.5, 179.0, lon + 0.7]), np.array([lat + 0.3, lat - 0.5, lat])
        x, y = proj(wrap_lon(lons), lats)
        _, _, d = GEOD.inv(np.full(3, lon), np.full(3, lat), wrap_lon(lons), lats)
        assert np.abs(np.hypot(x, y) - d).max() < 1e-6


@settings(
    max_examples=120,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenarios())
def test_index_matches_brute_force(sc: Scenario) -> None:
    index = SubscriptionIndex.build(sc.subs)
    # Radius-0 places alone take another walk (lon/lat boxes, no frame): check it too.
    plain = SubscriptionIndex.build([s for s in sc.subs if s.kind == "place" and not s.radius_m])
    assert not index.unresolved
    # 40 places take the direct path (each place against every segment); otherwise the
    # walk, with tiny leaves so that it decides cells at every depth (the answer must not
    # depend on where it stops). Zones always go through the compiled clipping (and GEOS
    # where that is degenerate).
    saved = places.LEAF_POINTS, places.LEAF_POINTS_RADIUS, places.DIRECT_PLACES
    if sc.leaf is not None:
        places.LEAF_POINTS = places.LEAF_POINTS_RADIUS = sc.leaf
        places.DIRECT_PLACES = -1
    try:
        got = set(index.match(sc.area))
        got_plain = set(plain.match(sc.area))
    finally:
        places.LEAF_POINTS, places.LEAF_POINTS_RADIUS, places.DIRECT_PLACES = saved
    assert got_plain == {s.id for s in plain.subscriptions if s.id in got}
    dense = shapely.segmentize(sc.area.boundary, 0.001)
    for sub in sc.subs:
        if sub.kind == "place":
            assert sub.lon is not None and sub.lat is not None
            d = reference_distance(sc.area, dense, sub.lon, sub.lat, sub.radius_m * 1.01 + 1.0)
            expected = d <= sub.radius_m  # d == 0 inside (radius 0 included)
            if d > 0.0 and abs(d - sub.radius_m) < 0.5 + 1e-3 * sub.radius_m:
                continue  # tolerance band
        else:
            expected, unsure = reference_zone(sc.zone_geoms[sub.id], sc.area)
            if unsure:
                continue
        assert (sub.id in got) == expected, (sub, "expected" if expected else "unexpected")


@pytest.mark.parametrize("shape", ["line", "point", "both"])
def test_line_and_point_areas(shape: str) -> None:
    """A degenerate area (a line, a point, both): places within their radius of it match,
    measured by the same reference; radius 0 only exactly on it."""
    line = shapely.LineString([(10.0, 50.0), (10.2, 50.01), (10.3, 49.9)])
    point = Point(10.1, 49.95)
    area = {"line": line, "point": point, "both": shapely.GeometryCollection([line, point])}[shape]
    dense = shapely.segmentize(area, 0.001)
    rng = np.random.default_rng(5)
    lon, lat = rng.uniform(9.95, 10.35, 300), rng.uniform(49.85, 50.06, 300)
    d = [reference_distance(area, dense, x, y, 30_000.0) for x, y in zip(lon, lat, strict=True)]
    radius = np.array(d) * rng.choice([0.98, 1.02], 300)
    subs = [
        Subscription(id=f"p{i}", kind="place", lon=float(lon[i]), lat=float(lat[i]), radius_m=r)
        for i, r in enumerate(radius.tolist())
    ]
    got = set(SubscriptionIndex.build(subs).match(area))
    assert got == {f"p{i}" for i in range(300) if radius[i] >= d[i]}


@settings(max_examples=60, derandomize=True, deadline=None)
@given(
    st.floats(-179.0, 179.0),
    st.floats(-85.0, 85.0),
    st.floats(1e-5, 0.5),
    st.integers(0, 2**32 - 1),
)
def test_compiled_overlap_equals_the_geos_overlay(
    lon: float, lat: float, size: float, seed: int
) -> None:
    """The zone overlap measured by edge clipping (geofencing.overlap) is the GEOS overlay's
    approximate m2, for stars with holes and two-part zones against a star area; the
    degenerate cases (the area itself, a zone sharing its vertices) come back NaN or right,
    and ZoneSet._overlap, which falls back to GEOS, always answers."""
    rng = np.random.default_rng(seed)
    metres = size * 111_000.0
    built, _ = polygon_from_ring(_star(rng, lon, lat, metres, int(rng.integers(5, 40))).tolist())
    if built is None or shapely.get_type_id(built) not in (3, 6):
        return
    area: BaseGeometry = built
    polys: list[BaseGeometry] = []
    for k in range(8):
        dx, dy = rng.uniform(-1.5, 1.5, 2) * size
        ring = _star(rng, lon + dx, max(min(lat + dy, 89.0), -89.0), metres * rng.uniform(0.1, 1.0),
                     5 + k)
        poly = shapely.Polygon(ring)
        if k % 4 == 1:  # a hole
            poly = poly.difference(poly.centroid.buffer(0.2 * math.sqrt(poly.area)))
        elif k % 4 == 2:  # two parts
            poly = poly.union(shapely.affinity.translate(poly, 3.0 * math.sqrt(poly.area)))
        if poly.is_valid and not poly.is_empty and shapely.get_type_id(poly) in (3, 6):
            polys.append(poly)
    polys += [area, shapely.affinity.translate(area, size / 2.0)]  # degenerate and not
    zs = ZoneSet(polys)
    which = np.arange(len(polys))
    fast = overlap_m2(zs.rings, which, Rings([area]))
    inter = shapely.intersection(zs.geoms, area)
    some = ~shapely.is_empty(inter)
    want = np.zeros(len(polys))
    want[some] = approx_area_m2(inter[some])
    ok = ~np.isnan(fast)
    scale = np.maximum(zs.area_m2, float(approx_area_m2([area])[0]))
    assert np.all(np.abs(fast[ok] - want[ok]) <= 1e-7 * scale[ok] + 1e-6)
    full = zs._overlap(area, which)
    assert not np.isnan(full).any()
    assert np.all(np.abs(full - want) <= 1e-7 * scale + 1e-6)


@pytest.mark.parametrize("fips", ["19153", "06075", "51003"])
def test_county_alert_does_not_reach_neighbour_zones(fips: str) -> None:
    """Real counties (the shared Census boundaries): an alert on one county reaches its own
    zone subscribers, never those of the counties around it, whatever their slivers."""
    from pathlib import Path

    from geofencing.gazetteer import default_gazetteer

    gaz = default_gazetteer(Path(__file__).resolve().parents[2] / "data")
    county = gaz.get(f"FIPS:{fips}")
    assert county is not None
    near = [
        c
        for c in gaz
        if c.startswith("FIPS:") and (g := gaz.get(c)) is not None and g.intersects(county)
    ]
    subs = [Subscription(id=c, kind="zone", zone=c) for c in near]
    assert sorted(SubscriptionIndex.build(subs, gaz).match(county)) == [f"FIPS:{fips}"]
