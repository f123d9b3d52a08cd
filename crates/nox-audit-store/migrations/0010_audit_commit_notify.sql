-- Announces each commit that extends a chain, for live readers on any
-- server (`GET /admin/audit/stream`): NOTIFY on channel `nox_audit_commit`
-- with the payload "<chain> <first seq> <last seq>". Every writer moves its
-- chain's head in the transaction that adds the rows, so a trigger here
-- covers every path (batches, one-round-trip batches, spool replay, admin
-- rows) and PostgreSQL delivers the notice only if that transaction commits.
-- A lost notice only delays a reader: readers also poll the heads.
CREATE FUNCTION audit_chain_announce() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('nox_audit_commit',
        NEW.chain || ' ' || (OLD.seq + 1) || ' ' || NEW.seq);
    RETURN NULL;
END
$$;

CREATE TRIGGER audit_chain_heads_announce
    AFTER UPDATE OF seq ON audit_chain_heads
    FOR EACH ROW WHEN (NEW.seq > OLD.seq)
    EXECUTE FUNCTION audit_chain_announce();
