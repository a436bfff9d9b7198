"""Scale-out simulation: 10,000,000 subscriptions in 16 shards, scatter-gather a state alert.

    python benchmarks/scale.py [--subscriptions 10000000] [--partitions 16] [--processes 2]
                               [--states 19 08 42 13 53] [--runs 3]

What one matcher shard is in a worker (``streams/shards.py``), per partition of
``subscriptions``: the records as read from the compacted topic (``Shard.apply`` on the
encoded bytes, i.e. decode + the per-partition dict) and the immutable
``SubscriptionIndex`` built from them. This script builds ``--partitions`` such shards
in ``--processes`` worker processes (``multiprocessing``; 2 by default, the cores of this
machine), each process generating the subscriptions of its own partitions (so nothing
big crosses a pipe) in ``benchmarks/match.py``'s realistic US mix spread over the
contiguous US: 90 % places (20 % radius 0, the rest uniform in 0-5 km; half uniform,
half around 300 towns), 5 % custom zone polygons, 5 % county / NWS zone codes.

Reported:

* memory per million subscriptions: the worker processes' **RSS delta** (VmRSS after
  building every shard and a garbage collection, minus VmRSS before; records + dict +
  index, allocator slack included, so an upper bound), and the **numpy ``nbytes``** of the
  index arrays alone (what an index without Python records would need);
* per partition: time to re-read it (``Shard.apply`` over the encoded records, the CPU
  part of a new owner's catch-up; the broker hop is in ``benchmarks/latency.py``'s
  ``catch_up_*``) and ``SubscriptionIndex.build`` time; the totals, and the wall time with
  the processes in parallel;
* scatter-gather match latency for state-sized alerts (whole-state polygons of
  ``--states``; FIPS): the parent sends the area to every process, each matches all its
  shards and returns the matched ids, the parent unions them. Median and p99 over
  ``--runs`` runs per state after a warm-up, plus the per-shard match time;

and from these, the machine sizes a city (1M), a state (10M) and a country (100M+) need.
The last line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import multiprocessing as mp
import os
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import shapely

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from geofencing.gazetteer import standard_gazetteer  # noqa: E402
from geofencing.geodesy import approx_area_m2  # noqa: E402
from geofencing.matcher import SubscriptionIndex  # noqa: E402
from streams.records import encode  # noqa: E402
from streams.shards import Shard  # noqa: E402


def _sibling(name: str) -> Any:
    """Import another benchmark script as a module (benchmarks/ is not a package)."""
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"tocsin_bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


matchbench = _sibling("match")


def rss_bytes() -> int:
    """This process's resident set size (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def numpy_bytes(index: SubscriptionIndex) -> int:
    """Bytes of the numpy arrays inside an index (places grid, zone ranges, ids, masks)."""
    seen: set[int] = set()
    total = 0
    parts = [index, getattr(index, "_grid", None), getattr(index, "_zones", None)]
    for obj in parts:
        if obj is None:
            continue
        values = list(vars(obj).values()) if hasattr(obj, "__dict__") else []
        values += [getattr(obj, s) for s in getattr(type(obj), "__slots__", ()) if hasattr(obj, s)]
        for value in values:
            arrays = value.values() if isinstance(value, dict) else [value]
            for arr in arrays:
                if isinstance(arr, np.ndarray) and id(arr) not in seen:
                    seen.add(id(arr))
                    total += arr.nbytes
    return total


# -- a worker process: its shards, then queries -------------------------------------------


def shard_worker(rank: int, args: argparse.Namespace, conn: Connection) -> None:
    """Build the shards ``p % processes == rank``, report, then answer match requests."""
    gaz = standard_gazetteer(ROOT / "data")
    states = sorted(matchbench.CONUS)
    conus = shapely.union_all([matchbench._get(gaz, f"SAME:0{s}000") for s in states])
    codes = sorted(
        c
        for c in gaz
        if (c.startswith("FIPS:") and c[5:7] in matchbench.CONUS)
        or (c.startswith("UGC:") and c[4:6] in matchbench.CONUS_USPS)
    )
    per_partition = args.subscriptions // args.partitions
    gc.collect()
    rss0 = rss_bytes()
    shards: dict[int, Shard] = {}
    stats = []
    for p in range(rank, args.partitions, args.processes):
        rng = np.random.default_rng([args.seed, p])
        t = time.perf_counter()
        subs = matchbench.make_workload("conus", "", gaz, conus, codes, [], per_partition, rng).subs
        # The compacted topic's bytes for this partition (ids unique across partitions).
        records = []
        for sub in subs:
            sub.id = f"{p}/{sub.id}"
            records.append((sub.id, encode(sub)))
        del subs
        gen_s = time.perf_counter() - t
        shard = Shard()
        t = time.perf_counter()
        for key, value in records:
            shard.apply(key, value)
        apply_s = time.perf_counter() - t
        del records
        t = time.perf_counter()
        shard.base = SubscriptionIndex.build(shard.subscriptions.values(), gaz)
        build_s = time.perf_counter() - t
        shard.changed.clear()
        shards[p] = shard
        stats.append(
            {
                "partition": p,
                "subscriptions": len(shard.base),
                "generate_s": round(gen_s, 2),
                "read_s": round(apply_s, 2),
                "build_s": round(build_s, 2),
                "numpy_bytes": numpy_bytes(shard.base),
                "unresolved": len(shard.base.unresolved),
            }
        )
        print(
            f"  [proc {rank}] partition {p:2d}: {len(shard.base):,} subscriptions, read "
            f"{apply_s:5.1f} s, build {build_s:5.1f} s (generated in {gen_s:.1f} s)",
            flush=True,
        )
    gc.collect()
    conn.send({"stats": stats, "rss_delta": rss_bytes() - rss0, "rss": rss_bytes()})
    while True:
        wkb = conn.recv()
        if wkb is None:
            break
        area = shapely.from_wkb(wkb)
        times, found = [], []
        for shard in shards.values():
            assert shard.base is not None
            t = time.perf_counter()
            pos = shard.base.match_positions(area)
            found.append(shard.base.ids[pos])
            times.append(time.perf_counter() - t)
        ids = np.concatenate(found).astype(str) if found else np.empty(0, dtype=str)
        conn.send((times, ids))


# -- the parent ------------------------------------------------------------------------------


def scatter_gather(conns: list[Connection], wkb: bytes) -> tuple[float, list[float], int]:
    """Send the area to every process, gather and union the ids; (wall s, shard s, reach)."""
    t = time.perf_counter()
    for conn in conns:
        conn.send(wkb)
    answers = [conn.recv() for conn in conns]
    reach = len(np.unique(np.concatenate([ids for _, ids in answers])))
    wall = time.perf_counter() - t
    return wall, [s for times, _ in answers for s in times], reach


def sizing(mem_per_m: float, rebuild_per_m: float, shard_ms: float, shard_size: int) -> list[str]:
    """Machine sizes from the measured figures (the model is in the README's Scaling).

    Partitions hold at most this run's shard size; a matcher core owns up to 4 of them, so
    a state alert's scatter-gather costs ~4 shard matches in a row on each core, all cores
    in parallel. RAM: the shards x 1.25 (one shard's second index during a rebuild, the
    sender's working set) + 1 GB per machine of 8 cores.
    """
    lines = []
    for label, millions in (("city", 1), ("state", 10), ("country", 100)):
        partitions = max(4, 2 ** int(np.ceil(np.log2(millions * 1e6 / shard_size))))
        cores = max(2, int(np.ceil(partitions / 4)))
        machines = max(1, int(np.ceil(cores / 8)))
        ram = mem_per_m * millions / 1024 * 1.25 + machines
        lines.append(
            f"  {label:8} {millions:>4}M: {partitions} partitions, {cores} matcher cores on "
            f"{machines} machine(s), ~{ram:,.0f} GB RAM in all; state alert ~{4 * shard_ms:,.0f}"
            f" ms of matching per core; full restart rebuild"
            f" ~{rebuild_per_m * millions / cores:,.0f}"
            f" s (+ fan-out cores: ~4,000 push/s each, benchmarks/fanout.py)"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subscriptions", type=int, default=10_000_000)
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--processes", type=int, default=2, help="worker processes holding shards")
    ap.add_argument("--states", nargs="+", default=["19", "08", "42", "13", "53"],
                    help="state FIPS codes whose whole polygon is an alert")  # fmt: skip
    ap.add_argument("--runs", type=int, default=3, help="timed runs per state (after a warm-up)")
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    started = time.perf_counter()
    print(
        f"scale-out: {args.subscriptions:,} subscriptions in {args.partitions} partitions, "
        f"{args.processes} worker processes; {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.2f}",
        flush=True,
    )
    ctx = mp.get_context("fork")
    conns, procs = [], []
    for rank in range(args.processes):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=shard_worker, args=(rank, args, child), daemon=True)
        proc.start()
        conns.append(parent)
        procs.append(proc)
    try:
        t = time.perf_counter()
        reports = [conn.recv() for conn in conns]
        build_wall = time.perf_counter() - t
        stats = sorted((s for r in reports for s in r["stats"]), key=lambda s: s["partition"])
        n = sum(s["subscriptions"] for s in stats)
        rss = sum(r["rss_delta"] for r in reports)
        nbytes = sum(s["numpy_bytes"] for s in stats)
        build = [s["build_s"] for s in stats]
        read = [s["read_s"] for s in stats]
        gaz = standard_gazetteer(ROOT / "data")
        timings: list[float] = []
        shard_ms: list[float] = []
        reach: dict[str, int] = {}
        for state in args.states:
            area = matchbench._get(gaz, f"SAME:0{state}000")
            wkb = shapely.to_wkb(area)
            scatter_gather(conns, wkb)  # warm-up
            for _ in range(args.runs):
                wall, shards, reach[state] = scatter_gather(conns, wkb)
                timings.append(wall * 1e3)
                shard_ms += [s * 1e3 for s in shards]
            km2 = float(approx_area_m2([area])[0]) / 1e6
            print(
                f"  state {state}: {km2:,.0f} km2, reaches {reach[state]:,} subscriptions, "
                f"scatter-gather {np.median(timings[-args.runs :]):,.0f} ms",
                flush=True,
            )
        for conn in conns:
            conn.send(None)
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    mem_per_m = rss / n * 1e6 / 2**20
    np_per_m = nbytes / n * 1e6 / 2**20
    build_per_m = sum(build) / n * 1e6
    read_per_m = sum(read) / n * 1e6
    sg_median, sg_p99 = float(np.median(timings)), float(np.percentile(timings, 99))
    print(f"\n{n:,} subscriptions in {len(stats)} shards ({n // len(stats):,} each)")
    print(f"  memory per million: {mem_per_m:,.0f} MiB RSS delta (records + dict + index); "
          f"{np_per_m:,.1f} MiB numpy nbytes of the index arrays")  # fmt: skip
    print(f"  per partition: read {np.median(read):.1f} s, build {np.median(build):.1f} s median "
          f"(max {max(read):.1f} / {max(build):.1f}); totals read {sum(read):.0f} s + build "
          f"{sum(build):.0f} s CPU = {read_per_m + build_per_m:.1f} s per million; "
          f"{build_wall:.0f} s wall, {args.processes} processes, generation included")  # fmt: skip
    print(f"  scatter-gather over {args.partitions} shards, state alerts: median "
          f"{sg_median:,.0f} ms, p99 {sg_p99:,.0f} ms; one shard's match median "
          f"{np.median(shard_ms):,.1f} ms, p99 {np.percentile(shard_ms, 99):,.1f} ms")  # fmt: skip
    print("machine sizes (from these figures; see README 'Scaling'):")
    for line in sizing(
        mem_per_m, read_per_m + build_per_m, float(np.median(shard_ms)), n // len(stats)
    ):
        print(line)
    print(f"total run {time.perf_counter() - started:.0f} s")
    print(json.dumps({
        "subscriptions": n,
        "partitions": args.partitions,
        "processes": args.processes,
        "mem_mib_per_million_rss": round(mem_per_m, 1),
        "mem_mib_per_million_numpy": round(np_per_m, 1),
        "build_s_per_partition_median": round(float(np.median(build)), 2),
        "build_s_per_partition_max": round(max(build), 2),
        "read_s_per_partition_median": round(float(np.median(read)), 2),
        "build_s_total": round(sum(build), 1),
        "read_s_total": round(sum(read), 1),
        "rebuild_s_per_million": round(read_per_m + build_per_m, 2),
        "build_wall_s": round(build_wall, 1),
        "scatter_gather_median_ms": round(sg_median, 1),
        "scatter_gather_p99_ms": round(sg_p99, 1),
        "shard_match_median_ms": round(float(np.median(shard_ms)), 2),
        "shard_match_p99_ms": round(float(np.percentile(shard_ms, 99)), 2),
        "state_reach": reach,
        "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
