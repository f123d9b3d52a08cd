//! Records of what admins did (`audit_admin_actions`).

use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

/// The kinds of admin mutation Nox records. Host services may record their
/// own kinds through [`AdminActionType::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminActionType {
    UserCreate,
    UserUpdate,
    TokenCreate,
    TokenRevoke,
    QuotaUpdate,
    QuotaReset,
    LogExport,
    RetentionDrop,
    Other(&'static str),
}

impl AdminActionType {
    pub fn as_str(&self) -> &'static str {
        match self {
            AdminActionType::UserCreate => "user_create",
            AdminActionType::UserUpdate => "user_update",
            AdminActionType::TokenCreate => "token_create",
            AdminActionType::TokenRevoke => "token_revoke",
            AdminActionType::QuotaUpdate => "quota_update",
            AdminActionType::QuotaReset => "quota_reset",
            AdminActionType::LogExport => "log_export",
            AdminActionType::RetentionDrop => "retention_drop",
            AdminActionType::Other(name) => name,
        }
    }
}

/// One admin mutation. `old_values` and `new_values` must never hold
/// secrets: callers pass only the fields that describe the change.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminAction {
    pub id: Uuid,
    /// When the action was taken, in whole microseconds (as stored).
    pub timestamp: OffsetDateTime,
    /// `None` when the server itself acted (the first admin's bootstrap).
    pub admin_user_id: Option<Uuid>,
    pub target_user_id: Option<Uuid>,
    pub action_type: AdminActionType,
    pub old_values: Option<Value>,
    pub new_values: Option<Value>,
    pub justification: Option<String>,
}

impl AdminAction {
    /// A new action with a fresh time-ordered id (UUIDv7).
    pub fn new(action_type: AdminActionType, admin_user_id: Option<Uuid>) -> Self {
        AdminAction {
            id: Uuid::now_v7(),
            timestamp: crate::chain::to_micros(OffsetDateTime::now_utc()),
            admin_user_id,
            target_user_id: None,
            action_type,
            old_values: None,
            new_values: None,
            justification: None,
        }
    }

    pub fn target(mut self, user_id: Uuid) -> Self {
        self.target_user_id = Some(user_id);
        self
    }

    pub fn old_values(mut self, values: Value) -> Self {
        self.old_values = Some(values);
        self
    }

    pub fn new_values(mut self, values: Value) -> Self {
        self.new_values = Some(values);
        self
    }

    pub fn justification(mut self, justification: Option<String>) -> Self {
        self.justification = justification;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_are_the_documented_ones() {
        assert_eq!(AdminActionType::UserCreate.as_str(), "user_create");
        assert_eq!(AdminActionType::TokenRevoke.as_str(), "token_revoke");
        assert_eq!(AdminActionType::Other("custom").as_str(), "custom");
    }

    #[test]
    fn ids_are_time_ordered() {
        let first = AdminAction::new(AdminActionType::UserCreate, None);
        let second = AdminAction::new(AdminActionType::UserCreate, None);
        assert_eq!(first.id.get_version_num(), 7);
        assert!(first.id < second.id);
    }
}
