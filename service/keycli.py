"""`python -m service keys create|list|revoke`: client keys from the command line.

Talks to DATABASE_URL directly (the same tables and fleet rows as the admin API, so a
running fleet picks a change up through the bus at once). The key is printed once, on
create, and is not recoverable afterwards: only its hash is stored.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import os
import sys
from collections.abc import Sequence

import asyncpg
import msgspec

from bulwark import clientkeys

SOURCE = "cli"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service keys",
                                     description="Manage client keys.")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create a key and print it (once)")
    create.add_argument("--name", required=True)
    create.add_argument("--rpm", type=int, help="requests per minute (none: unlimited)")
    create.add_argument("--tpm", type=int, help="tokens per minute (none: unlimited)")
    create.add_argument("--models", help="comma-separated models it may use (none: all)")
    create.add_argument("--expires-in-days", type=float, help="expiry (none: never)")
    sub.add_parser("list", help="list keys (never the keys themselves)")
    revoke = sub.add_parser("revoke", help="revoke a key on every process")
    revoke.add_argument("id")
    revoke.add_argument("--reason", default="")
    return parser


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "cli"


async def _run(args: argparse.Namespace, dsn: str) -> int:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        if args.command == "create":
            models = [m.strip() for m in args.models.split(",") if m.strip()] \
                if args.models else None
            try:
                new = msgspec.convert({
                    "name": args.name, "rpm": args.rpm, "tpm": args.tpm, "models": models,
                    "expires_in_sec": None if args.expires_in_days is None
                    else args.expires_in_days * 86_400}, clientkeys.NewKey)
            except msgspec.ValidationError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            record, key = await clientkeys.create(conn, new, actor=_actor(), address="cli",
                                                  source=SOURCE)
            print(key)
            print(f"id {record.id}  name {record.name!r}  rpm {record.rpm or '-'}  "
                  f"tpm {record.tpm or '-'}  models {','.join(record.models or []) or 'all'}"
                  f"  expires {_when(record.expires_at)}", file=sys.stderr)
            print("Store the key now: it is shown only this once.", file=sys.stderr)
        elif args.command == "list":
            print(f"{'id':<12}  {'name':<24}  {'rpm':>8}  {'tpm':>10}  {'status':<8}  "
                  f"{'created':<20}  {'expires':<20}  models")
            for r in await clientkeys.list_all(conn):
                status = "revoked" if r.revoked else "active"
                print(f"{r.id:<12}  {r.name[:24]:<24}  {r.rpm or '-':>8}  {r.tpm or '-':>10}  "
                      f"{status:<8}  {_when(r.created_at):<20}  {_when(r.expires_at):<20}  "
                      f"{','.join(r.models or []) or 'all'}")
        else:
            rec = await clientkeys.revoke(conn, args.id, actor=_actor(), address="cli",
                                          source=SOURCE, reason=args.reason)
            if rec is None:
                print(f"error: no key has the id {args.id!r}", file=sys.stderr)
                return 1
            print(f"revoked {rec.id} ({rec.name})")
    finally:
        await conn.close()
    return 0


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    dsn = os.environ.get("DATABASE_URL")
    if not dsn:
        print("error: DATABASE_URL is not set: keys live in the shared database.",
              file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args, dsn))
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as err:
        # Name the failure, never the DSN (it may carry a password).
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
