//! Where the read endpoints' queries run: on the primary, or on a streaming
//! replica ([`crate::AuditApi::read_replica`]) while it answers and is no
//! further behind than allowed. Each response says which served it and how
//! stale it may be ([`SOURCE_HEADER`], [`LAG_HEADER`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::HttpResponse;
use actix_web::HttpResponseBuilder;
use deadpool_postgres::{Object, Pool, PoolError, TimeoutType};
use nox_audit_metrics::ReadFallback;
use tokio::time::{Instant, timeout};

use crate::error::WebError;

/// `replica` or `primary`: which server answered.
pub const SOURCE_HEADER: &str = "X-Nox-Read-Source";
/// How stale the answer may be, in milliseconds: the replica's lag as
/// measured just before the read (`nox_audit_query::replica_lag`), 0 from
/// the primary.
pub const LAG_HEADER: &str = "X-Nox-Replica-Lag-Ms";

/// A replica that failed is left alone this long: reads go straight to the
/// primary instead of each waiting for a dead server.
const SET_ASIDE: Duration = Duration::from_secs(5);
/// The longest a replica may take to hand out a connection (past the
/// pool's own timeouts, which an embedder may not have set), and then to
/// say its lag.
const PATIENCE: Duration = Duration::from_secs(2);

/// The server a read ran on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadSource {
    Primary,
    /// With its lag in milliseconds, at most the allowed lag.
    Replica {
        lag_ms: i64,
    },
}

impl ReadSource {
    /// A 200 response carrying the source and lag headers.
    pub(crate) fn ok(self) -> HttpResponseBuilder {
        let (source, lag_ms) = match self {
            ReadSource::Primary => ("primary", 0),
            ReadSource::Replica { lag_ms } => ("replica", lag_ms),
        };
        let mut response = HttpResponse::Ok();
        response
            .insert_header((SOURCE_HEADER, source))
            .insert_header((LAG_HEADER, lag_ms.to_string()));
        response
    }
}

/// A connection for one read, and where it leads.
pub(crate) struct ReadConnection {
    pub(crate) client: Object,
    pub(crate) source: ReadSource,
}

/// The read side's servers; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Reads {
    primary: Pool,
    replica: Option<Arc<Replica>>,
}

#[derive(Debug)]
struct Replica {
    pool: Pool,
    max_lag_ms: i64,
    /// Until when the replica is left alone after a failure.
    set_aside_until: Mutex<Option<Instant>>,
}

impl Reads {
    /// Every read on the primary.
    pub(crate) fn primary(pool: Pool) -> Reads {
        Reads {
            primary: pool,
            replica: None,
        }
    }

    pub(crate) fn with_replica(self, pool: Pool, max_lag: Duration) -> Reads {
        Reads {
            replica: Some(Arc::new(Replica {
                pool,
                max_lag_ms: i64::try_from(max_lag.as_millis()).unwrap_or(i64::MAX),
                set_aside_until: Mutex::new(None),
            })),
            ..self
        }
    }

    /// The replica's connection when it is usable, else the primary's (and
    /// the fallback counted).
    pub(crate) async fn connection(&self) -> Result<ReadConnection, WebError> {
        if let Some(replica) = &self.replica {
            match replica.connection().await {
                Ok(read) => return Ok(read),
                Err(reason) => nox_audit_metrics::record_read_fallback(reason),
            }
        }
        Ok(ReadConnection {
            client: self.primary.get().await?,
            source: ReadSource::Primary,
        })
    }
}

impl Replica {
    async fn connection(&self) -> Result<ReadConnection, ReadFallback> {
        if self.is_set_aside() {
            return Err(ReadFallback::Unavailable);
        }
        let client = match timeout(PATIENCE, self.pool.get()).await {
            Ok(Ok(client)) => client,
            // Every connection busy: the replica is loaded, not down.
            Ok(Err(PoolError::Timeout(TimeoutType::Wait))) => {
                return Err(ReadFallback::Unavailable);
            }
            Ok(Err(error)) => return Err(self.set_aside(&error)),
            Err(_) => return Err(self.set_aside(&"no connection in time")),
        };
        match timeout(PATIENCE, nox_audit_query::replica_lag(&client)).await {
            Ok(Ok(Some(lag_ms))) if lag_ms <= self.max_lag_ms => Ok(ReadConnection {
                client,
                source: ReadSource::Replica { lag_ms },
            }),
            Ok(Ok(_)) => Err(ReadFallback::Lagging),
            Ok(Err(error)) => {
                drop(Object::take(client));
                Err(self.set_aside(&error))
            }
            Err(_) => {
                // Closes the connection: it may be stuck.
                drop(Object::take(client));
                Err(self.set_aside(&"no lag reading in time"))
            }
        }
    }

    fn is_set_aside(&self) -> bool {
        let until = self
            .set_aside_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        until.is_some_and(|until| Instant::now() < until)
    }

    fn set_aside(&self, error: &dyn std::fmt::Display) -> ReadFallback {
        let mut until = self
            .set_aside_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if until.is_none_or(|until| until <= now) {
            tracing::warn!(%error, seconds = SET_ASIDE.as_secs(), "the audit read replica is unavailable; reading from the primary");
        }
        *until = Some(now + SET_ASIDE);
        ReadFallback::Unavailable
    }
}
