"""OpenAI answers built from a non-OpenAI upstream, and request helpers those adapters share.

The Anthropic and Gemini adapters translate; this module mints what they both produce:
one id and `created` per answer, repeated in every chunk as OpenAI does, and the wire
bytes the client receives (encoded once, here). It also holds the parts of request
translation that do not depend on the provider: data URLs, tool-call arguments, the
features a translating adapter refuses, and the one-token chat probe.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from bulwark.config import Provider
from bulwark.errors import ErrorClass, UpstreamError
from bulwark.providers.base import Call, Completion, ProbeResult, StreamEvent
from bulwark.wire import (
    ChatCompletion,
    ChatRequest,
    Choice,
    Chunk,
    ChunkChoice,
    Delta,
    Message,
    ResponseMessage,
    StreamOptions,
    ToolCall,
    ToolCallFunction,
    Usage,
    any_decoder,
    encoder,
)

C = ErrorClass


class AnswerBuilder:
    """One answer's identity (id, created, model) and its OpenAI wire form."""

    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        #: The gateway's model name, not the upstream's: the client asked for this one.
        self.model = model

    def completion(self, *, content: str, tool_calls: list[ToolCall], finish_reason: str,
                   usage: Usage | None) -> Completion:
        message = ResponseMessage(
            # OpenAI sends null content beside tool calls when the model said nothing.
            content=None if not content and tool_calls else content,
            tool_calls=tool_calls if tool_calls else msgspec.UNSET,
        )
        parsed = ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[Choice(index=0, message=message, finish_reason=finish_reason)],
            usage=usage,
        )
        return Completion(encoder.encode(parsed), parsed)

    def _event(self, chunk: Chunk) -> StreamEvent:
        return StreamEvent(encoder.encode(chunk), chunk)

    def chunk(self, delta: Delta) -> StreamEvent:
        return self._event(Chunk(id=self.id, created=self.created, model=self.model,
                                 choices=[ChunkChoice(index=0, delta=delta)]))

    def role(self) -> StreamEvent:
        return self.chunk(Delta(role="assistant", content=""))

    def text(self, text: str) -> StreamEvent:
        return self.chunk(Delta(content=text))

    def tool_call(self, *, index: int, id: str | None = None, name: str | None = None,
                  arguments: str = "") -> StreamEvent:
        """A tool-call delta: the opening one carries id and name, later ones arguments only."""
        call = ToolCall(
            index=index,
            id=msgspec.UNSET if id is None else id,
            function=ToolCallFunction(
                name=msgspec.UNSET if name is None else name, arguments=arguments),
        )
        return self.chunk(Delta(tool_calls=[call]))

    def finish(self, reason: str) -> StreamEvent:
        return self._event(Chunk(id=self.id, created=self.created, model=self.model,
                                 choices=[ChunkChoice(index=0, finish_reason=reason)]))

    def usage(self, usage: Usage) -> StreamEvent:
        """The `stream_options.include_usage` chunk: no choices, only usage."""
        return self._event(Chunk(id=self.id, created=self.created, model=self.model,
                                 choices=[], usage=usage))


def make_usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion)


def new_tool_call_id() -> str:
    # OpenAI rejects tool-call ids over 40 characters when a conversation moves there.
    return f"call_{uuid.uuid4().hex[:24]}"


def unsupported(what: str, param: str | None = None) -> UpstreamError:
    """The caller asked for something this provider kind cannot do: another may (failover);
    if none can, it is their request and our 400."""
    message = f"This provider does not support {what}."
    return UpstreamError(C.UNSUPPORTED, detail=message, client_message=message, param=param)


def parse_data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 payload) of a `data:<type>;base64,<data>` URL, else None."""
    if not url.startswith("data:"):
        return None
    head, sep, payload = url[5:].partition(",")
    if not sep or not head.endswith(";base64"):
        return None
    media_type = head[: -len(";base64")].split(";")[0] or "application/octet-stream"
    return media_type, payload


def image_url_of(part: dict[str, Any], param: str) -> str:
    """The URL of an OpenAI `image_url` part (an object with `url`, or a bare string)."""
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise UpstreamError(C.BAD_REQUEST, detail="image_url without url", param=param,
                            client_message="An image_url part needs a url.")
    return url


def file_data_of(part: dict[str, Any], param: str) -> tuple[str, str]:
    """(media type, base64) of an OpenAI `file` part sent inline; file ids are OpenAI's own."""
    spec = part.get("file")
    data = spec.get("file_data") if isinstance(spec, dict) else None
    parsed = parse_data_url(data) if isinstance(data, str) else None
    if parsed is None:
        raise unsupported("file parts other than inline file_data data URLs", param)
    return parsed


#: OpenAI `input_audio.format` -> media type.
AUDIO_TYPES = {"wav": "audio/wav", "mp3": "audio/mp3"}


def tool_arguments(raw: str | msgspec.UnsetType, param: str) -> dict[str, Any]:
    """An assistant tool call's `arguments` (a JSON string) as the object both APIs want."""
    if not isinstance(raw, str) or not raw.strip():
        return {}
    try:
        value = any_decoder.decode(raw)
    except msgspec.DecodeError:
        value = None
    if not isinstance(value, dict):
        raise UpstreamError(C.BAD_REQUEST, detail="tool call arguments are not a JSON object",
                            param=param,
                            client_message="Tool call arguments must be a JSON object.")
    return value


def function_tools(req: ChatRequest) -> list[dict[str, Any]]:
    """The request's tools as `{name, description?, parameters?}`; only functions translate."""
    if req.functions or req.function_call:
        raise unsupported("the legacy `functions` API; use `tools`", "functions")
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(req.tools or []):
        fn = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise unsupported(f"tools of type {tool.get('type')!r}", f"tools[{i}].type")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise UpstreamError(C.BAD_REQUEST, detail="tool without a name",
                                param=f"tools[{i}].function.name",
                                client_message="Every tool needs a function name.")
        out.append({k: fn[k] for k in ("name", "description", "parameters") if k in fn})
    return out


def tool_choice_of(req: ChatRequest) -> str | None:
    """`auto`, `none`, `required`, or the one function name the caller forces."""
    choice = req.tool_choice
    if choice is None or isinstance(choice, msgspec.UnsetType):
        return None
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise UpstreamError(C.BAD_REQUEST, detail=f"tool_choice {choice!r}",
                                param="tool_choice",
                                client_message=f"Unknown tool_choice {choice!r}.")
        return choice
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise unsupported("this tool_choice", "tool_choice")
    return f"function:{name}"


def check_common(req: ChatRequest) -> None:
    """Refuse what a translating adapter cannot honour rather than answer something else."""
    if isinstance(req.n, int) and req.n > 1:
        raise unsupported("n > 1", "n")
    if req.logprobs:
        raise unsupported("logprobs", "logprobs")
    if req.audio or (req.modalities and "audio" in req.modalities):
        raise unsupported("audio output", "modalities")


async def probe_chat(stream: Callable[[Call], AsyncIterator[StreamEvent]], provider: Provider,
                     timeout: float) -> ProbeResult:
    """A one-token streamed chat: healthy when it completes, ttft when the first chunk came."""
    model = next(iter(provider.models.values()))
    req = ChatRequest(model=model, messages=[Message(role="user", content="ping")],
                      max_tokens=1, stream=True, stream_options=StreamOptions())
    call = Call(request=req, upstream_model=model, request_id="healthd-probe")
    start = time.perf_counter()
    ttft: float | None = None

    def ms() -> float:
        return (time.perf_counter() - start) * 1000

    try:
        async with asyncio.timeout(timeout):
            async for _ in stream(call):
                if ttft is None:
                    ttft = ms()
    except UpstreamError as err:
        return ProbeResult(ok=False, latency_ms=ms(), ttft_ms=ttft, error_class=str(err.cls),
                           status=err.status)
    except TimeoutError:
        return ProbeResult(ok=False, latency_ms=ms(), ttft_ms=ttft,
                           error_class=str(C.TIMEOUT_TOTAL))
    return ProbeResult(ok=True, latency_ms=ms(), ttft_ms=ttft)
