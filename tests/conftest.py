"""Session fixtures: real service processes on free loopback ports.

``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` in the environment point the suite at
external services instead; otherwise the fixtures start tansu, redis-server and an
aiosmtpd SMTP server through ``ops.devstack`` and stop them at the end.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from ops.devstack import Service, start_broker, start_redis, start_smtp

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The repo's committed data directory."""
    return DATA


@pytest.fixture(scope="session")
def services_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def redis_server(services_dir: Path) -> Iterator[str]:
    """URL of a real redis-server for the whole session."""
    external = os.environ.get("REDIS_URL")
    if external:
        yield external
        return
    service = start_redis(services_dir / "redis")
    yield service.url
    service.stop()


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """A clean Redis database for one test."""
    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    client.close()
    yield redis_server


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[str]:
    """Bootstrap address of a fresh, empty Kafka-compatible broker for one test.

    tansu keeps topics in memory and starts in milliseconds, so every test gets its own
    broker and never sees another test's records or consumer groups.
    """
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    service = start_broker(tmp_path / "broker")
    yield service.url
    service.stop()


@pytest.fixture
def smtp_server(tmp_path: Path) -> Iterator[Service]:
    """A real aiosmtpd SMTP server; ``service.extra['maildir']`` holds what it received."""
    service = start_smtp(tmp_path / "smtp")
    yield service
    service.stop()
