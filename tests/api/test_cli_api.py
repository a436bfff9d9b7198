"""``tocsin api`` serves the API (and its OpenAPI document) against the configured
broker and Redis; without them it says what is missing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ops.devstack import free_port
from tests.api.conftest import wait_for

pytestmark = pytest.mark.integration


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TOCSIN_") and k not in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL")}
    env.update(extra)
    return env


def test_tocsin_api_needs_a_broker_and_redis() -> None:
    result = subprocess.run([sys.executable, "-m", "ops.cli", "api"], env=_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "KAFKA_BOOTSTRAP_SERVERS" in result.stderr and "REDIS_URL" in result.stderr


async def test_tocsin_api_serves_openapi(broker: str, redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = _env(KAFKA_BOOTSTRAP_SERVERS=broker, REDIS_URL=redis_url,
               TOCSIN_API_BOOTSTRAP_ADMIN_TOKEN="tocsin_bootstrap-admin-token",
               TOCSIN_API_TOKEN_SECRET="cli-test-secret", TOCSIN_PARTITIONS="2")
    log = (tmp_path / "api.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ops.cli", "api", "--host", "127.0.0.1", "--port", str(port),
        env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:

            async def up() -> bool:
                try:
                    return (await client.get("/openapi.json")).status_code == 200
                except httpx.TransportError:
                    return proc.returncode is not None  # died: stop waiting, assert below

            await wait_for(up, 60, "tocsin api to answer")
            assert proc.returncode is None, (tmp_path / "api.log").read_text()
            spec = (await client.get("/openapi.json")).json()
            for path in ("/alerts", "/alerts/{rec_id}/approve", "/citizens", "/audit/verify",
                         "/public/alerts", "/ingest/cap", "/webhooks/sms/inbound"):
                assert path in spec["paths"], path
            r = await client.get("/me", headers={
                "Authorization": "Bearer tocsin_bootstrap-admin-token"})
            assert r.status_code == 200 and r.json()["roles"] == ["admin"]
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
        log.close()
