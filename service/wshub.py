"""Every WebSocket of a web process, the answers their requests are running, and the bus
events they subscribed to.

Fan-out: the View calls us in the bus task. There we only encode the event once (one
frame, shared by every subscriber) and enqueue it; our own task then hands the frame to
each subscribed socket, which sends it with its next flush. So a thousand subscribers
cost the bus task one encode, never a thousand writes.

Heartbeats: one task for every socket of the process, not a timer per socket; each period
it calls `heartbeat()` on each, which pings a peer silent for a whole period and drops one
that stayed silent a period after its ping (service/wsconn.py `WsSocket.beat`).

Shutdown: `drain()` (on SIGTERM) stops new requests and closes each socket with 1012 as
soon as its in-flight answers are done; `abandon()` (shortly before the drain deadline)
cancels what still runs — each such answer ends with a `gateway_shutdown` error frame and
is stored so — and the sockets close with 1012 right after. aiohttp does not know our
sockets (they leave it at the upgrade), so `close()` is what waits for them, and drops
those whose close handshake has not finished in time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Any, Protocol

from bulwark.errors import GatewayError
from bulwark.state import FleetRow, StateRow, View
from service import wsproto
from service.wsanswers import AnswerStore, Key

log = logging.getLogger("bulwark.ws")

DEGRADATION_KEYS = ("degradation/auto", "degradation/operator")
#: After the drain: how long sockets' close handshakes may take before they are dropped
#: (a peer answers a close at once; honcho's SIGKILL comes 5 s after SIGTERM).
_CLOSE_WAIT_SEC = 1.0
#: Events waiting for the fan-out task; a backlog this deep means it is stuck, and the
#: oldest are dropped rather than memory growing.
_EVENTS_MAX = 10_000


class Socket(Protocol):
    """What the hub needs of a socket (service/routes/ws.py `Connection`)."""

    def put_framed(self, frame: bytes) -> None: ...
    def drain(self) -> None: ...
    def request_close(self, code: int, message: bytes) -> None: ...
    def heartbeat(self) -> None: ...
    def abort(self) -> None: ...


class Running(Protocol):
    """An answer in flight (service/routes/ws.py `WsSink`)."""

    cancelled: bool

    def cancel(self) -> None: ...


def provider_data(row: StateRow) -> dict[str, Any]:
    return {"provider": row.provider, "health": str(row.health), "breaker": row.breaker,
            "reason": row.reason}


class WsHub:
    def __init__(self, view: View, store: AnswerStore) -> None:
        self.view = view
        self.store = store
        self.sockets: set[Socket] = set()
        #: Answers in flight on this process by (scope, id), sockets open or not.
        self.running: dict[Key, Running] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._subs: dict[str, set[Socket]] = {t: set() for t in wsproto.TOPICS}
        self._events: collections.deque[tuple[str, bytes]] = collections.deque(
            maxlen=_EVENTS_MAX)
        self._wake = asyncio.Event()
        self._all_gone: asyncio.Future[None] | None = None
        self.draining = False
        self.drain_deadline: float | None = None
        #: Sockets closed for not reading (1008); for /metrics and tests.
        self.slow_closed = 0
        view.subscribe(self._on_row)
        view.subscribe_fleet(self._on_fleet)

    # -- fan-out ------------------------------------------------------------------

    def _on_row(self, row: StateRow) -> None:
        if self._subs["providers"]:
            frame = wsproto.text_frame(wsproto.event("providers", provider_data(row)))
            self._events.append(("providers", frame))
            self._wake.set()

    def _on_fleet(self, row: FleetRow) -> None:
        if row.key in DEGRADATION_KEYS and self._subs["degradation"]:
            frame = wsproto.text_frame(wsproto.event("degradation", row.value, row.key))
            self._events.append(("degradation", frame))
            self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._events:
                topic, frame = self._events.popleft()
                for sock in tuple(self._subs[topic]):
                    sock.put_framed(frame)

    def subscribe(self, sock: Socket, topics: list[str]) -> None:
        """Add `sock` to `topics` and send it the current state of each, so that a UI is
        right from the start and not only after the next change."""
        for topic in dict.fromkeys(topics):
            if sock in self._subs[topic]:
                continue
            self._subs[topic].add(sock)
            if topic == "providers":
                for row in list(self.view.rows.values()):
                    sock.put_framed(wsproto.text_frame(
                        wsproto.event("providers", provider_data(row))))
            else:
                for key in DEGRADATION_KEYS:
                    sock.put_framed(wsproto.text_frame(
                        wsproto.event("degradation", self.view.fleet_value(key), key)))

    def forget(self, sock: Socket) -> None:
        self.sockets.discard(sock)
        for subs in self._subs.values():
            subs.discard(sock)
        if not self.sockets and self._all_gone is not None and not self._all_gone.done():
            self._all_gone.set_result(None)

    # -- heartbeats ---------------------------------------------------------------

    async def heartbeats(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            for sock in tuple(self.sockets):
                sock.heartbeat()

    # -- shutdown -----------------------------------------------------------------

    def drain(self, deadline: float) -> None:
        self.draining = True
        self.drain_deadline = deadline
        for sock in list(self.sockets):
            sock.drain()

    async def abandon(self, err: GatewayError) -> None:
        """The drain period is nearly over: stop every answer still running. (`err` is the
        SSE streams' shutdown error; a socket's answers end with the same code.)"""
        for running in list(self.running.values()):
            running.cancel()

    async def close(self) -> None:
        """After the server stopped: give answers of sockets already gone the rest of the
        drain period, then cancel them (each is stored as failed) and stop."""
        if self.tasks:
            loop = asyncio.get_running_loop()
            left = 0.0 if self.drain_deadline is None else self.drain_deadline - loop.time()
            if left > 0:
                await asyncio.wait(set(self.tasks), timeout=left)
            for running in list(self.running.values()):
                running.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if not self.sockets:
            return
        # Each socket closes once its answers are done (or was told to by drain); one that
        # escaped that (opened during the drain) is told now. The peer answers our close at
        # once; one that does not within the wait is dropped.
        for sock in list(self.sockets):
            sock.request_close(1012, b"service restart")
        self._all_gone = asyncio.get_running_loop().create_future()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._all_gone), _CLOSE_WAIT_SEC)
        for sock in list(self.sockets):
            sock.abort()
