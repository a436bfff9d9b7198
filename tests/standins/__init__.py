"""Local HTTP stand-ins for the push (FCM HTTP v1) and SMS (Twilio Messages) providers.

Each stand-in is an aiohttp application that speaks the real wire format -- request
validation, auth, error bodies as the real services send them -- records every
message it accepts (for exactly-once assertions), and injects faults on demand:
a share of 503s, 429s with ``Retry-After``, connections closed without an answer,
latency, and per-address failures.

Two ways to run one:

- in-process: ``async with FcmStandIn(...).running() as fcm: ...`` (``fcm.url``,
  ``fcm.received``, ``fcm.faults``; ``await fcm.stop()`` / ``await fcm.start()``
  refuse and accept connections again on the same port);
- as a process, so client and server do not share one event loop or one core:
  ``StandInProcess.start("tests.standins.fcm", [...])``, which runs
  ``python -m tests.standins.fcm --port N ...`` and talks to it through the control
  endpoints under ``/_standin/`` (stats, received, faults, reset).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

from aiohttp import web

REPO = Path(__file__).resolve().parents[2]
DATA_OTHER = REPO / "data" / "other"

__all__ = [
    "DATA_OTHER",
    "Faults",
    "Received",
    "SmtpRecorder",
    "StandIn",
    "StandInProcess",
    "self_signed",
    "serve_main",
]


@dataclass
class Faults:
    """What a stand-in does wrong, and how often (shares are per request, 0..1)."""

    share_503: float = 0.0
    share_429: float = 0.0
    share_close: float = 0.0  # close the connection without answering
    retry_after_s: float = 1.0  # sent with every 429
    retry_after_on_503: bool = True  # ... and with 503s
    first_attempt_only: bool = False  # only an address's first request may fail
    latency_s: float = 0.0
    down: bool = False  # close every connection without answering
    # Hang: hold every request unanswered while set (the caller times out); when it is
    # cleared, the held requests are dropped unrecorded, as a provider that hung
    # never accepted them.
    hang: bool = False
    seed: int = 0

    def update(self, values: dict[str, Any]) -> None:
        """Set the given fields (unknown names are an error)."""
        for key, value in values.items():
            if not hasattr(self, key):
                raise KeyError(key)
            setattr(self, key, type(getattr(self, key))(value))


@dataclass
class Received:
    """One accepted message: the address it was for, its alert, when it arrived."""

    address: str
    alert_key: str
    at: float
    body: dict[str, Any] | None = None
    peer: int = 0  # the client's source port: one per connection


@dataclass
class StandIn:
    """Base class: recording, fault draws, control routes, start/stop on one port."""

    host: str = "127.0.0.1"
    port: int = 0
    keep_bodies: bool = True
    faults: Faults = field(default_factory=Faults)
    received: list[Received] = field(default_factory=list)
    requests: int = 0
    answered: Counter[int] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.faults.seed)
        self._seen: set[str] = set()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    # -- to implement ---------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        """Add the provider's own routes."""
        raise NotImplementedError

    # -- helpers for handlers -------------------------------------------------------------

    async def injected(self, address: str) -> str | None:
        """Apply latency and draw a fault for a request to ``address``: ``"close"``,
        ``"503"``, ``"429"`` or ``None``."""
        self.requests += 1
        f = self.faults
        if f.latency_s:
            await asyncio.sleep(f.latency_s)
        if f.hang:
            # A plain field flipped by the control endpoint (Faults.update), not an Event.
            while self.faults.hang:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            return "close"
        if f.down:
            return "close"
        if not (f.share_close or f.share_503 or f.share_429):
            return None
        if f.first_attempt_only:
            if address in self._seen:
                return None
            self._seen.add(address)
        draw = self._rng.random()
        if draw < f.share_close:
            return "close"
        if draw < f.share_close + f.share_503:
            return "503"
        if draw < f.share_close + f.share_503 + f.share_429:
            return "429"
        return None

    @staticmethod
    def drop(request: web.Request) -> web.Response:
        """Drop the connection without an answer (what a crashing server does)."""
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=500)  # never reaches the client

    def record(
        self, request: web.Request, address: str, alert_key: str, body: dict[str, Any] | None
    ) -> None:
        """Remember an accepted message."""
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.received.append(
            Received(
                address,
                alert_key,
                time.time(),
                body if self.keep_bodies else None,
                peer[1] if peer else 0,
            )
        )

    def answer(
        self, status: int, body: bytes, headers: dict[str, str] | None = None
    ) -> web.Response:
        """A JSON answer, counted by status."""
        self.answered[status] += 1
        return web.Response(
            status=status, body=body, headers=headers, content_type="application/json"
        )

    # -- statistics and control -----------------------------------------------------------

    def stats(self, alert_key: str | None = None) -> dict[str, Any]:
        """Accepted messages, distinct (address, alert) pairs, duplicates."""
        rows = [r for r in self.received if alert_key is None or r.alert_key == alert_key]
        distinct = len({(r.address, r.alert_key) for r in rows})
        return {
            "requests": self.requests,
            "accepted": len(rows),
            "distinct": distinct,
            "duplicates": len(rows) - distinct,
            "answered": {str(k): v for k, v in sorted(self.answered.items())},
            "first_at": min((r.at for r in rows), default=None),
            "last_at": max((r.at for r in rows), default=None),
        }

    def reset(self) -> None:
        """Forget everything received and clear the faults."""
        self.received.clear()
        self.requests = 0
        self.answered.clear()
        self.faults = Faults()
        self._rng = random.Random(0)
        self._seen.clear()

    def _control(self, app: web.Application) -> None:
        async def stats(request: web.Request) -> web.Response:
            return web.json_response(self.stats(request.query.get("alert_key")))

        async def received(request: web.Request) -> web.Response:
            rows: list[list[Any]] = [[r.address, r.alert_key, r.at] for r in self.received]
            if request.query.get("body"):  # append each kept body (see keep_bodies)
                for row, r in zip(rows, self.received, strict=True):
                    row.append(r.body)
            return web.json_response(rows)

        async def faults(request: web.Request) -> web.Response:
            self.faults.update(await request.json())
            self._rng = random.Random(self.faults.seed)
            return web.json_response(asdict(self.faults))

        async def reset(request: web.Request) -> web.Response:
            self.reset()
            return web.json_response({})

        app.router.add_get("/_standin/stats", stats)
        app.router.add_get("/_standin/received", received)
        app.router.add_post("/_standin/faults", faults)
        app.router.add_post("/_standin/reset", reset)

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL (``http://127.0.0.1:<port>``)."""
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        """Listen (again) on ``port``; a free port is picked the first time if 0."""
        app = web.Application(client_max_size=4 * 1024 * 1024)
        self.routes(app)
        self._control(app)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        # A deep backlog: a client opening its whole pool at once must not lose SYNs
        # (the kernel would retry them only after a second).
        self._site = web.TCPSite(
            self._runner, self.host, self.port, reuse_address=True, backlog=4096
        )
        await self._site.start()
        if not self.port:
            server = self._site._server
            sockets = getattr(server, "sockets", None) or []
            self.port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Go down: close every connection and refuse new ones (same port on start)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = self._site = None

    async def close(self) -> None:
        """Stop and release everything."""
        await self.stop()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Self]:
        """Serve for the duration of the ``async with`` block."""
        await self.start()
        try:
            yield self
        finally:
            await self.close()


def serve_main(
    description: str,
    add_args: Callable[[argparse.ArgumentParser], None],
    build: Callable[[argparse.Namespace], StandIn],
) -> None:
    """``python -m tests.standins.<x>``: serve until SIGTERM/SIGINT.

    Prints ``READY <url>`` on stdout once listening, so a parent can wait for it.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--share-503", type=float, default=0.0)
    parser.add_argument("--share-429", type=float, default=0.0)
    parser.add_argument("--retry-after", type=float, default=1.0)
    parser.add_argument("--keep-bodies", action="store_true")
    add_args(parser)
    args = parser.parse_args()

    async def run() -> None:
        standin = build(args)
        standin.host, standin.port, standin.keep_bodies = args.host, args.port, args.keep_bodies
        standin.faults.update(
            {
                "latency_s": args.latency,
                "share_503": args.share_503,
                "share_429": args.share_429,
                "retry_after_s": args.retry_after,
            }
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with standin.running():
            print(f"READY {standin.url}", flush=True)
            await stop.wait()

    asyncio.run(run())


@dataclass
class StandInProcess:
    """A stand-in running as a child process (``python -m <module> ...``)."""

    proc: subprocess.Popen[str]
    url: str

    @classmethod
    def start(cls, module: str, args: list[str], timeout: float = 20.0) -> StandInProcess:
        """Spawn the stand-in and wait for its ``READY`` line."""
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("READY "):
                return cls(proc, line.split()[1])
            if not line and proc.poll() is not None:
                break
        proc.kill()
        raise RuntimeError(f"stand-in {module} did not start")

    def _call(self, path: str, payload: dict[str, Any] | None = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(
            f"{self.url}/_standin/{path}",
            data=data,
            method="POST" if data is not None else "GET",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def stats(self, alert_key: str | None = None) -> dict[str, Any]:
        """The stand-in's counters (see :meth:`StandIn.stats`)."""
        return self._call("stats" + (f"?alert_key={alert_key}" if alert_key else ""))

    def received(self, bodies: bool = False) -> list[list[Any]]:
        """Every accepted ``[address, alert_key, at]`` (``+ [body]`` with ``bodies``;
        the stand-in must have been started with ``--keep-bodies``)."""
        return self._call("received" + ("?body=1" if bodies else ""))

    def set_faults(self, **values: Any) -> dict[str, Any]:
        """Change fault injection."""
        return self._call("faults", values)

    def reset(self) -> None:
        """Forget received messages and clear faults."""
        self._call("reset", {})

    def stop(self) -> None:
        """Terminate the process and wait for it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, for a local STARTTLS server."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class SmtpRecorder:
    """An aiosmtpd handler that records deliveries and refuses as told.

    ``dead`` addresses get ``550`` at RCPT (no such mailbox); ``greylisted`` ones a
    ``451`` on their first attempt only, as greylisting relays do.
    """

    def __init__(self, dead: set[str] | None = None, greylisted: set[str] | None = None) -> None:
        self.dead = dead or set()
        self.greylisted = greylisted or set()
        self.seen: set[str] = set()
        self.delivered: list[str] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        """Accept, refuse for good, or greylist one recipient."""
        if address in self.dead:
            return f"550 5.1.1 <{address}>: mailbox unavailable"
        if address in self.greylisted and address not in self.seen:
            self.seen.add(address)
            return "451 4.7.1 greylisted, try again"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """Record the accepted recipients."""
        self.delivered.extend(envelope.rcpt_tos)
        return "250 Message accepted"
