"""Fixtures for the HTTP API tests: a real redis-server and tansu broker, the real app.

``api`` starts an :class:`ApiContext` (Redis, Kafka producer, preview index, receipt
reader) against the per-test broker and a clean Redis database, seeds the demo
organisation, and talks to the app through httpx's ASGI transport (no sockets).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from ops.api import ApiContext, create_app, seed_demo
from ops.settings import Settings

DEMO_AREA = {"codes": ["FIPS:06037"], "desc": "Los Angeles County"}


def make_settings(broker: str, redis_url: str, tmp_path: Path, data_dir: Path,
                  **overrides: Any) -> Settings:
    """Settings for one API test (2 partitions, outbox in tmp_path, high rate limits)."""
    base: dict[str, Any] = dict(
        kafka_bootstrap_servers=broker, redis_url=redis_url, partitions=2,
        outbox_path=tmp_path / "outbox.jsonl", data_dir=data_dir,
        api_token_secret="test-secret-not-for-production", api_preview_wait_s=30.0,
        api_rate_token_per_min=10_000, api_rate_public_per_min=10_000,
        api_rate_citizen_per_min=10_000, api_rate_webhook_per_min=10_000,
        broker_rebalance_timeout_s=2.0,
    )
    base.update(overrides)
    return Settings(**base)


def draft(**overrides: Any) -> dict[str, Any]:
    """A valid Actual draft over Los Angeles County (override any field)."""
    body: dict[str, Any] = {
        "status": "Actual", "event": "Civil Emergency", "event_code": "CEM",
        "category": "Safety", "severity": "Severe", "urgency": "Immediate",
        "certainty": "Observed", "headline": "Shelter in place",
        "description": "A chemical leak near the port.", "instruction": "Stay indoors.",
        "area": DEMO_AREA, "expires_in_minutes": 60,
    }
    body.update(overrides)
    return body


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll an async condition until it holds; fail naming ``what`` after ``timeout``."""
    import asyncio

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Api:
    """A running API: its context, an ASGI client, and the demo tokens."""

    ctx: ApiContext
    client: httpx.AsyncClient
    tokens: dict[str, str]
    settings: Settings
    extra: dict[str, Any] = field(default_factory=dict)

    def auth(self, role: str) -> dict[str, str]:
        """Authorization header for a demo role ('' for none)."""
        return {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}

    async def call(self, method: str, path: str, role: str = "", **kw: Any) -> httpx.Response:
        """One request as ``role``."""
        headers = {**self.auth(role), **kw.pop("headers", {})}
        return await self.client.request(method, path, headers=headers, **kw)


async def start_api(settings: Settings) -> Api:
    """Start a context and client for ``settings`` (the caller closes both)."""
    ctx = await ApiContext.start(settings)
    app = create_app(settings, context=ctx)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")
    tokens = await seed_demo(ctx.identity)
    return Api(ctx, client, tokens, settings)


async def stop_api(api: Api) -> None:
    """Close the client and the context."""
    await api.client.aclose()
    await api.ctx.close()


@pytest.fixture
def api_settings(broker: str, redis_url: str, tmp_path: Path, data_dir: Path) -> Settings:
    """Settings against this test's broker and clean Redis."""
    return make_settings(broker, redis_url, tmp_path, data_dir)


@pytest_asyncio.fixture
async def api(api_settings: Settings) -> AsyncIterator[Api]:
    """The API against this test's broker and Redis, with the demo organisation seeded."""
    running = await start_api(api_settings)
    try:
        yield running
    finally:
        await stop_api(running)


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One broker for a whole module (tests that share one API instance)."""
    import os

    from ops.devstack import start_broker

    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    service = start_broker(tmp_path_factory.mktemp("module-broker"))
    yield service.url
    service.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_api(module_broker: str, redis_server: str, data_dir: Path,
                     tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Api]:
    """One API for a whole module (its Redis database is flushed first)."""
    import redis

    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    client.close()
    settings = make_settings(module_broker, redis_server, tmp_path_factory.mktemp("api"),
                             data_dir)
    running = await start_api(settings)
    try:
        yield running
    finally:
        await stop_api(running)


async def demo_cap(api: Api, identifier: str, **overrides: Any) -> bytes:
    """CAP XML from the demo organisation over Los Angeles County (as an agency sends)."""
    from datetime import UTC, datetime

    from ops.api.compose import build_alert, cap_document
    from ops.api.models import DraftIn

    org = await api.ctx.identity.get_org("demo-county")
    assert org is not None
    alert, _ = build_alert(DraftIn.model_validate(draft(**overrides)), org, api.ctx.gazetteer,
                           identifier=identifier, sent=datetime.now(UTC))
    return cap_document(alert)


async def composed(api: Api, state: str, **overrides: Any) -> str:
    """A record id in ``state`` (draft, pending, approved or sent), made through the API."""
    r = await api.call("POST", "/alerts", "originator", json=draft(**overrides))
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    if state == "draft":
        return rid
    r = await api.call("POST", f"/alerts/{rid}/submit", "originator")
    assert r.status_code == 200, r.text
    if state == "pending":
        assert r.json()["state"] == "pending_approval"
        return rid
    send = state == "sent"
    r = await api.call("POST", f"/alerts/{rid}/approve", "approver", json={"send": send})
    assert r.status_code == 200, r.text
    assert r.json()["state"] == ("sent" if send else "approved"), r.json()
    return rid
