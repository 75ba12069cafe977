"""The embedded PostgreSQL: a private cluster that survives restarts in its data dir."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from bulwark.pgembed import EmbeddedPostgres
from tests.pg import throwaway_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster_dir() -> Iterator[Path]:
    data_dir = throwaway_dir("bulwark-pgembed-")
    yield data_dir
    EmbeddedPostgres(data_dir).stop()
    shutil.rmtree(data_dir, ignore_errors=True)


async def fetchval(dsn: str, sql: str) -> object:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def postmaster_pid(pg: EmbeddedPostgres) -> int:
    return int((pg.pgdata / "postmaster.pid").read_text().splitlines()[0])


async def test_restart_reuses_data_dir_and_port(cluster_dir: Path) -> None:
    """A stopped cluster starts again from its data dir, on the same port, with its data."""
    pg = EmbeddedPostgres(cluster_dir, throwaway=True)
    dsn = await asyncio.to_thread(pg.start)
    assert dsn.startswith("postgresql://bulwark@127.0.0.1:") and dsn.endswith("/bulwark")
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT current_user") == "bulwark"
        assert await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = 'bulwark'")
        assert await conn.fetchval("SHOW fsync") == "off"
        assert await conn.fetchval("SHOW max_connections") == "200"
        await conn.execute("CREATE TABLE IF NOT EXISTS kept (x int); INSERT INTO kept VALUES (1)")
    finally:
        await conn.close()

    await asyncio.to_thread(pg.stop)
    assert not pg.is_running()
    with pytest.raises(OSError):
        await asyncpg.connect(dsn, timeout=5)

    assert await asyncio.to_thread(pg.start) == dsn
    assert await fetchval(dsn, "SELECT count(*) FROM kept") == 1


def test_start_is_idempotent(cluster_dir: Path) -> None:
    """start() on a running cluster returns its DSN and starts no second server."""
    pg = EmbeddedPostgres(cluster_dir, throwaway=True)
    dsn = pg.start()
    pid = postmaster_pid(pg)
    assert EmbeddedPostgres(cluster_dir).start() == dsn
    assert postmaster_pid(pg) == pid


def test_stale_pid_file_does_not_block_start(cluster_dir: Path) -> None:
    """A postmaster.pid naming a dead process (crash, container restart) is cleared on start."""
    pg = EmbeddedPostgres(cluster_dir, throwaway=True)
    pg.start()
    pid_file = (pg.pgdata / "postmaster.pid").read_text()
    pg.stop()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (pg.pgdata / "postmaster.pid").write_text(
        pid_file.replace(pid_file.split("\n", 1)[0], str(gone.pid), 1)
    )
    assert not pg.is_running()
    dsn = pg.start()
    assert asyncio.run(fetchval(dsn, "SELECT 1")) == 1


def test_recycled_pid_is_not_taken_for_the_server(cluster_dir: Path) -> None:
    """A pid file naming a live process that is not this cluster's postmaster counts as stale."""
    pg = EmbeddedPostgres(cluster_dir, throwaway=True)
    pg.start()
    pid_file = (pg.pgdata / "postmaster.pid").read_text()
    pg.stop()
    # Our own pid: alive and signalable by us, as a recycled pid would be.
    (pg.pgdata / "postmaster.pid").write_text(
        pid_file.replace(pid_file.split("\n", 1)[0], str(os.getpid()), 1)
    )
    assert not pg.is_running()
    dsn = pg.start()
    assert asyncio.run(fetchval(dsn, "SELECT 1")) == 1


def test_cli_start_status_stop(cluster_dir: Path) -> None:
    """`python -m bulwark.pgembed` starts (printing the DSN), reports status and stops."""
    EmbeddedPostgres(cluster_dir).stop()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bulwark.pgembed", *args, "--data-dir", str(cluster_dir)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    stopped = cli("status")
    assert (stopped.returncode, stopped.stdout.strip()) == (3, "stopped")
    started = cli("start")
    assert started.returncode == 0, started.stderr
    dsn = started.stdout.strip()
    # Not a throwaway start: the durable settings apply.
    assert asyncio.run(fetchval(dsn, "SHOW fsync")) == "on"
    running = cli("status")
    assert (running.returncode, running.stdout.strip()) == (0, f"running {dsn}")
    assert cli("stop").returncode == 0
    assert cli("status").returncode == 3


def test_context_manager_stops_on_exit(cluster_dir: Path) -> None:
    """`with EmbeddedPostgres(...)` runs the cluster for the block only."""
    with EmbeddedPostgres(cluster_dir, throwaway=True) as pg:
        assert asyncio.run(fetchval(pg.dsn, "SELECT current_database()")) == "bulwark"
    assert not pg.is_running()
