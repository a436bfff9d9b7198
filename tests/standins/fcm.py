"""A local server speaking the FCM HTTP v1 send API, and Google's OAuth2 token endpoint.

``POST /v1/projects/{project}/messages:send`` with ``Authorization: Bearer <token>``
and a JSON ``{"message": {...}}``, validated like the real API (one target, known
fields, string-valued ``data``, Android priority/TTL formats, APNs header values).
Answers:

- ``200 {"name": "projects/<p>/messages/<n>"}``;
- errors in Google's JSON error format (``{"error": {"code", "message", "status",
  "details": [FcmError, BadRequest...]}}``): the invalid-token body is the one FCM
  sent in ``data/other/fcm_v1_batch_response_partial_failure.txt``; UNREGISTERED
  (404), QUOTA_EXCEEDED (429 + ``Retry-After``), UNAVAILABLE (503), UNAUTHENTICATED
  (401) and PERMISSION_DENIED (403, wrong project) follow the same format.

``POST /token`` is a service-account token endpoint (the JWT-bearer grant google-auth
uses): point a service-account file's ``token_uri`` at it and real google-auth /
firebase-admin credentials work against the stand-in.

Run in-process (``FcmStandIn(...).running()``) or as a process:
``python -m tests.standins.fcm --port N --project P --token T [--share-503 0.1 ...]``.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from tests.standins import DATA_OTHER, StandIn, serve_main

__all__ = ["FcmStandIn", "service_account"]

FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
_MESSAGE_FIELDS = frozenset(
    {"name", "data", "notification", "android", "webpush", "apns", "fcm_options"}
    | {"token", "topic", "condition"}
)
# Any of these lets a service account send (firebase-admin asks for the broad ones).
SEND_SCOPES = frozenset(
    "https://www.googleapis.com/auth/" + s
    for s in ("firebase.messaging", "firebase", "cloud-platform")
)
_DURATION = re.compile(r"^\d+(\.\d{1,9})?s$")
_TOKEN = re.compile(r"^[A-Za-z0-9_:\-.]{8,4096}$")


def _sample_errors() -> list[dict[str, Any]]:
    """The JSON error bodies of FCM's real batch answer (one per failed part)."""
    text = (DATA_OTHER / "fcm_v1_batch_response_partial_failure.txt").read_text()
    bodies = []
    for part in text.split("--test_boundary"):
        start = part.find("{")
        if start >= 0 and '"error"' in part:
            bodies.append(json.loads(part[start:]))
    return bodies


INVALID_TOKEN = json.dumps(_sample_errors()[0]).encode()


def google_error(
    code: int, status: str, message: str, fcm_code: str | None = None, **extra: Any
) -> bytes:
    """A Google API error body."""
    details: list[dict[str, Any]] = []
    if fcm_code:
        details.append({"@type": FCM_ERROR, "errorCode": fcm_code})
    if "violations" in extra:
        details.append({"@type": BAD_REQUEST, "fieldViolations": extra["violations"]})
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return json.dumps({"error": error}).encode()


UNAUTHENTICATED = google_error(
    401,
    "UNAUTHENTICATED",
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
    "cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project.",
)
UNREGISTERED = google_error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED")
QUOTA = google_error(
    429,
    "RESOURCE_EXHAUSTED",
    "Quota exceeded for quota metric 'Send requests' and limit 'Send requests per minute' "
    "of service 'fcm.googleapis.com'.",
    "QUOTA_EXCEEDED",
)
UNAVAILABLE = google_error(
    503, "UNAVAILABLE", "The service is currently unavailable.", "UNAVAILABLE"
)


def _invalid(field_path: str, description: str) -> bytes:
    return google_error(
        400,
        "INVALID_ARGUMENT",
        description,
        "INVALID_ARGUMENT",
        violations=[{"field": field_path, "description": description}],
    )


def validate(message: Any) -> bytes | None:
    """The 400 body FCM would answer for a malformed ``message``, or ``None``."""
    if not isinstance(message, dict):
        return _invalid("message", "Invalid JSON payload received. 'message' is not an object.")
    unknown = sorted(set(message) - _MESSAGE_FIELDS)
    if unknown:
        return _invalid(
            "message",
            f"Invalid JSON payload received. Unknown name \"{unknown[0]}\" at 'message': "
            "Cannot find field.",
        )
    targets = [k for k in ("token", "topic", "condition") if message.get(k)]
    if len(targets) != 1:
        return _invalid("message", "Exactly one of token, topic or condition must be specified.")
    data = message.get("data", {})
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        return _invalid("message.data", "Invalid value at 'message.data': values must be strings")
    android = message.get("android") or {}
    if android.get("priority", "normal").lower() not in ("normal", "high"):
        return _invalid("message.android.priority", "Invalid value at 'message.android.priority'")
    if "ttl" in android and not _DURATION.match(str(android["ttl"])):
        return _invalid("message.android.ttl", "Invalid value at 'message.android.ttl'")
    headers = (message.get("apns") or {}).get("headers") or {}
    if not all(isinstance(v, str) for v in headers.values()):
        return _invalid("message.apns.headers", "Invalid value at 'message.apns.headers'")
    if headers.get("apns-priority", "10") not in ("1", "5", "10"):
        return _invalid("message.apns.headers", "Invalid apns-priority")
    notification = message.get("notification") or {}
    if not isinstance(notification, dict):
        return _invalid("message.notification", "Invalid value at 'message.notification'")
    return None


@dataclass
class FcmStandIn(StandIn):
    """The FCM stand-in; ``unregistered`` tokens answer UNREGISTERED."""

    project: str = "tocsin-test"
    tokens: set[str] = field(default_factory=lambda: {"standin-token"})
    unregistered: set[str] = field(default_factory=set)
    token_lifetime_s: int = 3600
    issued: int = 0  # access tokens handed out by /token

    def routes(self, app: web.Application) -> None:
        """The send endpoint and the token endpoint."""
        app.router.add_post("/v1/projects/{project}/messages:send", self.send)
        app.router.add_post("/token", self.token)

    async def send(self, request: web.Request) -> web.Response:
        """``messages:send``."""
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
            return self.answer(401, UNAUTHENTICATED, {"WWW-Authenticate": 'Bearer realm="x"'})
        if request.match_info["project"] != self.project:
            return self.answer(
                403,
                google_error(
                    403,
                    "PERMISSION_DENIED",
                    "Permission 'cloudmessaging.messages.create' denied on resource "
                    f"'//cloudresourcemanager.googleapis.com/projects/"
                    f"{request.match_info['project']}' (or it may not exist).",
                ),
            )
        if not request.content_type.startswith("application/json"):
            return self.answer(400, _invalid("", "Invalid JSON payload received."))
        try:
            payload = msgspec.json.decode(await request.read())
        except msgspec.DecodeError:
            return self.answer(400, _invalid("", "Invalid JSON payload received."))
        if not isinstance(payload, dict) or set(payload) - {"message", "validate_only"}:
            return self.answer(400, _invalid("", "Invalid JSON payload received."))
        message: dict[str, Any] = payload.get("message")  # type: ignore[assignment]
        problem = validate(message)
        if problem is not None:  # ... so from here on, message is a dict
            return self.answer(400, problem)
        fault = await self.injected(str(message.get("token", "")))
        if fault == "close":
            return self.drop(request)
        retry = {"Retry-After": str(int(self.faults.retry_after_s))}
        if fault == "503":
            return self.answer(503, UNAVAILABLE, retry if self.faults.retry_after_on_503 else None)
        if fault == "429":
            return self.answer(429, QUOTA, retry)
        token = message.get("token", "")
        if token and not _TOKEN.match(token):
            return self.answer(400, INVALID_TOKEN)
        if token in self.unregistered:
            return self.answer(404, UNREGISTERED)
        if payload.get("validate_only"):
            fake = f"projects/{self.project}/messages/fake_message_id"
            return self.answer(200, json.dumps({"name": fake}).encode())
        self.record(request, token, (message.get("data") or {}).get("alert_key", ""), message)
        name = f"projects/{self.project}/messages/{len(self.received)}"
        return self.answer(200, b'{"name": "' + name.encode() + b'"}')

    async def token(self, request: web.Request) -> web.Response:
        """OAuth2 JWT-bearer grant, as google-auth's service-account flow sends it."""
        form = await request.post()
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        try:
            _, claims_b64, _ = str(form.get("assertion", "")).split(".")
            claims = json.loads(base64.urlsafe_b64decode(claims_b64 + "=" * (-len(claims_b64) % 4)))
        except ValueError:
            return web.json_response({"error": "invalid_grant"}, status=400)
        scopes = set(str(claims.get("scope", "")).split())
        if claims.get("exp", 0) < time.time() or not scopes & SEND_SCOPES:
            return web.json_response(
                {"error": "invalid_scope", "error_description": "Invalid OAuth scope"}, status=400
            )
        access = f"ya29.standin-{secrets.token_hex(16)}"
        self.tokens.add(access)
        self.issued += 1
        return web.json_response(
            {"access_token": access, "expires_in": self.token_lifetime_s, "token_type": "Bearer"}
        )


def service_account(path: Path, token_uri: str, project: str) -> Path:
    """A service-account key file whose token endpoint is the stand-in."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    info = {
        "type": "service_account",
        "project_id": project,
        "private_key_id": "standin-key",
        "private_key": pem,
        "client_email": f"tocsin@{project}.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": token_uri,
    }
    path.write_text(json.dumps(info))
    return path


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--project", default="tocsin-test")
    parser.add_argument("--token", action="append", default=[])
    parser.add_argument("--unregistered", action="append", default=[])


def _build(args: argparse.Namespace) -> FcmStandIn:
    return FcmStandIn(
        project=args.project,
        tokens=set(args.token or ["standin-token"]),
        unregistered=set(args.unregistered),
    )


if __name__ == "__main__":
    serve_main("FCM HTTP v1 stand-in", _args, _build)
