"""Who is calling: pluggable authenticators and the FastAPI role dependencies.

An :class:`Authenticator` turns the bearer credential of a request into a
:class:`Principal` (or None). Two implementations:

- :class:`TokenAuthenticator`: opaque API tokens, hashed at rest (``ops.api.identity``);
- :class:`JwtAuthenticator`: HS256 JSON Web Tokens from an identity provider (claims
  ``sub``, ``name``, ``org``, ``roles``, ``exp``, optional ``iss``/``aud``). This is the
  path to OIDC: an OIDC provider's RS256 tokens need only another implementation that
  verifies against the provider's JWKS; the rest of the API does not change.

:class:`ChainAuthenticator` tries them in order. ``require(*roles)`` is the dependency
every protected route uses: 401 without valid credentials, 403 without one of the roles,
429 when the token's rate limit is exhausted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import HTTPException, Request

from ops.api.identity import ROLES, IdentityStore

if TYPE_CHECKING:
    from ops.api.context import ApiContext


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a user acting for an organisation with some roles."""

    user_id: str
    name: str
    org: str
    roles: frozenset[str]
    token_id: str
    via: str = "token"  # token | jwt

    def has(self, *roles: str) -> bool:
        """True when the caller holds at least one of ``roles``."""
        return bool(self.roles.intersection(roles))


class Authenticator(Protocol):
    """Turns a bearer credential into a principal; None when it is not valid."""

    async def authenticate(self, credential: str) -> Principal | None:
        """The principal for ``credential``, or None."""
        ...


class TokenAuthenticator:
    """Opaque API tokens looked up by their HMAC in the identity store."""

    def __init__(self, identity: IdentityStore) -> None:
        self.identity = identity

    async def authenticate(self, credential: str) -> Principal | None:
        """The principal owning an API token, or None."""
        found = await self.identity.resolve_token(credential)
        if found is None:
            return None
        user, record = found
        return Principal(user.id, user.name, user.org, frozenset(user.roles), record.id)


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 JWT (for tests and for operators wiring a simple identity provider)."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64url(sig)}"


class JwtAuthenticator:
    """HS256 JWTs whose ``org`` must be a known organisation and ``roles`` known roles."""

    def __init__(self, secret: bytes, identity: IdentityStore, *, issuer: str = "",
                 audience: str = "", leeway_s: float = 30.0) -> None:
        self.secret = secret
        self.identity = identity
        self.issuer = issuer
        self.audience = audience
        self.leeway_s = leeway_s

    def claims(self, credential: str) -> dict[str, Any] | None:
        """Verified claims of a token, or None (bad signature, expired, wrong iss/aud)."""
        parts = credential.split(".")
        if len(parts) != 3:
            return None
        try:
            header = json.loads(_b64url_decode(parts[0]))
            claims = json.loads(_b64url_decode(parts[1]))
            sig = _b64url_decode(parts[2])
        except ValueError:
            return None
        # Pin the algorithm: never let the token choose ("none", or RS/HS confusion).
        if not isinstance(header, dict) or header.get("alg") != "HS256":
            return None
        expected = hmac.new(self.secret, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256)
        if not hmac.compare_digest(expected.digest(), sig) or not isinstance(claims, dict):
            return None
        now = time.time()
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or exp + self.leeway_s < now:
            return None  # tokens without an expiry are refused: they could never be revoked
        if self.issuer and claims.get("iss") != self.issuer:
            return None
        aud = claims.get("aud")
        if self.audience and self.audience not in (aud if isinstance(aud, list) else [aud]):
            return None
        return claims

    async def authenticate(self, credential: str) -> Principal | None:
        """The principal a valid JWT describes, or None."""
        claims = self.claims(credential)
        if claims is None:
            return None
        org, sub = claims.get("org"), claims.get("sub")
        roles = claims.get("roles")
        if not isinstance(org, str) or not isinstance(sub, str) or not isinstance(roles, list):
            return None
        if await self.identity.get_org(org) is None:
            return None
        known = frozenset(r for r in roles if r in ROLES)
        name = str(claims.get("name") or sub)
        jti = str(claims.get("jti") or hashlib.sha256(credential.encode()).hexdigest()[:16])
        return Principal(f"jwt:{sub}", name, org, known, jti, via="jwt")


class ChainAuthenticator:
    """Tries several authenticators in order; the first that accepts wins."""

    def __init__(self, authenticators: Sequence[Authenticator]) -> None:
        self.authenticators = list(authenticators)

    async def authenticate(self, credential: str) -> Principal | None:
        """The first principal any authenticator finds, or None."""
        for authenticator in self.authenticators:
            principal = await authenticator.authenticate(credential)
            if principal is not None:
                return principal
        return None


def bearer(request: Request) -> str:
    """The bearer credential of a request, or 401."""
    header = request.headers.get("authorization", "")
    scheme, _, credential = header.partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise HTTPException(401, "missing credentials: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    return credential.strip()


def client_ip(request: Request, trust_forwarded: bool) -> str:
    """The caller's IP; X-Forwarded-For only when deployed behind a trusted proxy."""
    if trust_forwarded:
        forwarded = request.headers.get("x-forwarded-for", "")
        if forwarded:
            return forwarded.split(",")[0].strip()
    return request.client.host if request.client else "unknown"


def require(*roles: str) -> Callable[[Request], Awaitable[Principal]]:
    """A dependency admitting callers with at least one of ``roles`` (any role if none)."""

    async def dependency(request: Request) -> Principal:
        ctx: ApiContext = request.app.state.ctx
        principal = await ctx.authenticator.authenticate(bearer(request))
        if principal is None:
            raise HTTPException(401, "invalid, expired or revoked credentials",
                                headers={"WWW-Authenticate": "Bearer"})
        await ctx.limiter.check("token", principal.token_id, ctx.settings.api_rate_token_per_min)
        if roles and not principal.has(*roles):
            have = ", ".join(sorted(principal.roles)) or "none"
            detail = f"this action needs the role {' or '.join(roles)} (you have: {have})"
            # Attempts beyond one's role are exactly what an auditor wants to see.
            ip = client_ip(request, ctx.settings.api_trust_forwarded_for)
            await ctx.audit.append(
                actor=principal.user_id, roles=principal.roles, org=principal.org,
                action="auth.forbidden", ip=ip, outcome="denied",
                detail=f"{request.method} {request.url.path}: {detail}")
            raise HTTPException(403, detail)
        request.state.principal = principal
        return principal

    return dependency
