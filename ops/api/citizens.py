"""The citizen API: register, confirm addresses, places and zones, preferences, erase.

A citizen authenticates with the token returned at registration (hashed at rest like
the managers' tokens). Push tokens count as confirmed (the app registers them); a phone
number or email address is used only after the one-time code sent to it comes back
(``ops.api.otp``). Responses never echo a full address: a stolen citizen token must not
be a way to read someone's phone number. Every citizen route is rate limited per IP and
per citizen. Erasure tombstones every subscription on Kafka first, then deletes every
Redis key holding the citizen's data (``CitizenStore.erase``).
"""

from __future__ import annotations

import re
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from ops.api.auth import bearer
from ops.api.citizen_store import QUIET, CitizenRecord, Place, Preferences, slug, zone_sub_id
from ops.api.compose import normalise_code
from ops.api.context import ApiContext
from ops.api.ratelimit import KEY_PREFIX as RL_PREFIX
from ops.api.ratelimit import limit_ip
from streams.records import Channel

router = APIRouter(prefix="/citizens", tags=["citizens"],
                   dependencies=[Depends(limit_ip("citizen",
                                                  lambda c: c.settings.api_rate_citizen_per_min))])
PHONE = r"^\+[1-9]\d{6,14}$"
EMAIL = r"^[^@\s<>,;]{1,64}@[^@\s<>,;]+\.[^@\s<>,;]+$"
MAX_PLACES, MAX_ZONES = 10, 20
OTP_PER_MIN = 3  # verification codes per address per minute


def _check_prefs(prefs: Preferences) -> Preferences:
    if prefs.quiet_hours and not re.fullmatch(QUIET, prefs.quiet_hours):
        raise HTTPException(422, "quiet_hours must look like 22:00-07:00")
    try:
        ZoneInfo(prefs.timezone)
    except (ValueError, ZoneInfoNotFoundError) as exc:
        raise HTTPException(422, f"unknown timezone {prefs.timezone!r}") from exc
    return prefs


class _PlaceIn(Place):
    model_config = ConfigDict(extra="forbid")


class _PrefsIn(Preferences):
    model_config = ConfigDict(extra="forbid")  # a misspelt accept_tests must not pass silently


class ContactIn(BaseModel):
    """Addresses to (re)register; phone and email are confirmed by a one-time code."""

    model_config = ConfigDict(extra="forbid")

    push_token: str | None = Field(default=None, min_length=8, max_length=4096)
    phone: str | None = Field(default=None, pattern=PHONE, description="E.164: +15551234567")
    email: str | None = Field(default=None, max_length=254, pattern=EMAIL)


class RegisterIn(ContactIn):
    """A new citizen: preferences, places and zones, and addresses."""

    prefs: _PrefsIn = Field(default_factory=_PrefsIn)
    places: list[_PlaceIn] = Field(default_factory=list, max_length=MAX_PLACES)
    zones: list[str] = Field(default_factory=list, max_length=MAX_ZONES)


class PrefsPatch(BaseModel):
    """Preference changes (absent fields stay as they are)."""

    model_config = ConfigDict(extra="forbid")

    language: str | None = Field(default=None, pattern=r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
    channels: list[Channel] | None = None
    min_severity: Literal["Unknown", "Minor", "Moderate", "Severe", "Extreme"] | None = None
    quiet_hours: str | None = None
    timezone: str | None = None
    accept_tests: bool | None = None
    paused: bool | None = None


class PlaceIn(BaseModel):
    """A place's location (the name is in the path)."""

    model_config = ConfigDict(extra="forbid")

    lon: float = Field(ge=-180, le=180)
    lat: float = Field(ge=-90, le=90)
    radius_m: float = Field(default=0.0, ge=0, le=50_000)


class ZonesIn(BaseModel):
    """The full list of zone codes to follow."""

    model_config = ConfigDict(extra="forbid")

    zones: list[str] = Field(max_length=MAX_ZONES)


class VerifyIn(BaseModel):
    """A one-time code received on a channel."""

    model_config = ConfigDict(extra="forbid")

    channel: Literal["sms", "email"]
    code: str = Field(pattern=r"^\s*\d{6}\s*$")


class CitizenOut(BaseModel):
    """A citizen as they may see themselves (addresses masked)."""

    id: str
    prefs: Preferences
    places: dict[str, Place]
    zones: list[str]
    verified: list[str]
    active_channels: list[str]
    paused: bool
    contacts: dict[str, str]
    subscriptions: list[str]


class Registered(CitizenOut):
    """Registration result with the citizen's token (shown once)."""

    token: str
    pending_verification: list[str]


def _ctx(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


def _mask(value: str, channel: str) -> str:
    if not value:
        return ""
    if channel == "email":
        user, _, domain = value.partition("@")
        return f"{user[:1]}***@{domain}"
    if channel == "sms":
        return f"{value[:2]}******{value[-2:]}"
    return "registered"


async def view(ctx: ApiContext, rec: CitizenRecord) -> CitizenOut:
    """What a citizen sees of their own record."""
    contact = await ctx.contacts.get(rec.id)
    contacts = {}
    if contact is not None:
        for channel, value in (("push", contact.push_token), ("sms", contact.phone),
                               ("email", contact.email)):
            if value:
                contacts[channel] = _mask(value, channel)
    subs = ctx.citizens.subscriptions(rec)
    return CitizenOut(id=rec.id, prefs=rec.prefs, places=rec.places, zones=rec.zones,
                      verified=list(rec.verified), paused=rec.paused, contacts=contacts,
                      active_channels=subs[0].channels if subs else [],
                      subscriptions=[s.id for s in subs])


async def publish(ctx: ApiContext, rec: CitizenRecord, previous: set[str]) -> None:
    """Store the record, sync vault copies, then upsert/tombstone the subscriptions."""
    subs = ctx.citizens.subscriptions(rec)
    removed = sorted(previous - {s.id for s in subs})
    await ctx.citizens.save(rec)
    await ctx.citizens.sync_contacts(rec, subs, removed)  # before Kafka: the sender needs it
    await ctx.bus.subscriptions(subs, tombstones=removed)


async def erase(ctx: ApiContext, rec: CitizenRecord) -> dict[str, int]:
    """Tombstone every subscription the citizen ever had here, then erase Redis."""
    ids = {f"{rec.id}:{key}" for key in rec.places} | {zone_sub_id(rec.id, z) for z in rec.zones}
    await ctx.bus.subscriptions([], tombstones=sorted(ids))
    removed = await ctx.citizens.erase(rec.id)
    await ctx.redis.delete(RL_PREFIX + ctx.limiter.bucket("citizen", rec.id))
    removed["subscriptions"] = len(ids)
    return removed


def zone_code(ctx: ApiContext, code: str) -> str:
    """A validated, normalised zone code (``SAME:006037``), or 422."""
    scheme, value = normalise_code(code)
    if not scheme or ctx.gazetteer.lookup(scheme, value) is None:
        raise HTTPException(422, f"unknown zone code {code!r} (use e.g. SAME:006037 or "
                                 "FIPS:06037)")
    return f"{scheme}:{value}"


async def me(request: Request) -> CitizenRecord:
    """Dependency: the citizen owning the bearer token (401 otherwise), rate limited."""
    ctx = _ctx(request)
    rec = await ctx.citizens.by_token(bearer(request))
    if rec is None:
        raise HTTPException(401, "invalid or erased citizen token",
                            headers={"WWW-Authenticate": "Bearer"})
    await ctx.limiter.check("citizen", rec.id, ctx.settings.api_rate_citizen_per_min)
    return rec


async def _contacts(ctx: ApiContext, rec: CitizenRecord, body: ContactIn) -> list[str]:
    """Register a push token now; start code verification for phone/email."""
    pending = []
    if body.push_token:
        await ctx.citizens.set_address(rec, "push", body.push_token)
    for channel, address in (("sms", body.phone), ("email", body.email)):
        if address:
            # Codes go to addresses anyone can type in: cap them per address, so the API
            # cannot be used to flood someone's phone or mailbox.
            await ctx.limiter.check("otp", address, OTP_PER_MIN, kind="address")
            await ctx.otp.start(rec.id, channel, address, rec.prefs.language)  # type: ignore[arg-type]
            pending.append(channel)
    return pending


@router.post("", response_model=Registered, status_code=201)
async def register(body: RegisterIn, request: Request) -> Registered:
    """Register; returns the citizen token once. Phone/email wait for their code."""
    ctx = _ctx(request)
    _check_prefs(body.prefs)
    zones = list(dict.fromkeys(zone_code(ctx, z) for z in body.zones))
    rec, token = await ctx.citizens.create(body.prefs)
    for place in body.places:
        rec.places[slug(place.name)] = place
    rec.zones = zones
    pending = await _contacts(ctx, rec, body)
    await publish(ctx, rec, set())
    out = await view(ctx, rec)
    return Registered(**out.model_dump(), token=token, pending_verification=pending)


@router.get("/me", response_model=CitizenOut)
async def read(request: Request, rec: CitizenRecord = Depends(me)) -> CitizenOut:
    """Your record: preferences, places, zones, channels (addresses masked)."""
    return await view(_ctx(request), rec)


@router.patch("/me", response_model=CitizenOut)
async def change(body: PrefsPatch, request: Request,
                 rec: CitizenRecord = Depends(me)) -> CitizenOut:
    """Change preferences, or pause/resume (``paused``) without erasing anything."""
    ctx = _ctx(request)
    previous = {s.id for s in ctx.citizens.subscriptions(rec)}
    updates = body.model_dump(exclude_none=True)
    paused = updates.pop("paused", None)
    rec.prefs = _check_prefs(rec.prefs.model_copy(update=updates))
    if paused is not None:
        rec.paused = paused
    await publish(ctx, rec, previous)
    return await view(ctx, rec)


@router.put("/me/places/{name}", response_model=CitizenOut)
async def put_place(name: str, body: PlaceIn, request: Request,
                    rec: CitizenRecord = Depends(me)) -> CitizenOut:
    """Add or move a named place ("Home", "Work", ...)."""
    ctx = _ctx(request)
    previous = {s.id for s in ctx.citizens.subscriptions(rec)}
    key = slug(name)
    if key not in rec.places and len(rec.places) >= MAX_PLACES:
        raise HTTPException(422, f"at most {MAX_PLACES} places")
    rec.places[key] = Place(name=name[:40], **body.model_dump())
    await publish(ctx, rec, previous)
    return await view(ctx, rec)


@router.delete("/me/places/{name}", response_model=CitizenOut)
async def delete_place(name: str, request: Request,
                       rec: CitizenRecord = Depends(me)) -> CitizenOut:
    """Remove a place (its subscription is tombstoned)."""
    ctx = _ctx(request)
    previous = {s.id for s in ctx.citizens.subscriptions(rec)}
    if rec.places.pop(slug(name), None) is None:
        raise HTTPException(404, f"no place named {name!r}")
    await publish(ctx, rec, previous)
    return await view(ctx, rec)


@router.put("/me/zones", response_model=CitizenOut)
async def put_zones(body: ZonesIn, request: Request,
                    rec: CitizenRecord = Depends(me)) -> CitizenOut:
    """Replace the zones followed (county codes such as SAME:006037)."""
    ctx = _ctx(request)
    previous = {s.id for s in ctx.citizens.subscriptions(rec)}
    rec.zones = list(dict.fromkeys(zone_code(ctx, z) for z in body.zones))
    await publish(ctx, rec, previous)
    return await view(ctx, rec)


@router.put("/me/contact", response_model=CitizenOut)
async def put_contact(body: ContactIn, request: Request,
                      rec: CitizenRecord = Depends(me)) -> CitizenOut:
    """Register a push token, or start confirming a new phone number / email address."""
    ctx = _ctx(request)
    previous = {s.id for s in ctx.citizens.subscriptions(rec)}
    await _contacts(ctx, rec, body)
    await publish(ctx, rec, previous)
    return await view(ctx, rec)


@router.post("/me/verify", response_model=CitizenOut)
async def verify(body: VerifyIn, request: Request,
                 rec: CitizenRecord = Depends(me)) -> CitizenOut:
    """Confirm a phone number or email address with the code sent to it."""
    ctx = _ctx(request)
    previous = {s.id for s in ctx.citizens.subscriptions(rec)}
    address = await ctx.otp.confirm(rec.id, body.channel, body.code)
    await ctx.citizens.set_address(rec, body.channel, address)
    await publish(ctx, rec, previous)
    return await view(ctx, rec)


@router.post("/me/unsubscribe", response_model=CitizenOut)
async def unsubscribe(request: Request, rec: CitizenRecord = Depends(me)) -> CitizenOut:
    """Stop all alerts (subscriptions tombstoned) but keep the account; PATCH paused=false
    resumes. To remove everything, DELETE /citizens/me."""
    ctx = _ctx(request)
    previous = {s.id for s in ctx.citizens.subscriptions(rec)}
    rec.paused = True
    await publish(ctx, rec, previous)
    return await view(ctx, rec)


@router.delete("/me", status_code=204, response_class=Response)
async def erase_me(request: Request, rec: CitizenRecord = Depends(me)) -> Response:
    """Erase everything about you: subscriptions, addresses, places, tokens, history."""
    await erase(_ctx(request), rec)
    return Response(status_code=204)
