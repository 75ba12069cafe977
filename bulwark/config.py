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
    #: Gateway model name -> upstream model name.
    models: dict[str, str] = msgspec.field(default_factory=dict)


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
    )


def sim_providers(settings: Settings) -> list[Provider]:
    """The default when no providers file exists: the built-in simulator answers every model."""
    cfg = ProviderConfig(
        name="sim",
        kind="sim",
        base_url=settings.sim_url,
        models={"default": "sim-1", "gpt-4o-mini": "sim-1", "gpt-4o": "sim-1"},
    )
    return [resolve(cfg, settings)]


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
