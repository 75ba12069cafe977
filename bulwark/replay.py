"""Answers that no provider is sending right now: a finished stream kept as one
chat.completion, a stored or canned completion played back as a proper stream, and an
answer relabelled with the gateway model that gave it.

A replayed stream is what OpenAI sends: a role chunk, the content (and tool calls), a
chunk with `finish_reason`, the usage chunk (`choices: []`) when the request asked for it;
the sink then ends it with `data: [DONE]`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import msgspec

from bulwark.cache import RS
from bulwark.providers.base import Completion, StreamEvent
from bulwark.wire import (
    ChatCompletion,
    Choice,
    Chunk,
    ChunkChoice,
    Delta,
    ResponseMessage,
    ToolCall,
    ToolCallFunction,
    Usage,
    any_decoder,
    chunk_decoder,
    completion_decoder,
    encoder,
)

#: `system_fingerprint` of a canned reply (CONTRACT.md): no model wrote it.
CANNED_FINGERPRINT = "bulwark-canned"


class _Choice:
    __slots__ = ("finish_reason", "parts", "refusal", "role", "tools")

    def __init__(self) -> None:
        self.role = "assistant"
        self.parts: list[str] = []
        self.refusal: list[str] = []
        self.tools: dict[int, ToolCall] = {}
        self.finish_reason: str | None = None


def assemble(chunks: Sequence[Chunk]) -> bytes | None:
    """One chat.completion (JSON) from a finished stream's chunks; None when any choice
    lacks its finish_reason (an incomplete answer is never kept)."""
    if not chunks:
        return None
    first = chunks[0]
    choices: dict[int, _Choice] = {}
    usage: Usage | None = None
    fingerprint: str | None | msgspec.UnsetType = msgspec.UNSET
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.system_fingerprint is not msgspec.UNSET:
            fingerprint = chunk.system_fingerprint
        for c in chunk.choices:
            acc = choices.get(c.index)
            if acc is None:
                acc = choices[c.index] = _Choice()
            d = c.delta
            if isinstance(d.role, str):
                acc.role = d.role
            if d.content:
                acc.parts.append(d.content)
            if d.refusal:
                acc.refusal.append(d.refusal)
            if isinstance(d.tool_calls, list):
                for tc in d.tool_calls:
                    _merge_tool(acc.tools, tc)
            if c.finish_reason:
                acc.finish_reason = c.finish_reason
    if not choices or any(acc.finish_reason is None for acc in choices.values()):
        return None
    out = []
    for index in sorted(choices):
        acc = choices[index]
        tools = [acc.tools[i] for i in sorted(acc.tools)]
        for tc in tools:
            tc.index = msgspec.UNSET
        content = "".join(acc.parts)
        message = ResponseMessage(
            role=acc.role, content=None if not content and tools else content,
            tool_calls=tools if tools else msgspec.UNSET,
            refusal="".join(acc.refusal) if acc.refusal else msgspec.UNSET)
        out.append(Choice(index=index, message=message, finish_reason=acc.finish_reason))
    return encoder.encode(ChatCompletion(
        id=first.id, created=first.created, model=first.model, choices=out, usage=usage,
        system_fingerprint=fingerprint))


def _merge_tool(tools: dict[int, ToolCall], tc: ToolCall) -> None:
    """Tool-call deltas arrive in pieces keyed by index: id and name once, arguments in parts."""
    i = tc.index if isinstance(tc.index, int) else len(tools)
    have = tools.get(i)
    if have is None:
        tools[i] = ToolCall(id=tc.id, type=tc.type, index=i, function=ToolCallFunction(
            name=tc.function.name, arguments=tc.function.arguments
            if isinstance(tc.function.arguments, str) else ""))
        return
    if isinstance(tc.id, str):
        have.id = tc.id
    if isinstance(tc.function.name, str):
        have.function.name = tc.function.name
    if isinstance(tc.function.arguments, str):
        before = have.function.arguments
        have.function.arguments = (before if isinstance(before, str) else "") \
            + tc.function.arguments


def stored_completion(body: bytes, form: str) -> Completion | None:
    """A stored answer as a chat.completion: as it is, or assembled from a stream's chunks
    (RS-separated JSON texts). None when a stored stream does not assemble (incomplete)."""
    if form == "chunks":
        assembled = assemble([chunk_decoder.decode(raw) for raw in body.split(RS) if raw])
        if assembled is None:
            return None
        body = assembled
    return Completion(body, completion_decoder.decode(body))


def events_of(parsed: ChatCompletion, *, include_usage: bool) -> list[StreamEvent]:
    """A whole completion as the chunks a provider would have streamed."""
    chunks: list[Chunk] = []

    def chunk(choice: ChunkChoice | None = None, usage: Usage | None = None) -> None:
        chunks.append(Chunk(id=parsed.id, created=parsed.created, model=parsed.model,
                            choices=[] if choice is None else [choice], usage=usage,
                            system_fingerprint=parsed.system_fingerprint))

    for c in parsed.choices:
        m = c.message
        chunk(ChunkChoice(index=c.index, delta=Delta(role=m.role, content="")))
        if m.content:
            chunk(ChunkChoice(index=c.index, delta=Delta(content=m.content)))
        if isinstance(m.refusal, str) and m.refusal:
            chunk(ChunkChoice(index=c.index, delta=Delta(refusal=m.refusal)))
        if isinstance(m.tool_calls, list) and m.tool_calls:
            calls = [ToolCall(id=tc.id, type=tc.type, function=tc.function, index=i)
                     for i, tc in enumerate(m.tool_calls)]
            chunk(ChunkChoice(index=c.index, delta=Delta(tool_calls=calls)))
        chunk(ChunkChoice(index=c.index, finish_reason=c.finish_reason or "stop"))
    if include_usage:
        chunk(usage=parsed.usage or Usage())
    last = len(chunks) - 1
    # All of it is here at once: `more` lets the sink write it in one go.
    return [StreamEvent(encoder.encode(ch), ch, i < last) for i, ch in enumerate(chunks)]


def canned(text: str, model: str) -> Completion:
    """The model's canned reply, marked so that no client can take it for a model's answer."""
    parsed = ChatCompletion(
        id=f"chatcmpl-canned-{uuid.uuid4().hex}", created=int(time.time()), model=model,
        choices=[Choice(message=ResponseMessage(content=text), finish_reason="stop")],
        usage=Usage(), system_fingerprint=CANNED_FINGERPRINT)
    return Completion(encoder.encode(parsed), parsed)


def relabel(body: bytes, model: str) -> bytes:
    """The same JSON with `model` set to the gateway model that answered (a fallback
    model's answer must say so). Generic JSON, so no upstream field is lost."""
    data: Any = any_decoder.decode(body)
    if isinstance(data, dict):
        data["model"] = model
    return encoder.encode(data)


def relabel_completion(completion: Completion, model: str) -> Completion:
    body = relabel(completion.body, model)
    return Completion(body, msgspec.structs.replace(completion.parsed, model=model))


def relabel_event(ev: StreamEvent, model: str) -> StreamEvent:
    return StreamEvent(relabel(ev.raw, model), msgspec.structs.replace(ev.chunk, model=model),
                       ev.more)
