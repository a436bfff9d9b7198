"""The contact vault: the only place (besides the sender, in memory) contact details live.

Kafka records carry subscriber ids only; the sender resolves addresses here at send
time, so erasing a citizen is one ``DEL`` and no topic ever holds a phone number.

Layout: one Redis hash per subscriber, ``<prefix><subscriber_id>``, with the fields
``push_token``, ``phone`` and ``email`` (absent when empty). Nothing in this module
logs an address or puts one in an exception message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import msgspec
import redis.asyncio as aioredis

from streams.records import Channel

__all__ = ["CHANNEL_FIELD", "Contact", "ContactStore"]

#: Which hash field holds the address for each channel.
CHANNEL_FIELD: dict[str, str] = {"push": "push_token", "sms": "phone", "email": "email"}

# One round trip for a whole batch: HGET every hash in a server-side loop. A nil
# reply would end a Lua array early, so a missing address comes back as "".
_GET_FIELD = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('HGET', key, ARGV[1]) or ''
end
return out
"""

# Prune an address only if it is still the one that failed: a citizen who re-registered
# a fresh push token between the send and the prune must keep the new one.
_COMPARE_AND_HDEL = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and (ARGV[2] == '' or cur == ARGV[2]) then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""

# Lookups are split so one script never holds Redis for long on a huge batch; the
# chunks still go out concurrently, i.e. in about one round trip.
_CHUNK = 1000


class Contact(msgspec.Struct):
    """A subscriber's addresses; an empty string means "no address on that channel"."""

    push_token: str = ""
    phone: str = ""
    email: str = ""


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


class ContactStore:
    """Async access to the contact vault on a ``redis.asyncio.Redis`` client.

    Works with clients created with or without ``decode_responses``.
    """

    def __init__(self, redis: aioredis.Redis, prefix: str = "tocsin:contact:") -> None:
        self.redis = redis
        self.prefix = prefix
        self._get_field = redis.register_script(_GET_FIELD)
        self._cmp_hdel = redis.register_script(_COMPARE_AND_HDEL)

    def _key(self, subscriber_id: str) -> str:
        return f"{self.prefix}{subscriber_id}"

    @staticmethod
    def _mapping(contact: Contact) -> dict[str, str]:
        return {f: v for f in ("push_token", "phone", "email") if (v := getattr(contact, f))}

    async def put(self, subscriber_id: str, contact: Contact) -> None:
        """Replace a subscriber's contact details (fields left empty are removed)."""
        await self.put_many({subscriber_id: contact})

    async def put_many(self, contacts: Mapping[str, Contact]) -> None:
        """Replace many subscribers' contact details in one pipelined transaction.

        Each subscriber's hash is deleted then re-written so a field the citizen
        cleared does not linger.
        """
        if not contacts:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            for sid, contact in contacts.items():
                key = self._key(sid)
                pipe.delete(key)
                mapping = self._mapping(contact)
                if mapping:
                    pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]  # stub key variance
            await pipe.execute()

    async def get(self, subscriber_id: str) -> Contact | None:
        """A subscriber's contact, or ``None`` when none is stored."""
        raw = await self.redis.hgetall(self._key(subscriber_id))
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        return Contact(
            push_token=fields.get("push_token", ""),
            phone=fields.get("phone", ""),
            email=fields.get("email", ""),
        )

    async def get_addresses(
        self, subscriber_ids: Sequence[str], channel: Channel
    ) -> dict[str, str]:
        """Addresses on ``channel`` for the given subscribers, in one round trip.

        Subscribers with no address on that channel are absent from the result.
        """
        field = CHANNEL_FIELD[channel]
        ids = list(dict.fromkeys(subscriber_ids))  # de-duplicate, keep order
        if not ids:
            return {}
        chunks = [ids[i : i + _CHUNK] for i in range(0, len(ids), _CHUNK)]
        replies = await asyncio.gather(
            *(self._get_field(keys=[self._key(s) for s in chunk], args=[field]) for chunk in chunks)
        )
        out: dict[str, str] = {}
        for chunk, values in zip(chunks, replies, strict=True):
            for sid, value in zip(chunk, values, strict=True):
                address = _text(value)
                if address:
                    out[sid] = address
        return out

    async def delete(self, subscriber_id: str) -> None:
        """Erase every contact detail of a subscriber (right to erasure)."""
        await self.redis.delete(self._key(subscriber_id))

    async def invalidate(
        self, subscriber_id: str, channel: Channel, expected: str | None = None
    ) -> bool:
        """Remove a subscriber's address on one channel (e.g. an UNREGISTERED token).

        With ``expected``, the address is removed only if it still equals it, so a
        token refreshed meanwhile survives. Returns whether anything was removed.
        """
        removed = await self._cmp_hdel(
            keys=[self._key(subscriber_id)], args=[CHANNEL_FIELD[channel], expected or ""]
        )
        return bool(removed)
