"""Push through Firebase Cloud Messaging's HTTP v1 API over one pooled aiohttp session.

Why not firebase-admin's ``send_each_async``: it sends through httpx/httpcore and
manages a few hundred messages/s per core here, and its built-in retries ignore
``Retry-After``. This provider posts the very same FCM v1 JSON
(``POST {base}/v1/projects/{project}/messages:send``) over one keep-alive aiohttp
session with bounded concurrency, and keeps firebase-admin for what it does well:

- the message model: the Android/APNs/webpush options of an urgent public-safety
  alert are built with ``firebase_admin.messaging.Message`` and encoded by
  firebase-admin's own encoder (which validates them) -- once per (alert, language,
  TTL), with a placeholder token. The per-recipient body is that JSON with the
  token spliced in, so the model costs nothing per message;
- the error classes: answers are mapped to the ``FirebaseError`` subclasses
  firebase-admin would raise (:func:`fcm_error`), and from those to the sender's
  outcome (:func:`classify`): ``UNREGISTERED``/``SENDER_ID_MISMATCH``/an invalid
  token prune the address; 429 and 5xx are retriable, honouring ``Retry-After``;
- credentials: a service-account file (google-auth, refreshed off the hot path) or a
  static bearer token for stand-ins.

A request that fails below HTTP (connection refused, reset, timeout) is a retriable
per-message failure; when every message of a call fails that way the call raises
:class:`ProviderError` instead. Tokens never appear in errors or logs.
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import contextlib
import hashlib
import re
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from firebase_admin import _utils as fb_utils
from firebase_admin import exceptions as fb_exc
from firebase_admin import messaging
from yarl import URL

from channels.base import OutgoingMessage, ProviderError, SendResult, parse_retry_after
from channels.http import TRANSPORT_ERRORS, Answer, PooledPoster
from streams.records import Channel

__all__ = [
    "FCM_SCOPES",
    "FcmProvider",
    "StaticToken",
    "TokenSource",
    "build_message",
    "classify",
    "fcm_error",
    "token_source",
    "webpush_topic",
]

FCM_SCOPES = (
    "https://www.googleapis.com/auth/firebase.messaging",
    "https://www.googleapis.com/auth/cloud-platform",
)
_FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
_SENTINEL = "\u0000tocsin-token\u0000"  # cannot occur in a real registration token
_TEMPLATE_CACHE = 256
_UNAUTHENTICATED = "UnauthenticatedError: UNAUTHENTICATED"
_TOPIC = re.compile(r"[A-Za-z0-9_-]{1,32}")

# FCM's own error codes (FcmError.errorCode) -> firebase-admin's classes, as in
# firebase_admin.messaging._MessagingService.FCM_ERROR_TYPES.
_FCM_ERRORS: dict[str, type[fb_exc.FirebaseError]] = {
    "APNS_AUTH_ERROR": messaging.ThirdPartyAuthError,
    "QUOTA_EXCEEDED": messaging.QuotaExceededError,
    "SENDER_ID_MISMATCH": messaging.SenderIdMismatchError,
    "THIRD_PARTY_AUTH_ERROR": messaging.ThirdPartyAuthError,
    "UNREGISTERED": messaging.UnregisteredError,
}
# Google's canonical codes -> firebase-admin's platform classes, and HTTP status ->
# canonical code when the body has none: firebase-admin's own tables, so the mapping
# stays exactly what its SDK raises.
_PLATFORM_ERRORS: dict[str, type[fb_exc.FirebaseError]] = fb_utils._ERROR_CODE_TO_EXCEPTION_TYPE
_HTTP_TO_CODE: dict[int, str] = fb_utils._HTTP_STATUS_TO_ERROR_CODE
_RETRIABLE = (
    fb_exc.ResourceExhaustedError,  # includes QuotaExceededError
    fb_exc.UnavailableError,
    fb_exc.InternalError,
    fb_exc.DeadlineExceededError,
    fb_exc.AbortedError,
)
_DEAD_TOKEN = (messaging.UnregisteredError, messaging.SenderIdMismatchError)


class _Ok(msgspec.Struct):
    name: str = ""


_ok_decoder = msgspec.json.Decoder(_Ok)


# -- errors -----------------------------------------------------------------------------


def fcm_error(status: int, payload: bytes) -> fb_exc.FirebaseError:
    """The ``FirebaseError`` firebase-admin would raise for this FCM v1 error answer.

    The FCM code (``details[].errorCode`` of type FcmError) wins over the canonical
    ``error.status``, which wins over the HTTP status, as in firebase-admin.
    """
    error: dict[str, Any] = {}
    with contextlib.suppress(msgspec.DecodeError, TypeError):
        data = msgspec.json.decode(payload)
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            error = data["error"]
    message = str(error.get("message") or f"Unexpected HTTP response with status: {status}")
    fcm_code = next(
        (
            d.get("errorCode")
            for d in error.get("details") or ()
            if isinstance(d, dict) and d.get("@type") == _FCM_ERROR_TYPE
        ),
        None,
    )
    code = str(error.get("status") or _HTTP_TO_CODE.get(status, fb_exc.UNKNOWN))
    exc_type = _FCM_ERRORS.get(fcm_code or "") or _PLATFORM_ERRORS.get(code, fb_exc.UnknownError)
    exc = exc_type(message)
    # Keep what classify() needs to recognise a dead token behind INVALID_ARGUMENT.
    exc.fcm_details = error.get("details") or []  # type: ignore[attr-defined]
    exc.fcm_code = fcm_code  # type: ignore[attr-defined]
    return exc


def _token_violation(exc: fb_exc.FirebaseError) -> bool:
    for detail in getattr(exc, "fcm_details", ()):
        if isinstance(detail, dict) and detail.get("@type") == _BAD_REQUEST_TYPE:
            for v in detail.get("fieldViolations") or ():
                if isinstance(v, dict) and v.get("field") == "message.token":
                    return True
    return "registration token" in str(exc).lower()


def classify(
    subscriber_id: str, exc: fb_exc.FirebaseError, retry_after_s: float | None = None
) -> SendResult:
    """The sender's outcome for one message that FCM refused with ``exc``.

    The error text names the class and code only: Google's messages are safe today,
    but nothing guarantees they never echo the token.
    """
    code = getattr(exc, "fcm_code", None) or exc.code
    error = f"{type(exc).__name__}: {code}"
    if isinstance(exc, _DEAD_TOKEN) or (
        isinstance(exc, fb_exc.InvalidArgumentError) and _token_violation(exc)
    ):
        return SendResult(subscriber_id, ok=False, error=error, invalid_address=True)
    if isinstance(exc, _RETRIABLE):
        return SendResult(
            subscriber_id, ok=False, error=error, retriable=True, retry_after_s=retry_after_s
        )
    return SendResult(subscriber_id, ok=False, error=error)


# -- credentials --------------------------------------------------------------------------


class TokenSource:
    """Supplies the ``Authorization`` header value."""

    refreshable: bool = False

    async def header(self) -> str:
        """``Bearer <access token>``."""
        raise NotImplementedError

    def invalidate(self) -> None:
        """The server rejected the token (401): fetch a new one next time."""


class StaticToken(TokenSource):
    """A fixed bearer token (stand-ins and tests; no Google credentials here)."""

    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    async def header(self) -> str:
        """The fixed header."""
        return self._header


class ServiceAccountToken(TokenSource):
    """OAuth2 access tokens from a service-account file via google-auth.

    The token is refreshed in a thread (google-auth is synchronous) by a background
    task once it has less than ``early_s`` left, so senders keep using the current
    one meanwhile; only the very first call, or a token that really expired, waits.
    """

    refreshable = True

    def __init__(self, path: str, *, early_s: float = 300.0) -> None:
        from google.oauth2 import service_account

        self.credentials = service_account.Credentials.from_service_account_file(
            path, scopes=list(FCM_SCOPES)
        )
        self.project_id: str = self.credentials.project_id or ""
        self.early_s = early_s
        self._header = ""
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    async def header(self) -> str:
        """The current header, refreshing first only when there is no usable token."""
        now = time.time()
        if self._header and now < self._expires_at - 30:
            if now > self._expires_at - self.early_s and self._background is None:
                self._background = asyncio.create_task(self._refresh_background())
            return self._header
        await self._refresh()
        return self._header

    def invalidate(self) -> None:
        """Force a refresh before the next request."""
        self._expires_at = 0.0

    async def _refresh_background(self) -> None:
        try:
            await self._refresh()
        except Exception:  # the next header() call retries in the foreground
            self.invalidate()
        finally:
            self._background = None

    async def _refresh(self) -> None:
        async with self._lock:
            if self._header and time.time() < self._expires_at - self.early_s:
                return  # somebody else refreshed while we waited for the lock
            from google.auth.transport.requests import Request

            try:
                await asyncio.to_thread(self.credentials.refresh, Request())
            except Exception as exc:  # google-auth's errors carry no contact data
                raise ProviderError(
                    f"fcm: token refresh failed ({type(exc).__name__})", retriable=True
                ) from exc
            expiry = self.credentials.expiry  # naive UTC
            self._expires_at = (
                calendar.timegm(expiry.utctimetuple()) if expiry else time.time() + 3000
            )
            self._header = f"Bearer {self.credentials.token}"


def token_source(access_token: str = "", credentials_file: str = "") -> TokenSource:
    """A static token when given, else service-account credentials from the file."""
    if access_token:
        return StaticToken(access_token)
    if credentials_file:
        return ServiceAccountToken(credentials_file)
    raise ValueError("FCM needs fcm_access_token or fcm_credentials_file")


# -- HTTP session ---------------------------------------------------------------------------


# -- the message model ------------------------------------------------------------------------


def _interruption_level(severity: str) -> str:
    # iOS 15+: "critical" breaks through mute/Focus (needs Apple's critical-alert
    # entitlement; without it iOS degrades to time-sensitive).
    return {"Extreme": "critical", "Severe": "time-sensitive"}.get(severity, "active")


def webpush_topic(collapse_key: str) -> str:
    """The Web Push ``Topic`` for a collapse key: RFC 8030 allows at most 32 characters
    of the URL-safe base64 alphabet, so anything else is hashed into that shape."""
    if _TOPIC.fullmatch(collapse_key):
        return collapse_key
    digest = hashlib.sha256(collapse_key.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()[:32]


def build_message(msg: OutgoingMessage, token: str, now: float | None = None) -> messaging.Message:
    """A firebase-admin ``Message`` for an urgent public-safety alert.

    High priority on Android and APNs (``apns-priority: 10``), TTL from the alert's
    expiry, a critical sound for Extreme alerts, and the alert key in ``data`` for the
    app. Every message of one alert carries the same collapse key on every platform --
    ``android.collapse_key`` (and the notification ``tag``), ``apns-collapse-id`` and
    the webpush ``Topic`` -- so a later message for the alert (an update, or a re-send
    after a crash) replaces the earlier notification instead of stacking up.
    """
    now = time.time() if now is None else now
    ttl = msg.ttl_s
    apns_headers = {"apns-priority": "10", "apns-push-type": "alert"}
    webpush_headers = {"Urgency": "high"}
    if msg.collapse_key:
        apns_headers["apns-collapse-id"] = msg.collapse_key[:64]
        webpush_headers["Topic"] = webpush_topic(msg.collapse_key)
    if ttl is not None:
        apns_headers["apns-expiration"] = str(int(now + ttl))
        webpush_headers["TTL"] = str(ttl)
    extreme = msg.severity == "Extreme"
    sound: str | messaging.CriticalSound = (
        messaging.CriticalSound("default", critical=True, volume=1.0) if extreme else "default"
    )
    data = {"alert_key": msg.alert_key, "language": msg.language}
    if msg.severity:
        data["severity"] = msg.severity
    if msg.urgency:
        data["urgency"] = msg.urgency
    android = messaging.AndroidConfig(
        priority="high",
        ttl=ttl,
        collapse_key=msg.collapse_key or None,
        notification=messaging.AndroidNotification(
            priority="max" if extreme else "high",
            default_sound=True,
            tag=msg.collapse_key or msg.alert_key,
        ),
    )
    apns = messaging.APNSConfig(
        headers=apns_headers,
        payload=messaging.APNSPayload(
            aps=messaging.Aps(
                sound=sound, custom_data={"interruption-level": _interruption_level(msg.severity)}
            )
        ),
    )
    with warnings.catch_warnings():
        # firebase-admin 7.7 flags Message.token as deprecated in favour of installation
        # ids, yet the FCM v1 API and every registered device still use tokens.
        warnings.simplefilter("ignore", DeprecationWarning)
        return messaging.Message(
            token=token,
            notification=messaging.Notification(title=msg.subject, body=msg.body),
            data=data,
            android=android,
            apns=apns,
            webpush=messaging.WebpushConfig(headers=webpush_headers),
        )


def _template(msg: OutgoingMessage) -> tuple[bytes, bytes]:
    """The request body around the token: ``prefix + json(token) + suffix``."""
    # firebase-admin's encoder validates the model and produces the v1 JSON dict.
    encoded = messaging._MessagingService.encode_message(build_message(msg, _SENTINEL))
    ordered = {"token": encoded.pop("token"), **encoded}
    body = msgspec.json.encode({"message": ordered})
    prefix, _, suffix = body.partition(msgspec.json.encode(_SENTINEL))
    return prefix, suffix


# -- the provider ------------------------------------------------------------------------------


class FcmProvider:
    """FCM HTTP v1 push provider (the default push path).

    ``max_concurrency`` bounds requests in flight across every concurrent
    ``send_batch`` call (and sizes the connection pool); one keep-alive connection
    carries one request at a time on HTTP/1.1.
    """

    streams_results = True  # send_batch takes on_result (see channels.sender)

    def __init__(
        self,
        base_url: str,
        project_id: str,
        tokens: TokenSource,
        *,
        max_concurrency: int = 200,
        timeout_s: float = 10.0,
        name: str = "fcm",
    ) -> None:
        if not project_id:
            raise ValueError("FCM needs a project id")
        self.name = name
        self.channel: Channel = "push"
        self.url = URL(f"{base_url.rstrip('/')}/v1/projects/{project_id}/messages:send")
        self.tokens = tokens
        self.max_concurrency = max_concurrency
        self._poster = PooledPoster(self.url, max_concurrency, timeout_s)
        self._templates: OrderedDict[tuple[Any, ...], tuple[bytes, bytes]] = OrderedDict()

    def body(self, msg: OutgoingMessage) -> bytes:
        """The exact JSON request body for one message."""
        # ttl_s shrinks every second, so a long fan-out rebuilds its template about
        # once per second per language: negligible next to thousands of requests.
        key = (
            msg.alert_key,
            msg.language,
            msg.subject,
            msg.body,
            msg.collapse_key,
            msg.ttl_s,
            msg.severity,
            msg.urgency,
        )
        parts = self._templates.get(key)
        if parts is None:
            parts = self._templates[key] = _template(msg)
            if len(self._templates) > _TEMPLATE_CACHE:
                self._templates.popitem(last=False)
        return parts[0] + msgspec.json.encode(msg.address) + parts[1]

    async def send_batch(
        self,
        messages: Sequence[OutgoingMessage],
        on_result: Callable[[SendResult], None] | None = None,
    ) -> list[SendResult]:
        """Post every message; one result each. Raises ProviderError only when no
        request got an HTTP answer, or every answer was an authentication failure.

        ``on_result`` hears each message's result as soon as its answer is in.
        """
        if not messages:
            return []
        headers = {"Authorization": await self.tokens.header(), "Content-Type": "application/json"}
        results: list[SendResult] = [None] * len(messages)  # type: ignore[list-item]

        def on_answer(i: int, answer: Answer | Exception) -> None:
            result = results[i] = self._result(messages[i], answer)
            if on_result is not None:
                on_result(result)

        answers = await self._poster.post_all(messages, self.body, headers, on_answer)
        transport_errors = sum(isinstance(a, TRANSPORT_ERRORS) for a in answers)
        auth_errors = sum(r.error == _UNAUTHENTICATED for r in results)
        if auth_errors:
            self.tokens.invalidate()
        if transport_errors == len(messages):
            raise ProviderError(f"{self.name}: no answer from the FCM endpoint", retriable=True)
        if auth_errors == len(messages):
            raise ProviderError(
                f"{self.name}: authentication rejected", retriable=self.tokens.refreshable
            )
        return results

    def _result(self, msg: OutgoingMessage, answer: Answer | Exception) -> SendResult:
        sid = msg.subscriber_id
        if isinstance(answer, ValueError):  # firebase-admin's model refused a field
            return SendResult(sid, ok=False, error=f"model: {answer}")
        if isinstance(answer, Exception):
            # No answer: possibly not delivered (refused) or possibly delivered (reset
            # after the request went out). Retrying is right; a duplicate collapses on
            # the device (collapse key).
            error = f"UnavailableError: {type(answer).__name__}"
            return SendResult(sid, ok=False, error=error, retriable=True)
        if answer.status == 200:
            try:
                mid = _ok_decoder.decode(answer.payload).name
            except msgspec.DecodeError:
                mid = ""
            return SendResult(sid, ok=True, provider_message_id=mid)
        exc_fb = fcm_error(answer.status, answer.payload)
        if isinstance(exc_fb, fb_exc.UnauthenticatedError):
            return SendResult(
                sid, ok=False, error=_UNAUTHENTICATED, retriable=self.tokens.refreshable
            )
        return classify(sid, exc_fb, parse_retry_after(answer.retry_after))

    async def aclose(self) -> None:
        """Close the HTTP session."""
        await self._poster.aclose()
