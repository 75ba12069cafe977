"""Google's Gemini API (`models/{model}:generateContent`, `:streamGenerateContent?alt=sse`),
translated to and from OpenAI's wire.

Request: system and developer messages become `systemInstruction`; messages become
`contents` (roles `user` / `model`, consecutive ones merged); tools become
`functionDeclarations` and tool calls / results `functionCall` / `functionResponse` parts.
The key travels in the `x-goog-api-key` header, never in the URL, so no access log of URLs
can leak it. Answer: the first candidate's parts become text and tool calls; a prompt the
provider blocked outright is a content-policy refusal, not an empty answer.

Gemini's errors need their own reading (the quirks live here, DESIGN principle 5): an
invalid key is a 400 `API_KEY_INVALID`, a rate limit says "quota" and carries its delay in
a `RetryInfo` detail, and a region the API refuses is a 400 `FAILED_PRECONDITION`.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import msgspec

from bulwark.config import Provider
from bulwark.embeddings import EmbedCall, EmbeddingResult, estimate_tokens
from bulwark.errors import ErrorClass, UpstreamError, classify_status, parse_retry_after, redact
from bulwark.providers.answers import (
    AUDIO_TYPES,
    AnswerBuilder,
    check_common,
    file_data_of,
    function_tools,
    image_url_of,
    make_usage,
    new_tool_call_id,
    parse_data_url,
    probe_chat,
    tool_arguments,
    tool_choice_of,
    unsupported,
)
from bulwark.providers.base import (
    ERROR_BODY_LIMIT,
    Call,
    Completion,
    ProbeResult,
    StreamEvent,
    client_timeout,
    probe_get,
    read_json_body,
    sse_lines,
    translate,
)
from bulwark.wire import (
    ChatRequest,
    Message,
    ToolCall,
    ToolCallFunction,
    Usage,
    any_decoder,
    encoder,
)

C = ErrorClass

FINISH_REASONS: Mapping[str, str] = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
}


class _FunctionCall(msgspec.Struct):
    name: str
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    id: str | None = None


class _Part(msgspec.Struct, rename="camel"):
    text: str | None = None
    thought: bool = False
    function_call: _FunctionCall | None = None


class _Content(msgspec.Struct):
    parts: list[_Part] = msgspec.field(default_factory=list)


class _Candidate(msgspec.Struct, rename="camel"):
    content: _Content | None = None
    finish_reason: str | None = None


class _UsageMetadata(msgspec.Struct, rename="camel"):
    prompt_token_count: int = 0
    tool_use_prompt_token_count: int = 0
    candidates_token_count: int = 0
    thoughts_token_count: int = 0

    def usage(self) -> Usage:
        # OpenAI counts reasoning tokens as completion tokens, and tool-use prompts as prompt.
        return make_usage(self.prompt_token_count + self.tool_use_prompt_token_count,
                          self.candidates_token_count + self.thoughts_token_count)


class _PromptFeedback(msgspec.Struct, rename="camel"):
    block_reason: str | None = None


class _ErrorInfo(msgspec.Struct):
    code: int = 500
    message: str = ""
    status: str = ""
    details: list[Any] = msgspec.field(default_factory=list)


class _Response(msgspec.Struct, rename="camel"):
    candidates: list[_Candidate] = msgspec.field(default_factory=list)
    prompt_feedback: _PromptFeedback | None = None
    usage_metadata: _UsageMetadata | None = None
    error: _ErrorInfo | None = None


_response_decoder = msgspec.json.Decoder(_Response)


class _Values(msgspec.Struct):
    values: list[float]


class _BatchEmbeddings(msgspec.Struct):
    embeddings: list[_Values]


_embeddings_decoder = msgspec.json.Decoder(_BatchEmbeddings)
#: batchEmbedContents takes at most 100 requests; a larger input list is sent in parts.
EMBED_BATCH = 100


# --- errors -------------------------------------------------------------------------------


def _seconds(delay: object) -> float | None:
    """A protobuf Duration in JSON form ("36s", "1.5s")."""
    if isinstance(delay, str) and delay.endswith("s"):
        try:
            return float(delay[:-1])
        except ValueError:
            return None
    return None


def _classify(status: int, info: _ErrorInfo) -> tuple[ErrorClass, float | None]:
    """A class for a Gemini error and the delay it asks for, from its gRPC status and details."""
    details = [d for d in info.details if isinstance(d, dict)]
    reasons = {d.get("reason") for d in details}
    low = info.message.lower()
    if ("API_KEY_INVALID" in reasons or info.status == "UNAUTHENTICATED"
            or "api key not valid" in low):
        return C.AUTHENTICATION, None
    if info.status == "FAILED_PRECONDITION":
        # "User location is not supported", "enable billing": the account cannot use the API.
        return C.PERMISSION, None
    if info.status == "RESOURCE_EXHAUSTED" or status == 429:
        delay = next((_seconds(d.get("retryDelay")) for d in details
                      if "RetryInfo" in str(d.get("@type", ""))), None)
        quota_ids = [str(v.get("quotaId", "")) for d in details
                     for v in d.get("violations", []) if isinstance(v, dict)]
        # Every Gemini 429 says "quota"; only a per-day one is spent until tomorrow.
        if any("PerDay" in q for q in quota_ids):
            return C.QUOTA_EXCEEDED, delay
        return C.RATE_LIMIT, delay
    if "token count" in low and "exceeds" in low:
        return C.CONTEXT_LENGTH, None
    return classify_status(status, info.message), None


def _error_info(raw: bytes) -> _ErrorInfo | None:
    try:
        body = any_decoder.decode(raw)
    except msgspec.DecodeError:
        return None
    if isinstance(body, list) and body:
        body = body[0]  # the non-SSE stream endpoint wraps everything in an array
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return None
    try:
        return msgspec.convert(err, _ErrorInfo)
    except msgspec.ValidationError:
        return None


async def _error_from_response(resp: aiohttp.ClientResponse, *, retry_after_cap: float,
                               secrets: tuple[str, ...]) -> UpstreamError:
    try:
        raw = await resp.content.read(ERROR_BODY_LIMIT)
    except (TimeoutError, aiohttp.ClientError):
        raw = b""
    text = raw.decode("utf-8", "replace")
    info = _error_info(raw)
    if info is None:
        cls, delay = classify_status(resp.status, text), None
    else:
        cls, delay = _classify(resp.status, info)
    retry_after = parse_retry_after(resp.headers, retry_after_cap)
    if retry_after is None and delay is not None:
        retry_after = min(max(delay, 0.0), retry_after_cap)
    client_message = None
    if info is not None and cls in (C.BAD_REQUEST, C.CONTEXT_LENGTH, C.CONTENT_POLICY):
        client_message = redact(info.message, secrets)[:500]
    return UpstreamError(cls, status=resp.status, retry_after=retry_after,
                         detail=f"HTTP {resp.status}: {redact(text[:200], secrets)}",
                         client_message=client_message)


def _stream_error(info: _ErrorInfo, secrets: tuple[str, ...]) -> UpstreamError:
    cls, _ = _classify(info.code, info)
    return UpstreamError(cls, detail=f"error event: {info.status} "
                                     f"{redact(info.message[:200], secrets)}")


# --- request translation ----------------------------------------------------------------


def _inline(media_type: str, data: str) -> dict[str, Any]:
    return {"inlineData": {"mimeType": media_type, "data": data}}


def _user_parts(msg: Message, param: str) -> list[dict[str, Any]]:
    if msg.content is None:
        return []
    if isinstance(msg.content, str):
        return [{"text": msg.content}] if msg.content else []
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(msg.content):
        kind = part.get("type")
        where = f"{param}.content[{j}]"
        if kind == "text":
            text = part.get("text")
            if isinstance(text, str) and text:
                parts.append({"text": text})
        elif kind == "image_url":
            data = parse_data_url(image_url_of(part, where))
            if data is None:
                # Gemini fetches only its own File API and Cloud Storage URIs.
                raise unsupported("image URLs; send the image as a base64 data URL", where)
            parts.append(_inline(*data))
        elif kind == "file":
            parts.append(_inline(*file_data_of(part, where)))
        elif kind == "input_audio":
            audio = part.get("input_audio")
            fmt = audio.get("format") if isinstance(audio, dict) else None
            data_b64 = audio.get("data") if isinstance(audio, dict) else None
            if not isinstance(data_b64, str) or fmt not in AUDIO_TYPES:
                raise unsupported("this input_audio part", where)
            parts.append(_inline(AUDIO_TYPES[str(fmt)], data_b64))
        else:
            raise unsupported(f"content parts of type {kind!r}", where)
    return parts


def _model_parts(msg: Message, param: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    if isinstance(msg.content, str):
        if msg.content:
            parts.append({"text": msg.content})
    elif msg.content:
        for part in msg.content:
            text = part.get("text") if part.get("type") == "text" else part.get("refusal")
            if isinstance(text, str) and text:
                parts.append({"text": text})
    if msg.function_call:
        raise unsupported("the legacy `function_call` message field", f"{param}.function_call")
    for k, call in enumerate(msg.tool_calls or []):
        if not isinstance(call.function.name, str):
            raise UpstreamError(C.BAD_REQUEST, detail="tool call without a name",
                                param=f"{param}.tool_calls[{k}]",
                                client_message="Every tool call needs a name.")
        parts.append({"functionCall": {
            "name": call.function.name,
            "args": tool_arguments(call.function.arguments, f"{param}.tool_calls[{k}]"),
        }})
    return parts


def _function_response(msg: Message, names: Mapping[str, str], param: str) -> dict[str, Any]:
    # Gemini matches a result to its call by function name; OpenAI by id: look the name up.
    call_id = msg.tool_call_id if isinstance(msg.tool_call_id, str) else None
    name = names.get(call_id) if call_id else None
    if name is None and isinstance(msg.name, str):
        name = msg.name
    if name is None:
        raise UpstreamError(C.BAD_REQUEST, detail="tool result for an unknown tool call",
                            param=f"{param}.tool_call_id",
                            client_message="A tool message must answer a tool call made "
                                           "earlier in the conversation.")
    text = msg.text()
    try:
        value = any_decoder.decode(text) if text else {}
    except msgspec.DecodeError:
        value = None
    # `response` must be an object; anything else is wrapped, as Google's examples do.
    response = value if isinstance(value, dict) else {"content": text}
    return {"functionResponse": {"name": name, "response": response}}


def _contents(messages: list[Message]) -> tuple[str, list[dict[str, Any]]]:
    names = {
        call.id: call.function.name
        for msg in messages for call in (msg.tool_calls or [])
        if isinstance(call.id, str) and isinstance(call.function.name, str)
    }
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        if msg.role in ("system", "developer"):
            if text := msg.text():
                system.append(text)
            continue
        if msg.role == "user":
            role, parts = "user", _user_parts(msg, param)
        elif msg.role == "assistant":
            role, parts = "model", _model_parts(msg, param)
        elif msg.role == "tool":
            role, parts = "user", [_function_response(msg, names, param)]
        else:
            raise unsupported(f"messages with role {msg.role!r}", f"{param}.role")
        if not parts:
            continue  # Gemini refuses empty parts; an empty turn says nothing anyway
        if out and out[-1]["role"] == role:
            out[-1]["parts"].extend(parts)
        else:
            out.append({"role": role, "parts": parts})
    if not out and system:
        return "", [{"role": "user", "parts": [{"text": "\n\n".join(system)}]}]
    return "\n\n".join(system), out


def _tools(req: ChatRequest) -> dict[str, Any]:
    tools = function_tools(req)
    if not tools:
        return {}
    declarations = []
    for t in tools:
        decl: dict[str, Any] = {"name": t["name"]}
        if t.get("description"):
            decl["description"] = t["description"]
        if t.get("parameters"):
            # parametersJsonSchema takes JSON Schema as OpenAI callers write it
            # (additionalProperties, $defs…); `parameters` takes only an OpenAPI subset.
            decl["parametersJsonSchema"] = t["parameters"]
        declarations.append(decl)
    out: dict[str, Any] = {"tools": [{"functionDeclarations": declarations}]}
    choice = tool_choice_of(req)
    if choice is not None:
        config: dict[str, Any]
        if choice.startswith("function:"):
            config = {"mode": "ANY", "allowedFunctionNames": [choice.removeprefix("function:")]}
        else:
            config = {"mode": {"auto": "AUTO", "none": "NONE", "required": "ANY"}[choice]}
        out["toolConfig"] = {"functionCallingConfig": config}
    return out


def _generation_config(req: ChatRequest) -> dict[str, Any]:
    # One candidate: the OpenAI side of the gateway answers with one choice.
    config: dict[str, Any] = {"candidateCount": 1}
    if isinstance(req.temperature, float | int):
        config["temperature"] = req.temperature
    if isinstance(req.top_p, float | int):
        config["topP"] = req.top_p
    if req.max_output_tokens is not None:
        config["maxOutputTokens"] = req.max_output_tokens
    if isinstance(req.stop, str):
        config["stopSequences"] = [req.stop]
    elif isinstance(req.stop, list) and req.stop:
        config["stopSequences"] = req.stop
    if isinstance(req.presence_penalty, float | int):
        config["presencePenalty"] = req.presence_penalty
    if isinstance(req.frequency_penalty, float | int):
        config["frequencyPenalty"] = req.frequency_penalty
    if isinstance(req.seed, int):
        config["seed"] = req.seed
    fmt = req.response_format
    if isinstance(fmt, dict):
        if fmt.get("type") == "json_object":
            config["responseMimeType"] = "application/json"
        elif fmt.get("type") == "json_schema":
            config["responseMimeType"] = "application/json"
            spec = fmt.get("json_schema")
            if isinstance(spec, dict) and isinstance(spec.get("schema"), dict):
                config["responseJsonSchema"] = spec["schema"]
    return config


def request_body(call: Call) -> dict[str, Any]:
    """The Gemini GenerateContentRequest for one OpenAI chat request."""
    req = call.request
    check_common(req)
    system, contents = _contents(req.messages)
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": [{"text": system}]}
    body.update(_tools(req))
    body["generationConfig"] = _generation_config(req)
    return body


def _finish(reason: str, has_tool_calls: bool) -> str:
    finish = FINISH_REASONS.get(reason, "stop")
    # Gemini says STOP after a function call; OpenAI clients look for tool_calls.
    return "tool_calls" if finish == "stop" and has_tool_calls else finish


# --- the adapter ------------------------------------------------------------------------


class GeminiAdapter:
    def __init__(self, provider: Provider, session: aiohttp.ClientSession, *,
                 retry_after_cap: float, env: Mapping[str, str] | None = None) -> None:
        self.provider = provider
        self._session = session
        self._retry_after_cap = retry_after_cap
        self._env = env
        self._models_url = f"{provider.base_url}/models"

    def _url(self, model: str, method: str) -> str:
        # "models/gemini-2.0-flash" and "gemini-2.0-flash" name the same model; tuned
        # models live under their own collection ("tunedModels/…").
        name = model if "/" in model else f"models/{model}"
        return f"{self.provider.base_url}/{name}:{method}"

    def _headers(self, call: Call | EmbedCall | None) -> tuple[dict[str, str], tuple[str, ...]]:
        headers = {"Content-Type": "application/json"}
        key = self.provider.api_key(self._env)
        if key:
            headers["x-goog-api-key"] = key
        if call is not None:
            headers["X-Request-Id"] = call.request_id
            if call.traceparent:
                headers["traceparent"] = call.traceparent
        return headers, ((key,) if key else ())

    @asynccontextmanager
    async def _post(self, url: str, body: bytes, *, headers: Mapping[str, str],
                    secrets: tuple[str, ...]) -> AsyncIterator[aiohttp.ClientResponse]:
        """base.post, with Gemini's own reading of error bodies."""
        try:
            async with self._session.post(url, data=body, headers=headers,
                                          timeout=client_timeout(self.provider)) as resp:
                if resp.status >= 300:
                    raise await _error_from_response(
                        resp, retry_after_cap=self._retry_after_cap, secrets=secrets)
                yield resp
        except UpstreamError:
            raise
        except (TimeoutError, aiohttp.ClientError, OSError, ssl.SSLError) as err:
            raise translate(err) from err

    async def complete(self, call: Call) -> Completion:
        headers, secrets = self._headers(call)
        url = self._url(call.upstream_model, "generateContent")
        body = encoder.encode(request_body(call))
        async with self._post(url, body, headers=headers, secrets=secrets) as resp:
            raw = await read_json_body(resp)
        try:
            answer = _response_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            raise translate(err, phase="response") from err
        if answer.error is not None:
            raise _stream_error(answer.error, secrets)
        _raise_if_blocked(answer)
        if not answer.candidates:
            raise UpstreamError(C.MALFORMED_RESPONSE, detail="response without candidates")
        cand = answer.candidates[0]
        texts: list[str] = []
        tool_calls: list[ToolCall] = []
        for part in cand.content.parts if cand.content else []:
            if part.text and not part.thought:
                texts.append(part.text)
            if part.function_call is not None:
                fc = part.function_call
                tool_calls.append(ToolCall(
                    id=fc.id or new_tool_call_id(),
                    function=ToolCallFunction(name=fc.name,
                                              arguments=encoder.encode(fc.args).decode())))
        usage = answer.usage_metadata.usage() if answer.usage_metadata else None
        return AnswerBuilder(call.request.model).completion(
            content="".join(texts), tool_calls=tool_calls,
            finish_reason=_finish(cand.finish_reason or "STOP", bool(tool_calls)), usage=usage)

    async def stream(self, call: Call) -> AsyncGenerator[StreamEvent, None]:
        headers, secrets = self._headers(call)
        headers["Accept"] = "text/event-stream"
        url = self._url(call.upstream_model, "streamGenerateContent") + "?alt=sse"
        out = AnswerBuilder(call.request.model)
        started = False
        tool_count = 0
        usage: Usage | None = None
        body = encoder.encode(request_body(call))
        async with self._post(url, body, headers=headers, secrets=secrets) as resp:
            ctype = resp.headers.get("Content-Type", "")
            if "text/event-stream" not in ctype:
                raise UpstreamError(C.MALFORMED_RESPONSE,
                                    detail=f"stream answered as {ctype[:60]!r}")
            async for _name, data in sse_lines(resp):
                try:
                    answer = _response_decoder.decode(data)
                except (msgspec.DecodeError, msgspec.ValidationError) as err:
                    raise translate(err, phase="event") from err
                if answer.error is not None:
                    raise _stream_error(answer.error, secrets)
                _raise_if_blocked(answer)
                if answer.usage_metadata is not None:
                    usage = answer.usage_metadata.usage()
                if not started:
                    started = True
                    yield out.role()
                if not answer.candidates:
                    continue
                cand = answer.candidates[0]
                for part in cand.content.parts if cand.content else []:
                    if part.text and not part.thought:
                        yield out.text(part.text)
                    if part.function_call is not None:
                        fc = part.function_call
                        # Gemini sends a call whole: id, name and arguments in one delta.
                        yield out.tool_call(index=tool_count, id=fc.id or new_tool_call_id(),
                                            name=fc.name,
                                            arguments=encoder.encode(fc.args).decode())
                        tool_count += 1
                if cand.finish_reason and cand.finish_reason != "FINISH_REASON_UNSPECIFIED":
                    yield out.finish(_finish(cand.finish_reason, tool_count > 0))
                    if call.request.include_usage:
                        yield out.usage(usage or make_usage(0, 0))
                    return
        raise UpstreamError(C.NETWORK_RESET, detail="stream ended early (no finishReason)")

    async def embed(self, call: EmbedCall) -> EmbeddingResult:
        if call.inputs.tokens:
            raise unsupported("token-array embedding inputs; send text", "input")
        headers, secrets = self._headers(call)
        model = call.upstream_model if "/" in call.upstream_model \
            else f"models/{call.upstream_model}"
        url = self._url(call.upstream_model, "batchEmbedContents")
        vectors: list[list[float]] = []
        texts = call.inputs.texts
        for start in range(0, len(texts), EMBED_BATCH):
            requests = []
            for text in texts[start:start + EMBED_BATCH]:
                item: dict[str, Any] = {"model": model, "content": {"parts": [{"text": text}]}}
                if call.dimensions is not None:
                    item["outputDimensionality"] = call.dimensions
                requests.append(item)
            body = encoder.encode({"requests": requests})
            async with self._post(url, body, headers=headers, secrets=secrets) as resp:
                raw = await read_json_body(resp)
            try:
                parsed = _embeddings_decoder.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as err:
                raise translate(err, phase="embeddings") from err
            vectors.extend(e.values for e in parsed.embeddings)
        # batchEmbedContents reports no usage: estimated as OpenAI's rule of thumb.
        return EmbeddingResult(vectors, estimate_tokens(call.inputs))

    async def probe(self, *, chat: bool, timeout: float) -> ProbeResult:
        if chat:
            return await probe_chat(self.stream, self.provider, timeout)
        headers, _ = self._headers(None)
        return await probe_get(self._session, self._models_url, headers, timeout)


def _raise_if_blocked(answer: _Response) -> None:
    if answer.candidates or answer.prompt_feedback is None:
        return
    reason = answer.prompt_feedback.block_reason
    if reason:
        raise UpstreamError(C.CONTENT_POLICY, detail=f"prompt blocked: {reason[:60]}",
                            client_message=f"The provider blocked the prompt ({reason[:60]}).")
