"""Attempt deadlines on one shared timer, instead of one event-loop timer per attempt.

`asyncio.timeout` arms a loop timer when it is entered, re-arms it on `reschedule` and
cancels it on exit: three timer operations per upstream attempt (uvloop's timers are libuv
handles), which the chat benchmark measured at 5–9 % of the gateway's CPU per request.
An attempt's deadline is seconds away and nobody needs it to the millisecond, so here every
open deadline is a dict entry, and one callback, armed only while deadlines are open, looks
at them every `TICK_SEC` and cancels the tasks whose time has come. Entering and leaving a
deadline is a dict insert and a pop; a deadline fires at most `TICK_SEC` late.

Semantics are those of `asyncio.timeout`: the task is cancelled, and the block ends with
`TimeoutError` if (and only if) that cancellation is what ended it; a cancellation from
elsewhere (shutdown, the client gone) passes through untouched, and `uncancel()` keeps the
task's cancel count right for the structured-concurrency code above it.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Final

#: How late a deadline may fire. Upstream timeouts are configured in seconds (the shortest
#: in tests are 0.2–0.5 s), so 25 ms is noise to them, and 40 wake-ups a second while
#: attempts are open cost nothing measurable.
TICK_SEC: Final = 0.025


class Deadlines:
    """Every open deadline of one event loop."""

    __slots__ = ("_handle", "_live", "_loop", "tick")

    def __init__(self, tick: float = TICK_SEC) -> None:
        self.tick = tick
        self._live: dict[Deadline, None] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def at(self, when: float) -> Deadline:
        """A deadline at `when`, on the running loop's clock (`loop.time()`)."""
        return Deadline(self, when)

    def after(self, seconds: float) -> Deadline:
        return Deadline(self, self.loop().time() + seconds)

    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or loop.is_closed():
            # One lookup per process (per test loop): get_running_loop() costs a getpid()
            # system call on Python 3.11.
            loop = self._loop = asyncio.get_running_loop()
            self._handle = None
        return loop

    def _open(self, deadline: Deadline) -> None:
        self._live[deadline] = None
        if self._handle is None:
            self._handle = self.loop().call_later(self.tick, self._sweep)

    def _sweep(self) -> None:
        loop = self.loop()
        now = loop.time()
        live = self._live
        due = [d for d in live if d.when <= now]
        for d in due:
            del live[d]
            d.fire()
        self._handle = loop.call_later(self.tick, self._sweep) if live else None

    def __len__(self) -> int:
        return len(self._live)


class Deadline:
    """`with deadlines.at(when) as d:` — the block is cancelled at `when` (TimeoutError)."""

    __slots__ = ("_cancelling", "_fired", "_owner", "_task", "when")

    def __init__(self, owner: Deadlines, when: float) -> None:
        self._owner = owner
        self.when = when
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._fired = False

    def reschedule(self, when: float) -> None:
        """Move the deadline (still open); a deadline that already fired stays fired."""
        self.when = when

    def fire(self) -> None:
        if self._task is not None and not self._fired:
            self._fired = True
            self._task.cancel()

    def __enter__(self) -> Deadline:
        owner = self._owner
        task = asyncio.current_task(owner.loop())
        if task is None:
            raise RuntimeError("a Deadline must be entered inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        owner._open(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._owner._live.pop(self, None)
        if self._fired:
            assert self._task is not None
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc
