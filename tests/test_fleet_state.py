"""Fleet-wide settings on the bus: every process converges on the same `fleet_state` rows."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bulwark.bus import Bus
from bulwark.state import FleetRow, View
from tests.pg import eventually
from tests.test_bus import MakeBus, bus_factory, sql

pytestmark = pytest.mark.slow


@pytest.fixture
async def make_bus(pg_clean: str) -> AsyncIterator[MakeBus]:
    make, made = bus_factory(pg_clean)
    yield make
    for bus in made:
        await bus.close()


async def test_put_fleet_reaches_every_view(make_bus: MakeBus) -> None:
    """A value written by one process is applied by every listener, the writer's too."""
    a, b = await make_bus("a"), await make_bus("b")
    seen: list[FleetRow] = []
    b.view.subscribe_fleet(seen.append)
    row = await a.put_fleet("degradation", {"level": "severe"}, source="test")
    assert row is not None and row.seq == 1
    await eventually(lambda: b.view.fleet_value("degradation") == {"level": "severe"})
    await eventually(lambda: a.view.fleet_value("degradation") == {"level": "severe"})
    assert [r.key for r in seen] == ["degradation"]


async def test_delete_and_snapshot_on_connect(make_bus: MakeBus, pg_clean: str) -> None:
    """A late process loads the snapshot; a deleted key (value None) disappears everywhere."""
    a = await make_bus("a")
    await a.put_fleet("k1", 1, source="t")
    await a.put_fleet("k2", [1, 2], source="t")
    late = await make_bus("late")
    assert late.view.fleet_value("k1") == 1 and late.view.fleet_value("k2") == [1, 2]
    await a.put_fleet("k1", None, source="t")
    await eventually(lambda: "k1" not in late.view.fleet)
    rows = await sql(pg_clean, "select seq from fleet_state where key = 'k1'")
    assert rows[0]["seq"] == 2


async def test_large_value_is_reloaded(make_bus: MakeBus) -> None:
    """A value over the NOTIFY payload bound arrives through a reload, whole."""
    a, b = await make_bus("a"), await make_bus("b")
    big = {"blob": "x" * 20_000}
    await a.put_fleet("big", big, source="t")
    await eventually(lambda: b.view.fleet_value("big") == big)


async def test_gap_reloads(make_bus: MakeBus, pg_clean: str) -> None:
    """A write that bypassed NOTIFY shows as a seq gap at the next one, and is reloaded."""
    a, b = await make_bus("a"), await make_bus("b")
    await a.put_fleet("k", 1, source="t")
    await eventually(lambda: b.view.fleet_value("k") == 1)
    await sql(pg_clean, "update fleet_state set value = '2', seq = seq + 1 where key = 'k'")
    await a.put_fleet("k", 3, source="t")
    await eventually(lambda: b.view.fleet_value("k") == 3)
    assert b.gaps >= 1


async def test_extra_channel_and_resync(pg_clean: str) -> None:
    """listen() delivers a module's own channel; on_resync runs after each snapshot load."""
    got: list[str] = []
    resyncs: list[int] = []
    bus = Bus(pg_clean, View(), name="x", heartbeat_sec=0.2, heartbeat_timeout_sec=0.5)
    bus.listen("ws_answers", got.append, on_resync=lambda: resyncs.append(1))
    await bus.start()
    try:
        assert resyncs == [1]
        await sql(pg_clean, "select pg_notify('ws_answers', 'hello')")
        await eventually(lambda: got == ["hello"])
    finally:
        await bus.close()
