"""Rate limits the existing tests do not reach: per citizen across addresses, per token
across addresses, the SMS webhook per IP, and failed sign-ins per IP."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from ops.api import create_app
from tests.api.conftest import Api, make_settings, start_api, stop_api

pytestmark = pytest.mark.integration


def from_ip(api: Api, ip: str) -> httpx.AsyncClient:
    """A client of the same API whose requests come from ``ip``."""
    app = create_app(api.settings, context=api.ctx)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(ip, 40000)),
                             base_url="http://api")


async def test_limits_follow_the_caller_not_the_address(broker: str, redis_url: str,
                                                        tmp_path: Path, data_dir: Path) -> None:
    settings = make_settings(broker, redis_url, tmp_path, data_dir, api_rate_citizen_per_min=3,
                             api_rate_token_per_min=3, api_rate_webhook_per_min=2,
                             api_rate_public_per_min=4)
    api = await start_api(settings)
    clients = [from_ip(api, f"10.0.0.{n}") for n in range(1, 6)]
    try:
        # A citizen token spread over five addresses still gets 3 requests a minute.
        r = await clients[0].post("/citizens", json={"push_token": "limit-device-token"})
        citizen = {"Authorization": f"Bearer {r.json()['token']}"}
        codes = [(await c.get("/citizens/me", headers=citizen)).status_code for c in clients]
        assert codes == [200, 200, 200, 429, 429]
        r = await clients[4].get("/citizens/me", headers=citizen)
        assert "this citizen" in r.json()["detail"] and "retry-after" in r.headers
        # So does a staff token.
        staff = api.auth("auditor")
        codes = [(await c.get("/me", headers=staff)).status_code for c in clients]
        assert codes == [200, 200, 200, 429, 429]
        assert "this token" in (await clients[0].get("/me", headers=staff)).json()["detail"]
        # The SMS webhook, per IP.
        codes = [(await clients[1].post("/webhooks/sms/inbound",
                                        data={"From": "+15550002222", "Body": "HELP"})
                  ).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        # Guessing credentials: failed sign-ins spend the address's public budget.
        guesser = clients[2]
        codes = [(await guesser.get("/me", headers={"Authorization": f"Bearer tocsin_{n}"})
                  ).status_code for n in range(5)]
        assert codes == [401, 401, 401, 401, 429]
        r = await guesser.get("/me", headers=api.auth("approver"))
        assert r.status_code == 200, "a valid token still works from that address"
        codes = [(await clients[3].get("/alerts")).status_code for _ in range(5)]
        assert codes == [401, 401, 401, 401, 429]
    finally:
        for client in clients:
            await client.aclose()
        await stop_api(api)
