"""Per-key rate limits that hold across every web process, with no Postgres on the way.

Each client key has two token buckets — requests per minute and tokens per minute — of
that size, refilled continuously (`cap / 60` a second), so a fresh key may spend its whole
minute at once. The buckets live in Postgres (`rate_buckets`), and no request ever waits
for them: each process holds a small *allowance* per key, leased from the shared bucket
by one background task, and a request only spends from that allowance in memory.

- **Spending** (request path, sync): a request costs 1 from the request allowance; it is
  admitted while the token allowance is above zero, and its tokens (usage from the answer,
  or an estimate) are charged afterwards, so the token allowance may go below zero.
- **Leasing** (background, one round trip for every key that needs it): every
  `interval` seconds, or at once when a request finds the allowance empty, the task asks
  `bulwark_rate_lease()` for enough to cover the recent rate for two intervals plus every
  waiting request, pays what the token allowance owes, and hands back what an idle key
  holds. The function refills, charges and grants under a row lock, so two processes
  never both get the same budget.
- **Waiting**: a request that finds the allowance empty while the shared bucket was
  (at the last lease, plus refill since) not empty waits for the next lease, at most
  `max_wait`; otherwise it is refused at once with 429 and `Retry-After`. This wait is
  the one place a request depends on a Postgres round trip, and only a request that the
  allowance could not pay for anyway.

Bounds (docs/ADMIN.md): requests are paid for before they are admitted, from budget that
the shared bucket granted once, so the fleet admits at most the bucket's allowance —
*no overshoot* — while Postgres answers; the cost is under-use, by at most what the
processes hold unspent (a few requests per process at the recent rate). Tokens are charged
after the answer: the fleet can overshoot the token bucket by the tokens of the requests
in flight when it ran dry. Without Postgres (none configured, or unreachable) each process
enforces the full limits on its own: N processes may then admit up to N times the limit.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple, Protocol

from bulwark import metrics
from bulwark.errors import GatewayError, RateLimited
from bulwark.providers.base import StreamEvent
from bulwark.wire import ChatCompletion, ChatRequest, Chunk
from service.dispatch import Fallback, Sink

log = logging.getLogger("bulwark.ratelimit")

#: Seconds between lease rounds while a key is busy: the refill delay of an allowance.
LEASE_INTERVAL = 0.1
#: Longest a request waits for a lease when its allowance is empty.
MAX_WAIT = 0.25
#: An allowance of a key unused this long is handed back to the shared bucket.
IDLE_SEC = 2.0
#: Tokens a request is assumed to cost before any of that key's requests was measured.
FIRST_TOKEN_GUESS = 256.0
#: Keys tracked in one process; past this the least recently used idle ones are dropped.
MAX_KEYS = 100_000


class LeaseItem(NamedTuple):
    key_id: str
    dim: str  # "r" requests, "t" tokens
    cap: float
    rate: float  # per second
    want: float
    debt: float  # charged to the shared bucket; negative: handed back


class LeaseResult(NamedTuple):
    key_id: str
    dim: str
    granted: float
    level: float


class Store(Protocol):
    """Where the shared buckets are: Postgres, or this process alone."""

    async def lease(self, items: Sequence[LeaseItem]) -> list[LeaseResult] | None: ...


class LocalStore:
    """The buckets in this process only: exact for one process, N× the limit for N."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._levels: dict[tuple[str, str], tuple[float, float]] = {}

    async def lease(self, items: Sequence[LeaseItem]) -> list[LeaseResult] | None:
        return self.lease_now(items)

    def lease_now(self, items: Sequence[LeaseItem]) -> list[LeaseResult]:
        now = self._clock()
        out = []
        for it in items:
            level, at = self._levels.get((it.key_id, it.dim), (it.cap, now))
            refilled = min(it.cap, min(it.cap, level + it.rate * max(0.0, now - at)) - it.debt)
            granted = max(0.0, min(it.want, refilled))
            self._levels[(it.key_id, it.dim)] = (refilled - granted, now)
            out.append(LeaseResult(it.key_id, it.dim, granted, refilled - granted))
        return out


class PgStore:
    """The buckets in Postgres, shared by every process (`bulwark_rate_lease`)."""

    SQL = "SELECT * FROM bulwark_rate_lease($1, $2, $3, $4, $5, $6)"

    def __init__(self, run: Callable[[str, Sequence[object]],
                                     Awaitable[list[tuple[Any, ...]] | None]]) -> None:
        self._run = run

    async def lease(self, items: Sequence[LeaseItem]) -> list[LeaseResult] | None:
        ordered = sorted(items, key=lambda i: (i.key_id, i.dim))
        rows = await self._run(self.SQL, (
            [i.key_id for i in ordered], [i.dim for i in ordered],
            [i.cap for i in ordered], [i.rate for i in ordered],
            [i.want for i in ordered], [i.debt for i in ordered]))
        if rows is None:
            return None
        return [LeaseResult(str(r[0]), str(r[1]), float(r[2]), float(r[3])) for r in rows]


class Dim:
    """One bucket as one process sees it: its allowance here, and the shared level."""

    __slots__ = ("_left", "_shown", "at", "cap", "keys", "limit", "local", "need", "rate",
                 "shared", "spent", "unit")

    def __init__(self, cap: int, unit: float, now: float, name: str = "requests") -> None:
        self.cap = float(cap)
        self.rate = cap / 60.0
        # The x-ratelimit-* header names and the limit's text, made once: the headers are
        # built on every keyed request.
        self.keys = (f"x-ratelimit-limit-{name}", f"x-ratelimit-remaining-{name}",
                     f"x-ratelimit-reset-{name}")
        self.limit = str(cap)
        self._left = -1
        self._shown = ("", "")
        #: What one request needs to be admitted (1 for requests; tokens: anything > 0).
        self.unit = unit
        self.local = 0.0
        #: The shared level at the last lease (None: never leased) and when (monotonic).
        self.shared: float | None = None
        self.at = now
        #: Spent since the last lease round (for sizing the next lease).
        self.spent = 0.0
        #: Requests waiting for this bucket now.
        self.need = 0

    def shared_now(self, now: float) -> float:
        if self.shared is None:
            return self.cap
        return min(self.cap, self.shared + self.rate * (now - self.at))

    def remaining(self, now: float) -> float:
        return max(0.0, min(self.cap, self.local + self.shared_now(now)))

    def put_headers(self, out: dict[str, str], now: float) -> None:
        left = int(self.remaining(now))
        if left != self._left:  # reformatted only when the whole number moved
            self._left = left
            self._shown = (str(left), _duration((self.cap - left) / self.rate))
        k_limit, k_remaining, k_reset = self.keys
        out[k_limit] = self.limit
        out[k_remaining], out[k_reset] = self._shown

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until the shared bucket holds `amount` again (at its refill rate)."""
        missing = amount - self.shared_now(now) - max(0.0, self.local)
        return max(0.0, missing / self.rate) if self.rate > 0 else 60.0


class Budget:
    """One key's limits in this process."""

    __slots__ = ("key_id", "last_used", "refilled", "req", "tok", "tokens_per_request")

    def __init__(self, key_id: str, rpm: int | None, tpm: int | None, now: float) -> None:
        self.key_id = key_id
        self.req = Dim(rpm, 1.0, now, "requests") if rpm else None
        self.tok = Dim(tpm, 1e-9, now, "tokens") if tpm else None
        self.last_used = now
        self.tokens_per_request = FIRST_TOKEN_GUESS
        self.refilled = asyncio.Event()

    def matches(self, rpm: int | None, tpm: int | None) -> bool:
        return ((self.req.cap if self.req else None) == (float(rpm) if rpm else None)
                and (self.tok.cap if self.tok else None) == (float(tpm) if tpm else None))

    def _take(self) -> bool:
        req, tok = self.req, self.tok
        if req is not None and req.local < 1.0:
            return False
        if tok is not None and tok.local <= 0.0:
            return False
        if req is not None:
            req.local -= 1.0
            req.spent += 1.0
        return True


class Meter:
    """Tokens one keyed request used: the answer's usage, else an estimate (~4 characters a
    token, the usual rule of thumb for OpenAI's tokenizers on English text)."""

    __slots__ = ("budget", "chars", "prompt_chars", "usage")

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.usage: int | None = None
        self.prompt_chars = 0
        self.chars = 0

    def request(self, chat: ChatRequest) -> None:
        # A few tokens per message of framing (role, separators), as OpenAI counts them.
        self.prompt_chars = sum(len(m.text()) + 16 for m in chat.messages)

    def completion(self, parsed: ChatCompletion) -> None:
        if parsed.usage is not None and parsed.usage.total_tokens:
            self.usage = parsed.usage.total_tokens
            return
        for c in parsed.choices:
            self.chars += len(c.message.content or "")

    def chunk(self, chunk: Chunk) -> None:
        usage = chunk.usage
        if usage is not None and usage.total_tokens:
            self.usage = usage.total_tokens
            return
        for c in chunk.choices:
            content = c.delta.content
            if isinstance(content, str):
                self.chars += len(content)

    def tokens(self) -> int:
        if self.usage is not None:
            return self.usage
        return math.ceil((self.prompt_chars + self.chars) / 4)


class MeteredSink:
    """A stream's sink that also counts what it carries for the key's token limit (the
    usage chunk when the provider sends one, the streamed text otherwise)."""

    __slots__ = ("_inner", "_meter")

    def __init__(self, inner: Sink, meter: Meter) -> None:
        self._inner = inner
        self._meter = meter

    async def start(self, provider: str, attempts: int, fallback: Fallback, *,
                    cache_age: float | None = None) -> None:
        await self._inner.start(provider, attempts, fallback, cache_age=cache_age)

    async def event(self, ev: StreamEvent) -> None:
        self._meter.chunk(ev.chunk)
        await self._inner.event(ev)

    async def done(self) -> None:
        await self._inner.done()

    async def fail(self, err: GatewayError) -> None:
        await self._inner.fail(err)


def _duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1.0:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60.0:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


class Limiter:
    def __init__(self, store: Store | None = None, *, interval: float = LEASE_INTERVAL,
                 max_wait: float = MAX_WAIT, clock: Callable[[], float] = time.monotonic) -> None:
        self.store: Store = store or LocalStore(clock)
        self.interval = interval
        self.max_wait = max_wait
        self._clock = clock
        self._budgets: dict[str, Budget] = {}
        self._wake = asyncio.Event()
        #: Serves leases while the shared store cannot (Postgres unreachable).
        self._local = store if isinstance(store, LocalStore) else LocalStore(clock)
        self._shared_back_at = 0.0
        # Counters for /metrics and the benchmarks.
        self.admitted = 0
        self.refused = 0
        self.lease_rounds = 0
        self.lease_failures = 0

    # -- the request path --------------------------------------------------------------

    def budget(self, key_id: str, rpm: int | None, tpm: int | None) -> Budget:
        b = self._budgets.get(key_id)
        if b is None or not b.matches(rpm, tpm):
            if len(self._budgets) >= MAX_KEYS:
                self._forget_idle()
            b = self._budgets[key_id] = Budget(key_id, rpm, tpm, self._clock())
        return b

    async def admit(self, b: Budget) -> dict[str, str]:
        """Spend one request (and require a token allowance); the x-ratelimit-* headers.
        Raises RateLimited (429, Retry-After) when the key is over its limits."""
        now = self._clock()
        b.last_used = now
        if not b._take():
            await self._wait(b, now)
        self.admitted += 1
        return self.headers(b)

    async def _wait(self, b: Budget, now: float) -> None:
        deadline = now + self.max_wait
        while True:
            short = [d for d in (b.req, b.tok) if d is not None and d.local < d.unit]
            # Wait only for budget the shared bucket had at the last lease (plus refill).
            for d in short:
                # (A token allowance below zero is owed, and paid before anything is lent.)
                if d.shared_now(now) + min(0.0, d.local) < d.unit:
                    self._refuse(b, d, now)
            if now >= deadline:
                self._refuse(b, short[0] if short else None, now)
            for d in short:
                d.need += 1
            self._wake.set()
            event = b.refilled
            try:
                async with asyncio.timeout(deadline - now):
                    await event.wait()
            except TimeoutError:
                pass
            finally:
                for d in short:
                    d.need -= 1
            now = self._clock()
            if b._take():
                return

    def _refuse(self, b: Budget, d: Dim | None, now: float) -> None:
        self.refused += 1
        # Tokens: until what this process owes is paid back and one more is there.
        need = 1.0 if d is b.req else 1.0 - min(0.0, d.local) if d is not None else 1.0
        wait = d.wait_for(need, now) if d is not None else 1.0
        which = "tokens" if d is not None and d is b.tok else "requests"
        metrics.RATE_LIMITED.labels(which).inc()
        raise RateLimited(
            f"This key is over its {which} per minute limit; retry after the delay given.",
            code="rate_limit_exceeded", retry_after=max(wait, self.interval))

    def charge(self, b: Budget, tokens: float) -> None:
        """Charge a finished request's tokens (usage, or an estimate)."""
        tok = b.tok
        if tok is None or tokens <= 0:
            return
        tok.local -= tokens
        tok.spent += tokens
        b.tokens_per_request += (tokens - b.tokens_per_request) * 0.2

    def headers(self, b: Budget) -> dict[str, str]:
        now = self._clock()
        out: dict[str, str] = {}
        if b.req is not None:
            b.req.put_headers(out, now)
        if b.tok is not None:
            b.tok.put_headers(out, now)
        return out

    # -- leasing (one background task) ----------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            await self.lease_round()

    async def lease_round(self) -> None:
        now = self._clock()
        plan: list[tuple[Budget, Dim, LeaseItem, float]] = []
        for b in self._budgets.values():
            idle = now - b.last_used > IDLE_SEC
            for dim, d in (("r", b.req), ("t", b.tok)):
                if d is None:
                    continue
                item, moved = self._item(b, dim, d, idle)
                if item is not None:
                    d.local += moved
                    plan.append((b, d, item, moved))
        if not plan:
            return
        self.lease_rounds += 1
        items = [p[2] for p in plan]
        results: list[LeaseResult] | None = None
        if now >= self._shared_back_at:
            try:
                results = await self.store.lease(items)
            except Exception:
                log.exception("rate-limit lease failed")
            if results is None:
                self.lease_failures += 1
                # Try the shared buckets again in a second; until then (and not once
                # per lease interval, each logged) serve on buckets of our own.
                self._shared_back_at = self._clock() + 1.0
        if results is None:
            # The debt is still owed and the hand-back still ours: undo the moves.
            for _, d, _, moved in plan:
                d.local -= moved
            results = self._local.lease_now([i._replace(debt=0.0) for i in items])
        by_key = {(r.key_id, r.dim): r for r in results}
        now = self._clock()
        woken: set[int] = set()
        for b, d, item, _ in plan:
            r = by_key.get((item.key_id, item.dim))
            if r is None:
                continue
            d.local += r.granted
            d.shared = r.level
            d.at = now
            d.spent = 0.0
            if id(b) not in woken:
                woken.add(id(b))
                b.refilled.set()
                b.refilled = asyncio.Event()

    def _item(self, b: Budget, dim: str, d: Dim,
              idle: bool) -> tuple[LeaseItem | None, float]:
        """What to ask of the shared bucket for one Dim, and the change to the local
        allowance that asking implies (a debt paid, an allowance handed back)."""
        if idle:
            if d.local >= 1.0 or d.local < 0.0:
                # Hand back whole units (or pay a debt) and hold nothing while idle.
                give = math.floor(d.local) if d.local > 0 else d.local
                return LeaseItem(b.key_id, dim, d.cap, d.rate, 0.0, -give), -give
            return None, 0.0
        per_request = 1.0 if dim == "r" else max(1.0, b.tokens_per_request)
        # Cover the recent rate for two lease intervals, and everyone waiting now.
        recent = d.spent / self.interval if d.spent else 0.0
        target = min(d.cap, recent * 2 * self.interval + d.need * per_request)
        if d.need == 0 and d.local >= target / 2 and d.local >= 0.0:
            return None, 0.0
        debt = -d.local if d.local < 0.0 else 0.0
        want = max(0.0, target - max(d.local, 0.0))
        if want <= 0.0 and debt <= 0.0:
            return None, 0.0
        return LeaseItem(b.key_id, dim, d.cap, d.rate, want, debt), debt

    def _forget_idle(self) -> None:
        now = self._clock()
        for key_id, b in list(self._budgets.items()):
            if now - b.last_used > IDLE_SEC * 10:
                del self._budgets[key_id]
