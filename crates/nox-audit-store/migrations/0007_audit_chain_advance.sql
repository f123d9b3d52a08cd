-- Lets a writer that knows the actions chain's head (because it moved it
-- last) append a batch in one round trip: it sends the head it expects with
-- the batch's rows instead of reading the head first. Takes the head row's
-- lock like the writer's `SELECT ... FOR UPDATE`, so rows still join the
-- chain in commit order; a concurrent writer's update is waited for and
-- then seen (READ COMMITTED re-checks the row), so a head another writer
-- moved first raises NX001 and the whole batch rolls back, to be retried
-- the reading way.
CREATE FUNCTION audit_chain_advance(
    chain_name text, expected_seq bigint, expected_hash bytea,
    new_seq bigint, new_hash bytea)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE audit_chain_heads SET seq = new_seq, row_hash = new_hash
    WHERE chain = chain_name AND seq = expected_seq AND row_hash = expected_hash;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the % chain''s head is no longer at %', chain_name, expected_seq
            USING ERRCODE = 'NX001';
    END IF;
END
$$;
