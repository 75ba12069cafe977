"""Validation of a chat completion body, shared by every way a chat arrives (HTTP, WebSocket):
the same decoder, the same bounds, the same OpenAI-shaped 400 naming the parameter."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from bulwark.config import ModelPolicy
from bulwark.errors import InvalidRequest
from bulwark.wire import ChatRequest, request_decoder
from service.inputs import decode_body, error_param


def param_of(err: msgspec.ValidationError) -> str | None:
    """The parameter a msgspec validation error is about, as OpenAI names it
    (`messages[0].role`, `temperature`, or the unknown field itself)."""
    return error_param(str(err))


def decode_chat(body: bytes) -> ChatRequest:
    return decode_body(body, request_decoder)


def check_limits(chat: ChatRequest, *, max_messages: int, max_chars: int) -> None:
    if len(chat.messages) > max_messages:
        raise InvalidRequest(f"Too many messages: at most {max_messages}.",
                             code="too_many_messages", param="messages")
    for i, message in enumerate(chat.messages):
        content = message.content
        size = len(content) if isinstance(content, str) else sum(
            len(str(part.get("text", ""))) for part in content or ())
        if size > max_chars:
            raise InvalidRequest(f"Message {i} is longer than {max_chars} characters.",
                                 code="message_too_long", param=f"messages[{i}].content")


def _flag(headers: Mapping[str, str], name: str) -> bool | None:
    """A `true`/`false` header; absent: None; anything else: 400 naming it (a typo must
    not silently mean `false`)."""
    value = headers.get(name)
    if value is None:
        return None
    value = value.strip()
    if value not in ("true", "false"):
        raise InvalidRequest(f"{name} must be true or false.", code="invalid_header",
                             param=name)
    return value == "true"


def wants_continuation(headers: Mapping[str, str], policy: ModelPolicy | None) -> bool:
    """`x-bulwark-continue` when the client sent it (on the request, or on a socket's
    upgrade), else the model's `continue_streams`."""
    header = _flag(headers, "x-bulwark-continue")
    if header is not None:
        return header
    return policy is not None and policy.continue_streams


def check_flags(headers: Mapping[str, str]) -> None:
    """400 for a bad `x-bulwark-continue`/`x-bulwark-accept-canned`, before anything
    else (an Idempotency-Key replay included) could hide it."""
    _flag(headers, "x-bulwark-continue")
    _flag(headers, "x-bulwark-accept-canned")


def accepts_canned(headers: Mapping[str, str]) -> bool:
    """`x-bulwark-accept-canned: true`: the model's canned reply is an acceptable answer."""
    return _flag(headers, "x-bulwark-accept-canned") is True
