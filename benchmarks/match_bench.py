"""Benchmark the geofencing matcher: N place subscriptions in one state vs a county alert.

    python benchmarks/match_bench.py [--n 1000000] [--radius-share 0.2] [--county 06001]

Builds ``--n`` synthetic place subscriptions uniformly inside one US state (a share of
them with a radius of 0.5-10 km) plus ``--zones`` county zone subscriptions, resolves a
county alert through the gazetteer (SAME code), and prints:

* index build time;
* median / p99 latency of ``SubscriptionIndex.match_positions`` for the alert county (and
  a small / large county for context);
* the ratio against (a) a naive per-subscriber Python loop (prepared shapely predicate,
  and the same projected distance test for radii) timed on a 10 000 sample and scaled to
  N, and (b) ``geopandas.sjoin`` on the same points with a warm spatial index. sjoin only
  does point-in-polygon (it has no geodesic radius), so it does less work than the index.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import shapely

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from geofencing.areas import resolve_alert_geometry  # noqa: E402
from geofencing.gazetteer import Gazetteer, default_gazetteer  # noqa: E402
from geofencing.geodesy import LocalFrame  # noqa: E402
from geofencing.matcher import SubscriptionIndex  # noqa: E402
from streams.records import Alert, Area, Geocode, Info, Subscription  # noqa: E402

RADII_M = (500.0, 1_000.0, 2_000.0, 5_000.0, 10_000.0)
CONTEXT_COUNTIES = {"06": ("06075", "06037"), "48": ("48453", "48201")}


def timed(fn: Callable[[], object], runs: int, cpu: list[float] | None = None) -> list[float]:
    """Wall-clock milliseconds of ``runs`` calls (after one warm-up call).

    If ``cpu`` is given, the process CPU time of each call is appended to it as well: on a
    shared host the wall clock also counts time spent descheduled.
    """
    fn()
    out = []
    for _ in range(runs):
        t, c = time.perf_counter(), time.process_time()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
        if cpu is not None:
            cpu.append((time.process_time() - c) * 1e3)
    return out


def p99(xs: list[float]) -> float:
    return float(np.percentile(xs, 99))


def random_points_in(geom: shapely.Geometry, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points uniform (in lon/lat) inside ``geom`` by rejection sampling."""
    shapely.prepare(geom)
    x0, y0, x1, y1 = geom.bounds
    chunks, have = [], 0
    while have < n:
        xy = np.column_stack([rng.uniform(x0, x1, n), rng.uniform(y0, y1, n)])
        xy = xy[shapely.contains_xy(geom, xy[:, 0], xy[:, 1])]
        chunks.append(xy)
        have += len(xy)
    return np.vstack(chunks)[:n]


def county_alert(gaz: Gazetteer, fips: str) -> shapely.Geometry:
    alert = Alert(
        identifier=f"bench-{fips}",
        sender="bench",
        sent="2024-01-01T00:00:00-00:00",
        status="Actual",
        msg_type="Alert",
        scope="Public",
        infos=[Info(areas=[Area(geocodes=[Geocode("SAME", "0" + fips)])])],
    )
    geom, warnings = resolve_alert_geometry(alert, gaz)
    if geom is None:
        raise SystemExit(f"county {fips} did not resolve: {warnings}")
    return geom


def naive_loop(subs: list[Subscription], area: shapely.Geometry, gaz: Gazetteer) -> int:
    """The obvious implementation: one subscriber at a time, same semantics."""
    shapely.prepare(area)
    frame = LocalFrame.for_geometry(area)
    projected = frame.project(area)
    shapely.prepare(projected)
    area_m2 = abs(shapely.area(area))
    hits = 0
    for sub in subs:
        if sub.kind == "place":
            assert sub.lon is not None and sub.lat is not None
            if shapely.intersects_xy(area, sub.lon, sub.lat):
                hits += 1
            elif sub.radius_m > 0:
                x, y = frame.forward([sub.lon], [sub.lat])
                hits += bool(shapely.dwithin(projected, shapely.Point(x[0], y[0]), sub.radius_m))
        else:
            zone = gaz.get(sub.zone or "")
            if zone is not None and zone.intersects(area):
                overlap = zone.intersection(area).area
                hits += overlap > 1e-4 * min(zone.area, area_m2)
    return hits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="place subscriptions")
    ap.add_argument("--zones", type=int, default=20_000, help="county zone subscriptions")
    ap.add_argument("--state", default="06", help="state FIPS (06 California, 48 Texas)")
    ap.add_argument("--county", default="06001", help="alert county FIPS (06001 Alameda)")
    ap.add_argument("--radius-share", type=float, default=0.2, help="share with a radius")
    ap.add_argument("--runs", type=int, default=200, help="timed match runs")
    ap.add_argument("--sample", type=int, default=10_000, help="naive-loop sample size")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--no-sjoin", action="store_true", help="skip the geopandas comparison")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)

    t = time.perf_counter()
    gaz = default_gazetteer(ROOT / "data")
    print(f"gazetteer: {len(gaz)} codes loaded in {time.perf_counter() - t:.3f} s")
    state = gaz.lookup("SAME", f"0{args.state}000")
    if state is None:
        raise SystemExit(f"unknown state {args.state}")

    xy = random_points_in(state, args.n, rng)
    radius = np.where(rng.random(args.n) < args.radius_share, rng.choice(RADII_M, args.n), 0.0)
    channels = [["push"], ["push", "sms"], ["email"]]
    subs = [
        Subscription(id=f"p{i}", kind="place", lon=x, lat=y, radius_m=r, channels=channels[i % 3])
        for i, (x, y, r) in enumerate(
            zip(xy[:, 0].tolist(), xy[:, 1].tolist(), radius.tolist(), strict=True)
        )
    ]
    counties = sorted(c for c in gaz if c.startswith(f"FIPS:{args.state}"))
    picks = rng.choice(len(counties), args.zones)
    subs += [
        Subscription(id=f"z{i}", kind="zone", zone=counties[k], channels=["sms"])
        for i, k in enumerate(picks.tolist())
    ]
    print(
        f"subscriptions: {args.n:,} places in state {args.state} "
        f"({args.radius_share:.0%} with a 0.5-10 km radius) + {args.zones:,} county zones"
    )

    t = time.perf_counter()
    index = SubscriptionIndex.build(subs, gaz)
    build_s = time.perf_counter() - t
    print(
        f"index build: {build_s:.2f} s ({len(index):,} indexed, {len(index.unresolved)} unresolved)"
    )

    area = county_alert(gaz, args.county)
    small, large = CONTEXT_COUNTIES.get(args.state, (args.county, args.county))
    print("\nmatch latency (SubscriptionIndex.match_positions, one core):")
    print(f"  {'county':8} {'matched':>9} {'median ms':>10} {'p99 ms':>8} {'cpu median ms':>14}")
    main_ms: list[float] = []
    for fips in dict.fromkeys((args.county, small, large)):
        geom = county_alert(gaz, fips)
        cpu: list[float] = []
        ms = timed(lambda g=geom: index.match_positions(g), args.runs, cpu)
        matched = len(index.match_positions(geom))
        tag = "  <- alert" if fips == args.county else ""
        print(
            f"  {fips:8} {matched:9,} {statistics.median(ms):10.3f} {p99(ms):8.3f}"
            f" {statistics.median(cpu):14.3f}{tag}"
        )
        if fips == args.county:
            main_ms = ms
    index_ms = statistics.median(main_ms)
    ids_ms = statistics.median(timed(lambda: index.match(area), max(20, args.runs // 5)))
    print(f"  (with the list of {len(index.match(area)):,} subscriber ids: {ids_ms:.3f} ms)")

    # (a) naive per-subscriber loop on a random sample, scaled to the full population.
    sample_idx = rng.choice(len(subs), min(args.sample, len(subs)), replace=False)
    sample = [subs[i] for i in sample_idx.tolist()]
    naive_ms = statistics.median(timed(lambda: naive_loop(sample, area, gaz), 3))
    naive_full_ms = naive_ms * len(subs) / len(sample)
    print(
        f"\nnaive loop: {naive_ms:.1f} ms for {len(sample):,} subscribers "
        f"-> {naive_full_ms:,.0f} ms scaled to {len(subs):,}"
    )
    print(f"RATIO naive loop / index = {naive_full_ms / index_ms:,.0f}x")

    # (b) geopandas sjoin on the same place points (point-in-polygon only, warm sindex).
    if not args.no_sjoin:
        import geopandas as gpd

        points = gpd.GeoDataFrame(
            {"id": [f"p{i}" for i in range(args.n)]},
            geometry=gpd.points_from_xy(xy[:, 0], xy[:, 1]),
            crs="EPSG:4326",
        )
        alert_df = gpd.GeoDataFrame({"alert": [args.county]}, geometry=[area], crs="EPSG:4326")
        t = time.perf_counter()
        points.sindex  # noqa: B018 - build the STRtree once, outside the timing
        print(f"\ngeopandas: points sindex built in {time.perf_counter() - t:.2f} s")
        runs = max(5, args.runs // 20)
        fwd = timed(lambda: gpd.sjoin(alert_df, points, predicate="intersects"), runs)
        rev = timed(lambda: gpd.sjoin(points, alert_df, predicate="intersects"), 2)
        print(f"  sjoin(alert, points): median {statistics.median(fwd):.1f} ms")
        print(f"  sjoin(points, alert): median {statistics.median(rev):.1f} ms")
        best = min(statistics.median(fwd), statistics.median(rev))
        print(f"RATIO geopandas sjoin (best order) / index = {best / index_ms:,.1f}x")

    print(f"\nsummary: build {build_s:.2f} s, median {index_ms:.3f} ms, p99 {p99(main_ms):.3f} ms")


if __name__ == "__main__":
    main()
