"""`make run`'s stack (`tocsin dev`) reaches "delivered" quickly and leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
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


def test_ctrl_c_stops_the_worker_and_every_service(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL") and not k.startswith("TOCSIN_")
    }
    env["COLUMNS"] = "160"
    log = tmp_path / "dev.out"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "dev", "--citizens", "500"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 90
        while "running" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        assert "running" in log.read_text(), log.read_text()[-3000:]
        # The console API is up, and the demo originator's token printed on start works.
        text = log.read_text()
        base = re.search(r"API (http://127\.0\.0\.1:\d+)", text).group(1)  # type: ignore[union-attr]
        token = re.search(r"demo originator token: (\S+)", text).group(1)  # type: ignore[union-attr]
        request = urllib.request.Request(f"{base}/me", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.load(response)["roles"] == ["originator"]
        console = re.search(r"console (http://\S+/console/)", text).group(1)  # type: ignore[union-attr]
        with urllib.request.urlopen(console, timeout=10) as response:
            assert "Tocsin" in response.read().decode()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    pids = [int(p) for p in re.findall(r"worker pid (\d+)", output)]
    ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", output)]
    assert pids and ports
    assert not [p for p in set(ports) if port_open(p)], "a service still listens"
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        ), "the worker still runs"
