//! Classifying a request into an action type and category, from its method
//! and matched route template (never from a raw path prefix, so `/lsx` is
//! not `/ls`). The rules are plain data: another service passes its own.
//!
//! # The schema's fixed category vocabulary
//!
//! The audit schema's daily rollups (`audit_daily_summaries`, kept by the
//! statement trigger of migration `0003_audit_trail` and recomputed by
//! `audit_daily_summaries_recomputed`) count rows by fixed names, whatever
//! the taxonomy: category `filesystem` → `file_operations`, `execution` →
//! `code_executions`, `admin` → `admin_actions`; of successful rows, action
//! type `file_write` → `files_created` and `file_delete` → `files_deleted`
//! (the sum of `files_affected`). Any other category (`quota`, `auth`,
//! `general`, or an embedder's own) is stored, and counted only in the
//! totals. An embedder maps its routes onto these names, with its own
//! [`Rule`]s and the kinds below ([`FILE_READ`] … [`API_CALL`]), for its
//! rollups to count them; the names belong to the schema, and changing them
//! takes a migration.

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

pub const fn kind(action_type: &'static str, category: &'static str) -> ActionKind {
    ActionKind {
        action_type,
        category,
    }
}

pub const fn rule(method: Option<&'static str>, route: RouteMatch, kind: ActionKind) -> Rule {
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

/// A taxonomy with no rules: every request is [`API_CALL`]
/// (`api_call` / `general`). The middleware's default; a service passes its
/// own rules to classify its routes.
pub const GENERIC_TAXONOMY: Taxonomy = Taxonomy {
    rules: &[],
    fallback: API_CALL,
};

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Taxonomy = Taxonomy {
        rules: &[
            Rule {
                method: Some("GET"),
                route: RouteMatch::Under("/admin"),
                kind: ADMIN_READ,
            },
            Rule {
                method: None,
                route: RouteMatch::Exact("/ls"),
                kind: FILE_READ,
            },
        ],
        fallback: API_CALL,
    };

    #[test]
    fn the_first_matching_rule_decides_and_methods_ignore_case() {
        assert_eq!(RULES.classify("get", Some("/admin/users/{id}")), ADMIN_READ);
        assert_eq!(RULES.classify("POST", Some("/admin/users")), API_CALL);
        assert_eq!(RULES.classify("DELETE", Some("/ls")), FILE_READ);
        assert_eq!(RULES.classify("GET", None), API_CALL);
    }

    #[test]
    fn prefixes_match_whole_segments_only() {
        assert_eq!(RULES.classify("GET", Some("/lsx")), API_CALL);
        assert_eq!(RULES.classify("GET", Some("/administer")), API_CALL);
        assert_eq!(RULES.classify("GET", Some("/admin")), ADMIN_READ);
    }

    #[test]
    fn the_generic_taxonomy_calls_everything_an_api_call() {
        assert_eq!(GENERIC_TAXONOMY.classify("POST", Some("/run")), API_CALL);
        assert_eq!(GENERIC_TAXONOMY.classify("GET", None), API_CALL);
    }
}
