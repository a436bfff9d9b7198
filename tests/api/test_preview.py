"""The preview is the truth: its counts equal a brute-force count over every subscription.

Subscriptions go onto the real ``subscriptions`` topic; the API's all-partition index
reads them; the brute force below loops over the same records with shapely and the
delivery preferences (test opt-in, minimum severity, quiet hours).
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from shapely.geometry import Point

from ops.api.compose import build_alert, resolve
from ops.api.models import DraftIn
from streams.pipeline import in_quiet_hours
from streams.publish import produce, subscription_records
from streams.records import CHANNELS, Subscription, severity_rank
from streams.topics import SUBSCRIPTIONS
from tests.api.conftest import Api, draft, wait_for

pytestmark = pytest.mark.integration
CENTRE = (-118.25, 34.05)  # downtown Los Angeles
ZONES = {"FIPS:06037": True, "SAME:006109": False, "FIPS:24031": False}  # overlaps the circle?


def population(n: int) -> list[Subscription]:
    rng = np.random.default_rng(6)
    subs = []
    for i in range(n):
        channels = [c for c in CHANNELS if rng.random() < 0.5] or ["push"]
        common: dict[str, Any] = dict(
            channels=channels, language=str(rng.choice(["en", "es", "fr"])),
            min_severity=str(rng.choice(["Unknown", "Moderate", "Extreme"])),
            accept_tests=bool(rng.random() < 0.3),
            quiet_hours="00:00-23:59" if rng.random() < 0.2 else "",
            timezone="America/Los_Angeles")
        if i % 7 == 0:
            zone = list(ZONES)[i % 3]
            subs.append(Subscription(id=f"z{i}", kind="zone", zone=zone, **common))
        else:
            lon = CENTRE[0] + float(rng.uniform(-0.25, 0.25))
            lat = CENTRE[1] + float(rng.uniform(-0.2, 0.2))
            # Citizens with two places: "<citizen>:<place>" ids.
            sid = f"c{i // 2}:{'home' if i % 2 else 'work'}"
            subs.append(Subscription(id=sid, kind="place", lon=lon, lat=lat, **common))
    return subs


def brute_force(subs: list[Subscription], area: Any, status: str,
                severity: str) -> tuple[int, set[str], Counter[str], Counter[str]]:
    now = datetime.now(UTC)
    rank = severity_rank(severity)
    reached, citizens, channels = 0, set(), Counter[str]()
    pairs: set[tuple[str, str]] = set()
    for s in subs:
        inside = ZONES[s.zone] if s.kind == "zone" else area.intersects(Point(s.lon, s.lat))
        if not inside:
            continue
        if status != "Actual" and not s.accept_tests:
            continue
        if rank < severity_rank(s.min_severity):
            continue
        if s.quiet_hours and rank < severity_rank("Severe") and in_quiet_hours(
                s.quiet_hours, s.timezone, now):
            continue
        reached += 1
        citizens.add(s.id.split(":")[0])
        channels.update(s.channels)
        pairs.update((s.id.split(":")[0], c) for c in s.channels)
    per_citizen = Counter(c for _, c in pairs)
    return reached, citizens, channels, per_citizen


@pytest.mark.parametrize(("status", "severity"), [
    ("Actual", "Severe"), ("Actual", "Moderate"), ("Test", "Extreme"), ("Exercise", "Minor")])
async def test_preview_counts_equal_a_brute_force_count(api: Api, status: str,
                                                        severity: str) -> None:
    subs = population(700)
    await produce(api.settings.kafka_bootstrap_servers, SUBSCRIPTIONS, subscription_records(subs))

    async def indexed() -> bool:
        health = (await api.client.get("/health")).json()
        return bool(health["indexed_subscriptions"] == len(subs) and health["index_caught_up"])

    await wait_for(indexed, 30, "the API's index to hold every subscription")
    body = draft(status=status, severity=severity,
                 area={"circle": {"lon": CENTRE[0], "lat": CENTRE[1], "radius_km": 12}},
                 translations=[{"language": "es", "headline": "Quédese en casa"}])
    r = await api.call("POST", "/alerts/preview", "originator", json=body)
    assert r.status_code == 200, r.text
    preview = r.json()

    org = await api.ctx.identity.get_org("demo-county")
    assert org is not None
    alert, _ = build_alert(DraftIn.model_validate(body), org, api.ctx.gazetteer,
                           identifier="oracle", sent=datetime.now(UTC))
    area, _ = resolve(alert, api.ctx.gazetteer)
    reached, citizens, channels, per_citizen = brute_force(subs, area, status, severity)
    assert reached > 0, "the fixture should reach people"
    assert preview["reach"]["subscriptions"] == reached
    assert preview["reach"]["citizens"] == len(citizens)
    assert preview["reach"]["channels"] == {c: channels.get(c, 0) for c in CHANNELS}
    assert preview["reach"]["citizen_channels"] == {c: per_citizen.get(c, 0) for c in CHANNELS}
    assert preview["is_test"] is (status != "Actual")
    # Rendered messages: every channel, in the alert's languages and the readers' ones.
    rendered = {(m["channel"], m["language"]) for m in preview["messages"]}
    assert ("sms", "es") in rendered and ("email", "en-US") in rendered
    sms_es = next(m for m in preview["messages"] if m["channel"] == "sms"
                  and m["language"] == "es")
    assert "Quédese en casa" in sms_es["body"] and sms_es["sms_segments"] >= 1
    if status != "Actual":
        assert all(m["body"].startswith(status.upper()) for m in preview["messages"]
                   if m["channel"] == "sms"), "a test must never read like a real alert"
