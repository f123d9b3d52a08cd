-- Quotas: per-user overrides of the tier limits, and usage per window.

-- A NULL limit falls back to the user's tier.
CREATE TABLE user_quotas (
    user_id      uuid PRIMARY KEY REFERENCES users (id),
    req_hour     bigint CHECK (req_hour >= 0),
    req_day      bigint CHECK (req_day >= 0),
    cpu_seconds  bigint CHECK (cpu_seconds >= 0),
    mem_mb       bigint CHECK (mem_mb >= 0),
    storage_mb   bigint CHECK (storage_mb >= 0),
    files_max    bigint CHECK (files_max >= 0),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- Counters of the calendar UTC hour and day, flushed from each server's
-- memory about once a second (the primary key serves the upserts and the
-- reads at a user's first request).
CREATE TABLE quota_usage (
    user_id       uuid NOT NULL REFERENCES users (id),
    window_kind   text NOT NULL CHECK (window_kind IN ('hour', 'day')),
    window_start  timestamptz NOT NULL,
    requests      bigint NOT NULL DEFAULT 0,
    cpu_ms        bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, window_kind, window_start)
);
