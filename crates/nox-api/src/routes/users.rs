//! The admin API for users and tokens (`/admin/users/*`, `/admin/tokens/*`).

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, delete, get, patch, post, web};
use nox_auth::store::{self, Actor, NewUser, UserPatch};
use nox_auth::{Role, Tier, TokenInfo, User};
use serde::{Deserialize, Deserializer, Serialize};
use time::{Duration, OffsetDateTime};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Authenticated;
use crate::error::{ApiError, ErrorBody, refuse_nul};
use crate::state::AppState;

/// Why an admin made a change, recorded with it.
pub const JUSTIFICATION_HEADER: &str = "x-nox-justification";
const MAX_JUSTIFICATION_CHARS: usize = 1000;
const MAX_EMAIL_CHARS: usize = 254;
const MAX_TOKEN_NAME_CHARS: usize = 128;
const MAX_TOKEN_DAYS: u32 = 3650;

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .service(create_user)
        .service(list_users)
        .service(get_user)
        .service(update_user)
        .service(create_token)
        .service(list_tokens)
        .service(revoke_token);
}

/// The optional `X-Nox-Justification` header, checked.
pub fn justification(request: &HttpRequest) -> Result<Option<String>, ApiError> {
    let Some(value) = request.headers().get(JUSTIFICATION_HEADER) else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| {
        ApiError::InvalidParameter("X-Nox-Justification must be visible ASCII".into())
    })?;
    if text.chars().count() > MAX_JUSTIFICATION_CHARS {
        return Err(ApiError::InvalidParameter(format!(
            "X-Nox-Justification is longer than {MAX_JUSTIFICATION_CHARS} characters"
        )));
    }
    Ok(Some(text.to_owned()))
}

fn actor(request: &HttpRequest, admin: &nox_auth::Caller) -> Result<Actor, ApiError> {
    Ok(Actor {
        user_id: Some(admin.user_id),
        justification: justification(request)?,
    })
}

fn validate_name(name: &str) -> Result<(), ApiError> {
    let valid = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(ApiError::InvalidParameter(
            "name must be 1-64 characters of a-z, 0-9, '_', '.' and '-'".into(),
        ))
    }
}

fn validate_email(email: &Option<String>) -> Result<(), ApiError> {
    match email {
        Some(email)
            if email.chars().count() > MAX_EMAIL_CHARS
                || !email.contains('@')
                || email.chars().any(|c| c.is_whitespace() || c.is_control()) =>
        {
            Err(ApiError::InvalidParameter(
                "email must look like name@domain and be at most 254 characters".into(),
            ))
        }
        _ => Ok(()),
    }
}

/// Distinguishes an absent field (`None`) from an explicit `null`
/// (`Some(None)`), for partial updates.
pub fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUserRequest {
    /// 1 to 64 of `a-z`, `0-9`, `_`, `.` and `-`.
    #[schema(pattern = "^[a-z0-9_.-]{1,64}$", min_length = 1, max_length = 64)]
    pub name: String,
    pub role: Option<Role>,
    /// At most 254 characters with an `@`, no spaces or control characters.
    #[schema(
        max_length = 254,
        pattern = "^[^\\s\\u0000-\\u001f\\u007f-\\u009f]*@[^\\s\\u0000-\\u001f\\u007f-\\u009f]*$"
    )]
    pub email: Option<String>,
    /// Defaults to `standard`, or `unlimited` for admins.
    pub tier: Option<Tier>,
}

/// A new user and its first token (shown only here).
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedUser {
    #[serde(flatten)]
    pub user: User,
    pub token: String,
}

#[utoipa::path(
    request_body = CreateUserRequest,
    params(("X-Nox-Justification" = Option<String>, Header, description = "Why, for the audit trail")),
    responses(
        (status = 201, description = "Created; the token is shown only now", body = CreatedUser),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody),
    ),
    security(("bearer" = [])),
    tag = "admin"
)]
#[post("/admin/users")]
pub async fn create_user(
    caller: Authenticated,
    request: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<CreateUserRequest>,
) -> Result<HttpResponse, ApiError> {
    let admin = caller.require(Role::Admin)?;
    let actor = actor(&request, admin)?;
    let body = body.into_inner();
    validate_name(&body.name)?;
    validate_email(&body.email)?;
    let role = body.role.unwrap_or(Role::User);
    let new = NewUser {
        name: body.name,
        email: body.email,
        role,
        tier: body.tier.unwrap_or(Tier::default_for(role)),
    };
    let (user, token) = store::create_user(&state.pool, &actor, &new).await?;
    Ok(HttpResponse::Created().json(CreatedUser {
        user,
        token: token.secret.expose().to_owned(),
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserList {
    pub users: Vec<User>,
}

#[utoipa::path(
    responses((status = 200, body = UserList), (status = 403, body = ErrorBody)),
    security(("bearer" = [])),
    tag = "admin"
)]
#[get("/admin/users")]
pub async fn list_users(
    caller: Authenticated,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Auditor)?;
    let users = store::list_users(&state.pool).await?;
    Ok(HttpResponse::Ok().json(UserList { users }))
}

#[utoipa::path(
    params(("id" = Uuid, Path)),
    responses((status = 200, body = User), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])),
    tag = "admin"
)]
#[get("/admin/users/{id}")]
pub async fn get_user(
    caller: Authenticated,
    state: web::Data<AppState>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Auditor)?;
    let user = store::get_user(&state.pool, id.into_inner()).await?;
    Ok(HttpResponse::Ok().json(user))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUserRequest {
    pub role: Option<Role>,
    pub is_active: Option<bool>,
    pub tier: Option<Tier>,
    /// `null` removes the email; else as when creating the user.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, max_length = 254, pattern = "^[^\\s\\u0000-\\u001f\\u007f-\\u009f]*@[^\\s\\u0000-\\u001f\\u007f-\\u009f]*$")]
    pub email: Option<Option<String>>,
}

#[utoipa::path(
    params(("id" = Uuid, Path), ("X-Nox-Justification" = Option<String>, Header)),
    request_body = UpdateUserRequest,
    responses(
        (status = 200, body = User), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "Would leave no active admin", body = ErrorBody),
    ),
    security(("bearer" = [])),
    tag = "admin"
)]
#[patch("/admin/users/{id}")]
pub async fn update_user(
    caller: Authenticated,
    request: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<Uuid>,
    body: web::Json<UpdateUserRequest>,
) -> Result<HttpResponse, ApiError> {
    let admin = caller.require(Role::Admin)?;
    let actor = actor(&request, admin)?;
    let body = body.into_inner();
    if let Some(email) = &body.email {
        validate_email(email)?;
    }
    let patch = UserPatch {
        email: body.email,
        role: body.role,
        tier: body.tier,
        is_active: body.is_active,
    };
    let id = id.into_inner();
    let user = store::update_user(&state.pool, &actor, id, &patch).await?;
    // Role and activity are cached with the token: apply the change now.
    state.authenticator.forget_user(id);
    Ok(HttpResponse::Ok().json(user))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// At most 128 characters.
    #[schema(max_length = 128)]
    pub name: Option<String>,
    /// 1 to 3650; no expiry when absent.
    #[schema(minimum = 1, maximum = 3650)]
    pub expires_in_days: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    pub id: Uuid,
    /// Shown only now.
    pub token: String,
    pub prefix: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
}

#[utoipa::path(
    params(("id" = Uuid, Path), ("X-Nox-Justification" = Option<String>, Header)),
    request_body(content = Option<CreateTokenRequest>, description = "Optional; an empty body is allowed"),
    responses((status = 201, body = CreatedToken), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])),
    tag = "admin"
)]
#[post("/admin/users/{id}/tokens")]
pub async fn create_token(
    caller: Authenticated,
    request: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<Uuid>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let admin = caller.require(Role::Admin)?;
    let actor = actor(&request, admin)?;
    // No body, or `null`, as documented: the defaults.
    let body: CreateTokenRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CreateTokenRequest::default()
    } else {
        serde_json::from_slice::<Option<CreateTokenRequest>>(&body)
            .map_err(|error| ApiError::InvalidParameter(format!("invalid JSON body: {error}")))?
            .unwrap_or_default()
    };
    let name = body.name.unwrap_or_default();
    if name.chars().count() > MAX_TOKEN_NAME_CHARS {
        return Err(ApiError::InvalidParameter(format!(
            "name is longer than {MAX_TOKEN_NAME_CHARS} characters"
        )));
    }
    refuse_nul("name", &name)?;
    let expires_at = match body.expires_in_days {
        None => None,
        Some(days @ 1..=MAX_TOKEN_DAYS) => {
            Some(OffsetDateTime::now_utc() + Duration::days(i64::from(days)))
        }
        Some(_) => {
            return Err(ApiError::InvalidParameter(format!(
                "expires_in_days must be between 1 and {MAX_TOKEN_DAYS}"
            )));
        }
    };
    let issued =
        store::create_token(&state.pool, &actor, id.into_inner(), &name, expires_at).await?;
    Ok(HttpResponse::Created().json(CreatedToken {
        id: issued.info.id,
        token: issued.secret.expose().to_owned(),
        prefix: issued.info.prefix,
        created_at: issued.info.created_at,
        expires_at: issued.info.expires_at,
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenInfo>,
}

#[utoipa::path(
    params(("id" = Uuid, Path)),
    responses((status = 200, body = TokenList), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])),
    tag = "admin"
)]
#[get("/admin/users/{id}/tokens")]
pub async fn list_tokens(
    caller: Authenticated,
    state: web::Data<AppState>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Admin)?;
    let tokens = store::list_tokens(&state.pool, id.into_inner()).await?;
    Ok(HttpResponse::Ok().json(TokenList { tokens }))
}

#[utoipa::path(
    params(("id" = Uuid, Path), ("X-Nox-Justification" = Option<String>, Header)),
    responses((status = 204, description = "Revoked (or already revoked)"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])),
    tag = "admin"
)]
#[delete("/admin/tokens/{id}")]
pub async fn revoke_token(
    caller: Authenticated,
    request: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    let admin = caller.require(Role::Admin)?;
    let actor = actor(&request, admin)?;
    let id = id.into_inner();
    store::revoke_token(&state.pool, &actor, id).await?;
    state.authenticator.forget_token(id);
    Ok(HttpResponse::new(StatusCode::NO_CONTENT))
}
