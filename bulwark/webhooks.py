"""Webhooks: a finished job POSTed to its `callback_url`, signed per Standard Webhooks.

Signature (https://www.standardwebhooks.com): headers `webhook-id` (the same on every
retry of one message, so a receiver can deduplicate), `webhook-timestamp` (unix seconds)
and `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, keyed with
`BULWARK_WEBHOOK_SECRET` — a `whsec_`-prefixed base64 secret as the spec issues them, or
any other string, used as its UTF-8 bytes.

Retries are aiohttp-retry's, configured explicitly because its defaults are wrong for us
(FACTS): JitterRetry (exponential backoff plus a random component), POST retried only on
the statuses that mean "try later" (408, 425, 429, 5xx but 501/505) and on connection
errors and timeouts — never on a 4xx that says the receiver refuses the message. Two of
its gaps are closed in `_Backoff.get_timeout`, which aiohttp-retry calls with each
response it is about to retry: that response is released (aiohttp-retry drops it
unreleased, leaking the connection until garbage collection), and a receiver's
`Retry-After` is honoured within the backoff cap. Every attempt is observed through an
aiohttp TraceConfig and handed back, to be recorded as a row.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import time
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any, Final

import aiohttp
from aiohttp_retry import JitterRetry, RetryClient

from bulwark.jobstore import Delivery

SECRET_ENV: Final = "BULWARK_WEBHOOK_SECRET"
#: "Try again later" answers. 501 and 505 are not among them: they will not change.
RETRY_STATUSES: Final = frozenset({408, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523,
                                   524, 530})
#: Failures of the transport: the receiver may be restarting or briefly unreachable.
RETRY_EXCEPTIONS: Final = frozenset({aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                                     TimeoutError})
_RETRY_AFTER_CAP_FACTOR: Final = 30


class Signer:
    """Signs messages with the webhook secret; never shows the secret (repr, logs)."""

    __slots__ = ("_key",)

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError(f"{SECRET_ENV} is empty")
        if secret.startswith("whsec_"):
            try:
                self._key = base64.b64decode(secret[len("whsec_"):], validate=True)
            except ValueError:
                raise ValueError(f"{SECRET_ENV}: whsec_ secret is not valid base64") from None
        else:
            self._key = secret.encode()

    def __repr__(self) -> str:
        return "Signer(<secret>)"

    def signature(self, msg_id: str, timestamp: int, body: bytes) -> str:
        signed = f"{msg_id}.{timestamp}.".encode() + body
        digest = hmac.new(self._key, signed, hashlib.sha256).digest()
        return "v1," + base64.b64encode(digest).decode()

    def headers(self, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        ts = int(time.time()) if timestamp is None else timestamp
        return {"webhook-id": msg_id, "webhook-timestamp": str(ts),
                "webhook-signature": self.signature(msg_id, ts, body),
                "content-type": "application/json"}


def signer_from_env(env: Mapping[str, str] | None = None) -> Signer | None:
    """The signer, or None when no secret is configured (callbacks are then refused)."""
    secret = (os.environ if env is None else env).get(SECRET_ENV, "")
    return Signer(secret) if secret else None


class _Backoff(JitterRetry):
    def get_timeout(self, attempt: int, response: aiohttp.ClientResponse | None = None) -> float:
        wait: float = super().get_timeout(attempt, response)
        if response is not None:
            raw = response.headers.get("Retry-After", "")
            response.release()
            with contextlib.suppress(ValueError):
                wait = max(wait, min(float(raw), self._max_timeout))
        return wait


def trace_config() -> aiohttp.TraceConfig:
    """Observes each HTTP attempt of a delivery into its trace_request_ctx["record"]."""
    tc = aiohttp.TraceConfig()

    async def start(_: aiohttp.ClientSession, ctx: SimpleNamespace,
                    params: aiohttp.TraceRequestStartParams) -> None:
        ctx.started = time.monotonic()

    def _note(ctx: SimpleNamespace, status: int | None, error: str | None) -> None:
        req: Any = ctx.trace_request_ctx
        if isinstance(req, dict) and "record" in req:
            req["record"].append(Delivery(
                attempt=int(req.get("current_attempt", 0)), status=status, error=error,
                duration_ms=round((time.monotonic() - ctx.started) * 1000, 3)))

    async def end(_: aiohttp.ClientSession, ctx: SimpleNamespace,
                  params: aiohttp.TraceRequestEndParams) -> None:
        _note(ctx, params.response.status, None)

    async def failed(_: aiohttp.ClientSession, ctx: SimpleNamespace,
                     params: aiohttp.TraceRequestExceptionParams) -> None:
        _note(ctx, None, type(params.exception).__name__)

    tc.on_request_start.append(start)
    tc.on_request_end.append(end)
    tc.on_request_exception.append(failed)
    return tc


class WebhookSender:
    """Delivers one message with retries; the session must carry `trace_config()`."""

    def __init__(self, session: aiohttp.ClientSession, signer: Signer, *, attempts: int,
                 backoff_sec: float, timeout_sec: float) -> None:
        self.signer = signer
        self._timeout = aiohttp.ClientTimeout(total=timeout_sec, sock_connect=min(3.0,
                                                                                timeout_sec))
        options = _Backoff(
            attempts=attempts, start_timeout=backoff_sec / 2,  # first wait ≈ backoff_sec
            max_timeout=backoff_sec * _RETRY_AFTER_CAP_FACTOR, factor=2.0,
            statuses=set(RETRY_STATUSES), exceptions=set(RETRY_EXCEPTIONS),
            methods={"POST"}, random_interval_size=backoff_sec,
            retry_all_server_errors=False)
        self._client = RetryClient(client_session=session, retry_options=options,
                                   raise_for_status=False)

    async def deliver(self, url: str, msg_id: str, body: bytes) -> tuple[bool, list[Delivery]]:
        """POST until a 2xx, a status not worth retrying, or the attempts run out.
        (delivered, every attempt). Never raises for the receiver's failures."""
        record: list[Delivery] = []
        headers = self.signer.headers(msg_id, body)
        try:
            async with self._client.post(url, data=body, headers=headers, timeout=self._timeout,
                                         allow_redirects=False,
                                         trace_request_ctx={"record": record}) as resp:
                await resp.read()
                return 200 <= resp.status < 300, record
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False, record
