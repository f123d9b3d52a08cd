//! Users, roles, tiers and tokens as the API shows them.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;

/// Roles are ordered: an auditor can do what a user can, an admin what an
/// auditor can.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Auditor,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "user" => Some(Role::User),
            "auditor" => Some(Role::Auditor),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// Quota tiers; their limits are defined by the quotas feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Free,
    Standard,
    Premium,
    Developer,
    Unlimited,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Free => "free",
            Tier::Standard => "standard",
            Tier::Premium => "premium",
            Tier::Developer => "developer",
            Tier::Unlimited => "unlimited",
        }
    }

    pub fn parse(text: &str) -> Option<Tier> {
        match text {
            "free" => Some(Tier::Free),
            "standard" => Some(Tier::Standard),
            "premium" => Some(Tier::Premium),
            "developer" => Some(Tier::Developer),
            "unlimited" => Some(Tier::Unlimited),
            _ => None,
        }
    }

    /// The tier a new user of `role` gets when none is given.
    pub fn default_for(role: Role) -> Tier {
        match role {
            Role::Admin => Tier::Unlimited,
            Role::User | Role::Auditor => Tier::Standard,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct User {
    pub id: Uuid,
    pub name: String,
    pub email: Option<String>,
    pub role: Role,
    pub tier: Tier,
    pub is_active: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// A token as listed: never the secret, never its hash.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TokenInfo {
    pub id: Uuid,
    pub user_id: Uuid,
    pub prefix: String,
    pub name: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
}

/// Who is making a request: what a resolved token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user_id: Uuid,
    pub name: String,
    pub role: Role,
    pub tier: Tier,
    pub token_id: Uuid,
}

impl Caller {
    pub fn has_role(&self, minimum: Role) -> bool {
        self.role >= minimum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_by_privilege() {
        assert!(Role::Admin > Role::Auditor && Role::Auditor > Role::User);
        for role in [Role::User, Role::Auditor, Role::Admin] {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn tiers_round_trip_and_admins_default_to_unlimited() {
        for tier in [
            Tier::Free,
            Tier::Standard,
            Tier::Premium,
            Tier::Developer,
            Tier::Unlimited,
        ] {
            assert_eq!(Tier::parse(tier.as_str()), Some(tier));
        }
        assert_eq!(Tier::default_for(Role::Admin), Tier::Unlimited);
        assert_eq!(Tier::default_for(Role::User), Tier::Standard);
    }
}
