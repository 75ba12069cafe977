"""Anthropic's Messages API (`POST {base_url}/messages`), translated to and from OpenAI's wire.

Request: system and developer messages become the top-level `system`; tool calls and tool
results become `tool_use` / `tool_result` content blocks; consecutive messages of one role
are merged, because Anthropic requires user and assistant to alternate. Answer: text blocks
are joined, `tool_use` blocks become tool calls, and the event stream (`message_start`,
`content_block_*`, `message_delta`, `message_stop`) becomes OpenAI chunks. A stream is
complete only at `message_stop`; anything shorter is a failed attempt.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import msgspec

from bulwark.config import Provider
from bulwark.embeddings import EmbedCall, EmbeddingResult
from bulwark.errors import ErrorClass, UpstreamError, classify_status, redact
from bulwark.providers.answers import (
    AnswerBuilder,
    check_common,
    file_data_of,
    function_tools,
    image_url_of,
    make_usage,
    parse_data_url,
    probe_chat,
    tool_arguments,
    tool_choice_of,
    unsupported,
)
from bulwark.providers.base import (
    Call,
    Completion,
    ProbeResult,
    StreamEvent,
    post,
    probe_get,
    read_json_body,
    sse_lines,
    translate,
)
from bulwark.wire import ChatRequest, Message, ToolCall, ToolCallFunction, encoder

C = ErrorClass

ANTHROPIC_VERSION = "2023-06-01"
#: Anthropic requires max_tokens; OpenAI callers often omit it. 4096 is within every current
#: Claude model's output limit, so the default never turns into a 400.
DEFAULT_MAX_TOKENS = 4096

FINISH_REASONS: Mapping[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

#: Anthropic's error `type` -> the HTTP status it comes with, so one table classifies both
#: an error response and an `error` event in the middle of a stream.
_ERROR_STATUS: Mapping[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None

    def prompt(self) -> int | None:
        # Anthropic's input_tokens leaves out cached tokens; OpenAI's prompt_tokens counts them.
        if self.input_tokens is None:
            return None
        return (self.input_tokens + (self.cache_creation_input_tokens or 0)
                + (self.cache_read_input_tokens or 0))


class _Block(msgspec.Struct):
    type: str
    text: str = ""
    id: str = ""
    name: str = ""
    input: Any = None


class _ErrorInfo(msgspec.Struct):
    type: str = "api_error"
    message: str = ""


class _Message(msgspec.Struct):
    type: str = "message"
    content: list[_Block] = msgspec.field(default_factory=list)
    stop_reason: str | None = None
    usage: _Usage = msgspec.field(default_factory=_Usage)
    error: _ErrorInfo | None = None


class _Delta(msgspec.Struct):
    type: str = ""
    text: str = ""
    partial_json: str = ""
    stop_reason: str | None = None


class _Event(msgspec.Struct):
    type: str
    index: int = 0
    message: _Message | None = None
    content_block: _Block | None = None
    delta: _Delta | None = None
    usage: _Usage | None = None
    error: _ErrorInfo | None = None


_message_decoder = msgspec.json.Decoder(_Message)
_event_decoder = msgspec.json.Decoder(_Event)


def _error(info: _ErrorInfo | None, secrets: tuple[str, ...], *, where: str) -> UpstreamError:
    info = info or _ErrorInfo()
    status = _ERROR_STATUS.get(info.type, 500)
    cls = classify_status(status, info.message)
    return UpstreamError(cls, detail=f"{where}: {info.type}: {redact(info.message[:200], secrets)}")


def _requalify(err: UpstreamError) -> UpstreamError:
    """Anthropic answers an empty credit balance with a 400, as if the caller were wrong;
    it is our account's problem, so it must fail over and trip the breaker like a quota."""
    if err.cls is C.BAD_REQUEST and "credit balance" in (err.client_message or "").lower():
        return UpstreamError(C.QUOTA_EXCEEDED, status=err.status, detail=err.detail)
    return err


# --- request translation ----------------------------------------------------------------


def _text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _user_blocks(msg: Message, param: str) -> list[dict[str, Any]]:
    if msg.content is None:
        return []
    if isinstance(msg.content, str):
        return [_text_block(msg.content)] if msg.content else []
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(msg.content):
        kind = part.get("type")
        where = f"{param}.content[{j}]"
        if kind == "text":
            text = part.get("text")
            if isinstance(text, str) and text:
                blocks.append(_text_block(text))
        elif kind == "image_url":
            url = image_url_of(part, where)
            data = parse_data_url(url)
            if data is not None:
                source = {"type": "base64", "media_type": data[0], "data": data[1]}
            elif url.startswith(("https://", "http://")):
                source = {"type": "url", "url": url}
            else:
                raise unsupported("this image URL scheme", where)
            blocks.append({"type": "image", "source": source})
        elif kind == "file":
            media_type, payload = file_data_of(part, where)
            blocks.append({"type": "document", "source": {
                "type": "base64", "media_type": media_type, "data": payload}})
        else:
            raise unsupported(f"content parts of type {kind!r}", where)
    return blocks


def _assistant_blocks(msg: Message, param: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if isinstance(msg.content, str):
        if msg.content:
            blocks.append(_text_block(msg.content))
    elif msg.content:
        for part in msg.content:
            # An earlier refusal is still something the assistant said.
            text = part.get("text") if part.get("type") == "text" else part.get("refusal")
            if isinstance(text, str) and text:
                blocks.append(_text_block(text))
    if msg.function_call:
        raise unsupported("the legacy `function_call` message field", f"{param}.function_call")
    for k, call in enumerate(msg.tool_calls or []):
        name = call.function.name
        if not isinstance(name, str) or not isinstance(call.id, str):
            raise UpstreamError(C.BAD_REQUEST, detail="tool call without id or name",
                                param=f"{param}.tool_calls[{k}]",
                                client_message="Every tool call needs an id and a name.")
        blocks.append({
            "type": "tool_use",
            "id": call.id,
            "name": name,
            "input": tool_arguments(call.function.arguments, f"{param}.tool_calls[{k}]"),
        })
    return blocks


def _tool_result(msg: Message, param: str) -> dict[str, Any]:
    if not isinstance(msg.tool_call_id, str):
        raise UpstreamError(C.BAD_REQUEST, detail="tool message without tool_call_id",
                            param=f"{param}.tool_call_id",
                            client_message="A tool message needs a tool_call_id.")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": msg.tool_call_id}
    text = msg.text()
    if text:
        block["content"] = text
    return block


def _messages(messages: list[Message]) -> tuple[str, list[dict[str, Any]]]:
    """(system text, Anthropic messages): roles alternate, each content a block list."""
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        if msg.role in ("system", "developer"):
            if text := msg.text():
                system.append(text)
            continue
        if msg.role == "user":
            role, blocks = "user", _user_blocks(msg, param)
        elif msg.role == "assistant":
            role, blocks = "assistant", _assistant_blocks(msg, param)
        elif msg.role == "tool":
            role, blocks = "user", [_tool_result(msg, param)]
        else:
            raise unsupported(f"messages with role {msg.role!r}", f"{param}.role")
        if not blocks:
            continue  # Anthropic refuses empty content; an empty turn says nothing anyway
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    if not out and system:
        # A system-only request is valid for OpenAI; Anthropic needs one message.
        return "", [{"role": "user", "content": "\n\n".join(system)}]
    for msg_out in out:
        blocks = msg_out["content"]
        # Tool results must open the user turn that answers a tool_use.
        blocks.sort(key=lambda b: b["type"] != "tool_result")
        if len(blocks) == 1 and blocks[0]["type"] == "text":
            msg_out["content"] = blocks[0]["text"]
    last = out[-1] if out else None
    if last is not None and last["role"] == "assistant":
        # A prefilled final assistant turn may not end in whitespace (Anthropic 400s).
        content = last["content"]
        if isinstance(content, str):
            last["content"] = content.rstrip() or content
        elif content and content[-1]["type"] == "text":
            content[-1]["text"] = content[-1]["text"].rstrip() or content[-1]["text"]
    return "\n\n".join(system), out


def _tools(req: ChatRequest) -> dict[str, Any]:
    tools = function_tools(req)
    if not tools:
        return {}
    out: dict[str, Any] = {"tools": [
        {
            "name": t["name"],
            **({"description": t["description"]} if t.get("description") else {}),
            "input_schema": t.get("parameters") or {"type": "object", "properties": {}},
        }
        for t in tools
    ]}
    choice = tool_choice_of(req)
    spec: dict[str, Any] | None
    if choice is None:
        spec = None
    elif choice == "auto":
        spec = {"type": "auto"}
    elif choice == "none":
        spec = {"type": "none"}
    elif choice == "required":
        spec = {"type": "any"}
    else:
        spec = {"type": "tool", "name": choice.removeprefix("function:")}
    if req.parallel_tool_calls is False and (spec is None or spec["type"] != "none"):
        spec = {**(spec or {"type": "auto"}), "disable_parallel_tool_use": True}
    if spec is not None:
        out["tool_choice"] = spec
    return out


def request_body(call: Call, *, stream: bool) -> dict[str, Any]:
    """The Anthropic Messages request for one OpenAI chat request."""
    req = call.request
    check_common(req)
    system, messages = _messages(req.messages)
    body: dict[str, Any] = {
        "model": call.upstream_model,
        "messages": messages,
        "max_tokens": req.max_output_tokens or DEFAULT_MAX_TOKENS,
    }
    if system:
        body["system"] = system
    if isinstance(req.temperature, float | int):
        # OpenAI allows 0..2, Anthropic 0..1: clamp rather than refuse a valid request.
        body["temperature"] = min(float(req.temperature), 1.0)
    if isinstance(req.top_p, float | int) and "temperature" not in body:
        # Current Claude models refuse temperature and top_p together; temperature is the
        # one Anthropic recommends, and a 400 would cost the caller the whole answer.
        body["top_p"] = req.top_p
    if isinstance(req.stop, str):
        body["stop_sequences"] = [req.stop]
    elif isinstance(req.stop, list) and req.stop:
        body["stop_sequences"] = req.stop
    if isinstance(req.user, str) and req.user:
        body["metadata"] = {"user_id": req.user}
    body.update(_tools(req))
    if stream:
        body["stream"] = True
    return body


# --- the adapter ------------------------------------------------------------------------


class AnthropicAdapter:
    def __init__(self, provider: Provider, session: aiohttp.ClientSession, *,
                 retry_after_cap: float, env: Mapping[str, str] | None = None) -> None:
        self.provider = provider
        self._session = session
        self._retry_after_cap = retry_after_cap
        self._env = env
        self._messages_url = f"{provider.base_url}/messages"
        self._models_url = f"{provider.base_url}/models"

    def _headers(self, call: Call | None) -> tuple[dict[str, str], tuple[str, ...]]:
        headers = {"Content-Type": "application/json", "anthropic-version": ANTHROPIC_VERSION}
        key = self.provider.api_key(self._env)
        if key:
            headers["x-api-key"] = key
        if call is not None:
            headers["X-Request-Id"] = call.request_id
            if call.traceparent:
                headers["traceparent"] = call.traceparent
        return headers, ((key,) if key else ())

    @asynccontextmanager
    async def _post(self, call: Call, *, stream: bool) -> AsyncIterator[aiohttp.ClientResponse]:
        headers, secrets = self._headers(call)
        if stream:
            headers["Accept"] = "text/event-stream"
        body = encoder.encode(request_body(call, stream=stream))
        opened = False
        try:
            async with post(self._session, self._messages_url, body=body, headers=headers,
                            provider=self.provider, retry_after_cap=self._retry_after_cap,
                            secrets=secrets, idle=stream) as resp:
                opened = True
                yield resp
        except UpstreamError as err:
            if opened:
                raise
            raise _requalify(err) from err

    async def complete(self, call: Call) -> Completion:
        _, secrets = self._headers(None)
        async with self._post(call, stream=False) as resp:
            raw = await read_json_body(resp)
        try:
            msg = _message_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            raise translate(err, phase="message") from err
        if msg.type == "error":
            raise _error(msg.error, secrets, where="error body")
        if msg.type != "message":
            raise UpstreamError(C.MALFORMED_RESPONSE, detail=f"answer of type {msg.type[:40]!r}")
        text = "".join(b.text for b in msg.content if b.type == "text")
        tool_calls = [
            ToolCall(id=b.id, function=ToolCallFunction(
                name=b.name, arguments=encoder.encode(b.input or {}).decode()))
            for b in msg.content if b.type == "tool_use"
        ]
        usage = make_usage(msg.usage.prompt() or 0, msg.usage.output_tokens or 0)
        finish = FINISH_REASONS.get(msg.stop_reason or "", "stop")
        return AnswerBuilder(call.request.model).completion(
            content=text, tool_calls=tool_calls, finish_reason=finish, usage=usage)

    async def stream(self, call: Call) -> AsyncGenerator[StreamEvent, None]:
        _, secrets = self._headers(None)
        out = AnswerBuilder(call.request.model)
        started = False
        #: Anthropic content-block index -> OpenAI tool_calls index.
        tools: dict[int, int] = {}
        prompt_tokens: int | None = None
        output_tokens = 0
        stop_reason: str | None = None
        async with self._post(call, stream=True) as resp:
            ctype = resp.headers.get("Content-Type", "")
            if "text/event-stream" not in ctype:
                raise UpstreamError(C.MALFORMED_RESPONSE,
                                    detail=f"stream answered as {ctype[:60]!r}")
            async for _name, data in sse_lines(resp):
                try:
                    ev = _event_decoder.decode(data)
                except (msgspec.DecodeError, msgspec.ValidationError) as err:
                    raise translate(err, phase="event") from err
                if ev.type == "ping":
                    continue
                if ev.type == "error":
                    raise _error(ev.error, secrets, where="error event")
                if ev.type == "message_start":
                    if ev.message is not None:
                        prompt_tokens = ev.message.usage.prompt()
                        output_tokens = ev.message.usage.output_tokens or 0
                    started = True
                    yield out.role()
                    continue
                if not started:
                    raise UpstreamError(C.MALFORMED_RESPONSE,
                                        detail=f"{ev.type[:40]!r} before message_start")
                if ev.type == "content_block_start" and ev.content_block is not None:
                    block = ev.content_block
                    if block.type == "text" and block.text:
                        yield out.text(block.text)
                    elif block.type == "tool_use":
                        tools[ev.index] = len(tools)
                        yield out.tool_call(index=tools[ev.index], id=block.id, name=block.name)
                elif ev.type == "content_block_delta" and ev.delta is not None:
                    delta = ev.delta
                    if delta.type == "text_delta" and delta.text:
                        yield out.text(delta.text)
                    elif (delta.type == "input_json_delta" and delta.partial_json
                          and ev.index in tools):
                        yield out.tool_call(index=tools[ev.index], arguments=delta.partial_json)
                    # thinking, signature and citation deltas have no OpenAI chunk form
                elif ev.type == "message_delta":
                    if ev.delta is not None and ev.delta.stop_reason:
                        stop_reason = ev.delta.stop_reason
                    if ev.usage is not None:
                        # Cumulative counts: the last message_delta holds the totals.
                        if ev.usage.output_tokens is not None:
                            output_tokens = ev.usage.output_tokens
                        prompt_tokens = ev.usage.prompt() or prompt_tokens
                elif ev.type == "message_stop":
                    yield out.finish(FINISH_REASONS.get(stop_reason or "", "stop"))
                    if call.request.include_usage:
                        yield out.usage(make_usage(prompt_tokens or 0, output_tokens))
                    return
                # content_block_stop and event types added later carry nothing we forward
        raise UpstreamError(C.NETWORK_RESET, detail="stream ended early (no message_stop)")

    async def embed(self, call: EmbedCall) -> EmbeddingResult:
        # Anthropic has no embeddings API: another provider of the model may answer.
        raise unsupported("embeddings", "model")

    async def probe(self, *, chat: bool, timeout: float) -> ProbeResult:
        if chat:
            return await probe_chat(self.stream, self.provider, timeout)
        headers, _ = self._headers(None)
        return await probe_get(self._session, self._models_url, headers, timeout)

