"""JSON Web Tokens: an OIDC provider's RS256/ES256 tokens, and HS256 under a shared secret.

:class:`OidcAuthenticator` verifies ``Authorization: Bearer <JWT>`` against the keys the
configured issuer publishes (its JWKS, found through OIDC discovery unless configured):

- the algorithm is pinned to the configured list (RS256, ES256) *and* to the key the
  ``kid`` names, so ``alg: none`` and HS256-signed-with-the-public-key tokens are refused
  before any verification;
- issuer, audience, ``exp`` (required: a token that never expires could never be
  revoked), ``nbf`` and ``iat`` are checked with a configurable clock skew;
- the roles claim (dotted for nested claims, e.g. Keycloak's ``realm_access.roles``)
  must name at least one Tocsin role, and the organisation claim a known organisation.

Keys are cached (:class:`JwksCache`); an unknown ``kid`` triggers a refetch (key
rotation) at most once per ``refetch_s``, so a flood of tokens with invented key ids
cannot turn the API into a traffic amplifier against the identity provider.

Every refusal raises :class:`ops.api.auth.AuthError` with a reason the 401 carries.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import jwt

from ops.api.auth import Authenticator, AuthError, ChainAuthenticator, Principal, TokenAuthenticator
from ops.api.identity import ROLES, IdentityStore
from ops.settings import Settings

log = logging.getLogger(__name__)

ASYMMETRIC = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256",
                        "ES384", "ES512", "EdDSA"})


def _reason(exc: jwt.PyJWTError) -> str:
    """A person-readable reason for a PyJWT verification failure."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token not valid yet (nbf/iat in the future)"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "wrong issuer"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "wrong audience: the token was not issued for this API"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "bad signature"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"the token has no '{exc.claim}' claim"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "algorithm not accepted"
    return f"malformed token ({exc})"


def claim(claims: dict[str, Any], path: str) -> Any:
    """The value at a dotted claim path (``realm_access.roles``), or None."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


async def principal_from_claims(claims: dict[str, Any], identity: IdentityStore, *,
                                roles_claim: str, org_claim: str, via: str) -> Principal:
    """The caller verified claims describe, or AuthError (no role, unknown organisation)."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise AuthError("the token has no 'sub' claim")
    raw = claim(claims, roles_claim)
    if raw is None:
        raise AuthError(f"the token has no '{roles_claim}' claim (the Tocsin roles)")
    names = raw.split() if isinstance(raw, str) else raw
    if not isinstance(names, list):
        raise AuthError(f"the '{roles_claim}' claim is neither a list nor a string")
    roles = frozenset(r for r in names if isinstance(r, str) and r in ROLES)
    if not roles:
        raise AuthError(f"the '{roles_claim}' claim grants no Tocsin role "
                        f"({', '.join(ROLES)})")
    org = claim(claims, org_claim)
    if not isinstance(org, str) or not org:
        raise AuthError(f"the token has no '{org_claim}' claim (the organisation)")
    if await identity.get_org(org) is None:
        raise AuthError(f"organisation {org[:64]!r} (claim '{org_claim}') is not known here")
    name = claims.get("name") or claims.get("preferred_username") or sub
    iss = str(claims.get("iss") or "")
    # Rate limits follow the person, not the token: a fresh token is one login away.
    limit_key = hashlib.sha256(f"{iss}\0{sub}".encode()).hexdigest()[:24]
    return Principal(f"{via}:{sub}"[:200], str(name)[:200], org, roles, f"{via}:{limit_key}",
                     via=via)


def _looks_like_jwt(credential: str) -> bool:
    return credential.count(".") == 2 and len(credential) < 16_384


def _header(credential: str) -> dict[str, Any]:
    try:
        header = jwt.get_unverified_header(credential)
    except jwt.PyJWTError as exc:
        raise AuthError(f"malformed token ({exc})") from exc
    return header


class JwksCache:
    """The issuer's signing keys by ``kid``, fetched over HTTP and cached.

    ``key(kid)`` refreshes the whole set when it is older than ``max_age_s``, and on an
    unknown ``kid`` (rotation) - but never more often than once per ``refetch_s``.
    Concurrent callers share one fetch. A failed fetch keeps the keys already known.
    """

    def __init__(self, *, jwks_url: str = "", issuer: str = "", refetch_s: float = 30.0,
                 max_age_s: float = 3600.0, timeout_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not jwks_url and not issuer:
            raise ValueError("a JWKS URL or an issuer (for discovery) is needed")
        self.jwks_url = jwks_url
        self.issuer = issuer
        self.refetch_s = refetch_s
        self.max_age_s = max_age_s
        self.timeout_s = timeout_s
        self.clock = clock
        self.keys: dict[str, jwt.PyJWK] = {}
        self.fetches = 0
        self.last_error = ""
        self._fetched_at: float | None = None  # last successful fetch
        self._tried_at: float | None = None  # last attempt, successful or not
        self._lock = asyncio.Lock()

    async def _get_json(self, session: aiohttp.ClientSession, url: str) -> Any:
        async with session.get(url, allow_redirects=False) as resp:
            if resp.status != 200:
                raise ValueError(f"{url} answered HTTP {resp.status}")
            return await resp.json(content_type=None)

    async def _fetch(self) -> dict[str, jwt.PyJWK]:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            if not self.jwks_url:  # OIDC discovery, once
                url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
                doc = await self._get_json(session, url)
                if not isinstance(doc, dict) or doc.get("issuer") != self.issuer:
                    raise ValueError(f"{url} is not this issuer's discovery document")
                if not isinstance(doc.get("jwks_uri"), str):
                    raise ValueError(f"{url} names no jwks_uri")
                self.jwks_url = doc["jwks_uri"]
            body = await self._get_json(session, self.jwks_url)
        if not isinstance(body, dict) or not isinstance(body.get("keys"), list):
            raise ValueError(f"{self.jwks_url} is not a JWK set")
        keys = {}
        for entry in body["keys"]:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry)  # type: ignore[arg-type]
            except jwt.PyJWTError as exc:
                log.warning("JWKS %s: skipping key %s: %s", self.jwks_url, entry.get("kid"), exc)
                continue
            keys[str(entry.get("kid", ""))] = key
        return keys

    async def refresh(self, *, reason: str) -> None:
        """Fetch the key set now unless one was fetched within ``refetch_s``."""
        async with self._lock:
            now = self.clock()
            if self._tried_at is not None and now - self._tried_at < self.refetch_s:
                return  # someone just fetched (or failed to): do not hammer the IdP
            self._tried_at = now
            self.fetches += 1
            try:
                self.keys = await self._fetch()
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("JWKS fetch (%s) failed: %s", reason, self.last_error)
                return
            self._fetched_at, self.last_error = now, ""
            log.info("JWKS fetched (%s): %d keys from %s", reason, len(self.keys),
                     self.jwks_url)

    async def key(self, kid: str | None) -> jwt.PyJWK:
        """The signing key for ``kid`` (None: the set's only key), or AuthError."""
        if self._fetched_at is None or self.clock() - self._fetched_at > self.max_age_s:
            await self.refresh(reason="cache empty or stale")
        if kid is None:
            if len(self.keys) == 1:
                return next(iter(self.keys.values()))
            raise AuthError("the token names no key ('kid') and the issuer has "
                            f"{len(self.keys)} keys")
        if kid not in self.keys:
            await self.refresh(reason=f"unknown kid {kid[:40]!r}")
        found = self.keys.get(kid)
        if found is None:
            if not self.keys and self.last_error:
                raise AuthError("the identity provider's keys could not be fetched; try "
                                "again shortly", status=503)
            raise AuthError(f"unknown signing key {kid[:40]!r}: not in the issuer's JWKS")
        return found


class OidcAuthenticator:
    """An OIDC provider's asymmetric JWTs, verified against its JWKS (module docstring)."""

    def __init__(self, identity: IdentityStore, jwks: JwksCache, *, issuer: str,
                 audience: str, algorithms: Sequence[str] = ("RS256", "ES256"),
                 leeway_s: float = 60.0, roles_claim: str = "roles",
                 org_claim: str = "org") -> None:
        if not issuer or not audience:
            raise ValueError("OIDC needs both an issuer and an audience: without the "
                             "audience any token the IdP issued for another app would do")
        unsafe = set(algorithms) - ASYMMETRIC
        if unsafe:
            raise ValueError(f"OIDC accepts only asymmetric algorithms, not {sorted(unsafe)}")
        self.identity = identity
        self.jwks = jwks
        self.issuer = issuer
        self.audience = audience
        self.algorithms = tuple(algorithms)
        self.leeway_s = leeway_s
        self.roles_claim = roles_claim
        self.org_claim = org_claim

    async def claims(self, credential: str) -> dict[str, Any]:
        """The verified claims of a token, or AuthError with the reason."""
        header = _header(credential)
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise AuthError(f"algorithm {str(alg)[:20]!r} is not accepted (accepted: "
                            f"{', '.join(self.algorithms)})")
        kid = header.get("kid")
        key = await self.jwks.key(kid if isinstance(kid, str) else None)
        if key.algorithm_name != alg:  # the key decides the algorithm, never the token
            raise AuthError(f"key {str(kid)[:40]!r} is a {key.algorithm_name} key, but the "
                            f"token says {alg}")
        try:
            claims: dict[str, Any] = jwt.decode(
                credential, key=key.key, algorithms=[alg], audience=self.audience,
                issuer=self.issuer, leeway=self.leeway_s,
                options={"require": ["exp", "iss", "aud", "sub"]})
        except jwt.PyJWTError as exc:
            raise AuthError(_reason(exc)) from exc
        return claims

    async def authenticate(self, credential: str) -> Principal | None:
        """The principal a valid token describes; None for what is not a JWT."""
        if not _looks_like_jwt(credential):
            return None
        claims = await self.claims(credential)
        return await principal_from_claims(claims, self.identity, roles_claim=self.roles_claim,
                                           org_claim=self.org_claim, via="oidc")


def make_jwt(claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 JWT (for tests and for operators wiring a simple identity provider)."""
    return jwt.encode(claims, secret, algorithm="HS256")


class JwtAuthenticator:
    """HS256 JWTs under a shared secret (claims ``sub``, ``org``, ``roles``, ``exp``)."""

    def __init__(self, secret: bytes, identity: IdentityStore, *, issuer: str = "",
                 audience: str = "", leeway_s: float = 30.0) -> None:
        self.secret = secret
        self.identity = identity
        self.issuer = issuer
        self.audience = audience
        self.leeway_s = leeway_s

    async def authenticate(self, credential: str) -> Principal | None:
        """The principal of a valid HS256 token; None for other credentials."""
        if not _looks_like_jwt(credential) or _header(credential).get("alg") != "HS256":
            return None  # not ours (an OIDC authenticator may know it)
        required = ["exp", "sub"] + (["iss"] if self.issuer else []) + \
            (["aud"] if self.audience else [])
        try:
            claims: dict[str, Any] = jwt.decode(
                credential, key=self.secret, algorithms=["HS256"],
                audience=self.audience or None, issuer=self.issuer or None,
                leeway=self.leeway_s, options={"require": required})
        except jwt.PyJWTError as exc:
            raise AuthError(_reason(exc)) from exc
        return await principal_from_claims(claims, self.identity, roles_claim="roles",
                                           org_claim="org", via="jwt")


def build_authenticator(settings: Settings, identity: IdentityStore) -> ChainAuthenticator:
    """API tokens, then HS256 JWTs and OIDC JWTs when configured."""
    chain: list[Authenticator] = [TokenAuthenticator(identity)]
    if settings.api_jwt_secret:
        chain.append(JwtAuthenticator(settings.api_jwt_secret.encode(), identity,
                                      issuer=settings.api_jwt_issuer,
                                      audience=settings.api_jwt_audience))
    if settings.api_oidc_issuer:
        jwks = JwksCache(jwks_url=settings.api_oidc_jwks_url, issuer=settings.api_oidc_issuer,
                         refetch_s=settings.api_oidc_jwks_refetch_s,
                         max_age_s=settings.api_oidc_jwks_max_age_s)
        algorithms = [a.strip() for a in settings.api_oidc_algorithms.split(",") if a.strip()]
        chain.append(OidcAuthenticator(
            identity, jwks, issuer=settings.api_oidc_issuer,
            audience=settings.api_oidc_audience, algorithms=algorithms,
            leeway_s=settings.api_oidc_leeway_s, roles_claim=settings.api_oidc_roles_claim,
            org_claim=settings.api_oidc_org_claim))
    return ChainAuthenticator(chain)
