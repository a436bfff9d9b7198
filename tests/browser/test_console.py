"""The console in real headless Chromium against the real pipeline.

Debian's ``chromium`` is driven by Playwright (``executable_path``, no browser download);
the fixtures start tansu, redis-server, a real ``tocsin worker`` and a real ``tocsin api``
process on a free port, with citizens in and around Los Angeles County. An originator
signs in, draws a polygon over the county, sees the exact reach, submits; an approver
(another token, another browser context) approves; the originator's progress view
reaches "delivered"; then Cancel and Correction from that same screen reach everyone
warned. Screenshots of every step go to ``tests/artifacts/console/`` (printed at the end).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from shapely.geometry import Point, Polygon

from channels.contacts import Contact, ContactStore
from channels.outbox import read_outbox
from ops.api.identity import IdentityStore, seed_demo
from ops.dev import spawn_child
from ops.devstack import free_port
from ops.settings import Settings
from streams.publish import produce, subscription_records
from streams.records import CHANNELS, Subscription
from streams.topics import SUBSCRIPTIONS
from tests.api.conftest import make_settings, wait_for
from tests.integration.pipeline_helpers import RunningWorker, running_worker, wait_indexed

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "console"
# Drawn over the Los Angeles basin, well inside the county (lon, lat).
DRAWN = [(-118.45, 34.0), (-118.1, 34.0), (-118.1, 34.2), (-118.45, 34.2)]
UI_TIMEOUT_MS = 60_000


def chromium() -> str:
    """Debian's chromium (`make test` installs it; a missing browser fails, never skips)."""
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists()
                                        else None)
    if path is None:
        pytest.fail("chromium is missing: `make test` installs Debian's chromium")
    return path


def citizens(n: int) -> tuple[list[Subscription], dict[str, Contact]]:
    """Citizens in the drawn area, and a fifth of them just outside it (Orange County)."""
    rng = np.random.default_rng(6)
    subs, contacts = [], {}
    for i in range(n):
        if i % 5:
            lon, lat = float(rng.uniform(-118.4, -118.15)), float(rng.uniform(34.03, 34.17))
        else:
            lon, lat = float(rng.uniform(-117.9, -117.7)), float(rng.uniform(33.6, 33.75))
        channels = [c for c in CHANNELS if rng.random() < 0.6] or ["sms"]
        sid = f"web-{i:03d}"
        subs.append(Subscription(id=sid, kind="place", lon=lon, lat=lat,
                                 channels=channels))  # type: ignore[arg-type]
        contacts[sid] = Contact(push_token=f"tok-{i}", phone=f"+1555{i:07d}",
                                email=f"w{i}@example.org")
    return subs, contacts


class Stack:
    """The running API process, its settings and the demo tokens."""

    def __init__(self, settings: Settings, proc: subprocess.Popen[bytes], tokens: dict[str, str],
                 worker: RunningWorker, subs: list[Subscription], log: Path) -> None:
        self.settings, self.proc, self.tokens = settings, proc, tokens
        self.worker, self.subs, self.log = worker, subs, log
        self.url = f"http://127.0.0.1:{settings.api_port}"

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] + "\n" + self.worker.log()


@pytest_asyncio.fixture
async def stack(broker: str, redis_url: str, tmp_path: Path, data_dir: Path
                ) -> AsyncIterator[Stack]:
    """Worker + ``tocsin api`` on a free port, citizens loaded and indexed by both."""
    settings = make_settings(broker, redis_url, tmp_path, data_dir, api_port=free_port(),
                             api_host="127.0.0.1")
    subs, contacts = citizens(40)
    async with running_worker(settings, tmp_path) as worker:
        client = aioredis.Redis.from_url(redis_url)
        await ContactStore(client).put_many(contacts)
        tokens = await seed_demo(IdentityStore(client, settings.api_token_secret.encode()))
        await client.aclose()
        await produce(broker, SUBSCRIPTIONS, subscription_records(subs))
        log = tmp_path / "api.log"
        proc = spawn_child(["api"], settings, log)
        running = Stack(settings, proc, tokens, worker, subs, log)
        try:
            async with httpx.AsyncClient(base_url=running.url) as http:

                async def indexed() -> bool:
                    try:
                        body = (await http.get("/health")).json()
                    except httpx.HTTPError:
                        return False
                    return bool(body["indexed_subscriptions"] == len(subs))

                await wait_for(indexed, 60, "the API up with every subscription indexed")
            await wait_indexed(settings, len(subs), worker)
            yield running
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 20)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 10)


async def sign_in(browser: Any, url: str, token: str, shots: list[Path]) -> Any:
    """A fresh browser context signed in with ``token``; console errors are collected."""
    context = await browser.new_context(viewport={"width": 1500, "height": 1000})
    page = await context.new_page()
    page.errors = []
    refused = "the server responded with a status of 403"  # the refusal the test provokes

    def console_error(message: Any) -> None:
        if message.type == "error" and refused not in message.text:
            page.errors.append(message.text)

    page.on("console", console_error)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    await page.goto(f"{url}/console/")
    await page.get_by_label("API token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    await page.locator("#workspace").wait_for(state="visible")
    return page


async def shot(page: Any, name: str, shots: list[Path]) -> None:
    path = ARTIFACTS / f"{len(shots) + 1:02d}-{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    shots.append(path)


async def click_map(page: Any, lon: float, lat: float) -> None:
    """Click the map where (lon, lat) is drawn, as a person would."""
    box = await page.locator("#map").bounding_box()
    xy = await page.evaluate(
        "([lat, lon]) => { const p = window.tocsinConsole.compose.areaMap.map"
        ".latLngToContainerPoint([lat, lon]); return [p.x, p.y]; }", [lat, lon])
    await page.mouse.click(box["x"] + xy[0], box["y"] + xy[1])


async def draw_polygon(page: Any, points: list[tuple[float, float]]) -> None:
    """Click the polygon's corners on the map, then finish it."""
    await page.get_by_role("button", name="Draw polygon").click()
    for lon, lat in points:
        await click_map(page, lon, lat)
    await page.get_by_role("button", name="Finish polygon").click()


async def text_of(page: Any, selector: str) -> str:
    return str(await page.locator(selector).inner_text())


async def test_originator_and_approver_send_deliver_cancel_and_correct(stack: Stack) -> None:
    from playwright.async_api import async_playwright, expect

    executable = chromium()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    shots: list[Path] = []
    area = Polygon(DRAWN)
    inside = sum(1 for s in stack.subs if area.contains(Point(s.lon, s.lat)))
    assert 0 < inside < len(stack.subs)
    in_county = sum(1 for s in stack.subs if s.lon < -118)  # the rest are in Orange County
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, headless=True)
        try:
            page = await sign_in(browser, stack.url, stack.tokens["originator"], shots)
            await expect(page.get_by_role("heading", name="Compose an alert")).to_be_visible()
            # Every control has a label, and focus is visible.
            unlabelled = await page.evaluate(
                "() => [...document.querySelectorAll('input, select, textarea')]"
                ".filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))"
                ".map(e => e.id || e.name)")
            assert unlabelled == [], unlabelled
            await page.get_by_label("Event type").focus()
            outline = await page.evaluate("() => getComputedStyle(document.activeElement)"
                                          ".outlineStyle")
            assert outline != "none"

            # Test is visibly distinct: banner text, not just a colour.
            await page.get_by_label("Event type").select_option("CEM")
            await expect(page.get_by_label("Event", exact=True)).to_have_value("Civil Emergency")
            await page.get_by_label("Test", exact=True).check()
            await expect(page.locator("#compose-status")).to_contain_text("TEST — not a real")
            await expect(page.locator("#submit-alert")).to_have_text("Submit TEST alert")
            await page.get_by_label("Actual — real alert to the public").check()
            await expect(page.locator("#submit-alert")).to_have_text("Submit ACTUAL alert")

            await page.get_by_label("Zoom to").select_option("FIPS:06037")
            # Picking the county by clicking it reaches everyone in it.
            await page.get_by_role("button", name="Pick counties").click()
            await click_map(page, -118.2, 34.1)
            await expect(page.locator("#area-summary")).to_have_text("Los Angeles County, CA")
            await expect(page.get_by_label("Los Angeles County, CA")).to_be_checked()
            await expect(page.locator("#reach-total")).to_have_text(str(in_county),
                                                                    timeout=UI_TIMEOUT_MS)
            # A circle typed in (no mouse) over Orange County is refused, with the reason.
            await page.get_by_role("button", name="Clear area").click()
            await page.get_by_text("Choose the area without the map").click()
            await page.get_by_label("Centre latitude").fill("33.7")
            await page.get_by_label("Centre longitude").fill("-117.8")
            await page.get_by_label("Radius (km)").fill("5")
            await page.get_by_role("button", name="Set circle").click()
            await expect(page.locator("#preview")).to_contain_text(
                "area outside the jurisdiction", timeout=UI_TIMEOUT_MS)
            await shot(page, "originator-outside-jurisdiction", shots)
            await page.get_by_role("button", name="Clear area").click()

            await draw_polygon(page, DRAWN)
            await expect(page.locator("#preview")).to_have_attribute("data-state", "ready",
                                                                     timeout=UI_TIMEOUT_MS)
            await expect(page.locator("#reach-total")).to_have_text(str(inside))
            await shot(page, "originator-preview", shots)
            per_channel = {c: int(await text_of(page, f"td[data-channel={c}]"))
                           for c in CHANNELS}
            assert sum(per_channel.values()) > 0

            await page.get_by_role("button", name="Submit ACTUAL alert").click()
            await expect(page.locator("#delivery-status")).to_contain_text(
                "waiting for approval", timeout=UI_TIMEOUT_MS)
            rid = page.url.rsplit("/", 1)[-1]
            await shot(page, "originator-submitted", shots)

            approver = await sign_in(browser, stack.url, stack.tokens["approver"], shots)
            card = approver.locator(f"article[data-alert='{rid}']")
            await expect(card.locator("#reach-total")).to_have_text(str(inside),
                                                                    timeout=UI_TIMEOUT_MS)
            await shot(approver, "approver-queue", shots)
            await card.get_by_role("button", name="Approve and send ACTUAL alert").click()
            await expect(approver.locator("#alert-state")).to_contain_text("sent",
                                                                          timeout=UI_TIMEOUT_MS)

            status = page.locator("#delivery-status")
            await expect(status).to_contain_text("delivered", timeout=UI_TIMEOUT_MS)
            await expect(page.locator("#alert-state")).to_contain_text("sent")
            await shot(page, "originator-delivered", shots)
            bars = page.locator("#progress progress")
            for i in range(await bars.count()):
                bar = bars.nth(i)
                assert await bar.get_attribute("value") == await bar.get_attribute("max")
            key = (await stack_get(stack, f"/alerts/{rid}", "originator"))["cap"]["key"]
            warned = {(m["subscriber_id"], m["channel"])
                      for m in read_outbox(stack.settings.outbox_path) if m["alert_key"] == key}
            assert {c: sum(1 for _, ch in warned if ch == c) for c in CHANNELS} == per_channel

            # Cancel, then the correction, from the same screen.
            await page.get_by_role("button", name="Cancel alert…").click()
            await page.get_by_role("button", name="Confirm cancel").click()
            await expect(page.locator("#alert-state")).to_contain_text("cancelled",
                                                                      timeout=UI_TIMEOUT_MS)
            await expect(status).to_contain_text("cancellation reached everyone warned",
                                                 timeout=UI_TIMEOUT_MS)
            await shot(page, "originator-cancelled", shots)
            await page.get_by_role("button", name="Send correction…").click()
            await expect(page.get_by_label("Correction message")).to_have_value(
                "The earlier alert was sent in error. There is no emergency. "
                "No action is needed.")
            await page.get_by_role("button", name="Send correction now").click()
            await expect(page.locator("#alert-state")).to_contain_text("corrected",
                                                                      timeout=UI_TIMEOUT_MS)
            await expect(status).to_contain_text("correction reached everyone warned",
                                                 timeout=UI_TIMEOUT_MS)
            await expect(page.locator("#progress section")).to_have_count(3)
            await shot(page, "originator-corrected", shots)

            thread = await stack_get(stack, f"/alerts/{rid}/progress", "originator")
            follow_keys = [m["cap_key"] for m in thread["messages"][1:]]
            for follow in follow_keys:
                told = {(m["subscriber_id"], m["channel"])
                        for m in read_outbox(stack.settings.outbox_path)
                        if m["alert_key"] == follow}
                assert told == warned, "a follow-up missed someone the alert reached"

            await page.get_by_role("link", name="Alert history").click()
            row = page.locator(f"tr[data-alert='{rid}']")
            await expect(row).to_contain_text("corrected")
            await expect(row).to_contain_text("ACTUAL")
            await shot(page, "originator-history", shots)
            assert page.errors == [] and approver.errors == [], (page.errors, approver.errors)
        except BaseException:
            print(stack.logs())
            raise
        finally:
            await browser.close()
            print(f"\nconsole screenshots: {ARTIFACTS}")


async def stack_get(stack: Stack, path: str, role: str) -> Any:
    """One API read outside the browser, for assertions about what was sent."""
    async with httpx.AsyncClient(base_url=stack.url) as http:
        r = await http.get(path, headers={"Authorization": f"Bearer {stack.tokens[role]}"})
        r.raise_for_status()
        return r.json()
