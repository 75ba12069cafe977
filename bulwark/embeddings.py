"""Embeddings: OpenAI's `POST /v1/embeddings` wire, and what the adapters share for it.

Inbound the request is closed (`forbid_unknown_fields`), like chat. `input` is a string, a
list of strings, one token array or a list of token arrays; `check` bounds it and names the
offending param. Every adapter returns an `EmbeddingResult` (vectors as floats, in input
order); the gateway encodes the answer once, as floats or as OpenAI's base64 (little-endian
float32), whatever the upstream sent.
"""

from __future__ import annotations

import base64
import binascii
import math
import sys
from array import array
from collections.abc import Mapping
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
from msgspec import UNSET, Meta, UnsetType

from bulwark.errors import ErrorClass, InvalidRequest, UpstreamError

C = ErrorClass

#: OpenAI's own bound on inputs per request; providers' are the same or larger (Gemini 100
#: per batch is split by its adapter).
MAX_INPUTS = 2048
#: OpenAI's per-input bound is 8192 tokens; at ~4 characters a token that is 32 KiB of text.
MAX_INPUT_CHARS = 32_768
MAX_INPUT_TOKENS = 8192
#: Characters per token, to estimate usage where a provider reports none (Gemini).
CHARS_PER_TOKEN = 4


_TEXT = {"type": "string", "minLength": 1, "maxLength": MAX_INPUT_CHARS}
_TOKENS = {"type": "array", "items": {"type": "integer"}, "minItems": 1,
           "maxItems": MAX_INPUT_TOKENS}


class EmbeddingRequest(msgspec.Struct, kw_only=True, omit_defaults=True,
                       forbid_unknown_fields=True):
    #: A string, a list of strings, a token array, or a list of token arrays; nothing
    #: empty, at most MAX_INPUTS. check() enforces it (with errors of its own); the
    #: schema says it, for the OpenAPI document.
    input: (Annotated[str, Meta(extra_json_schema=_TEXT)]
            | Annotated[list[Any], Meta(extra_json_schema={"anyOf": [
                {"items": _TEXT, "minItems": 1, "maxItems": MAX_INPUTS},
                _TOKENS,
                {"items": _TOKENS, "minItems": 1, "maxItems": MAX_INPUTS}]})])
    model: Annotated[str, Meta(min_length=1, max_length=256)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1, le=65_536)] | UnsetType = UNSET
    user: str | UnsetType = UNSET


class Inputs(msgspec.Struct, frozen=True):
    """The inputs, normalised: texts, or token arrays (then `texts` is empty)."""

    texts: list[str]
    tokens: list[list[int]]

    @property
    def size(self) -> int:
        return len(self.texts) or len(self.tokens)


def _is_token(t: object) -> bool:
    # JSON does not tell 7 from 7.0 (JSON Schema's "integer" includes 7.0): both are ids.
    return (isinstance(t, int) and not isinstance(t, bool)) or (
        isinstance(t, float) and t.is_integer())


def _is_tokens(value: object) -> bool:
    return isinstance(value, list) and all(_is_token(t) for t in value)


def check(req: EmbeddingRequest) -> Inputs:
    """The request's inputs within the gateway's bounds, or an InvalidRequest naming them."""
    raw = req.input
    items: list[Any] = [raw] if isinstance(raw, str) else raw
    if items and _is_tokens(items):
        items = [items]  # one token array
    if not items:
        raise InvalidRequest("`input` must not be empty.", code="invalid_input", param="input")
    if len(items) > MAX_INPUTS:
        raise InvalidRequest(f"Too many inputs: at most {MAX_INPUTS}.", code="too_many_inputs",
                             param="input")
    texts: list[str] = []
    tokens: list[list[int]] = []
    for i, item in enumerate(items):
        param = "input" if isinstance(raw, str) else f"input[{i}]"
        if isinstance(item, str) and not tokens:
            if not item:
                raise InvalidRequest("An input must not be an empty string.",
                                     code="invalid_input", param=param)
            if len(item) > MAX_INPUT_CHARS:
                raise InvalidRequest(f"Input {i} is longer than {MAX_INPUT_CHARS} characters.",
                                     code="input_too_long", param=param)
            texts.append(item)
        elif _is_tokens(item) and not texts:
            if not item:
                raise InvalidRequest("A token array must not be empty.", code="invalid_input",
                                     param=param)
            if len(item) > MAX_INPUT_TOKENS:
                raise InvalidRequest(f"Input {i} is longer than {MAX_INPUT_TOKENS} tokens.",
                                     code="input_too_long", param=param)
            tokens.append([int(t) for t in item])
        else:
            raise InvalidRequest("`input` must be a string, a list of strings, or token arrays "
                                 "(not mixed).", code="invalid_input", param=param)
    return Inputs(texts, tokens)


class EmbedCall(msgspec.Struct, frozen=True, kw_only=True):
    """One upstream embeddings attempt's input."""

    inputs: Inputs
    upstream_model: str
    request_id: str
    dimensions: int | None = None
    user: str | None = None
    passthrough: Mapping[str, str] = msgspec.field(default_factory=dict)
    #: W3C trace context of this attempt's span, sent upstream as `traceparent`.
    traceparent: str | None = None


class EmbeddingResult(NamedTuple):
    vectors: list[list[float]]
    prompt_tokens: int


def estimate_tokens(inputs: Inputs) -> int:
    if inputs.tokens:
        return sum(len(t) for t in inputs.tokens)
    return sum(max(1, math.ceil(len(t) / CHARS_PER_TOKEN)) for t in inputs.texts)


def floats_of_base64(value: str) -> list[float]:
    """OpenAI's base64 embedding (little-endian float32) as floats."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise UpstreamError(C.MALFORMED_RESPONSE, detail="embedding: invalid base64") from err
    if len(raw) % 4:
        raise UpstreamError(C.MALFORMED_RESPONSE, detail="embedding: not float32 data")
    values = array("f")
    values.frombytes(raw)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def base64_of(vector: list[float]) -> str:
    values = array("f", vector)
    if sys.byteorder == "big":
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode("ascii")


def check_result(result: EmbeddingResult, inputs: Inputs, dimensions: int | None) -> None:
    """A malformed answer (fails over): one vector per input, all of the expected size."""
    if len(result.vectors) != inputs.size:
        raise UpstreamError(C.MALFORMED_RESPONSE, detail=(
            f"embeddings: {len(result.vectors)} vectors for {inputs.size} inputs"))
    sizes = {len(v) for v in result.vectors}
    if len(sizes) != 1 or 0 in sizes:
        raise UpstreamError(C.MALFORMED_RESPONSE, detail="embeddings: vectors of unequal size")
    (size,) = sizes
    if dimensions is not None and size != dimensions:
        raise UpstreamError(C.MALFORMED_RESPONSE, detail=(
            f"embeddings: vectors of {size} dimensions, {dimensions} expected"))


class Embedding(msgspec.Struct, kw_only=True):
    object: str = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


_encoder = msgspec.json.Encoder()


def encode_response(result: EmbeddingResult, *, model: str,
                    encoding_format: Literal["float", "base64"]) -> bytes:
    """The OpenAI `list` of embeddings, under the gateway's model name."""
    data = [Embedding(index=i, embedding=base64_of(v) if encoding_format == "base64" else v)
            for i, v in enumerate(result.vectors)]
    usage = EmbeddingUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens)
    return _encoder.encode(EmbeddingList(data=data, model=model, usage=usage))


request_decoder = msgspec.json.Decoder(EmbeddingRequest)
