-- The tamper-evident hash chains over audit_actions and audit_admin_actions
-- (ARCHITECTURE.md, "The audit hash chains"): every row gets a gapless
-- sequence number and SHA-256(previous row_hash || canonical encoding of the
-- row), computed by the writer in the order it commits rows.
--
-- Rows written before this migration have no seq; `nox-migrate verify`
-- reports them as unchained.

ALTER TABLE audit_actions ADD COLUMN seq bigint, ADD COLUMN row_hash bytea;
ALTER TABLE audit_admin_actions ADD COLUMN seq bigint, ADD COLUMN row_hash bytea;

-- Serves `nox-migrate verify`, which walks the chain in seq order (from
-- --from-seq). seq only grows, so inserts append to the index's last page.
CREATE INDEX audit_actions_seq ON audit_actions (seq);
-- Serves the same walk; unique because this table is not partitioned.
CREATE UNIQUE INDEX audit_admin_actions_seq ON audit_admin_actions (seq);

-- Each chain's newest row. Every writing transaction locks its chain's row
-- (one lock per batch, not per row), so several servers append to one chain.
CREATE TABLE audit_chain_heads (
    chain     text PRIMARY KEY,
    seq       bigint NOT NULL,
    row_hash  bytea NOT NULL CHECK (length(row_hash) = 32)
);
INSERT INTO audit_chain_heads (chain, seq, row_hash) VALUES
    ('audit_actions', 0, decode(repeat('00', 32), 'hex')),
    ('audit_admin_actions', 0, decode(repeat('00', 32), 'hex'));

-- Signed statements "row seq of chain had hash row_hash at this time",
-- written at most every NOX_AUDIT_CHECKPOINT_SECS while rows arrive, at
-- shutdown and at a retention boundary. Also appended to a log file that
-- operators can ship off the database host.
CREATE TABLE audit_checkpoints (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    chain        text NOT NULL,
    seq          bigint NOT NULL,
    row_hash     bytea NOT NULL,
    "timestamp"  timestamptz NOT NULL,
    reason       text NOT NULL,              -- interval, shutdown or retention
    public_key   bytea NOT NULL,             -- Ed25519, 32 bytes
    signature    bytea NOT NULL              -- Ed25519, 64 bytes
);
-- Serves GET /admin/audit/checkpoints (newest first, by id) and the
-- checkpoint writer's "newest checkpoint of this chain".
CREATE INDEX audit_checkpoints_chain_seq ON audit_checkpoints (chain, seq);
