"""Demo data for the embedded stack: real CAP messages and synthetic citizens.

Citizens are generated deterministically (seeded) so a demo run and a test see the same
people: some live near the demo alerts' areas (inside and just outside), the rest are
spread over the contiguous US; some subscribe places (with or without a radius), some
subscribe county zones. Their contact details are obviously fake (example.org, +1-555).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from channels.contacts import Contact
from streams.records import CHANNELS, Channel, Subscription

# Real CAP 1.2 messages replayed by the demo (see data/PROVENANCE.md).
DEMO_ALERTS = (
    "cap/cap12/oasiscap__spec12_A2_severe_thunderstorm.xml",
    "cap/cap12/oasiscap__spec12_A4_amber_multilingual.xml",
    "cap/cap12/oasiscap__ipaws_local_area_emergency_polygon.xml",
)
US_BBOX = (-124.5, 25.0, -67.0, 49.0)


@dataclass(frozen=True)
class Citizen:
    """One synthetic citizen: what goes on the topic, and what goes in the contact vault."""

    subscription: Subscription
    contact: Contact


def demo_alert_paths(data_dir: Path) -> list[Path]:
    """The CAP files the demo replays."""
    return [data_dir / rel for rel in DEMO_ALERTS]


def _points_near(
    rng: np.random.Generator, area: BaseGeometry, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Points in the area's bounding box grown by half its size: many inside, some just out."""
    minx, miny, maxx, maxy = area.bounds
    dx, dy = max(maxx - minx, 0.02), max(maxy - miny, 0.02)
    lon = rng.uniform(minx - dx / 2, maxx + dx / 2, n)
    lat = rng.uniform(miny - dy / 2, maxy + dy / 2, n)
    return lon, lat


def synthetic_citizens(
    n: int,
    *,
    focus_areas: Sequence[BaseGeometry] = (),
    zone_codes: Sequence[str] = (),
    focus_zones: Sequence[str] = (),
    seed: int = 7,
) -> list[Citizen]:
    """``n`` citizens: 60% places (half near ``focus_areas``), 40% county zones."""
    rng = np.random.default_rng(seed)
    n_places = int(n * 0.6)
    n_focus = n_places // 2 if focus_areas else 0
    lons, lats = [], []
    for i, area in enumerate(focus_areas):
        share = n_focus // len(focus_areas) + (1 if i < n_focus % len(focus_areas) else 0)
        lon, lat = _points_near(rng, area, share)
        lons.append(lon)
        lats.append(lat)
    rest = n_places - n_focus
    lons.append(rng.uniform(US_BBOX[0], US_BBOX[2], rest))
    lats.append(rng.uniform(US_BBOX[1], US_BBOX[3], rest))
    lon_all, lat_all = np.concatenate(lons), np.concatenate(lats)
    radius = np.where(rng.random(n_places) < 0.7, 0.0, rng.uniform(500, 5000, n_places))

    citizens = []
    for i in range(n):
        sub_id = f"citizen-{i:06d}"
        channels: list[Channel] = [c for c in CHANNELS if rng.random() < 0.6] or ["push"]
        contact = Contact(
            push_token=f"demo-token-{i:06d}" if "push" in channels else "",
            phone=f"+1555{i:07d}" if "sms" in channels else "",
            email=f"citizen{i}@example.org" if "email" in channels else "",
        )
        common = {
            "id": sub_id,
            "channels": channels,
            "language": "es" if rng.random() < 0.2 else "en",
            "accept_tests": bool(rng.random() < 0.1),
        }
        if i < n_places:
            sub = Subscription(
                kind="place",
                lon=round(float(lon_all[i]), 6),
                lat=round(float(lat_all[i]), 6),
                radius_m=round(float(radius[i]), 1),
                **common,  # type: ignore[arg-type]
            )
        else:
            pool = focus_zones if focus_zones and rng.random() < 0.3 else zone_codes
            code = str(pool[int(rng.integers(len(pool)))]) if pool else "FIPS:06037"
            sub = Subscription(kind="zone", zone=code, **common)  # type: ignore[arg-type]
        citizens.append(Citizen(sub, contact))
    return citizens


def neighbour_zones(area: BaseGeometry, counties: dict[str, BaseGeometry]) -> list[str]:
    """County codes whose geometry touches or overlaps the area (for realistic focus)."""
    return [code for code, geom in counties.items() if shapely.intersects(geom, area)]
