"""Administration: organisations, users and their tokens (admins only), and ``/me``.

A token is returned exactly once, in the response that creates it; afterwards only its
id is ever shown (to list or revoke it). Every change is audited.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from geofencing.areas import geojson_to_geometry
from ops.api.audit import record
from ops.api.auth import Principal, require
from ops.api.context import ApiContext
from ops.api.identity import Organisation, User
from ops.api.models import geojson_problem

router = APIRouter(tags=["admin"])


class NewToken(BaseModel):
    """A freshly minted token: store it now, it is never shown again."""

    id: str
    user: str
    token: str
    note: str = "store this token now: it is not stored in readable form and cannot be shown again"


class TokenRequest(BaseModel):
    """What a token is for (shown in listings)."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field(default="", max_length=100)


class Me(BaseModel):
    """The caller as the API sees them."""

    user: str
    name: str
    org: Organisation | None
    roles: list[str]
    via: str


def _ctx(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


@router.get("/me", response_model=Me)
async def me(request: Request, principal: Principal = Depends(require())) -> Me:
    """Who am I: user, organisation (with jurisdiction and allowed events) and roles."""
    org = await _ctx(request).identity.get_org(principal.org)
    return Me(user=principal.user_id, name=principal.name, org=org,
              roles=sorted(principal.roles), via=principal.via)


@router.get("/admin/orgs", response_model=list[Organisation])
async def list_orgs(request: Request,
                    principal: Principal = Depends(require("admin"))) -> list[Organisation]:
    """Every organisation."""
    return await _ctx(request).identity.orgs()


@router.put("/admin/orgs/{org_id}", response_model=Organisation)
async def put_org(org_id: str, org: Organisation, request: Request,
                  principal: Principal = Depends(require("admin"))) -> Organisation:
    """Create or replace an organisation (its jurisdiction codes must exist)."""
    ctx = _ctx(request)
    if org.id != org_id:
        raise HTTPException(422, f"the body's id {org.id!r} does not match the path {org_id!r}")
    for code in org.jurisdiction.codes:
        if ctx.gazetteer.get(code) is None:
            raise HTTPException(422, f"jurisdiction code {code!r} is unknown (e.g. FIPS:06037)")
    if org.jurisdiction.geometry is not None:
        # A broken jurisdiction would only surface later, as every alert being refused.
        problem = geojson_problem(org.jurisdiction.geometry) or \
            geojson_to_geometry(org.jurisdiction.geometry)[1]
        if problem:
            raise HTTPException(422, f"jurisdiction.geometry: {problem}")
    await ctx.identity.put_org(org)
    await record(request, principal, "admin.org.put", detail=org.id)
    return org


@router.get("/admin/users", response_model=list[User])
async def list_users(request: Request, org: str | None = None,
                     principal: Principal = Depends(require("admin"))) -> list[User]:
    """Every user, or those of one organisation."""
    return await _ctx(request).identity.users(org)


@router.put("/admin/users/{user_id}", response_model=User)
async def put_user(user_id: str, user: User, request: Request,
                   principal: Principal = Depends(require("admin"))) -> User:
    """Create or replace a user (disable with ``disabled: true``)."""
    ctx = _ctx(request)
    if user.id != user_id:
        raise HTTPException(422, f"the body's id {user.id!r} does not match the path {user_id!r}")
    try:
        await ctx.identity.put_user(user)
    except KeyError as exc:
        raise HTTPException(422, str(exc.args[0])) from exc
    await record(request, principal, "admin.user.put",
                 detail=f"{user.id} org={user.org} roles={','.join(user.roles)}")
    return user


@router.post("/admin/users/{user_id}/tokens", response_model=NewToken, status_code=201)
async def create_token(user_id: str, body: TokenRequest, request: Request,
                       principal: Principal = Depends(require("admin"))) -> NewToken:
    """Mint a token for a user; the response is the only time it is shown."""
    try:
        rec, token = await _ctx(request).identity.create_token(user_id, body.label)
    except KeyError as exc:
        raise HTTPException(404, str(exc.args[0])) from exc
    await record(request, principal, "admin.token.create", detail=f"{user_id} {rec.id}")
    return NewToken(id=rec.id, user=user_id, token=token)


@router.get("/admin/users/{user_id}/tokens", response_model=list[str])
async def list_tokens(user_id: str, request: Request,
                      principal: Principal = Depends(require("admin"))) -> list[str]:
    """Token ids of a user (never the tokens)."""
    return await _ctx(request).identity.tokens_of(user_id)


@router.delete("/admin/tokens/{token_id}", status_code=204, response_class=Response)
async def revoke_token(token_id: str, request: Request,
                       principal: Principal = Depends(require("admin"))) -> Response:
    """Revoke a token at once."""
    if not await _ctx(request).identity.revoke_token(token_id):
        raise HTTPException(404, f"no token {token_id!r}")
    await record(request, principal, "admin.token.revoke", detail=token_id)
    return Response(status_code=204)
