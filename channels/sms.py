"""SMS through a provider HTTP API in the Twilio Messages API shape.

A thin adapter of our own rather than the ``twilio`` package: that one hard-codes its
host (no local stand-in, no second provider with another base URL) and hides
``Retry-After``. One request per message, form-encoded::

    POST {base}/2010-04-01/Accounts/{AccountSid}/Messages.json
    Authorization: Basic base64(AccountSid:AuthToken)
    To=+1555...&From=+1555...|MessagingServiceSid=MG...&Body=...&StatusCallback=...

over one pooled keep-alive aiohttp session with bounded concurrency. Answers:

- ``201`` with the Message resource: sent; its ``sid`` is the provider message id
  (the status callback refers to it);
- ``429`` (Twilio 20429) and ``5xx``: retriable, honouring ``Retry-After``;
- ``400`` with 21211/21614/21217/21401 (not a valid or not a mobile number) or 21610
  (the citizen replied STOP): the address is dead -- pruned, and no failover (a
  backup provider must not text someone who opted out);
- other ``4xx``: a permanent failure on this provider (the next one may do better);
- ``401`` (20003) for every message: :class:`ProviderError`, not retriable;
- no answer at all (refused, reset, timeout): retriable per message, and a
  :class:`ProviderError` when the whole call got none (the provider is down).

Every request's ``StatusCallback`` is the configured webhook URL plus
``?alert=<alert key>&k=<token>``, where the token is
:func:`channels.idempotency.dedupe_token` of (alert, channel, citizen) -- an opaque
hash, never the number. Twilio posts each status change of the message there
(``queued``, ``sent``, ``delivered``...); the webhook records the token as
acknowledged, and a sender taking over a crashed sender's claim marks an acknowledged
message sent instead of texting the citizen twice (see ``channels/idempotency.py``).

Twilio's error messages echo the phone number, so error texts carry the code only.
The body's segment count (GSM-7 vs UCS-2) is budgeted by ``templates.render``.
:func:`parse_status_callback` and :func:`validate_signature` are for the delivery
status webhook.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import quote_plus, urlencode

import msgspec
from yarl import URL

from channels.base import OutgoingMessage, ProviderError, SendResult, parse_retry_after
from channels.http import Answer, PooledPoster
from channels.idempotency import dedupe_token
from streams.records import Channel

__all__ = [
    "CALLBACK_STATUS",
    "SmsProvider",
    "parse_status_callback",
    "twilio_signature",
    "validate_signature",
]

#: Twilio error codes meaning "this number cannot receive our SMS, ever".
DEAD_NUMBER_CODES = frozenset({21211, 21217, 21401, 21610, 21614})

#: Twilio message status -> our receipt status.
CALLBACK_STATUS: dict[str, str] = {
    "accepted": "queued",
    "scheduled": "queued",
    "queued": "queued",
    "sending": "queued",
    "sent": "sent",
    "delivered": "delivered",
    "read": "delivered",
    "partially_delivered": "delivered",
    "undelivered": "failed",
    "failed": "failed",
    "canceled": "cancelled",
}


class _Created(msgspec.Struct):
    sid: str = ""


class _Error(msgspec.Struct):
    code: int | None = None
    status: int | None = None


_created = msgspec.json.Decoder(_Created)
_error = msgspec.json.Decoder(_Error)


def parse_status_callback(form: Mapping[str, str]) -> tuple[str, str, str]:
    """``(provider_message_id, status, error_code)`` from a status callback's form.

    ``status`` is one of ``queued``, ``sent``, ``delivered``, ``failed``,
    ``cancelled``; ``error_code`` is Twilio's code for failures ("" otherwise).
    Raises ``ValueError`` for a form without a message sid or with an unknown status.
    """
    sid = form.get("MessageSid") or form.get("SmsSid") or ""
    raw = (form.get("MessageStatus") or form.get("SmsStatus") or "").strip().lower()
    if not sid:
        raise ValueError("status callback without MessageSid")
    if raw not in CALLBACK_STATUS:
        raise ValueError(f"unknown message status {raw!r}")
    return sid, CALLBACK_STATUS[raw], (form.get("ErrorCode") or "").strip()


def twilio_signature(url: str, params: Mapping[str, str], auth_token: str) -> str:
    """``X-Twilio-Signature`` of a webhook request: base64(HMAC-SHA1(token, url +
    every POST parameter name and value, sorted by name))."""
    data = url + "".join(f"{k}{params[k]}" for k in sorted(params))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def validate_signature(
    url: str, params: Mapping[str, str], signature: str, auth_token: str
) -> bool:
    """Whether a status callback really comes from the account owning ``auth_token``."""
    expected = twilio_signature(url, params, auth_token)
    return hmac.compare_digest(expected.encode(), signature.encode())


class SmsProvider:
    """Twilio-Messages-API-shaped SMS provider.

    Give ``from_`` (a number or sender id) or ``messaging_service_sid``.
    ``status_callback`` is the URL the provider should post delivery statuses to; with
    it, each message's callback names the message (see the module doc) and the
    provider ``acknowledges``: the sender may consult those acknowledgements.
    """

    streams_results = True  # send_batch takes on_result (see channels.sender)

    def __init__(
        self,
        base_url: str,
        account_sid: str,
        auth_token: str,
        *,
        from_: str = "",
        messaging_service_sid: str = "",
        status_callback: str = "",
        max_concurrency: int = 100,
        timeout_s: float = 10.0,
        name: str = "sms",
    ) -> None:
        if not account_sid or not auth_token:
            raise ValueError(f"{name}: account sid and auth token are required")
        if not from_ and not messaging_service_sid:
            raise ValueError(f"{name}: a From number or a messaging service sid is required")
        self.name = name
        self.channel: Channel = "sms"
        self.url = URL(f"{base_url.rstrip('/')}/2010-04-01/Accounts/{account_sid}/Messages.json")
        basic = base64.b64encode(f"{account_sid}:{auth_token}".encode()).decode()
        self._headers = {
            "Authorization": f"Basic {basic}",
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        }
        sender = {"MessagingServiceSid": messaging_service_sid} if messaging_service_sid else {}
        if from_ and not messaging_service_sid:
            sender = {"From": from_}
        self._common = urlencode(sender)
        self.acknowledges = bool(status_callback)
        self._callback = ""
        if status_callback:
            sep = "&" if "?" in status_callback else "?"
            self._callback = "&StatusCallback=" + quote_plus(f"{status_callback}{sep}alert=")
        self.max_concurrency = max_concurrency
        self._poster = PooledPoster(self.url, max_concurrency, timeout_s)
        self._bodies: dict[str, str] = {}

    def callback_url(self, msg: OutgoingMessage) -> str:
        """The ``StatusCallback`` of one message ("" when none is configured)."""
        if not self._callback:
            return ""
        token = dedupe_token(msg.alert_key, msg.channel, msg.subscriber_id)
        return f"{self._callback}{quote_plus(msg.alert_key)}%26k%3D{token}"

    def form(self, msg: OutgoingMessage) -> bytes:
        """The form-encoded request body for one message."""
        tail = self._bodies.get(msg.body)
        if tail is None:
            if len(self._bodies) > 64:  # one entry per (alert, language) in practice
                self._bodies.clear()
            tail = self._bodies[msg.body] = f"&{self._common}&Body={quote_plus(msg.body)}"
        return f"To={quote_plus(msg.address)}{self.callback_url(msg)}{tail}".encode()

    def _answer(
        self, msg: OutgoingMessage, status: int, payload: bytes, retry_after: str | None
    ) -> SendResult:
        sid = msg.subscriber_id
        if status in (200, 201):
            try:
                mid = _created.decode(payload).sid
            except msgspec.DecodeError:
                mid = ""
            return SendResult(sid, ok=True, provider_message_id=mid)
        try:
            code = _error.decode(payload).code
        except msgspec.DecodeError:
            code = None
        error = f"HTTP {status}" + (f" twilio {code}" if code else "")
        if status == 429 or code == 20429 or status >= 500:
            return SendResult(
                sid,
                ok=False,
                error=error,
                retriable=True,
                retry_after_s=parse_retry_after(retry_after),
            )
        if code in DEAD_NUMBER_CODES:
            return SendResult(sid, ok=False, error=error, invalid_address=True)
        return SendResult(sid, ok=False, error=error)

    def _result(self, msg: OutgoingMessage, answer: Answer | Exception) -> SendResult:
        if isinstance(answer, ValueError):  # the form could not be built
            return SendResult(msg.subscriber_id, ok=False, error="unsendable message")
        if isinstance(answer, Exception):
            error = f"no answer ({type(answer).__name__})"
            return SendResult(msg.subscriber_id, ok=False, error=error, retriable=True)
        return self._answer(msg, answer.status, answer.payload, answer.retry_after)

    async def send_batch(
        self,
        messages: Sequence[OutgoingMessage],
        on_result: Callable[[SendResult], None] | None = None,
    ) -> list[SendResult]:
        """Post every message; one result each (see the module doc for the mapping).

        ``on_result`` hears each message's result as soon as its answer is in.
        """
        if not messages:
            return []
        results: list[SendResult] = [None] * len(messages)  # type: ignore[list-item]

        def on_answer(i: int, answer: Answer | Exception) -> None:
            result = results[i] = self._result(messages[i], answer)
            if on_result is not None:
                on_result(result)

        answers = await self._poster.post_all(messages, self.form, self._headers, on_answer)
        no_answer = auth_failed = 0
        for answer, result in zip(answers, results, strict=True):
            if isinstance(answer, Answer):
                auth_failed += answer.status in (401, 403) and not result.ok
            elif not isinstance(answer, ValueError):
                no_answer += 1
        if no_answer == len(messages):
            raise ProviderError(f"{self.name}: provider unreachable", retriable=True)
        if auth_failed == len(messages):
            raise ProviderError(f"{self.name}: authentication rejected", retriable=False)
        return results

    async def aclose(self) -> None:
        """Close the HTTP session."""
        await self._poster.aclose()
