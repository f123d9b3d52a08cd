//! The embedder's authorization hook: who may read the trail, who may
//! export it, and who they are (recorded with each export).

use actix_web::{FromRequest, HttpRequest, dev::Payload, web};
use uuid::Uuid;

use crate::AuditApi;

/// What a request wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Any endpoint but the export.
    Read,
    /// `GET /admin/audit/export`.
    Export,
}

/// The caller, as the hook vouches for them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reader {
    /// Recorded as the `admin_user_id` of the export's `log_export` action.
    pub user_id: Option<Uuid>,
}

/// Decides who may use the endpoints. Refusals are `actix_web::Error`s, so
/// the embedder answers them in its own format (status, body, headers).
///
/// The two steps keep the order of answers an API usually has: an unknown
/// caller is refused (401) before any parameter is read, and a known caller
/// without the right (403) before the handler validates its parameters
/// (400); a typed query parameter actix cannot parse is refused before
/// `authorize` runs.
pub trait Authorize: Send + Sync + 'static {
    /// Runs before the parameters are parsed: refuse unauthenticated
    /// requests here. By default everyone passes.
    fn authenticate(&self, request: &HttpRequest) -> Result<(), actix_web::Error> {
        let _ = request;
        Ok(())
    }

    /// Whether the request may have `access`, and who asks.
    fn authorize(&self, request: &HttpRequest, access: Access) -> Result<Reader, actix_web::Error>;

    /// The reason given for an export, recorded with it (asked after the
    /// parameters were validated). By default none.
    fn justification(&self, request: &HttpRequest) -> Result<Option<String>, actix_web::Error> {
        let _ = request;
        Ok(None)
    }
}

/// A closure is a hook that authorizes in one step.
impl<F> Authorize for F
where
    F: Fn(&HttpRequest, Access) -> Result<Reader, actix_web::Error> + Send + Sync + 'static,
{
    fn authorize(&self, request: &HttpRequest, access: Access) -> Result<Reader, actix_web::Error> {
        self(request, access)
    }
}

/// The extractor that runs [`Authorize::authenticate`], placed before the
/// handlers' parameter extractors.
#[derive(Debug)]
pub(crate) struct Authenticated;

impl FromRequest for Authenticated {
    type Error = actix_web::Error;
    type Future = std::future::Ready<Result<Self, Self::Error>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        let result = match request.app_data::<web::Data<AuditApi>>() {
            Some(api) => api.authorize.authenticate(request).map(|()| Authenticated),
            None => Err(actix_web::error::ErrorInternalServerError(
                "nox-audit-web: no AuditApi in the app data",
            )),
        };
        std::future::ready(result)
    }
}
