"""Organisations, users and API tokens, kept in Redis.

Tokens are random (``tocsin_`` + 32 bytes, URL-safe), shown once when created, and stored
only as ``HMAC-SHA256(server secret, token)``: a copy of Redis alone cannot be turned into
working credentials, and a lookup is one ``GET`` on the hash (no per-user scan, no
timing side channel on the comparison because the key *is* the hash).

Redis layout (every key under ``tocsin:api:``):

- ``org:<id>``              JSON :class:`Organisation`; ``orgs`` is the set of ids
- ``user:<id>``             JSON :class:`User`; ``users`` is the set of ids
- ``token:<hmac hex>``      JSON :class:`TokenRecord` (never the token itself)
- ``token-id:<token id>``   the hmac of that token, so an admin can revoke by id
- ``user-tokens:<user id>`` set of token ids of a user
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from typing import Any, Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, field_validator

Role = Literal["originator", "approver", "admin", "auditor", "agency"]
ROLES: tuple[Role, ...] = ("originator", "approver", "admin", "auditor", "agency")
_ID = r"^[a-z0-9][a-z0-9-]{0,62}$"
PREFIX = "tocsin:api:"
TOKEN_PREFIX = "tocsin_"

# Demo organisation for ``tocsin dev``: the counties the demo's replayed alerts cover.
DEMO_COUNTIES = ("06037", "06109", "06003", "06009", "24031")
DEMO_EVENT_CODES = (
    "ADR", "BZW", "CAE", "CDW", "CEM", "DMO", "EQW", "EVI", "FFW", "FLW", "FRW", "HMW",
    "HWW", "LAE", "LEW", "NUW", "RHW", "RMT", "RWT", "SPS", "SPW", "SVR", "SVS", "TOR",
    "TSW", "WFW",
)


class Jurisdiction(BaseModel):
    """Where an organisation may alert: gazetteer codes and/or a GeoJSON geometry.

    Both empty means "anywhere" (an operator organisation, not a local authority).
    """

    model_config = ConfigDict(extra="forbid")

    codes: list[str] = Field(default_factory=list, max_length=5000)
    geometry: dict[str, Any] | None = None


class Organisation(BaseModel):
    """An alerting authority. ``sender`` is the CAP ``<sender>`` of its alerts."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=_ID)
    name: str = Field(min_length=1, max_length=200)
    sender: str = Field(min_length=3, max_length=200, pattern=r"^[^\s,<&]+$")
    jurisdiction: Jurisdiction = Field(default_factory=Jurisdiction)
    event_codes: list[str] = Field(
        default_factory=list, description="allowed SAME event codes; empty with events = any"
    )
    events: list[str] = Field(default_factory=list, description="allowed <event> names")

    @field_validator("event_codes")
    @classmethod
    def _upper(cls, codes: list[str]) -> list[str]:
        return [c.strip().upper() for c in codes if c.strip()]


class User(BaseModel):
    """A person (or an agency's system) acting for one organisation."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=_ID)
    name: str = Field(min_length=1, max_length=200)
    org: str = Field(pattern=_ID)
    roles: list[Role] = Field(min_length=1)
    disabled: bool = False


class TokenRecord(BaseModel):
    """What the server keeps about a token: whose it is, never the token."""

    id: str
    user: str
    label: str = ""
    created: float = 0.0


def _s(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


class IdentityStore:
    """Organisations, users and hashed tokens in Redis (see the module docstring)."""

    def __init__(self, redis: aioredis.Redis, secret: bytes) -> None:
        self.redis = redis
        self.secret = secret

    def token_hash(self, token: str) -> str:
        """HMAC-SHA256 of a token under the server secret (hex)."""
        return hmac.new(self.secret, token.encode(), hashlib.sha256).hexdigest()

    # -- organisations and users ---------------------------------------------------------
    async def put_org(self, org: Organisation) -> None:
        """Create or replace an organisation."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(f"{PREFIX}org:{org.id}", org.model_dump_json())
            pipe.sadd(f"{PREFIX}orgs", org.id)
            await pipe.execute()

    async def get_org(self, org_id: str) -> Organisation | None:
        """An organisation by id, or None."""
        raw = await self.redis.get(f"{PREFIX}org:{org_id}")
        return Organisation.model_validate_json(raw) if raw else None

    async def orgs(self) -> list[Organisation]:
        """Every organisation, by id."""
        ids = sorted(_s(i) for i in await self.redis.smembers(f"{PREFIX}orgs"))
        found = [await self.get_org(i) for i in ids]
        return [o for o in found if o is not None]

    async def put_user(self, user: User) -> None:
        """Create or replace a user (the organisation must exist)."""
        if await self.get_org(user.org) is None:
            raise KeyError(f"organisation {user.org!r} does not exist")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(f"{PREFIX}user:{user.id}", user.model_dump_json())
            pipe.sadd(f"{PREFIX}users", user.id)
            await pipe.execute()

    async def get_user(self, user_id: str) -> User | None:
        """A user by id, or None."""
        raw = await self.redis.get(f"{PREFIX}user:{user_id}")
        return User.model_validate_json(raw) if raw else None

    async def users(self, org: str | None = None) -> list[User]:
        """Every user (of one organisation if given), by id."""
        ids = sorted(_s(i) for i in await self.redis.smembers(f"{PREFIX}users"))
        found = [await self.get_user(i) for i in ids]
        return [u for u in found if u is not None and (org is None or u.org == org)]

    # -- tokens ---------------------------------------------------------------------------
    async def create_token(self, user_id: str, label: str = "") -> tuple[TokenRecord, str]:
        """Mint a token for a user; return its record and the token (shown once)."""
        if await self.get_user(user_id) is None:
            raise KeyError(f"user {user_id!r} does not exist")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        record = TokenRecord(id=secrets.token_hex(8), user=user_id, label=label,
                             created=time.time())
        await self._store_token(record, self.token_hash(token))
        return record, token

    async def adopt_token(self, user_id: str, token: str, label: str = "") -> TokenRecord:
        """Register an operator-chosen token (the bootstrap admin's, from settings)."""
        digest = self.token_hash(token)
        existing = await self.redis.get(f"{PREFIX}token:{digest}")
        if existing:
            return TokenRecord.model_validate_json(existing)
        record = TokenRecord(id=secrets.token_hex(8), user=user_id, label=label,
                             created=time.time())
        await self._store_token(record, digest)
        return record

    async def _store_token(self, record: TokenRecord, digest: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(f"{PREFIX}token:{digest}", record.model_dump_json())
            pipe.set(f"{PREFIX}token-id:{record.id}", digest)
            pipe.sadd(f"{PREFIX}user-tokens:{record.user}", record.id)
            await pipe.execute()

    async def resolve_token(self, token: str) -> tuple[User, TokenRecord] | None:
        """The enabled user a token belongs to, or None."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        raw = await self.redis.get(f"{PREFIX}token:{self.token_hash(token)}")
        if not raw:
            return None
        record = TokenRecord.model_validate_json(raw)
        user = await self.get_user(record.user)
        if user is None or user.disabled:
            return None
        return user, record

    async def revoke_token(self, token_id: str) -> bool:
        """Delete a token by id; False if there was none."""
        if not re.fullmatch(r"[0-9a-f]{16}", token_id):
            return False
        digest = _s(await self.redis.get(f"{PREFIX}token-id:{token_id}"))
        if not digest:
            return False
        raw = await self.redis.get(f"{PREFIX}token:{digest}")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(f"{PREFIX}token:{digest}", f"{PREFIX}token-id:{token_id}")
            if raw:
                user = TokenRecord.model_validate_json(raw).user
                pipe.srem(f"{PREFIX}user-tokens:{user}", token_id)
            await pipe.execute()
        return True

    async def tokens_of(self, user_id: str) -> list[str]:
        """Token ids of a user."""
        return sorted(_s(t) for t in await self.redis.smembers(f"{PREFIX}user-tokens:{user_id}"))


async def ensure_bootstrap_admin(store: IdentityStore, token: str) -> None:
    """An ``operator`` organisation (no jurisdiction) with an ``admin`` user owning ``token``.

    Idempotent; used at API start-up when ``api_bootstrap_admin_token`` is set, so a fresh
    deployment has someone who can create the real organisations and users.
    """
    if await store.get_org("operator") is None:
        await store.put_org(Organisation(id="operator", name="Tocsin operator",
                                         sender="operator@tocsin.invalid"))
    if await store.get_user("admin") is None:
        await store.put_user(User(id="admin", name="Administrator", org="operator",
                                  roles=["admin"]))
    await store.adopt_token("admin", token, label="bootstrap")


async def seed_demo(store: IdentityStore) -> dict[str, str]:
    """The demo organisation over the demo counties, with one user per role.

    Returns ``{"originator": token, "approver": token, "auditor": token, "admin": token,
    "agency": token}``: fresh tokens on every call (tokens are only ever shown once);
    the organisation and users are created once. Used by ``tocsin dev`` and the tests.
    """
    org = Organisation(
        id="demo-county",
        name="Demo County Office of Emergency Management",
        sender="oem@demo-county.tocsin.invalid",
        jurisdiction=Jurisdiction(codes=[f"FIPS:{c}" for c in DEMO_COUNTIES]),
        event_codes=list(DEMO_EVENT_CODES),
    )
    await store.put_org(org)
    people = {
        "originator": User(id="demo-originator", name="Demo Originator", org=org.id,
                           roles=["originator"]),
        "approver": User(id="demo-approver", name="Demo Approver", org=org.id,
                         roles=["approver"]),
        "auditor": User(id="demo-auditor", name="Demo Auditor", org=org.id, roles=["auditor"]),
        "admin": User(id="demo-admin", name="Demo Administrator", org=org.id, roles=["admin"]),
        "agency": User(id="demo-agency", name="Demo Agency Feed", org=org.id, roles=["agency"]),
    }
    tokens = {}
    for role, user in people.items():
        if await store.get_user(user.id) is None:
            await store.put_user(user)
        _, tokens[role] = await store.create_token(user.id, label="demo")
    return tokens
