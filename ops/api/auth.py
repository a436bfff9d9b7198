"""Who is calling: pluggable authenticators and the FastAPI role dependencies.

An :class:`Authenticator` turns the bearer credential of a request into a
:class:`Principal`. It returns None for a credential that is not its kind (so the next
one may try) and raises :class:`AuthError` with the reason for one that is its kind but
not valid (bad signature, expired, revoked...), which becomes the 401's message.
Implementations:

- :class:`TokenAuthenticator` (here): opaque API tokens, hashed at rest
  (``ops.api.identity``);
- ``ops.api.oidc.JwtAuthenticator``: HS256 JWTs under a shared secret;
- ``ops.api.oidc.OidcAuthenticator``: an OIDC provider's RS256/ES256 JWTs verified
  against its JWKS.

:class:`ChainAuthenticator` tries them in order. ``require(*roles)`` is the dependency
every protected route uses: 401 without valid credentials, 403 without one of the roles,
429 when the caller's rate limit is exhausted.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from fastapi import HTTPException, Request

from ops.api.citizen_store import CITIZEN_TOKEN_PREFIX
from ops.api.identity import TOKEN_PREFIX, IdentityStore

if TYPE_CHECKING:
    from ops.api.context import ApiContext


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a user acting for an organisation with some roles.

    ``token_id`` keys the per-caller rate limit: the API token's id, or for JWTs the
    issuer and subject (a person cannot escape the limit by asking for new tokens).
    """

    user_id: str
    name: str
    org: str
    roles: frozenset[str]
    token_id: str
    via: str = "token"  # token | jwt | oidc

    def has(self, *roles: str) -> bool:
        """True when the caller holds at least one of ``roles``."""
        return bool(self.roles.intersection(roles))


class AuthError(Exception):
    """A credential of an authenticator's kind that it refuses; ``reason`` says why."""

    def __init__(self, reason: str, *, status: int = 401) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class Authenticator(Protocol):
    """Turns a bearer credential into a principal (see the module docstring)."""

    async def authenticate(self, credential: str) -> Principal | None:
        """The principal for ``credential``; None if not this kind; AuthError if refused."""
        ...


class TokenAuthenticator:
    """Opaque API tokens looked up by their HMAC in the identity store."""

    def __init__(self, identity: IdentityStore) -> None:
        self.identity = identity

    async def authenticate(self, credential: str) -> Principal | None:
        """The principal owning an API token; AuthError for unknown or revoked ones."""
        if credential.startswith(CITIZEN_TOKEN_PREFIX):
            raise AuthError("this is a citizen token: it is valid only under /citizens")
        if not credential.startswith(TOKEN_PREFIX):
            return None
        found = await self.identity.resolve_token(credential)
        if found is None:
            raise AuthError("invalid, expired or revoked API token (or its user is disabled)")
        user, record = found
        return Principal(user.id, user.name, user.org, frozenset(user.roles), record.id)


class ChainAuthenticator:
    """Tries several authenticators in order; the first that accepts wins.

    When none accepts, the first refusal's reason is raised (the authenticator that
    recognised the credential knows best what is wrong with it).
    """

    def __init__(self, authenticators: Sequence[Authenticator]) -> None:
        self.authenticators = list(authenticators)

    async def authenticate(self, credential: str) -> Principal | None:
        """The first principal any authenticator finds; else the first refusal, or None."""
        refusal: AuthError | None = None
        for authenticator in self.authenticators:
            try:
                principal = await authenticator.authenticate(credential)
            except AuthError as exc:
                refusal = refusal or exc
                continue
            if principal is not None:
                return principal
        if refusal is not None:
            raise refusal
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
        try:
            principal = await ctx.authenticator.authenticate(bearer(request))
            if principal is None:
                raise AuthError("neither an API token nor a JWT from a trusted issuer")
        except (AuthError, HTTPException) as exc:
            # Failed sign-ins cost the caller's IP from the public budget, so credentials
            # cannot be guessed (or JWT signatures made us verify) at line rate.
            ip = client_ip(request, ctx.settings.api_trust_forwarded_for)
            await ctx.limiter.check("auth-fail-ip", ip, ctx.settings.api_rate_public_per_min,
                                    kind="ip")
            if isinstance(exc, HTTPException):
                raise
            raise HTTPException(exc.status, f"invalid credentials: {exc.reason}",
                                headers={"WWW-Authenticate": "Bearer"}) from exc
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
