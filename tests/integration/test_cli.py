"""The `tocsin` command line against the real broker and redis-server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from streams.records import Subscription, decoder
from streams.topics import HAZARDS_RAW, SUBSCRIPTIONS
from tests.integration.pipeline_helpers import read_topic

pytestmark = pytest.mark.integration


def tocsin(*args: str, broker: str = "", redis_url: str = "", cwd: Path | None = None):  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOCSIN_")}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    env.pop("REDIS_URL", None)
    if broker:
        env["KAFKA_BOOTSTRAP_SERVERS"] = broker
    if redis_url:
        env["REDIS_URL"] = redis_url
    env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args],
        env=env, capture_output=True, text=True, timeout=120, cwd=cwd,
    )  # fmt: skip


def test_subscribers_load_keeps_contacts_off_the_topic(
    broker: str, redis_url: str, tmp_path: Path
) -> None:
    csv_file = tmp_path / "people.csv"
    csv_file.write_text(
        "id,lon,lat,radius_m,channels,language,phone,email\n"
        "ana,-122.41,37.77,500,sms|email,es,+15550100001,ana@example.org\n"
        "bo,-122.27,37.80,,,en,,bo@example.org\n"
    )
    geo = tmp_path / "zones.geojson"
    geo.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": None,
         "properties": {"id": "cy", "zone": "FIPS:06075", "push_token": "tok-cy"}},
    ]}))  # fmt: skip
    for path in (csv_file, geo):
        result = tocsin("subscribers", "load", str(path), broker=broker, redis_url=redis_url)
        assert result.returncode == 0, result.stderr
    assert "loaded 2 subscription(s)" in tocsin(
        "subscribers", "load", str(csv_file), broker=broker, redis_url=redis_url
    ).stdout

    records = asyncio.run(read_topic(broker, SUBSCRIPTIONS, expected=5))
    raw = b"".join(r.value for r in records)
    for secret in (b"+15550100001", b"ana@example.org", b"tok-cy", b"bo@example.org"):
        assert secret not in raw, "a contact detail reached the subscriptions topic"
    subs = {r.key.decode(): decoder(Subscription).decode(r.value) for r in records}
    assert subs["ana"].channels == ["sms", "email"] and subs["ana"].radius_m == 500
    assert subs["bo"].channels == ["email"]  # inferred from the addresses given
    assert subs["cy"].zone == "FIPS:06075" and subs["cy"].channels == ["push"]
    client = redis.Redis.from_url(redis_url)
    assert client.hget("tocsin:contact:ana", "phone") == b"+15550100001"
    client.close()


def test_bad_subscriber_file_exits_2_with_one_line_naming_the_row(
    broker: str, redis_url: str, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("id,lon,lat\nok,1,1\nbroken,200,1\n")
    result = tocsin("subscribers", "load", str(bad), broker=broker, redis_url=redis_url)
    assert result.returncode == 2
    assert "line 3" in result.stderr and "out of range" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_publish_detects_content_types_and_records_the_source(
    broker: str, tmp_path: Path, data_dir: Path
) -> None:
    event = tmp_path / "event.json"
    event.write_text('{"identifier": "e1"}')
    cap = data_dir / "cap/cap12/oasiscap__spec12_A2_severe_thunderstorm.xml"
    result = tocsin("publish", str(cap), str(event), "--source", "nws", broker=broker)
    assert result.returncode == 0, result.stderr
    records = asyncio.run(read_topic(broker, HAZARDS_RAW, expected=2))
    types = sorted(dict(r.headers)["content-type"] for r in records)
    assert types == [b"application/cap+xml", b"application/json"]
    assert all(dict(r.headers)["source"] == b"nws" for r in records)


def test_commands_without_a_broker_explain_what_is_missing(tmp_path: Path) -> None:
    result = tocsin("publish", str(tmp_path / "x.xml"))
    assert result.returncode == 2
    assert "KAFKA_BOOTSTRAP_SERVERS is not set" in result.stderr


def test_publishing_a_missing_file_is_a_clear_error(broker: str, tmp_path: Path) -> None:
    result = tocsin("publish", str(tmp_path / "nope.xml"), broker=broker)
    assert result.returncode == 2 and "nope.xml" in result.stderr
