-- How answers came about when the first choice could not give them: one row per answer
-- that was a failover, a fallback model, a stored answer, a canned reply or a job.
-- Written in batches by web processes (off the request path), read by the reliability
-- report, pruned with the other history tables.
CREATE TABLE fallback_events (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    kind        text NOT NULL,
    model       text,
    provider    text
);
CREATE INDEX fallback_events_at ON fallback_events (at);
