"""Client keys: minted here, stored only as a hash, shared with every process by the bus.

A key is `bwk_<id>_<secret>`: `bwk_` makes it recognisable (secret scanners, logs, a
user who pasted the wrong thing), `<id>` (12 hex digits) names it in lists, audits and
revocations without being secret, and `<secret>` is 32 random bytes (256 bits, base64url).

Only `sha256(key)` is stored. A slow password hash (bcrypt, argon2) protects guessable
secrets against an offline attacker who stole the table; a 256-bit random secret is not
guessable, so the digest of one is as safe as any KDF output, and it costs a
microsecond, which keeps authentication a dict lookup on the request path.

The `client_keys` table is the operator's record (created, revoked, expiry). Every
change also writes the key's public record — never the key — to the fleet row
`clientkey/<id>` in the same transaction; every web process keeps `hash -> record` in
memory from its View. A revoked key keeps its row (revoked: true), so that revoking the
last key never turns authentication off again.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
import secrets
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from msgspec import Meta

from bulwark.audit import record_action
from bulwark.bus import put_fleet_on

if TYPE_CHECKING:
    import asyncpg

PREFIX = "bwk_"
#: Fleet keys of the public records: `clientkey/<id>`.
FLEET_PREFIX = "clientkey/"
_KEY = re.compile(r"^bwk_([0-9a-f]{12})_[A-Za-z0-9_-]{43}$")

#: A name is for people reading lists: printable, bounded.
Name = Annotated[str, Meta(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")]
Limit = Annotated[int, Meta(ge=1, le=1_000_000_000)]
#: No control characters (Postgres text cannot even hold NUL); no model is named so.
ModelName = Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]


class KeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A key's public record: what every process needs to authenticate and limit it."""

    id: str
    name: str
    hash: str
    rpm: int | None = None
    tpm: int | None = None
    #: The models this key may use; None means every model.
    models: list[str] | None = None
    revoked: bool = False
    #: Unix seconds; None: never expires.
    expires_at: float | None = None
    created_at: float | None = None


class NewKey(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What creating a key takes (admin API body, CLI flags)."""

    name: Name
    rpm: Limit | None = None
    tpm: Limit | None = None
    models: Annotated[list[ModelName], Meta(min_length=1, max_length=256)] | None = None
    expires_in_sec: Annotated[float, Meta(gt=0, le=100 * 365 * 86_400)] | None = None


record_decoder = msgspec.json.Decoder(KeyRecord)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def mint() -> tuple[str, str]:
    """A new (id, key)."""
    key_id = secrets.token_hex(6)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    return key_id, f"{PREFIX}{key_id}_{secret}"


def looks_like_key(value: str) -> bool:
    return _KEY.match(value) is not None


def _epoch(value: dt.datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _record(row: asyncpg.Record) -> KeyRecord:
    return KeyRecord(
        id=row["id"], name=row["name"], hash=row["hash"], rpm=row["rpm"], tpm=row["tpm"],
        models=list(row["models"]) if row["models"] is not None else None,
        revoked=row["revoked_at"] is not None, expires_at=_epoch(row["expires_at"]),
        created_at=_epoch(row["created_at"]))


def public(record: KeyRecord) -> dict[str, Any]:
    """The record as listed to operators: everything but the hash."""
    out = msgspec.to_builtins(record)
    del out["hash"]
    return dict(out)


_COLUMNS = "id, name, hash, rpm, tpm, models, created_at, expires_at, revoked_at"


async def create(conn: asyncpg.Connection, new: NewKey, *, actor: str, address: str,
                 source: str) -> tuple[KeyRecord, str]:
    """Store a new key (its hash) and publish its record; returns (record, the key).

    The key is returned once, here, and exists nowhere else afterwards."""
    key_id, key = mint()
    async with conn.transaction():
        row = await conn.fetchrow(
            f"INSERT INTO client_keys (id, name, hash, rpm, tpm, models, expires_at)"  # noqa: S608
            f" VALUES ($1, $2, $3, $4, $5, $6,"
            f" CASE WHEN $7::float8 IS NULL THEN NULL"
            f" ELSE now() + make_interval(secs => $7::float8) END)"
            f" RETURNING {_COLUMNS}",
            key_id, new.name, hash_key(key), new.rpm, new.tpm, new.models, new.expires_in_sec)
        assert row is not None
        record = _record(row)
        await put_fleet_on(conn, FLEET_PREFIX + key_id, msgspec.to_builtins(record),
                           source=source)
        await record_action(conn, action="key.create", target=key_id,
                            reason=f"name={new.name}", actor=actor, address=address,
                            detail={"rpm": new.rpm, "tpm": new.tpm, "models": new.models,
                                    "expires_at": record.expires_at})
    return record, key


async def revoke(conn: asyncpg.Connection, key_id: str, *, actor: str, address: str,
                 source: str, reason: str = "") -> KeyRecord | None:
    """Revoke a key everywhere; None when no such key. Revoking twice is harmless."""
    async with conn.transaction():
        row = await conn.fetchrow(
            f"UPDATE client_keys SET revoked_at = coalesce(revoked_at, now())"  # noqa: S608
            f" WHERE id = $1 RETURNING {_COLUMNS}", key_id)
        if row is None:
            return None
        record = _record(row)
        await put_fleet_on(conn, FLEET_PREFIX + key_id, msgspec.to_builtins(record),
                           source=source)
        await record_action(conn, action="key.revoke", target=key_id, reason=reason,
                            actor=actor, address=address)
    return record


async def list_all(conn: asyncpg.Connection) -> list[KeyRecord]:
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM client_keys ORDER BY created_at, id")  # noqa: S608
    return [_record(r) for r in rows]
