-- The response cache (bulwark/cache.py): one stored answer per exact-match key, shared by
-- every web process and host. `key` is a sha256 over the model and every parameter that
-- changes the answer (no prompt text is stored, only the hash and the answer itself);
-- `body` is a whole chat.completion as JSON (form 'completion'), or a finished stream's
-- chunks as sent, each a JSON text, separated by RS 0x1E (form 'chunks'). Written in batches off the request path;
-- read on the failure path (cache = "fallback") or before the providers ("first").
-- healthd's hourly retention prunes by age and by total size.
CREATE TABLE response_cache (
    key         text PRIMARY KEY,
    model       text NOT NULL,
    body        bytea NOT NULL,
    form        text NOT NULL DEFAULT 'completion' CHECK (form IN ('completion', 'chunks')),
    size        integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX response_cache_created_at ON response_cache (created_at);
