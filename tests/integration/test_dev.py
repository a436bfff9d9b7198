"""`make run`'s stack (`tocsin dev`) reaches "delivered" quickly and leaves nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ops.devstack import port_open

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_dev_stack_delivers_the_replayed_alerts_within_a_minute_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL") and not k.startswith("TOCSIN_")
    }
    env["COLUMNS"] = "160"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "ops.cli", "dev", "--citizens", "2000", "--exit-after-replay"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "3/3 alerts delivered" in output, output[-4000:]
    assert elapsed < 60, f"took {elapsed:.1f}s"
    # Every child stopped: the broker and redis ports it printed no longer listen.
    ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", output)]
    assert ports, output[-2000:]
    assert not [p for p in set(ports) if port_open(p)]
