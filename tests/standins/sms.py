"""A local server speaking the Twilio Messages API (2010-04-01) create call.

``POST /2010-04-01/Accounts/{AccountSid}/Messages.json``, HTTP Basic auth
``AccountSid:AuthToken``, form-encoded ``To``, ``From`` or ``MessagingServiceSid``,
``Body``, optional ``StatusCallback``. Answers like Twilio:

- ``201`` with the Message resource, shaped after Twilio's own examples
  (``data/other/twilio_messages_api_create_*_201.json``): ``sid``, ``status``,
  ``num_segments`` (GSM-7/UCS-2), dates in RFC 2822;
- errors as Twilio's JSON ``{"code", "message", "more_info", "status"}``: 20003 (401,
  bad credentials), 21604/21602/21603 (missing To/Body/From), 21211 (not a valid
  number -- the message quotes the number, as Twilio's does), 21614 (not a mobile
  number: the ``invalid`` set), 21617 (body over 1600 characters), 20429 (429 with
  ``Retry-After``), 20503 (503).

With ``callbacks=True`` (``--callbacks``) it posts status callbacks to each
message's ``StatusCallback`` URL, as Twilio does: form-encoded ``MessageSid``,
``MessageStatus``, ``SmsSid``, ``SmsStatus``, ``To``, ``From``, ``AccountSid``,
``ApiVersion`` (``ErrorCode`` on failures), signed with ``X-Twilio-Signature`` over the
URL exactly as given (query string included) -- ``queued``, then ``sent``, then
``delivered`` (``undelivered`` with ErrorCode 30003 for numbers in ``unreachable``).
A message's statuses go out in order; a new message's ``queued`` overtakes the later
statuses of older ones (Twilio queues at once, the carrier reports come later), over
``callback_concurrency`` keep-alive connections. A callback that fails is not retried
(Twilio does not retry status callbacks either); ``callbacks_failed`` counts them.

Run in-process (``SmsStandIn(...).running()``) or as a process:
``python -m tests.standins.sms --port N --sid AC... --auth-token T [--callbacks]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import re
import secrets
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import aiohttp
from aiohttp import web

from channels.sms import twilio_signature
from templates.render import sms_segments
from tests.standins import DATA_OTHER, StandIn, serve_main

__all__ = ["SmsStandIn"]

_E164 = re.compile(r"^\+[1-9]\d{6,14}$")
# Twilio's own example answers, for a From number and for a messaging service.
TEMPLATE: dict[str, Any] = json.loads(
    (DATA_OTHER / "twilio_messages_api_create_create_201.json").read_text()
)
SERVICE_TEMPLATE: dict[str, Any] = json.loads(
    (DATA_OTHER / "twilio_messages_api_create_createWithMessagingService_201.json").read_text()
)


def twilio_error(status: int, code: int, message: str) -> bytes:
    """A Twilio REST error body."""
    return json.dumps(
        {
            "code": code,
            "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        }
    ).encode()


@dataclass
class SmsStandIn(StandIn):
    """The SMS stand-in; numbers in ``invalid`` are refused with 21614."""

    account_sid: str = "AC" + "0" * 32
    auth_token: str = "standin-auth-token"
    invalid: set[str] = field(default_factory=set)
    unreachable: set[str] = field(default_factory=set)
    callbacks: bool = False
    callback_concurrency: int = 16
    callbacks_sent: int = 0
    callbacks_failed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        basic = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        self._auth = f"Basic {basic}"
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: aiohttp.ClientSession | None = None
        # (stage, sequence, callback): stage 0 = queued goes first; see the module doc.
        self._outbox: asyncio.PriorityQueue[tuple[int, int, _Callback]] | None = None
        self._seq = itertools.count()

    def stats(self, alert_key: str | None = None) -> dict[str, Any]:
        """The base counters plus the status callbacks sent, failed and still due."""
        return {
            **super().stats(alert_key),
            "callbacks_sent": self.callbacks_sent,
            "callbacks_failed": self.callbacks_failed,
            "callbacks_pending": self._outbox.qsize() if self._outbox else 0,
        }

    def routes(self, app: web.Application) -> None:
        """The Messages create endpoint."""
        app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", self.create)
        app.on_cleanup.append(self._cleanup)

    async def _cleanup(self, app: web.Application) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()
        self._outbox = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def create(self, request: web.Request) -> web.Response:
        """Create (send) a message."""
        if (
            request.headers.get("Authorization") != self._auth
            or request.match_info["sid"] != self.account_sid
        ):
            return self.answer(401, twilio_error(401, 20003, "Authenticate"))
        if request.content_type != "application/x-www-form-urlencoded":
            return self.answer(400, twilio_error(400, 20001, "Unsupported content type"))
        form = await request.post()
        to, body = str(form.get("To", "")), str(form.get("Body", ""))
        sender, service = str(form.get("From", "")), str(form.get("MessagingServiceSid", ""))
        fault = await self.injected(to)
        if fault == "close":
            return self.drop(request)
        retry = {"Retry-After": str(int(self.faults.retry_after_s))}
        if fault == "429":
            return self.answer(429, twilio_error(429, 20429, "Too Many Requests"), retry)
        if fault == "503":
            body503 = twilio_error(503, 20503, "Service Unavailable")
            return self.answer(503, body503, retry if self.faults.retry_after_on_503 else None)
        if not to:
            return self.answer(400, twilio_error(400, 21604, "A 'To' phone number is required."))
        if not body:
            return self.answer(400, twilio_error(400, 21602, "Message body is required."))
        if not sender and not service:
            return self.answer(400, twilio_error(400, 21603, "A 'From' phone number is required."))
        if not _E164.match(to):
            return self.answer(
                400, twilio_error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
            )
        if to in self.invalid:
            return self.answer(
                400, twilio_error(400, 21614, f"'To' number {to} is not a valid mobile number")
            )
        if len(body) > 1600:
            return self.answer(
                400,
                twilio_error(
                    400, 21617, "The concatenated message body exceeds the 1600 character limit."
                ),
            )
        sid = "SM" + secrets.token_hex(16)
        # SMS carries no metadata: messages are told apart by number (alert key "").
        self.record(request, to, "", {"To": to, "Body": body, "From": sender, "Service": service})
        now = formatdate(usegmt=True).replace("GMT", "+0000")
        resource = {
            **(SERVICE_TEMPLATE if service and not sender else TEMPLATE),
            "account_sid": self.account_sid,
            "body": body,
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "from": sender or None,
            "messaging_service_sid": service or None,
            "num_segments": str(sms_segments(body)),
            "sid": sid,
            "status": "accepted" if service and not sender else "queued",
            "subresource_uris": {
                "media": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}/Media.json"
            },
            "to": to,
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
        }
        callback = str(form.get("StatusCallback", ""))
        if callback and self.callbacks:
            final = ("undelivered", "30003") if to in self.unreachable else ("delivered", "")
            statuses = (("queued", ""), ("sent", ""), final)
            self._schedule(_Callback(callback, sid, to, sender, service, statuses))
        return self.answer(201, json.dumps(resource).encode())

    def _schedule(self, callback: _Callback) -> None:
        if self._outbox is None:
            self._outbox = asyncio.PriorityQueue()
            self._client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.callback_concurrency)
            )
            for _ in range(self.callback_concurrency):
                task = asyncio.create_task(self._post_callbacks(self._outbox, self._client))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        self._outbox.put_nowait((callback.stage, next(self._seq), callback))

    async def _post_callbacks(
        self,
        outbox: asyncio.PriorityQueue[tuple[int, int, _Callback]],
        client: aiohttp.ClientSession,
    ) -> None:
        while True:
            _, _, cb = await outbox.get()
            status, error = cb.statuses[cb.stage]
            form = {
                "AccountSid": self.account_sid,
                "ApiVersion": "2010-04-01",
                "From": cb.sender,
                "MessageSid": cb.sid,
                "MessageStatus": status,
                "SmsSid": cb.sid,
                "SmsStatus": status,
                "To": cb.to,
            }
            if cb.service:
                form["MessagingServiceSid"] = cb.service
            if error:
                form["ErrorCode"] = error
            headers = {"X-Twilio-Signature": twilio_signature(cb.url, form, self.auth_token)}
            try:
                async with client.post(cb.url, data=form, headers=headers) as resp:
                    await resp.read()
                    ok = resp.status < 300
            except (aiohttp.ClientError, OSError):
                ok = False
            self.callbacks_sent += ok
            self.callbacks_failed += not ok
            cb.stage += 1
            if cb.stage < len(cb.statuses):
                outbox.put_nowait((cb.stage, next(self._seq), cb))


@dataclass
class _Callback:
    """The status callbacks still owed for one message."""

    url: str
    sid: str
    to: str
    sender: str
    service: str
    statuses: tuple[tuple[str, str], ...]
    stage: int = 0


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sid", default="AC" + "0" * 32)
    parser.add_argument("--auth-token", default="standin-auth-token")
    parser.add_argument("--invalid", action="append", default=[])
    parser.add_argument("--callbacks", action="store_true", help="post status callbacks")


def _build(args: argparse.Namespace) -> SmsStandIn:
    return SmsStandIn(
        account_sid=args.sid,
        auth_token=args.auth_token,
        invalid=set(args.invalid),
        callbacks=args.callbacks,
    )


if __name__ == "__main__":
    serve_main("Twilio Messages API stand-in", _args, _build)
