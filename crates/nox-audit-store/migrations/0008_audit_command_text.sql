-- The whole command as run is stored: `POST /run` accepts commands of up to
-- 10,000 characters, and the old 4,096 cap cut them silently. Loosening a
-- CHECK holds for every existing row; PostgreSQL still scans each partition
-- once to validate it.
ALTER TABLE audit_actions DROP CONSTRAINT audit_actions_command_text_check;
ALTER TABLE audit_actions
    ADD CONSTRAINT audit_actions_command_text_check CHECK (length(command_text) <= 10000);
