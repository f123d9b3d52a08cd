-- Request quotas exact across servers: a server leases a block of requests
-- for a user's current hour and day in one statement, then spends it in
-- memory (nox-quota's lease.rs). quota_usage.requests then counts the
-- requests used plus those leased and not yet used or given back.
--
-- Grants least(wanted, what the hour has left, what the day has left) (a
-- NULL limit: no limit), never less than 0, adds it to both rows, and
-- returns the rows' totals after it (CPU too: a server learns other
-- servers' CPU counts of a leasing user here). The hour row is locked before
-- the day row, as the flush writes them, so two leases or a lease and a
-- flush never deadlock. A granting lease commits with synchronous_commit
-- off: a PostgreSQL crash may forget the last fraction of a second of leases
-- (those requests then go uncounted).
CREATE FUNCTION quota_lease(
    p_user uuid, p_hour timestamptz, p_day timestamptz,
    p_hour_limit bigint, p_day_limit bigint, p_wanted bigint,
    OUT granted bigint, OUT hour_requests bigint, OUT day_requests bigint,
    OUT hour_cpu_ms bigint, OUT day_cpu_ms bigint)
LANGUAGE plpgsql AS $$
BEGIN
    SELECT requests, cpu_ms INTO hour_requests, hour_cpu_ms FROM quota_usage
     WHERE user_id = p_user AND window_kind = 'hour' AND window_start = p_hour FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO quota_usage (user_id, window_kind, window_start) VALUES (p_user, 'hour', p_hour)
            ON CONFLICT DO NOTHING;
        SELECT requests, cpu_ms INTO hour_requests, hour_cpu_ms FROM quota_usage
         WHERE user_id = p_user AND window_kind = 'hour' AND window_start = p_hour FOR UPDATE;
    END IF;
    SELECT requests, cpu_ms INTO day_requests, day_cpu_ms FROM quota_usage
     WHERE user_id = p_user AND window_kind = 'day' AND window_start = p_day FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO quota_usage (user_id, window_kind, window_start) VALUES (p_user, 'day', p_day)
            ON CONFLICT DO NOTHING;
        SELECT requests, cpu_ms INTO day_requests, day_cpu_ms FROM quota_usage
         WHERE user_id = p_user AND window_kind = 'day' AND window_start = p_day FOR UPDATE;
    END IF;
    granted := greatest(0, least(p_wanted, p_hour_limit - hour_requests, p_day_limit - day_requests));
    IF granted > 0 THEN
        UPDATE quota_usage SET requests = requests + granted
         WHERE user_id = p_user AND window_kind = 'hour' AND window_start = p_hour;
        UPDATE quota_usage SET requests = requests + granted
         WHERE user_id = p_user AND window_kind = 'day' AND window_start = p_day;
        hour_requests := hour_requests + granted;
        day_requests := day_requests + granted;
        -- For this transaction only (the statement's own).
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
END
$$;
