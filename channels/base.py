"""The provider contract every delivery channel implements.

A provider is one small object per external service (FCM, an SMS gateway, SMTP, the
embedded outbox), in the spirit of httpx's one-method transports or one apprise plugin
per service, but async and batched: the sender hands it a whole slice of a delivery
batch and gets one :class:`SendResult` per message back.

Failure model, which the sender's retry/failover logic relies on:

- a failure that concerns *one* recipient (bad token, carrier rejected a number) is a
  :class:`SendResult` with ``ok=False``; ``retriable`` says whether trying again later
  could help and ``invalid_address`` says the address itself is dead (prune it);
- a failure of the *whole* call (connection refused, provider down, auth failure) is a
  :class:`ProviderError`, whose ``retriable`` flag says whether the same provider is
  worth retrying before failing over to the next one.

Providers must never put contact addresses in ``SendResult.error`` or in exception
messages if they can help it; the sender scrubs them anyway before anything is logged
or written to a receipt.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from streams.records import Channel

__all__ = [
    "OutgoingMessage",
    "Provider",
    "ProviderError",
    "SendResult",
    "parse_retry_after",
]


# Whether a send may still go ahead, set by the caller around one batch's send: the paths
# that wait (rate-limit tokens) consult it between chunks, so an alert cancelled while
# its batch waits stops there. A message held back is a result with error WITHDRAWN.
SEND_GATE: ContextVar[Callable[[], Awaitable[bool]] | None] = ContextVar(
    "tocsin_send_gate", default=None
)
WITHDRAWN = "withdrawn before it was sent (the alert was cancelled)"


async def gate_open() -> bool:
    """False once the current send's gate (:data:`SEND_GATE`) says stop."""
    gate = SEND_GATE.get()
    return True if gate is None else await gate()


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One rendered message for one recipient on one channel.

    ``address`` is the resolved contact detail (push token, E.164 number, email
    address); it exists only in memory between the contact store and the provider.
    ``collapse_key`` lets a provider replace an older notification for the same alert
    (FCM ``collapse_key``, APNs ``apns-collapse-id``); ``ttl_s`` is how long the
    provider may hold the message before it becomes pointless (the alert expiry).
    ``severity`` and ``urgency`` are the alert's CAP values; push providers map them
    to delivery priority (an Extreme alert may break through "do not disturb").
    """

    subscriber_id: str
    address: str
    channel: Channel
    alert_key: str
    language: str
    subject: str
    body: str
    collapse_key: str = ""
    ttl_s: int | None = None
    severity: str = ""
    urgency: str = ""
    html: str = ""  # email only: the rendered HTML part ("" = derive it from ``body``)


@dataclass(frozen=True, slots=True)
class SendResult:
    """What happened to one :class:`OutgoingMessage` (matched by ``subscriber_id``).

    ``retry_after_s`` is the provider's own "come back later" (HTTP ``Retry-After``
    on a 429/503): the sender waits at least that long before retrying.
    """

    subscriber_id: str
    ok: bool
    error: str = ""
    retriable: bool = False
    provider_message_id: str = ""
    invalid_address: bool = False
    retry_after_s: float | None = None


class ProviderError(Exception):
    """The whole ``send_batch`` call failed; no message in it may be assumed delivered.

    ``retriable=True`` (the default) means the same provider may succeed on a later
    attempt (timeouts, 5xx, connection refused); ``False`` means retrying it is
    pointless (bad credentials, misconfiguration) and the sender fails over at once.
    ``retry_after_s`` carries the provider's ``Retry-After`` when it sent one.
    """

    def __init__(
        self, message: str, *, retriable: bool = True, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.retriable = retriable
        self.retry_after_s = retry_after_s


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from an HTTP ``Retry-After`` value (delta-seconds or HTTP-date).

    ``None`` when absent or unparsable; never negative.
    """
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; be lenient with sloppy servers
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@runtime_checkable
class Provider(Protocol):
    """A delivery service for one channel."""

    name: str
    channel: Channel

    async def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        """Send every message; return one result per message (any order).

        Raise :class:`ProviderError` only when the call as a whole failed.
        """
        ...

    async def aclose(self) -> None:
        """Release connections and files; the provider is not used afterwards."""
        ...
