//! `GET /me`: the caller's own user record.

use actix_web::{HttpResponse, get, web};
use nox_auth::User;
use nox_auth::store;

use crate::auth::Authenticated;
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

#[utoipa::path(
    responses(
        (status = 200, description = "The caller's user record", body = User),
        (status = 401, description = "No valid token", body = ErrorBody),
    ),
    security(("bearer" = [])),
    tag = "users"
)]
#[get("/me")]
pub async fn me(
    caller: Authenticated,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let user = store::get_user(&state.pool, caller.0.user_id).await?;
    Ok(HttpResponse::Ok().json(user))
}
