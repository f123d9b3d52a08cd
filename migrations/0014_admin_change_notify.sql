-- Admin changes announced to every server, so each applies them at once
-- instead of when its caches expire (nox_api::admin_changes):
-- NOTIFY nox_admin_change, '<kind> <user id>[ <token id>]', with kind
-- `token`, `user` or `quota`. NOTIFY is delivered at commit, and not at all
-- if the transaction rolls back. Only the columns servers cache notify:
-- not api_tokens.last_used_at, which every token check writes, nor
-- users.email or updated_at.

CREATE FUNCTION nox_token_change_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('nox_admin_change', 'token ' || OLD.user_id || ' ' || OLD.id);
    RETURN NULL;
END
$$;

CREATE FUNCTION nox_user_change_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('nox_admin_change', 'user ' || NEW.id);
    RETURN NULL;
END
$$;

CREATE FUNCTION nox_quota_change_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM pg_notify('nox_admin_change', 'quota ' || NEW.user_id);
    ELSE
        PERFORM pg_notify('nox_admin_change', 'quota ' || OLD.user_id);
    END IF;
    RETURN NULL;
END
$$;

-- A revocation, or any change of what a token stands for.
CREATE TRIGGER api_tokens_change_notify
    AFTER UPDATE OF user_id, token_hash, expires_at, revoked_at ON api_tokens
    FOR EACH ROW
    WHEN (OLD.user_id IS DISTINCT FROM NEW.user_id
          OR OLD.token_hash IS DISTINCT FROM NEW.token_hash
          OR OLD.expires_at IS DISTINCT FROM NEW.expires_at
          OR OLD.revoked_at IS DISTINCT FROM NEW.revoked_at)
    EXECUTE FUNCTION nox_token_change_notify();

CREATE TRIGGER api_tokens_delete_notify
    AFTER DELETE ON api_tokens
    FOR EACH ROW EXECUTE FUNCTION nox_token_change_notify();

-- What a token's caller carries: name, role, tier; and whether it may act.
CREATE TRIGGER users_change_notify
    AFTER UPDATE OF name, role, tier, is_active ON users
    FOR EACH ROW
    WHEN (OLD.name IS DISTINCT FROM NEW.name
          OR OLD.role IS DISTINCT FROM NEW.role
          OR OLD.tier IS DISTINCT FROM NEW.tier
          OR OLD.is_active IS DISTINCT FROM NEW.is_active)
    EXECUTE FUNCTION nox_user_change_notify();

CREATE TRIGGER user_quotas_change_notify
    AFTER INSERT OR DELETE ON user_quotas
    FOR EACH ROW EXECUTE FUNCTION nox_quota_change_notify();

CREATE TRIGGER user_quotas_update_notify
    AFTER UPDATE ON user_quotas
    FOR EACH ROW
    WHEN ((OLD.user_id, OLD.req_hour, OLD.req_day, OLD.cpu_seconds, OLD.mem_mb, OLD.storage_mb, OLD.files_max)
          IS DISTINCT FROM
          (NEW.user_id, NEW.req_hour, NEW.req_day, NEW.cpu_seconds, NEW.mem_mb, NEW.storage_mb, NEW.files_max))
    EXECUTE FUNCTION nox_quota_change_notify();
