"""Geofencing tests on the real US county file.

Expected answers are computed independently of the code under test wherever metres are
involved: fixture points are placed with ``pyproj.Geod.fwd`` and the reference matcher
measures with ``pyproj.Geod.inv`` one subscriber at a time.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
from pyproj import Geod, Transformer
from shapely.geometry import Point, mapping
from shapely.geometry.base import BaseGeometry

from geofencing.areas import (
    geometry_to_wkb,
    polygon_from_ring,
    resolve_alert_geometry,
    wkb_to_geometry,
)
from geofencing.gazetteer import Gazetteer, default_gazetteer
from geofencing.geodesy import LocalFrame, geodesic_circle, geodesic_distance, wrap_lon
from geofencing.matcher import SubscriptionIndex, preview
from streams.records import Alert, Area, Circle, Geocode, Info, Subscription

ROOT = Path(__file__).resolve().parents[2]
GEOD = Geod(ellps="WGS84")

SF_CITY_HALL = (-122.4192, 37.7793)
OAKLAND = (-122.2711, 37.8044)


@pytest.fixture(scope="module")
def gaz() -> Gazetteer:
    return default_gazetteer(ROOT / "data")


def _alert(*areas: Area) -> Alert:
    return Alert(
        identifier="T-1",
        sender="test@example.org",
        sent="2024-01-01T00:00:00-00:00",
        status="Actual",
        msg_type="Alert",
        scope="Public",
        infos=[Info(areas=list(areas))],
    )


def _place(i: object, lon: float, lat: float, radius_m: float = 0.0) -> Subscription:
    return Subscription(id=str(i), kind="place", lon=lon, lat=lat, radius_m=radius_m)


def _zone(i: object, code: str) -> Subscription:
    return Subscription(id=str(i), kind="zone", zone=code, channels=["sms"])


def _ring(geom: BaseGeometry) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in geom.exterior.coords]


# -- gazetteer ----------------------------------------------------------------------------


def test_same_006075_resolves_to_san_francisco(gaz: Gazetteer) -> None:
    sf = gaz.lookup("SAME", "006075")
    assert sf is not None
    assert sf.intersects(Point(SF_CITY_HALL)) and not sf.intersects(Point(OAKLAND))
    assert gaz.lookup("same", " 006075 ") is sf  # value_name case-insensitive
    assert gaz.get("FIPS:06075") is sf and gaz.get("FIPS6:006075") is sf
    assert gaz.get("FIPS:6075") is sf  # leading zero lost by a spreadsheet
    assert gaz.lookup("SAME", "306075") is sf  # subdivision P=3 -> whole county
    assert "SAME:006075" in gaz and "SAME:099999" not in gaz and "garbage" not in gaz
    assert len(gaz) == 3 * 3221
    assert gaz.lookup("UGC", "CAZ006") is None  # zone UGC: not in the counties-only gazetteer


def test_same_whole_state_code(gaz: Gazetteer) -> None:
    california = gaz.lookup("SAME", "006000")
    assert california is not None
    assert california.intersects(Point(SF_CITY_HALL))
    assert california.intersects(Point(-118.2437, 34.0522))  # Los Angeles
    assert not california.intersects(Point(-115.1398, 36.1699))  # Las Vegas


def test_add_layer_generic_scheme(tmp_path: Path) -> None:
    square = shapely.box(10.0, 10.0, 11.0, 11.0)
    path = tmp_path / "zones.geojson"
    path.write_text(
        '{"type": "FeatureCollection", "features": [{"type": "Feature", '
        f'"properties": {{"ugc": "XXZ001"}}, "geometry": {shapely.to_geojson(square)}}}]}}'
    )
    gaz = Gazetteer()
    assert gaz.add_layer(path, "ugc", "ugc") == 1
    found = gaz.lookup("UGC", "xxz001")
    assert found is not None and found.equals(square)


# -- geodesy ------------------------------------------------------------------------------


@pytest.mark.parametrize("lat", [0.0, 37.0, 65.0, -80.0])
def test_local_frame_distances_match_geod(lat: float) -> None:
    rng = np.random.default_rng(7)
    n = 500
    lon1, lat1, _ = GEOD.fwd(
        np.full(n, 20.0), np.full(n, lat), rng.uniform(0, 360, n), rng.uniform(0, 80_000, n)
    )
    d = rng.uniform(100, 20_000, n)
    lon2, lat2, _ = GEOD.fwd(lon1, lat1, rng.uniform(0, 360, n), d)
    frame = LocalFrame(20.0, lat)
    x1, y1 = frame.forward(lon1, lat1)
    x2, y2 = frame.forward(lon2, lat2)
    assert np.abs(np.hypot(x2 - x1, y2 - y1) - d).max() < 1e-3 * 20_000


@pytest.mark.parametrize(("lon0", "lat0"), [(-122.0, 37.5), (179.9, -17.0), (10.0, 89.0)])
def test_local_frame_is_proj_spherical_aeqd(lon0: float, lat0: float) -> None:
    """LocalFrame re-implements PROJ's spherical aeqd (+ N/M scaling) in numpy for speed."""
    frame = LocalFrame(lon0, lat0)
    proj = Transformer.from_pipeline(
        "+proj=pipeline +step +proj=unitconvert +xy_in=deg +xy_out=rad"
        f" +step +proj=aeqd +lat_0={lat0} +lon_0={lon0} +R=1"
        f" +step +proj=affine +s11={frame.n_radius} +s22={frame.m_radius}"
    )
    rng = np.random.default_rng(3)
    lon = np.append(wrap_lon(lon0 + rng.uniform(-4, 4, 300)), lon0)
    lat = np.append(np.clip(lat0 + rng.uniform(-3, 3, 300), -90, 90), lat0)
    x, y = frame.forward(lon, lat)
    px, py = proj.transform(lon, lat)
    assert np.abs(x - px).max() < 1e-6 and np.abs(y - py).max() < 1e-6


@pytest.mark.parametrize(("lon", "lat"), [(-122.0, 37.0), (179.95, 65.0), (-179.9, -17.0)])
def test_geodesic_circle_covers_radius(lon: float, lat: float) -> None:
    circle = geodesic_circle(lon, lat, 20_000)
    assert circle.is_valid
    az = np.linspace(0, 360, 720, endpoint=False)
    for dist, expected in ((19_990.0, True), (20_040.0, False)):
        x, y, _ = GEOD.fwd(np.full(720, lon), np.full(720, lat), az, np.full(720, dist))
        assert (shapely.intersects_xy(circle, wrap_lon(x), y) == expected).all()


def test_geodesic_circle_over_pole_is_a_cap() -> None:
    cap = geodesic_circle(30.0, 89.0, 300_000)
    assert cap.is_valid and cap.bounds[3] == 90.0
    assert cap.bounds[0] == -180.0 and cap.bounds[2] == 180.0
    assert cap.intersects(Point(-150.0, 89.5))  # across the pole from the centre
    assert not cap.intersects(Point(30.0, 86.0))  # ~333 km away
    with pytest.raises(ValueError):
        geodesic_circle(0.0, 0.0, 0.0)


# -- areas --------------------------------------------------------------------------------


def test_bowtie_polygon_is_repaired_with_warning(gaz: Gazetteer) -> None:
    bowtie = [(0.0, 0.0), (1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0)]
    geom, warnings = resolve_alert_geometry(_alert(Area(polygons=[bowtie])), gaz)
    assert geom is not None and geom.is_valid
    assert geom.area == pytest.approx(0.5)  # two triangles
    assert any("invalid" in w and "repaired" in w for w in warnings)


def test_unknown_geocode_is_a_warning_not_an_error(gaz: Gazetteer) -> None:
    area = Area(geocodes=[Geocode("SAME", "099999"), Geocode("UGC", "ZZZ999")])
    geom, warnings = resolve_alert_geometry(_alert(area), gaz)
    assert geom is None
    assert len(warnings) == 2 and all("unknown geocode" in w for w in warnings)


def test_polygon_takes_precedence_over_geocodes(gaz: Gazetteer) -> None:
    square = [(-122.45, 37.75), (-122.40, 37.75), (-122.40, 37.80), (-122.45, 37.80)]
    area = Area(polygons=[square], geocodes=[Geocode("SAME", "006001")])
    geom, warnings = resolve_alert_geometry(_alert(area, area), gaz)  # repeated per language
    assert geom is not None and not geom.intersects(Point(OAKLAND))
    assert geom.intersects(Point(SF_CITY_HALL))
    assert warnings == ["info 0 area 0 polygon 0: ring was not closed; closed it"]
    assert wkb_to_geometry(geometry_to_wkb(geom)).equals(geom)


def test_polygon_ring_across_antimeridian_is_split() -> None:
    geom, _ = polygon_from_ring([(179.5, 0.0), (-179.5, 0.0), (-179.5, 1.0), (179.5, 1.0)])
    assert geom is not None and geom.geom_type == "MultiPolygon"
    assert geom.area == pytest.approx(1.0)


# -- matcher: places ----------------------------------------------------------------------


def test_polygon_alert_over_county_matches_inside_not_outside(gaz: Gazetteer) -> None:
    county = gaz.get("FIPS:20169")  # Saline County, Kansas: a simple polygon
    assert county is not None and county.geom_type == "Polygon"
    geom, _ = resolve_alert_geometry(_alert(Area(polygons=[_ring(county)])), gaz)
    # Points ~10 m either side of every edge midpoint, classified by plain shapely.
    xy = np.asarray(county.exterior.coords)
    mid = (xy[1:] + xy[:-1]) / 2
    normal = np.column_stack([-(xy[1:, 1] - xy[:-1, 1]), xy[1:, 0] - xy[:-1, 0]])
    normal /= np.hypot(normal[:, 0], normal[:, 1])[:, None]
    pts = np.vstack([mid + 1e-4 * normal, mid - 1e-4 * normal, [county.centroid.coords[0]]])
    inside = shapely.contains_xy(county, pts[:, 0], pts[:, 1])
    assert 0 < inside.sum() < len(pts)
    index = SubscriptionIndex.build([_place(i, x, y) for i, (x, y) in enumerate(pts)], gaz)
    assert sorted(map(int, index.match(geom))) == np.flatnonzero(inside).tolist()


@pytest.mark.parametrize("lat", [0.0, 40.0, 65.0])
def test_place_radius_is_metres_not_degrees(lat: float) -> None:
    # Square whose east edge is a meridian and north edge a parallel; a point 5 km due
    # east of the east edge's midpoint (and due north of the north edge's) is exactly
    # 5 km from the polygon.
    w, e, s, n = 10.0, 10.5, lat - 0.25, lat + 0.25
    square = shapely.box(w, s, e, n)
    east = GEOD.fwd(e, lat, 90.0, 5_000.0)[:2]
    north = GEOD.fwd((w + e) / 2, n, 0.0, 5_000.0)[:2]
    subs = []
    for name, (x, y) in (("east", east), ("north", north)):
        subs += [_place(f"{name}-6k", x, y, 6_000), _place(f"{name}-4k", x, y, 4_000)]
        subs += [_place(f"{name}-0", x, y)]
    index = SubscriptionIndex.build(subs)
    assert sorted(index.match(square)) == ["east-6k", "north-6k"]
    d = geodesic_distance(square, [east[0], north[0]], [east[1], north[1]])
    assert d == pytest.approx([5_000.0, 5_000.0], abs=2.0)


def test_hole_excludes_points_inside_it() -> None:
    donut = shapely.Polygon(
        [(0, 0), (4, 0), (4, 4), (0, 4)], holes=[[(1, 1), (3, 1), (3, 3), (1, 3)]]
    )
    subs = [_place("ring", 0.5, 0.5), _place("hole", 2.0, 2.0), _place("edge", 1.0, 2.0)]
    subs.append(_place("hole-near", 1.5, 2.0, 10_000.0))  # ~55 km from the hole's edge
    subs.append(_place("hole-reach", 1.5, 2.0, 60_000.0))
    assert sorted(SubscriptionIndex.build(subs).match(donut)) == ["edge", "hole-reach", "ring"]


def test_real_enclave_hole(gaz: Gazetteer) -> None:
    albemarle = gaz.get("FIPS:51003")  # surrounds the independent city of Charlottesville
    charlottesville = gaz.get("FIPS:51540")
    assert albemarle is not None and charlottesville is not None
    c = charlottesville.representative_point()
    a = albemarle.representative_point()
    subs = [_place("city", c.x, c.y), _place("county", a.x, a.y), _zone("zone", "FIPS:51540")]
    assert SubscriptionIndex.build(subs, gaz).match(albemarle) == ["county"]


def test_circle_across_antimeridian(gaz: Gazetteer) -> None:
    alert = _alert(Area(circles=[Circle(lon=179.9, lat=-17.0, radius_km=30.0)]))
    geom, warnings = resolve_alert_geometry(alert, gaz)
    assert geom is not None and geom.geom_type == "MultiPolygon" and not warnings
    subs = [
        _place("west", -179.95, -17.0),  # 16.7 km east of the centre, across the line
        _place("east", 179.95, -17.0),
        _place("far", -179.5, -17.0),  # 64 km
        _place("far-reach", -179.5, -17.0, 40_000.0),  # 64 - 30 = 34 km to the rim
        _place("far-short", -179.5, -17.0, 30_000.0),
        Subscription(
            id="zone",
            kind="zone",
            geometry=mapping(shapely.box(-179.8, -17.2, -179.7, -16.8)),
        ),
    ]
    assert sorted(SubscriptionIndex.build(subs).match(geom)) == ["east", "far-reach", "west"]


def test_aleutians_split_county_matches_both_sides(gaz: Gazetteer) -> None:
    aleutians = gaz.get("FIPS:02016")
    assert aleutians is not None and aleutians.bounds[0] < -179 and aleutians.bounds[2] > 179
    west = next(p for p in aleutians.geoms if p.bounds[0] > 0).representative_point()
    east = next(p for p in aleutians.geoms if p.bounds[2] < 0).representative_point()
    subs = [_place("w", west.x, west.y), _place("e", east.x, east.y), _zone("z", "FIPS:02016")]
    assert sorted(SubscriptionIndex.build(subs, gaz).match(aleutians)) == ["e", "w", "z"]


# -- matcher: zones -----------------------------------------------------------------------


@pytest.mark.parametrize("fips", ["20169", "06075", "51003"])
def test_county_zone_matches_and_touching_neighbours_do_not(gaz: Gazetteer, fips: str) -> None:
    geom, _ = resolve_alert_geometry(_alert(Area(geocodes=[Geocode("SAME", "0" + fips)])), gaz)
    county = gaz.get(f"FIPS:{fips}")
    assert geom is not None and county is not None
    neighbours = [
        code
        for code in gaz
        if code.startswith("FIPS:")
        and code != f"FIPS:{fips}"
        and (g := gaz.get(code)) is not None
        and g.intersects(county)
    ]
    assert neighbours  # the test is vacuous without touching counties
    subs = [_zone(code, code) for code in neighbours]
    subs += [_zone("self-same", f"SAME:0{fips}"), _zone("self-fips", f"FIPS:{fips}")]
    index = SubscriptionIndex.build(subs, gaz)
    assert sorted(index.match(geom)) == ["self-fips", "self-same"]


def test_small_alert_inside_large_zone_matches(gaz: Gazetteer) -> None:
    circle = geodesic_circle(*SF_CITY_HALL, 60.0)  # ~1.1e4 m2 inside a whole state
    index = SubscriptionIndex.build([_zone("ca", "SAME:006000")], gaz)
    assert index.match(circle) == ["ca"]


def test_unresolved_and_preview(gaz: Gazetteer) -> None:
    subs = [
        _zone("bad-code", "FIPS:99999"),
        Subscription(id="no-coords", kind="place"),
        _place("bad-lat", 0.0, 95.0),
        Subscription(id="bad-geojson", kind="zone", geometry={"type": "Polygon"}),
        Subscription(
            id="line", kind="zone", geometry={"type": "LineString", "coordinates": [[0, 0], [1, 1]]}
        ),
        Subscription(
            id="p",
            kind="place",
            lon=SF_CITY_HALL[0],
            lat=SF_CITY_HALL[1],
            channels=["push", "email"],
        ),
        _zone("z", "FIPS:06075"),
        _place("dup", 0.0, 0.0),
        _place("dup", *SF_CITY_HALL),  # later record for the same id wins
    ]
    index = SubscriptionIndex.build(subs, gaz)
    assert len(index) == 3
    assert {u.id for u in index.unresolved} == {
        "bad-code",
        "no-coords",
        "bad-lat",
        "bad-geojson",
        "line",
    }
    sf = gaz.get("FIPS:06075")
    assert preview(index, sf) == {
        "subscribers": 3,
        "places": 2,
        "zones": 1,
        "channels": {"push": 1, "sms": 1, "email": 1},
    }
    pos = index.match_positions(sf)
    assert {s.id for s in index.records(pos)} == {"p", "z", "dup"}
    assert index.match(None) == []


def test_geofencing_does_not_import_kafka() -> None:
    code = (
        "import sys, geofencing.matcher, geofencing.areas, geofencing.gazetteer;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('faust', 'aiokafka', 'kafka')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# -- property-style: index == naive per-subscriber loop --------------------------------------


def _naive_distance(vertices: np.ndarray, lon: float, lat: float, reach_m: float) -> float:
    """Geodesic metres from an outside point to the nearest boundary vertex (boundary
    densified to ~100 m, so an overestimate by < 10 m here), looking only at vertices in
    a generous box around the point; ``inf`` if none is within ``reach_m``."""
    dlat = reach_m / 100_000.0 + 0.01
    dlon = dlat / max(np.cos(np.radians(abs(lat) + dlat)), 1e-3)
    dx = np.abs(wrap_lon(vertices[:, 0] - lon))
    near = vertices[(dx <= dlon) & (np.abs(vertices[:, 1] - lat) <= dlat)]
    if len(near) == 0:
        return float("inf")
    ones = np.ones(len(near))
    _, _, d = GEOD.inv(ones * lon, ones * lat, near[:, 0], near[:, 1])
    return float(np.min(d))


def _geod_area(geom: BaseGeometry) -> float:
    return abs(GEOD.geometry_area_perimeter(geom)[0])


def _naive_match(
    subs: list[Subscription], area: BaseGeometry, gaz: Gazetteer
) -> tuple[set[str], set[str]]:
    """(matched ids, ids too close to a threshold to call) - one subscriber at a time."""
    matched: set[str] = set()
    unsure: set[str] = set()
    area_m2 = _geod_area(area)
    step = 0.001 if area.bounds[3] < 80 else 0.01  # ~100 m at 0.001 deg; ~60 m near the pole
    vertices = shapely.get_coordinates(shapely.segmentize(area.boundary, step))
    for sub in subs:
        if sub.kind == "place":
            assert sub.lon is not None and sub.lat is not None
            hit = area.intersects(Point(sub.lon, sub.lat))
            if not hit and sub.radius_m > 0.0:
                d = _naive_distance(vertices, sub.lon, sub.lat, sub.radius_m * 1.1)
                hit = d <= sub.radius_m
                if abs(d - sub.radius_m) < 20.0 + 2e-3 * sub.radius_m:
                    unsure.add(sub.id)
        else:
            zone = gaz.get(sub.zone or "")
            assert zone is not None
            overlap = _geod_area(zone.intersection(area)) if zone.intersects(area) else 0.0
            tol = max(1.0, 1e-4 * min(_geod_area(zone), area_m2))
            hit = overlap > tol
            if 0.9 * tol < overlap < 1.1 * tol:
                unsure.add(sub.id)
        if hit:
            matched.add(sub.id)
    return matched, unsure


def _alert_areas(gaz: Gazetteer) -> list[BaseGeometry]:
    def county(code: str) -> BaseGeometry:
        geom = gaz.get(code)
        assert geom is not None
        return geom

    three = shapely.union_all([county(f"FIPS:{c}") for c in ("06001", "06013", "06075")])
    holey = shapely.Polygon(
        [(-121.9, 37.2), (-121.2, 37.3), (-121.4, 37.9), (-122.0, 37.8)],
        holes=[[(-121.7, 37.45), (-121.5, 37.45), (-121.5, 37.6), (-121.7, 37.6)]],
    )
    return [
        county("FIPS:06001"),
        three,  # MultiPolygon (SF is detached from Alameda/Contra Costa)
        holey,
        geodesic_circle(-147.7, 64.8, 25_000),  # Fairbanks, 65N
        county("FIPS:02016"),  # antimeridian-split Aleutians West
        geodesic_circle(30.0, 88.5, 200_000),  # polar cap: contains the North Pole
    ]


@pytest.mark.parametrize("case", range(6))
def test_index_equals_naive_loop(gaz: Gazetteer, case: int) -> None:
    area = _alert_areas(gaz)[case]
    rng = np.random.default_rng(1000 + case)
    xmin, ymin, xmax, ymax = area.bounds
    n, pad = 2500, 0.3
    if ymax == 90.0:  # polar cap: every longitude, down to a bit below the cap
        lon, lat = rng.uniform(-180, 180, n), rng.uniform(ymin - 0.5, 90.0, n)
    else:
        if xmax - xmin > 180:  # split area: sample across the antimeridian instead
            xmin, xmax = 172.0, 187.0
        lon = wrap_lon(rng.uniform(xmin - pad, xmax + pad, n))
        lat = rng.uniform(ymin - pad, ymax + pad, n)
    radius = np.where(rng.random(n) < 0.5, 0.0, rng.uniform(100.0, 20_000.0, n))
    subs = [_place(f"p{i}", lon[i], lat[i], radius[i]) for i in range(n)]
    near = shapely.box(xmin - 1, ymin - 1, xmax + 1, ymax + 1)
    codes = [
        c
        for c in gaz
        if c.startswith("FIPS:")
        and (g := gaz.get(c)) is not None
        and (g.intersects(near) or (case == 4 and c.startswith("FIPS:02")))
    ]
    subs += [_zone(f"z{i}", code) for i, code in enumerate(codes)]

    index = SubscriptionIndex.build(subs, gaz)
    got = set(index.match(area))
    expected, unsure = _naive_match(subs, area, gaz)
    assert len(unsure) < 0.01 * len(subs)
    assert got - unsure == expected - unsure
    assert 0 < len(expected) < len(subs)  # the case actually discriminates
