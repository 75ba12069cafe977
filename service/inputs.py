"""Request bodies and query strings into msgspec types, with a 400 that names the field.

For routes other than chat (which keeps its own decoder, measured on the hot path). A
type's `__post_init__` may raise `ValueError("field: why")`; the field before the colon
becomes the error's `param`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

import msgspec
from aiohttp import web

from bulwark.errors import InvalidRequest, PayloadTooLarge

T = TypeVar("T")

_PATH = re.compile(r"at `\$\.?([^`]*)`")
_FIELD = re.compile(r"(?:missing required|unknown) field `([^`]*)`")
_OWN = re.compile(r"^([a-z_][a-z0-9_]*): ")


def error_param(text: str) -> str | None:
    m, f = _PATH.search(text), _FIELD.search(text)
    where = m.group(1) if m else ""
    field = f.group(1) if f else ""
    if not (where or field) and (own := _OWN.match(text)):
        return own.group(1)
    return ".".join(p for p in (where, field) if p) or None


def invalid(err: msgspec.ValidationError) -> InvalidRequest:
    text = str(err)
    return InvalidRequest(
        f"Invalid request: {text}", code="invalid_request", param=error_param(text)
    )


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refused with 413 beyond `limit` bytes (Content-Length or counted)."""
    too_large = PayloadTooLarge(f"The request body is larger than {limit} bytes.")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    try:
        # Reads at most the app's client_max_size; a chunked body may still exceed `limit`.
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    if len(body) > limit:
        raise too_large
    return body


_any = msgspec.json.Decoder()
#: msgspec holds ints in 64 bits; a larger whole float stays a float (and is refused).
_INT_RANGE = 2.0**63


def _whole_floats_to_int(obj: object) -> object:
    if isinstance(obj, float):
        return int(obj) if obj.is_integer() and abs(obj) < _INT_RANGE else obj
    if isinstance(obj, list):
        return [_whole_floats_to_int(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _whole_floats_to_int(v) for k, v in obj.items()}
    return obj


def decode_body(body: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    """`body` as the decoder's type; 400 naming the field when it does not fit.

    JSON does not tell 2 from 2.0 (JSON Schema's "integer" includes 2.0, and JavaScript
    clients cannot tell them apart either), but msgspec refuses a float for an int. So a
    body that fails is tried once more with whole floats read as integers: the happy path
    pays nothing, and a string or 2.5 is still refused.
    """
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as err:
        first = err
    except msgspec.DecodeError:
        raise InvalidRequest("The request body is not valid JSON.", code="invalid_json") from None
    try:
        value: T = msgspec.convert(_whole_floats_to_int(_any.decode(body)), decoder.type)
    except msgspec.ValidationError:
        raise invalid(first) from None
    return value


def decode_query(query: Mapping[str, str], type_: type[T]) -> T:
    """Query parameters (strings) into `type_`, converting numbers and booleans."""
    try:
        return msgspec.convert(dict(query), type_, strict=False)
    except msgspec.ValidationError as err:
        raise invalid(err) from None
