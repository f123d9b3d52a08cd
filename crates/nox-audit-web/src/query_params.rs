//! A typed query string whose refusal is the crate's JSON error, whatever
//! `QueryConfig` the embedding app has (actix's own answer is plain text).
//!
//! utoipa cannot tell this extractor reads the query, so the parameter
//! structs say `#[into_params(parameter_in = Query)]` and mark their
//! optional fields `nullable`, as `web::Query` would have.

use std::ops::Deref;

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpRequest, web};
use futures_util::future::{Ready, ready};
use nox_audit_query::QueryError;
use serde::de::DeserializeOwned;

use crate::error::WebError;

/// Like `web::Query<T>`; a malformed parameter is 400 `invalid_parameter`
/// with the parser's message.
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<T> Deref for QueryParams<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: DeserializeOwned> FromRequest for QueryParams<T> {
    type Error = WebError;
    type Future = Ready<Result<Self, WebError>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(
            web::Query::<T>::from_query(request.query_string())
                .map(|query| QueryParams(query.into_inner()))
                .map_err(|error| QueryError::InvalidParameter(error.to_string()).into()),
        )
    }
}
