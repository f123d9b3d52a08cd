//! The audit writer's buffered mode: submissions do not wait, the writer
//! lingers for a batch to fill, and shutdown drains what is queued.

use std::time::Duration;

use nox_audit_model::ActionRecord;
use nox_audit_store::{Spool, WriterConfig};
use nox_testkit::TestDb;
use uuid::Uuid;

#[tokio::test]
async fn buffered_records_linger_into_one_batch_and_shutdown_drains_them() {
    let db = TestDb::new().await;
    let spool_dir = tempfile::tempdir().expect("tempdir");
    let writer = db.audit_writer(
        Spool::open(spool_dir.path()).expect("spool"),
        WriterConfig {
            // Long enough that the submissions below always fit in it.
            linger: Duration::from_millis(500),
            ..WriterConfig::default()
        },
    );
    let sink = writer.sink();
    // A first record, waited for: the writer is running and idle.
    let warm_up = ActionRecord::arrived(
        Uuid::now_v7(),
        time::OffsetDateTime::now_utc(),
        "GET",
        "/warm-up",
    );
    sink.submit(warm_up, true).await.expect("committed");
    for _ in 0..100 {
        let record =
            ActionRecord::arrived(Uuid::now_v7(), time::OffsetDateTime::now_utc(), "GET", "/x");
        sink.submit(record, false).await.expect("queued");
    }
    let written = "SELECT count(*) FROM audit_actions WHERE endpoint = '/x'";
    assert_eq!(
        db.scalar(written).await,
        0,
        "submissions did not wait, and the writer is still lingering"
    );
    writer.shutdown().await;
    assert_eq!(db.scalar(written).await, 100);
    // Each batch is one transaction, so its rows share one xmin.
    assert_eq!(
        db.scalar("SELECT count(DISTINCT xmin::text) FROM audit_actions WHERE endpoint = '/x'")
            .await,
        1,
        "the 100 records were written as one batch"
    );
}
