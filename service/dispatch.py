"""The attempt loop: retries, failover, breakers, deadlines — for whole answers and streams.

For a stream, nothing is sent to the client until a provider has produced its first content
chunk: a provider failing before that is replaced invisibly. After the first byte, a failure
is a final `data: {"error": …}` event — never a clean end without finish_reason and [DONE],
and never a silent switch to another provider (that would mix two answers in one).

When nothing can answer now, the plan goes on, in order (CONTRACT.md "When nothing can
answer now"): another provider (`failover`), the models of `fallback_models` within the same
attempt cap and deadline (`model`), a stored answer no older than `cache_ttl_sec` (`cache`),
the canned reply for a client that accepts one (`canned`), `QueueInstead` for a client that
accepts a job, else the error. The fleet's degradation level bends the plan
(docs/DEGRADATION.md): `moderate` drops same-provider retries and halves the attempt cap,
`severe` serves stored answers first and queues at once, `critical` calls no provider.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from typing import Literal, NamedTuple, Protocol, TypeVar

import msgspec

from bulwark import metrics
from bulwark.cache import RS, Hit, ResponseCache, cache_key
from bulwark.config import DEFAULT_POLICY, ModelPolicy
from bulwark.deadline import Deadlines
from bulwark.degradation import Degradation, Level
from bulwark.embeddings import EmbedCall, EmbeddingRequest, EmbeddingResult, Inputs, check_result
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
from bulwark.replay import (
    canned,
    events_of,
    relabel_completion,
    relabel_event,
    stored_completion,
)
from bulwark.retry import Backoff, retry_delay
from bulwark.wire import ChatCompletion, ChatRequest, Chunk
from service.continuation import Tracker, continue_stream
from service.router import ProviderRuntime, Router

log = logging.getLogger("bulwark.dispatch")

#: How an answer came about (`x-bulwark-fallback`, CONTRACT.md "When nothing can answer now").
Fallback = Literal["none", "failover", "model", "cache", "canned", "queued"]


#: `x-bulwark-provider` of an answer that no provider gave now.
CACHE_PROVIDER = "cache"
CANNED_PROVIDER = "canned"
#: Retry-After of the 503 at `critical`: the level is an operator's (or healthd's) word,
#: not a provider's cooldown; a client asking again this soon learns the next level.
CRITICAL_RETRY_AFTER_SEC = 10.0


class Answer(msgspec.Struct, frozen=True):
    completion: Completion
    provider: str
    attempts: int
    fallback: Fallback
    #: Seconds since a stored answer was answered (`x-bulwark-cache-age`); None otherwise.
    cache_age: float | None = None


class Sink(Protocol):
    """Where a stream goes: SSE response, WebSocket, …

    `start` once, before the first event; then `event` per chunk; then exactly one of
    `done` (the answer is complete: the sink ends it, e.g. `data: [DONE]`) or `fail` (a
    final error event). `cache_age` is passed, as a keyword, only when the answer is a
    stored one (`fallback == "cache"`): seconds since it was answered.
    """

    async def start(self, provider: str, attempts: int, fallback: Fallback, *,
                    cache_age: float | None = None) -> None: ...
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
    def succeeded(self, seconds: float, completion: ChatCompletion | None) -> None: ...
    def stream_done(self, seconds: float, tail: Sequence[Chunk]) -> None: ...
    def failed(self, err: UpstreamError, seconds: float) -> None: ...
    def cancelled(self, seconds: float) -> None: ...


class Observer(Protocol):
    """Who hears about each upstream attempt (error rows, metrics, traces)."""

    def attempt_started(self, provider: ProviderRuntime, req: Request | EmbedRequest,
                        model: str, number: int) -> Attempt:
        """`model` is the gateway model being tried: the request's, or a fallback model."""
        ...

    def attempt_failed(self, provider: str, err: UpstreamError, request_id: str,
                       model: str) -> None: ...

    def retrying(self, provider: str, delay: float) -> None: ...
    def failing_over(self, from_provider: str, to_provider: str) -> None: ...
    def breaker_refused(self, provider: str) -> None: ...
    def continued(self, from_provider: str, to_provider: str, at_char: int) -> None: ...


class _Unobserved:
    """Observer and Attempt in one, doing nothing: a dispatcher built without telemetry."""

    traceparent = None
    watch = None

    def attempt_started(self, provider: ProviderRuntime, req: Request | EmbedRequest,
                        model: str, number: int) -> _Unobserved:
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

    def continued(self, from_provider: str, to_provider: str, at_char: int) -> None:
        pass

    def first_token(self, seconds: float) -> None:
        pass

    def succeeded(self, seconds: float, completion: ChatCompletion | None) -> None:
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

    def __init__(self, err: GatewayError | None = None) -> None:
        super().__init__()
        #: What the client gets instead should the job store itself be unreachable.
        self.err = err


class Request(msgspec.Struct, frozen=True):
    chat: ChatRequest
    request_id: str
    deadline: float  # monotonic
    passthrough: Mapping[str, str]
    #: The client sent `Prefer: respond-async`: "nobody can answer now" becomes a job.
    may_queue: bool = False
    #: `Cache-Control: no-store`: this answer is not stored.
    no_store: bool = False
    #: `Cache-Control: no-cache`: no stored answer is served.
    no_cache: bool = False
    #: `x-bulwark-accept-canned: true`: the model's canned reply is an acceptable answer.
    accept_canned: bool = False
    #: Whose cache this is (a client key id once per-key caching lands; "" = shared).
    cache_scope: str = ""
    #: A stream whose provider fails mid-answer is continued by the next one
    #: (`continue_streams`, `x-bulwark-continue`; service/continuation.py).
    continue_stream: bool = False

    @property
    def model(self) -> str:
        return self.chat.model


class EmbedRequest(NamedTuple):
    embed: EmbeddingRequest
    inputs: Inputs
    request_id: str
    deadline: float  # monotonic
    passthrough: Mapping[str, str]
    #: The vector size every provider must return (`dimensions`, else the model's
    #: `embedding_dimensions`); another size is a malformed answer and fails over.
    dimensions: int | None = None

    @property
    def model(self) -> str:
        return self.embed.model


class EmbedAnswer(NamedTuple):
    result: EmbeddingResult
    provider: str
    attempts: int
    fallback: Fallback


T = TypeVar("T")


class _Plan(msgspec.Struct, frozen=True):
    """What the request's model policy and the fleet's level make of one request."""

    policy: ModelPolicy
    level: Level
    cache: ResponseCache | None  # None: no stored answer is served for this request
    key: str | None
    store: bool  # a whole, successful answer is stored under `key`
    first: bool  # look for a stored answer before any provider
    cap: int  # attempts across retries, failover and fallback models
    retries: bool  # same-provider retries allowed


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
                 clock: Callable[[], float] = time.monotonic,
                 models: Mapping[str, ModelPolicy] | None = None,
                 cache: ResponseCache | None = None,
                 degradation: Degradation | None = None,
                 deadlines: Deadlines | None = None) -> None:
        self.router = router
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.observer: Observer = observer or _Unobserved()
        self._sleep = sleep or asyncio.sleep
        self._clock = clock
        self.models = models or {}
        self.cache = cache
        self.degradation = degradation
        #: Every attempt's deadline, on one shared timer (bulwark/deadline.py): the same
        #: one as the HTTP client's idle timeouts, when the app passes it.
        self.deadlines = deadlines or Deadlines()

    def _plan(self, req: Request) -> _Plan:
        policy = self.models.get(req.chat.model, DEFAULT_POLICY)
        level = self.degradation.level if self.degradation is not None else Level.NORMAL
        cache = self.cache if policy.cache != "off" else None
        store = cache is not None and not req.no_store
        key = None
        if cache is not None and (store or not req.no_cache):
            key = cache_key(req.chat, req.cache_scope)
        if cache is not None and req.no_cache:
            cache = None  # may store, never serve
        first = cache is not None and (policy.cache == "first" or level >= Level.SEVERE)
        cap, retries = self.max_attempts, True
        if level >= Level.MODERATE:
            # A struggling fleet: no second try on the same provider, and half the attempts,
            # so the fallback chain and the stored answers are reached sooner.
            cap, retries = max(1, (self.max_attempts + 1) // 2), False
        return _Plan(policy, level, cache, key, store, first, cap, retries)

    async def _before_live(self, req: Request, p: _Plan) -> Answer | None:
        """Severe and above, or `cache = "first"`: a fresh stored answer first; then, at
        severe and above, a client that accepts a job gets one without waiting."""
        if p.first and p.cache is not None and p.key is not None:
            answer = _from_cache(await p.cache.lookup(p.key, p.policy.cache_ttl_sec), 0)
            _count_lookup(req.chat.model, answer)
            if answer is not None:
                return answer
        if p.level >= Level.SEVERE and req.may_queue:
            raise QueueInstead
        return None

    async def _no_live_answer(self, req: Request, p: _Plan, err: GatewayError,
                              attempts: int) -> Answer:
        """Nothing live answered: a stored answer, the canned reply, a job, else `err`."""
        if isinstance(err, UpstreamRejected):
            raise err  # the caller's own request: no stored answer is an answer to it
        if p.cache is not None and p.key is not None and not p.first:
            # A Postgres read on the failure path, bounded by the cache's lookup timeout.
            answer = _from_cache(await p.cache.lookup(p.key, p.policy.cache_ttl_sec),
                                 attempts)
            _count_lookup(req.chat.model, answer)
            if answer is not None:
                return answer
        if req.accept_canned and p.policy.canned_reply:
            return Answer(canned(p.policy.canned_reply, req.chat.model), CANNED_PROVIDER,
                          attempts, "canned")
        if req.may_queue:
            raise QueueInstead(err)
        raise err

    def _critical(self) -> GatewayError:
        return ServiceUnavailable(
            "The service is in critical degradation: no provider is called now, and no "
            "stored answer fits this request; retry after the delay given.",
            code="service_degraded", retry_after=CRITICAL_RETRY_AFTER_SEC)

    def _no_provider(self, req: Request | EmbedRequest, failures: list[UpstreamError],
                     attempts: int, *, full: bool = False) -> GatewayError:
        if failures and all(f.policy.client is UpstreamRejected for f in failures):
            # Every provider refused it as the caller's own request (context too long for
            # all of them, a feature none supports): that is a 400, not an outage.
            return _rejected(failures[-1], False if attempts > 1 else None)
        if failures:
            return final_error(failures, attempts=attempts,
                               deadline_passed=self._clock() >= req.deadline)
        if full:
            return ServiceUnavailable(
                "Every provider for this model is at its limit of requests in flight; retry "
                "after the delay given.", code="provider_capacity", retry_after=1.0)
        plan = self.router.plan(req.model)
        if plan.all_rate_limited:
            return RateLimited(
                "Every provider for this model is rate limited; retry after the delay given.",
                retry_after=plan.cooling_for or 1.0)
        return ServiceUnavailable(
            "No provider can answer this model right now; retry after the delay given.",
            retry_after=plan.cooling_for or 1.0)

    def _failed(self, rt: ProviderRuntime, err: UpstreamError, req: Request | EmbedRequest,
                att: Attempt, *, seconds: float, model: str) -> None:
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
        self.observer.attempt_failed(rt.name, err, req.request_id, model)

    def _call(self, rt: ProviderRuntime, req: Request, model: str, att: Attempt) -> Call:
        return Call(request=req.chat, upstream_model=rt.provider.models[model],
                    request_id=req.request_id, passthrough=req.passthrough,
                    traceparent=att.traceparent)

    async def complete(self, req: Request) -> Answer:
        p = self._plan(req)
        if p.first or p.level >= Level.SEVERE:
            early = await self._before_live(req, p)
            if early is not None:
                return early
        if p.level >= Level.CRITICAL:
            return await self._no_live_answer(req, p, self._critical(), 0)
        plan = _Attempts(self, req, p.cap, p.retries, p.policy.fallback_models)
        try:
            completion, provider, attempts, fallback = await self._whole(
                req, plan,
                lambda rt, att: rt.adapter.complete(self._call(rt, req, plan.model, att)),
                lambda c: c.parsed)
        except _NoLiveAnswer as none:
            return await self._no_live_answer(req, p, none.err, plan.count)
        if plan.model != req.chat.model:
            completion = relabel_completion(completion, plan.model)
            fallback = "model"
        if p.store and p.key is not None and self.cache is not None:
            self.cache.remember(p.key, plan.model, completion.body)
        return Answer(completion, provider, attempts, fallback)

    async def embed(self, req: EmbedRequest) -> EmbedAnswer:
        """Embeddings, with the retries, breakers, failover and attempt cap of chat (no
        cache, canned reply or fallback model: a vector of another model is no answer)."""

        async def once(rt: ProviderRuntime, att: Attempt) -> EmbeddingResult:
            e = req.embed
            result = await rt.adapter.embed(EmbedCall(
                inputs=req.inputs, upstream_model=rt.provider.models[req.model],
                request_id=req.request_id,
                dimensions=e.dimensions if isinstance(e.dimensions, int) else None,
                user=e.user if isinstance(e.user, str) else None,
                passthrough=req.passthrough, traceparent=att.traceparent))
            check_result(result, req.inputs, req.dimensions)
            return result

        plan = _Attempts(self, req, self.max_attempts, True, ())
        try:
            return EmbedAnswer(*await self._whole(req, plan, once, lambda _: None))
        except _NoLiveAnswer as none:
            raise none.err from None

    async def _whole(self, req: Request | EmbedRequest, plan: _Attempts,
                     call: Callable[[ProviderRuntime, Attempt], Awaitable[T]],
                     parsed: Callable[[T], ChatCompletion | None],
                     ) -> tuple[T, str, int, Fallback]:
        """The attempt loop for a whole answer: `call` makes one upstream attempt. Raises
        the caller's own error at once, or _NoLiveAnswer when every attempt failed."""
        failures: list[UpstreamError] = []
        while (rt := await plan.next(failures[-1] if failures else None)) is not None:
            attempts, model = plan.count, plan.model
            att = self.observer.attempt_started(rt, req, model, attempts)
            timeout = min(rt.provider.timeouts.total, req.deadline - self._clock())
            started = self._clock()
            try:
                with self.deadlines.after(timeout):
                    answer = await call(rt, att)
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
                att.succeeded(elapsed, parsed(answer))
                fallback: Fallback = "failover" if failures else "none"
                return answer, rt.name, attempts, fallback
            finally:
                rt.slots.leave()
            last = failures[-1]
            self._failed(rt, last, req, att, seconds=self._clock() - started, model=model)
            if not last.policy.failover:
                raise _rejected(last, False if attempts > 1 else None)
        raise _NoLiveAnswer(self._no_provider(req, failures, plan.count, full=plan.full))

    async def _replay(self, req: Request, answer: Answer, sink: Sink) -> None:
        """A stored or canned answer as a proper stream: chunks, finish_reason, [DONE]."""
        events = events_of(answer.completion.parsed, include_usage=req.chat.include_usage)
        try:
            await sink.start(answer.provider, answer.attempts, answer.fallback,
                             cache_age=answer.cache_age)
            for ev in events:
                await sink.event(ev)
            await sink.done()
        except ClientGone:
            return

    async def stream(self, req: Request, sink: Sink) -> None:
        """Stream one answer into `sink`; raises GatewayError only before anything was sent."""
        p = self._plan(req)
        if p.first or p.level >= Level.SEVERE:
            early = await self._before_live(req, p)
            if early is not None:
                await self._replay(req, early, sink)
                return
        if p.level >= Level.CRITICAL:
            await self._replay(req, await self._no_live_answer(req, p, self._critical(), 0),
                               sink)
            return
        failures: list[UpstreamError] = []
        plan = _Attempts(self, req, p.cap, p.retries, p.policy.fallback_models)
        tracked = Tracker(sink) if req.continue_stream else None
        sink = tracked or sink
        while (rt := await plan.next(failures[-1] if failures else None)) is not None:
            attempts, model = plan.count, plan.model
            att = self.observer.attempt_started(rt, req, model, attempts)
            relabelled = model != req.chat.model
            # Chunks kept to store the whole answer once it is complete (never a part).
            kept: list[bytes] | None = [] if p.store else None
            t = rt.provider.timeouts
            now = self._clock()
            loop = self.deadlines.loop()
            # One timer for the whole attempt: first-token deadline until the first content
            # chunk, then the total deadline (one entry on the shared timer, bulwark/deadline.py).
            # Idle gaps between reads are the HTTP client's own timeout.
            total_at = loop.time() + min(t.total, req.deadline - now)
            first_at = min(loop.time() + t.first_token, total_at)
            events = rt.adapter.stream(self._call(rt, req, model, att))
            if att.watch is not None:
                events = att.watch(events)
            sent = False
            try:
                with self.deadlines.at(first_at) as timer:
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
                    if relabelled:
                        fallback = "model"
                    sent = True
                    await sink.start(rt.name, attempts, fallback)
                    if relabelled:
                        buffered = [relabel_event(ev, model) for ev in buffered]
                    if kept is not None:
                        kept += (ev.raw for ev in buffered)
                    for ev in buffered:
                        await sink.event(ev)
                    # The last two events hold usage and finish reasons, for telemetry.
                    before: StreamEvent | None = None
                    last: StreamEvent | None = None
                    async for ev in events:
                        if relabelled:
                            ev = relabel_event(ev, model)  # noqa: PLW2901
                        if kept is not None:
                            kept.append(ev.raw)
                        await sink.event(ev)
                        before, last = last, ev
                rt.breaker.record_success(ttft)
                await sink.done()
                tail = buffered[-2:] if last is None else [e for e in (before, last) if e]
                att.stream_done(self._clock() - now, [e.chunk for e in tail])
                if kept is not None and p.key is not None and self.cache is not None:
                    # As sent; assembled into one completion only if it is ever served.
                    self.cache.remember(p.key, model, RS.join(kept), "chunks")
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
                self._failed(rt, err, req, att, seconds=self._clock() - now, model=model)
                if sent and tracked is not None:
                    await events.aclose()
                    await continue_stream(self, req, tracked, plan, err, failed=rt.name)
                    return
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
                rt.slots.leave()
                await events.aclose()
        final = self._no_provider(req, failures, plan.count, full=plan.full)
        await self._replay(req, await self._no_live_answer(req, p, final, plan.count), sink)

class _NoLiveAnswer(Exception):
    """Every attempt failed or none could be made; `err` is what the client gets unless a
    later step of the plan (cache, canned reply, job) answers."""

    def __init__(self, err: GatewayError) -> None:
        self.err = err


def _count_lookup(model: str, answer: Answer | None) -> None:
    # Lookups happen on the failure path and in `first` mode only: a labels() call is fine.
    metrics.CACHE_LOOKUPS.labels(model, "miss" if answer is None else "hit").inc()


def _from_cache(hit: Hit | None, attempts: int) -> Answer | None:
    if hit is None:
        return None
    try:
        completion = stored_completion(hit.body, hit.form)
    except (msgspec.DecodeError, msgspec.ValidationError):
        log.warning("a stored answer does not decode; ignoring it")
        return None
    if completion is None:
        return None
    return Answer(completion, CACHE_PROVIDER, attempts, "cache", hit.age)


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
    failure's class allows it and the level does), then the next provider, then the next
    model of `fallback_models`; none past the attempt cap or the deadline (one budget for
    the whole chain), and none to a provider whose breaker refuses."""

    def __init__(self, d: Dispatcher, req: Request | EmbedRequest, cap: int, retries: bool,
                 fallback_models: Sequence[str]) -> None:
        self._d = d
        self._req = req
        self._cap = cap
        self._retries = retries
        self._models = iter(fallback_models)
        #: The model whose providers are being tried (the request's, then fallbacks).
        self.model = req.model
        self._order = iter(d.router.plan(self.model).order)
        self._current: ProviderRuntime | None = None
        self._tries = 0
        self.count = 0
        #: Providers passed over because their bulkhead was full (waited for at the end).
        self._full: list[ProviderRuntime] = []
        self.full = False

    def _budget_left(self) -> bool:
        return self.count < self._cap and self._d._clock() < self._req.deadline

    async def next(self, last: UpstreamError | None) -> ProviderRuntime | None:
        d, rt = self._d, self._current
        if rt is not None and last is not None and self._retries:
            delay = retry_delay(last, attempt=self._tries - 1, retries=rt.provider.retries,
                                backoff=d.backoff, time_left=self._req.deadline - d._clock())
            if delay is not None:
                if delay > 0:
                    await d._sleep(delay)
                if self._budget_left() and self._take(rt):
                    self._tries += 1
                    self.count += 1
                    d.observer.retrying(rt.name, delay)
                    return rt
        while True:
            for nxt in self._order:
                if not self._budget_left():
                    return None
                if self._take(nxt):
                    if rt is not None:
                        d.observer.failing_over(rt.name, nxt.name)
                    self._current, self._tries = nxt, 1
                    self.count += 1
                    return nxt
            # Every other candidate of this model is spent: wait (briefly, bounded) for a
            # full one's slot before settling for a fallback model.
            while self._full and self._budget_left():
                full = self._full.pop(0)
                if await full.slots.wait():
                    if full.breaker.allow():
                        self._current, self._tries = full, 1
                        self.count += 1
                        self.full = False
                        return full
                    full.slots.leave()
            # Every provider of this model failed, is open or rate limited: the next model.
            model = next(self._models, None)
            if model is None or not self._budget_left():
                return None
            self.model, self._current = model, None
            self._order = iter(d.router.plan(model).order)

    def _take(self, rt: ProviderRuntime) -> bool:
        """A bulkhead slot and the breaker's permission for one attempt on `rt`."""
        if not rt.slots.try_enter():
            self._full.append(rt)
            self.full = True
            return False
        if rt.breaker.allow():
            return True
        rt.slots.leave()
        self._d.observer.breaker_refused(rt.name)
        return False
