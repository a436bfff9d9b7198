"""OIDC: RS256/ES256 JWTs verified against an identity provider's JWKS over real HTTP.

The fixture runs a small identity provider stand-in (a threaded HTTP server serving an
OIDC discovery document and a JWK set, counting requests) with keys generated here; the
API finds the JWKS through discovery. Each refusal must be a 401 whose message says
what is wrong, because an operator wiring up an IdP has nothing else to go on.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from ops.api.auth import AuthError
from ops.api.oidc import JwksCache, OidcAuthenticator, build_authenticator
from tests.api.conftest import Api, draft, make_settings, start_api, stop_api

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]
AUDIENCE = "tocsin-api"


@dataclass
class Idp:
    """The identity provider stand-in: its URL, keys, published JWKS and hit counter."""

    issuer: str
    private: dict[str, Any]  # kid -> private key
    published: list[dict[str, Any]] = field(default_factory=list)
    jwks_hits: int = 0
    up: bool = True

    def publish(self, kid: str) -> None:
        key = self.private[kid].public_key()
        algo = RSAAlgorithm if isinstance(key, rsa.RSAPublicKey) else ECAlgorithm
        jwk = algo.to_jwk(key, as_dict=True)
        jwk.update(kid=kid, use="sig")
        self.published.append(jwk)

    def token(self, kid: str = "rsa-1", *, signer: str = "", alg: str = "",
              **claims: Any) -> str:
        """A token signed by ``signer``'s key (default: ``kid``'s) with sane claims."""
        now = int(time.time())
        body: dict[str, Any] = {"iss": self.issuer, "aud": AUDIENCE, "sub": "alice",
                                "name": "Alice Approver", "org": "demo-county",
                                "roles": ["approver"], "iat": now, "exp": now + 300}
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        key = self.private[signer or kid]
        alg = alg or ("RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256")
        return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})


def _serve(idp: Idp) -> tuple[ThreadingHTTPServer, threading.Thread]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if not idp.up:
                self.send_error(503)
                return
            if self.path == "/.well-known/openid-configuration":
                doc: Any = {"issuer": idp.issuer, "jwks_uri": f"{idp.issuer}/jwks.json"}
            elif self.path == "/jwks.json":
                idp.jwks_hits += 1
                doc = {"keys": idp.published}
            else:
                self.send_error(404)
                return
            payload = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:  # keep the test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture(scope="module")
def idp() -> Iterator[Idp]:
    """A running identity provider publishing rsa-1 and ec-1 (rsa-2 and rogue unpublished)."""
    keys = {"rsa-1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "rsa-2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "rogue": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ec-1": ec.generate_private_key(ec.SECP256R1())}
    provider = Idp(issuer="", private=keys)
    server, thread = _serve(provider)
    provider.issuer = f"http://127.0.0.1:{server.server_address[1]}"
    provider.publish("rsa-1")
    provider.publish("ec-1")
    yield provider
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def oidc_api(idp: Idp, module_broker: str, redis_server: str, data_dir: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Api]:
    """One API trusting the stand-in IdP (JWKS found by discovery; refetch every 60 s)."""
    import redis

    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    client.close()
    settings = make_settings(module_broker, redis_server, tmp_path_factory.mktemp("oidc"),
                             data_dir, api_oidc_issuer=idp.issuer, api_oidc_audience=AUDIENCE,
                             api_oidc_leeway_s=60, api_oidc_jwks_refetch_s=60)
    running = await start_api(settings)
    try:
        yield running
    finally:
        await stop_api(running)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def test_rs256_and_es256_tokens_sign_in_with_their_roles(oidc_api: Api, idp: Idp) -> None:
    for token in (idp.token("rsa-1"), idp.token("ec-1", roles="approver bogus"),
                  idp.token("rsa-1", exp=int(time.time()) - 30)):  # late, but within skew
        r = await oidc_api.client.get("/me", headers=bearer(token))
        assert r.status_code == 200, r.text
        me = r.json()
        assert me["via"] == "oidc" and me["user"] == "oidc:alice"
        assert me["roles"] == ["approver"] and me["org"]["id"] == "demo-county"
    # Roles still decide: an approver cannot compose.
    r = await oidc_api.client.post("/alerts", json=draft(), headers=bearer(idp.token()))
    assert r.status_code == 403 and "needs the role originator" in r.json()["detail"]


async def test_oidc_people_and_the_two_person_rule(oidc_api: Api, idp: Idp) -> None:
    both = idp.token(sub="carol", roles=["originator", "approver"])
    r = await oidc_api.client.post("/alerts", json=draft(), headers=bearer(both))
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    assert r.json()["created_by"] == "oidc:carol"
    r = await oidc_api.client.post(f"/alerts/{rid}/submit", headers=bearer(both))
    assert r.json()["state"] == "pending_approval"
    r = await oidc_api.client.post(f"/alerts/{rid}/approve", json={"send": False},
                                   headers=bearer(both))
    assert r.status_code == 403 and "two-person rule" in r.json()["detail"]
    r = await oidc_api.client.post(f"/alerts/{rid}/approve", json={"send": False},
                                   headers=bearer(idp.token(sub="dave")))
    assert r.status_code == 200 and r.json()["approved_by"] == "oidc:dave", r.text


def _refusals(idp: Idp) -> dict[str, tuple[str, str]]:
    """name -> (token, what the 401 must say)."""
    now = int(time.time())
    signed = idp.token()
    head, body, _ = signed.split(".")
    pem = idp.private["rsa-1"].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    hs_head = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    hs_sig = _b64(hmac.new(pem, f"{hs_head}.{body}".encode(), hashlib.sha256).digest())
    forged = _b64(json.dumps({"sub": "alice", "roles": ["admin"]}).encode())
    none_head = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": "rsa-1"}).encode())
    return {
        "bad_signature": (idp.token("rsa-1", signer="rogue"), "bad signature"),
        "tampered_claims": (f"{head}.{forged}.{signed.split('.')[2]}", "bad signature"),
        "wrong_issuer": (idp.token(iss="https://evil.example"), "wrong issuer"),
        "wrong_audience": (idp.token(aud="another-app"), "wrong audience"),
        "expired": (idp.token(exp=now - 3600), "token expired"),
        "not_yet_valid": (idp.token(nbf=now + 3600), "not valid yet"),
        "no_expiry": (idp.token(exp=None), "no 'exp' claim"),
        "unknown_kid": (idp.token("rsa-2"), "unknown signing key 'rsa-2'"),
        "alg_none": (f"{none_head}.{body}.", "algorithm 'none' is not accepted"),
        "hs256_with_public_key": (f"{hs_head}.{body}.{hs_sig}",
                                  "algorithm 'HS256' is not accepted"),
        "key_type_confusion": (idp.token("rsa-1", signer="ec-1"), "is a RS256 key"),
        "no_roles": (idp.token(roles=None), "no 'roles' claim"),
        "no_tocsin_role": (idp.token(roles=["superuser"]), "grants no Tocsin role"),
        "unknown_org": (idp.token(org="elsewhere"), "'elsewhere' (claim 'org') is not known"),
        "no_org": (idp.token(org=None), "no 'org' claim"),
        "malformed": ("abc.def.ghi", "malformed token"),
    }


async def test_every_refusal_is_a_401_that_says_why(oidc_api: Api, idp: Idp) -> None:
    audited = len(await oidc_api.ctx.audit.entries(limit=10_000))
    failures = []
    for name, (token, why) in _refusals(idp).items():
        r = await oidc_api.client.get("/me", headers=bearer(token))
        detail = r.json().get("detail", "")
        if r.status_code != 401 or why not in detail or \
                r.headers.get("www-authenticate") != "Bearer":
            failures.append(f"{name}: {r.status_code} {detail!r} (wanted {why!r})")
    assert not failures, "\n".join(failures)
    # A refused token is nobody: nothing is done, or audited, in its name.
    assert len(await oidc_api.ctx.audit.entries(limit=10_000)) == audited


async def test_invented_key_ids_do_not_hammer_the_identity_provider(oidc_api: Api,
                                                                    idp: Idp) -> None:
    assert (await oidc_api.client.get("/me", headers=bearer(idp.token()))).status_code == 200
    before = idp.jwks_hits
    tokens = [idp.token(f"invented-{i}", signer="rsa-1") for i in range(30)]
    replies = await asyncio.gather(*(oidc_api.client.get("/me", headers=bearer(t))
                                     for t in tokens))
    assert {r.status_code for r in replies} == {401}
    assert all("unknown signing key" in r.json()["detail"] for r in replies)
    assert idp.jwks_hits - before <= 1, "unknown kids must not each trigger a JWKS fetch"


async def test_key_rotation_is_picked_up_at_most_once_per_interval(oidc_api: Api,
                                                                   idp: Idp) -> None:
    now = [1000.0]
    cache = JwksCache(issuer=idp.issuer, refetch_s=30, max_age_s=600, clock=lambda: now[0])
    auth = OidcAuthenticator(oidc_api.ctx.identity, cache, issuer=idp.issuer,
                             audience=AUDIENCE)
    principal = await auth.authenticate(idp.token())
    assert principal is not None and principal.via == "oidc"
    hits = idp.jwks_hits
    idp.publish("rsa-2")  # the IdP rotates in a new key
    try:
        rotated = idp.token("rsa-2", sub="erin")
        now[0] += 5  # too soon after the last fetch: refused without asking the IdP
        with pytest.raises(AuthError, match="unknown signing key"):
            await auth.authenticate(rotated)
        assert idp.jwks_hits == hits
        now[0] += 30
        principal = await auth.authenticate(rotated)
        assert principal is not None and principal.user_id == "oidc:erin"
        assert idp.jwks_hits == hits + 1
        # Two tokens of one person share one rate-limit bucket.
        again = await auth.authenticate(idp.token("rsa-2", sub="erin", iat=int(time.time()) - 5))
        assert again is not None and again.token_id == principal.token_id
        # Cached keys are refreshed once they are older than max_age_s.
        now[0] += 601
        await auth.authenticate(rotated)
        assert idp.jwks_hits == hits + 2
    finally:
        idp.published.pop()


async def test_an_unreachable_identity_provider_is_a_503_not_a_crash(oidc_api: Api,
                                                                     idp: Idp) -> None:
    cache = JwksCache(jwks_url=f"{idp.issuer}/jwks.json", refetch_s=30)
    auth = OidcAuthenticator(oidc_api.ctx.identity, cache, issuer=idp.issuer,
                             audience=AUDIENCE)
    idp.up = False
    try:
        with pytest.raises(AuthError, match="could not be fetched") as refused:
            await auth.authenticate(idp.token())
        assert refused.value.status == 503
    finally:
        idp.up = True


async def test_nested_role_claims_and_unsafe_configurations(oidc_api: Api, idp: Idp) -> None:
    cache = JwksCache(jwks_url=f"{idp.issuer}/jwks.json")
    keycloak = OidcAuthenticator(oidc_api.ctx.identity, cache, issuer=idp.issuer,
                                 audience=AUDIENCE, roles_claim="realm_access.roles",
                                 org_claim="tocsin_org")
    principal = await keycloak.authenticate(idp.token(
        roles=None, org=None, realm_access={"roles": ["offline_access", "originator"]},
        tocsin_org="demo-county"))
    assert principal is not None and principal.roles == {"originator"}
    with pytest.raises(ValueError, match="audience"):
        OidcAuthenticator(oidc_api.ctx.identity, cache, issuer=idp.issuer, audience="")
    with pytest.raises(ValueError, match="asymmetric"):
        OidcAuthenticator(oidc_api.ctx.identity, cache, issuer=idp.issuer, audience=AUDIENCE,
                          algorithms=["RS256", "HS256"])
    settings = oidc_api.settings.model_copy(update={"api_oidc_audience": ""})
    with pytest.raises(ValueError, match="audience"):
        build_authenticator(settings, oidc_api.ctx.identity)
