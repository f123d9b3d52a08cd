//! The servers sharing one database. Each writes a heartbeat row to
//! `servers` every [`HEARTBEAT`] and counts the rows seen within
//! [`LIVE_WITHIN`]. The count is this server's divisor of the per-user rate
//! limit ([`RateLimits::set_servers`]), so a user's rate holds for all
//! servers together when the balancer spreads their requests; and with
//! others about, workspace usage is measured again every
//! [`WORKSPACE_REMEASURE`], since they write to the same workspaces.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use deadpool_postgres::Pool;
use nox_quota::RateLimits;
use nox_sandbox::Workspaces;
use uuid::Uuid;

/// How often each server says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A server not heard from for this long no longer counts: three missed
/// heartbeats.
pub const LIVE_WITHIN: Duration = Duration::from_secs(6);
/// With other servers about, a workspace's usage is walked again when this
/// old: the storage and files quotas can be overrun by what the user writes
/// through the other servers within it.
pub const WORKSPACE_REMEASURE: Duration = Duration::from_secs(5);
/// Rows of servers gone this long are deleted (a server removes its own
/// row at shutdown; one killed leaves it behind).
const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// This server's membership: its heartbeat task and the live count.
#[derive(Debug)]
pub struct Membership {
    id: Uuid,
    pool: Pool,
    live: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl Membership {
    /// Starts the heartbeat. Until its first beat, this server counts
    /// itself alone.
    pub fn start(
        pool: Pool,
        rate_limits: Arc<RateLimits>,
        workspaces: Arc<Workspaces>,
    ) -> Membership {
        let id = Uuid::now_v7();
        let live = Arc::new(AtomicU32::new(1));
        let (task_pool, task_live) = (pool.clone(), Arc::clone(&live));
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(HEARTBEAT);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                match beat(&task_pool, id).await {
                    Ok(servers) => {
                        task_live.store(servers, Ordering::Relaxed);
                        crate::metrics::set_servers_live(servers);
                        if rate_limits.set_servers(servers) {
                            tracing::info!(
                                servers,
                                "live servers changed: each admits 1/{servers} of a user's rate"
                            );
                        }
                        workspaces.remeasure_every((servers > 1).then_some(WORKSPACE_REMEASURE));
                    }
                    // The last count stays in force: the others are most
                    // likely still there.
                    Err(error) => tracing::warn!(%error, "server heartbeat not written"),
                }
            }
        });
        Membership {
            id,
            pool,
            live,
            task,
        }
    }

    /// Servers live at the last heartbeat, this one included.
    pub fn live_servers(&self) -> u32 {
        self.live.load(Ordering::Relaxed)
    }

    /// Stops the heartbeat and removes this server's row, so the others
    /// take over its share at their next heartbeat.
    pub async fn shutdown(self) {
        self.task.abort();
        let result = async {
            let client = self.pool.get().await.map_err(|e| e.to_string())?;
            client
                .execute("DELETE FROM servers WHERE id = $1", &[&self.id])
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        if let Err(error) = result {
            tracing::warn!(%error, "this server's row in `servers` was not removed");
        }
        self.pool.close();
    }
}

/// Writes this server's heartbeat and returns how many servers are live.
async fn beat(pool: &Pool, id: Uuid) -> Result<u32, String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let host = host_name();
    client
        .execute(
            "INSERT INTO servers (id, host, pid, version) VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO UPDATE SET last_seen = now()",
            &[&id, &host, &(std::process::id() as i32), &crate::VERSION],
        )
        .await
        .map_err(|e| e.to_string())?;
    let row = client
        .query_one(
            "WITH forgotten AS (
                 DELETE FROM servers WHERE last_seen < now() - make_interval(secs => $2))
             SELECT count(*) FROM servers WHERE last_seen > now() - make_interval(secs => $1)",
            &[&LIVE_WITHIN.as_secs_f64(), &FORGET_AFTER.as_secs_f64()],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get::<_, i64>(0).clamp(1, i64::from(u32::MAX)) as u32)
}

/// This machine's name, for operators reading `servers`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_default()
}
