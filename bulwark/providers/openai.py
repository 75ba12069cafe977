"""Any OpenAI-compatible chat API: OpenAI, Mistral, Groq, OpenRouter, Together, DeepSeek,
Ollama, vLLM — and the built-in simulator.

The request is re-encoded with the upstream model name; answers are validated by decoding
them (a malformed body is a classified failure, never forwarded) and then passed on as the
upstream's own bytes, so provider-specific fields survive and no re-encoding is paid.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Mapping

import aiohttp
import msgspec

from bulwark.config import Provider
from bulwark.embeddings import (
    EmbedCall,
    EmbeddingResult,
    estimate_tokens,
    floats_of_base64,
)
from bulwark.errors import ErrorClass, UpstreamError, classify_status, redact
from bulwark.http1 import Http1
from bulwark.providers.base import (
    Call,
    Completion,
    ProbeResult,
    StreamEvent,
    post,
    post_http1,
    probe_get,
    read_json_body,
    split_events,
    translate,
)
from bulwark.wire import (
    ChatRequest,
    Message,
    StreamOptions,
    chunk_decoder,
    completion_decoder,
    encoder,
)

C = ErrorClass


class _StreamError(msgspec.Struct):
    """`data: {"error": {...}}` sent by an upstream in the middle of a stream."""

    error: dict[str, object] | str


_stream_error_decoder = msgspec.json.Decoder(_StreamError)


class _Embedding(msgspec.Struct):
    embedding: list[float] | str
    index: int = 0


class _EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int = 0


class _Embeddings(msgspec.Struct):
    data: list[_Embedding]
    usage: _EmbeddingUsage | None = None


_embeddings_decoder = msgspec.json.Decoder(_Embeddings)


class OpenAIAdapter:
    #: Client headers forwarded upstream (none: the gateway's client is not the provider's).
    passthrough_prefix: str | None = None

    def __init__(self, provider: Provider, session: aiohttp.ClientSession, *,
                 retry_after_cap: float, env: Mapping[str, str] | None = None,
                 http1: Http1 | None = None) -> None:
        self.provider = provider
        self._session = session
        self._retry_after_cap = retry_after_cap
        self._env = env
        self._chat_url = f"{provider.base_url}/chat/completions"
        #: Chats go through the lean client when the process has one (web does; healthd's
        #: probes and embeddings use aiohttp's): bulwark/http1.py says why.
        self._http1 = http1
        self._chat_target = None if http1 is None else http1.target(self._chat_url)
        self._models_url = f"{provider.base_url}/models"
        self._embeddings_url = f"{provider.base_url}/embeddings"
        # Mistral refuses unknown top-level fields (422), so it gets only its own `prefix`.
        self._vllm_prefill = "api.mistral.ai" not in provider.base_url

    def _headers(self, call: Call | EmbedCall | None) -> tuple[dict[str, str], tuple[str, ...]]:
        headers = {"Content-Type": "application/json"}
        key = self.provider.api_key(self._env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if call is not None:
            headers["X-Request-Id"] = call.request_id
            if call.traceparent:
                headers["traceparent"] = call.traceparent
            if self.passthrough_prefix:
                for name, value in call.passthrough.items():
                    if name.lower().startswith(self.passthrough_prefix):
                        headers[name] = value
        return headers, ((key,) if key else ())

    def _body(self, call: Call, *, stream: bool) -> bytes:
        req = msgspec.structs.replace(call.request, model=call.upstream_model, stream=stream)
        if not stream and req.stream_options is not None:
            req = msgspec.structs.replace(req, stream_options=msgspec.UNSET)
        if not call.prefill:
            return encoder.encode(req)
        # Continue the final assistant message: `prefix: true` on it for Mistral and DeepSeek,
        # `continue_final_message` without a generation prompt for vLLM (FACTS.md).
        messages = list(req.messages)
        messages[-1] = msgspec.structs.replace(messages[-1], prefix=True)
        body = encoder.encode(msgspec.structs.replace(req, messages=messages))
        if self._vllm_prefill:
            body = body[:-1] + b',"continue_final_message":true,"add_generation_prompt":false}'
        return body

    def _post_chat(self, body: bytes, headers: Mapping[str, str], secrets: tuple[str, ...],
                   *, idle: bool) -> post | post_http1:
        if self._http1 is not None and self._chat_target is not None:
            return post_http1(self._http1, self._chat_target, body=body, headers=headers,
                              provider=self.provider, retry_after_cap=self._retry_after_cap,
                              secrets=secrets, idle=idle)
        return post(self._session, self._chat_url, body=body, headers=headers,
                    provider=self.provider, retry_after_cap=self._retry_after_cap,
                    secrets=secrets, idle=idle)

    async def complete(self, call: Call) -> Completion:
        headers, secrets = self._headers(call)
        async with self._post_chat(self._body(call, stream=False), headers, secrets,
                                   idle=False) as resp:
            raw = await read_json_body(resp)
        try:
            parsed = completion_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            raise translate(err, phase="completion") from err
        if not parsed.choices:
            raise UpstreamError(C.MALFORMED_RESPONSE, detail="completion without choices")
        return Completion(raw, parsed)

    async def stream(self, call: Call) -> AsyncGenerator[StreamEvent, None]:
        headers, secrets = self._headers(call)
        headers["Accept"] = "text/event-stream"
        finished = False
        async with self._post_chat(self._body(call, stream=True), headers, secrets,
                                   idle=True) as resp:
            ctype = resp.headers.get("Content-Type", "")
            if "text/event-stream" not in ctype:
                raise UpstreamError(C.MALFORMED_RESPONSE,
                                    detail=f"stream answered as {ctype[:60]!r}")
            buf = b""
            try:
                while True:
                    piece = await resp.content.readany()
                    if not piece:
                        if not buf.strip(b"\r\n"):
                            break
                        piece = b"\n\n"  # the last event came without its blank line
                    batch, buf = split_events(buf + piece if buf else piece)
                    last = len(batch) - 1
                    for i, (_event, data) in enumerate(batch):
                        if data == b"[DONE]":
                            if not finished:
                                raise UpstreamError(C.NETWORK_RESET,
                                                    detail="[DONE] before finish_reason")
                            return
                        try:
                            chunk = chunk_decoder.decode(data)
                        except msgspec.ValidationError:
                            raise self._stream_error(data, secrets) from None
                        except msgspec.DecodeError as err:
                            raise translate(err, phase="chunk") from err
                        if chunk.finished:
                            finished = True
                        yield StreamEvent(data, chunk, i < last)
            except (aiohttp.ClientError, OSError) as err:
                raise translate(err, phase="stream") from err
        if not finished:
            # A clean close without finish_reason is a truncated answer, not success.
            raise UpstreamError(C.NETWORK_RESET, detail="stream ended without finish_reason")

    async def embed(self, call: EmbedCall) -> EmbeddingResult:
        headers, secrets = self._headers(call)
        # Floats, which every OpenAI-compatible server speaks (not all of them do base64);
        # the gateway encodes base64 for its client itself.
        body: dict[str, object] = {"model": call.upstream_model,
                                   "input": call.inputs.texts or call.inputs.tokens,
                                   "encoding_format": "float"}
        if call.dimensions is not None:
            body["dimensions"] = call.dimensions
        if call.user:
            body["user"] = call.user
        async with post(self._session, self._embeddings_url, body=encoder.encode(body),
                        headers=headers, provider=self.provider,
                        retry_after_cap=self._retry_after_cap, secrets=secrets) as resp:
            raw = await read_json_body(resp)
        try:
            parsed = _embeddings_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            raise translate(err, phase="embeddings") from err
        items = sorted(parsed.data, key=lambda d: d.index)
        vectors = [floats_of_base64(d.embedding) if isinstance(d.embedding, str)
                   else d.embedding for d in items]
        tokens = parsed.usage.prompt_tokens if parsed.usage else estimate_tokens(call.inputs)
        return EmbeddingResult(vectors, tokens)

    def _stream_error(self, data: bytes, secrets: tuple[str, ...]) -> UpstreamError:
        try:
            err = _stream_error_decoder.decode(data).error
        except (msgspec.DecodeError, msgspec.ValidationError):
            return UpstreamError(C.MALFORMED_RESPONSE, detail="chunk of unknown shape")
        text = str(err)
        status = err.get("code") if isinstance(err, dict) else None
        cls = classify_status(status if isinstance(status, int) else 500, text)
        return UpstreamError(cls, detail=f"error event: {redact(text[:200], secrets)}")

    async def probe(self, *, chat: bool, timeout: float) -> ProbeResult:
        headers, _ = self._headers(None)
        if not chat:
            return await probe_get(self._session, self._models_url, headers, timeout)
        return await self._probe_chat(timeout)

    async def _probe_chat(self, timeout: float) -> ProbeResult:
        model = next(iter(self.provider.models.values()))
        req = ChatRequest(model=model, messages=[Message(role="user", content="ping")],
                          max_tokens=1, stream=True, stream_options=StreamOptions())
        call = Call(request=req, upstream_model=model, request_id="healthd-probe")
        start = time.perf_counter()
        ttft: float | None = None
        try:
            async with asyncio.timeout(timeout):
                async for _ in self.stream(call):
                    if ttft is None:
                        ttft = (time.perf_counter() - start) * 1000
        except UpstreamError as err:
            return ProbeResult(ok=False, latency_ms=(time.perf_counter() - start) * 1000,
                               ttft_ms=ttft, error_class=str(err.cls), status=err.status)
        except TimeoutError:
            return ProbeResult(ok=False, latency_ms=(time.perf_counter() - start) * 1000,
                               ttft_ms=ttft, error_class=str(C.TIMEOUT_TOTAL))
        return ProbeResult(ok=True, latency_ms=(time.perf_counter() - start) * 1000, ttft_ms=ttft)


class SimAdapter(OpenAIAdapter):
    """The built-in simulator speaks OpenAI's wire; `x-sim-*` client headers pass through,
    so a newcomer can inject a fault with curl (`-H 'x-sim-status: 530'`)."""

    passthrough_prefix = "x-sim-"
