"""Settings from the environment and the providers file (see CONTRACT.md).

Both are msgspec Structs built once at start-up and passed down; nothing reads the
environment or the file on the request path.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

PositiveFloat = Annotated[float, Meta(gt=0)]
NonNegInt = Annotated[int, Meta(ge=0)]

#: Where the built-in provider simulator listens when no providers file is configured.
SIM_DEFAULT_URL = "http://127.0.0.1:9100/v1"


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    port: int = 8080
    host: str = "127.0.0.1"
    database_url: str | None = None
    providers_file: str | None = None
    admin_token: str | None = None
    http_timeout_sec: PositiveFloat = 30.0
    http_retries: NonNegInt = 2
    http_backoff_base_ms: Annotated[float, Meta(ge=0)] = 200.0
    #: Upper bound on any upstream Retry-After we believe (and pass on in a 429): a provider
    #: asking for more than five minutes is out of the rotation that long anyway.
    retry_after_cap_sec: PositiveFloat = 300.0
    #: Whole-request budget (all attempts) when the client states none.
    request_timeout_sec: PositiveFloat = 120.0
    #: Upstream attempts for one request across retries and failover: bounds amplification.
    max_attempts: Annotated[int, Meta(ge=1)] = 6
    cb_fail_threshold: Annotated[int, Meta(ge=1)] = 5
    cb_reset_sec: PositiveFloat = 30.0
    healthd_interval_sec: PositiveFloat = 10.0
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    #: 1 MiB of JSON is ~250k tokens, beyond any current context window; larger is abuse.
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 1 << 20
    max_messages: Annotated[int, Meta(ge=1)] = 1024
    max_message_chars: Annotated[int, Meta(ge=1)] = 512_000
    #: Grace period for in-flight requests on SIGTERM; honcho SIGKILLs 5 s after SIGTERM.
    drain_sec: PositiveFloat = 4.0
    sim_url: str = SIM_DEFAULT_URL
    #: `/health/live` also on this port, answered by a thread (service/liveness.py), so a
    #: flood on the API port cannot fail a liveness probe; None: the API port only.
    health_port: Annotated[int, Meta(ge=1, le=65535)] | None = None
    #: Response cache (bulwark/cache.py). An answer larger than this is not stored: a chat
    #: answer is a few KiB; 256 KiB is a very long one, and bounds a row and an LRU slot.
    cache_max_entry_bytes: Annotated[int, Meta(ge=1024)] = 256 * 1024
    #: Answers kept in each process's LRU, in bytes of JSON (the rest come from Postgres).
    cache_memory_bytes: Annotated[int, Meta(ge=0)] = 32 * 1024 * 1024
    #: How long a Postgres lookup of a stored answer may take before it counts as a miss.
    cache_lookup_timeout_ms: PositiveFloat = 250.0
    #: Total size of the stored answers in Postgres; healthd's retention prunes the oldest.
    cache_store_max_bytes: Annotated[int, Meta(ge=0)] = 1 << 30
    #: WebSocket chat (`GET /v1/ws`, docs/WEBSOCKET.md). Largest frame accepted; None: the
    #: body limit plus room for the frame's envelope (a chat frame carries a request body).
    ws_max_frame_bytes: Annotated[int, Meta(ge=1024)] | None = None
    #: Requests in flight on one socket: a socket is one user's conversation, not a fleet.
    ws_max_in_flight: Annotated[int, Meta(ge=1)] = 16
    #: Output waiting for a reader that does not read; past it the socket is closed (1008).
    #: 1 MiB is thousands of deltas: only a reader that stopped reading gets there.
    ws_max_queued_bytes: Annotated[int, Meta(ge=1024)] = 1 << 20
    #: Heartbeat period: a socket silent this long is pinged; silent one more period, gone.
    ws_heartbeat_sec: PositiveFloat = 20.0
    #: How long answers of socket requests stay available to `resume`.
    ws_retention_sec: PositiveFloat = 900.0
    #: `/v1/*` needs a client key even before any key exists (docs/ADMIN.md).
    require_keys: bool = False
    #: Bearer token that `/metrics` requires, when set (scrapers send it).
    metrics_token: str | None = None
    #: Client requests one web process works on at once (the process bulkhead): about the
    #: upstream pool's 1000 sockets, so that what is admitted can also be sent.
    max_in_flight: Annotated[int, Meta(ge=1)] = 1000
    #: How long a request may wait for a free slot of a full bulkhead (process or
    #: provider) before it is refused with Retry-After: long enough to ride out a burst,
    #: short against any client's timeout.
    bulkhead_wait_ms: Annotated[float, Meta(ge=0)] = 100.0
    #: Browser origins allowed to call the API (`*`: any); empty: no CORS headers at all.
    cors_origins: tuple[str, ...] = ()


_ENV_MAP = {
    "HOST": "host",
    "DATABASE_URL": "database_url",
    "BULWARK_PROVIDERS": "providers_file",
    "BULWARK_ADMIN_TOKEN": "admin_token",
    "HTTP_TIMEOUT_SEC": "http_timeout_sec",
    "HTTP_RETRIES": "http_retries",
    "HTTP_BACKOFF_BASE_MS": "http_backoff_base_ms",
    "BULWARK_MAX_ATTEMPTS": "max_attempts",
    "BULWARK_REQUEST_TIMEOUT_SEC": "request_timeout_sec",
    "CB_FAIL_THRESHOLD": "cb_fail_threshold",
    "CB_RESET_SEC": "cb_reset_sec",
    "HEALTHD_INTERVAL_SEC": "healthd_interval_sec",
    "LOG_LEVEL": "log_level",
    "LOG_FORMAT": "log_format",
    "BULWARK_MAX_BODY_BYTES": "max_body_bytes",
    "BULWARK_DRAIN_SEC": "drain_sec",
    "BULWARK_SIM_URL": "sim_url",
    "BULWARK_HEALTH_PORT": "health_port",
    "BULWARK_CACHE_MAX_ENTRY_BYTES": "cache_max_entry_bytes",
    "BULWARK_CACHE_MEMORY_BYTES": "cache_memory_bytes",
    "BULWARK_CACHE_LOOKUP_TIMEOUT_MS": "cache_lookup_timeout_ms",
    "BULWARK_CACHE_STORE_MAX_BYTES": "cache_store_max_bytes",
    "BULWARK_WS_MAX_FRAME_BYTES": "ws_max_frame_bytes",
    "BULWARK_WS_MAX_IN_FLIGHT": "ws_max_in_flight",
    "BULWARK_WS_MAX_QUEUED_BYTES": "ws_max_queued_bytes",
    "BULWARK_WS_HEARTBEAT_SEC": "ws_heartbeat_sec",
    "BULWARK_WS_RETENTION_SEC": "ws_retention_sec",
    "BULWARK_REQUIRE_KEYS": "require_keys",
    "BULWARK_METRICS_TOKEN": "metrics_token",
    "BULWARK_MAX_IN_FLIGHT": "max_in_flight",
    "BULWARK_BULKHEAD_WAIT_MS": "bulkhead_wait_ms",
}


class ConfigError(Exception):
    """The environment or the providers file is invalid; the process refuses to start."""


def settings_from_env(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    raw: dict[str, str] = {field: env[var] for var, field in _ENV_MAP.items() if env.get(var)}
    port = env.get("BULWARK_PORT") or env.get("PORT")
    if port:
        raw["port"] = port
    if "log_format" in raw:
        raw["log_format"] = raw["log_format"].lower()
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as err:
        raise ConfigError(f"invalid environment: {err}") from err
    origins = cors_origins(env.get("BULWARK_CORS_ORIGINS", ""))
    return msgspec.structs.replace(settings, cors_origins=origins) if origins else settings


_ORIGIN = re.compile(r"^https?://[^/?#\s]+$")


def cors_origins(raw: str) -> tuple[str, ...]:
    """`BULWARK_CORS_ORIGINS`: comma-separated origins (`https://chat.example.com`), or
    `*`. An origin is scheme://host[:port], no path: that is what a browser sends."""
    origins = tuple(dict.fromkeys(
        o.strip().rstrip("/").lower() for o in raw.split(",") if o.strip()))
    for origin in origins:
        if origin != "*" and not _ORIGIN.match(origin):
            raise ConfigError(f"BULWARK_CORS_ORIGINS: {origin!r} is not an origin "
                              "(scheme://host[:port]) or *")
    return ("*",) if "*" in origins else origins


ProviderKind = Literal["openai", "anthropic", "gemini", "sim"]
#: `prefill`: the partial answer is sent as a final assistant message that the provider
#: continues; `instruct`: it is sent followed by an instruction to continue it.
Continuation = Literal["prefill", "instruct"]
#: Anthropic continues a final assistant turn by design. OpenAI's own API does not; among
#: other OpenAI-compatible servers only some do (Mistral, DeepSeek, vLLM), so an operator
#: opts them in with `continuation = "prefill"`.
CONTINUATION_BY_KIND: Mapping[str, Continuation] = {
    "anthropic": "prefill", "openai": "instruct", "gemini": "instruct", "sim": "instruct"}


class ProviderConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One `[[providers]]` table, as written by the operator."""

    name: Annotated[str, Meta(pattern=r"^[a-z0-9_-]{1,64}$")]
    kind: ProviderKind
    base_url: str = ""
    api_key_env: str | None = None
    priority: int = 1
    weight: Annotated[float, Meta(gt=0)] = 1.0
    timeout_connect_sec: PositiveFloat | None = None
    timeout_first_token_sec: PositiveFloat | None = None
    timeout_idle_sec: PositiveFloat | None = None
    timeout_total_sec: PositiveFloat | None = None
    retries: NonNegInt | None = None
    #: How healthd pings it: `models` (GET /models, free) or `chat` (a one-token chat).
    health_check: Literal["models", "chat"] = "models"
    #: How it continues another provider's broken stream (docs/CONTINUATION.md); None is the
    #: kind's default (`CONTINUATION_BY_KIND`).
    continuation: Continuation | None = None
    #: Upstream requests one web process sends this provider at once (its bulkhead).
    max_in_flight: Annotated[int, Meta(ge=1)] | None = None
    #: Gateway model name -> upstream model name.
    models: dict[str, str] = msgspec.field(default_factory=dict)


#: Default provider bulkhead: the pool's 500 sockets per host, so that a full provider is
#: refused at once (and failed over) rather than queued inside the connection pool.
DEFAULT_PROVIDER_IN_FLIGHT = 500


class Timeouts(msgspec.Struct, frozen=True, kw_only=True):
    connect: float
    first_token: float
    idle: float
    total: float


class Provider(msgspec.Struct, frozen=True, kw_only=True):
    """A provider with every default resolved; what the rest of the code works with."""

    name: str
    kind: ProviderKind
    base_url: str
    api_key_env: str | None
    priority: int
    weight: float
    timeouts: Timeouts
    retries: int
    health_check: Literal["models", "chat"]
    models: dict[str, str]
    continuation: Continuation = "instruct"
    max_in_flight: int = DEFAULT_PROVIDER_IN_FLIGHT

    def api_key(self, env: Mapping[str, str] | None = None) -> str | None:
        """The secret, read from the environment only when a request needs it."""
        if not self.api_key_env:
            return None
        return (os.environ if env is None else env).get(self.api_key_env) or None


class ModelPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One `[models.<name>]` table: what happens to a model's requests when its providers
    cannot answer (CONTRACT.md). Every model has one; an absent table means the defaults."""

    #: Tried in order when no provider of this model can answer (same attempt cap, deadline).
    fallback_models: list[str] = msgspec.field(default_factory=list)
    cache: Literal["off", "fallback", "first"] = "fallback"
    cache_ttl_sec: PositiveFloat = 86_400.0
    canned_reply: str | None = None
    continue_streams: bool = False
    embedding_dimensions: Annotated[int, Meta(ge=1)] | None = None


DEFAULT_POLICY = ModelPolicy()


class _ProvidersFile(msgspec.Struct, forbid_unknown_fields=True):
    providers: list[ProviderConfig]
    models: dict[str, ModelPolicy] = msgspec.field(default_factory=dict)


def resolve(cfg: ProviderConfig, settings: Settings) -> Provider:
    total = cfg.timeout_total_sec or settings.http_timeout_sec
    # Connect must fail fast so failover starts early; 2 s covers a cross-region TLS
    # handshake, while a dead host otherwise eats the whole request budget.
    connect = cfg.timeout_connect_sec or min(2.0, total)
    first = cfg.timeout_first_token_sec or min(10.0, total)
    idle = cfg.timeout_idle_sec or min(30.0, total)
    base_url = cfg.base_url or (settings.sim_url if cfg.kind == "sim" else "")
    if not base_url:
        raise ConfigError(f"provider {cfg.name!r}: base_url is required for kind {cfg.kind!r}")
    if not cfg.models:
        raise ConfigError(f"provider {cfg.name!r}: [providers.models] lists no model")
    return Provider(
        name=cfg.name,
        kind=cfg.kind,
        base_url=base_url.rstrip("/"),
        api_key_env=cfg.api_key_env,
        priority=cfg.priority,
        weight=cfg.weight,
        timeouts=Timeouts(connect=connect, first_token=first, idle=idle, total=total),
        retries=settings.http_retries if cfg.retries is None else cfg.retries,
        health_check=cfg.health_check,
        models=dict(cfg.models),
        continuation=cfg.continuation or CONTINUATION_BY_KIND[cfg.kind],
        max_in_flight=cfg.max_in_flight or DEFAULT_PROVIDER_IN_FLIGHT,
    )


#: The providers of the built-in simulator when no providers file exists: enough to fail
#: one and watch another answer. Priorities follow the order, so answers come from alpha
#: while it is healthy (predictable for a first try), then beta, then gamma.
SIM_FLEET = ("alpha", "beta", "gamma")


def sim_base_url(settings: Settings, name: str) -> str:
    """Where the simulator fleet serves `name`: `/<name>/v1` beside the root's `/v1`."""
    root = settings.sim_url.rstrip("/")
    root = root.removesuffix("/v1")
    return f"{root}/{name}/v1"


def sim_providers(settings: Settings) -> list[Provider]:
    """The default when no providers file exists: the built-in simulator as a fleet of
    three providers (`SIM_FLEET`) that each answer every model. They are probed with a
    one-token chat, so probes measure time to first token as well. One retry each (not
    HTTP_RETRIES): with two of three failed, the third still answers within the default
    attempt cap (BULWARK_MAX_ATTEMPTS, 6)."""
    models = {"default": "sim-1", "gpt-4o-mini": "sim-1", "gpt-4o": "sim-1"}
    return [resolve(ProviderConfig(name=name, kind="sim", base_url=sim_base_url(settings, name),
                                   priority=i, health_check="chat", retries=1, models=models),
                    settings)
            for i, name in enumerate(SIM_FLEET, start=1)]


def providers_path(settings: Settings, cwd: Path | None = None) -> Path | None:
    if settings.providers_file:
        return Path(settings.providers_file)
    candidate = (cwd or Path.cwd()) / "providers.toml"
    return candidate if candidate.exists() else None


def _read(path: Path) -> _ProvidersFile:
    try:
        data = tomllib.loads(path.read_text())
        return msgspec.convert(data, _ProvidersFile)
    except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError) as err:
        raise ConfigError(f"providers file {path}: {err}") from err


def load_models(settings: Settings, providers: list[Provider],
                cwd: Path | None = None) -> dict[str, ModelPolicy]:
    """Every served model's policy (`[models.<name>]`, defaults where absent)."""
    served = {m for p in providers for m in p.models}
    path = providers_path(settings, cwd)
    tables = _read(path).models if path is not None else {}
    for name, policy in tables.items():
        if name not in served:
            raise ConfigError(f"[models.{name}]: no provider serves model {name!r}")
        for fb in policy.fallback_models:
            if fb not in served or fb == name:
                raise ConfigError(f"[models.{name}] fallback_models: {fb!r} is not another "
                                  "served model")
    return {m: tables.get(m, DEFAULT_POLICY) for m in sorted(served)}


def load_providers(settings: Settings, cwd: Path | None = None) -> list[Provider]:
    path = providers_path(settings, cwd)
    if path is None:
        return sim_providers(settings)
    parsed = _read(path)
    names = [p.name for p in parsed.providers]
    if len(set(names)) != len(names):
        raise ConfigError(f"providers file {path}: provider names must be unique")
    if not parsed.providers:
        raise ConfigError(f"providers file {path}: no [[providers]]")
    return [resolve(p, settings) for p in parsed.providers]
