"""The provider simulator: a real OpenAI-compatible HTTP server with programmable faults.

It is the upstream of the one-command start (with no providers file, every web process
serves it at BULWARK_SIM_URL as a small fleet of named providers, see `create_fleet_app`),
of tests and of benchmarks (`python -m bulwark.sim --port 9100`). Faults are chosen per
request, by headers or by a script posted to a control endpoint; per-request headers
override the script key by key.

    header                   script key       effect
    x-sim-status: 530        status           answer that status (52x: Cloudflare-like HTML;
                                              other 4xx/5xx: OpenAI-shaped JSON error)
    x-sim-retry-after: 3     retry_after      Retry-After seconds (429 sends 1 by default)
    x-sim-latency-ms: 200    latency_ms       delay before the status line
    x-sim-first-token-ms: 5  first_token_ms   stream: delay before the first content chunk;
                                              non-stream: added to the delay before the answer
    x-sim-fault: reset       fault            reset | malformed | truncate | stall |
                                              stall-before | error-event | none
    x-sim-chunks: 5          chunks           number of content chunks (default 20)
    x-sim-chunk-delay-ms: 10 chunk_delay_ms   delay between content chunks
    x-sim-fail: alpha,beta   -                only the simulators named here answer 530
                                              (the others ignore it): one request header
                                              that fails one provider of a fleet
    x-sim-overlap-words: 2   overlap_words    a continuation first repeats the last 2 words
                                              of the partial answer (see below)
    x-sim-dims: 16           dims             embeddings: vector size when the request
                                              names no `dimensions` (default 8)

Control endpoints (not counted, not logged):

    POST /_sim/script  {"steps": [{"status": 503}, {"fault": "reset"}, {}],
                        "then": {"status": 530}, "include_probes": false,
                        "models_status": null}     replaces the whole script
    POST /_sim/fail    every request, probes included, answers 530 (`?status=503` for
                       another status) until reset: "this provider is down"
    POST /_sim/reset   clears script, log and counters (healthy again)
    GET  /_sim/log     requests seen (chat and models), oldest first, bounded
    GET  /_sim/stats   {"chat": n, "models": n}

Continuation (service/continuation.py): a stream request whose final assistant message is a
prefix to continue (`"prefix": true` on it, or `continue_final_message: true`), or whose
final user message is the gateway's instruction to continue the assistant message before
it, answers the rest of this simulator's own reply from the word where the partial answer
ends (word count), after repeating `overlap_words` of its last words — so a test knows
exactly what the seam must drop.

`POST /v1/embeddings` answers OpenAI-shaped embeddings: deterministic unit vectors from the
simulator's name and each input (`embedding_vector`), float or base64 as asked; status,
latency, reset and malformed faults apply as to chat.

Each chat request consumes the next step; `GET /v1/models` does too when
`include_probes` is true. When the steps run out, `then` applies (default: healthy).
`models_status` makes every `GET /v1/models` answer that status, whatever the steps say.

In a fleet (`create_fleet_app`), each named simulator lives under its own path prefix:
`/alpha/v1/chat/completions`, `/alpha/_sim/fail`, …; the unnamed root (`/v1/…`,
`/_sim/…`) is a simulator called "sim", so a single-simulator URL keeps working.

The hot path only concatenates bytes precomputed per simulator (one chunk per word) and
per request (the chunk prefix with id, created and model): benchmarks push thousands of
requests per second through one process, and the simulator must not be the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import math
import random
import re
import socket
import struct
import sys
import time
from array import array
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web

DEFAULT_CHUNKS = 20
MODELS = ("sim-1", "sim-1-mini", "sim-2")
#: What "this provider is down" answers (`/_sim/fail`, `x-sim-fail`): Cloudflare's origin
#: error, the outage a gateway meets most in front of a hosted model.
FAIL_STATUS = 530
FAULTS = ("reset", "malformed", "truncate", "stall", "stall-before", "error-event")
# Enough history for any test or a benchmark's tail; a deque drops the oldest beyond it.
LOG_LIMIT = 10_000
# A stall ends when the client goes away; this bounds it when the client never does.
STALL_SEC = 60.0
# How often a stalled handler checks that its client is still there. Under the test
# server and `main` the handler is cancelled on disconnect anyway; this is the fallback.
_STALL_POLL_SEC = 0.05

Fault = Literal["reset", "malformed", "truncate", "stall", "stall-before", "error-event"]


class Step(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True,
           forbid_unknown_fields=True):
    """What the simulator does with one request. The default is a healthy answer."""

    status: Annotated[int, msgspec.Meta(ge=200, le=599)] | None = None
    retry_after: Annotated[int, msgspec.Meta(ge=0)] | None = None
    latency_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    first_token_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    fault: Fault | None = None
    # Bounded so that a typo cannot make one answer gigabytes long.
    chunks: Annotated[int, msgspec.Meta(ge=0, le=100_000)] | None = None
    chunk_delay_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    overlap_words: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0
    dims: Annotated[int, msgspec.Meta(ge=1, le=8192)] | None = None


HEALTHY = Step()


class Script(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    steps: list[Step] = msgspec.field(default_factory=list)
    then: Step = HEALTHY
    include_probes: bool = False
    models_status: Annotated[int, msgspec.Meta(ge=200, le=599)] | None = None


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class _ChatIn(msgspec.Struct):
    """Only the request fields the simulator acts on; everything else is ignored."""

    model: str = MODELS[0]
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


class BadControl(ValueError):
    """An `x-sim-*` header or a script the simulator cannot follow."""


_HEADER_KEYS = (
    ("x-sim-status", "status"),
    ("x-sim-retry-after", "retry_after"),
    ("x-sim-latency-ms", "latency_ms"),
    ("x-sim-first-token-ms", "first_token_ms"),
    ("x-sim-fault", "fault"),
    ("x-sim-chunks", "chunks"),
    ("x-sim-chunk-delay-ms", "chunk_delay_ms"),
    ("x-sim-overlap-words", "overlap_words"),
    ("x-sim-dims", "dims"),
)

class _MessageIn(msgspec.Struct):
    role: str = "user"
    content: Any = None
    prefix: bool = False

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if isinstance(p, dict))
        return ""


class _ContinuationIn(msgspec.Struct):
    messages: list[_MessageIn] = msgspec.field(default_factory=list)
    continue_final_message: bool = False


#: The first words of the gateway's continuation instruction (service/continuation.py).
CONTINUE_INSTRUCTION = "Continue your previous answer exactly where it stops."
_WORD = re.compile(r"\s*\S+")


def partial_answer(raw: bytes) -> str | None:
    """The partial answer a request asks to continue (prefill or instruction), else None."""
    if (b'"prefix"' not in raw and b"continue_final_message" not in raw
            and CONTINUE_INSTRUCTION.encode() not in raw):
        return None  # the common case, without decoding the messages
    try:
        req = _continuation_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    msgs = req.messages
    if msgs and msgs[-1].role == "assistant" and (msgs[-1].prefix or req.continue_final_message):
        return msgs[-1].text()
    if (len(msgs) >= 2 and msgs[-1].role == "user" and msgs[-2].role == "assistant"
            and msgs[-1].text().startswith(CONTINUE_INSTRUCTION)):
        return msgs[-2].text()
    return None


def continuation_words(name: str, partial: str, n: int, overlap: int) -> list[str]:
    """What a simulator called `name` streams to continue `partial`: the last `overlap`
    words of it again, then its own reply of n words from the word where `partial` ends."""
    said = _WORD.findall(partial)
    return said[len(said) - min(overlap, len(said)):] + reply_words(name, n)[len(said):]


class _EmbedIn(msgspec.Struct):
    input: Any
    model: str = MODELS[0]
    dimensions: int | None = None
    encoding_format: Literal["float", "base64"] = "float"


DEFAULT_EMBED_DIMS = 8


def embedding_inputs(value: object) -> list[str]:
    """The texts of an embeddings `input` (token arrays become their numbers as text)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) for v in value):
            return [" ".join(map(str, value))]
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value):
            return [" ".join(map(str, v)) for v in value]
    raise ValueError("input must be a string, a list of strings, or token arrays")


def embedding_tokens(value: object, texts: list[str]) -> int:
    """Prompt tokens: a token array's length, else ~4 characters a token."""
    if isinstance(value, list) and value and not isinstance(value[0], str):
        return sum(len(v) if isinstance(v, list) else 1 for v in value)
    return sum(max(1, math.ceil(len(t) / 4)) for t in texts)


def embedding_vector(name: str, text: str, dims: int) -> list[float]:
    """The unit vector a simulator called `name` gives `text`: deterministic, and different
    per simulator, so that a test can tell which one answered."""
    raw = b""
    counter = 0
    while len(raw) < dims * 2:
        raw += hashlib.blake2b(f"{name}\0{counter}\0{text}".encode(), digest_size=64).digest()
        counter += 1
    values = [v / 32767.5 - 1.0 for v in struct.unpack(f"<{dims}H", raw[: dims * 2])]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


_chat_decoder = msgspec.json.Decoder(_ChatIn)
_embed_decoder = msgspec.json.Decoder(_EmbedIn)
_continuation_decoder = msgspec.json.Decoder(_ContinuationIn)
_script_decoder = msgspec.json.Decoder(Script)
_any_decoder = msgspec.json.Decoder()
_encode = msgspec.json.encode


def header_step(headers: Mapping[str, str], base: Step = HEALTHY) -> Step:
    """`base` with every key that an `x-sim-*` header sets replaced; raises BadControl."""
    found: dict[str, object] | None = None
    for header, key in _HEADER_KEYS:
        value = headers.get(header)
        if value is not None:
            if found is None:
                found = {}
            value = value.strip()
            # "none" lets a header switch off a fault that the script would apply.
            found[key] = None if key == "fault" and value.lower() in ("", "none") else value
    if found is None:
        return base
    merged = msgspec.to_builtins(base)
    merged.update(found)
    try:
        return msgspec.convert(merged, Step, strict=False)
    except msgspec.ValidationError as err:
        raise BadControl(f"x-sim-* header: {err}") from None


_FILLER = ("this", "reply", "is", "deterministic", "so", "that", "tests", "can", "compare",
           "every", "word", "of", "it", "across", "runs", "and", "providers")


def reply_words(name: str, n: int = DEFAULT_CHUNKS) -> list[str]:
    """The n content chunks a simulator called `name` streams: deterministic, so that
    tests can tell which upstream answered and whether tokens of two were mixed."""
    intro = ["Hello", " from", " sim"] + ([] if name == "sim" else [f" {name}"])
    filler = _FILLER
    return [intro[i] if i < len(intro) else " " + filler[(i - len(intro)) % len(filler)]
            for i in range(n)]


def reply_text(name: str, n: int = DEFAULT_CHUNKS) -> str:
    """The whole answer of a simulator called `name` with n chunks (stream or not)."""
    return "".join(reply_words(name, n))


_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None,
          "Invalid request: the simulator was told to reject it (x-sim-status: 400)."),
    401: ("invalid_request_error", "invalid_api_key",
          ("Incorrect API key provided: sk-ab***cd. You can find your API key at "
           "https://platform.openai.com/account/api-keys.")),
    403: ("invalid_request_error", "unsupported_country_region_territory",
          "Country, region, or territory not supported"),
    404: ("invalid_request_error", "model_not_found",
          "The model does not exist or you do not have access to it."),
    429: ("requests", "rate_limit_exceeded",
          "Rate limit reached for requests per min (RPM): Limit 3, Used 3, Requested 1."),
    500: ("server_error", None,
          "The server had an error while processing your request. Sorry about that!"),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
    504: ("server_error", None, "Gateway timeout."),
}

_ERROR_EVENT = (b'data: {"error":{"message":"The server had an error while processing your '
                b'request. Sorry about that!","type":"server_error","param":null,'
                b'"code":null}}\n\n')
_MALFORMED_JSON = b'{"id": '
_MALFORMED_EVENT = b"data: {not json\n\n"
_DONE = b"data: [DONE]\n\n"
_ROLE = b'[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,' \
        b'"finish_reason":null}]}\n\n'
_FINISH = b'[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}\n\n'
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def _is_cloudflare(status: int) -> bool:
    # Cloudflare's own 52x family (520-527, 530) answers with an HTML page, not JSON.
    return 520 <= status <= 530


def _error_body(status: int, name: str) -> tuple[bytes, str]:
    if _is_cloudflare(status):
        html = (f"<!DOCTYPE html>\n<html>\n<head><title>{status} | Cloudflare</title></head>\n"
                f"<body>\n<h1>Error {status}</h1>\n<p>error code: {status}</p>\n"
                f"<p>Ray ID: 8c1f2e3d4a5b6c7d &bull; sim {name}</p>\n</body>\n</html>\n")
        return html.encode(), "text/html"
    default_type = "server_error" if status >= 500 else "invalid_request_error"
    etype, code, message = _ERRORS.get(
        status, (default_type, None, f"Simulated error (HTTP {status}) from sim {name}."))
    body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
    return _encode(body), "application/json"


class SimState:
    """One simulator: its script, request log, counters, and the precomputed bytes."""

    def __init__(self, name: str = "sim", *, seed: int | None = None,
                 stall_sec: float = STALL_SEC) -> None:
        self.name = name
        self.stall_sec = stall_sec
        self._rng = random.Random(seed)
        self._choice_chunks: list[bytes] = []
        self._completion_choices: dict[int, bytes] = {}
        self._errors: dict[int, tuple[bytes, str]] = {}
        self._models_body = _encode({"object": "list", "data": [
            {"id": m, "object": "model", "created": 1700000000, "owned_by": f"sim-{name}"}
            for m in MODELS]})
        self._health_body = _encode({"status": "ok", "name": name})
        self.reset()

    # ---- script, log, counters ----------------------------------------------------

    def reset(self) -> None:
        self.set_script(Script())
        self.log: deque[tuple[str, str, Mapping[str, str], bytes, Step, int | None, float]] = (
            deque(maxlen=LOG_LIMIT))
        self.chat_count = 0
        self.models_count = 0

    def set_script(self, script: Script) -> None:
        self._steps = deque(script.steps)
        self._step_index = 0
        self._then = script.then
        self._include_probes = script.include_probes
        self._models_status = script.models_status

    def next_step(self, *, probe: bool) -> tuple[Step, int | None]:
        """The step that applies to the next request, and its index in the script."""
        if probe:
            if self._models_status is not None:
                return Step(status=self._models_status), None
            if not self._include_probes:
                return HEALTHY, None
        if self._steps:
            index = self._step_index
            self._step_index += 1
            return self._steps.popleft(), index
        return self._then, None

    def log_json(self) -> bytes:
        entries = []
        for method, path, headers, raw, step, index, t in self.log:
            body: object = None
            if raw:
                try:
                    body = _any_decoder.decode(raw)
                except msgspec.DecodeError:
                    body = raw.decode("utf-8", "replace")
            entries.append({
                "method": method,
                "path": path,
                "headers": {k.lower(): v for k, v in headers.items()
                            if k.lower() != "authorization"},
                "authorization_present": "Authorization" in headers,
                "body": body,
                "fault": msgspec.to_builtins(step),
                "step": index,
                "t": t,
            })
        return _encode(entries)

    # ---- precomputed bytes ----------------------------------------------------------

    def _grow(self, n: int) -> None:
        if n > len(self._choice_chunks):
            words = reply_words(self.name, n)
            for word in words[len(self._choice_chunks):]:
                self._choice_chunks.append(
                    b'[{"index":0,"delta":{"content":' + _encode(word)
                    + b'},"logprobs":null,"finish_reason":null}]}\n\n')

    def content_chunks(self, n: int) -> list[bytes]:
        """The `choices` part (and closing brace) of the first n content chunks."""
        self._grow(n)
        return self._choice_chunks[:n]

    @staticmethod
    def word_chunk(word: str) -> bytes:
        return (b'[{"index":0,"delta":{"content":' + _encode(word)
                + b'},"logprobs":null,"finish_reason":null}]}\n\n')

    def completion_choices(self, n: int) -> bytes:
        cached = self._completion_choices.get(n)
        if cached is None:
            text = _encode(reply_text(self.name, n))
            cached = (b',"choices":[{"index":0,"message":{"role":"assistant","content":' + text
                      + b',"refusal":null},"logprobs":null,"finish_reason":"stop"}]')
            if len(self._completion_choices) > 1024:
                self._completion_choices.clear()
            self._completion_choices[n] = cached
        return cached

    def error_response(self, step: Step) -> web.Response:
        status = step.status or 500
        cached = self._errors.get(status)
        if cached is None:
            cached = self._errors[status] = _error_body(status, self.name)
        body, ctype = cached
        resp = web.Response(status=status, body=body, content_type=ctype)
        retry_after = step.retry_after if step.retry_after is not None else (
            1 if status == 429 else None)
        if retry_after is not None:
            resp.headers["Retry-After"] = str(retry_after)
        if _is_cloudflare(status):
            resp.headers["Server"] = "cloudflare"
            resp.headers["CF-RAY"] = "8c1f2e3d4a5b6c7d-AMS"
        return resp

    def new_id(self) -> bytes:
        return b"chatcmpl-%024x" % self._rng.getrandbits(96)

    # ---- handlers -------------------------------------------------------------------

    def take_step(self, request: web.Request, raw: bytes, *, probe: bool
                  ) -> Step | web.Response:
        """This request's step (script, then its `x-sim-*` headers), logged; or the 400 for
        a control header the simulator cannot follow."""
        step, index = self.next_step(probe=probe)
        headers = request.headers
        try:
            step = header_step(headers, step)
            fail = headers.get("x-sim-fail")
            if fail is not None and self.name in {n.strip() for n in fail.split(",")}:
                step = msgspec.structs.replace(step, status=FAIL_STATUS)
        except BadControl as err:
            return _sim_error(str(err))
        finally:
            self.log.append((request.method, request.path, headers, raw, step, index,
                             time.monotonic()))
        return step

    async def chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.chat_count += 1
        step = self.take_step(request, raw, probe=False)
        if isinstance(step, web.Response):
            return step
        try:
            req = _chat_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            return web.json_response({"error": {
                "message": f"We could not parse the JSON body of your request: {err}",
                "type": "invalid_request_error", "param": None, "code": None}}, status=400)

        delay = step.latency_ms + (0.0 if req.stream else step.first_token_ms)
        if delay:
            await asyncio.sleep(delay / 1000)
        if step.fault == "reset":
            return _reset(request)
        if step.status is not None and step.status >= 300:
            return self.error_response(step)

        n = DEFAULT_CHUNKS if step.chunks is None else step.chunks
        cap = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if cap is not None:
            n = max(0, min(n, cap))
        chunks: list[bytes] | None = None
        if req.stream and (partial := partial_answer(raw)) is not None:
            chunks = [self.word_chunk(w) for w in
                      continuation_words(self.name, partial, n, step.overlap_words)]
            n = len(chunks)
        created = b"%d" % int(time.time())
        model = _encode(req.model)
        prompt_tokens = max(1, len(raw) // 4)
        usage = (b'"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}'
                 % (prompt_tokens, n, prompt_tokens + n))
        if req.stream:
            prefix = (b'data: {"id":"' + self.new_id()
                      + b'","object":"chat.completion.chunk","created":' + created
                      + b',"model":' + model + b',"system_fingerprint":"fp_sim","choices":')
            opts = req.stream_options
            usage_tail = (b'[],' + usage + b'}\n\n'
                          if opts is not None and opts.include_usage else None)
            return await self._stream(request, step, prefix,
                                      self.content_chunks(n) if chunks is None else chunks,
                                      usage_tail)
        body = b"".join((
            b'{"id":"', self.new_id(), b'","object":"chat.completion","created":', created,
            b',"model":', model, self.completion_choices(n), b",", usage,
            b',"system_fingerprint":"fp_sim"}'))
        return await _plain(request, self, step, body, "application/json")

    async def _stream(self, request: web.Request, step: Step, prefix: bytes,
                      chunks: list[bytes], usage_tail: bytes | None) -> web.StreamResponse:
        status = step.status or 200
        n = len(chunks)
        fault = step.fault
        if fault is None and not step.first_token_ms and not step.chunk_delay_ms:
            # The benchmark path: the whole stream in one write, no chunked encoding.
            parts = [prefix, _ROLE]
            for c in chunks:
                parts += (prefix, c)
            parts += (prefix, _FINISH)
            if usage_tail is not None:
                parts += (prefix, usage_tail)
            parts.append(_DONE)
            return web.Response(status=status, body=b"".join(parts), headers=_SSE_HEADERS)

        resp = web.StreamResponse(status=status, headers=_SSE_HEADERS)
        await resp.prepare(request)
        if fault == "stall-before":
            await self.stall(request)
            return resp
        await resp.write(prefix + _ROLE)
        # Faults that cut a stream short do it halfway, after at least one content chunk.
        cut = min(n, max(1, n // 2)) if fault is not None else n
        for i in range(n + 1):
            if i == cut and fault is not None:
                if fault == "truncate":
                    # A clean end of the chunked body: no finish_reason, no [DONE].
                    return resp
                if fault == "stall":
                    await self.stall(request)
                    return resp
                if fault == "error-event":
                    await resp.write(_ERROR_EVENT)
                    return resp
                # malformed: one broken event among good ones, then a normal ending, so a
                # client that skips what it cannot parse silently loses a word.
                await resp.write(_MALFORMED_EVENT)
            if i == n:
                break
            pause = step.first_token_ms if i == 0 else step.chunk_delay_ms
            if pause:
                await asyncio.sleep(pause / 1000)
            await resp.write(prefix + chunks[i])
        tail = [prefix, _FINISH]
        if usage_tail is not None:
            tail += (prefix, usage_tail)
        tail.append(_DONE)
        await resp.write(b"".join(tail))
        return resp

    async def stall(self, request: web.Request) -> None:
        """Send nothing more, until the client goes away or `stall_sec` have passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.stall_sec
        while (remaining := deadline - loop.time()) > 0:
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            await asyncio.sleep(min(_STALL_POLL_SEC, remaining))
        # Never end a stalled answer cleanly: that would look complete to the client.
        _reset(request)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.chat_count += 1
        step = self.take_step(request, raw, probe=False)
        if isinstance(step, web.Response):
            return step
        try:
            req = _embed_decoder.decode(raw)
            texts = embedding_inputs(req.input)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as err:
            return web.json_response({"error": {
                "message": f"Invalid embeddings request: {err}",
                "type": "invalid_request_error", "param": "input", "code": None}}, status=400)
        if step.latency_ms or step.first_token_ms:
            await asyncio.sleep((step.latency_ms + step.first_token_ms) / 1000)
        if step.fault == "reset":
            return _reset(request)
        if step.status is not None and step.status >= 300:
            return self.error_response(step)
        dims = req.dimensions or step.dims or DEFAULT_EMBED_DIMS
        data = []
        for i, text in enumerate(texts):
            vec = embedding_vector(self.name, text, dims)
            value: object = vec
            if req.encoding_format == "base64":
                packed = array("f", vec)
                if sys.byteorder == "big":
                    packed.byteswap()
                value = base64.b64encode(packed.tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = embedding_tokens(req.input, texts)
        body = _encode({"object": "list", "data": data, "model": req.model,
                        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        return await _plain(request, self, step, body, "application/json")

    async def models(self, request: web.Request) -> web.StreamResponse:
        self.models_count += 1
        step = self.take_step(request, b"", probe=True)
        if isinstance(step, web.Response):
            return step
        if step.latency_ms or step.first_token_ms:
            await asyncio.sleep((step.latency_ms + step.first_token_ms) / 1000)
        if step.fault == "reset":
            return _reset(request)
        if step.status is not None and step.status >= 300:
            return self.error_response(step)
        return await _plain(request, self, step, self._models_body, "application/json")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(body=self._health_body, content_type="application/json")

    async def post_script(self, request: web.Request) -> web.Response:
        try:
            self.set_script(_script_decoder.decode(await request.read()))
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            return _sim_error(f"script: {err}")
        return web.json_response({"ok": True})

    async def post_fail(self, request: web.Request) -> web.Response:
        raw = request.query.get("status", str(FAIL_STATUS))
        try:
            step = msgspec.convert({"status": raw}, Step, strict=False)
        except msgspec.ValidationError as err:
            return _sim_error(f"status: {err}")
        if step.status is None or step.status < 400:
            return _sim_error("status: must be an error status (400..599)")
        self.set_script(Script(then=step, include_probes=True))
        return web.json_response({"ok": True, "name": self.name, "status": step.status})

    async def post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def get_log(self, request: web.Request) -> web.Response:
        return web.Response(body=self.log_json(), content_type="application/json")

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response({"chat": self.chat_count, "models": self.models_count})


async def _plain(request: web.Request, sim: SimState, step: Step, body: bytes,
                 ctype: str) -> web.StreamResponse:
    """A non-streamed 2xx answer, or the fault that breaks it."""
    status = step.status or 200
    fault = step.fault
    if fault is None:
        return web.Response(status=status, body=body, content_type=ctype)
    if fault == "malformed":
        return web.Response(status=status, body=_MALFORMED_JSON, content_type=ctype)
    if fault == "error-event":
        # Some proxies wrap an upstream failure in a 200: the body is an error, not an answer.
        return web.Response(status=status, body=_ERROR_EVENT[6:-2], content_type=ctype)
    resp = web.StreamResponse(status=status)
    resp.content_type = ctype
    resp.content_length = len(body)
    await resp.prepare(request)
    if fault == "stall-before":
        await sim.stall(request)
        return resp
    await resp.write(body[: len(body) // 2])
    if fault == "stall":
        await sim.stall(request)
        return resp
    # truncate: fewer bytes than Content-Length promised, then the connection ends.
    if request.transport is not None:
        request.transport.close()
    return resp


def _reset(request: web.Request) -> web.Response:
    """Drop the connection with a TCP RST and no response at all."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0 turns close() into a RST, like a crashed peer or a middlebox.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    # aiohttp finds the transport gone when it writes this and drops it quietly.
    return web.Response()


def _sim_error(message: str) -> web.Response:
    return web.json_response({"error": {"message": f"sim: {message}", "type": "sim_error",
                                        "param": None, "code": "sim_bad_control"}}, status=400)


SIM_STATE = web.AppKey("sim_state", SimState)


def _add_routes(app: web.Application, sim: SimState) -> None:
    app[SIM_STATE] = sim
    app.router.add_post("/v1/chat/completions", sim.chat)
    app.router.add_post("/v1/embeddings", sim.embeddings)
    app.router.add_get("/v1/models", sim.models)
    app.router.add_get("/health", sim.health)
    app.router.add_post("/_sim/script", sim.post_script)
    app.router.add_post("/_sim/fail", sim.post_fail)
    app.router.add_post("/_sim/reset", sim.post_reset)
    app.router.add_get("/_sim/log", sim.get_log)
    app.router.add_get("/_sim/stats", sim.get_stats)


def create_sim_app(name: str = "sim", *, seed: int | None = None,
                   stall_sec: float = STALL_SEC) -> web.Application:
    """The simulator as an aiohttp application; `app[SIM_STATE]` is its state, which
    in-process tests may script directly instead of through `/_sim/script`."""
    app = web.Application()
    _add_routes(app, SimState(name, seed=seed, stall_sec=stall_sec))
    return app


#: Sub-applications of a fleet by name; their state is `fleet[FLEET][name][SIM_STATE]`.
FLEET = web.AppKey("sim_fleet", dict[str, web.Application])


def create_fleet_app(names: Sequence[str], *, root: str = "sim", seed: int | None = None,
                     stall_sec: float = STALL_SEC) -> web.Application:
    """Several simulators on one port, each under `/<name>`, each with its own script,
    log and answer ("Hello from sim <name>"), plus one called `root` at `/`. One port
    (not one per provider) because web processes share it with SO_REUSEPORT, and a
    newcomer's one-liners differ only in the name."""
    app = create_sim_app(root, seed=seed, stall_sec=stall_sec)
    subs: dict[str, web.Application] = {}
    for name in names:
        sub = web.Application()
        _add_routes(sub, SimState(name, seed=seed, stall_sec=stall_sec))
        app.add_subapp(f"/{name}", sub)
        subs[name] = sub
    app[FLEET] = subs
    return app


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bulwark.sim",
                                     description="OpenAI-compatible provider simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--name", default="sim", help="shown in every answer")
    parser.add_argument("--fleet", default="",
                        help="comma-separated names also served, each under /<name>")
    parser.add_argument("--seed", type=int, default=None, help="makes completion ids repeatable")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.fleet.split(",") if n.strip()]
    app = create_fleet_app(names, root=args.name, seed=args.seed)
    # handler_cancellation: a stalled answer ends as soon as its client goes away.
    # shutdown_timeout: honcho SIGKILLs 5 s after SIGTERM; stalls must not hold us there.
    web.run_app(app, host=args.host, port=args.port, access_log=None, loop=_new_loop(),
                handler_cancellation=True, shutdown_timeout=2.0)


if __name__ == "__main__":
    main()
