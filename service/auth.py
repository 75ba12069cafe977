"""Who may call `/v1/*`, and how much: client keys, their limits, the process bulkhead.

The edge middleware calls `Guard.enter` for every `/v1/*` request and `Guard.leave`
after it. While no client key exists (and `BULWARK_REQUIRE_KEYS` is off) that is the
bulkhead's counter and one boolean; keys turn on authentication (a SHA-256 and a dict
lookup: the records come from the View, never from Postgres on the request path), the
model allow-list (`check_model`, called by handlers once they know the model) and the
fleet-wide rate limits (`service/ratelimit.py`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time

import msgspec
from aiohttp import web

from bulwark.clientkeys import FLEET_PREFIX, PREFIX, KeyRecord
from bulwark.errors import AuthenticationFailed, PermissionDenied, RateLimited
from bulwark.state import FleetRow
from service.bulkhead import Bulkhead
from service.keys import CLIENT_KEY, METER, RATE_HEADERS
from service.ratelimit import Limiter, Meter

log = logging.getLogger("bulwark.auth")

#: Verified keys remembered per process; past this the memory is simply cleared.
_SEEN_MAX = 10_000





def check_model(request: web.Request, model: str) -> None:
    """403 `model_not_allowed` when the request's key may not use `model`."""
    check_key_model(request.get(CLIENT_KEY), model)


def check_key_model(key: KeyRecord | None, model: str) -> None:
    """check_model for a key held without its request (a WebSocket's, after the upgrade)."""
    if key is not None and key.models is not None and model not in key.models:
        raise PermissionDenied(f"This API key may not use the model {model!r}.",
                               code="model_not_allowed", param="model")


def _bearer(request: web.Request) -> str:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


class Guard:
    def __init__(self, *, require_keys: bool, metrics_token: str | None,
                 bulkhead: Bulkhead, limiter: Limiter | None = None) -> None:
        self.require_keys = require_keys
        self.metrics_token = metrics_token
        self.bulkhead = bulkhead
        self.limiter = limiter or Limiter()
        self._by_hash: dict[str, KeyRecord] = {}
        self._by_id: dict[str, KeyRecord] = {}
        #: key -> its digest, for keys that matched a record (the record is still looked
        #: up, and checked, on every request: a revocation applies at once).
        self._seen: dict[str, str] = {}
        #: The one check the request path makes while no key exists.
        self.keys_on = require_keys

    # -- the View ------------------------------------------------------------------------

    def on_fleet(self, row: FleetRow) -> None:
        """View subscriber: keep hash -> record for every `clientkey/<id>` row."""
        if not row.key.startswith(FLEET_PREFIX):
            return
        key_id = row.key[len(FLEET_PREFIX):]
        old = self._by_id.pop(key_id, None)
        if old is not None:
            self._by_hash.pop(old.hash, None)
        if row.value is not None:
            try:
                rec = msgspec.convert(row.value, KeyRecord)
            except msgspec.ValidationError:
                log.warning("unreadable client key record", extra={"key_id": key_id})
            else:
                self._by_id[key_id] = rec
                self._by_hash[rec.hash] = rec
        # Revoked records stay: revoking the last key must not open the gateway.
        self.keys_on = self.require_keys or bool(self._by_id)

    def records(self) -> list[KeyRecord]:
        return list(self._by_id.values())

    def loaded(self, key_id: str) -> bool:
        return key_id in self._by_id

    # -- the request path ---------------------------------------------------------------

    def authenticate(self, request: web.Request) -> KeyRecord:
        presented = _bearer(request)
        if not presented:
            raise AuthenticationFailed(
                "This gateway requires an API key: send `Authorization: Bearer <key>`.",
                code="invalid_api_key")
        digest = self._seen.get(presented)
        if digest is None and presented.startswith(PREFIX):
            digest = hashlib.sha256(presented.encode()).hexdigest()
            if digest in self._by_hash:
                # A SHA-256 object costs microseconds under OpenSSL 3 (the digest is
                # fetched per call); keys that matched a record are remembered, bounded.
                if len(self._seen) >= _SEEN_MAX:
                    self._seen.clear()
                self._seen[presented] = digest
        rec = self._by_hash.get(digest) if digest is not None else None
        if rec is None:
            raise AuthenticationFailed("Incorrect API key provided.", code="invalid_api_key")
        if rec.revoked:
            raise AuthenticationFailed("This API key has been revoked.", code="invalid_api_key")
        if rec.expires_at is not None and time.time() >= rec.expires_at:
            raise AuthenticationFailed("This API key has expired.", code="invalid_api_key")
        return rec

    async def enter(self, request: web.Request, *, count: bool = True) -> None:
        """Admit one `/v1/*` request, or raise the GatewayError that refuses it. `count`:
        it takes a bulkhead slot (not a WebSocket, which would hold it for hours)."""
        if count:
            await self.bulkhead.enter()
        if not self.keys_on:
            return
        try:
            rec = self.authenticate(request)
            request[CLIENT_KEY] = rec
            if rec.rpm is None and rec.tpm is None:
                return
            budget = self.limiter.budget(rec.id, rec.rpm, rec.tpm)
            try:
                request[RATE_HEADERS] = await self.limiter.admit(budget)
            except RateLimited:
                request[RATE_HEADERS] = self.limiter.headers(budget)  # on the 429 too
                raise
            if budget.tok is not None:
                request[METER] = Meter(budget)
        except BaseException:
            if count:
                self.bulkhead.leave()
            raise

    def leave(self, request: web.Request, *, count: bool = True) -> None:
        if count:
            self.bulkhead.leave()
        if self.keys_on:
            meter = request.get(METER)
            if meter is not None:
                self.limiter.charge(meter.budget, meter.tokens())

    def check_metrics(self, request: web.Request) -> None:
        token = self.metrics_token
        assert token is not None
        if not hmac.compare_digest(hashlib.sha256(_bearer(request).encode()).digest(),
                                   hashlib.sha256(token.encode()).digest()):
            raise AuthenticationFailed("`/metrics` requires the metrics token "
                                       "(BULWARK_METRICS_TOKEN) as a bearer token.",
                                       code="invalid_api_key")
