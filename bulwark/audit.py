"""The operator audit trail: one `admin_audit` row and one log line per action.

Written by the admin API and by `python -m service keys`. Callers pass only what is safe
to keep: an action name, a target (provider, key id), the operator's reason, who and
from which address — never the admin token or a client key.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger("bulwark.audit")

#: Operator-supplied text is bounded before it reaches a row or a log line.
MAX_TEXT = 500


def clean(text: str, limit: int = MAX_TEXT) -> str:
    """Printable and bounded: an operator's free text cannot forge log lines."""
    return "".join(ch if ch.isprintable() else " " for ch in text[:limit])


async def record_action(conn: asyncpg.Connection | Any, *, action: str, target: str,
                        reason: str, actor: str, address: str,
                        detail: dict[str, Any] | None = None) -> None:
    """Insert the row (in the caller's transaction, when it has one) and log the line."""
    reason, actor = clean(reason), clean(actor, 100)
    await conn.execute(
        "INSERT INTO admin_audit (action, target, reason, actor, address, detail)"
        " VALUES ($1, $2, $3, $4, $5, $6::text::jsonb)",
        action, target, reason, actor, address,
        None if detail is None else msgspec.json.encode(detail).decode())
    log.info("admin action", extra={"action": action, "target": target, "reason": reason,
                                    "actor": actor, "address": address})
