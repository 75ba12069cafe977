"""The first minute: `python -m service` with no providers file serves the simulator as a
fleet of named providers, one of which a newcomer fails with a one-liner (issue 8, item 8)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from bulwark.config import SIM_FLEET, Settings, sim_providers
from bulwark.sim import reply_text
from tests.procs import Spawn, free_port, until, wait_live

pytestmark = pytest.mark.slow

CHAT = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}



async def chat(base: str, headers: dict[str, str] | None = None) -> tuple[int, str, str, str]:
    """(status, provider, fallback, content) of one chat request."""
    async with aiohttp.ClientSession() as s, s.post(
            f"{base}/v1/chat/completions", json=CHAT, headers=headers) as resp:
        body = await resp.json()
        content = body["choices"][0]["message"]["content"] if resp.status == 200 else ""
        return (resp.status, resp.headers.get("x-bulwark-provider", ""),
                resp.headers.get("x-bulwark-fallback", ""), content)


def test_sim_providers_are_a_named_fleet_on_one_port() -> None:
    """With no providers file the providers are alpha, beta, gamma (priorities 1..3), each
    under its own path of BULWARK_SIM_URL, probed by a one-token chat (TTFT)."""
    providers = sim_providers(Settings(sim_url="http://127.0.0.1:9100/v1"))
    assert [p.name for p in providers] == list(SIM_FLEET) == ["alpha", "beta", "gamma"]
    assert [p.base_url for p in providers] == [
        f"http://127.0.0.1:9100/{n}/v1" for n in SIM_FLEET]
    assert [p.priority for p in providers] == [1, 2, 3]
    assert {p.health_check for p in providers} == {"chat"}
    assert {p.retries for p in providers} == {1}


async def test_service_alone_serves_a_fleet_and_one_can_be_failed(
        spawn: Spawn, tmp_path: Path) -> None:
    """A real `python -m service` process with no providers file: alpha answers; with
    `x-sim-fail: alpha,beta` gamma does; after `POST /alpha/_sim/fail` answers come from
    beta, and `POST /alpha/_sim/reset` brings alpha back."""
    port, sim_port = free_port(), free_port()
    sim = f"http://127.0.0.1:{sim_port}"
    web = await spawn(None, Path(), module="service", BULWARK_PROVIDERS="",
                      BULWARK_PORT=str(port), BULWARK_SIM_URL=f"{sim}/v1")
    base = f"http://127.0.0.1:{port}"

    await wait_live(base)
    assert await chat(base) == (200, "alpha", "none", reply_text("alpha"))
    status, name, fallback, content = await chat(base, {"x-sim-fail": "alpha,beta"})
    assert (status, name, fallback) == (200, "gamma", "failover")
    assert content.startswith("Hello from sim gamma")

    async with aiohttp.ClientSession() as s:
        async with s.post(f"{sim}/alpha/_sim/fail") as resp:
            assert resp.status == 200
            assert await resp.json() == {"ok": True, "name": "alpha", "status": 530}
        status, name, fallback, content = await chat(base)
        assert (status, name, fallback) == (200, "beta", "failover")
        assert content.startswith("Hello from sim beta")
        for _ in range(3):
            # Once alpha's breaker opens (CB_FAIL_THRESHOLD failures) beta is first choice.
            status, name, fallback, _ = await chat(base)
            assert (status, name) == (200, "beta")
            assert fallback in ("failover", "none")
        # The failed simulator saw the attempts; the others are untouched by it.
        async with s.get(f"{sim}/alpha/_sim/stats") as resp:
            assert (await resp.json())["chat"] >= 2
        async with s.post(f"{sim}/alpha/_sim/reset") as resp:
            assert resp.status == 200

    async def back_on_alpha() -> bool:
        # The breaker may have opened meanwhile; it recovers by itself (no healthd here).
        return (await chat(base))[1] == "alpha"

    await until(back_on_alpha, within=60, what="alpha answers again")
    assert "built-in simulator serving" in web.output()

