"""Every refusal is a 4xx with a JSON message that says what to fix.

Odd requests an integrator (or an attacker) sends: the wrong content type, broken JSON,
no body, unknown or misspelt fields, bodies over the limit, malformed GeoJSON. A
misspelt field matters most on approve: ``{"sned": false}`` must not send an alert.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.api.conftest import Api, composed, draft

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]
JSON = {"content-type": "application/json"}
FORM = "application/x-www-form-urlencoded"
INSIDE = [[-118.4, 34.0], [-118.2, 34.0], [-118.2, 34.1], [-118.4, 34.0]]


def with_area(raw_area: str) -> dict[str, Any]:
    """A draft whose area is the literal JSON text ``raw_area`` (NaN and all)."""
    body = json.dumps({**draft(), "area": "AREA"}).replace('"AREA"', raw_area)
    return {"content": body.encode(), "headers": JSON}


def polygon(coordinates: Any, kind: str = "Polygon") -> dict[str, Any]:
    return {"json": draft(area={"polygon": {"type": kind, "coordinates": coordinates}})}


# (name, method, path, role, request kwargs, status, words the message must contain)
CASES: list[tuple[str, str, str, str, dict[str, Any], int, str]] = [
    ("form_instead_of_json", "POST", "/alerts", "originator",
     {"content": b"status=Actual", "headers": {"content-type": FORM}},
     415, "Content-Type: application/json"),
    ("json_as_text_plain", "POST", "/alerts", "originator",
     {"content": json.dumps(draft()).encode(), "headers": {"content-type": "text/plain"}},
     415, "unsupported content type 'text/plain'"),
    ("invalid_json", "POST", "/alerts", "originator", {"content": b'{"status": ', "headers": JSON},
     422, "invalid JSON at character"),
    ("not_utf8", "POST", "/alerts/preview", "originator",
     {"content": b"\xff\xfe\x00", "headers": JSON}, 400, "error parsing the body"),
    ("nested_too_deep", "POST", "/alerts", "originator",
     with_area('{"polygon":{"type":"Polygon","coordinates":' + "[" * 5000 + "]" * 5000 + "}}"),
     400, "error parsing the body"),
    ("no_body", "POST", "/alerts", "originator", {"content": b"", "headers": JSON},
     422, "a JSON object body is required"),
    ("approve_without_body", "POST", "/alerts/nothing/approve", "approver", {},
     422, "a JSON object body is required"),
    ("array_body", "POST", "/alerts", "originator", {"json": [draft()]},
     422, "the body must be a JSON object"),
    ("unknown_field", "POST", "/alerts", "originator", {"json": {**draft(), "sevrity": "Minor"}},
     422, "sevrity: Extra inputs are not permitted"),
    ("unknown_circle_unit", "POST", "/alerts", "originator",
     {"json": draft(area={"circle": {"lon": -118.3, "lat": 34.0, "radius_km": 5, "unit": "mi"}})},
     422, "area.circle.unit"),
    ("citizen_typo", "POST", "/citizens", "", {"json": {"prefs": {"accept_test": True}}},
     422, "prefs.accept_test"),
    ("token_label_typo", "POST", "/admin/users/demo-auditor/tokens", "admin",
     {"json": {"lable": "ci"}}, 422, "lable"),
    ("org_unknown_field", "PUT", "/admin/orgs/x-county", "admin",
     {"json": {"id": "x-county", "name": "X", "sender": "x@x.invalid", "jurisdicton": {}}},
     422, "jurisdicton"),
    ("org_bad_jurisdiction_polygon", "PUT", "/admin/orgs/x-county", "admin",
     {"json": {"id": "x-county", "name": "X", "sender": "x@x.invalid",
               "jurisdiction": {"geometry": {"type": "Polygon", "coordinates": "everywhere"}}}},
     422, "jurisdiction.geometry"),
    ("huge_body", "POST", "/citizens", "", {"content": b"{" + b" " * 1_100_000 + b"}",
                                            "headers": JSON}, 413, "too large"),
    ("polygon_nan", "POST", "/alerts", "originator", with_area(
        '{"polygon":{"type":"Polygon","coordinates":[[[NaN,34.0],[-118.2,34.0],'
        '[-118.2,34.1],[NaN,34.0]]]}}'), 422, "finite numbers"),
    ("polygon_point", "POST", "/alerts", "originator", polygon([-118.3, 34.0], "Point"),
     422, "type must be Polygon or MultiPolygon"),
    ("polygon_no_coordinates", "POST", "/alerts", "originator",
     {"json": draft(area={"polygon": {"type": "Polygon"}})}, 422, "needs coordinates"),
    ("polygon_two_points", "POST", "/alerts", "originator",
     polygon([[[-118.3, 34.0], [-118.2, 34.0]]]), 422, "at least 4"),
    ("polygon_strings", "POST", "/alerts", "originator",
     polygon([[["a", "b"], [1, 2], [3, 4], ["a", "b"]]]), 422, "finite numbers"),
    ("polygon_5d_positions", "POST", "/alerts", "originator",
     polygon([[[*INSIDE[0], 1, 2, 3], *INSIDE[1:]]]), 422, "[lon, lat]"),
    ("polygon_out_of_range", "POST", "/alerts", "originator",
     polygon([[[-118.3, 34.0], [-118.2, 94.0], [-118.2, 34.1], [-118.3, 34.0]]]),
     422, "out of range"),
    ("polygon_collapsed", "POST", "/alerts", "originator",
     polygon([[[-118.3, 34.0], [-118.2, 34.0], [-118.1, 34.0], [-118.3, 34.0]]]),
     422, "no area"),
    ("polygon_feature_without_geometry", "POST", "/alerts/preview", "originator",
     {"json": draft(area={"polygon": {"type": "Feature", "geometry": None}})},
     422, "expected a GeoJSON Polygon"),
    ("no_such_route", "GET", "/alerts/x/y/z", "originator", {}, 404, "Not Found"),
    ("wrong_method", "DELETE", "/alerts", "originator", {}, 405, "Method Not Allowed"),
    ("bad_query", "GET", "/public/alerts", "", {"params": {"limit": "lots"}}, 422,
     "query.limit"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
async def test_refusals_are_4xx_json_with_a_message(
        shared_api: Api, case: tuple[str, str, str, str, dict[str, Any], int, str]) -> None:
    _, method, path, role, kw, status, words = case
    r = await shared_api.call(method, path, role, **kw)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert words in r.json()["detail"], r.json()["detail"]


async def test_a_misspelt_approval_option_sends_nothing(shared_api: Api) -> None:
    rid = await composed(shared_api, "pending")
    r = await shared_api.call("POST", f"/alerts/{rid}/approve", "approver",
                              json={"sned": False})
    assert r.status_code == 422 and "sned" in r.json()["detail"]
    r = await shared_api.call("GET", f"/alerts/{rid}", "approver")
    assert r.json()["state"] == "pending_approval"
    for suffix, body in (("/reject", {"reason": "typo", "because": "x"}),
                         ("/cancel", {"reason": "x", "send": True}),
                         ("/correct", {"messsage": "oops"})):
        r = await shared_api.call("POST", f"/alerts/{rid}{suffix}", "approver", json=body)
        assert r.status_code == 422, (suffix, r.text)
    assert (await shared_api.call("GET", f"/alerts/{rid}", "approver")).json()["state"] == \
        "pending_approval"
