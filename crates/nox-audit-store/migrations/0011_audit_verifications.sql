-- The continuous verification's results (nox_audit_store::verify::Verifier):
-- one row per chain per pass, whichever server ran it, so every server's
-- GET /admin/audit/status shows the same. A pass starts after the newest
-- checkpoint at or below its chain's last `ok` row's to_seq. Rows older
-- than 30 days or past the newest 10,000 are deleted, except each chain's
-- newest `ok` row.
CREATE TABLE audit_verifications (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at     timestamptz NOT NULL,
    finished_at    timestamptz NOT NULL,
    chain          text NOT NULL,
    -- The rows recomputed and found sound: from_seq to to_seq (to_seq <
    -- from_seq: none, e.g. nothing added since the starting checkpoint).
    from_seq       bigint NOT NULL,
    to_seq         bigint NOT NULL,
    outcome        text NOT NULL CHECK (outcome IN ('ok', 'failed', 'error')),
    -- A failure's first bad seq (NULL for an unchained row, which has
    -- none) and its kind (hash_mismatch, missing, ...); an error's text.
    first_bad_seq  bigint,
    problem_kind   text,
    problem        text
);
-- Serves "each chain's newest row" (status) and "its newest ok row" (the
-- next start).
CREATE INDEX audit_verifications_chain ON audit_verifications (chain, id);
