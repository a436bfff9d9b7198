"""Citizens: their preferences in Redis, their addresses in the vault, their places on Kafka.

A citizen is one record ``tocsin:citizen:<id>`` (preferences, named places, zones, which
channels have a confirmed address) and becomes one ``Subscription`` per place or zone on
the compacted ``subscriptions`` topic, with id ``<citizen id>:<place slug>`` (or
``<citizen id>:zone-<scheme>-<value>``). Addresses live only in the contact vault: the
master copy under the citizen id, and a copy under each subscription id because the
sender resolves addresses by subscriber id.

Known consequence (the sender is not ours to change here): a citizen with two places
inside one alert area is matched twice and, today, warned twice on each channel. The
fix proposed for ``channels/`` is to key the sender's idempotency claim by citizen
(``subscriber_id.split(":", 1)[0]``) instead of by subscription; the preview reports
both counts (``subscriptions`` and distinct ``citizens``).

Other keys: ``tocsin:citizen-token:<hmac>`` (the citizen's own API token, hashed),
``tocsin:citizen-phone:<hmac of number>`` (citizens using a number, for SMS STOP; the
number itself is not in the key). :meth:`CitizenStore.erase` removes all of it,
tombstones every subscription, and strips the citizen from the pipeline's
``tocsin:warned:*`` hashes and ``tocsin:idem:*`` keys.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from typing import Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, Field

from channels.contacts import Contact, ContactStore
from ops.api.otp import OtpService
from streams.records import CHANNELS, Channel, Subscription
from streams.state import OUTCOME, WARNED

CITIZEN = "tocsin:citizen:"
CITIZEN_TOKEN = "tocsin:citizen-token:"
CITIZEN_PHONE = "tocsin:citizen-phone:"
CITIZEN_TOKEN_PREFIX = "tocsin_cit_"
IDEM = "tocsin:idem:"
QUIET = r"^([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d$"


class Place(BaseModel):
    """A named place: a point and a radius around it."""

    name: str = Field(min_length=1, max_length=40)
    lon: float = Field(ge=-180, le=180)
    lat: float = Field(ge=-90, le=90)
    radius_m: float = Field(default=0.0, ge=0, le=50_000)


class Preferences(BaseModel):
    """What a citizen wants to receive, and how."""

    language: str = Field(default="en", pattern=r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
    channels: list[Channel] = Field(default_factory=lambda: list(CHANNELS))
    min_severity: Literal["Unknown", "Minor", "Moderate", "Severe", "Extreme"] = "Unknown"
    quiet_hours: str = Field(default="", description="HH:MM-HH:MM in timezone ('' = none)")
    timezone: str = "UTC"
    accept_tests: bool = False


class CitizenRecord(BaseModel):
    """A citizen as stored (no address: those are in the vault)."""

    id: str
    created: float
    source: Literal["api", "sms"] = "api"
    prefs: Preferences = Field(default_factory=Preferences)
    places: dict[str, Place] = Field(default_factory=dict)
    zones: list[str] = Field(default_factory=list)
    verified: list[Channel] = Field(default_factory=list)
    paused: bool = False
    token_hash: str = ""
    phone_hash: str = ""


def slug(name: str) -> str:
    """A place name as an id part: ``Home`` -> ``home``, ``Mum's flat`` -> ``mum-s-flat``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:32] or "place"


def zone_sub_id(citizen_id: str, code: str) -> str:
    """Subscription id of a zone: ``<citizen>:zone-same-006037``."""
    return f"{citizen_id}:zone-{slug(code.replace(':', '-'))}"


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class CitizenStore:
    """Citizen records, tokens and subscriptions (see the module docstring)."""

    def __init__(self, redis: aioredis.Redis, secret: bytes, contacts: ContactStore,
                 otp: OtpService) -> None:
        self.redis = redis
        self.secret = secret
        self.contacts = contacts
        self.otp = otp

    def _hmac(self, value: str) -> str:
        return hmac.new(self.secret, value.encode(), hashlib.sha256).hexdigest()

    def phone_key(self, phone: str) -> str:
        """The phone index key for a number (an HMAC, never the number)."""
        return CITIZEN_PHONE + self._hmac("phone|" + phone)

    def sms_citizen_id(self, phone: str) -> str:
        """The stable id of the citizen a phone number creates by texting JOIN."""
        return "sms" + self._hmac("sms-citizen|" + phone)[:20]

    async def create(self, prefs: Preferences, *, citizen_id: str = "",
                     source: Literal["api", "sms"] = "api") -> tuple[CitizenRecord, str]:
        """A new citizen and their token (shown once)."""
        token = CITIZEN_TOKEN_PREFIX + secrets.token_urlsafe(32)
        rec = CitizenRecord(id=citizen_id or "c" + secrets.token_hex(10), created=time.time(),
                            source=source, prefs=prefs, token_hash=self._hmac(token))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(CITIZEN + rec.id, rec.model_dump_json())
            pipe.set(CITIZEN_TOKEN + rec.token_hash, rec.id)
            await pipe.execute()
        return rec, token

    async def get(self, citizen_id: str) -> CitizenRecord | None:
        """A citizen by id, or None."""
        raw = await self.redis.get(CITIZEN + citizen_id)
        return CitizenRecord.model_validate_json(raw) if raw else None

    async def by_token(self, token: str) -> CitizenRecord | None:
        """The citizen owning a token, or None."""
        if not token.startswith(CITIZEN_TOKEN_PREFIX) or len(token) > 200:
            return None
        cid = await self.redis.get(CITIZEN_TOKEN + self._hmac(token))
        return await self.get(_s(cid)) if cid else None

    async def by_phone(self, phone: str) -> list[str]:
        """Ids of citizens using a phone number."""
        return sorted(_s(c) for c in await self.redis.smembers(self.phone_key(phone)))

    async def save(self, rec: CitizenRecord) -> None:
        """Store a changed record (addresses and subscriptions are synced separately)."""
        await self.redis.set(CITIZEN + rec.id, rec.model_dump_json())

    def subscriptions(self, rec: CitizenRecord) -> list[Subscription]:
        """The subscriptions a citizen's record stands for right now."""
        channels = [c for c in rec.prefs.channels if c in rec.verified]
        if rec.paused or not channels:
            return []
        common = dict(channels=channels, language=rec.prefs.language,
                      min_severity=rec.prefs.min_severity, accept_tests=rec.prefs.accept_tests,
                      quiet_hours=rec.prefs.quiet_hours, timezone=rec.prefs.timezone)
        subs = [Subscription(id=f"{rec.id}:{key}", kind="place", lon=p.lon, lat=p.lat,
                             radius_m=p.radius_m, name=p.name,
                             **common)  # type: ignore[arg-type]
                for key, p in rec.places.items()]
        subs += [Subscription(id=zone_sub_id(rec.id, code), kind="zone", zone=code,
                              **common)  # type: ignore[arg-type]
                 for code in rec.zones]
        return subs

    async def set_address(self, rec: CitizenRecord, channel: Channel, address: str) -> None:
        """Record a confirmed address in the vault (and the phone index for SMS)."""
        contact = await self.contacts.get(rec.id) or Contact()
        if channel == "push":
            contact.push_token = address
        elif channel == "sms":
            if contact.phone and contact.phone != address:
                await self.redis.srem(self.phone_key(contact.phone), rec.id)
            contact.phone = address
            rec.phone_hash = self.phone_key(address)
            await self.redis.sadd(rec.phone_hash, rec.id)
        else:
            contact.email = address
        await self.contacts.put(rec.id, contact)
        if channel not in rec.verified:
            rec.verified.append(channel)

    async def sync_contacts(self, rec: CitizenRecord, subs: list[Subscription],
                            removed: list[str]) -> None:
        """Copy the master contact to every subscription id; drop removed ones."""
        master = await self.contacts.get(rec.id) or Contact()
        await self.contacts.put_many({s.id: master for s in subs})
        for sid in removed:
            await self.contacts.delete(sid)

    async def erase(self, citizen_id: str) -> dict[str, int]:
        """Delete everything Redis holds about a citizen; return what was removed.

        The caller tombstones the subscriptions on Kafka (it owns the producer).
        """
        rec = await self.get(citizen_id)
        removed: dict[str, int] = {"keys": 0, "warned": 0, "idempotency": 0}
        keys = [CITIZEN + citizen_id, f"{self.contacts.prefix}{citizen_id}"]
        if rec is not None:
            keys.append(CITIZEN_TOKEN + rec.token_hash)
            if rec.phone_hash:
                await self.redis.srem(rec.phone_hash, citizen_id)
        # Every vault copy under a subscription id (current and any left over).
        async for key in self.redis.scan_iter(match=f"{self.contacts.prefix}{citizen_id}:*",
                                              count=1000):
            keys.append(_s(key))
        removed["keys"] = int(await self.redis.delete(*keys))
        await self.otp.forget(citizen_id)
        # Who-was-warned hashes (kept for Cancel notices) and per-recipient outcome
        # hashes (the counters' once-per-recipient record) name subscription ids.
        for prefix in (WARNED, OUTCOME):
            async for key in self.redis.scan_iter(match=f"{prefix}*", count=1000):
                fields = [
                    f async for f, _ in self.redis.hscan_iter(key, match=f"{citizen_id}:*")
                ]
                if fields:
                    removed["warned"] += int(await self.redis.hdel(key, *fields))
        # Per-subscription idempotency keys, and per-citizen ones should the sender adopt
        # them (see the module docstring).
        for pattern in (f"{IDEM}*:{citizen_id}:*", f"{IDEM}*:{citizen_id}"):
            async for key in self.redis.scan_iter(match=pattern, count=1000):
                removed["idempotency"] += int(await self.redis.delete(key))
        return removed
