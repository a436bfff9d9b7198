"""``tocsin match --subscriptions FILE --area FILE [--count]``: the CLI contract, end to end.

Every case runs ``python -m ops.cli match`` in a subprocess against the real US county file
(``data/geodata``) and real CAP messages (``data/cap/cap12``). Expected answers are built
here from the data with plain shapely and ``pyproj.Geod`` (points placed at known
geodesic distances), not with the matcher.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import shapely
from pyproj import Geod
from shapely.geometry import mapping, shape
from shapely.geometry.base import BaseGeometry

ROOT = Path(__file__).resolve().parents[2]
COUNTIES = ROOT / "data" / "geodata" / "us_counties_fips_plotly.geojson"
CAP = ROOT / "data" / "cap" / "cap12"
GEOD = Geod(ellps="WGS84")


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "ops.cli", "match", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def counties() -> dict[str, dict[str, object]]:
    doc = json.loads(COUNTIES.read_text())
    return {f["id"]: f for f in doc["features"]}


def county(counties: dict[str, dict[str, object]], fips: str) -> BaseGeometry:
    return shape(counties[fips]["geometry"])


def feature(sid: str, geometry: object, **props: object) -> dict[str, object]:
    return {"type": "Feature", "properties": {"id": sid, **props}, "geometry": geometry}


def write_json(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc))
    return path


def east_of(geom: BaseGeometry, metres: float) -> tuple[float, float]:
    """A point ``metres`` due east of the easternmost vertex of ``geom``."""
    x, y = max(shapely.get_coordinates(geom).tolist())
    lon, lat, _ = GEOD.fwd(x, y, 90.0, metres)
    return lon, lat


def test_geojson_subscriptions_against_a_county(
    tmp_path: Path, counties: dict[str, dict[str, object]]
) -> None:
    polk = county(counties, "19153")  # Polk County, Iowa (Des Moines)
    neighbours = [
        fips
        for fips, f in counties.items()
        if fips != "19153" and shape(f["geometry"]).intersects(polk)
    ]
    assert len(neighbours) >= 6
    inside = polk.representative_point()
    near = east_of(polk, 2_000.0)  # ~2 km outside (nearest border point is <= 2 km away)
    straddle = shapely.box(near[0] - 0.05, near[1] - 0.01, near[0] + 0.01, near[1] + 0.01)
    neighbour = county(counties, neighbours[0]).representative_point()
    features = [
        feature("home", mapping(inside)),
        feature("home-radius", mapping(inside), radius_m=50.0),
        feature("near-3km", {"type": "Point", "coordinates": near}, radius_m=3_000.0),
        feature("near-1km", {"type": "Point", "coordinates": near}, radius_m=1_000.0),
        feature("neighbour-home", mapping(neighbour)),
        feature("zone-polk", None, zone="FIPS:19153"),
        feature("zone-polk-same", None, zone="SAME:019153"),
        feature("zone-custom", mapping(straddle)),
        feature("zone-stale", None, zone="FIPS:99999"),
        feature("no-channels", mapping(inside), channels=""),
    ]
    features += [feature(f"zone-{n}", None, zone=f"FIPS:{n}") for n in neighbours]
    subs = write_json(
        tmp_path / "subs.geojson", {"type": "FeatureCollection", "features": features}
    )
    area = write_json(tmp_path / "polk.geojson", counties["19153"])

    out = run("--subscriptions", subs, "--area", area)
    assert out.returncode == 0, out.stderr
    expected = ["home", "home-radius", "near-3km", "no-channels", "zone-custom", "zone-polk"]
    expected.append("zone-polk-same")
    assert out.stdout.splitlines() == sorted(expected)  # neighbours' zones: border only
    assert out.stderr.splitlines() == [
        "warning: subscription zone-stale: unknown zone code 'FIPS:99999'; it never matches"
    ]
    counted = run("--subscriptions", subs, "--area", area, "--count")
    assert (counted.returncode, counted.stdout) == (0, f"{len(expected)}\n")


def test_csv_subscriptions_against_a_cap_polygon(tmp_path: Path) -> None:
    cap = CAP / "oasiscap__ipaws_local_area_emergency_polygon.xml"  # Rockville, MD
    text = re.search(r"<polygon>([^<]+)</polygon>", cap.read_text()).group(1)  # type: ignore[union-attr]
    ring = [tuple(float(v) for v in pair.split(","))[::-1] for pair in text.split()]
    polygon = shapely.Polygon(ring)
    centre = polygon.centroid
    east = east_of(polygon, 500.0)
    rows = [
        ("in", centre.x, centre.y, ""),
        ("in-radius", centre.x, centre.y, "10"),
        ("east-1km", *east, "1000"),
        ("east-100m", *east, "100"),
        ("east-0", *east, "0"),
        ("far", -77.5, 39.5, "20000"),
    ]
    csv = tmp_path / "subs.csv"
    csv.write_text("id,lon,lat,radius_m\n" + "".join(f"{i},{x},{y},{r}\n" for i, x, y, r in rows))
    out = run("--subscriptions", csv, "--area", cap)
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout.splitlines() == ["east-1km", "in", "in-radius"]


def test_cap_geocodes_and_feature_collection_union(
    tmp_path: Path, counties: dict[str, dict[str, object]]
) -> None:
    """A geocode-only CAP (the first <info>: SAME 006037, Los Angeles County) and a
    FeatureCollection area (union of two counties, a Point feature ignored with a warning)."""
    la, orange = county(counties, "06037"), county(counties, "06059")
    polk, story = county(counties, "19153"), county(counties, "19169")
    features = [
        feature("la", mapping(la.representative_point())),
        feature("orange", mapping(orange.representative_point())),
        feature("polk", None, zone="FIPS:19153"),
        feature("story", mapping(story.representative_point())),
        feature("boone", None, zone="FIPS:19015"),  # borders Story and Polk only
    ]
    subs = write_json(tmp_path / "s.geojson", {"type": "FeatureCollection", "features": features})
    amber = run(
        "--subscriptions", subs, "--area", CAP / "oasiscap__spec12_A4_amber_multilingual.xml"
    )
    assert (amber.returncode, amber.stdout, amber.stderr) == (0, "la\n", "")

    area = {
        "type": "FeatureCollection",
        "features": [
            counties["19153"],
            counties["19169"],
            {
                "type": "Feature",
                "properties": {},
                "geometry": {"type": "Point", "coordinates": [0, 0]},
            },
        ],
    }
    both = run("--subscriptions", subs, "--area", write_json(tmp_path / "a.json", area))
    assert both.returncode == 0 and both.stdout.splitlines() == ["polk", "story"]
    assert both.stderr.startswith("warning: ") and "feature 2" in both.stderr
    assert polk.touches(county(counties, "19015"))  # so "boone" is a real border case


def test_invalid_area_polygon_is_repaired_with_a_warning(tmp_path: Path) -> None:
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}
    subs = tmp_path / "s.csv"
    subs.write_text("id,lon,lat\nleft,0.1,0.5\nmiddle-top,0.5,0.9\n")
    out = run("--subscriptions", subs, "--area", write_json(tmp_path / "bowtie.json", bowtie))
    assert (out.returncode, out.stdout) == (0, "left\n")
    assert "invalid geometry" in out.stderr and "repaired" in out.stderr


@pytest.mark.parametrize(
    ("subs", "area", "message"),
    [
        ("missing.geojson", "polk.geojson", "no such file"),
        ("subs.csv", "missing.xml", "no such file"),
        ("subs.csv", "bad.json", "not valid JSON"),
        ("subs.csv", "point.json", "the area is empty"),
        ("subs.csv", "empty.json", "the area is empty"),
        ("subs.csv", CAP / "oasiscap__ipaws_nv_cancel.xml", "no <info>"),
        ("subs.csv", CAP / "oasiscap__spec12_A3_earthquake_update.xml", "the area is empty"),
        ("subs.csv", "notcap.xml", "not usable CAP"),
        ("badrow.csv", "polk.geojson", "line 3"),
        ("list.geojson", "polk.geojson", "FeatureCollection"),
        (None, "polk.geojson", "missing --subscriptions"),
    ],
)
def test_errors_are_one_line_and_non_zero(
    tmp_path: Path,
    counties: dict[str, dict[str, object]],
    subs: str | None,
    area: str | Path,
    message: str,
) -> None:
    (tmp_path / "subs.csv").write_text("id,lon,lat,radius_m\na,-93.6,41.6,0\n")
    (tmp_path / "badrow.csv").write_text("id,lon,lat\na,-93.6,41.6\nb,abc,41.6\n")
    write_json(tmp_path / "list.geojson", [feature("a", None, zone="FIPS:19153")])
    write_json(tmp_path / "polk.geojson", counties["19153"])
    (tmp_path / "bad.json").write_text('{"type": "Polygon", "coordinates": [[[0, 0], [1')
    write_json(tmp_path / "point.json", {"type": "Point", "coordinates": [-93.6, 41.6]})
    write_json(tmp_path / "empty.json", {"type": "FeatureCollection", "features": []})
    (tmp_path / "notcap.xml").write_text("<html><body>not CAP</body></html>")
    args: list[str | Path] = ["--area", tmp_path / area]
    if subs is not None:
        args += ["--subscriptions", tmp_path / subs]
    out = run(*args)
    assert out.returncode != 0 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "Traceback" not in out.stderr
