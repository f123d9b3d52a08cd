//! Activity per user, the daily rollups and the admin actions.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::{Date, OffsetDateTime};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::UserNames;
use crate::error::QueryError;
use crate::filter::{days_back, refuse_nul};
use crate::json_time;

/// A validated request for [`user_activity`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivityQuery {
    pub days: i32,
    pub min_actions: i64,
}

impl ActivityQuery {
    /// `days` back from now, 1 to 365 (default 7); users with fewer than
    /// `min_actions` (default 1, at least 0) are left out.
    pub fn new(days: Option<i64>, min_actions: Option<i64>) -> Result<Self, QueryError> {
        let days = days_back(days, 7)?;
        let min_actions = min_actions.unwrap_or(1);
        if min_actions < 0 {
            return Err(QueryError::InvalidParameter(
                "min_actions must be 0 or more".into(),
            ));
        }
        Ok(ActivityQuery { days, min_actions })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointCount {
    pub endpoint: String,
    pub count: i64,
}

/// One user's activity over the period.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UserActivity {
    pub user_id: Uuid,
    /// From the embedder's user table, if it named one.
    pub name: Option<String>,
    pub total_actions: i64,
    pub successful_actions: i64,
    pub failed_actions: i64,
    pub file_operations: i64,
    pub code_executions: i64,
    pub admin_actions: i64,
    pub quota_violations: i64,
    #[serde(with = "json_time::option")]
    pub first_activity: Option<OffsetDateTime>,
    #[serde(with = "json_time::option")]
    pub last_activity: Option<OffsetDateTime>,
    pub avg_response_time_ms: Option<f64>,
    pub total_cpu_ms: f64,
    pub unique_sessions: i64,
    /// The five most used endpoints, most used first.
    pub top_endpoints: Vec<EndpointCount>,
}

/// Activity per user, most active first, in one query.
pub async fn user_activity(
    client: &tokio_postgres::Client,
    query: &ActivityQuery,
    users: Option<&UserNames>,
) -> Result<Vec<UserActivity>, QueryError> {
    let (name, join) = match users {
        Some(users) => (format!("u.{}", users.name), users.join_on("p.user_id")),
        None => ("NULL::text".to_owned(), String::new()),
    };
    let sql = format!(
        "WITH recent AS (
             SELECT * FROM audit_actions
             WHERE user_id IS NOT NULL AND \"timestamp\" >= now() - make_interval(days => $1)
         ), per_user AS (
             SELECT user_id,
                    count(*) AS total_actions,
                    count(*) FILTER (WHERE success) AS successful_actions,
                    count(*) FILTER (WHERE NOT success) AS failed_actions,
                    count(*) FILTER (WHERE action_category = 'filesystem') AS file_operations,
                    count(*) FILTER (WHERE action_category = 'execution') AS code_executions,
                    count(*) FILTER (WHERE action_category = 'admin') AS admin_actions,
                    count(*) FILTER (WHERE quota_violation) AS quota_violations,
                    min(\"timestamp\") AS first_activity,
                    max(\"timestamp\") AS last_activity,
                    avg(response_time_ms) AS avg_response_time_ms,
                    coalesce(sum(cpu_time_ms), 0) AS total_cpu_ms,
                    count(DISTINCT session_id) AS unique_sessions
             FROM recent GROUP BY user_id
         ), endpoints AS (
             SELECT user_id, endpoint, count(*) AS n,
                    row_number() OVER (PARTITION BY user_id ORDER BY count(*) DESC, endpoint) AS rank
             FROM recent GROUP BY user_id, endpoint
         )
         SELECT p.*, {name} AS name,
                coalesce((SELECT jsonb_agg(jsonb_build_object('endpoint', e.endpoint, 'count', e.n) ORDER BY e.rank)
                          FROM endpoints e WHERE e.user_id = p.user_id AND e.rank <= 5), '[]'::jsonb) AS top_endpoints
         FROM per_user p{join}
         WHERE p.total_actions >= $2
         ORDER BY p.total_actions DESC, p.user_id"
    );
    let rows = client
        .query(&sql, &[&query.days, &query.min_actions])
        .await?;
    rows.iter().map(activity_row).collect()
}

fn activity_row(row: &Row) -> Result<UserActivity, QueryError> {
    let top_endpoints: Value = row.try_get("top_endpoints")?;
    Ok(UserActivity {
        user_id: row.try_get("user_id")?,
        name: row.try_get("name")?,
        total_actions: row.try_get("total_actions")?,
        successful_actions: row.try_get("successful_actions")?,
        failed_actions: row.try_get("failed_actions")?,
        file_operations: row.try_get("file_operations")?,
        code_executions: row.try_get("code_executions")?,
        admin_actions: row.try_get("admin_actions")?,
        quota_violations: row.try_get("quota_violations")?,
        first_activity: row.try_get("first_activity")?,
        last_activity: row.try_get("last_activity")?,
        avg_response_time_ms: row.try_get("avg_response_time_ms")?,
        total_cpu_ms: row.try_get("total_cpu_ms")?,
        unique_sessions: row.try_get("unique_sessions")?,
        top_endpoints: serde_json::from_value(top_endpoints).map_err(QueryError::internal)?,
    })
}

/// A validated request for [`daily_summaries`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummariesQuery {
    pub days: i32,
    pub user_id: Option<Uuid>,
}

impl SummariesQuery {
    /// `days` back from today, 1 to 365 (default 30); one user, or all.
    pub fn new(days: Option<i64>, user_id: Option<Uuid>) -> Result<Self, QueryError> {
        Ok(SummariesQuery {
            days: days_back(days, 30)?,
            user_id,
        })
    }
}

/// One user's (or the anonymous requests') rollup of one UTC day.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DailySummary {
    #[serde(with = "json_time::date")]
    pub summary_date: Date,
    pub user_id: Option<Uuid>,
    pub total_actions: i64,
    pub successful_actions: i64,
    pub failed_actions: i64,
    pub file_operations: i64,
    pub code_executions: i64,
    pub admin_actions: i64,
    pub quota_violations: i64,
    pub total_cpu_ms: Option<f64>,
    pub total_memory_mb: Option<f64>,
    pub files_created: i64,
    pub files_deleted: i64,
    pub sum_response_time_ms: Option<f64>,
    pub avg_response_time_ms: Option<f64>,
    pub max_response_time_ms: Option<f64>,
    pub unique_sessions: i64,
    #[serde(with = "json_time::option")]
    pub first_activity: Option<OffsetDateTime>,
    #[serde(with = "json_time::option")]
    pub last_activity: Option<OffsetDateTime>,
}

/// The daily rollups, newest date first.
pub async fn daily_summaries(
    client: &tokio_postgres::Client,
    query: &SummariesQuery,
) -> Result<Vec<DailySummary>, QueryError> {
    let rows = client
        .query(
            "SELECT * FROM audit_daily_summaries
             WHERE summary_date >= (now() AT TIME ZONE 'UTC')::date - $1::int
               AND ($2::uuid IS NULL OR user_id = $2)
             ORDER BY summary_date DESC, total_actions DESC, user_id NULLS FIRST",
            &[&query.days, &query.user_id],
        )
        .await?;
    rows.iter().map(summary_row).collect()
}

fn summary_row(row: &Row) -> Result<DailySummary, QueryError> {
    Ok(DailySummary {
        summary_date: row.try_get("summary_date")?,
        user_id: row.try_get("user_id")?,
        total_actions: row.try_get("total_actions")?,
        successful_actions: row.try_get("successful_actions")?,
        failed_actions: row.try_get("failed_actions")?,
        file_operations: row.try_get("file_operations")?,
        code_executions: row.try_get("code_executions")?,
        admin_actions: row.try_get("admin_actions")?,
        quota_violations: row.try_get("quota_violations")?,
        total_cpu_ms: row.try_get("total_cpu_ms")?,
        total_memory_mb: row.try_get("total_memory_mb")?,
        files_created: row.try_get("files_created")?,
        files_deleted: row.try_get("files_deleted")?,
        sum_response_time_ms: row.try_get("sum_response_time_ms")?,
        avg_response_time_ms: row.try_get("avg_response_time_ms")?,
        max_response_time_ms: row.try_get("max_response_time_ms")?,
        unique_sessions: row.try_get("unique_sessions")?,
        first_activity: row.try_get("first_activity")?,
        last_activity: row.try_get("last_activity")?,
    })
}

/// A validated request for [`admin_actions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminActionsQuery {
    pub days: i32,
    pub admin_user_id: Option<Uuid>,
    pub target_user_id: Option<Uuid>,
    pub admin_action_type: Option<String>,
}

impl AdminActionsQuery {
    /// `days` back from now, 1 to 365 (default 30), and exact matches.
    pub fn new(
        days: Option<i64>,
        admin_user_id: Option<Uuid>,
        target_user_id: Option<Uuid>,
        admin_action_type: Option<String>,
    ) -> Result<Self, QueryError> {
        let days = days_back(days, 30)?;
        if let Some(kind) = &admin_action_type {
            refuse_nul("admin_action_type", kind)?;
        }
        Ok(AdminActionsQuery {
            days,
            admin_user_id,
            target_user_id,
            admin_action_type,
        })
    }
}

/// An `audit_admin_actions` row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdminActionRow {
    pub id: Uuid,
    #[serde(with = "json_time::required")]
    pub timestamp: OffsetDateTime,
    pub admin_user_id: Option<Uuid>,
    pub target_user_id: Option<Uuid>,
    pub admin_action_type: String,
    pub old_values: Option<Value>,
    pub new_values: Option<Value>,
    pub justification: Option<String>,
}

/// The admin actions, newest first.
pub async fn admin_actions(
    client: &tokio_postgres::Client,
    query: &AdminActionsQuery,
) -> Result<Vec<AdminActionRow>, QueryError> {
    let rows = client
        .query(
            "SELECT id, \"timestamp\", admin_user_id, target_user_id, admin_action_type,
                    old_values, new_values, justification
             FROM audit_admin_actions
             WHERE \"timestamp\" >= now() - make_interval(days => $1)
               AND ($2::uuid IS NULL OR admin_user_id = $2)
               AND ($3::uuid IS NULL OR target_user_id = $3)
               AND ($4::text IS NULL OR admin_action_type = $4)
             ORDER BY \"timestamp\" DESC, id DESC",
            &[
                &query.days,
                &query.admin_user_id,
                &query.target_user_id,
                &query.admin_action_type,
            ],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok(AdminActionRow {
                id: row.try_get(0)?,
                timestamp: row.try_get(1)?,
                admin_user_id: row.try_get(2)?,
                target_user_id: row.try_get(3)?,
                admin_action_type: row.try_get(4)?,
                old_values: row.try_get(5)?,
                new_values: row.try_get(6)?,
                justification: row.try_get(7)?,
            })
        })
        .collect()
}
