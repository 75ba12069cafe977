"""Stream continuation: a stream whose provider fails mid-answer is finished by the next one.

The dispatcher hands over here at the one place where a stream that already sent bytes
fails (`Dispatcher.stream`), when the request asked for continuation (`Request.continue_stream`:
the model's `continue_streams`, or `x-bulwark-continue: true`). From then on:

- the next provider of the router's plan (never the one that failed; breakers, the attempt
  cap and the deadline as for any attempt) gets the conversation plus the text already sent,
  as a final assistant message it continues (`continuation = "prefill"`) or followed by an
  instruction to continue it exactly (`"instruct"`);
- its chunks are re-encoded with the first stream's `id`, `created` and `model`; its role
  chunk is dropped (the client has one); what it repeats of the text already sent is
  trimmed at the seam (`Seam`); its usage gets the completion tokens of the text before the
  seam added; the chunk with `finish_reason` carries `"bulwark": {"continued_by", "at_char"}`;
- if it fails too, after adding text, the next one continues from the longer text; if
  nobody can, the stream ends with the error event of the original failure.

Not continued (the usual error event): a stream that sent a tool-call delta, a refusal or
a finish_reason, or more than one choice — a half-sent tool call cannot be completed by
another model with any guarantee that the arguments still parse.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING

import msgspec

from bulwark.errors import C, GatewayError, ServiceUnavailable, UpstreamError
from bulwark.providers.base import Call, StreamEvent
from bulwark.wire import (
    ChatRequest,
    Chunk,
    ChunkChoice,
    Delta,
    Message,
    Usage,
    encoder,
)

if TYPE_CHECKING:
    from bulwark.config import Continuation
    from service.dispatch import Dispatcher, Fallback, Request, Sink, _Attempts
    from service.router import ProviderRuntime

log = logging.getLogger("bulwark.continuation")

#: How far back a continuing provider may restart and still be trimmed: a few sentences.
#: Bounded so that a long answer costs the same at the seam as a short one.
WINDOW = 256
#: OpenAI's rule of thumb for English text; the failed provider never reported its count.
CHARS_PER_TOKEN = 4
#: Sent, after the partial answer, to a provider that does not continue a final assistant
#: message by itself. The simulator recognises its first words (bulwark/sim.py).
INSTRUCTION = ("Continue your previous answer exactly where it stops. Do not repeat any of "
               "it and add nothing before it: what you write is appended to it as it is.")


# --- the seam ---------------------------------------------------------------------------


def _at_word_start(text: str, k: int) -> bool:
    """The last k characters of `text` start at a word boundary."""
    i = len(text) - k
    return i == 0 or not text[i - 1].isalnum() or not text[i].isalnum()


def overlap(sent: str, new: str, *, window: int = WINDOW) -> int:
    """Length of the longest start of `new` that repeats the end of `sent`, at most `window`
    characters, and made of whole words: it begins at a word boundary of `sent` and ends at
    one of `new` ("… like the" + " theory" keeps both). A continuation glued to the text
    (no space: "The weath" + "weather") restarts the cut word, so there the end may fall
    inside a word."""
    text = sent[-(window + 1):]
    glued = bool(new) and new[0].isalnum()
    for k in range(min(window, len(text), len(new)), 0, -1):
        if (text.endswith(new[:k]) and _at_word_start(text, k)
                and (glued or k == len(new) or not new[k].isalnum()
                     or not new[k - 1].isalnum())):
            return k
    return 0


class Seam:
    """Joins a continuation onto the text already sent, dropping what it repeats.

    `feed` holds the continuation's first characters only while they could still be the
    start of a longer repeat (they occur in the last `window` characters sent); the first
    chunk that cannot decides, so a continuation that does not repeat is not delayed.
    """

    __slots__ = ("_held", "_sent", "_window", "decided", "dropped")

    def __init__(self, sent: str, *, window: int = WINDOW) -> None:
        self._sent = sent[-(window + 1):]
        self._window = window
        self._held = ""
        self.decided = False
        #: Characters of the continuation dropped as a repeat.
        self.dropped = 0

    def feed(self, text: str) -> str:
        """What of `text` to send now."""
        if self.decided:
            return text
        held = self._held + text
        if not held or (len(held) <= self._window and held in self._sent[-self._window:]):
            self._held = held
            return ""
        return self._decide(held)

    def flush(self) -> str:
        """The continuation ended (finish_reason or another part): what is still held."""
        return "" if self.decided else self._decide(self._held)

    def _decide(self, held: str) -> str:
        self.decided = True
        self._held = ""
        self.dropped = overlap(self._sent, held, window=self._window)
        return held[self.dropped:]


# --- what was sent ------------------------------------------------------------------------


class Tracker:
    """A `Sink` that remembers what went through it: the text, the stream's identity, and
    whether anything makes the answer unsafe to continue. Used only when continuation is
    on, so a plain stream pays nothing for it."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self._parts: list[str] = []
        self.chars = 0
        self.id: str | None = None
        self.created = 0
        self.model = ""
        #: Why this answer must not be continued, once something makes it so.
        self.unsafe: str | None = None

    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    async def start(self, provider: str, attempts: int, fallback: Fallback, *,
                    cache_age: float | None = None) -> None:
        await self.sink.start(provider, attempts, fallback, cache_age=cache_age)

    async def event(self, ev: StreamEvent) -> None:
        chunk = ev.chunk
        if self.id is None:
            self.id, self.created, self.model = chunk.id, chunk.created, chunk.model
        for c in chunk.choices:
            d = c.delta
            if c.index != 0:
                self.unsafe = "several choices"
            if d.content:
                self._parts.append(d.content)
                self.chars += len(d.content)
            if d.tool_calls:
                self.unsafe = "a tool call was sent"
            if d.refusal:
                self.unsafe = "a refusal was sent"
            if c.finish_reason:
                self.unsafe = "the answer was finished"
        await self.sink.event(ev)

    async def done(self) -> None:
        await self.sink.done()

    async def fail(self, err: GatewayError) -> None:
        await self.sink.fail(err)


# --- the continuing provider's chunks ------------------------------------------------------


class Marker(msgspec.Struct, kw_only=True):
    continued_by: str
    at_char: int


class _Wire(msgspec.Struct, kw_only=True):
    """A rewritten chunk as the client receives it. Not `Chunk`, which omits its defaults
    (`object`, an empty `choices`) to stay small; these chunks are few."""

    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | msgspec.UnsetType = msgspec.UNSET
    #: On the chunk with `finish_reason` only (CONTRACT.md).
    bulwark: Marker | msgspec.UnsetType = msgspec.UNSET


class _Rewriter:
    """Turns the continuing provider's chunks into chunks of the first stream."""

    def __init__(self, sent: Tracker, seam: Seam, provider: str, at_char: int) -> None:
        assert sent.id is not None
        self._id, self._created, self._model = sent.id, sent.created, sent.model
        self._seam = seam
        self._marker = Marker(continued_by=provider, at_char=at_char)
        self._prior_tokens = math.ceil(at_char / CHARS_PER_TOKEN)

    def _event(self, choices: list[ChunkChoice], *, usage: Usage | None = None,
               marked: bool = False) -> StreamEvent:
        chunk = Chunk(id=self._id, created=self._created, model=self._model, choices=choices,
                      usage=usage)
        wire = _Wire(id=self._id, created=self._created, model=self._model, choices=choices,
                     usage=msgspec.UNSET if usage is None else usage,
                     bulwark=self._marker if marked else msgspec.UNSET)
        return StreamEvent(encoder.encode(wire), chunk)

    def rewrite(self, chunk: Chunk) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        for c in chunk.choices[:1]:
            d = c.delta
            text = self._seam.feed(d.content) if d.content else ""
            if d.tool_calls or d.refusal or c.finish_reason:
                text += self._seam.flush()
            if text or d.tool_calls or d.refusal:
                delta = Delta(content=text or msgspec.UNSET, tool_calls=d.tool_calls,
                              refusal=d.refusal)
                out.append(self._event([ChunkChoice(index=0, delta=delta)]))
            if c.finish_reason:
                finish = ChunkChoice(index=0, delta=Delta(), finish_reason=c.finish_reason)
                out.append(self._event([finish], marked=True))
        if chunk.usage is not None:
            u = chunk.usage
            completion = self._prior_tokens + u.completion_tokens
            usage = Usage(prompt_tokens=u.prompt_tokens, completion_tokens=completion,
                          total_tokens=u.prompt_tokens + completion)
            out.append(self._event([], usage=usage))
        return out


def continuation_request(chat: ChatRequest, partial: str, mode: Continuation) -> ChatRequest:
    """The chat request that asks a provider to continue `partial`."""
    messages = [*chat.messages, Message(role="assistant", content=partial)]
    if mode == "instruct":
        messages.append(Message(role="user", content=INSTRUCTION))
    changes: dict[str, object] = {"messages": messages}
    cap = chat.max_output_tokens
    if cap is not None:
        # The output bound is the client's, for the whole answer.
        left = max(1, cap - math.ceil(len(partial) / CHARS_PER_TOKEN))
        field = "max_completion_tokens" if isinstance(chat.max_completion_tokens, int) \
            else "max_tokens"
        changes[field] = left
    return msgspec.structs.replace(chat, **changes)


# --- the continuation loop ---------------------------------------------------------------


def _shutdown() -> GatewayError:
    return ServiceUnavailable("The gateway is shutting down; the answer is incomplete.",
                              code="gateway_shutdown", should_retry=True)


async def continue_stream(d: Dispatcher, req: Request, sent: Tracker, plan: _Attempts,
                          err: UpstreamError, *, failed: str) -> None:
    """Finish the answer in `sent` after its provider failed with `err` (already recorded
    against that provider); or end it with the error event `err` calls for."""
    from service.dispatch import _stream_error

    if sent.unsafe is not None or sent.id is None or not sent.chars:
        log.info("stream not continued", extra={
            "request_id": req.request_id, "reason": sent.unsafe or "nothing was sent"})
        await sent.fail(_stream_error(err))
        return
    last: UpstreamError | None = None  # None: move on to the next provider
    while (rt := await plan.next(last)) is not None:
        partial = sent.text()
        try:
            progressed = await _attempt(d, req, sent, rt, partial, model=plan.model,
                                        number=plan.count, failed=failed)
        finally:
            rt.slots.leave()  # the bulkhead slot plan.next() took for this attempt
        if progressed is None:
            return
        last, added = progressed
        if added:
            last = None  # it failed mid-answer too: it is not asked again
    await sent.fail(_stream_error(err))


async def _attempt(d: Dispatcher, req: Request, sent: Tracker, rt: ProviderRuntime,
                   partial: str, *, model: str, number: int,
                   failed: str) -> tuple[UpstreamError, bool] | None:
    """One continuing attempt. None when the stream has ended (finished, failed for good,
    or the client left); else the failure and whether this provider added text."""
    from service.dispatch import ClientGone, _stream_error

    mode = rt.provider.continuation
    att = d.observer.attempt_started(rt, req, model, number)
    call = Call(request=continuation_request(req.chat, partial, mode),
                upstream_model=rt.provider.models[model], request_id=req.request_id,
                passthrough=req.passthrough, prefill=mode == "prefill",
                traceparent=att.traceparent)
    rewriter = _Rewriter(sent, Seam(partial), rt.name, len(partial))
    t = rt.provider.timeouts
    loop = d.deadlines.loop()
    now = d._clock()
    total_at = loop.time() + min(t.total, req.deadline - now)
    first_at = min(loop.time() + t.first_token, total_at)
    before = sent.chars
    ttft: float | None = None
    events = rt.adapter.stream(call)
    try:
        with d.deadlines.at(first_at) as timer:
            async for ev in events:
                if ttft is None and ev.chunk.has_content:
                    timer.reschedule(total_at)
                    ttft = d._clock() - now
                    att.first_token(ttft)
                    d.observer.continued(failed, rt.name, len(partial))
                for out in rewriter.rewrite(ev.chunk):
                    await sent.event(out)
        rt.breaker.record_success(ttft if ttft is not None else d._clock() - now)
        att.stream_done(d._clock() - now, [])
        log.info("stream continued", extra={
            "request_id": req.request_id, "provider": rt.name, "at_char": len(partial)})
        await sent.done()
        return None
    except ClientGone:
        rt.breaker.record_ignored()
        att.cancelled(d._clock() - now)
        return None
    except asyncio.CancelledError:
        rt.breaker.record_ignored()
        att.cancelled(d._clock() - now)
        await sent.fail(_shutdown())
        raise
    except (UpstreamError, TimeoutError) as exc:
        if isinstance(exc, UpstreamError):
            failure = exc
        elif ttft is None:
            failure = UpstreamError(C.TIMEOUT_FIRST_TOKEN, detail="continuation: no first token")
        else:
            failure = UpstreamError(C.TIMEOUT_TOTAL, detail="continuation passed its timeout")
        d._failed(rt, failure, req, att, seconds=d._clock() - now, model=model)
        if sent.unsafe is not None:
            # It sent a tool call or a refusal before failing: that cannot be continued.
            await sent.fail(_stream_error(failure))
            return None
        return failure, sent.chars > before
    except Exception:
        rt.breaker.record_ignored()
        att.cancelled(d._clock() - now)
        log.exception("continuation failed", extra={"request_id": req.request_id})
        await sent.fail(GatewayError("The gateway failed in the middle of the answer.",
                                     code="internal_error"))
        return None
    finally:
        await events.aclose()
