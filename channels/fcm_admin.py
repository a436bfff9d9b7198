"""Push through firebase-admin's own ``messaging.send_each_async`` (the supported path).

Same message model and error mapping as :mod:`channels.fcm`, but the requests go
through firebase-admin's httpx client with its own retry policy. It is slower (see
``benchmarks/fanout.py``) and kept for deployments that want Google's SDK on the wire.

Two known traps, handled here:

- firebase-admin creates its ``httpx.AsyncClient`` with the messaging service, and
  that client's connections belong to the event loop that first used them. The App
  is therefore created lazily inside the running loop, and re-created (under a new
  name) when the provider finds itself in a different loop;
- ``firebase_admin.delete_app`` closes the async client with ``asyncio.run``, which
  cannot run inside a loop; the client is closed here with ``await`` first;
- its httpx auth flow refreshes an expired access token synchronously, blocking the
  event loop; the token is refreshed here in a thread before each call needs it.

The FCM endpoint is configurable (``fcm_base_url``) so tests reach a local stand-in:
firebase-admin hard-codes ``https://fcm.googleapis.com``, so the service's URL is
re-pointed after creation (a private attribute, checked at start-up). Its async path
also needs ``sniffio``, which it does not declare.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import warnings
from collections.abc import Sequence
from typing import Any

import firebase_admin
import sniffio  # noqa: F401  # firebase-admin's httpx path imports it lazily; fail early
from firebase_admin import credentials, messaging
from firebase_admin import exceptions as fb_exc

from channels.base import OutgoingMessage, ProviderError, SendResult, parse_retry_after
from channels.fcm import build_message, classify
from streams.records import Channel

__all__ = ["FcmAdminProvider"]

_BATCH_MAX = 500  # send_each_async refuses more
_app_ids = itertools.count()


class _StaticCredential(credentials.Base):  # type: ignore[misc]  # untyped base class
    """A fixed access token, for stand-ins (no Google credentials in tests)."""

    def __init__(self, token: str) -> None:
        from google.oauth2.credentials import Credentials

        # No expiry: google-auth treats the token as valid and never tries a refresh.
        self._credential = Credentials(token=token)

    def get_credential(self) -> Any:
        return self._credential


class FcmAdminProvider:
    """Push provider on ``firebase_admin.messaging.send_each_async``."""

    def __init__(
        self,
        base_url: str,
        project_id: str,
        *,
        access_token: str = "",
        credentials_file: str = "",
        timeout_s: float = 10.0,
        name: str = "fcm-admin",
    ) -> None:
        if not access_token and not credentials_file:
            raise ValueError("fcm-admin needs fcm_access_token or fcm_credentials_file")
        self.name = name
        self.channel: Channel = "push"
        self.base_url = base_url.rstrip("/")
        self.project_id = project_id
        self.access_token = access_token
        self.credentials_file = credentials_file
        self.timeout_s = timeout_s
        self._app: firebase_admin.App | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    def _gate(self) -> asyncio.Lock:
        """One ``send_each_async`` at a time per loop.

        Each call already puts up to 500 requests in flight; several at once queue
        thousands on httpx's 100-connection pool, where they die of ``PoolTimeout``
        (seen here: 2,000 concurrent requests, 170 delivered in two minutes).
        """
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    def _credential(self) -> credentials.Base:
        if self.access_token:
            return _StaticCredential(self.access_token)
        return credentials.Certificate(self.credentials_file)

    def _service(self) -> Any:
        """firebase-admin's messaging service for an App bound to the running loop."""
        loop = asyncio.get_running_loop()
        if self._app is None or self._loop is not loop:
            if self._app is not None:
                self._drop_app(self._app)  # bound to another (or a finished) loop
            options: dict[str, Any] = {"httpTimeout": self.timeout_s}
            if self.project_id:
                options["projectId"] = self.project_id
            self._app = firebase_admin.initialize_app(
                self._credential(), options, name=f"tocsin-{self.name}-{next(_app_ids)}"
            )
            self._loop = loop
            service = messaging._get_messaging_service(self._app)
            if not hasattr(service, "_fcm_url"):
                raise ProviderError(
                    f"{self.name}: this firebase-admin has no _fcm_url", retriable=False
                )
            service._fcm_url = f"{self.base_url}/v1/projects/{service._project_id}/messages:send"
        return messaging._get_messaging_service(self._app)

    @staticmethod
    def _drop_app(app: firebase_admin.App) -> None:
        with contextlib.suppress(ValueError):
            services = app._services or {}
            for service in services.values():
                # delete_app would call asyncio.run() on the async client; close the
                # sync session only and leave the async client to the caller.
                if hasattr(service, "_client"):
                    service.close = service._client.close
            firebase_admin.delete_app(app)

    async def _refresh_credential(self) -> None:
        """Refresh the access token in a thread when it is (nearly) expired.

        firebase-admin's httpx auth flow would otherwise refresh it synchronously
        inside the event loop, stalling every other task for a token round trip.
        """
        assert self._app is not None
        credential = self._app.credential.get_credential()
        if credential.valid:  # google-auth counts a token near expiry as invalid
            return
        from google.auth.transport.requests import Request

        try:
            await asyncio.to_thread(credential.refresh, Request())
        except Exception as exc:  # google-auth errors carry no contact data
            raise ProviderError(
                f"{self.name}: token refresh failed ({type(exc).__name__})", retriable=True
            ) from exc

    async def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        """Send through ``send_each_async`` in chunks of 500; one result per message."""
        if not messages:
            return []
        try:
            self._service()  # binds the App (and its httpx client) to this loop
        except (ValueError, OSError) as exc:  # bad credentials file, no project id
            raise ProviderError(f"{self.name}: {type(exc).__name__}", retriable=False) from exc
        await self._refresh_credential()
        templates: dict[tuple[str, str], messaging.Message] = {}
        fb_messages: list[messaging.Message] = []
        with warnings.catch_warnings():  # Message.token "deprecation": see channels.fcm
            warnings.simplefilter("ignore", DeprecationWarning)
            for msg in messages:
                tkey = (msg.language, msg.subject)
                t = templates.get(tkey)
                if t is None:
                    t = templates[tkey] = build_message(msg, "placeholder")
                fb_messages.append(
                    messaging.Message(
                        token=msg.address,
                        data=t.data,
                        notification=t.notification,
                        android=t.android,
                        apns=t.apns,
                        webpush=t.webpush,
                    )
                )
        results: list[SendResult] = []
        transport_errors = 0
        for start in range(0, len(messages), _BATCH_MAX):
            part = messages[start : start + _BATCH_MAX]
            try:
                async with self._gate():
                    batch = await messaging.send_each_async(
                        fb_messages[start : start + _BATCH_MAX], app=self._app
                    )
            except (fb_exc.FirebaseError, ValueError) as exc:
                results.extend(
                    SendResult(m.subscriber_id, ok=False, error=type(exc).__name__, retriable=True)
                    for m in part
                )
                transport_errors += len(part)
                continue
            for msg, resp in zip(part, batch.responses, strict=True):
                if resp.success:
                    results.append(
                        SendResult(msg.subscriber_id, ok=True, provider_message_id=resp.message_id)
                    )
                    continue
                error = resp.exception
                http_response = getattr(error, "http_response", None)
                retry_after = None
                if http_response is None:
                    transport_errors += 1
                else:
                    retry_after = parse_retry_after(http_response.headers.get("Retry-After"))
                results.append(classify(msg.subscriber_id, error, retry_after))
        if transport_errors == len(messages):
            raise ProviderError(f"{self.name}: no answer from the FCM endpoint", retriable=True)
        return results

    async def aclose(self) -> None:
        """Close firebase-admin's async client in this loop, then delete the App."""
        app, self._app = self._app, None
        if app is None:
            return
        with contextlib.suppress(ValueError):
            service = messaging._get_messaging_service(app)
            if self._loop is asyncio.get_running_loop():
                with contextlib.suppress(Exception):
                    await service._async_client.aclose()
        self._drop_app(app)
