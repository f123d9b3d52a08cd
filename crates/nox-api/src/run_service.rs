//! What `POST /run` needs from the server: the launcher, probed once at
//! start-up (runs are served only with every isolation layer, unless
//! relaxed), each user's run uid, admission (two runs per user, a global
//! cap), what runs must not see, and the sweeping of what killed runs
//! leave behind.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nox_sandbox::run::{Layers, RunError, RunLimits, RunRequest, RunUser};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::config::{Config, RunIsolation, RunNetwork, UidRange};
use crate::error::ApiError;

/// Runs of one user at once.
const RUNS_PER_USER: usize = 2;
/// Processes one run may have at once (a fork bomb stops here).
const MAX_PROCESSES: u64 = 256;

/// What the server needs to run commands; built once at start-up.
#[derive(Debug)]
pub struct RunService {
    pub(crate) launcher: Option<PathBuf>,
    pub(crate) report_dir: PathBuf,
    /// The uids runs get, one per user (when the server is root).
    uid_range: Option<UidRange>,
    /// Users' uids, once read or allocated (they never change while the
    /// range stays).
    uids: Mutex<HashMap<Uuid, u32>>,
    /// What the command must not see: the data, checkpoint and key directories.
    pub(crate) hidden: Vec<PathBuf>,
    pub(crate) relaxed: bool,
    /// `NOX_MIN_FREE_MB`: a run that takes free space below it is stopped.
    min_free_mb: u64,
    /// cgroup v2: where runs' cgroups go (none: the v1 hierarchies).
    pub(crate) cgroup_parent: Option<PathBuf>,
    pub(crate) default_timeout: Duration,
    pub(crate) max_memory_mb: u64,
    output_limit: usize,
    allow_network: bool,
    global: Arc<Semaphore>,
    per_user: Mutex<HashMap<Uuid, usize>>,
    /// Whether runs can be served, found by a probe run at start-up.
    pub availability: Availability,
}

/// Whether `POST /run` serves on this server.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Availability {
    /// Every layer strict isolation needs is in force (or, relaxed, the
    /// launcher works with the layers listed).
    Ready {
        #[schema(value_type = Object)]
        layers: Layers,
        /// Layers missing and tolerated (`NOX_RUN_ISOLATION=relaxed`).
        missing: Vec<String>,
    },
    /// `POST /run` answers 503 `sandbox_unavailable`.
    Unavailable {
        missing: Vec<String>,
        detail: String,
    },
}

impl RunService {
    /// Finds the launcher and probes whether runs get every isolation
    /// layer; strict isolation refuses to serve without them.
    pub async fn start(config: &Config) -> anyhow::Result<RunService> {
        let launcher = config.sandbox_exec.clone().or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|dir| dir.join("nox-sandbox-exec")))
        });
        let launcher = launcher.filter(|path| path.is_file());
        let data_dir = std::fs::canonicalize(&config.storage.data_dir)?;
        let report_dir = data_dir.join("run-reports");
        std::fs::create_dir_all(&report_dir)?;
        // It must exist to be hidden from runs.
        std::fs::create_dir_all(config.storage.sandbox_dir())?;
        let uid_range = if nix::unistd::Uid::effective().is_root() {
            Some(checked_uid_range(config)?)
        } else {
            None
        };
        let relaxed = config.run_isolation == RunIsolation::Relaxed;
        if relaxed {
            tracing::warn!(
                "NOX_RUN_ISOLATION=relaxed: commands run with whatever isolation this host gives; \
                 tenants may reach each other, Nox's data and the database. Never use it in production."
            );
        }
        if std::env::var_os("NOX_RUN_USER").is_some() {
            tracing::warn!(
                "NOX_RUN_USER is no longer read: each user's commands run as a uid of their own \
                 from NOX_RUN_UID_RANGE"
            );
        }
        let cgroup_parent = if uid_range.is_some() {
            prepare_cgroup_v2(config)
        } else {
            None
        };
        let permits = config
            .run_max_concurrent
            .unwrap_or_else(|| 2 * std::thread::available_parallelism().map_or(1, |n| n.get()));
        let mut service = RunService {
            launcher,
            report_dir,
            uid_range,
            uids: Mutex::new(HashMap::new()),
            hidden: hidden_from_runs(&config.storage, data_dir),
            relaxed,
            min_free_mb: config.min_free_mb,
            cgroup_parent,
            default_timeout: Duration::from_secs(config.run_timeout_secs),
            max_memory_mb: config.run_max_memory_mb,
            output_limit: config.run_output_limit,
            allow_network: config.run_network == RunNetwork::Allow,
            global: Arc::new(Semaphore::new(permits)),
            per_user: Mutex::new(HashMap::new()),
            availability: Availability::Unavailable {
                missing: Vec::new(),
                detail: String::new(),
            },
        };
        service.availability = service.probe(config).await;
        match &service.availability {
            Availability::Ready { missing, .. } if !missing.is_empty() => {
                tracing::warn!(
                    ?missing,
                    "POST /run serves without these isolation layers (relaxed)"
                );
            }
            Availability::Ready { .. } => {}
            Availability::Unavailable { detail, .. } => {
                tracing::error!("POST /run is unavailable: {detail}");
            }
        }
        start_sweeping_leftovers(service.report_dir.clone(), service.cgroup_parent.clone());
        Ok(service)
    }

    /// The uids runs get, one per user (`None`: the server is not root).
    pub fn uid_range(&self) -> Option<UidRange> {
        self.uid_range
    }

    /// The layers of a probe run, when runs are served.
    pub fn layers(&self) -> Option<&Layers> {
        match &self.availability {
            Availability::Ready { layers, .. } => Some(layers),
            Availability::Unavailable { .. } => None,
        }
    }

    async fn probe(&self, config: &Config) -> Availability {
        let unavailable =
            |missing: Vec<String>, detail: String| Availability::Unavailable { missing, detail };
        let Some(launcher) = &self.launcher else {
            return unavailable(
                vec!["launcher".into()],
                "nox-sandbox-exec was not found (set NOX_SANDBOX_EXEC)".into(),
            );
        };
        let workspace = config.storage.data_dir.join("run-probe");
        if let Err(error) = std::fs::create_dir_all(&workspace) {
            return unavailable(Vec::new(), format!("the probe's workspace: {error}"));
        }
        let user = self.uid_range.map(|range| run_user(range.last));
        if let Some(user) = &user {
            let _ = nix::unistd::chown(
                &workspace,
                Some(nix::unistd::Uid::from_raw(user.uid)),
                Some(nix::unistd::Gid::from_raw(user.gid)),
            );
        }
        let request = RunRequest {
            workspace,
            command: "true".into(),
            stdin: None,
            limits: self.limits(Duration::from_secs(10), 64),
            user,
            hidden: self.hidden.clone(),
            relaxed: self.relaxed,
            cgroup_parent: self.cgroup_parent.clone(),
        };
        let never = std::future::pending();
        match nox_sandbox::run::run(launcher, &self.report_dir, &request, never).await {
            Ok(outcome) => {
                tracing::info!(cgroup = ?outcome.cgroup, "the command sandbox works");
                let missing = outcome.layers.missing(!self.allow_network);
                Availability::Ready {
                    layers: outcome.layers,
                    missing: missing.into_iter().map(String::from).collect(),
                }
            }
            Err(RunError::Unavailable(missing)) => {
                let detail = format!(
                    "the command sandbox lacks isolation layers: {} (see README, \"Isolation, and failing closed\"; \
                     NOX_RUN_ISOLATION=relaxed runs without them)",
                    missing.join(", ")
                );
                unavailable(missing, detail)
            }
            Err(error) => unavailable(
                Vec::new(),
                format!("the command sandbox does not work here: {error}"),
            ),
        }
    }

    /// The uid `user`'s commands run as, read or allocated once.
    pub(crate) async fn uid_of(
        &self,
        pool: &deadpool_postgres::Pool,
        user: Uuid,
    ) -> Result<Option<RunUser>, ApiError> {
        let Some(range) = self.uid_range else {
            return Ok(None);
        };
        if let Some(uid) = self
            .uids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&user)
        {
            return Ok(Some(run_user(*uid)));
        }
        let uid = nox_auth::run_uid::run_uid(pool, user, range.first..=range.last)
            .await
            .map_err(|error| match error {
                nox_auth::StoreError::Conflict(detail) => ApiError::SandboxUnavailable(detail),
                other => other.into(),
            })?;
        self.uids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(user, uid);
        Ok(Some(run_user(uid)))
    }

    pub(crate) fn limits(&self, timeout: Duration, memory_mb: u64) -> RunLimits {
        RunLimits {
            timeout,
            memory_mb,
            output_limit: self.output_limit,
            max_processes: MAX_PROCESSES,
            allow_network: self.allow_network,
            min_free_mb: self.min_free_mb,
        }
    }

    /// A slot for one run of `user`, or 429.
    pub(crate) fn admit(self: &Arc<Self>, user: Uuid) -> Result<RunSlot, ApiError> {
        let busy = || ApiError::RateLimited {
            detail: "too many commands are running; retry shortly".into(),
            retry_after_secs: 1,
        };
        let permit = Arc::clone(&self.global)
            .try_acquire_owned()
            .map_err(|_| busy())?;
        let mut per_user = self.per_user.lock().unwrap_or_else(|p| p.into_inner());
        let running = per_user.entry(user).or_insert(0);
        if *running >= RUNS_PER_USER {
            return Err(ApiError::RateLimited {
                detail: format!("at most {RUNS_PER_USER} of your commands run at once"),
                retry_after_secs: 1,
            });
        }
        *running += 1;
        Ok(RunSlot {
            service: Arc::clone(self),
            user,
            _permit: permit,
        })
    }
}

/// Frees the user's slot when the run ends (or the request is dropped).
pub(crate) struct RunSlot {
    service: Arc<RunService>,
    user: Uuid,
    _permit: OwnedSemaphorePermit,
}

impl Drop for RunSlot {
    fn drop(&mut self) {
        let mut per_user = self
            .service
            .per_user
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(running) = per_user.get_mut(&self.user) {
            *running -= 1;
            if *running == 0 {
                per_user.remove(&self.user);
            }
        }
    }
}

/// What runs must not see: the data directory, and the workspaces',
/// checkpoint and signing-key directories wherever they are configured
/// (a run's own workspace is mounted for it apart). A system
/// directory itself (`/etc`, say) cannot be covered without breaking runs:
/// a key kept directly there rests on its file permissions, as warned.
fn hidden_from_runs(storage: &crate::config::StorageConfig, data_dir: PathBuf) -> Vec<PathBuf> {
    let key_dir = storage.signing_key_file().parent().map(PathBuf::from);
    let mut hidden = vec![data_dir];
    for dir in [
        Some(storage.sandbox_dir()),
        Some(storage.checkpoint_dir()),
        key_dir,
    ]
    .into_iter()
    .flatten()
    {
        let Ok(dir) = std::fs::canonicalize(&dir) else {
            continue;
        };
        let depth = dir.components().count();
        if depth <= 2 {
            tracing::warn!(
                dir = %dir.display(),
                "a workspaces, checkpoint or signing-key directory directly under / cannot be hidden \
                 from runs: only its files' permissions protect them"
            );
        } else if !hidden.iter().any(|shown| dir.starts_with(shown)) {
            hidden.push(dir);
        }
    }
    hidden
}

/// The run user of uid `uid`: its own group, named after the uid.
fn run_user(uid: u32) -> RunUser {
    RunUser {
        name: format!("nox-{uid}"),
        uid,
        gid: uid,
    }
}

/// `NOX_RUN_UID_RANGE`, refused when it holds the server's uid, the
/// embedded PostgreSQL's, or any uid or gid this host has named (in
/// `/etc/passwd`, `/etc/group`): a run as one of them could read what that
/// user or group may (say, gid 42 `shadow`), since runs use the uid as gid.
fn checked_uid_range(config: &Config) -> anyhow::Result<UidRange> {
    let range = config.run_uid_range;
    let mut taken = vec![(
        "the server's uid".to_owned(),
        nix::unistd::Uid::effective().as_raw(),
    )];
    if config.storage.database_url.is_none() {
        taken.push((
            "the embedded PostgreSQL's uid".to_owned(),
            nox_pg_embed::service_uid()?,
        ));
    }
    for (file, what) in [("/etc/passwd", "user"), ("/etc/group", "group")] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if let (Some(name), Some(Ok(id))) =
                (fields.first(), fields.get(2).map(|id| id.parse::<u32>()))
            {
                taken.push((format!("the id of the host {what} {name}"), id));
            }
        }
    }
    if let Some((whose, id)) = taken.iter().find(|(_, id)| range.contains(*id)) {
        anyhow::bail!(
            "NOX_RUN_UID_RANGE {}-{} holds {whose} ({id}): choose a range no user, group or service of this host uses",
            range.first,
            range.last
        );
    }
    Ok(range)
}

/// On a cgroup v2 machine, prepares `NOX_CGROUP_PARENT` for runs (see
/// `nox_sandbox::cgroup`) and returns the directory runs' cgroups go under.
/// None on a v1 machine, or when it cannot be prepared (warned: runs then
/// have no cgroup limits, and their layers say so).
fn prepare_cgroup_v2(config: &Config) -> Option<PathBuf> {
    use nox_sandbox::cgroup;
    let root = std::path::Path::new(cgroup::CGROUP_ROOT);
    if !cgroup::is_unified(root) {
        return None;
    }
    let parent = &config.cgroup_parent;
    match cgroup::prepare(parent, cgroup::own_cgroup(root).as_deref()) {
        Ok(runs) => {
            if !(runs.memory && runs.pids) {
                tracing::warn!(
                    parent = %parent.display(),
                    memory = runs.memory,
                    pids = runs.pids,
                    "NOX_CGROUP_PARENT does not offer the memory and pids controllers: \
                     runs lack those cgroup limits (delegate them: Delegate=yes)"
                );
            }
            Some(runs.parent)
        }
        Err(error) => {
            tracing::warn!(%error, "cannot prepare NOX_CGROUP_PARENT: runs get no cgroups");
            None
        }
    }
}

/// Every minute, removes the cgroups and reports that runs whose launcher
/// was killed left behind (also those of a previous server process).
fn start_sweeping_leftovers(report_dir: PathBuf, cgroup_v2_parent: Option<PathBuf>) {
    use nox_sandbox::leftovers;
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            every.tick().await;
            let dir = report_dir.clone();
            let cgroup_v2_parent = cgroup_v2_parent.clone();
            let swept = tokio::task::spawn_blocking(move || {
                let cgroups = match &cgroup_v2_parent {
                    Some(parent) => leftovers::sweep_v2_cgroups(parent, leftovers::MIN_AGE),
                    None => leftovers::sweep_cgroups(
                        std::path::Path::new(leftovers::CGROUP_ROOT),
                        leftovers::MIN_AGE,
                    ),
                };
                (
                    cgroups,
                    leftovers::sweep_reports(&dir, leftovers::REPORT_MAX_AGE),
                )
            })
            .await;
            if let Ok((cgroups, reports)) = swept
                && cgroups + reports > 0
            {
                tracing::info!(cgroups, reports, "removed what killed runs left behind");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn a_range_holding_the_embedded_postgresqls_uid_is_refused() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: as another user, the cluster runs as the server's own uid");
            return;
        }
        let Ok(cluster) = nox_pg_embed::service_uid() else {
            eprintln!("skipped: no user for an embedded cluster here");
            return;
        };
        let mut config = Config::parse_from(["nox-server"]);
        config.storage.database_url = None;
        config.run_uid_range = UidRange {
            first: cluster,
            last: cluster + 10,
        };
        let error = checked_uid_range(&config).expect_err("overlaps the cluster");
        assert!(error.to_string().contains("embedded PostgreSQL"), "{error}");
        // Any id a host user or group holds (daemon and its group are 1).
        config.run_uid_range = UidRange { first: 1, last: 1 };
        let error = checked_uid_range(&config).expect_err("holds uid 1");
        assert!(error.to_string().contains("host"), "{error}");
        let config = Config::parse_from(["nox-server"]);
        assert!(checked_uid_range(&config).is_ok(), "the default range");
    }
}
