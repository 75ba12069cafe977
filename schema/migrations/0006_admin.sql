-- Operator actions, client keys and the fleet-wide rate-limit buckets (issue 9).

-- Every operator action (admin API and `python -m service keys`): who, what, why, when,
-- from where. Never a secret: neither the admin token nor a client key is ever stored.
CREATE TABLE admin_audit (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    action      text NOT NULL,
    target      text NOT NULL DEFAULT '',
    reason      text NOT NULL DEFAULT '',
    actor       text NOT NULL DEFAULT '',
    address     text NOT NULL DEFAULT '',
    detail      jsonb
);
CREATE INDEX admin_audit_at ON admin_audit (at);

-- Client keys: only the SHA-256 of the key is kept (the key is 256 random bits, shown
-- once). The public record is mirrored in fleet_state 'clientkey/<id>' for every process.
CREATE TABLE client_keys (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    hash        text NOT NULL UNIQUE,
    rpm         int CHECK (rpm IS NULL OR rpm > 0),
    tpm         int CHECK (tpm IS NULL OR tpm > 0),
    models      text[],
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    revoked_at  timestamptz
);

-- One token bucket per client key and dimension ('r' requests, 't' tokens), shared by
-- every web process: each leases small allowances from it in the background
-- (service/ratelimit.py). level may go below zero: tokens used past a lease are owed.
CREATE TABLE rate_buckets (
    key_id      text NOT NULL,
    dim         text NOT NULL CHECK (dim IN ('r', 't')),
    level       double precision NOT NULL,
    granted     double precision NOT NULL DEFAULT 0,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (key_id, dim)
);

-- One lease round trip for a batch of buckets: each item brings its bucket up to date
-- (refilled continuously at p_rate per second, at most p_cap), charges p_debt (tokens the
-- caller used beyond its allowance; negative: unspent allowance handed back), and grants
-- up to p_want of what is left. Rows are locked in one order, so that two processes
-- leasing overlapping batches cannot deadlock.
CREATE FUNCTION bulwark_rate_lease(
    p_key text[], p_dim text[], p_cap float8[], p_rate float8[], p_want float8[],
    p_debt float8[])
RETURNS TABLE (lease_key text, lease_dim text, lease_granted float8, lease_level float8)
LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
BEGIN
    INSERT INTO rate_buckets (key_id, dim, level, at)
    SELECT u.k, u.d, u.c, clock_timestamp()
    FROM unnest(p_key, p_dim, p_cap) AS u(k, d, c)
    ORDER BY 1, 2
    ON CONFLICT DO NOTHING;
    PERFORM 1 FROM rate_buckets b
    JOIN unnest(p_key, p_dim) AS u(k, d) ON b.key_id = u.k AND b.dim = u.d
    ORDER BY b.key_id, b.dim
    FOR UPDATE OF b;
    -- Read the clock after the locks: a lease that waited refills for the wait too.
    t := clock_timestamp();
    RETURN QUERY
    WITH u AS (
        SELECT * FROM unnest(p_key, p_dim, p_cap, p_rate, p_want, p_debt)
            AS u(k, d, cap, rate, want, debt)
    ), r AS (
        SELECT u.k, u.d, greatest(0, least(u.want, x.refilled)) AS g, x.refilled
        FROM u JOIN rate_buckets b ON b.key_id = u.k AND b.dim = u.d,
        LATERAL (SELECT least(u.cap, least(u.cap, b.level
                    + u.rate * greatest(0, extract(epoch FROM t - b.at))) - u.debt)
                 AS refilled) x
    )
    UPDATE rate_buckets b SET level = r.refilled - r.g, granted = r.g, at = t
    FROM r WHERE b.key_id = r.k AND b.dim = r.d
    RETURNING b.key_id, b.dim, b.granted, b.level;
END
$$;
