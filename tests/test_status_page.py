"""The status page in a real browser (headless Chromium via Playwright) against real
processes: `python -m service` with no providers file (the simulator fleet), healthd and
Postgres. A provider failed through the simulator shows on the open page without a reload
(issue 8, items 4 and 8).

Screenshots are kept as artifacts in the test's tmp_path and copied to
$BULWARK_ARTIFACTS (default /tmp/bulwark-artifacts): status.png (desktop, alpha failed)
and status-phone.png (a 390 px wide phone); the test prints where.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Page, async_playwright
from playwright.async_api import TimeoutError as PlaywrightTimeout

from tests.procs import Spawn, free_port, wait_live

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("BULWARK_ARTIFACTS", "/tmp/bulwark-artifacts"))
#: Bounds for the browser's waits (ms): they keep a broken page from hanging the test.
WAIT_MS = 45_000
CHAT = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}



def keep(shot: Path) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    kept = ARTIFACTS / shot.name
    shutil.copyfile(shot, kept)
    print(f"artifact: {shot} (copy: {kept})")
    return kept


async def wait(page: Page, js: str, what: str) -> None:
    """page.wait_for_function, failing with what the page showed."""
    try:
        await page.wait_for_function(js, timeout=WAIT_MS)
    except PlaywrightTimeout:
        text = await page.inner_text("body")
        raise AssertionError(f"{what}: not shown; the page said:\n{text}") from None


async def card(page: Page, name: str, attr: str) -> str | None:
    return await page.get_attribute(f'article[data-provider="{name}"]', f"data-{attr}")


async def test_page_shows_a_failed_provider_live(spawn: Spawn, pg_clean: str,
                                                 tmp_path: Path) -> None:
    """The page loads with alpha, beta, gamma healthy and probe TTFT shown; after requests
    that alpha fails (`x-sim-fail: alpha`) and `POST /alpha/_sim/fail`, the same page (no
    reload) shows alpha unhealthy with its breaker open and the incident listed; on a
    phone-sized screen nothing overflows."""
    port, sim_port = free_port(), free_port()
    sim = f"http://127.0.0.1:{sim_port}"
    common = {"BULWARK_PROVIDERS": "", "BULWARK_SIM_URL": f"{sim}/v1",
              # Long enough that the open breaker stays open for the screenshot.
              "CB_RESET_SEC": "30"}
    await spawn(pg_clean, Path(), module="service", BULWARK_PORT=str(port), **common)
    base = f"http://127.0.0.1:{port}"

    await wait_live(base)
    # healthd after web: its probes go to the simulator that web serves.
    await spawn(pg_clean, Path(), **common)

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.goto(f"{base}/status")
            await wait(page, """() => ["alpha", "beta", "gamma"].every(n => {
                       const c = document.querySelector(`article[data-provider="${n}"]`);
                       return c && c.dataset.health === "healthy"
                           && c.dataset.breaker === "closed"; })
                   && document.querySelector('article[data-provider="alpha"] .spark')""",
                       "three healthy providers with probes")
            assert await page.text_content("#level") == "normal"
            figures = await page.inner_text('article[data-provider="alpha"] .figures')
            assert "TTFT p50" in figures and " ms" in figures
            # A reload would lose this, and the count of rendered states would restart.
            await page.evaluate("window.__sameDocument = true")
            updates = int(await page.get_attribute("body", "data-updates") or 0)

            async with aiohttp.ClientSession() as s:
                # First user traffic that alpha fails (x-sim-fail: per request; its probes
                # still pass): CB_FAIL_THRESHOLD failures open its breaker in web, which
                # publishes it. Then alpha fails everything, probes too: healthd marks it
                # unhealthy (the router would not try an unhealthy alpha any more).
                for _ in range(3):  # two attempts at alpha each (retries = 1)
                    async with s.post(f"{base}/v1/chat/completions", json=CHAT,
                                      headers={"x-sim-fail": "alpha"}) as resp:
                        assert resp.headers["x-bulwark-provider"] == "beta"
                async with s.post(f"{sim}/alpha/_sim/fail") as resp:
                    assert resp.status == 200

            await wait(page, """() => {
                     const c = document.querySelector('article[data-provider="alpha"]');
                     return c && c.dataset.health === "unhealthy" && c.dataset.breaker === "open"
                       && document.querySelector(
                            '#incidents li[data-provider="alpha"][data-to="open"]');
                   }""", "alpha failed")
            assert await page.evaluate("window.__sameDocument") is True
            assert int(await page.get_attribute("body", "data-updates") or 0) > updates
            assert await card(page, "beta", "health") == "healthy"
            assert await page.get_attribute("body", "data-live") == "live"
            reason = await page.inner_text('article[data-provider="alpha"] .breaker-reason')
            # The shared row has one reason: the gateway's for opening the breaker, or, when
            # healthd's probes of the failed alpha were published after it, healthd's.
            assert "consecutive failures" in reason or "probes failed" in reason, reason
            shot = tmp_path / "status.png"
            await page.screenshot(path=str(shot), full_page=True)
            keep(shot)

            phone = await browser.new_page(viewport={"width": 390, "height": 844},
                                           device_scale_factor=2, is_mobile=True)
            await phone.goto(f"{base}/status")
            await wait(phone, """() => document.querySelector('article[data-provider="alpha"]')
                           ?.dataset.health === "unhealthy" """, "alpha failed on a phone")
            overflow = await phone.evaluate(
                "document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0
            shot = tmp_path / "status-phone.png"
            await phone.screenshot(path=str(shot), full_page=True)
            keep(shot)
        finally:
            await browser.close()
