"""Abuse limits: per-token and per-IP request rate limits shared by every API process.

Each (scope, caller) pair has a token bucket in Redis (the same atomic Lua bucket the
providers use, ``channels.ratelimit``): ``per_min`` requests may come at once and the
bucket refills at ``per_min / 60`` per second, so a well-behaved client never notices
and a flood is cut to the configured rate across all API replicas. Callers are keyed by
an HMAC of the IP address, token id or phone number, so none is stored in the clear. A refusal
is ``429`` with ``Retry-After`` (whole seconds, rounded up) and a message naming the
limit.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from fastapi import HTTPException, Request

from channels.ratelimit import RateLimiter
from ops.api.auth import client_ip

if TYPE_CHECKING:
    from ops.api.context import ApiContext

KEY_PREFIX = "tocsin:api:rl:"

_WHO = {"ip": "this IP address", "token": "this token", "citizen": "this citizen",
        "phone": "this phone number", "address": "this address"}


class ApiRateLimiter:
    """Token buckets per (scope, caller) in Redis."""

    def __init__(self, redis: aioredis.Redis, secret: bytes) -> None:
        self.redis = redis
        self.secret = secret

    def bucket(self, scope: str, ident: str) -> str:
        """The bucket name of a caller: keyed by an HMAC, since phone numbers and IP
        addresses are too few for a plain hash to hide them."""
        return f"{scope}:{hmac.new(self.secret, ident.encode(), hashlib.sha256).hexdigest()[:24]}"

    async def check(self, scope: str, ident: str, per_min: int, *, kind: str = "") -> None:
        """Take one request from the caller's bucket or raise 429 with Retry-After."""
        limiter = RateLimiter(self.redis, self.bucket(scope, ident), per_min / 60.0, per_min,
                              prefix=KEY_PREFIX)
        wait = await limiter.try_acquire()
        if wait:
            who = _WHO.get(kind or scope, f"this {scope}")
            retry = max(1, math.ceil(wait))
            raise HTTPException(
                429,
                f"rate limit exceeded for {who} ({per_min} requests per minute); "
                f"retry in {retry} s",
                headers={"Retry-After": str(retry)},
            )


def limit_ip(scope: str, per_min: Callable[[ApiContext], int]
             ) -> Callable[[Request], Awaitable[None]]:
    """A dependency limiting requests per client IP in ``scope`` (public, citizen...)."""

    async def dependency(request: Request) -> None:
        ctx: ApiContext = request.app.state.ctx
        ip = client_ip(request, ctx.settings.api_trust_forwarded_for)
        await ctx.limiter.check(f"{scope}-ip", ip, per_min(ctx), kind="ip")

    return dependency
