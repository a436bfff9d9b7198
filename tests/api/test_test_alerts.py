"""Test and Exercise alerts reach only citizens who opted in to tests - on real parts.

Citizens register through the API (places and zones, with and without the test
opt-in); a real worker process matches and fans out; the outbox shows who received
what. The Actual alert over the same area is the control: it reaches everyone, so the
opted-out citizens were in reach and were left out only because the alert was a test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from channels.outbox import read_outbox
from tests.api.conftest import draft, make_settings, start_api, stop_api
from tests.integration.pipeline_helpers import running_worker, wait_delivered, wait_indexed

pytestmark = pytest.mark.integration


async def test_tests_and_exercises_reach_only_the_opted_in(broker: str, redis_url: str,
                                                           tmp_path: Path,
                                                           data_dir: Path) -> None:
    settings = make_settings(broker, redis_url, tmp_path, data_dir)
    async with running_worker(settings, tmp_path) as worker:
        api = await start_api(settings)
        try:
            subs: dict[str, bool] = {}  # subscription id -> opted in to tests
            for n, (accept, where) in enumerate([
                    (True, {"places": [{"name": "Home", "lon": -118.25, "lat": 34.05}]}),
                    (False, {"places": [{"name": "Home", "lon": -118.26, "lat": 34.06}]}),
                    (True, {"zones": ["FIPS:06037"]}),
                    (False, {"zones": ["SAME:006037"]})]):
                r = await api.client.post("/citizens", json={
                    "push_token": f"device-token-{n:04d}", "prefs": {"accept_tests": accept},
                    **where})
                assert r.status_code == 201, r.text
                for sid in r.json()["subscriptions"]:
                    subs[sid] = accept
            assert len(subs) == 4
            await wait_indexed(settings, len(subs), worker)

            sent: dict[str, str] = {}
            for status in ("Test", "Exercise", "Actual"):
                r = await api.call("POST", "/alerts", "originator", json=draft(status=status))
                rid = r.json()["id"]
                r = await api.call("POST", f"/alerts/{rid}/submit", "originator")
                if status == "Actual":
                    assert r.json()["state"] == "pending_approval"
                    r = await api.call("POST", f"/alerts/{rid}/approve", "approver", json={})
                assert r.json()["state"] == "sent", r.text
                sent[status] = r.json()["cap"]["key"]
            for key in sent.values():
                await wait_delivered(settings, key, worker)

            outbox = read_outbox(settings.outbox_path)
            for status, key in sent.items():
                messages = [m for m in outbox if m["alert_key"] == key]
                got = {m["subscriber_id"] for m in messages}
                expected = set(subs) if status == "Actual" else {s for s, ok in subs.items()
                                                                 if ok}
                assert got == expected, (status, got)
                for m in messages:  # a test says so in the message itself
                    marks = set(re.findall(r"\b(TEST|EXERCISE)\b", json.dumps(m).upper()))
                    assert marks == (set() if status == "Actual" else {status.upper()}), m
        finally:
            await stop_api(api)
