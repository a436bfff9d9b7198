"""The authorisation matrix: every role (a citizen's token and no token too) against every
action, and the organisation rules around it (jurisdiction by polygon or by codes,
allowed events) on both the console and the ingest path.

One API instance serves the whole module; each case prepares its own target (a draft, a
pending, approved, rejected or sent alert) through the API as the right people, then
performs the action as the role under test. Allowed: the action's success code. A role
without the right: 403 with a message naming the role needed. No token: 401. A citizen's
token is not a staff credential: 401 saying so. Nobody, admins included, can change the
audit log; everybody, anonymous included, can read the public statistics.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.api.conftest import Api, composed, demo_cap, draft

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

ROLES = ("originator", "approver", "admin", "auditor", "agency", "citizen", "")
STAFF = {"originator", "approver", "admin", "auditor", "agency"}
READERS = {"originator", "approver", "auditor", "admin"}
Prepare = Callable[[Api], Awaitable[tuple[str, str, dict[str, Any]]]]


def fixed(method: str, path: str, **kw: Any) -> Prepare:
    async def prepare(api: Api) -> tuple[str, str, dict[str, Any]]:
        return method, path, kw

    return prepare


def on(state: str, method: str, suffix: str, **kw: Any) -> Prepare:
    async def prepare(api: Api) -> tuple[str, str, dict[str, Any]]:
        rid = await composed(api, state)
        return method, f"/alerts/{rid}{suffix}", kw

    return prepare


def rejected(suffix: str) -> Prepare:
    async def prepare(api: Api) -> tuple[str, str, dict[str, Any]]:
        rid = await composed(api, "pending")
        r = await api.call("POST", f"/alerts/{rid}/reject", "approver", json={"reason": "not now"})
        assert r.status_code == 200, r.text
        return "GET", f"/alerts/{rid}{suffix}", {}

    return prepare


async def _victim_token(api: Api) -> tuple[str, str, dict[str, Any]]:
    record, _ = await api.ctx.identity.create_token("demo-auditor", "to revoke")
    return "DELETE", f"/admin/tokens/{record.id}", {}


async def with_citizen(api: Api) -> Api:
    """The module's API with a citizen token among its tokens (registered once)."""
    if "citizen" not in api.tokens:
        r = await api.client.post("/citizens", json={"push_token": "matrix-device-token"})
        assert r.status_code == 201, r.text
        api.tokens["citizen"] = r.json()["token"]
    return api


async def _ingest(api: Api) -> tuple[str, str, dict[str, Any]]:
    payload = await demo_cap(api, f"matrix-{len(api.extra)}")
    api.extra[f"cap{len(api.extra)}"] = True
    return "POST", "/ingest/cap", {"content": payload,
                                   "headers": {"content-type": "application/cap+xml"}}


# action -> (prepare, roles allowed, success status)
ACTIONS: dict[str, tuple[Prepare, set[str], int]] = {
    "me": (fixed("GET", "/me"), STAFF, 200),
    "compose": (fixed("POST", "/alerts", json=draft()), {"originator"}, 201),
    "history": (fixed("GET", "/alerts"), READERS, 200),
    "read": (on("draft", "GET", ""), READERS, 200),
    "edit": (on("draft", "PUT", "", json=draft(headline="Edited")), {"originator"}, 200),
    "preview_draft": (fixed("POST", "/alerts/preview", json=draft()),
                      {"originator", "approver"}, 200),
    "preview_stored": (on("draft", "GET", "/preview"), {"originator", "approver"}, 200),
    "submit": (on("draft", "POST", "/submit"), {"originator"}, 200),
    "approve": (on("pending", "POST", "/approve", json={"send": False}), {"approver"}, 200),
    "reject": (on("pending", "POST", "/reject", json={"reason": "wrong county"}),
               {"approver"}, 200),
    "send": (on("approved", "POST", "/send"), {"originator", "approver"}, 200),
    "update": (on("sent", "POST", "/update", json=draft(headline="Updated")),
               {"originator"}, 201),
    "cancel": (on("sent", "POST", "/cancel", json={"reason": "all clear"}),
               {"originator", "approver"}, 200),
    "withdraw": (on("pending", "POST", "/cancel", json={}), {"originator", "approver"}, 200),
    "correct": (on("sent", "POST", "/correct", json={}), {"originator", "approver"}, 200),
    "progress": (on("draft", "GET", "/progress"), READERS, 200),
    "audit_read": (fixed("GET", "/audit"), {"auditor", "admin"}, 200),
    "audit_verify": (fixed("GET", "/audit/verify"), {"auditor", "admin"}, 200),
    "ingest_cap": (_ingest, {"agency", "originator"}, 202),
    "admin_orgs": (fixed("GET", "/admin/orgs"), {"admin"}, 200),
    "admin_users": (fixed("GET", "/admin/users"), {"admin"}, 200),
    "admin_token": (fixed("POST", "/admin/users/demo-auditor/tokens", json={"label": "x"}),
                    {"admin"}, 201),
    "admin_token_list": (fixed("GET", "/admin/users/demo-auditor/tokens"), {"admin"}, 200),
    "admin_token_revoke": (_victim_token, {"admin"}, 204),
    "admin_org_put": (fixed("PUT", "/admin/orgs/matrix-county", json={
        "id": "matrix-county", "name": "Matrix County", "sender": "oem@matrix.invalid",
        "jurisdiction": {"codes": ["FIPS:06037"]}, "event_codes": ["CEM"]}), {"admin"}, 200),
    "admin_user_put": (fixed("PUT", "/admin/users/matrix-user", json={
        "id": "matrix-user", "name": "Matrix User", "org": "demo-county",
        "roles": ["auditor"]}), {"admin"}, 200),
    "cap_xml": (on("sent", "GET", "/cap"), READERS, 200),
    "progress_stream": (rejected("/progress/stream"), READERS, 200),
}


@pytest.mark.parametrize("action", sorted(ACTIONS))
@pytest.mark.parametrize("role", ROLES, ids=lambda r: r or "anonymous")
async def test_authorisation_matrix(shared_api: Api, role: str, action: str) -> None:
    prepare, allowed, success = ACTIONS[action]
    api = await with_citizen(shared_api)
    method, path, kw = await prepare(api)
    r = await api.call(method, path, role, **kw)
    if not role:
        assert r.status_code == 401, r.text
        assert r.headers.get("www-authenticate") == "Bearer"
    elif role == "citizen":
        assert r.status_code == 401, r.text
        assert "citizen token" in r.json()["detail"]
    elif role in allowed:
        assert r.status_code == success, f"{role} {action}: {r.status_code} {r.text}"
    else:
        assert r.status_code == 403, f"{role} {action}: {r.status_code} {r.text}"
        assert "needs the role" in r.json()["detail"]


async def test_another_organisation_cannot_see_or_touch_our_alerts(shared_api: Api) -> None:
    from ops.api.identity import Jurisdiction, Organisation, User

    ident = shared_api.ctx.identity
    await ident.put_org(Organisation(id="other-county", name="Other County",
                                     sender="oem@other.tocsin.invalid",
                                     jurisdiction=Jurisdiction(codes=["FIPS:06037"])))
    tokens = {}
    for role in ("originator", "approver"):
        await ident.put_user(User(id=f"other-{role}", name=role, org="other-county",
                                  roles=[role]))  # type: ignore[list-item]
        _, tokens[role] = await ident.create_token(f"other-{role}")
    rid = await composed(shared_api, "pending")
    for role, method, suffix, body in (
        ("originator", "GET", "", None), ("approver", "POST", "/approve", {"send": False}),
        ("originator", "POST", "/cancel", {}), ("originator", "PUT", "", draft()),
        ("approver", "POST", "/reject", {"reason": "not yours"}),
    ):
        r = await shared_api.client.request(method, f"/alerts/{rid}{suffix}", json=body,
                                            headers={"Authorization": f"Bearer {tokens[role]}"})
        assert r.status_code == 403, r.text
        assert "another organisation" in r.json()["detail"]
    r = await shared_api.client.get("/alerts", params={"org": "demo-county"},
                                    headers={"Authorization": f"Bearer {tokens['originator']}"})
    assert r.status_code == 403
    # Auditors read across organisations.
    r = await shared_api.call("GET", f"/alerts/{rid}", "auditor")
    assert r.status_code == 200


async def test_bad_and_revoked_tokens_are_401(shared_api: Api) -> None:
    r = await shared_api.client.get("/me", headers={"Authorization": "Bearer tocsin_nope"})
    assert r.status_code == 401 and "invalid" in r.json()["detail"]
    r = await shared_api.client.get("/me", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401 and "Bearer" in r.json()["detail"]
    r = await shared_api.call("POST", "/admin/users/demo-auditor/tokens", "admin", json={})
    token, token_id = r.json()["token"], r.json()["id"]
    headers = {"Authorization": f"Bearer {token}"}
    assert (await shared_api.client.get("/me", headers=headers)).status_code == 200
    r = await shared_api.call("DELETE", f"/admin/tokens/{token_id}", "admin")
    assert r.status_code == 204
    assert (await shared_api.client.get("/me", headers=headers)).status_code == 401


async def test_jwt_authenticator(shared_api: Api) -> None:
    """HS256 JWTs under a shared secret: verified, mapped, refused with a reason."""
    import base64
    import time

    from ops.api.auth import AuthError, ChainAuthenticator, TokenAuthenticator
    from ops.api.oidc import JwtAuthenticator, make_jwt

    secret = b"idp-shared-secret-of-at-least-32-bytes"
    ident = shared_api.ctx.identity
    auth = ChainAuthenticator([TokenAuthenticator(ident),
                               JwtAuthenticator(secret, ident, issuer="idp")])
    now = time.time()
    claims = {"sub": "alice", "org": "demo-county", "roles": ["approver", "bogus"],
              "exp": now + 60, "iss": "idp"}
    principal = await auth.authenticate(make_jwt(claims, secret))
    assert principal is not None and principal.roles == {"approver"}
    assert principal.org == "demo-county" and principal.via == "jwt"
    for bad, why in (({**claims, "exp": now - 3600}, "expired"), ({**claims, "iss": "evil"},
                     "issuer"), ({**claims, "org": "nowhere"}, "not known"),
                     ({k: v for k, v in claims.items() if k != "exp"}, "'exp'"),
                     ({**claims, "roles": ["bogus"]}, "no Tocsin role")):
        with pytest.raises(AuthError, match=why):
            await auth.authenticate(make_jwt(bad, secret))
    with pytest.raises(AuthError, match="bad signature"):
        await auth.authenticate(make_jwt(claims, b"wrong-secret-of-at-least-32-bytes!!"))
    body = make_jwt(claims, secret).split(".")[1]
    none_header = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
    assert await auth.authenticate(f"{none_header}.{body}.") is None  # not an HS256 token
    assert await auth.authenticate("not-a-token") is None


@pytest.mark.parametrize("role", ROLES, ids=lambda r: r or "anonymous")
async def test_public_statistics_are_open_and_the_audit_log_closed_to_everyone(
        shared_api: Api, role: str) -> None:
    from ops.api.audit import STREAM

    api = await with_citizen(shared_api)
    for path in ("/public/alerts", "/public", "/feeds/alerts.atom"):
        r = await api.call("GET", path, role)
        assert r.status_code == 200, (path, r.text)
    await composed(api, "draft")  # at least one audit entry
    before = await api.ctx.redis.xlen(STREAM)
    entries: Any = await api.ctx.redis.xrange(STREAM, count=1)
    first = entries[0][0].decode()
    for method in ("PUT", "PATCH", "DELETE", "POST"):
        for path in ("/audit", f"/audit/{first}", "/audit/verify"):
            r = await api.call(method, path, role, json={"detail": "nothing happened"})
            assert r.status_code in (404, 405), (method, path, r.status_code)
            assert "detail" in r.json()
    assert await api.ctx.redis.xlen(STREAM) == before
    assert (await api.call("GET", "/audit/verify", "auditor")).json()["ok"] is True


@pytest.mark.parametrize("role", [*sorted(STAFF), ""], ids=lambda r: r or "anonymous")
async def test_staff_tokens_are_not_citizen_tokens(shared_api: Api, role: str) -> None:
    api = await with_citizen(shared_api)
    for method, path in (("GET", "/citizens/me"), ("PATCH", "/citizens/me"),
                         ("DELETE", "/citizens/me"), ("POST", "/citizens/me/unsubscribe")):
        r = await api.call(method, path, role, json={} if method == "PATCH" else None)
        assert r.status_code == 401, (method, path, r.text)
    assert (await api.call("GET", "/citizens/me", "citizen")).status_code == 200


# A box around downtown Los Angeles: an organisation whose jurisdiction is a polygon.
DOWNTOWN = {"type": "Polygon", "coordinates": [[
    [-118.35, 33.98], [-118.15, 33.98], [-118.15, 34.12], [-118.35, 34.12], [-118.35, 33.98]]]}


def _box(x0: float, y0: float, x1: float, y1: float) -> dict[str, Any]:
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1],
                                                [x0, y0]]]}


async def _polygon_org(api: Api) -> None:
    """'downtown' (jurisdiction: the DOWNTOWN polygon; events CEM and EVI) and its people."""
    if "downtown-originator" in api.tokens:
        return
    r = await api.call("PUT", "/admin/orgs/downtown", "admin", json={
        "id": "downtown", "name": "Downtown Emergency Office", "sender": "oem@downtown.invalid",
        "jurisdiction": {"geometry": DOWNTOWN}, "event_codes": ["CEM", "EVI"]})
    assert r.status_code == 200, r.text
    for role in ("originator", "agency"):
        r = await api.call("PUT", f"/admin/users/downtown-{role}", "admin", json={
            "id": f"downtown-{role}", "name": role, "org": "downtown", "roles": [role]})
        assert r.status_code == 200, r.text
        r = await api.call("POST", f"/admin/users/downtown-{role}/tokens", "admin", json={})
        api.tokens[f"downtown-{role}"] = r.json()["token"]


@pytest.mark.parametrize(("area", "allowed"), [
    ({"polygon": _box(-118.30, 34.00, -118.20, 34.10)}, True),
    ({"circle": {"lon": -118.25, "lat": 34.05, "radius_km": 3}}, True),
    ({"polygon": _box(-118.30, 34.00, -118.00, 34.10)}, False),  # spills 15 km east
    ({"circle": {"lon": -118.25, "lat": 34.05, "radius_km": 40}}, False),
    ({"codes": ["FIPS:06037"]}, False),  # the whole county is bigger than downtown
    ({"codes": ["FIPS:24031"]}, False),
], ids=["polygon_inside", "circle_inside", "polygon_spilling", "circle_too_big",
        "county_code_around", "code_elsewhere"])
async def test_polygon_jurisdiction_on_console_and_ingest(shared_api: Api, area: dict[str, Any],
                                                          allowed: bool) -> None:
    await _polygon_org(shared_api)
    body = draft(area=area)
    r = await shared_api.call("POST", "/alerts", "downtown-originator", json=body)
    if allowed:
        assert r.status_code == 201, r.text
    else:
        assert r.status_code == 403, r.text
        assert "outside the jurisdiction" in r.json()["detail"]
        assert "Downtown Emergency Office" in r.json()["detail"]
    # The same alert as CAP from the office's agency feed: the same verdict.
    from datetime import UTC, datetime

    from ops.api.compose import build_alert, cap_document
    from ops.api.models import DraftIn

    org = await shared_api.ctx.identity.get_org("downtown")
    assert org is not None
    alert, _ = build_alert(DraftIn.model_validate(body), org, shared_api.ctx.gazetteer,
                           identifier=f"downtown-{len(shared_api.extra)}", sent=datetime.now(UTC))
    shared_api.extra[alert.identifier] = True
    r = await shared_api.call("POST", "/ingest/cap", "downtown-agency",
                              content=cap_document(alert),
                              headers={"content-type": "application/cap+xml"})
    assert r.status_code == (202 if allowed else 403), r.text


async def test_allowed_event_codes_bound_console_and_ingest(shared_api: Api) -> None:
    await _polygon_org(shared_api)
    inside = {"polygon": _box(-118.30, 34.00, -118.20, 34.10)}
    r = await shared_api.call("POST", "/alerts", "downtown-originator",
                              json=draft(area=inside, event_code="EVI", event="Evacuation"))
    assert r.status_code == 201, r.text
    r = await shared_api.call("POST", "/alerts", "downtown-originator",
                              json=draft(area=inside, event_code="TOR", event="Tornado"))
    assert r.status_code == 403 and "event not allowed" in r.json()["detail"]
    # Agencies cannot slip a disallowed event in as CAP either, nor another org's sender.
    payload = await demo_cap(shared_api, "downtown-tor", event_code="TOR")
    payload = payload.replace(b"oem@demo-county.tocsin.invalid", b"oem@downtown.invalid")
    r = await shared_api.call("POST", "/ingest/cap", "downtown-agency", content=payload,
                              headers={"content-type": "application/cap+xml"})
    assert r.status_code == 403 and "event not allowed" in r.json()["detail"], r.text
    r = await shared_api.call("POST", "/ingest/cap", "downtown-agency",
                              content=await demo_cap(shared_api, "not-ours"),
                              headers={"content-type": "application/cap+xml"})
    assert r.status_code == 403 and "not your organisation's sender" in r.json()["detail"]


@pytest.mark.parametrize(("policy", "status", "severity", "needed"), [
    ("every_actual", "Actual", "Minor", True),
    ("every_actual", "Test", "Extreme", False),
    ("every_actual", "Exercise", "Extreme", False),
    ("from_severity", "Actual", "Severe", True),
    ("from_severity", "Actual", "Extreme", True),
    ("from_severity", "Actual", "Moderate", False),
    ("from_severity", "Actual", "Unknown", False),
    ("from_severity", "Exercise", "Extreme", False),
])
async def test_approval_policy_by_status_and_severity(policy: str, status: str, severity: str,
                                                     needed: bool) -> None:
    from types import SimpleNamespace

    from ops.api.alerts import needs_approval
    from ops.api.models import DraftIn
    from ops.settings import Settings

    settings = Settings(api_approval_policy=policy,  # type: ignore[arg-type]
                        api_approval_min_severity="Severe")
    ctx: Any = SimpleNamespace(settings=settings)
    body = DraftIn.model_validate(draft(status=status, severity=severity))
    assert needs_approval(ctx, body) is needed
