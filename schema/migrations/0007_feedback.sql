-- Users' ratings of answers (POST /v1/feedback), read by the reliability report
-- (bulwark.feedback.feedback_summary). request_id is the gateway's x-request-id of the
-- rated answer; no foreign key: ids may be older than any other table's retention.
-- client_key_id is the id of the client key that sent the feedback (its public record's
-- id, never the key), NULL while client keys are not in use.
CREATE TABLE feedback (
    id             bigserial PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT now(),
    request_id     text NOT NULL,
    client_key_id  text,
    scale          text NOT NULL CHECK (scale IN ('thumbs', 'stars')),
    rating         smallint NOT NULL CHECK (
        (scale = 'thumbs' AND rating BETWEEN -1 AND 1)
        OR (scale = 'stars' AND rating BETWEEN 1 AND 5)),
    -- The rating on one 0..1 scale (thumbs -1/0/1 → 0/0.5/1, stars 1..5 → 0..1), so that
    -- a report can average both kinds.
    score          real NOT NULL CHECK (score BETWEEN 0 AND 1),
    comment        text,
    tags           text[] NOT NULL DEFAULT '{}'
);
-- (at) serves the report's time ranges; (request_id) looking up one answer's ratings.
CREATE INDEX feedback_at ON feedback (at);
CREATE INDEX feedback_request_id ON feedback (request_id);
