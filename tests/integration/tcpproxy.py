"""A small asyncio TCP proxy that can cut every connection through it, for fault tests.

The proxy listens on a loopback port and relays bytes to one upstream address. It runs
its own event loop in a background thread, so it keeps relaying while the test blocks
or switches event loops (``asyncio.run`` per test), and it can be told to:

- ``cut()``: close every open connection at once (both sides see a reset/EOF) and
  refuse new ones (the listening socket is closed, so connects get ECONNREFUSED,
  which is what a broker going away looks like to a client);
- ``restore()``: listen again on the same port, so clients reconnect to where they
  were.

Used between the stream worker and tansu: tansu advertises the proxy's address, so
every broker connection (bootstrap and the advertised one) goes through here.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

_CHUNK = 65536


class TcpProxy:
    """Relay ``127.0.0.1:<port>`` to ``upstream_host:upstream_port``; cut and restore."""

    def __init__(self, upstream_host: str, upstream_port: int, port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = port
        self.connections = 0  # connections accepted so far
        self.cuts = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # -- control (any thread) ------------------------------------------------------------

    def start(self) -> TcpProxy:
        """Start the loop thread and listen; returns self (``port`` is set)."""
        self._thread.start()
        self._call(self._listen())
        return self

    def cut(self) -> int:
        """Stop listening and close every relayed connection; return how many."""
        self.cuts += 1
        return int(self._call(self._cut()))

    def restore(self) -> None:
        """Listen again on the same port."""
        self._call(self._listen())

    def stop(self) -> None:
        """Cut everything and stop the loop thread."""
        if self._thread.is_alive():
            self._call(self._cut())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    @property
    def open_connections(self) -> int:
        """Connections relayed right now (client side)."""
        return len(self._writers) // 2

    @contextlib.contextmanager
    def running(self) -> Iterator[TcpProxy]:
        """``with TcpProxy(...).running() as proxy:`` starts and stops it."""
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def _call(self, coro: Any) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(10)

    # -- the relay (the proxy's loop) -----------------------------------------------------

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True, backlog=512
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self) -> int:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        writers = list(self._writers)
        for writer in writers:
            transport = writer.transport
            # abort(): no lingering FIN handshake, the peer sees the connection die now.
            transport.abort()
        self._writers.clear()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        return len(writers) // 2

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:  # accepted in the instant of a cut
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer), self._pipe(up_reader, writer)
            )
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(_CHUNK):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()
