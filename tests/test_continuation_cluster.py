"""Stream continuation in a real web process (started from a providers file with
`continue_streams = true`), through the openai SDK: a provider that breaks mid-answer is
finished by the next one, or, with continuation off, the stream ends with its error."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from bulwark.sim import reply_words
from tests.conftest import Sim, SimFactory
from tests.procs import Spawn, free_port
from tests.test_cluster import start_web

pytestmark = pytest.mark.slow

MSG = [{"role": "user", "content": "Tell me something"}]
#: What alpha streams before its fault: the simulator breaks a 20-chunk answer halfway.
SENT = "".join(reply_words("alpha")[:10])


def providers_file(path: Path, alpha: Sim, beta: Sim) -> Path:
    path.write_text(f"""
[[providers]]
name = "alpha"
kind = "openai"
base_url = "{alpha.url}"
priority = 1
timeout_idle_sec = 0.5
[providers.models]
default = "sim-1"

[[providers]]
name = "beta"
kind = "openai"
base_url = "{beta.url}"
priority = 2
continuation = "prefill"
[providers.models]
default = "sim-1"

[models.default]
continue_streams = true
""")
    return path


async def collect(base: str, **extra: object) -> tuple[str, list[object]]:
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused",
                                  max_retries=0, timeout=20) as client:
        stream = await client.chat.completions.create(
            model="default", messages=MSG, stream=True, **extra)  # type: ignore[call-overload]
        chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


@pytest.mark.parametrize("fault", ["malformed", "stall"])
async def test_a_broken_stream_is_finished_by_the_next_provider(
        sim: SimFactory, spawn: Spawn, tmp_path: Path, fault: str) -> None:
    """Malformed chunk or stall at alpha mid-answer: one complete answer, alpha's words then
    beta's minus the words beta repeated at the seam, the marker on the finish chunk, one id."""
    alpha, beta = await sim("alpha"), await sim("beta")
    await alpha.script(steps=[{"fault": fault}])
    await beta.script(steps=[{"overlap_words": 2}])
    port = free_port()
    web = await start_web(spawn, None, providers_file(tmp_path / "p.toml", alpha, beta), port)

    text, chunks = await collect(web.base)
    produced_by_beta = "".join(reply_words("alpha")[8:10] + reply_words("beta")[10:])
    assert text == SENT + produced_by_beta[len(" so that"):]  # the 2 repeated words dropped
    assert len({c.id for c in chunks}) == 1  # type: ignore[attr-defined]
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]  # type: ignore[attr-defined]
    assert len(finish) == 1
    assert finish[0].model_extra["bulwark"] == {  # type: ignore[attr-defined]
        "continued_by": "beta", "at_char": len(SENT)}


async def test_off_by_header_ends_with_the_error_event(
        sim: SimFactory, spawn: Spawn, tmp_path: Path) -> None:
    """`x-bulwark-continue: false` turns the model's continuation off for one request: the
    SDK raises on the final error event, and beta is never asked."""
    alpha, beta = await sim("alpha"), await sim("beta")
    await alpha.script(steps=[{"fault": "malformed"}])
    port = free_port()
    web = await start_web(spawn, None, providers_file(tmp_path / "p.toml", alpha, beta), port)
    with pytest.raises(openai.APIError):
        await collect(web.base, extra_headers={"x-bulwark-continue": "false"})
    assert (await beta.stats())["chat"] == 0
