//! Nox's audit taxonomy: how each of its routes is classified in the audit
//! trail. The generic machinery ([`Taxonomy`], rules, the kinds) is
//! `nox-audit-model`'s; the rules are Nox's.

use nox_audit_model::taxonomy::{
    ADMIN_READ, ADMIN_WRITE, API_CALL, AUDIT_EXPORT, AUTH, CODE_EXEC, FILE_DELETE, FILE_READ,
    FILE_WRITE, QUOTA_CHECK, RouteMatch, Taxonomy, rule,
};

/// Nox's taxonomy: its routes, classified onto the categories the audit
/// schema's rollups count (see [`nox_audit_model::taxonomy`]).
pub const NOX_TAXONOMY: Taxonomy = Taxonomy {
    rules: &[
        rule(None, RouteMatch::Exact("/ls"), FILE_READ),
        rule(None, RouteMatch::Exact("/cat"), FILE_READ),
        rule(None, RouteMatch::Exact("/download"), FILE_READ),
        rule(None, RouteMatch::Exact("/write"), FILE_WRITE),
        rule(None, RouteMatch::Exact("/delete"), FILE_DELETE),
        rule(None, RouteMatch::Exact("/run"), CODE_EXEC),
        rule(None, RouteMatch::Exact("/admin/audit/export"), AUDIT_EXPORT),
        rule(Some("GET"), RouteMatch::Under("/admin"), ADMIN_READ),
        rule(Some("HEAD"), RouteMatch::Under("/admin"), ADMIN_READ),
        rule(None, RouteMatch::Under("/admin"), ADMIN_WRITE),
        rule(None, RouteMatch::Under("/quotas"), QUOTA_CHECK),
        rule(None, RouteMatch::Exact("/me"), AUTH),
    ],
    fallback: API_CALL,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nox_routes_classify_as_documented() {
        let cases = [
            ("GET", Some("/ls"), FILE_READ),
            ("GET", Some("/cat"), FILE_READ),
            ("GET", Some("/download"), FILE_READ),
            ("PUT", Some("/write"), FILE_WRITE),
            ("DELETE", Some("/delete"), FILE_DELETE),
            ("POST", Some("/run"), CODE_EXEC),
            ("GET", Some("/admin/audit/export"), AUDIT_EXPORT),
            ("GET", Some("/admin/users/{id}"), ADMIN_READ),
            ("get", Some("/admin/audit/logs"), ADMIN_READ),
            ("HEAD", Some("/admin/audit/logs"), ADMIN_READ),
            ("HEAD", Some("/ls"), FILE_READ),
            ("POST", Some("/admin/users"), ADMIN_WRITE),
            ("DELETE", Some("/admin/tokens/{id}"), ADMIN_WRITE),
            ("GET", Some("/quotas/my/usage"), QUOTA_CHECK),
            ("PUT", Some("/quotas/admin/users/{id}/quotas"), QUOTA_CHECK),
            ("GET", Some("/me"), AUTH),
            ("GET", Some("/openapi.json"), API_CALL),
            ("GET", None, API_CALL),
        ];
        for (method, route, expected) in cases {
            assert_eq!(
                NOX_TAXONOMY.classify(method, route),
                expected,
                "{method} {route:?}"
            );
        }
    }

    #[test]
    fn prefixes_match_whole_segments_only() {
        assert_eq!(NOX_TAXONOMY.classify("GET", Some("/lsx")), API_CALL);
        assert_eq!(NOX_TAXONOMY.classify("GET", Some("/runner")), API_CALL);
        assert_eq!(NOX_TAXONOMY.classify("GET", Some("/administer")), API_CALL);
        assert_eq!(NOX_TAXONOMY.classify("GET", Some("/quotas")), QUOTA_CHECK);
    }
}
