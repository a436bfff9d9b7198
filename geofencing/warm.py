"""Compile the matcher's numba kernels ahead of time: ``python -m geofencing.warm``.

numba compiles on first use and caches the machine code next to the sources
(``__pycache__``). A cold compile of every kernel costs tens of seconds on a small
machine, which a worker must not pay on its first alert, so ``make install`` and the
container build run this once; later processes load the cache in about a second.
"""

from __future__ import annotations

import time

import shapely

from geofencing.matcher import SubscriptionIndex
from streams.records import Subscription


def warm() -> float:
    """Run one small match through every kernel; return the seconds it took."""
    start = time.perf_counter()
    subs = [
        Subscription(id=f"p{i}", kind="place", lon=-93.0 + i * 1e-3, lat=42.0,
                     radius_m=100.0 * (i % 3))
        for i in range(2_000)
    ]
    ring = [[-93.0, 42.0], [-92.9, 42.0], [-92.9, 42.1], [-93.0, 42.0]]
    subs.append(Subscription(id="z", kind="zone",
                             geometry={"type": "Polygon", "coordinates": [ring]}))
    index = SubscriptionIndex.build(subs)
    index.match(shapely.box(-93.5, 41.9, -92.5, 42.05))
    return time.perf_counter() - start


if __name__ == "__main__":
    print(f"matcher kernels ready in {warm():.1f} s")
