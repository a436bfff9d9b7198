"""A short sustained-load run (``benchmarks/load.py`` for ~30 s) on real processes.

A tornado outbreak over central Iowa (overlapping storm-track polygons, updates,
cancels) at a steady rate, with subscriptions churning throughout, against 12,000
citizens: the consumer lag does not grow and drains to zero, every citizen inside a
warning is served exactly once (cancellation notices exactly to those warned), and the
worker's RSS stays flat.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.load import LoadConfig, run_load

pytestmark = pytest.mark.integration


def test_sustained_outbreak_with_churn_keeps_up_serves_once_and_stays_flat(
    tmp_path: Path, data_dir: Path
) -> None:
    f = run_load(LoadConfig(duration_s=30.0), tmp_path, data_dir)
    print(f"load: {f.alerts}+{f.updates}+{f.cancels} CAPs, {f.pushes} pushes, "
          f"lag {f.lag_samples} final {f.final_lag} in {f.drain_s:.1f}s, "
          f"RSS {[round(x) for x in f.rss_samples_mb]} MB, "
          f"complete p95 {f.complete_p95_s:.2f}s")  # fmt: skip
    assert f.alerts >= 10 and f.updates >= 1 and f.cancels >= 1, "the mix was not exercised"
    assert f.expected > 1000, "too few citizens inside the warnings to prove anything"
    assert f.lost == 0, f"{f.lost} citizens inside a warning were never served"
    assert f.duplicates == 0, f"{f.duplicates} repeated pushes"
    assert f.unexpected == 0, f"{f.unexpected} citizens outside a warning were served"
    assert f.notice_mismatches == 0, "cancellation notices did not match those warned"
    # Lag: back to zero within the drain deadline, and not growing while load ran.
    assert f.final_lag == 0, f"lag {f.final_lag} after {f.drain_s:.0f}s of draining"
    assert f.lag_last_third <= 2 * f.lag_first_third + 50, f.lag_samples
    # Memory flat after warm-up: within 25 % or 40 MB (allocator noise, caches filling).
    assert f.rss_max_mb <= max(f.rss_start_mb * 1.25, f.rss_start_mb + 40), f.rss_samples_mb
