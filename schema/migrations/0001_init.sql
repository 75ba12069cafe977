-- Shared state of the gateway: provider config snapshot, live provider state (the bus),
-- and the append-only history that healthd and web write (pruned by retention).

-- Config snapshot, informational (status page, reports). Never secrets: no API key.
CREATE TABLE providers (
    name        text PRIMARY KEY,
    kind        text NOT NULL,
    base_url    text NOT NULL,
    priority    int,
    weight      double precision,
    models      jsonb NOT NULL,
    updated_at  timestamptz DEFAULT now()
);

-- One row per provider; every write bumps seq by exactly one and NOTIFYs
-- 'provider_state' in the same transaction (bulwark.bus.Bus.publish).
CREATE TABLE provider_state (
    provider    text PRIMARY KEY,
    health      text NOT NULL DEFAULT 'unknown',
    breaker     text NOT NULL DEFAULT 'closed',
    reason      text NOT NULL DEFAULT '',
    seq         bigint NOT NULL DEFAULT 0,
    open_until  timestamptz,
    updated_by  text NOT NULL DEFAULT '',
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE breaker_events (
    id          bigserial PRIMARY KEY,
    provider    text NOT NULL,
    from_state  text,
    to_state    text NOT NULL,
    reason      text NOT NULL,
    source      text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
-- (at) serves retention and time-range reports; (provider, at) a provider's history.
CREATE INDEX breaker_events_at ON breaker_events (at);
CREATE INDEX breaker_events_provider_at ON breaker_events (provider, at);

CREATE TABLE health_samples (
    id          bigserial PRIMARY KEY,
    provider    text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    ok          boolean NOT NULL,
    latency_ms  double precision,
    ttft_ms     double precision,
    error_class text,
    status      int
);
CREATE INDEX health_samples_at ON health_samples (at);
CREATE INDEX health_samples_provider_at ON health_samples (provider, at);

-- detail is sanitised by the caller: no prompts, no upstream bodies, no secrets.
CREATE TABLE service_errors (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    provider    text,
    request_id  text,
    model       text,
    error_class text NOT NULL,
    status      int,
    detail      text
);
CREATE INDEX service_errors_at ON service_errors (at);
CREATE INDEX service_errors_provider_at ON service_errors (provider, at);

-- At most one row: the active healthd's liveness, read by every web process on the
-- database clock (no clock skew between hosts).
CREATE TABLE healthd_heartbeat (
    id          int PRIMARY KEY CHECK (id = 1),
    holder      text NOT NULL,
    started_at  timestamptz NOT NULL,
    beat_at     timestamptz NOT NULL
);
