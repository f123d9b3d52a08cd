-- The uid each user's commands run as (POST /run), allocated once from the
-- server's NOX_RUN_UID_RANGE and kept, so a workspace keeps its owner:
-- tenants are separated by plain file permissions as well as by Landlock.
CREATE TABLE run_uids (
    user_id uuid PRIMARY KEY REFERENCES users (id),
    uid     bigint NOT NULL UNIQUE CHECK (uid > 0 AND uid < 4294967295)
);
