-- The audit trail: sessions, one row per request, and daily rollups kept
-- right by the database itself.
--
-- Like every audit table, these have no foreign keys: nothing may cascade a
-- delete into them, and a service embedding the audit crates need not have
-- Nox's users table.

-- One session per (user, token) until it has been idle for the configured
-- time (30 minutes by default). The writer creates and updates sessions in
-- batches, never once per request.
CREATE TABLE audit_sessions (
    id                  uuid PRIMARY KEY,
    user_id             uuid NOT NULL,
    -- The first 16 hex digits of SHA-256(token): enough to tell a user's
    -- tokens apart, never the token.
    session_token_hash  text NOT NULL CHECK (length(session_token_hash) <= 64),
    client_ip           inet,
    user_agent          text CHECK (length(user_agent) <= 500),
    started_at          timestamptz NOT NULL,
    last_activity       timestamptz NOT NULL,
    ended_at            timestamptz,
    is_active           boolean NOT NULL DEFAULT true,
    login_method        text NOT NULL DEFAULT 'api_token'
);

-- Serves the sweep that ends idle sessions and the count of active ones.
CREATE INDEX audit_sessions_active_last_activity ON audit_sessions (last_activity)
    WHERE is_active;

-- One row per request, partitioned by month so retention can drop whole
-- months. Columns are in the order exports use.
CREATE TABLE audit_actions (
    id                uuid NOT NULL,             -- UUIDv7 from the server: the idempotency key
    "timestamp"       timestamptz NOT NULL,      -- when the request arrived
    request_id        uuid NOT NULL,
    session_id        uuid,
    user_id           uuid,                      -- NULL when no valid token was sent
    endpoint          varchar(1024) NOT NULL,    -- the path, never the query string
    route             text NOT NULL,             -- the matched route template, or 'unmatched'
    http_method       varchar(16) NOT NULL,
    action_type       text NOT NULL,
    action_category   text NOT NULL,
    client_ip         inet,
    user_agent        text CHECK (length(user_agent) <= 500),
    request_size      bigint NOT NULL DEFAULT 0,
    response_size     bigint NOT NULL DEFAULT 0,
    status_code       smallint NOT NULL,
    success           boolean NOT NULL,
    response_time_ms  double precision NOT NULL,  -- microsecond precision
    cpu_time_ms       double precision,
    memory_peak_mb    double precision,
    file_path         text,
    file_size_bytes   bigint,
    files_affected    integer,
    command_type      text,
    command_text      text CHECK (length(command_text) <= 4096),
    exit_code         integer,
    stdout_size       bigint,
    stderr_size       bigint,
    quota_violation   boolean NOT NULL DEFAULT false,
    quota_consumed    jsonb,
    quota_remaining   jsonb,
    metadata          jsonb,
    error_details     text CHECK (length(error_details) <= 1000),
    -- Serves the spool replay's ON CONFLICT DO NOTHING (a partitioned
    -- table's unique keys must include the partition key).
    PRIMARY KEY (id, "timestamp")
) PARTITION BY RANGE ("timestamp");

CREATE TABLE audit_actions_default PARTITION OF audit_actions DEFAULT;

-- Serves the newest-first log page, keyset paging over (timestamp, id),
-- date-range filters, the daily rollup rebuild and /admin/stats.
CREATE INDEX audit_actions_timestamp_id ON audit_actions ("timestamp", id);
-- Serves the request_id filter and the X-Request-ID lookups.
CREATE INDEX audit_actions_request_id ON audit_actions (request_id);
-- Serves the user_id filter and the per-user activity summary.
CREATE INDEX audit_actions_user_timestamp ON audit_actions (user_id, "timestamp");

-- Creates the monthly partitions for `months` months from `first_month` on
-- (UTC months). Idempotent and safe to call from several servers at once.
CREATE FUNCTION audit_ensure_partitions(first_month date, months integer)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    month_start date;
    partition_name text;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('audit_ensure_partitions'));
    FOR i IN 0 .. months - 1 LOOP
        month_start := (date_trunc('month', first_month) + make_interval(months => i))::date;
        partition_name := format('audit_actions_y%sm%s',
                                 to_char(month_start, 'YYYY'), to_char(month_start, 'MM'));
        IF to_regclass(partition_name) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF audit_actions FOR VALUES FROM (%L) TO (%L)',
                partition_name,
                month_start::timestamp AT TIME ZONE 'UTC',
                (month_start + interval '1 month')::timestamp AT TIME ZONE 'UTC');
        END IF;
    END LOOP;
END
$$;

SELECT audit_ensure_partitions((now() AT TIME ZONE 'UTC')::date, 2);

-- Daily rollups, one row per (UTC date, user); anonymous requests share one
-- row per date (user_id NULL). Sums are integers (microseconds, kibibytes)
-- so a recomputation matches exactly, whatever the order of addition.
CREATE TABLE audit_daily_summaries (
    summary_date          date NOT NULL,
    user_id               uuid,
    total_actions         bigint NOT NULL DEFAULT 0,
    successful_actions    bigint NOT NULL DEFAULT 0,
    failed_actions        bigint NOT NULL DEFAULT 0,
    file_operations       bigint NOT NULL DEFAULT 0,
    code_executions       bigint NOT NULL DEFAULT 0,
    admin_actions         bigint NOT NULL DEFAULT 0,
    quota_violations      bigint NOT NULL DEFAULT 0,
    total_cpu_us          bigint NOT NULL DEFAULT 0,
    total_memory_kb       bigint NOT NULL DEFAULT 0,
    files_created         bigint NOT NULL DEFAULT 0,
    files_deleted         bigint NOT NULL DEFAULT 0,
    sum_response_time_us  bigint NOT NULL DEFAULT 0,
    max_response_time_ms  double precision NOT NULL DEFAULT 0,
    unique_sessions       bigint NOT NULL DEFAULT 0,
    first_activity        timestamptz,
    last_activity         timestamptz,
    total_cpu_ms          double precision GENERATED ALWAYS AS (total_cpu_us / 1000.0) STORED,
    total_memory_mb       double precision GENERATED ALWAYS AS (total_memory_kb / 1024.0) STORED,
    sum_response_time_ms  double precision GENERATED ALWAYS AS (sum_response_time_us / 1000.0) STORED,
    avg_response_time_ms  double precision GENERATED ALWAYS AS (
        CASE WHEN total_actions > 0
             THEN sum_response_time_us::double precision / total_actions / 1000.0 END) STORED,
    -- Serves the trigger's upsert and the date-range reads of the summaries.
    UNIQUE NULLS NOT DISTINCT (summary_date, user_id)
);

-- The sessions already counted for each (date, user), so unique_sessions
-- stays exact when a session's requests arrive in several batches.
CREATE TABLE audit_daily_sessions (
    summary_date  date NOT NULL,
    user_id       uuid NOT NULL,
    session_id    uuid NOT NULL,
    PRIMARY KEY (summary_date, user_id, session_id)
);

-- What the rollups must equal: a recomputation from the raw rows of the
-- UTC days from_date to to_date. `nox-migrate summaries rebuild` and
-- `summaries check` use it.
CREATE FUNCTION audit_daily_summaries_recomputed(from_date date, to_date date)
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
GROUP BY 1, 2
$$;

-- Keeps the rollups current at insert time, once per statement: a batch of
-- 1000 rows costs one upsert per (date, user) it touches, whoever wrote it.
CREATE FUNCTION audit_rollup_new_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH counted_sessions AS (
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
    -- A fixed order, so concurrent writers lock summary rows alike.
    ORDER BY b.summary_date, b.user_id NULLS FIRST
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
    RETURN NULL;
END
$$;

CREATE TRIGGER audit_actions_rollup
    AFTER INSERT ON audit_actions
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION audit_rollup_new_rows();
