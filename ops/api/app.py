"""The FastAPI application: routers, body limits, and one error shape for every refusal.

``create_app(settings)`` builds the app; its lifespan starts an :class:`ApiContext`
(Redis, Kafka producer, preview index, receipt reader) unless one is passed in (tests
and embedders that manage it themselves). Every refusal is a 4xx with
``{"detail": "<message>"}``; validation errors add ``errors`` with the field paths.
The OpenAPI document is at ``/openapi.json`` (interactive docs at ``/docs``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ops.api import admin, alerts, audit, citizens, ingest, preview, progress, public, webhooks
from ops.api import console as web_console
from ops.api import health as probes
from ops.api.context import ApiContext
from ops.api.otp import OtpNotifier
from ops.settings import Settings


class BodyLimit:
    """413 for request bodies over the limit, before the app reads them.

    ``/ingest/cap`` gets the pipeline's ``max_message_bytes`` (CAP messages with big
    polygons are legitimately large); everything else ``api_max_body_bytes``. A declared
    ``Content-Length`` is refused at once; a chunked body is counted as it arrives.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def limit(self, path: str) -> int:
        """The byte limit for a path."""
        if path.startswith("/ingest/"):
            return self.settings.max_message_bytes
        return self.settings.api_max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope["path"])
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(send, limit)
            return
        body = bytearray()
        more = True
        while more:  # read it all first so an oversize chunked body never reaches the app
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                await _too_large(send, limit)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: wait for the disconnect

        await self.app(scope, replay, send)


async def _too_large(send: Send, limit: int) -> None:
    payload = json.dumps({"detail": f"request body too large (limit {limit} bytes)"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def _body_refusal(request: Request, errors: Any) -> JSONResponse | None:
    """A clear refusal when the body as a whole is unusable (not JSON, wrong type, none)."""
    whole = [e for e in errors if tuple(e.get("loc", ()))[:1] == ("body",)
             and (len(e.get("loc", ())) == 1 or e.get("type") == "json_invalid")]
    if not whole:
        return None
    err = whole[0]
    if err.get("type") == "missing":
        return JSONResponse({"detail": "a JSON object body is required (with 'Content-Type: "
                                       "application/json')"}, status_code=422)
    ctype = request.headers.get("content-type", "")
    if "json" not in ctype.split(";")[0].lower():
        return JSONResponse({"detail": "unsupported content type "
                             f"{ctype.split(';')[0][:60] or '(none)'!r}: send the body as JSON "
                             "with 'Content-Type: application/json'"}, status_code=415)
    if err.get("type") == "json_invalid":
        loc = err.get("loc", ())
        where = f" at character {loc[1]}" if len(loc) > 1 else ""
        why = (err.get("ctx") or {}).get("error", "")
        return JSONResponse({"detail": f"invalid JSON{where}: {why}".rstrip(": ")},
                            status_code=422)
    return JSONResponse({"detail": "the body must be a JSON object"}, status_code=422)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    refusal = _body_refusal(request, errors)
    if refusal is not None:
        return refusal
    parts = []
    for err in errors[:10]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", ""))
    clean = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
             for e in errors[:50]]
    return JSONResponse({"detail": "invalid request: " + "; ".join(parts), "errors": clean},
                        status_code=422)


def create_app(settings: Settings, *, context: ApiContext | None = None,
               otp_notifier: OtpNotifier | None = None) -> FastAPI:
    """The Tocsin HTTP API for ``settings`` (see the module docstring)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if context is not None:
            app.state.ctx = context
            yield
            return
        ctx = await ApiContext.start(settings, otp_notifier=otp_notifier)
        app.state.ctx = ctx
        try:
            yield
        finally:
            await ctx.close()

    app = FastAPI(
        title="Tocsin API",
        version="1.0",
        summary="Emergency alerting: the manager's workflow, citizens, agencies, transparency",
        lifespan=lifespan,
    )
    if context is not None:
        app.state.ctx = context
    app.add_exception_handler(RequestValidationError, _validation_error)
    for module in (admin, preview, alerts, progress, audit, ingest, citizens, webhooks, public):
        app.include_router(module.router)
    web_console.install(app)  # the manager's console at /console/ and its base layer

    @app.get("/health", tags=["ops"])
    async def health(request: Request) -> dict[str, Any]:
        """Liveness plus the preview index's state (for probes and tests)."""
        ctx: ApiContext = request.app.state.ctx
        return {"ok": True, "indexed_subscriptions": ctx.index.size(),
                "index_caught_up": ctx.index.caught_up()}

    # Refuse oversize bodies before routing or parsing (only the request metrics,
    # added next, sit outside, so that they count these refusals too).
    app.add_middleware(BodyLimit, settings=settings)
    probes.install(app)  # /healthz, /readyz, /metrics; request metrics around everything
    return app
