//! The uid each user's commands run as (`POST /run`): allocated once from
//! the server's range and kept, so a workspace keeps its owner. Several
//! servers on one database allocate without collisions (the uid column is
//! unique; a lost race is retried).

use std::ops::RangeInclusive;

use deadpool_postgres::Pool;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use crate::store::StoreError;

/// Allocation attempts when other servers take the same free uid meanwhile.
const ATTEMPTS: usize = 8;

/// The uid of `user` in `range`: the one already recorded, else the lowest
/// free one (a recorded uid outside a changed range is replaced).
pub async fn run_uid(
    pool: &Pool,
    user: Uuid,
    range: RangeInclusive<u32>,
) -> Result<u32, StoreError> {
    let (first, last) = (i64::from(*range.start()), i64::from(*range.end()));
    let client = pool.get().await?;
    for _ in 0..ATTEMPTS {
        let allocated = client
            .query_opt(
                "WITH free AS (
                     SELECT candidate FROM generate_series($2::bigint, $3::bigint) AS candidate
                      WHERE NOT EXISTS (SELECT 1 FROM run_uids WHERE uid = candidate)
                      LIMIT 1)
                 INSERT INTO run_uids (user_id, uid) SELECT $1, candidate FROM free
                 ON CONFLICT (user_id) DO UPDATE SET uid = EXCLUDED.uid
                  WHERE run_uids.uid NOT BETWEEN $2 AND $3
                 RETURNING uid",
                &[&user, &first, &last],
            )
            .await;
        match allocated {
            Ok(Some(row)) => return to_uid(row.get(0)),
            // Already recorded within the range, or the range is full.
            Ok(None) => {
                let kept: Option<i64> = client
                    .query_opt("SELECT uid FROM run_uids WHERE user_id = $1", &[&user])
                    .await?
                    .map(|row| row.get(0));
                return match kept {
                    Some(uid) if (first..=last).contains(&uid) => to_uid(uid),
                    _ => Err(StoreError::Conflict(format!(
                        "every uid of NOX_RUN_UID_RANGE ({first}-{last}) is taken"
                    ))),
                };
            }
            // Another server took that uid for another user first: again.
            Err(error) if error.code() == Some(&SqlState::UNIQUE_VIOLATION) => {}
            Err(error) => return Err(error.into()),
        }
    }
    Err(StoreError::Conflict(
        "no uid could be allocated: too many concurrent allocations".into(),
    ))
}

fn to_uid(value: i64) -> Result<u32, StoreError> {
    u32::try_from(value).map_err(|_| StoreError::Corrupt(format!("run uid {value}")))
}
