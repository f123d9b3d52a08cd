-- The daily rollups move off the commit path: a statement trigger made
-- every durable batch pay for its summary upsert (about half of a small
-- batch's cost in PostgreSQL). They are now brought up to date after
-- commit, from the actions chain's gapless seq: the rows with seq in
-- (rolled_seq, the committed head] are added by `audit_rollup_step`, which
-- one server at a time runs a few times a second (crate::rollup). Rows
-- outside the chain (no seq: written before migration 0005, which the
-- trigger already counted, or by an unchained writer kept for
-- measurements) are not rolled up by it.

-- No batch commits between reading the head and dropping the trigger.
LOCK TABLE audit_actions IN SHARE MODE;

DROP TRIGGER audit_actions_rollup ON audit_actions;
DROP FUNCTION audit_rollup_new_rows();

-- How far the rollups have come: every actions row with seq <= rolled_seq
-- is in audit_daily_summaries. caught_up_at: when a step last found
-- nothing left, so the rollups hold every row committed before then.
CREATE TABLE audit_rollup_state (
    id            boolean PRIMARY KEY DEFAULT true CHECK (id),
    rolled_seq    bigint NOT NULL,
    caught_up_at  timestamptz NOT NULL
);
INSERT INTO audit_rollup_state (rolled_seq, caught_up_at)
SELECT seq, now() FROM audit_chain_heads WHERE chain = 'audit_actions';

-- Adds the rows after rolled_seq, at most max_rows of them (NULL: all), to
-- the rollups and moves rolled_seq. Returns the rows added, or NULL when
-- another session is running a step (its state row is locked). The head
-- is read first: every row up to it is committed (seq is handed out under
-- the head's lock, in commit order), so the range has no hole.
CREATE FUNCTION audit_rollup_step(max_rows bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    from_seq bigint;
    head_seq bigint;
    to_seq bigint;
    head_read_at timestamptz;
BEGIN
    SELECT rolled_seq INTO from_seq FROM audit_rollup_state FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    -- Every row committed before this moment is at or below the head read.
    head_read_at := clock_timestamp();
    SELECT seq INTO head_seq FROM audit_chain_heads WHERE chain = 'audit_actions';
    to_seq := CASE WHEN max_rows IS NULL THEN head_seq
                   ELSE least(head_seq, from_seq + max_rows) END;
    IF to_seq <= from_seq THEN
        UPDATE audit_rollup_state SET caught_up_at = head_read_at;
        RETURN 0;
    END IF;

    WITH new_rows AS (
        -- Only what the rollups read: the CTE is materialised.
        SELECT "timestamp", user_id, session_id, success, action_category, action_type,
               quota_violation, cpu_time_ms, memory_peak_mb, files_affected, response_time_ms
        FROM audit_actions WHERE seq > from_seq AND seq <= to_seq
    ), counted_sessions AS (
        INSERT INTO audit_daily_sessions (summary_date, user_id, session_id)
        SELECT DISTINCT ("timestamp" AT TIME ZONE 'UTC')::date, user_id, session_id
        FROM new_rows
        WHERE session_id IS NOT NULL AND user_id IS NOT NULL
        ON CONFLICT DO NOTHING
        RETURNING summary_date, user_id
    ), new_sessions AS (
        SELECT summary_date, user_id, count(*) AS n
        FROM counted_sessions GROUP BY 1, 2
    ), batch AS (
        SELECT ("timestamp" AT TIME ZONE 'UTC')::date AS summary_date,
               user_id,
               count(*) AS total_actions,
               count(*) FILTER (WHERE success) AS successful_actions,
               count(*) FILTER (WHERE NOT success) AS failed_actions,
               count(*) FILTER (WHERE action_category = 'filesystem') AS file_operations,
               count(*) FILTER (WHERE action_category = 'execution') AS code_executions,
               count(*) FILTER (WHERE action_category = 'admin') AS admin_actions,
               count(*) FILTER (WHERE quota_violation) AS quota_violations,
               coalesce(sum(round(cpu_time_ms * 1000)), 0)::bigint AS total_cpu_us,
               coalesce(sum(round(memory_peak_mb * 1024)), 0)::bigint AS total_memory_kb,
               count(*) FILTER (WHERE success AND action_type = 'file_write') AS files_created,
               coalesce(sum(files_affected) FILTER (WHERE success AND action_type = 'file_delete'), 0)::bigint AS files_deleted,
               sum(round(response_time_ms * 1000))::bigint AS sum_response_time_us,
               max(response_time_ms) AS max_response_time_ms,
               min("timestamp") AS first_activity,
               max("timestamp") AS last_activity
        FROM new_rows
        GROUP BY 1, 2
    )
    INSERT INTO audit_daily_summaries AS s (
        summary_date, user_id, total_actions, successful_actions, failed_actions,
        file_operations, code_executions, admin_actions, quota_violations,
        total_cpu_us, total_memory_kb, files_created, files_deleted,
        sum_response_time_us, max_response_time_ms, unique_sessions,
        first_activity, last_activity)
    SELECT b.summary_date, b.user_id, b.total_actions, b.successful_actions, b.failed_actions,
           b.file_operations, b.code_executions, b.admin_actions, b.quota_violations,
           b.total_cpu_us, b.total_memory_kb, b.files_created, b.files_deleted,
           b.sum_response_time_us, b.max_response_time_ms, coalesce(n.n, 0),
           b.first_activity, b.last_activity
    FROM batch b
    LEFT JOIN new_sessions n
           ON n.summary_date = b.summary_date AND n.user_id IS NOT DISTINCT FROM b.user_id
    ON CONFLICT (summary_date, user_id) DO UPDATE SET
        total_actions        = s.total_actions + EXCLUDED.total_actions,
        successful_actions   = s.successful_actions + EXCLUDED.successful_actions,
        failed_actions       = s.failed_actions + EXCLUDED.failed_actions,
        file_operations      = s.file_operations + EXCLUDED.file_operations,
        code_executions      = s.code_executions + EXCLUDED.code_executions,
        admin_actions        = s.admin_actions + EXCLUDED.admin_actions,
        quota_violations     = s.quota_violations + EXCLUDED.quota_violations,
        total_cpu_us         = s.total_cpu_us + EXCLUDED.total_cpu_us,
        total_memory_kb      = s.total_memory_kb + EXCLUDED.total_memory_kb,
        files_created        = s.files_created + EXCLUDED.files_created,
        files_deleted        = s.files_deleted + EXCLUDED.files_deleted,
        sum_response_time_us = s.sum_response_time_us + EXCLUDED.sum_response_time_us,
        max_response_time_ms = greatest(s.max_response_time_ms, EXCLUDED.max_response_time_ms),
        unique_sessions      = s.unique_sessions + EXCLUDED.unique_sessions,
        first_activity       = least(s.first_activity, EXCLUDED.first_activity),
        last_activity        = greatest(s.last_activity, EXCLUDED.last_activity);

    UPDATE audit_rollup_state
    SET rolled_seq = to_seq,
        caught_up_at = CASE WHEN to_seq = head_seq THEN head_read_at ELSE caught_up_at END;
    RETURN to_seq - from_seq;
END
$$;

-- What the rollups hold in a given snapshot: a recomputation from the raw
-- rows of the UTC days from_date to to_date that are rolled up (seq up to
-- up_to_seq, or outside the chain; NULL: every row), so a check is exact
-- whatever the lag.
CREATE FUNCTION audit_daily_summaries_recomputed(from_date date, to_date date, up_to_seq bigint)
RETURNS TABLE (
    summary_date date, user_id uuid, total_actions bigint, successful_actions bigint,
    failed_actions bigint, file_operations bigint, code_executions bigint,
    admin_actions bigint, quota_violations bigint, total_cpu_us bigint,
    total_memory_kb bigint, files_created bigint, files_deleted bigint,
    sum_response_time_us bigint, max_response_time_ms double precision,
    unique_sessions bigint, first_activity timestamptz, last_activity timestamptz)
LANGUAGE sql STABLE AS $$
SELECT ("timestamp" AT TIME ZONE 'UTC')::date,
       user_id,
       count(*),
       count(*) FILTER (WHERE success),
       count(*) FILTER (WHERE NOT success),
       count(*) FILTER (WHERE action_category = 'filesystem'),
       count(*) FILTER (WHERE action_category = 'execution'),
       count(*) FILTER (WHERE action_category = 'admin'),
       count(*) FILTER (WHERE quota_violation),
       coalesce(sum(round(cpu_time_ms * 1000)), 0)::bigint,
       coalesce(sum(round(memory_peak_mb * 1024)), 0)::bigint,
       count(*) FILTER (WHERE success AND action_type = 'file_write'),
       coalesce(sum(files_affected) FILTER (WHERE success AND action_type = 'file_delete'), 0)::bigint,
       sum(round(response_time_ms * 1000))::bigint,
       max(response_time_ms),
       count(DISTINCT session_id) FILTER (WHERE user_id IS NOT NULL),
       min("timestamp"),
       max("timestamp")
FROM audit_actions
WHERE "timestamp" >= from_date::timestamp AT TIME ZONE 'UTC'
  AND "timestamp" < (to_date + 1)::timestamp AT TIME ZONE 'UTC'
  AND (up_to_seq IS NULL OR seq IS NULL OR seq <= up_to_seq)
GROUP BY 1, 2
$$;

-- It replaces 0003's two-argument form (NULL: every row).
DROP FUNCTION audit_daily_summaries_recomputed(date, date);
