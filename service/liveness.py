"""`/health/live` on a port of its own, answered by a thread, so that a flood of clients
on the API port cannot make a liveness probe wait (BULWARK_HEALTH_PORT; docs/OPERATIONS.md).

Why a thread: under a flood the event loop has thousands of ready sockets; a probe on the
API port waits for its turn behind all of them, and a new connection may not even be
accepted while the listen backlog is full, so the orchestrator restarts a process that is
doing exactly its job. The thread has its own listening socket and backlog and needs the
GIL only for a moment per probe (Python hands it over every few milliseconds).

What it still checks: a thread alone would answer "alive" for a process whose event loop
is stuck, which is the one thing liveness is for. So the loop stamps a heartbeat every
TICK_SEC, and the thread answers 503 once that stamp is older than `stale_after`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from aiohttp import web

log = logging.getLogger("bulwark.web")

#: How often the event loop proves it is running; a stamp is cheap.
TICK_SEC = 0.25
#: A loop that has not run a callback for this long is stuck, not busy: even a flood
#: leaves the loop turning within a fraction of a second.
STALE_AFTER_SEC = 10.0

_PASS = b'{"status":"pass"}'
_FAIL = b'{"status":"fail","output":"the event loop has not run for %d s"}'


class LoopHeartbeat:
    """The event loop's last sign of life, on the monotonic clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.stamp = clock()

    def age(self) -> float:
        return self._clock() - self.stamp

    async def run(self) -> None:
        while True:
            self.stamp = self._clock()
            await asyncio.sleep(TICK_SEC)


class _Server(HTTPServer):
    # Several web processes of one host may share the health port, as they share theirs.
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], heartbeat: LoopHeartbeat,
                 stale_after: float) -> None:
        self.heartbeat = heartbeat
        self.stale_after = stale_after
        super().__init__(address, _Handler, bind_and_activate=False)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            self.server_bind()
            self.server_activate()
        except OSError:
            self.server_close()
            raise


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # Probes come and go: no keep-alive bookkeeping, no Server banner worth sending.
    protocol_version = "HTTP/1.0"
    server_version = "bulwark"
    sys_version = ""

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] not in ("/health/live", "/livez"):
            self._send(404, b'{"status":"fail","output":"only /health/live here"}')
            return
        age = self.server.heartbeat.age()
        if age > self.server.stale_after:
            self._send(503, _FAIL % int(age))
        else:
            self._send(200, _PASS)

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/health+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a probe every few seconds is not worth a log line


def liveness_ctx(host: str, port: int, *, stale_after: float = STALE_AFTER_SEC
                 ) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context serving `/health/live` on `host:port` from a thread."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        heartbeat = LoopHeartbeat()
        beat = asyncio.create_task(heartbeat.run(), name="loop-heartbeat")
        server = _Server((host, port), heartbeat, stale_after)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                  name="liveness", daemon=True)
        thread.start()
        log.info("liveness probe serving", extra={"host": host, "port": port})
        try:
            yield
        finally:
            # shutdown() waits for serve_forever to notice: off the loop.
            await asyncio.get_running_loop().run_in_executor(None, server.shutdown)
            server.server_close()
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat

    return ctx
