"""The attempt loop: retries, failover, breakers, deadlines — for whole answers and streams.

For a stream, nothing is sent to the client until a provider has produced its first content
chunk: a provider failing before that is replaced invisibly. After the first byte, a failure
is a final `data: {"error": …}` event — never a clean end without finish_reason and [DONE],
and never a silent switch to another provider (that would mix two answers in one).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from typing import Literal, NamedTuple, Protocol

from bulwark.errors import (
    C,
    DeadlineExceeded,
    GatewayError,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
    UpstreamRejected,
    final_error,
)
from bulwark.providers.base import Call, Completion, StreamEvent
from bulwark.retry import Backoff, retry_delay
from bulwark.wire import ChatCompletion, ChatRequest, Chunk
from service.router import ProviderRuntime, Router

log = logging.getLogger("bulwark.dispatch")

#: How an answer came about (`x-bulwark-fallback`, CONTRACT.md "When nothing can answer now").
Fallback = Literal["none", "failover", "model", "cache", "canned", "queued"]


class Answer(NamedTuple):
    completion: Completion
    provider: str
    attempts: int
    fallback: Fallback


class Sink(Protocol):
    """Where a stream goes: SSE response, WebSocket, …"""

    async def start(self, provider: str, attempts: int, fallback: Fallback) -> None: ...
    async def event(self, ev: StreamEvent) -> None: ...
    async def done(self) -> None: ...
    async def fail(self, err: GatewayError) -> None: ...


class Attempt(Protocol):
    """One upstream attempt as telemetry sees it (metrics; a span when traced). Exactly one
    of succeeded / stream_done / failed / cancelled ends it."""

    @property
    def traceparent(self) -> str | None:
        """W3C `traceparent` to send upstream; None when not traced."""

    @property
    def watch(self) -> Callable[[AsyncGenerator[StreamEvent, None]],
                                AsyncGenerator[StreamEvent, None]] | None:
        """A wrapper to see every streamed event (content capture); None: nothing to see."""

    def first_token(self, seconds: float) -> None: ...
    def succeeded(self, seconds: float, completion: ChatCompletion) -> None: ...
    def stream_done(self, seconds: float, tail: Sequence[Chunk]) -> None: ...
    def failed(self, err: UpstreamError, seconds: float) -> None: ...
    def cancelled(self, seconds: float) -> None: ...


class Observer(Protocol):
    """Who hears about each upstream attempt (error rows, metrics, traces)."""

    def attempt_started(self, provider: ProviderRuntime, req: Request, number: int) -> Attempt:
        ...

    def attempt_failed(self, provider: str, err: UpstreamError, request_id: str,
                       model: str) -> None: ...

    def retrying(self, provider: str, delay: float) -> None: ...
    def failing_over(self, from_provider: str, to_provider: str) -> None: ...
    def breaker_refused(self, provider: str) -> None: ...


class _Unobserved:
    """Observer and Attempt in one, doing nothing: a dispatcher built without telemetry."""

    traceparent = None
    watch = None

    def attempt_started(self, provider: ProviderRuntime, req: Request,
                        number: int) -> _Unobserved:
        return self

    def attempt_failed(self, provider: str, err: UpstreamError, request_id: str,
                       model: str) -> None:
        pass

    def retrying(self, provider: str, delay: float) -> None:
        pass

    def failing_over(self, from_provider: str, to_provider: str) -> None:
        pass

    def breaker_refused(self, provider: str) -> None:
        pass

    def first_token(self, seconds: float) -> None:
        pass

    def succeeded(self, seconds: float, completion: ChatCompletion) -> None:
        pass

    def stream_done(self, seconds: float, tail: Sequence[Chunk]) -> None:
        pass

    def failed(self, err: UpstreamError, seconds: float) -> None:
        pass

    def cancelled(self, seconds: float) -> None:
        pass


class ClientGone(Exception):
    """The client disconnected; stop, and count nothing against the provider."""


class QueueInstead(Exception):
    """The plan's last step: nothing can answer now and the client accepts a job
    (`Prefer: respond-async`); the caller stores the request as a job and answers 202."""


class Request(NamedTuple):
    chat: ChatRequest
    request_id: str
    deadline: float  # monotonic
    passthrough: Mapping[str, str]
    #: The client sent `Prefer: respond-async`: "nobody can answer now" becomes a job.
    may_queue: bool = False


def _rejected(err: UpstreamError, should_retry: bool | None) -> GatewayError:
    """The caller's own error, as the provider reported it (redacted), for the client."""
    policy = err.policy
    msg = err.client_message or {
        C.CONTENT_POLICY: "The provider declined the request under its content policy.",
        C.CONTEXT_LENGTH: "The request exceeds the model's context length.",
    }.get(err.cls, "The provider rejected the request as invalid.")
    return policy.client(msg, code=policy.code, param=err.param, should_retry=should_retry)


class Dispatcher:
    def __init__(self, router: Router, *, max_attempts: int, backoff: Backoff,
                 observer: Observer | None = None,
                 sleep: Callable[[float], Awaitable[None]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.router = router
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.observer: Observer = observer or _Unobserved()
        self._sleep = sleep or asyncio.sleep
        self._clock = clock

    def _no_provider(self, req: Request, failures: list[UpstreamError],
                     attempts: int) -> GatewayError:
        if failures and all(f.policy.client is UpstreamRejected for f in failures):
            # Every provider refused it as the caller's own request (context too long for
            # all of them, a feature none supports): that is a 400, not an outage.
            return _rejected(failures[-1], False if attempts > 1 else None)
        if failures:
            return final_error(failures, attempts=attempts,
                               deadline_passed=self._clock() >= req.deadline)
        plan = self.router.plan(req.chat.model)
        if plan.all_rate_limited:
            return RateLimited(
                "Every provider for this model is rate limited; retry after the delay given.",
                retry_after=plan.cooling_for or 1.0)
        return ServiceUnavailable(
            "No provider can answer this model right now; retry after the delay given.",
            retry_after=plan.cooling_for or 1.0)

    def _failed(self, rt: ProviderRuntime, err: UpstreamError, req: Request, att: Attempt,
                seconds: float) -> None:
        if err.policy.breaker:
            rt.breaker.record_failure(reason=str(err.cls))
        else:
            rt.breaker.record_ignored()
        if err.cls is C.RATE_LIMIT:
            wait = err.retry_after if err.retry_after is not None else 1.0
            rt.cooldown_until = self._clock() + wait
        log.warning("upstream attempt failed", extra={
            "provider": rt.name, "error_class": str(err.cls), "status": err.status,
            "request_id": req.request_id, "detail": err.detail})
        att.failed(err, seconds)
        self.observer.attempt_failed(rt.name, err, req.request_id, req.chat.model)

    def _call(self, rt: ProviderRuntime, req: Request, att: Attempt) -> Call:
        return Call(request=req.chat, upstream_model=rt.provider.models[req.chat.model],
                    request_id=req.request_id, passthrough=req.passthrough,
                    traceparent=att.traceparent)

    async def complete(self, req: Request) -> Answer:
        failures: list[UpstreamError] = []
        plan = _Attempts(self, req)
        while (rt := await plan.next(failures[-1] if failures else None)) is not None:
            attempts = plan.count
            att = self.observer.attempt_started(rt, req, attempts)
            timeout = min(rt.provider.timeouts.total, req.deadline - self._clock())
            started = self._clock()
            try:
                async with asyncio.timeout(timeout):
                    completion = await rt.adapter.complete(self._call(rt, req, att))
            except UpstreamError as err:
                failures.append(err)
            except TimeoutError:
                failures.append(UpstreamError(C.TIMEOUT_TOTAL, detail="attempt timed out"))
            except BaseException:
                # Cancelled (shutdown) or a bug: the half-open permit must still come back.
                rt.breaker.record_ignored()
                att.cancelled(self._clock() - started)
                raise
            else:
                elapsed = self._clock() - started
                rt.breaker.record_success(elapsed)
                att.succeeded(elapsed, completion.parsed)
                fallback: Fallback = "failover" if failures else "none"
                return Answer(completion, rt.name, attempts, fallback)
            last = failures[-1]
            self._failed(rt, last, req, att, self._clock() - started)
            if not last.policy.failover:
                raise _rejected(last, False if attempts > 1 else None)
        raise self._no_provider(req, failures, plan.count)

    async def stream(self, req: Request, sink: Sink) -> None:
        """Stream one answer into `sink`; raises GatewayError only before anything was sent."""
        failures: list[UpstreamError] = []
        plan = _Attempts(self, req)
        while (rt := await plan.next(failures[-1] if failures else None)) is not None:
            attempts = plan.count
            att = self.observer.attempt_started(rt, req, attempts)
            t = rt.provider.timeouts
            now = self._clock()
            loop = asyncio.get_running_loop()
            # One timer for the whole attempt: first-token deadline until the first content
            # chunk, then the total deadline. Idle gaps are aiohttp's sock_read timeout.
            total_at = loop.time() + min(t.total, req.deadline - now)
            first_at = min(loop.time() + t.first_token, total_at)
            events = rt.adapter.stream(self._call(rt, req, att))
            if att.watch is not None:
                events = att.watch(events)
            sent = False
            try:
                async with asyncio.timeout_at(first_at) as timer:
                    buffered: list[StreamEvent] = []
                    async for ev in events:
                        buffered.append(ev)
                        if ev.chunk.has_content:
                            break
                    timer.reschedule(total_at)
                    # A long answer is not a slow provider: for streams the breaker's
                    # slow-call rule judges the time to the first token.
                    ttft = self._clock() - now
                    att.first_token(ttft)
                    fallback: Fallback = "failover" if failures else "none"
                    sent = True
                    await sink.start(rt.name, attempts, fallback)
                    for ev in buffered:
                        await sink.event(ev)
                    # The last two events hold usage and finish reasons, for telemetry.
                    before: StreamEvent | None = None
                    last: StreamEvent | None = None
                    async for ev in events:
                        await sink.event(ev)
                        before, last = last, ev
                rt.breaker.record_success(ttft)
                await sink.done()
                tail = buffered[-2:] if last is None else [e for e in (before, last) if e]
                att.stream_done(self._clock() - now, [e.chunk for e in tail])
                return
            except ClientGone:
                rt.breaker.record_ignored()
                att.cancelled(self._clock() - now)
                return
            except asyncio.CancelledError:
                # Shutdown past the drain period: say so rather than end the stream cleanly.
                rt.breaker.record_ignored()
                att.cancelled(self._clock() - now)
                if sent:
                    await sink.fail(ServiceUnavailable(
                        "The gateway is shutting down; the answer is incomplete.",
                        code="gateway_shutdown", should_retry=True))
                raise
            except (UpstreamError, TimeoutError) as exc:
                if isinstance(exc, UpstreamError):
                    err = exc
                elif sent:
                    err = UpstreamError(C.TIMEOUT_TOTAL, detail="stream passed its total timeout")
                else:
                    err = UpstreamError(C.TIMEOUT_FIRST_TOKEN, detail="no first token in time")
                self._failed(rt, err, req, att, self._clock() - now)
                if sent:
                    await sink.fail(_stream_error(err))
                    return
                failures.append(err)
                if not err.policy.failover:
                    raise _rejected(err, False if attempts > 1 else None) from None
            except Exception:
                # A bug of ours: the permit comes back, and a started stream still ends
                # with an error event (never a clean cut); before that, the edge renders it.
                rt.breaker.record_ignored()
                att.cancelled(self._clock() - now)
                if not sent:
                    raise
                log.exception("stream failed", extra={"request_id": req.request_id})
                await sink.fail(GatewayError("The gateway failed in the middle of the answer.",
                                             code="internal_error"))
                return
            finally:
                await events.aclose()
        raise self._no_provider(req, failures, plan.count)


def _stream_error(err: UpstreamError) -> GatewayError:
    """The final error event of a stream that failed after its first byte."""
    if err.cls in (C.TIMEOUT_IDLE, C.TIMEOUT_FIRST_TOKEN):
        return DeadlineExceeded("The provider stopped sending in the middle of the answer.",
                                code="upstream_stream_stalled", should_retry=True)
    if err.cls is C.TIMEOUT_TOTAL:
        return DeadlineExceeded("The answer did not complete within its deadline.",
                                code="upstream_timeout", should_retry=True)
    if err.cls in (C.BAD_REQUEST, C.UNSUPPORTED, C.CONTEXT_LENGTH, C.CONTENT_POLICY):
        return _rejected(err, False)
    return ServiceUnavailable("The provider failed in the middle of the answer.",
                              code="upstream_stream_interrupted", should_retry=True)


class _Attempts:
    """Hands out attempts in order: retries of one provider (with backoff, when the last
    failure's class allows it), then the next provider; none past the attempt cap or the
    deadline, and none to a provider whose breaker refuses."""

    def __init__(self, d: Dispatcher, req: Request) -> None:
        self._d = d
        self._req = req
        self._order = iter(d.router.plan(req.chat.model).order)
        self._current: ProviderRuntime | None = None
        self._tries = 0
        self.count = 0

    def _budget_left(self) -> bool:
        return self.count < self._d.max_attempts and self._d._clock() < self._req.deadline

    async def next(self, last: UpstreamError | None) -> ProviderRuntime | None:
        d, rt = self._d, self._current
        if rt is not None and last is not None:
            delay = retry_delay(last, attempt=self._tries - 1, retries=rt.provider.retries,
                                backoff=d.backoff, time_left=self._req.deadline - d._clock())
            if delay is not None:
                if delay > 0:
                    await d._sleep(delay)
                if self._budget_left() and rt.breaker.allow():
                    self._tries += 1
                    self.count += 1
                    d.observer.retrying(rt.name, delay)
                    return rt
        for nxt in self._order:
            if not self._budget_left():
                return None
            if nxt.breaker.allow():
                if rt is not None:
                    d.observer.failing_over(rt.name, nxt.name)
                self._current, self._tries = nxt, 1
                self.count += 1
                return nxt
            d.observer.breaker_refused(nxt.name)
        return None
