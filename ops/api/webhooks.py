"""SMS provider webhooks (Twilio shape): keyword opt-in/opt-out and delivery reports.

Inbound messages (form fields ``From``, ``Body``) understand:

- ``JOIN <zone code>``: subscribe the sending number to a county zone (``006037`` or
  ``SAME:006037`` SAME codes, ``FIPS:06037``, county UGC ``CAC037``). Five digits are
  read as a ZIP code, which is not supported yet: the reply says what to send instead.
  The number counts as confirmed: the provider vouches that the message came from it.
- ``STOP`` (and the carrier synonyms STOPALL, UNSUBSCRIBE, CANCEL, END, QUIT): a citizen
  who only ever used SMS is erased; one registered through the API loses the number and
  the SMS channel but keeps their other channels.
- ``HELP`` / ``INFO`` and anything else: what you can send.

The reply is TwiML. When ``sms_auth_token`` is configured every webhook must carry a
valid ``X-Twilio-Signature`` (computed over ``api_public_url`` + path when set), else 403.

Delivery status callbacks are parsed with ``channels.sms.parse_status_callback`` and
counted per alert in ``tocsin:api:callbacks:<alert key>`` (``sms:delivered``...), kept
apart from the pipeline's counters. The alert comes from the callback URL's ``alert``
query parameter, or from ``tocsin:sms-sid:<MessageSid>`` when a sender records it;
reports we cannot attribute are counted under ``unattributed``. The URL's ``k``
parameter names the message (an opaque token, see ``channels.sms``): any status for it
proves the provider accepted it, which is recorded (``channels.idempotency.
record_provider_ack``) so that a worker taking over after a crash does not text the
citizen a second time.

Status callbacks come at two or three per SMS sent -- hundreds per second during a
large alert, all from the provider's few addresses -- so when signatures are verified
they bypass the per-IP webhook limit (a forged flood is refused by the signature
check); unsigned, they share the inbound limit.
"""

from __future__ import annotations

import re
from xml.sax.saxutils import escape

from fastapi import APIRouter, Depends, HTTPException, Request, Response

from channels.idempotency import ACK_PREFIX
from channels.sms import parse_status_callback, validate_signature
from ops.api.citizen_store import Preferences
from ops.api.citizens import erase, publish, zone_code
from ops.api.context import ApiContext
from ops.api.progress import CALLBACKS
from ops.api.ratelimit import limit_ip

router = APIRouter(prefix="/webhooks/sms", tags=["webhooks"])
_limit_ip = limit_ip("webhook", lambda c: c.settings.api_rate_webhook_per_min)
STOP_WORDS = {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"}
HELP = ("Tocsin emergency alerts. Text JOIN followed by your county's 6-digit SAME code "
        "(e.g. JOIN 006037) to get alerts for it. Text STOP to end and erase your number.")
SID = "tocsin:sms-sid:"
_TOKEN = re.compile(r"[0-9a-f]{32}")


async def _limit_unsigned(request: Request) -> None:
    """The per-IP webhook limit, unless signatures are verified (see module doc)."""
    ctx: ApiContext = request.app.state.ctx
    if not ctx.settings.sms_auth_token:
        await _limit_ip(request)


def twiml(text: str) -> Response:
    """A TwiML reply with one message."""
    body = (f'<?xml version="1.0" encoding="UTF-8"?><Response><Message>{escape(text)}'
            "</Message></Response>")
    return Response(body, media_type="application/xml")


async def _form(request: Request, ctx: ApiContext) -> dict[str, str]:
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    token = ctx.settings.sms_auth_token
    if token:
        base = ctx.settings.api_public_url.rstrip("/")
        url = f"{base}{request.url.path}" if base else str(request.url)
        if request.url.query and base:
            url += f"?{request.url.query}"
        signature = request.headers.get("x-twilio-signature", "")
        if not validate_signature(url, form, signature, token):
            raise HTTPException(403, "invalid or missing X-Twilio-Signature")
    return form


def _code(word: str) -> str:
    """The zone code a JOIN names, '' for a ZIP code."""
    if re.fullmatch(r"\d{5}(-\d{4})?", word):
        return ""
    if re.fullmatch(r"[A-Z]{2}C\d{3}", word):
        return f"UGC:{word}"
    return word


@router.post("/inbound", response_class=Response, dependencies=[Depends(_limit_ip)],
             responses={200: {"content": {"application/xml": {}}}})
async def inbound(request: Request) -> Response:
    """Keyword opt-in (JOIN), opt-out (STOP) and HELP from the SMS provider."""
    ctx: ApiContext = request.app.state.ctx
    form = await _form(request, ctx)
    phone = form.get("From", "").strip()
    if not re.fullmatch(r"\+[1-9]\d{6,14}", phone):
        raise HTTPException(422, "From must be an E.164 phone number")
    await ctx.limiter.check("phone", phone, ctx.settings.api_rate_citizen_per_min)
    words = form.get("Body", "").strip().upper().split()
    keyword = words[0] if words else ""
    if keyword in STOP_WORDS:
        return twiml(await _stop(ctx, phone))
    if keyword in ("JOIN", "START", "SUBSCRIBE") and len(words) >= 2:
        code = _code(words[1])
        if not code:
            return twiml("Tocsin: ZIP codes are not supported yet. " + HELP)
        try:
            zone = zone_code(ctx, code)
        except HTTPException:
            return twiml(f"Tocsin: unknown zone {words[1]}. " + HELP)
        cid = ctx.citizens.sms_citizen_id(phone)
        rec = await ctx.citizens.get(cid)
        if rec is None:
            rec, _ = await ctx.citizens.create(Preferences(channels=["sms"]), citizen_id=cid,
                                               source="sms")
        previous = {s.id for s in ctx.citizens.subscriptions(rec)}
        await ctx.citizens.set_address(rec, "sms", phone)
        if zone not in rec.zones:
            rec.zones.append(zone)
        rec.paused = False
        await publish(ctx, rec, previous)
        return twiml(f"Tocsin: you will get emergency alerts for {zone}. Reply STOP to end, "
                     "HELP for help.")
    return twiml(HELP)


async def _stop(ctx: ApiContext, phone: str) -> str:
    """Opt a number out everywhere (see the module docstring)."""
    cids = set(await ctx.citizens.by_phone(phone)) | {ctx.citizens.sms_citizen_id(phone)}
    for cid in sorted(cids):
        rec = await ctx.citizens.get(cid)
        if rec is None:
            continue
        if rec.source == "sms" or rec.verified == ["sms"]:
            await erase(ctx, rec)
            continue
        previous = {s.id for s in ctx.citizens.subscriptions(rec)}
        contact = await ctx.contacts.get(rec.id)
        if contact is not None:
            contact.phone = ""
            await ctx.contacts.put(rec.id, contact)
        await ctx.redis.srem(ctx.citizens.phone_key(phone), rec.id)
        rec.verified = [c for c in rec.verified if c != "sms"]
        rec.phone_hash = ""
        await publish(ctx, rec, previous)
    return ("Tocsin: you are unsubscribed and your number was erased. No more messages "
            "will be sent. Text JOIN <zone code> to subscribe again.")


@router.post("/status", status_code=204, response_class=Response,
             dependencies=[Depends(_limit_unsigned)])
async def status_callback(request: Request) -> Response:
    """SMS delivery report: counted per alert as ``sms:<status>``; the message it
    names (``k``) is recorded as accepted by the provider."""
    ctx: ApiContext = request.app.state.ctx
    form = await _form(request, ctx)
    try:
        sid, status, _error = parse_status_callback(form)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc
    alert = request.query_params.get("alert", "")
    if not re.fullmatch(r"[0-9a-f]{1,40}", alert):
        raw = await ctx.redis.get(SID + sid[:64])
        alert = raw.decode() if isinstance(raw, bytes) else (raw or "")
    token = request.query_params.get("k", "")
    async with ctx.redis.pipeline(transaction=False) as pipe:
        pipe.hincrby(CALLBACKS + (alert or "unattributed"), f"sms:{status}", 1)
        if _TOKEN.fullmatch(token):
            pipe.set(ACK_PREFIX + token, sid[:64], ex=ctx.settings.idempotency_ttl_s)
        await pipe.execute()
    return Response(status_code=204)
