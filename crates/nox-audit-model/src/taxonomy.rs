//! Classifying a request into an action type and category, from its method
//! and matched route template (never from a raw path prefix, so `/lsx` is
//! not `/ls`). The rules are plain data: another service passes its own.

/// An action's type and category, e.g. `file_read` / `filesystem`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActionKind {
    pub action_type: &'static str,
    pub category: &'static str,
}

/// How a rule matches a route template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteMatch {
    /// The template equals this.
    Exact(&'static str),
    /// The template is this or lies below it (`/admin` matches `/admin` and
    /// `/admin/users/{id}`, not `/administer`).
    Under(&'static str),
}

impl RouteMatch {
    fn matches(&self, route: &str) -> bool {
        match self {
            RouteMatch::Exact(exact) => route == *exact,
            RouteMatch::Under(prefix) => {
                route == *prefix
                    || (route.starts_with(prefix) && route[prefix.len()..].starts_with('/'))
            }
        }
    }
}

/// One rule: the first rule that matches decides.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// `None` matches any method.
    pub method: Option<&'static str>,
    pub route: RouteMatch,
    pub kind: ActionKind,
}

/// An ordered list of rules and the kind for requests no rule matches.
#[derive(Debug, Clone, Copy)]
pub struct Taxonomy {
    pub rules: &'static [Rule],
    pub fallback: ActionKind,
}

impl Taxonomy {
    /// `route` is the matched route template, or `None` for an unmatched
    /// request.
    pub fn classify(&self, method: &str, route: Option<&str>) -> ActionKind {
        let Some(route) = route else {
            return self.fallback;
        };
        self.rules
            .iter()
            .find(|rule| {
                rule.method.is_none_or(|m| m.eq_ignore_ascii_case(method))
                    && rule.route.matches(route)
            })
            .map_or(self.fallback, |rule| rule.kind)
    }
}

const fn kind(action_type: &'static str, category: &'static str) -> ActionKind {
    ActionKind {
        action_type,
        category,
    }
}

const fn rule(method: Option<&'static str>, route: RouteMatch, kind: ActionKind) -> Rule {
    Rule {
        method,
        route,
        kind,
    }
}

pub const FILE_READ: ActionKind = kind("file_read", "filesystem");
pub const FILE_WRITE: ActionKind = kind("file_write", "filesystem");
pub const FILE_DELETE: ActionKind = kind("file_delete", "filesystem");
pub const CODE_EXEC: ActionKind = kind("code_exec", "execution");
pub const AUDIT_EXPORT: ActionKind = kind("audit_export", "admin");
pub const ADMIN_READ: ActionKind = kind("admin_read", "admin");
pub const ADMIN_WRITE: ActionKind = kind("admin_write", "admin");
pub const QUOTA_CHECK: ActionKind = kind("quota_check", "quota");
pub const AUTH: ActionKind = kind("auth", "auth");
pub const API_CALL: ActionKind = kind("api_call", "general");

/// Nox's own taxonomy.
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
