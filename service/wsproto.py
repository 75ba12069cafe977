"""WebSocket chat frames (CONTRACT.md "WebSocket chat", docs/WEBSOCKET.md).

Every frame is one JSON object in a text frame, tagged by `type`. Client frames decode as a
tagged union; a bad one becomes an `error` frame naming what was wrong, and the socket stays
open. Server frames are encoded here once each; a delta splices the upstream chunk's JSON
bytes in as they came (no re-encoding per token).
"""

from __future__ import annotations

import struct
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from bulwark.errors import GatewayError, InvalidRequest
from service.chatreq import param_of

#: A client's request id: any short printable string, unique among its session's requests.
Id = Annotated[str, Meta(min_length=1, max_length=128)]
Topic = Literal["providers", "degradation"]
TOPICS: tuple[Topic, ...] = ("providers", "degradation")
#: Ids in one resume frame: a chat UI resumes the handful it was waiting for.
MAX_RESUME_IDS = 256


class _Frame(msgspec.Struct, tag_field="type", kw_only=True, forbid_unknown_fields=True,
             frozen=True):
    pass


class Chat(_Frame, tag="chat", frozen=True):
    id: Id
    #: The chat completion body, validated exactly as `POST /v1/chat/completions` does.
    request: msgspec.Raw


class Cancel(_Frame, tag="cancel", frozen=True):
    id: Id


class Subscribe(_Frame, tag="subscribe", frozen=True):
    topics: Annotated[list[Topic], Meta(min_length=1, max_length=len(TOPICS))]


class Resume(_Frame, tag="resume", frozen=True):
    ids: Annotated[list[Id], Meta(min_length=1, max_length=MAX_RESUME_IDS)]


ClientFrame = Chat | Cancel | Subscribe | Resume
_client_decoder: msgspec.json.Decoder[ClientFrame] = msgspec.json.Decoder(ClientFrame)


def decode_frame(data: str | bytes) -> ClientFrame:
    """One client frame, or an InvalidRequest naming what is wrong with it."""
    try:
        return _client_decoder.decode(data)
    except msgspec.ValidationError as err:
        param = param_of(err)
        if param == "type":
            raise InvalidRequest(
                f"Unknown or missing frame type ({err}); expected one of chat, cancel, "
                "subscribe, resume.", code="unknown_frame_type", param="type") from None
        raise InvalidRequest(f"Invalid frame: {err}", code="invalid_frame",
                             param=param) from None
    except msgspec.DecodeError:
        raise InvalidRequest("The frame is not valid JSON.", code="invalid_json") from None


# -- server frames ----------------------------------------------------------------------


class _Out(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True):
    pass


class Ack(_Out, tag="ack"):
    id: str
    #: The session the answer is stored under, for `resume` after a reconnect.
    session: str


class Done(msgspec.Struct, tag_field="type", tag="done", kw_only=True):
    """Every field always present: `usage` is null when the provider reported none."""

    id: str
    provider: str
    attempts: int
    fallback: str
    usage: msgspec.Raw | None = None


class ErrorFrame(_Out, tag="error", kw_only=True):
    id: str | UnsetType = UNSET
    error: dict[str, Any]


class Event(_Out, tag="event"):
    topic: str
    data: Any
    #: For `degradation`: which fleet row changed (`degradation/auto`, `degradation/operator`).
    key: str | UnsetType = UNSET


_encoder = msgspec.json.Encoder()
encode_json = _encoder.encode


def ack(cid: str, session: str) -> bytes:
    return _encoder.encode(Ack(id=cid, session=session))


def done(cid: str, provider: str, attempts: int, fallback: str,
         usage: bytes | None) -> bytes:
    raw = None if usage is None else msgspec.Raw(usage)
    return _encoder.encode(Done(id=cid, provider=provider, attempts=attempts,
                                fallback=fallback, usage=raw))


def error(err: GatewayError, cid: str | None = None) -> bytes:
    body = err.body()["error"]
    assert isinstance(body, dict)
    return _encoder.encode(ErrorFrame(error=body, id=UNSET if cid is None else cid))


def event(topic: str, data: Any, key: str | None = None) -> bytes:
    return _encoder.encode(Event(topic=topic, data=data, key=UNSET if key is None else key))


def delta_prefix(cid: str) -> bytes:
    """Everything of a delta frame before the chunk: built once per request."""
    return b'{"type":"delta","id":' + _encoder.encode(cid) + b',"chunk":'


# -- wire framing (RFC 6455 section 5.2) ---------------------------------------------------

_LEN1 = struct.Struct("!BB").pack
_LEN2 = struct.Struct("!BBH").pack
_LEN3 = struct.Struct("!BBQ").pack
_FIN_TEXT = 0x81  # FIN + opcode 1 (text); a server's frames are never masked


def text_frame(payload: bytes) -> bytes:
    """`payload` as one whole unmasked text frame, ready for the transport. Sockets build
    their frames here so that several can go out in one write (see routes/ws.py)."""
    n = len(payload)
    if n < 126:
        return _LEN1(_FIN_TEXT, n) + payload
    if n < 65536:
        return _LEN2(_FIN_TEXT, 126, n) + payload
    return _LEN3(_FIN_TEXT, 127, n) + payload
