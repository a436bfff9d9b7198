"""One-time codes that confirm a citizen's phone number or email address.

A code is six random digits, kept only as ``HMAC-SHA256(secret, citizen|channel|address|
code)`` in ``tocsin:otp:<citizen>:<channel>`` (with an attempt counter) for
``api_otp_ttl_s``; the address waiting for confirmation sits in its own short-lived
contact-vault entry ``tocsin:contact-pending:<citizen>:<channel>``. A code confirms only
the address it was sent to, and after ``api_otp_max_attempts`` wrong tries it is gone.

Delivery goes through the :class:`OtpNotifier` hook. The default,
:class:`ProviderOtpNotifier`, hands the code to the channel's first configured provider
(SMS gateway, SMTP, or the outbox in the dev stack and tests), bypassing Kafka on
purpose: a code goes to an address that is not a subscriber yet, and the pipeline's
records never carry addresses. Tests read the code from the outbox it was sent to.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Protocol

import redis.asyncio as aioredis
from fastapi import HTTPException

from channels.base import OutgoingMessage, Provider
from channels.contacts import Contact, ContactStore
from channels.registry import build_providers
from ops.settings import Settings
from streams.records import Channel

OTP = "tocsin:otp:"
PENDING_PREFIX = "tocsin:contact-pending:"


class OtpNotifier(Protocol):
    """Delivers a verification code to an address."""

    async def send(self, *, citizen_id: str, channel: Channel, address: str, code: str,
                   language: str) -> None:
        """Deliver ``code``; raise on failure."""
        ...

    async def aclose(self) -> None:
        """Release resources."""
        ...


class ProviderOtpNotifier:
    """Sends codes through the channel's first configured provider."""

    def __init__(self, settings: Settings, redis: aioredis.Redis | None = None) -> None:
        self.settings = settings
        self.redis = redis
        self._providers: dict[str, Provider] = {}

    async def send(self, *, citizen_id: str, channel: Channel, address: str, code: str,
                   language: str) -> None:
        """Hand one message with the code to the provider; raise if it was not accepted."""
        if channel not in self._providers:
            self._providers[channel] = build_providers(self.settings, channel, self.redis)[0]
        minutes = max(1, self.settings.api_otp_ttl_s // 60)
        body = (f"Your Tocsin verification code is {code}. It expires in {minutes} minutes. "
                "If you did not ask for it, ignore this message.")
        message = OutgoingMessage(subscriber_id=f"otp:{citizen_id}", address=address,
                                  channel=channel, alert_key="otp", language=language,
                                  subject="Tocsin verification code", body=body,
                                  ttl_s=self.settings.api_otp_ttl_s)
        results = await self._providers[channel].send_batch([message])
        if not results or not results[0].ok:
            raise RuntimeError("the provider did not accept the verification message")

    async def aclose(self) -> None:
        """Close every provider opened."""
        for provider in self._providers.values():
            await provider.aclose()


class OtpService:
    """Issues and checks one-time codes (see the module docstring)."""

    def __init__(self, redis: aioredis.Redis, secret: bytes, notifier: OtpNotifier, *,
                 ttl_s: int, max_attempts: int) -> None:
        self.redis = redis
        self.secret = secret
        self.notifier = notifier
        self.ttl_s = ttl_s
        self.max_attempts = max_attempts
        self.pending = ContactStore(redis, prefix=PENDING_PREFIX)

    def _digest(self, citizen_id: str, channel: str, address: str, code: str) -> str:
        msg = f"{citizen_id}|{channel}|{address}|{code}".encode()
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()

    async def start(self, citizen_id: str, channel: Channel, address: str,
                    language: str) -> None:
        """Send a fresh code for ``address`` (replacing any earlier one)."""
        code = f"{secrets.randbelow(10**6):06d}"
        key = f"{OTP}{citizen_id}:{channel}"
        pending_id = f"{citizen_id}:{channel}"
        field = {"sms": "phone", "email": "email"}[channel]
        await self.pending.put(pending_id, Contact(**{field: address}))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping={"h": self._digest(citizen_id, channel, address, code),
                                    "tries": 0})
            pipe.expire(key, self.ttl_s)
            pipe.expire(PENDING_PREFIX + pending_id, self.ttl_s)
            await pipe.execute()
        try:
            await self.notifier.send(citizen_id=citizen_id, channel=channel, address=address,
                                     code=code, language=language)
        except Exception as exc:
            await self.redis.delete(key, PENDING_PREFIX + pending_id)
            raise HTTPException(502, f"the verification code could not be sent by {channel}; "
                                     "check the address and try again") from exc

    async def confirm(self, citizen_id: str, channel: Channel, code: str) -> str:
        """The confirmed address, or 4xx (no code pending, wrong code, too many tries)."""
        key = f"{OTP}{citizen_id}:{channel}"
        pending_id = f"{citizen_id}:{channel}"
        stored = await self.redis.hgetall(key)
        contact = await self.pending.get(pending_id)
        if not stored or contact is None:
            raise HTTPException(410, f"no {channel} verification is pending (codes expire after "
                                     f"{self.ttl_s // 60} minutes); request a new code")
        address = contact.phone if channel == "sms" else contact.email
        raw = stored.get(b"h") or b""
        expected = raw if isinstance(raw, bytes) else str(raw).encode()
        got = self._digest(citizen_id, channel, address, code.strip()).encode()
        if hmac.compare_digest(expected, got):
            await self.redis.delete(key, PENDING_PREFIX + pending_id)
            return address
        tries = await self.redis.hincrby(key, "tries", 1)
        if tries >= self.max_attempts:
            await self.redis.delete(key, PENDING_PREFIX + pending_id)
            raise HTTPException(429, "too many wrong codes; request a new code")
        raise HTTPException(400, f"wrong code ({self.max_attempts - tries} attempts left)")

    async def forget(self, citizen_id: str) -> None:
        """Drop every pending code and address of a citizen (erasure)."""
        keys = [f"{OTP}{citizen_id}:{c}" for c in ("sms", "email")]
        keys += [f"{PENDING_PREFIX}{citizen_id}:{c}" for c in ("sms", "email")]
        await self.redis.delete(*keys)
