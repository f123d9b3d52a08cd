-- The Nox servers sharing this database, one row each, refreshed by a
-- heartbeat: how many are live sets each one's share of the per-user rate
-- limit, and operators see who is running.
CREATE TABLE servers (
    id         uuid PRIMARY KEY,
    host       text NOT NULL,
    pid        integer NOT NULL,
    version    text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    last_seen  timestamptz NOT NULL DEFAULT now()
);
