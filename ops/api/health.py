"""The API process's probes and metrics: ``/healthz``, ``/readyz`` and ``/metrics``.

- ``/healthz``: the process answers (liveness; checks nothing else, so a Redis or broker
  outage never gets healthy API pods restarted).
- ``/readyz``: Redis answers a PING and the Kafka producer gets cluster metadata from a
  broker, each within :data:`CHECK_TIMEOUT_S`; 503 with the failed checks named otherwise.
- ``/metrics``: the API's own series in the Prometheus text format, from a registry of
  its own (the worker's pipeline series live in ``ops.metrics`` and are served by the
  worker): requests by route template, method and status class, request latency, and
  refusals by reason.

Labels are bounded and carry no caller data: the route *template* (``/alerts/{rid}``,
never the path with its ids or tokens), the method from a fixed list, the status class
and a refusal reason named after the status code. No IPs, tokens, phones or emails.

The three routes are unauthenticated and take no rate-limit dependency, so probes and
scrapes never compete with public traffic for a bucket.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from ops.api.context import ApiContext

CHECK_TIMEOUT_S = 2.0

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # memory, CPU, open files of the API process
REQUESTS = Counter(
    "tocsin_api_requests_total",
    "HTTP requests by route template, method and status class",
    ["route", "method", "status"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "tocsin_api_request_seconds",
    "Time from a request's arrival to the end of its response, by route template",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
REFUSALS = Counter(
    "tocsin_api_refusals_total",
    "Requests refused with a 4xx, by reason (named after the status code)",
    ["reason"],
    registry=REGISTRY,
)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_REASONS = {
    400: "bad_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 409: "conflict", 410: "gone", 413: "too_large",
    415: "unsupported_media_type", 422: "invalid", 429: "rate_limited",
}  # fmt: skip

router = APIRouter(tags=["ops"])


def route_label(scope: Scope) -> str:
    """The matched route's template, ``<mount>/*`` under a mount, else ``unmatched``."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    if scope.get("endpoint") is not None:  # a mounted app (the console's static files)
        return f"{scope.get('root_path', '')}/*"
    return "unmatched"


class RequestMetrics:
    """ASGI middleware counting every HTTP request once its response has started."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception escaping the app becomes a 500 further out

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            observe(scope, status, time.perf_counter() - started)


def observe(scope: Scope, status: int, seconds: float) -> None:
    """Count one finished request."""
    route = route_label(scope)
    method = scope.get("method", "")
    REQUESTS.labels(route, method if method in _METHODS else "other", f"{status // 100}xx").inc()
    REQUEST_SECONDS.labels(route).observe(seconds)
    if 400 <= status < 500:
        REFUSALS.labels(_REASONS.get(status, "other_4xx")).inc()


async def _check(what: Any) -> str:
    """``ok`` or why not (the exception's type only: its text may name hosts)."""
    try:
        result = await asyncio.wait_for(what, CHECK_TIMEOUT_S)
    except TimeoutError:
        return f"no answer within {CHECK_TIMEOUT_S:g} s"
    except Exception as exc:
        return f"unreachable ({type(exc).__name__})"
    return "ok" if result else "no answer"


async def readiness(ctx: ApiContext) -> dict[str, str]:
    """Check -> ``ok`` or the reason it failed, for every dependency of the API."""
    client = ctx.bus.producer.client  # aiokafka: True once a broker answered metadata
    redis, kafka = await asyncio.gather(
        _check(ctx.redis.ping()), _check(client.force_metadata_update())
    )
    return {"redis": redis, "kafka": kafka}


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process is up and serving."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a dependency is not reachable"}})
async def readyz(request: Request) -> JSONResponse:
    """Readiness: Redis reachable and the Kafka producer connected (503 naming what failed)."""
    ctx: ApiContext | None = getattr(request.app.state, "ctx", None)
    if ctx is None:
        checks = {"startup": "not started"}
    else:
        checks = await readiness(ctx)
    failed = sorted(name for name, state in checks.items() if state != "ok")
    return JSONResponse(
        {"ready": not failed, "checks": checks, "failed": failed},
        status_code=503 if failed else 200,
    )


@router.get("/metrics", response_class=Response)
async def metrics() -> Response:
    """The API's Prometheus metrics (text exposition format)."""
    return Response(generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})


def install(app: FastAPI) -> None:
    """Add the probe routes and the request-counting middleware (call it last, so the
    middleware is outermost and also counts refusals made by other middleware)."""
    app.include_router(router)
    app.add_middleware(RequestMetrics)
