"""The API process's probes and metrics: /healthz, /readyz, /metrics.

Real Redis and broker processes; a dependency outage is a stopped redis-server or
broker, not a stub.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ops.devstack import free_port
from streams.records import Subscription
from tests.api.conftest import Api, make_settings, start_api, stop_api, wait_for
from tests.integration.fault_stack import start_broker_behind, start_redis_aof
from tests.integration.tcpproxy import TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

PHONE = "+15557654321"
EMAIL = "someone@example.org"


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """label set -> value of every sample called ``name`` in an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def _index_size(api: Api, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return api.ctx.index.size() >= n

    return check


def value(text: str, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels`` (0 when absent)."""
    return samples(text, name).get(tuple(sorted(labels.items())), 0.0)


async def test_probes_answer_and_metrics_count_requests_by_route_template(
    shared_api: Api,
) -> None:
    api = shared_api
    r = await api.call("GET", "/healthz")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    r = await api.call("GET", "/readyz")
    assert r.status_code == 200, r.text
    assert r.json() == {"ready": True, "checks": {"redis": "ok", "kafka": "ok"}, "failed": []}

    before = (await api.call("GET", "/metrics")).text
    secret_id = "rec-0123456789abcdef"
    # An id in the path, a refusal without a token, a bad token, an unknown path
    # carrying contact details, and a refused citizen sign-up with a phone and email.
    assert (await api.call("GET", f"/alerts/{secret_id}", "originator")).status_code == 404
    assert (await api.call("GET", "/alerts")).status_code == 401
    bad = {"Authorization": "Bearer tk_not-a-real-token"}
    assert (await api.call("GET", "/alerts", headers=bad)).status_code == 401
    assert (await api.call("GET", f"/nowhere/{PHONE}/{EMAIL}")).status_code == 404
    r = await api.call("POST", "/citizens", json={"phone": PHONE, "email": EMAIL, "lon": "x"})
    assert 400 <= r.status_code < 500

    r = await api.call("GET", "/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    requests = "tocsin_api_requests_total"
    assert value(text, requests, route="/readyz", method="GET", status="2xx") >= 1
    grew = value(text, requests, route="/alerts/{rec_id}", method="GET", status="4xx") - value(
        before, requests, route="/alerts/{rec_id}", method="GET", status="4xx"
    )
    assert grew == 1
    assert value(text, requests, route="unmatched", method="GET", status="4xx") >= 1
    unauthenticated = "tocsin_api_refusals_total"
    assert (
        value(text, unauthenticated, reason="unauthenticated")
        - value(before, unauthenticated, reason="unauthenticated")
        == 2
    )
    assert value(text, "tocsin_api_request_seconds_count", route="/alerts") >= 2
    assert "process_resident_memory_bytes" in text
    # Nothing a caller sent ends up in a label.
    for leaked in (secret_id, PHONE, EMAIL, "tk_not-a-real-token", "127.0.0.1", "testclient"):
        assert leaked not in text, leaked


async def test_readyz_names_the_dependency_that_is_down_and_probes_skip_rate_limits(
    tmp_path: Path, data_dir: Path
) -> None:
    port = free_port()
    redis = start_redis_aof(tmp_path / "redis", port)
    proxy_port = free_port()  # the broker behind a proxy that can cut it off
    broker = start_broker_behind(tmp_path / "broker", proxy_port)
    proxy = TcpProxy("127.0.0.1", broker.port, port=proxy_port).start()
    settings = make_settings(broker.url, redis.url, tmp_path, data_dir, api_rate_public_per_min=2)
    api = await start_api(settings)
    try:
        # The public limit is 2 a minute for this client; probes are never limited.
        codes = [(await api.call("GET", "/public/alerts")).status_code for _ in range(3)]
        assert codes[-1] == 429, codes
        for _ in range(5):
            assert (await api.call("GET", "/healthz")).status_code == 200
            assert (await api.call("GET", "/readyz")).status_code == 200

        # Kafka first: the readers' failed fetches finish their retry back-off while the
        # Redis part runs (aiokafka's consumer.stop() raises if one is still backing off).
        proxy.cut()  # the broker is gone: connections reset, new ones refused
        r = await api.call("GET", "/readyz")
        assert r.status_code == 503
        assert r.json()["failed"] == ["kafka"], r.text
        proxy.restore()
        r = await api.call("GET", "/readyz")
        assert r.status_code == 200, r.text
        # The API's readers fetch again too (a new subscription reaches the preview index).
        await api.ctx.bus.subscriptions([Subscription(id="s-after-cut", kind="place",
                                                      lon=-118.25, lat=34.05)])  # fmt: skip
        await wait_for(_index_size(api, 1), 30, "the preview index reading again")

        redis.stop()
        r = await api.call("GET", "/readyz")
        assert r.status_code == 503
        body = r.json()
        assert body["ready"] is False and body["failed"] == ["redis"], body
        assert body["checks"]["kafka"] == "ok" and "127.0.0.1" not in r.text
        assert (await api.call("GET", "/healthz")).status_code == 200  # alive all the same

        redis = start_redis_aof(tmp_path / "redis", port)  # back on the same port
        r = await api.call("GET", "/readyz")
        assert r.status_code == 200, r.text
        text = (await api.call("GET", "/metrics")).text
        assert value(text, "tocsin_api_requests_total", route="/readyz", method="GET",
                     status="5xx") >= 2  # fmt: skip
        assert value(text, "tocsin_api_refusals_total", reason="rate_limited") >= 1
    finally:
        await asyncio.wait_for(stop_api(api), 30)
        redis.stop()
        proxy.stop()
        broker.stop()
