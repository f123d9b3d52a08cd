//! `GET /console`: the auditor's console, a page, its script, its style and
//! its icon, all built into the binary (no CDN, no external font: it works
//! on an air-gapped network). The page signs in with a pasted token and
//! calls the admin audit API with it; it is plain HTML, CSS and JavaScript
//! in `crates/nox-api/console/`, with no build step.
//!
//! Every response carries a strict Content-Security-Policy (scripts and
//! styles from this origin only: no inline script, style or handler, no
//! `eval`), `X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer`
//! and `X-Frame-Options: DENY`. Caching: each file has a strong `ETag` (a
//! digest of its bytes) and `Cache-Control: no-cache`, so a browser keeps
//! its copy but revalidates it at each load (a `304` when unchanged) and an
//! upgraded server is never masked by a stale script.
//!
//! The files are neither audited nor rate limited ([`is_asset`] is in the
//! audit layer's skip paths and the admission's exemptions): the console's
//! API calls are audited like any other. Unknown files under `/console/`
//! are an audited JSON 404. The console is not an API endpoint, so it is not
//! in the OpenAPI document.

use std::sync::LazyLock;

use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// The page's Content-Security-Policy.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One file of the console.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const INDEX: &[u8] = include_bytes!("../../console/index.html");

/// Every file, by the exact path it is served at.
const ASSETS: &[Asset] = &[
    Asset {
        path: "/console",
        content_type: "text/html; charset=utf-8",
        body: INDEX,
    },
    Asset {
        path: "/console/",
        content_type: "text/html; charset=utf-8",
        body: INDEX,
    },
    Asset {
        path: "/console/console.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../console/console.js"),
    },
    Asset {
        path: "/console/console.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../console/console.css"),
    },
    Asset {
        path: "/console/favicon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../../console/favicon.svg"),
    },
];

/// Each asset's `ETag`, in [`ASSETS`]' order: a quoted prefix of the
/// SHA-256 of its bytes.
static ETAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|asset| format!("\"{}\"", &hex::encode(Sha256::digest(asset.body))[..20]))
        .collect()
});

/// The exact paths the console's files are served at.
pub fn asset_paths() -> impl Iterator<Item = &'static str> {
    ASSETS.iter().map(|asset| asset.path)
}

/// Whether `path` is one of the console's files (not audited, not limited).
pub fn is_asset(path: &str) -> bool {
    asset_paths().any(|p| p == path)
}

/// Registers `/console`, `/console/` and `/console/{file}`, for GET and HEAD.
pub fn routes(config: &mut web::ServiceConfig) {
    config.service(
        web::resource(["/console", "/console/", "/console/{file}"])
            .route(web::get().to(asset))
            .route(web::head().to(asset)),
    );
}

/// The headers every console response carries.
const SECURITY_HEADERS: &[(&str, &str)] = &[
    ("content-security-policy", CONTENT_SECURITY_POLICY),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
];

fn secure(mut response: HttpResponse) -> HttpResponse {
    for (name, value) in SECURITY_HEADERS {
        response.headers_mut().insert(
            header::HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    response
}

/// Whether an `If-None-Match` header names `etag` (or is `*`).
fn matches(if_none_match: &HeaderValue, etag: &str) -> bool {
    if_none_match.to_str().is_ok_and(|value| {
        value.split(',').map(str::trim).any(|tag| {
            tag == "*" || tag == etag || tag.strip_prefix("W/").is_some_and(|t| t == etag)
        })
    })
}

async fn asset(request: HttpRequest) -> HttpResponse {
    let Some(index) = ASSETS.iter().position(|a| a.path == request.path()) else {
        return secure(ApiError::NotFound("no such file in the console".into()).error_response());
    };
    let (asset, etag) = (&ASSETS[index], ETAGS[index].as_str());
    let fresh = request
        .headers()
        .get(header::IF_NONE_MATCH)
        .is_some_and(|value| matches(value, etag));
    let mut builder = match fresh {
        true => HttpResponse::NotModified(),
        false => HttpResponse::Ok(),
    };
    builder
        .insert_header((header::ETAG, etag))
        .insert_header((header::CACHE_CONTROL, "no-cache"));
    secure(match fresh {
        true => builder.finish(),
        false => builder.content_type(asset.content_type).body(asset.body),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_lists_and_weak_tags_match() {
        let etag = "\"abc\"";
        let check = |value: &'static str| matches(&HeaderValue::from_static(value), etag);
        assert!(check("\"abc\""));
        assert!(check("\"x\", \"abc\""));
        assert!(check("W/\"abc\""));
        assert!(check("*"));
        assert!(!check("\"abd\""));
        assert!(!check(""));
    }

    #[test]
    fn the_page_loads_only_its_own_files_and_has_no_inline_code() {
        let page = std::str::from_utf8(INDEX).expect("utf-8");
        for asset in ASSETS.iter().filter(|a| a.path.contains('.')) {
            assert!(
                page.contains(asset.path),
                "{} is not referenced",
                asset.path
            );
        }
        // Nothing the CSP would refuse: no inline script or style, no
        // handler attribute, nothing from another origin.
        let lower = page.to_ascii_lowercase();
        for refused in [
            " style=",
            "<style",
            " on",
            "javascript:",
            "http:",
            "https:",
            "//",
        ] {
            let allowed = refused == " on" && !has_handler_attribute(&lower);
            assert!(
                allowed || !lower.contains(refused),
                "{refused:?} in the page"
            );
        }
        assert_eq!(
            lower.matches("<script").count(),
            lower.matches("<script src=\"/console/console.js\"").count(),
            "only the console's script"
        );
    }

    /// ` onclick=`, ` onerror=`, …: an attribute named `on…` with a value.
    fn has_handler_attribute(page: &str) -> bool {
        page.match_indices(" on").any(|(at, _)| {
            let name: String = page[at + 1..]
                .chars()
                .take_while(|c| c.is_ascii_alphabetic())
                .collect();
            name.len() > 2 && page[at + 1 + name.len()..].starts_with('=')
        })
    }

    #[test]
    fn the_script_never_parses_html_from_strings() {
        let script = std::str::from_utf8(ASSETS[2].body).expect("utf-8");
        for refused in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
            "setAttribute('style'",
            "setAttribute(\"style\"",
        ] {
            assert!(!script.contains(refused), "{refused} in console.js");
        }
    }
}
