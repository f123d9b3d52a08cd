//! The migration runner against a real PostgreSQL. These use their own
//! migrations table and tables so they never touch Nox's schema.

use nox_api::migrations::MIGRATIONS;
use nox_audit_store::{MigrateError, Migration, MigrationState, Migrator};
use nox_testkit::TestDb;

const TABLE: &str = "test_migrations";

const CREATE_A: Migration = Migration {
    version: 1,
    name: "create_a",
    sql: "CREATE TABLE t_a (id int PRIMARY KEY)",
};
const CREATE_B: Migration = Migration {
    version: 2,
    name: "create_b",
    sql: "CREATE TABLE t_b (id int PRIMARY KEY); INSERT INTO t_b VALUES (1)",
};

async fn recorded_versions(client: &tokio_postgres::Client) -> Vec<i64> {
    client
        .query(
            &format!("SELECT version FROM {TABLE} ORDER BY version"),
            &[],
        )
        .await
        .expect("query")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn up_applies_in_order_once_and_is_idempotent() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let migrator = Migrator::new(&[CREATE_A, CREATE_B]).with_table(TABLE);

    assert_eq!(
        migrator.up(&mut client).await.expect("first up"),
        vec![1, 2]
    );
    assert_eq!(
        migrator.up(&mut client).await.expect("second up"),
        Vec::<i64>::new()
    );
    assert_eq!(recorded_versions(&client).await, vec![1, 2]);
    let rows: i64 = client
        .query_one("SELECT count(*) FROM t_b", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 1, "the second up must not run create_b again");

    let status = migrator.status(&client).await.expect("status");
    assert!(status.iter().all(|s| s.state == MigrationState::Applied));
    assert!(status.iter().all(|s| s.applied_at.is_some()));
}

#[tokio::test]
async fn status_lists_pending_migrations_before_the_first_up() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let status = Migrator::new(&[CREATE_A, CREATE_B])
        .with_table(TABLE)
        .status(&client)
        .await
        .expect("status");
    assert_eq!(status.len(), 2);
    assert!(status.iter().all(|s| s.state == MigrationState::Pending));
}

#[tokio::test]
async fn a_changed_applied_migration_is_a_hard_error() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    Migrator::new(&[CREATE_A])
        .with_table(TABLE)
        .up(&mut client)
        .await
        .expect("up");

    let edited = Migration {
        sql: "CREATE TABLE t_a (id bigint PRIMARY KEY)",
        ..CREATE_A
    };
    let set = [edited, CREATE_B];
    let migrator = Migrator::new(&set).with_table(TABLE);
    let error = migrator.up(&mut client).await.expect_err("must refuse");
    assert!(
        matches!(error, MigrateError::ChecksumMismatch { version: 1, .. }),
        "{error}"
    );
    assert_eq!(
        recorded_versions(&client).await,
        vec![1],
        "nothing after the mismatch may be applied"
    );
    let status = migrator.status(&client).await.expect("status");
    assert_eq!(status[0].state, MigrationState::ChecksumMismatch);
    assert_eq!(status[1].state, MigrationState::Pending);
}

#[tokio::test]
async fn a_failing_migration_leaves_nothing_behind() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let broken = Migration {
        version: 2,
        name: "broken",
        sql: "CREATE TABLE t_broken (id int); SELECT 1 / 0",
    };
    let error = Migrator::new(&[CREATE_A, broken])
        .with_table(TABLE)
        .up(&mut client)
        .await
        .expect_err("division by zero");
    assert!(
        matches!(error, MigrateError::Failed { version: 2, .. }),
        "{error}"
    );
    assert_eq!(recorded_versions(&client).await, vec![1]);
    let exists: bool = client
        .query_one("SELECT to_regclass('t_broken') IS NOT NULL", &[])
        .await
        .expect("query")
        .get(0);
    assert!(!exists, "the failed migration's table must be rolled back");
}

#[tokio::test]
async fn concurrent_runs_apply_each_migration_once() {
    let db = TestDb::new().await;
    let set = [CREATE_A, CREATE_B];
    let runs = (0..4).map(|_| {
        let db = &db;
        async move {
            let mut client = db.client().await;
            Migrator::new(&set).with_table(TABLE).up(&mut client).await
        }
    });
    let results = futures_util::future::join_all(runs).await;
    let mut applied: Vec<i64> = Vec::new();
    for result in results {
        applied.extend(result.expect("every concurrent run succeeds"));
    }
    applied.sort();
    assert_eq!(
        applied,
        vec![1, 2],
        "each version applied by exactly one run"
    );
    assert_eq!(recorded_versions(&db.client().await).await, vec![1, 2]);
}

#[tokio::test]
async fn the_test_template_has_every_nox_migration_applied() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let status = Migrator::new(MIGRATIONS)
        .status(&client)
        .await
        .expect("status");
    assert_eq!(status.len(), MIGRATIONS.len());
    assert!(status.iter().all(|s| s.state == MigrationState::Applied));
}
