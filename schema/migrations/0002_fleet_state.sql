-- Fleet-wide settings shared through the bus, beside provider_state: the degradation
-- level (automatic and operator), client keys' public records, operator overrides.
-- Every write bumps seq by one and NOTIFYs 'fleet_state' in the same transaction
-- (bulwark.bus.Bus.put_fleet); value 'null' means deleted (the row stays for its seq).
CREATE TABLE fleet_state (
    key         text PRIMARY KEY,
    value       jsonb NOT NULL,
    seq         bigint NOT NULL DEFAULT 1,
    updated_by  text NOT NULL DEFAULT '',
    updated_at  timestamptz NOT NULL DEFAULT now()
);
