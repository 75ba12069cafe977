-- Durable chat jobs, their dead-letter queue, webhook deliveries and idempotency keys
-- (issue 6 items 4-7). All SQL that touches these tables lives in bulwark/jobstore.py.

-- One row per accepted job; the row is committed before the client gets its 202.
-- status: queued -> running -> succeeded | failed | dead, or queued -> cancelled;
-- running -> queued on a retryable failure (with not_before), on SIGTERM (lease
-- returned) or when its lease expires (the process died: another one claims it).
-- dead -> queued when healthd replays the dead-letter queue.
CREATE TABLE chat_jobs (
    id               text PRIMARY KEY,
    status           text NOT NULL DEFAULT 'queued' CHECK (status IN
                         ('queued', 'running', 'succeeded', 'failed', 'dead', 'cancelled')),
    model            text NOT NULL,
    request          jsonb NOT NULL,      -- the validated chat body, stream off
    callback_url     text,
    metadata         jsonb,
    request_id       text,                -- x-request-id of the request that created it
    attempts         int NOT NULL DEFAULT 0,   -- dispatcher.complete() calls since (re)queued
    replays          int NOT NULL DEFAULT 0,   -- times healthd took it out of the DLQ
    provider         text,
    result           jsonb,               -- the chat.completion, when succeeded
    error            jsonb,               -- OpenAI error object, when failed or dead
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    -- Start of the job's age limit: created_at, or the last replay out of the DLQ.
    age_from         timestamptz NOT NULL DEFAULT now(),
    not_before       timestamptz NOT NULL DEFAULT now(),
    lease_until      timestamptz,
    leased_by        text,
    finished_at      timestamptz,
    dead_at          timestamptz,
    -- Webhook: NULL (no callback_url or not final yet), pending, delivered, failed.
    hook_state       text CHECK (hook_state IN ('pending', 'delivered', 'failed')),
    hook_lease_until timestamptz
);
-- The claim query's two ways in: due queued jobs, and running jobs whose lease expired.
CREATE INDEX chat_jobs_queued ON chat_jobs (not_before) WHERE status = 'queued';
CREATE INDEX chat_jobs_running ON chat_jobs (lease_until) WHERE status = 'running';
-- The DLQ by model (replay, admin listing) and its oldest entry (/health/dlq).
CREATE INDEX chat_jobs_dead ON chat_jobs (model, dead_at) WHERE status = 'dead';
-- Retention of finished jobs.
CREATE INDEX chat_jobs_finished ON chat_jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX chat_jobs_hooks ON chat_jobs (hook_lease_until) WHERE hook_state = 'pending';

-- Every delivery attempt of a webhook (one row per HTTP attempt, retries included).
CREATE TABLE webhook_deliveries (
    id           bigserial PRIMARY KEY,
    job_id       text NOT NULL,
    webhook_id   text NOT NULL,           -- the webhook-id header: the same for retries
    attempt      int NOT NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    status       int,                     -- the receiver's HTTP status, NULL if none
    error        text,                    -- exception class when no status came back
    duration_ms  double precision
);
CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id);
CREATE INDEX webhook_deliveries_at ON webhook_deliveries (at);

-- Idempotency-Key: the first request with a key claims the row (state running), runs,
-- and stores its final response (state done) for replay within 24 h. scope is '' until
-- client keys exist; then the key id, so two clients' keys never collide.
CREATE TABLE idempotency_keys (
    scope         text NOT NULL DEFAULT '',
    key           text NOT NULL,
    body_hash     bytea NOT NULL,         -- sha256 of method, path and body
    state         text NOT NULL CHECK (state IN ('running', 'done')),
    owner         text NOT NULL,          -- the web process running it
    locked_until  timestamptz NOT NULL,   -- a running claim older than this is abandoned
    status        int,
    headers       jsonb,
    body          bytea,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
