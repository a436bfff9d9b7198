"""The console as the API serves it: its page, its security headers, and the map layer.

The base layer is the organisation's own picture: the counties of the states its
jurisdiction touches, those inside flagged, usable as alert area codes; it needs a
token like every other manager's endpoint, and nothing the page loads comes from
anywhere but this server.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from ops.api.console import STATIC_DIR
from tests.api.conftest import Api

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


async def test_counties_layer_covers_the_jurisdiction_states(shared_api: Api) -> None:
    r = await shared_api.call("GET", "/geo/counties", "originator")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/geo+json")
    layer = r.json()
    props = {f["properties"]["code"]: f["properties"] for f in layer["features"]}
    inside = sorted(c for c, p in props.items() if p["in_jurisdiction"])
    # The demo jurisdiction: four California counties and Montgomery County, Maryland.
    assert inside == ["FIPS:06003", "FIPS:06009", "FIPS:06037", "FIPS:06109", "FIPS:24031"]
    assert props["FIPS:06037"]["name"] == "Los Angeles County"
    assert props["FIPS:06037"]["state"] == "CA"
    # Neighbours in the same states are drawn (to orient), other states are not.
    assert props["FIPS:06059"]["in_jurisdiction"] is False  # Orange County, CA
    assert {c[5:7] for c in props} == {"06", "24"}
    west, south, east, north = layer["jurisdiction_bbox"]
    assert west < -118 < -77 < east and south < 34 < north


async def test_counties_layer_needs_a_token_and_compresses(shared_api: Api) -> None:
    r = await shared_api.call("GET", "/geo/counties")
    assert r.status_code == 401
    assert "Bearer" in r.json()["detail"]
    raw = await shared_api.client.get(
        "/geo/counties", headers={**shared_api.auth("auditor"), "Accept-Encoding": "gzip"})
    assert raw.status_code == 200
    assert raw.headers["content-encoding"] == "gzip"
    # httpx decodes it; the compressed payload is far smaller than the GeoJSON.
    size = len(json.dumps(raw.json()).encode())
    assert len(gzip.compress(json.dumps(raw.json()).encode())) < size / 2


async def test_console_page_is_served_with_a_same_origin_policy(shared_api: Api) -> None:
    r = await shared_api.client.get("/console", follow_redirects=True)
    assert r.status_code == 200
    assert "<title>Tocsin" in r.text
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "http" not in csp
    root = await shared_api.client.get("/")
    assert root.status_code in (302, 307) and root.headers["location"] == "/console/"
    # Every asset the page references is local (no CDN, no tile server).
    page = (STATIC_DIR / "index.html").read_text()
    scripts = "".join(p.read_text() for p in (STATIC_DIR / "js").glob("*.js"))
    assert "http://" not in page + scripts and "https://" not in page + scripts
    templates = await shared_api.client.get("/console/templates.json")
    assert {t["event_code"] for t in templates.json()["templates"]} >= {"CEM", "EVI", "TOR"}


async def test_missing_vendored_library_says_how_to_build_it(shared_api: Api,
                                                             tmp_path: Path) -> None:
    from ops.api.console import ConsoleFiles

    (tmp_path / "index.html").write_text("<title>x</title>")
    files = ConsoleFiles(directory=tmp_path, html=True)
    response = await files.get_response("vendor/leaflet/leaflet.css",
                                        {"type": "http", "method": "GET", "headers": []})
    assert response.status_code == 404
    assert b"npm ci" in response.body
