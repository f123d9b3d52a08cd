-- Users and their API tokens.
--
-- Users are deactivated, never deleted: the audit trail refers to them and
-- must outlive them, so nothing here cascades.

CREATE TABLE users (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (name ~ '^[a-z0-9_.-]{1,64}$'),
    email       text CHECK (email IS NULL OR length(email) <= 254),
    role        text NOT NULL CHECK (role IN ('user', 'auditor', 'admin')),
    tier        text NOT NULL DEFAULT 'standard'
                CHECK (tier IN ('free', 'standard', 'premium', 'developer', 'unlimited')),
    is_active   boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Only the SHA-256 of a token is stored; the token itself is shown once.
CREATE TABLE api_tokens (
    id            uuid PRIMARY KEY,
    user_id       uuid NOT NULL REFERENCES users (id),
    -- Authentication looks tokens up by hash (the UNIQUE index serves it).
    token_hash    bytea NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    -- A short, non-secret beginning of the token, to recognise it in lists.
    prefix        text NOT NULL,
    name          text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    expires_at    timestamptz,
    revoked_at    timestamptz
);

-- Serves GET /admin/users/{id}/tokens.
CREATE INDEX api_tokens_user_id ON api_tokens (user_id);
