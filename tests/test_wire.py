"""Answers we build ourselves carry every field OpenAI always sends."""

from __future__ import annotations

import msgspec

from bulwark.wire import ChatCompletion, Choice, Chunk, ResponseMessage, Usage, encoder


def test_usage_chunk_keeps_object_and_empty_choices() -> None:
    """A translated usage-only chunk has `object` and `choices: []`, as OpenAI's has."""
    chunk = Chunk(id="x", created=1, model="m", usage=Usage(prompt_tokens=0,
                                                            completion_tokens=3,
                                                            total_tokens=3))
    out = msgspec.json.decode(encoder.encode(chunk))
    assert out["object"] == "chat.completion.chunk"
    assert out["choices"] == []
    assert out["usage"] == {"prompt_tokens": 0, "completion_tokens": 3, "total_tokens": 3}


def test_completion_keeps_object_and_role() -> None:
    """A translated completion names its object and the assistant role."""
    comp = ChatCompletion(id="x", created=1, model="m",
                          choices=[Choice(message=ResponseMessage(content="hi"),
                                          finish_reason="stop")])
    out = msgspec.json.decode(encoder.encode(comp))
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert "tool_calls" not in out["choices"][0]["message"]


def test_replayed_stream_chunks_name_their_object_once() -> None:
    """A stored answer replayed as a stream: each chunk has exactly one `object` key."""
    from bulwark.replay import canned, events_of

    completion = canned("Hello there", "default")
    for ev in events_of(completion.parsed, include_usage=True):
        assert ev.raw.count(b'"object"') == 1
    assert completion.body.count(b'"object"') == 1
