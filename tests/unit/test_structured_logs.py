"""ops/logging.py: JSON lines, the alert id as correlation id, contact details scrubbed."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from ops.logging import JsonFormatter, RedactingFilter, TextFormatter, bind, log_context, redact

Captured = tuple[logging.Logger, io.StringIO]
FCM_TOKEN = "dXNlcl9kZXZpY2VfMTIz:APA91bH" + "k3JxQ_v-9ZlmW2pQ7rT" * 7


@pytest.fixture
def captured() -> Iterator[Captured]:
    """A logger writing through the production handler setup into a string."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("tests.structured")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, out
    logger.handlers.clear()


def lines(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_each_record_is_one_json_object_with_the_bound_alert_and_stage(captured: Captured) -> None:
    logger, out = captured
    with log_context("match", "3f2a9c01d4e5b6a7c8d9"):
        logger.info("shard %d matched %d subscribers", 2, 40, extra={"partition": 2})
    logger.warning("between alerts")
    first, second = lines(out)
    assert first["msg"] == "shard 2 matched 40 subscribers"
    assert first["alert_id"] == "3f2a9c01d4e5b6a7c8d9" and first["stage"] == "match"
    assert first["level"] == "info" and first["logger"] == "tests.structured"
    assert first["partition"] == 2 and first["ts"].endswith("Z")
    assert second["alert_id"] is None and second["stage"] is None


def test_contact_details_are_scrubbed_from_message_extras_and_traceback(captured: Captured) -> None:
    logger, out = captured
    contacts = ["+15550000001", "+44 20 7946 0958", "(555) 123-4567", "p1@example.org", FCM_TOKEN]
    try:
        raise ValueError(f"provider echoed {contacts[0]} and {contacts[3]}")
    except ValueError:
        logger.exception(
            "send to %s, %s, %s failed", *contacts[1:3], FCM_TOKEN, extra={"to": contacts[3]}
        )
    text = out.getvalue()
    for contact in contacts:
        assert contact not in text
    record = lines(out)[0]
    assert record["msg"].count("<redacted>") == 3 and record["to"] == "<redacted>"
    assert "ValueError: provider echoed <redacted> and <redacted>" in record["exc"]


def test_url_encoded_contacts_in_access_log_lines_are_scrubbed() -> None:
    line = "GET /v1/citizens/lookup?phone=%2B15550000001&email=p1%40example.org HTTP/1.1"
    assert redact(line) == "GET /v1/citizens/lookup?phone=<redacted>&email=<redacted> HTTP/1.1"


def test_redaction_leaves_operational_numbers_and_alert_keys_alone() -> None:
    text = (
        "alert 3f2a9c01d4e5b6a7c8d9 offset 1718000000 partition 11 sent 2024-05-01T10:00:00"
        "+00:00 took 0.0123 s from 10.0.0.12:9092 sub-00042"
    )
    assert redact(text) == text


def test_concurrent_agents_keep_their_own_alert_ids(captured: Captured) -> None:
    """Each faust actor is its own task: one alert's id never leaks into another's lines."""
    logger, out = captured

    async def actor(alert: str, started: asyncio.Event, other: asyncio.Event) -> None:
        bind("send", alert)
        started.set()
        await other.wait()  # interleave with the other actor
        logger.info("alert %s sent", alert)

        async def child() -> None:  # tasks the handler starts inherit the binding
            logger.info("lease renewed for %s", alert)

        await asyncio.create_task(child())

    async def main() -> None:
        a, b = asyncio.Event(), asyncio.Event()
        await asyncio.gather(actor("aaaa", a, b), actor("bbbb", b, a))

    asyncio.run(main())
    records = lines(out)
    assert sorted(r["alert_id"] for r in records) == ["aaaa", "aaaa", "bbbb", "bbbb"]
    for record in records:
        assert record["alert_id"] in record["msg"] and record["stage"] == "send"


def test_text_format_carries_the_same_fields_for_people() -> None:
    record = logging.LogRecord(
        "streams.app", logging.INFO, __file__, 1, "to %s", ("a@b.org",), None
    )
    with log_context("ingest", "3f2a9c01d4e5b6a7c8d9"):
        RedactingFilter().filter(record)
    line = TextFormatter().format(record)
    assert "INFO" in line and "[ingest 3f2a9c01d4e5b6a7c8d9]" in line
    assert line.endswith("streams.app [ingest 3f2a9c01d4e5b6a7c8d9]: to <redacted>")
