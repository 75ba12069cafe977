"""OpenAI chat wire types (msgspec), shared by the gateway and the adapters.

Inbound: the chat request is closed (`forbid_unknown_fields`), so a misspelt parameter is a
400 naming it instead of being silently ignored; message content parts and tool schemas are
open (dicts), because OpenAI keeps adding part types. Outbound: only what we produce.
Encoders and decoders are built once here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ToolCallFunction(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str | UnsetType = UNSET
    arguments: str | UnsetType = UNSET


class ToolCall(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str | UnsetType = UNSET
    type: str = "function"
    function: ToolCallFunction = msgspec.field(default_factory=ToolCallFunction)
    index: int | UnsetType = UNSET


class Message(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | UnsetType = UNSET
    tool_calls: list[ToolCall] | UnsetType = UNSET
    tool_call_id: str | UnsetType = UNSET
    function_call: dict[str, Any] | UnsetType = UNSET
    refusal: str | None | UnsetType = UNSET
    #: Mistral's and DeepSeek's flag: this final assistant message is a prefix to continue.
    prefix: bool | UnsetType = UNSET

    def text(self) -> str:
        """Plain text of the content (text parts joined); images and audio are skipped."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")


class StreamOptions(msgspec.Struct, kw_only=True, omit_defaults=True):
    include_usage: bool = False


Temperature = Annotated[float, Meta(ge=0, le=2)]
Unit = Annotated[float, Meta(ge=0, le=1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
PosInt = Annotated[int, Meta(ge=1)]


class ChatRequest(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    model: Annotated[str, Meta(min_length=1, max_length=256)]
    messages: Annotated[list[Message], Meta(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None | UnsetType = UNSET
    max_tokens: PosInt | None | UnsetType = UNSET
    max_completion_tokens: PosInt | None | UnsetType = UNSET
    temperature: Temperature | None | UnsetType = UNSET
    top_p: Unit | None | UnsetType = UNSET
    n: Annotated[int, Meta(ge=1, le=16)] | None | UnsetType = UNSET
    stop: str | list[str] | None | UnsetType = UNSET
    presence_penalty: Penalty | None | UnsetType = UNSET
    frequency_penalty: Penalty | None | UnsetType = UNSET
    logit_bias: dict[str, float] | None | UnsetType = UNSET
    logprobs: bool | None | UnsetType = UNSET
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None | UnsetType = UNSET
    tools: list[dict[str, Any]] | None | UnsetType = UNSET
    tool_choice: str | dict[str, Any] | None | UnsetType = UNSET
    parallel_tool_calls: bool | None | UnsetType = UNSET
    response_format: dict[str, Any] | None | UnsetType = UNSET
    seed: int | None | UnsetType = UNSET
    user: str | None | UnsetType = UNSET
    metadata: dict[str, str] | None | UnsetType = UNSET
    store: bool | None | UnsetType = UNSET
    reasoning_effort: str | None | UnsetType = UNSET
    service_tier: str | None | UnsetType = UNSET
    modalities: list[str] | None | UnsetType = UNSET
    prediction: dict[str, Any] | None | UnsetType = UNSET
    audio: dict[str, Any] | None | UnsetType = UNSET
    functions: list[dict[str, Any]] | None | UnsetType = UNSET
    function_call: str | dict[str, Any] | None | UnsetType = UNSET
    web_search_options: dict[str, Any] | None | UnsetType = UNSET
    verbosity: str | None | UnsetType = UNSET
    prompt_cache_key: str | None | UnsetType = UNSET
    safety_identifier: str | None | UnsetType = UNSET

    @property
    def include_usage(self) -> bool:
        opts = self.stream_options
        return isinstance(opts, StreamOptions) and opts.include_usage

    @property
    def max_output_tokens(self) -> int | None:
        for value in (self.max_completion_tokens, self.max_tokens):
            if isinstance(value, int):
                return value
        return None


# Answers we build (Anthropic/Gemini translations, cache, canned) carry every field OpenAI
# always sends — `object`, `choices: []` in the usage chunk, zero token counts — so that
# no defaults are omitted here; UNSET fields are still left out.
class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ResponseMessage(msgspec.Struct, kw_only=True):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | UnsetType = UNSET
    refusal: str | None | UnsetType = UNSET


class Choice(msgspec.Struct, kw_only=True):
    index: int = 0
    message: ResponseMessage
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None
    system_fingerprint: str | None | UnsetType = UNSET


class Delta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str | UnsetType = UNSET
    content: str | None | UnsetType = UNSET
    tool_calls: list[ToolCall] | UnsetType = UNSET
    refusal: str | None | UnsetType = UNSET


class ChunkChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    delta: Delta = msgspec.field(default_factory=Delta)
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class Chunk(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice] = msgspec.field(default_factory=list)
    usage: Usage | None = None
    system_fingerprint: str | None | UnsetType = UNSET

    @property
    def has_content(self) -> bool:
        """True when this chunk carries something a user sees (text, tool call, refusal)."""
        for c in self.choices:
            d = c.delta
            if d.content or d.tool_calls or d.refusal or c.finish_reason:
                return True
        return False

    @property
    def finished(self) -> bool:
        # A loop, not any(genexpr): this runs once per streamed chunk and the generator
        # costs more than the test.
        for c in self.choices:  # noqa: SIM110
            if c.finish_reason:
                return True
        return False


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "bulwark"


class ModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[ModelCard]


encoder = msgspec.json.Encoder()
request_decoder = msgspec.json.Decoder(ChatRequest)
completion_decoder = msgspec.json.Decoder(ChatCompletion)
chunk_decoder = msgspec.json.Decoder(Chunk)
any_decoder = msgspec.json.Decoder()
