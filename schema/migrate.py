"""Forward-only SQL migrations: `schema/migrations/NNNN_name.sql`, applied in order.

Each file runs in its own transaction together with its `schema_migrations` row, so a
version is either fully applied and recorded or not at all. A session-level advisory
lock serialises concurrent runs (two deploys releasing at once): the second waits, then
finds nothing left to do. Files are never edited once released; a change is a new file.
Statements that cannot run inside a transaction (CREATE INDEX CONCURRENTLY) are not
supported.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import NamedTuple

import asyncpg

log = logging.getLogger("schema")

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

#: Advisory lock key for migrations: b"BULWMIGR" as a big-endian bigint, unlikely to
#: collide with another application's keys in a shared database.
LOCK_KEY = int.from_bytes(b"BULWMIGR", "big")

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     int PRIMARY KEY,
    name        text,
    applied_at  timestamptz DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    """The migrations directory is inconsistent (duplicate versions, bad names)."""


class Migration(NamedTuple):
    version: int
    name: str
    path: Path

    def sql(self) -> str:
        return self.path.read_text()


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations in `directory`, by version; every .sql file must be well named."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: expected NNNN_lowercase_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"{path.name}: version {version} is used twice")
        found[version] = Migration(version, match.group(2), path)
    return [found[v] for v in sorted(found)]


async def migrate(dsn: str, *, directory: Path = MIGRATIONS_DIR) -> list[int]:
    """Apply every pending migration; returns the versions applied (empty when up to date)."""
    migrations = discover(directory)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        # Session-level rather than xact-level: the lock must span several transactions.
        await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        # Under the lock: concurrent CREATE TABLE IF NOT EXISTS can still collide.
        await conn.execute(_CREATE_LEDGER)
        rows = await conn.fetch("SELECT version FROM schema_migrations")
        done = {int(r["version"]) for r in rows}
        unknown = done - {m.version for m in migrations}
        if unknown:
            log.warning("database has migrations this code does not know: %s", sorted(unknown))
        applied: list[int] = []
        for migration in migrations:
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            log.info("applied migration %04d_%s", migration.version, migration.name)
            applied.append(migration.version)
        return applied
    finally:
        # Closing the session releases the advisory lock too; no explicit unlock needed.
        await conn.close()
