//! Users and tokens in PostgreSQL. Every mutation runs in one transaction
//! together with its `audit_admin_actions` row.

use deadpool_postgres::{Pool, PoolError};
use nox_audit_model::{AdminAction, AdminActionType};
use nox_audit_store::admin_actions;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use crate::model::{Caller, Role, Tier, TokenInfo, User};
use crate::secret::Secret;
use crate::token::NewToken;

/// Serialises changes to users, so two admins demoting each other at once
/// cannot both succeed and leave no admin.
const USER_CHANGE_LOCK: i64 = 0x6e6f_785f_7573_6572; // "nox_user"
/// The name of the user the first start creates.
pub const BOOTSTRAP_ADMIN: &str = "admin";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("the database is unavailable")]
    Unavailable(#[source] PoolError),
    #[error("database error")]
    Database(#[from] tokio_postgres::Error),
    #[error("the random number generator failed")]
    Random(#[from] getrandom::Error),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
}

impl From<PoolError> for StoreError {
    fn from(error: PoolError) -> Self {
        StoreError::Unavailable(error)
    }
}

impl StoreError {
    /// Whether the failure means the database could not be reached (a
    /// closed connection counts), as opposed to a bad query.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Unavailable(_) => true,
            StoreError::Database(error) => error.is_closed() || error.as_db_error().is_none(),
            _ => false,
        }
    }
}

const USER_COLUMNS: &str = "id, name, email, role, tier, is_active, created_at";
const TOKEN_COLUMNS: &str =
    "id, user_id, prefix, name, created_at, last_used_at, expires_at, revoked_at";

fn user_from_row(row: &Row) -> Result<User, StoreError> {
    let role: String = row.get("role");
    let tier: String = row.get("tier");
    Ok(User {
        id: row.get("id"),
        name: row.get("name"),
        email: row.get("email"),
        role: Role::parse(&role).ok_or_else(|| StoreError::Corrupt(format!("role {role}")))?,
        tier: Tier::parse(&tier).ok_or_else(|| StoreError::Corrupt(format!("tier {tier}")))?,
        is_active: row.get("is_active"),
        created_at: row.get("created_at"),
    })
}

fn token_from_row(row: &Row) -> TokenInfo {
    TokenInfo {
        id: row.get("id"),
        user_id: row.get("user_id"),
        prefix: row.get("prefix"),
        name: row.get("name"),
        created_at: row.get("created_at"),
        last_used_at: row.get("last_used_at"),
        expires_at: row.get("expires_at"),
        revoked_at: row.get("revoked_at"),
    }
}

/// What an admin action records about a user: everything but secrets.
fn user_values(user: &User) -> Value {
    json!({
        "name": user.name,
        "email": user.email,
        "role": user.role,
        "tier": user.tier,
        "is_active": user.is_active,
    })
}

fn token_values(token: &TokenInfo) -> Value {
    json!({
        "token_id": token.id,
        "prefix": token.prefix,
        "name": token.name,
        "expires_at": token.expires_at.and_then(|t| t.format(&Rfc3339).ok()),
    })
}

/// Who asked for a change, and why.
#[derive(Debug, Clone)]
pub struct Actor {
    /// `None` for the server itself.
    pub user_id: Option<Uuid>,
    pub justification: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewUser {
    pub name: String,
    pub email: Option<String>,
    pub role: Role,
    pub tier: Tier,
}

/// A partial update; `None` leaves a field alone. `email: Some(None)` clears
/// the email.
#[derive(Debug, Clone, Default)]
pub struct UserPatch {
    pub email: Option<Option<String>>,
    pub role: Option<Role>,
    pub tier: Option<Tier>,
    pub is_active: Option<bool>,
}

/// A created token: its record, and the secret to show once.
#[derive(Debug)]
pub struct IssuedToken {
    pub info: TokenInfo,
    pub secret: Secret,
}

async fn insert_token<C: tokio_postgres::GenericClient>(
    client: &C,
    user_id: Uuid,
    name: &str,
    expires_at: Option<OffsetDateTime>,
    token: &NewToken,
) -> Result<TokenInfo, StoreError> {
    let row = client
        .query_one(
            &format!(
                "INSERT INTO api_tokens (id, user_id, token_hash, prefix, name, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING {TOKEN_COLUMNS}"
            ),
            &[
                &Uuid::now_v7(),
                &user_id,
                &token.hash.as_slice(),
                &token.prefix,
                &name,
                &expires_at,
            ],
        )
        .await?;
    Ok(token_from_row(&row))
}

/// Creates a user and its first token.
pub async fn create_user(
    pool: &Pool,
    actor: &Actor,
    new: &NewUser,
) -> Result<(User, IssuedToken), StoreError> {
    let token = NewToken::generate()?;
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            &format!(
                "INSERT INTO users (id, name, email, role, tier) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (name) DO NOTHING RETURNING {USER_COLUMNS}"
            ),
            &[
                &Uuid::now_v7(),
                &new.name,
                &new.email,
                &new.role.as_str(),
                &new.tier.as_str(),
            ],
        )
        .await?
        .ok_or_else(|| StoreError::Conflict(format!("a user named {} exists", new.name)))?;
    let user = user_from_row(&row)?;
    let info = insert_token(&*tx, user.id, "", None, &token).await?;
    let mut values = user_values(&user);
    values["token"] = token_values(&info);
    let action = AdminAction::new(AdminActionType::UserCreate, actor.user_id)
        .target(user.id)
        .new_values(values)
        .justification(actor.justification.clone());
    admin_actions::record(&tx, &action).await?;
    tx.commit().await?;
    Ok((
        user,
        IssuedToken {
            info,
            secret: token.secret,
        },
    ))
}

pub async fn get_user(pool: &Pool, id: Uuid) -> Result<User, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            &format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"),
            &[&id],
        )
        .await?
        .ok_or(StoreError::NotFound("user"))?;
    user_from_row(&row)
}

pub async fn list_users(pool: &Pool) -> Result<Vec<User>, StoreError> {
    let client = pool.get().await?;
    client
        .query(
            &format!("SELECT {USER_COLUMNS} FROM users ORDER BY name"),
            &[],
        )
        .await?
        .iter()
        .map(user_from_row)
        .collect()
}

/// Sets a user's tier, in the caller's transaction (the one that records the
/// admin action). A missing user changes nothing.
pub async fn set_tier<C: tokio_postgres::GenericClient>(
    client: &C,
    user_id: Uuid,
    tier: Tier,
) -> Result<(), StoreError> {
    client
        .execute(
            "UPDATE users SET tier = $2, updated_at = now() WHERE id = $1",
            &[&user_id, &tier.as_str()],
        )
        .await?;
    Ok(())
}

/// How many users exist, and how many of them are active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserCounts {
    pub total: i64,
    pub active: i64,
}

pub async fn count_users<C: tokio_postgres::GenericClient>(
    client: &C,
) -> Result<UserCounts, StoreError> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM users WHERE is_active)",
            &[],
        )
        .await?;
    Ok(UserCounts {
        total: row.get(0),
        active: row.get(1),
    })
}

/// Applies `patch`. Refuses to demote or deactivate the last active admin.
/// A patch that changes nothing writes nothing.
pub async fn update_user(
    pool: &Pool,
    actor: &Actor,
    id: Uuid,
    patch: &UserPatch,
) -> Result<User, StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&USER_CHANGE_LOCK])
        .await?;
    let row = tx
        .query_opt(
            &format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1 FOR UPDATE"),
            &[&id],
        )
        .await?
        .ok_or(StoreError::NotFound("user"))?;
    let old = user_from_row(&row)?;
    let new = User {
        email: patch.email.clone().unwrap_or_else(|| old.email.clone()),
        role: patch.role.unwrap_or(old.role),
        tier: patch.tier.unwrap_or(old.tier),
        is_active: patch.is_active.unwrap_or(old.is_active),
        ..old.clone()
    };
    if new == old {
        return Ok(old);
    }
    let loses_admin =
        old.role == Role::Admin && old.is_active && (new.role != Role::Admin || !new.is_active);
    if loses_admin {
        let others: i64 = tx
            .query_one(
                "SELECT count(*) FROM users WHERE role = 'admin' AND is_active AND id <> $1",
                &[&id],
            )
            .await?
            .get(0);
        if others == 0 {
            return Err(StoreError::Conflict(
                "cannot demote or deactivate the last active admin".into(),
            ));
        }
    }
    let row = tx
        .query_one(
            &format!(
                "UPDATE users SET email = $2, role = $3, tier = $4, is_active = $5, updated_at = now()
                 WHERE id = $1 RETURNING {USER_COLUMNS}"
            ),
            &[
                &id,
                &new.email,
                &new.role.as_str(),
                &new.tier.as_str(),
                &new.is_active,
            ],
        )
        .await?;
    let updated = user_from_row(&row)?;
    let (old_values, new_values) = changed_fields(&user_values(&old), &user_values(&updated));
    let action = AdminAction::new(AdminActionType::UserUpdate, actor.user_id)
        .target(id)
        .old_values(old_values)
        .new_values(new_values)
        .justification(actor.justification.clone());
    admin_actions::record(&tx, &action).await?;
    tx.commit().await?;
    Ok(updated)
}

/// The fields whose values differ, as (old, new) objects.
fn changed_fields(old: &Value, new: &Value) -> (Value, Value) {
    let (mut before, mut after) = (serde_json::Map::new(), serde_json::Map::new());
    if let (Some(old), Some(new)) = (old.as_object(), new.as_object()) {
        for (key, new_value) in new {
            let old_value = old.get(key).cloned().unwrap_or(Value::Null);
            if &old_value != new_value {
                before.insert(key.clone(), old_value);
                after.insert(key.clone(), new_value.clone());
            }
        }
    }
    (Value::Object(before), Value::Object(after))
}

pub async fn create_token(
    pool: &Pool,
    actor: &Actor,
    user_id: Uuid,
    name: &str,
    expires_at: Option<OffsetDateTime>,
) -> Result<IssuedToken, StoreError> {
    let token = NewToken::generate()?;
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.query_opt("SELECT 1 FROM users WHERE id = $1 FOR SHARE", &[&user_id])
        .await?
        .ok_or(StoreError::NotFound("user"))?;
    let info = insert_token(&*tx, user_id, name, expires_at, &token).await?;
    let action = AdminAction::new(AdminActionType::TokenCreate, actor.user_id)
        .target(user_id)
        .new_values(token_values(&info))
        .justification(actor.justification.clone());
    admin_actions::record(&tx, &action).await?;
    tx.commit().await?;
    Ok(IssuedToken {
        info,
        secret: token.secret,
    })
}

pub async fn list_tokens(pool: &Pool, user_id: Uuid) -> Result<Vec<TokenInfo>, StoreError> {
    let client = pool.get().await?;
    client
        .query_opt("SELECT 1 FROM users WHERE id = $1", &[&user_id])
        .await?
        .ok_or(StoreError::NotFound("user"))?;
    Ok(client
        .query(
            &format!(
                "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE user_id = $1 ORDER BY created_at, id"
            ),
            &[&user_id],
        )
        .await?
        .iter()
        .map(token_from_row)
        .collect())
}

/// Revokes a token. `Ok(None)` when it was already revoked: nothing changes
/// and nothing is recorded.
pub async fn revoke_token(
    pool: &Pool,
    actor: &Actor,
    token_id: Uuid,
) -> Result<Option<TokenInfo>, StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            &format!(
                "UPDATE api_tokens SET revoked_at = now()
                 WHERE id = $1 AND revoked_at IS NULL RETURNING {TOKEN_COLUMNS}"
            ),
            &[&token_id],
        )
        .await?;
    let Some(row) = row else {
        let exists = tx
            .query_opt("SELECT 1 FROM api_tokens WHERE id = $1", &[&token_id])
            .await?
            .is_some();
        return if exists {
            Ok(None)
        } else {
            Err(StoreError::NotFound("token"))
        };
    };
    let info = token_from_row(&row);
    let action = AdminAction::new(AdminActionType::TokenRevoke, actor.user_id)
        .target(info.user_id)
        .old_values(json!({ "token_id": info.id, "revoked": false }))
        .new_values(json!({ "token_id": info.id, "prefix": info.prefix, "revoked": true }))
        .justification(actor.justification.clone());
    admin_actions::record(&tx, &action).await?;
    tx.commit().await?;
    Ok(Some(info))
}

/// The caller a token stands for, if it is valid now; records its use.
pub async fn resolve_token(pool: &Pool, hash: &[u8; 32]) -> Result<Option<Caller>, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            "UPDATE api_tokens t SET last_used_at = now()
             FROM users u
             WHERE t.token_hash = $1 AND u.id = t.user_id
               AND t.revoked_at IS NULL
               AND (t.expires_at IS NULL OR t.expires_at > now())
               AND u.is_active
             RETURNING t.id AS token_id, u.id AS user_id, u.name, u.role, u.tier",
            &[&hash.as_slice()],
        )
        .await?;
    row.map(|row| {
        let role: String = row.get("role");
        let tier: String = row.get("tier");
        Ok(Caller {
            user_id: row.get("user_id"),
            name: row.get("name"),
            role: Role::parse(&role).ok_or_else(|| StoreError::Corrupt(format!("role {role}")))?,
            tier: Tier::parse(&tier).ok_or_else(|| StoreError::Corrupt(format!("tier {tier}")))?,
            token_id: row.get("token_id"),
        })
    })
    .transpose()
}

/// On a database with no active admin, creates the user `admin` with the
/// given token (or a generated one). Returns the generated token, which the
/// caller must show once; `None` when an admin exists or the token was given.
pub async fn bootstrap_admin(
    pool: &Pool,
    given_token: Option<&Secret>,
) -> Result<Option<Secret>, StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&USER_CHANGE_LOCK])
        .await?;
    let has_admin: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM users WHERE role = 'admin' AND is_active)",
            &[],
        )
        .await?
        .get(0);
    if has_admin {
        return Ok(None);
    }
    let token = match given_token {
        Some(secret) => NewToken::from_secret(secret.expose().to_owned()),
        None => NewToken::generate()?,
    };
    let row = tx
        .query_opt(
            &format!(
                "INSERT INTO users (id, name, role, tier) VALUES ($1, $2, 'admin', 'unlimited')
                 ON CONFLICT (name) DO NOTHING RETURNING {USER_COLUMNS}"
            ),
            &[&Uuid::now_v7(), &BOOTSTRAP_ADMIN],
        )
        .await?
        .ok_or_else(|| {
            StoreError::Conflict(format!(
                "there is no active admin, but the name '{BOOTSTRAP_ADMIN}' belongs to another user: make a user admin in the database"
            ))
        })?;
    let user = user_from_row(&row)?;
    let info = insert_token(&*tx, user.id, "bootstrap", None, &token)
        .await
        .map_err(|error| match &error {
            StoreError::Database(db) if db.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                StoreError::Conflict("the admin token is already in use".into())
            }
            _ => error,
        })?;
    let mut values = user_values(&user);
    values["token"] = token_values(&info);
    let action = AdminAction::new(AdminActionType::UserCreate, None)
        .target(user.id)
        .new_values(values)
        .justification(Some("bootstrap".into()));
    admin_actions::record(&tx, &action).await?;
    tx.commit().await?;
    tracing::info!(user_id = %user.id, "created the first admin user");
    Ok(given_token.is_none().then_some(token.secret))
}
