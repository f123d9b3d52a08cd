-- One audit session per (user, token) across every server on this database:
-- the database finds or opens it and judges its idleness on its own
-- last_activity (the greatest any server wrote), never on one server's
-- memory.

-- Writes wait until this commits, so no duplicate slips in before the index.
LOCK TABLE audit_sessions IN SHARE ROW EXCLUSIVE MODE;

-- Servers before this migration each kept their sessions in memory: one
-- token used through several servers, or across a restart, left several
-- active sessions. All but the newest end at their last activity.
UPDATE audit_sessions s
SET is_active = false, ended_at = s.last_activity
FROM (SELECT id,
             row_number() OVER (PARTITION BY user_id, session_token_hash
                                ORDER BY last_activity DESC, started_at DESC, id DESC) AS rank
      FROM audit_sessions
      WHERE is_active) d
WHERE s.id = d.id AND d.rank > 1;

CREATE UNIQUE INDEX audit_sessions_one_active ON audit_sessions (user_id, session_token_hash)
    WHERE is_active;

-- The session of each (user, token) for a record at `ats`, found or opened
-- (a new one gets the caller's id from `new_ids`). The active session is
-- kept unless it has been idle longer than `idle` by its last_activity here;
-- then it ends at that last activity and a new one opens. Two servers
-- opening at once: the unique index lets one insert, the other takes its
-- session. Kept sessions' last_activity moves to the record's time (and
-- started_at back to it: a replayed record may be older). One row per key;
-- `opened` says whether this call opened it. Keys are handled in (user,
-- token) order, as audit_sessions_write locks them, so no two servers
-- deadlock.
CREATE FUNCTION audit_sessions_open(
    idle interval, new_ids uuid[], user_ids uuid[], hashes text[], ips inet[], agents text[],
    ats timestamptz[])
RETURNS TABLE (key_user_id uuid, key_hash text, session_id uuid,
               session_started_at timestamptz, session_last_activity timestamptz, opened boolean)
LANGUAGE plpgsql AS $$
DECLARE
    k record;
    active_id uuid;
    active_last timestamptz;
BEGIN
    FOR k IN
        SELECT * FROM unnest(new_ids, user_ids, hashes, ips, agents, ats)
            AS u(new_id, user_id, hash, ip, agent, at)
        ORDER BY u.user_id, u.hash
    LOOP
        key_user_id := k.user_id;
        key_hash := k.hash;
        LOOP
            SELECT s.id, s.last_activity INTO active_id, active_last
            FROM audit_sessions s
            WHERE s.user_id = k.user_id AND s.session_token_hash = k.hash AND s.is_active
            FOR UPDATE;
            IF active_id IS NOT NULL AND k.at - active_last <= idle THEN
                UPDATE audit_sessions s
                SET last_activity = greatest(s.last_activity, k.at),
                    started_at = least(s.started_at, k.at)
                WHERE s.id = active_id
                RETURNING s.id, s.started_at, s.last_activity
                    INTO session_id, session_started_at, session_last_activity;
                opened := false;
                EXIT;
            END IF;
            IF active_id IS NOT NULL THEN
                UPDATE audit_sessions s SET is_active = false, ended_at = s.last_activity
                WHERE s.id = active_id;
            END IF;
            INSERT INTO audit_sessions AS s
                (id, user_id, session_token_hash, client_ip, user_agent, started_at, last_activity)
            VALUES (k.new_id, k.user_id, k.hash, k.ip, k.agent, k.at, k.at)
            ON CONFLICT (user_id, session_token_hash) WHERE is_active DO NOTHING
            RETURNING s.id, s.started_at, s.last_activity
                INTO session_id, session_started_at, session_last_activity;
            IF FOUND THEN
                opened := true;
                EXIT;
            END IF;
            -- Another server opened it since the SELECT: take that one.
        END LOOP;
        RETURN NEXT;
    END LOOP;
END $$;

-- A batch's session changes, in the batch's transaction: last_activity only
-- moves forward; a change with an `end_before` ends its session only if its
-- last_activity here (with the change's) is still before it, so no server
-- ends a session another keeps alive. An ended session's ended_at is its
-- last activity, also when activity is reported after the end. Rows are
-- locked in (user, token) order, as audit_sessions_open takes them.
CREATE FUNCTION audit_sessions_write(
    ids uuid[], user_ids uuid[], hashes text[], ips inet[], agents text[],
    started timestamptz[], lasts timestamptz[], end_before timestamptz[])
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    c record;
    new_last timestamptz;
    still_active boolean;
BEGIN
    FOR c IN
        SELECT * FROM unnest(ids, user_ids, hashes, ips, agents, started, lasts, end_before)
            AS u(id, user_id, hash, ip, agent, started_at, last_activity, end_before)
        ORDER BY u.user_id, u.hash, u.id
    LOOP
        SELECT greatest(s.last_activity, c.last_activity), s.is_active
            INTO new_last, still_active
        FROM audit_sessions s WHERE s.id = c.id
        FOR UPDATE;
        IF FOUND THEN
            still_active := still_active AND NOT coalesce(new_last < c.end_before, false);
            UPDATE audit_sessions s
            SET last_activity = new_last,
                is_active = still_active,
                ended_at = CASE WHEN still_active THEN NULL ELSE new_last END
            WHERE s.id = c.id;
            CONTINUE;
        END IF;
        -- Not here: a session a server before migration 0013 opened in its
        -- memory, in a spool file replayed since. Inserted as it was, or
        -- ended if its (user, token) has an active session already.
        still_active := NOT coalesce(c.last_activity < c.end_before, false);
        INSERT INTO audit_sessions
            (id, user_id, session_token_hash, client_ip, user_agent, started_at, last_activity,
             ended_at, is_active)
        VALUES (c.id, c.user_id, c.hash, c.ip, c.agent, c.started_at, c.last_activity,
                CASE WHEN still_active THEN NULL ELSE c.last_activity END, still_active)
        ON CONFLICT DO NOTHING;
        CONTINUE WHEN FOUND;
        INSERT INTO audit_sessions
            (id, user_id, session_token_hash, client_ip, user_agent, started_at, last_activity,
             ended_at, is_active)
        VALUES (c.id, c.user_id, c.hash, c.ip, c.agent, c.started_at, c.last_activity,
                c.last_activity, false)
        ON CONFLICT (id) DO NOTHING;
    END LOOP;
END $$;
