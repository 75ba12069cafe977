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
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web

log = logging.getLogger("bulwark.web")

#: How often the event loop proves it is running; a stamp is cheap.
TICK_SEC = 0.25
#: How soon the event loop's thread hands the GIL to the probe thread when it asks.
SWITCH_SEC = 0.0005
#: A loop that has not run a callback for this long is stuck, not busy: even a flood
#: leaves the loop turning within a fraction of a second.
STALE_AFTER_SEC = 10.0

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


def _response(status: str, body: bytes) -> bytes:
    return (f"HTTP/1.0 {status}\r\nContent-Type: application/health+json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


_OK = _response("200 OK", b'{"status":"pass"}')
_NOT_HERE = _response("404 Not Found", b'{"status":"fail","output":"only /health/live here"}')


class _Responder:
    """A few lines of socket code, not http.server: while a flood holds the GIL, every
    bytecode the probe thread runs waits for a turn, so the fewer the better."""

    def __init__(self, host: str, port: int, heartbeat: LoopHeartbeat,
                 stale_after: float) -> None:
        self.heartbeat = heartbeat
        self.stale_after = stale_after
        self._stop = threading.Event()
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            # Several web processes of one host may share the port, as they share theirs.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self.sock.bind((host, port))
            self.sock.listen(64)
            # accept() wakes this often to notice stop(); probes do not wait for it.
            self.sock.settimeout(0.5)
        except OSError:
            self.sock.close()
            raise

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(2.0)  # a client that sends nothing does not hold the thread
        head = conn.recv(1024)
        path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
        if path.split(b"?", 1)[0] not in (b"/health/live", b"/livez"):
            conn.sendall(_NOT_HERE)
            return
        age = self.heartbeat.age()
        if age > self.stale_after:
            conn.sendall(_response("503 Service Unavailable", _FAIL % int(age)))
        else:
            conn.sendall(_OK)

    def serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by stop()
            with conn, contextlib.suppress(OSError):
                self._answer(conn)

    def stop(self) -> None:
        self._stop.set()


def liveness_ctx(host: str, port: int, *, stale_after: float = STALE_AFTER_SEC
                 ) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context serving `/health/live` on `host:port` from a thread."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        heartbeat = LoopHeartbeat()
        beat = asyncio.create_task(heartbeat.run(), name="loop-heartbeat")
        server = _Responder(host, port, heartbeat, stale_after)
        # The probe thread waits for the GIL after each of its few system calls; the
        # interpreter hands it over after this long (5 ms by default). Shorter only matters
        # while a probe is being answered: an idle thread asks for nothing.
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, SWITCH_SEC))
        thread = threading.Thread(target=server.serve, name="liveness", daemon=True)
        thread.start()
        log.info("liveness probe serving", extra={"host": host, "port": port})
        try:
            yield
        finally:
            sys.setswitchinterval(switch)
            server.stop()
            # The thread notices within accept()'s timeout: wait off the loop.
            await asyncio.get_running_loop().run_in_executor(None, thread.join)
            server.sock.close()
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat

    return ctx
