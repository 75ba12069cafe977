"""Schema migrations: forward-only, one transaction each, safe to run twice at once."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from schema.migrate import MigrationError, discover, migrate
from tests.pg import scratch_database

pytestmark = pytest.mark.slow

TABLES = (
    "providers",
    "provider_state",
    "breaker_events",
    "health_samples",
    "service_errors",
    "healthd_heartbeat",
)


async def test_migrate_applies_everything_once(pg_dsn: str) -> None:
    """On an empty database every version is applied and recorded; a second run does nothing."""
    versions = [m.version for m in discover()]
    assert versions[0] == 1
    async with scratch_database(pg_dsn) as dsn:
        assert await migrate(dsn) == versions
        assert await migrate(dsn) == []
        conn = await asyncpg.connect(dsn)
        try:
            for table in TABLES:
                assert await conn.fetchval("SELECT to_regclass($1)::text", table) == table
            rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
            assert [(r["version"], r["name"]) for r in rows] == [
                (m.version, m.name) for m in discover()
            ]
        finally:
            await conn.close()


async def test_concurrent_cli_runs_apply_each_version_once(pg_dsn: str) -> None:
    """Two `python -m schema migrate` at once both exit 0, and each version is applied by one."""
    async with scratch_database(pg_dsn) as dsn:
        env = {**os.environ, "DATABASE_URL": dsn}
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "schema",
                "migrate",
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for _ in range(2)
        ]
        results = [await p.communicate() for p in procs]
        for proc, (_, err) in zip(procs, results, strict=True):
            assert proc.returncode == 0, err.decode()
        applied = sorted(
            line
            for out, _ in results
            for line in out.decode().splitlines()
            if line.startswith("applied ")
        )
        assert applied == sorted(f"applied {m.version:04d}_{m.name}" for m in discover())
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(discover())
        finally:
            await conn.close()


def test_cli_requires_database_url() -> None:
    """Without DATABASE_URL the CLI exits 2 and says which variable is missing."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    proc = subprocess.run(
        [sys.executable, "-m", "schema", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "DATABASE_URL" in proc.stderr


async def test_failed_migration_leaves_no_trace(pg_dsn: str, tmp_path: Path) -> None:
    """A failing migration rolls back its DDL and its version row; earlier ones stay applied."""
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE first_t (x int);")
    (tmp_path / "0002_broken.sql").write_text("CREATE TABLE second_t (x int); SELECT 1 / 0;")
    async with scratch_database(pg_dsn) as dsn:
        with pytest.raises(asyncpg.DivisionByZeroError):
            await migrate(dsn, directory=tmp_path)
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT array_agg(version) FROM schema_migrations") == [1]
            assert await conn.fetchval("SELECT to_regclass('first_t')::text") == "first_t"
            assert await conn.fetchval("SELECT to_regclass('second_t')") is None
        finally:
            await conn.close()
        # Fixed forward, the next run applies only what is missing.
        (tmp_path / "0002_broken.sql").write_text("CREATE TABLE second_t (x int);")
        assert await migrate(dsn, directory=tmp_path) == [2]


@pytest.mark.parametrize(
    "names",
    [["0001_a.sql", "0001_b.sql"], ["1_a.sql"], ["0001_Bad-Name.sql"]],
    ids=["duplicate-version", "short-number", "bad-name"],
)
def test_discover_rejects_inconsistent_files(tmp_path: Path, names: list[str]) -> None:
    """Duplicate versions or misnamed files stop migrations before any database work."""
    for name in names:
        (tmp_path / name).write_text("SELECT 1;")
    with pytest.raises(MigrationError):
        discover(tmp_path)
