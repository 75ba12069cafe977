"""A real PostgreSQL for the tests: one throwaway cluster per session, migrated once.

`BULWARK_TEST_DATABASE_URL` (or `DATABASE_URL`, when the conftest leaves it set) points
the tests at an existing server instead; its state tables are TRUNCATEd by `pg_clean`,
so never point it at data you keep.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from bulwark.pgembed import EmbeddedPostgres
from schema.migrate import migrate

T = TypeVar("T")


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync fixture code, in its own thread so that it
    never touches the event loop that pytest-asyncio keeps for the tests."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def external_dsn() -> str | None:
    return os.environ.get("BULWARK_TEST_DATABASE_URL") or os.environ.get("DATABASE_URL") or None


def throwaway_dir(prefix: str = "bulwark-pg-") -> Path:
    # Under the system temp dir rather than pytest's tmp_path: pytest's base dir is
    # 0700, and as root the server runs as `postgres`, who must traverse the parents.
    return Path(tempfile.mkdtemp(prefix=prefix))


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """DSN of a migrated database that lives for the whole test session."""
    dsn = external_dsn()
    if dsn is not None:
        run_sync(migrate(dsn))
        yield dsn
        return
    data_dir = throwaway_dir()
    cluster = EmbeddedPostgres(data_dir, throwaway=True)
    try:
        dsn = cluster.start()
        run_sync(migrate(dsn))
        yield dsn
    finally:
        cluster.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


async def truncate_state(dsn: str) -> None:
    """Empty every table but the migrations ledger, including those later migrations add."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = await conn.fetchval(
            "SELECT string_agg(format('%I.%I', schemaname, tablename), ', ')"
            " FROM pg_tables WHERE schemaname = current_schema()"
            " AND tablename <> 'schema_migrations'"
        )
        if tables:
            await conn.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()


@pytest.fixture
def pg_clean(pg_dsn: str) -> str:
    """The session database with empty state tables (TRUNCATE: NOTIFY fires only on commit,
    so tests of the bus cannot run inside a rolled-back transaction)."""
    run_sync(truncate_state(pg_dsn))
    return pg_dsn


def with_database(dsn: str, database: str) -> str:
    """The same server and credentials, another database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


@asynccontextmanager
async def scratch_database(dsn: str) -> AsyncIterator[str]:
    """A fresh, empty database on the server of `dsn`, dropped afterwards."""
    name = f"scratch_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield with_database(dsn, name)
    finally:
        admin = await asyncpg.connect(dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def eventually(
    predicate: Callable[[], bool], *, within: float = 10.0, step: float = 0.01
) -> None:
    """Wait until predicate() holds; fail after `within` seconds (a bound, not a timing
    claim: it only keeps a broken test from hanging)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(step)


@pytest.fixture
async def db(pg_clean: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_clean)
    yield conn
    await conn.close()
