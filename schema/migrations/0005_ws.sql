-- Answers of WebSocket chat requests, kept briefly so that a client that reconnects to any
-- web process can `resume` them (docs/WEBSOCKET.md). Written off the request path in
-- batches by service/wsanswers.py; a finished answer is announced on NOTIFY 'ws_answers'
-- ("<scope>:<id>") in the same transaction, so a process holding a resume for it delivers
-- it at once. Rows expire after BULWARK_WS_RETENTION_SEC (default 15 minutes).
CREATE TABLE ws_answers (
    -- Hash of the socket's session token (the token itself is never stored).
    scope        text NOT NULL,
    -- The client's own request id, unique within its scope.
    id           text NOT NULL,
    status       text NOT NULL CHECK (status IN ('running', 'done', 'failed')),
    -- The web process running (or that ran) it; a running answer whose owner stopped
    -- renewing lease_until died with its process (kill -9) and is reported lost.
    owner        text NOT NULL,
    lease_until  timestamptz NOT NULL,
    -- done: the whole answer as one chat.completion.chunk, and the done frame's fields.
    chunk        jsonb,
    provider     text,
    attempts     int,
    fallback     text,
    usage        jsonb,
    -- failed: the OpenAI error body the client got.
    error        jsonb,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (scope, id)
);

CREATE INDEX ws_answers_expires ON ws_answers (expires_at);
CREATE INDEX ws_answers_running ON ws_answers (owner) WHERE status = 'running';
