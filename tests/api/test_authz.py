"""The authorisation matrix: every role (and no token) against every action.

One API instance serves the whole module; each case prepares its own target (a draft, a
pending, approved or sent alert) through the API as the right people, then performs the
action as the role under test. Allowed: the action's success code. A role without the
right: 403 with a message naming the role needed. No token: 401.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.api.conftest import Api, composed, demo_cap, draft

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

ROLES = ("originator", "approver", "admin", "auditor", "agency", "")
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


async def _ingest(api: Api) -> tuple[str, str, dict[str, Any]]:
    payload = await demo_cap(api, f"matrix-{len(api.extra)}")
    api.extra[f"cap{len(api.extra)}"] = True
    return "POST", "/ingest/cap", {"content": payload,
                                   "headers": {"content-type": "application/cap+xml"}}


# action -> (prepare, roles allowed, success status)
ACTIONS: dict[str, tuple[Prepare, set[str], int]] = {
    "me": (fixed("GET", "/me"), set(ROLES) - {""}, 200),
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
}


@pytest.mark.parametrize("action", sorted(ACTIONS))
@pytest.mark.parametrize("role", ROLES, ids=lambda r: r or "anonymous")
async def test_authorisation_matrix(shared_api: Api, role: str, action: str) -> None:
    prepare, allowed, success = ACTIONS[action]
    method, path, kw = await prepare(shared_api)
    r = await shared_api.call(method, path, role, **kw)
    if not role:
        assert r.status_code == 401, r.text
        assert r.headers.get("www-authenticate") == "Bearer"
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
