//! Audit sessions with several servers on one database: one session per
//! (user, token) whichever server a request reaches, found or opened in the
//! database, its idleness judged on the last activity written there.

use std::sync::Arc;
use std::time::Duration as StdDuration;

use futures_util::future::join_all;
use nox_audit_model::ActionRecord;
use nox_audit_store::sessions::SessionRow;
use nox_audit_store::{PoolOptions, Spool, WriterConfig, build_pool};
use nox_testkit::{TestApp, TestDb, TestUser, send, spawn_app, spawn_app_on};
use reqwest::{Method, StatusCode};
use time::{Duration, OffsetDateTime};
use tokio_postgres::Client;
use uuid::Uuid;

/// Three in-process servers on one database.
async fn three_servers() -> Vec<TestApp> {
    let first = spawn_app().await;
    let db = Arc::clone(&first.db);
    vec![
        first,
        spawn_app_on(Arc::clone(&db), |_| {}).await,
        spawn_app_on(db, |_| {}).await,
    ]
}

/// Moves every server's clock (the one audit records are stamped with).
fn advance(apps: &[TestApp], by: Duration) {
    for app in apps {
        app.clock.advance(by);
    }
}

/// GET /me as `user` on `app`, tagged with a fresh request id (returned).
async fn me(app: &TestApp, user: &TestUser) -> Uuid {
    let id = Uuid::now_v7();
    let response = send(
        app.request(Method::GET, "/me", &user.token)
            .header("X-Request-ID", id.to_string()),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    id
}

fn user_id(user: &TestUser) -> Uuid {
    user.id.parse().expect("a user id")
}

/// The session of the audit row of request `request_id`.
async fn session_of(client: &Client, request_id: Uuid) -> Uuid {
    client
        .query_one(
            "SELECT session_id FROM audit_actions WHERE request_id = $1",
            &[&request_id],
        )
        .await
        .expect("the request's row")
        .get::<_, Option<Uuid>>(0)
        .expect("a session")
}

/// A user's sessions, oldest first.
#[derive(Debug)]
struct Session {
    id: Uuid,
    active: bool,
    last_activity: OffsetDateTime,
    ended_at: Option<OffsetDateTime>,
    /// The newest timestamp among its audit rows.
    last_row: Option<OffsetDateTime>,
}

async fn sessions_of(client: &Client, user: Uuid) -> Vec<Session> {
    client
        .query(
            "SELECT s.id, s.is_active, s.last_activity, s.ended_at,
                    (SELECT max(a.\"timestamp\") FROM audit_actions a WHERE a.session_id = s.id)
             FROM audit_sessions s WHERE s.user_id = $1 ORDER BY s.started_at",
            &[&user],
        )
        .await
        .expect("sessions")
        .iter()
        .map(|row| Session {
            id: row.get(0),
            active: row.get(1),
            last_activity: row.get(2),
            ended_at: row.get(3),
            last_row: row.get(4),
        })
        .collect()
}

#[tokio::test]
async fn requests_alternating_over_three_servers_share_one_session_until_it_is_idle() {
    let apps = three_servers().await;
    let sam = apps[0].new_user("sam").await;
    let mut requests = Vec::new();
    for i in 0..9 {
        requests.push(me(&apps[i % 3], &sam).await);
    }
    let client = apps[0].db.client().await;
    let sessions = sessions_of(&client, user_id(&sam)).await;
    assert_eq!(sessions.len(), 1, "one session, not one per server");
    for request in &requests {
        assert_eq!(session_of(&client, *request).await, sessions[0].id);
    }

    // Idle on every server: the next request opens a second session, and
    // the first ends at its last activity, whichever server saw it.
    advance(&apps, Duration::minutes(31));
    let after = me(&apps[1], &sam).await;
    let again = me(&apps[2], &sam).await;
    for app in &apps {
        app.stop().await;
    }
    let sessions = sessions_of(&client, user_id(&sam)).await;
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    let (first, second) = (&sessions[0], &sessions[1]);
    assert_eq!(session_of(&client, after).await, second.id);
    assert_eq!(session_of(&client, again).await, second.id);
    assert!(!first.active && second.active, "{sessions:?}");
    assert_eq!(first.ended_at, Some(first.last_activity));
    assert_eq!(
        first.last_row,
        Some(first.last_activity),
        "its last activity is its last request's, whichever server served it"
    );
    assert_eq!(second.last_row, Some(second.last_activity));

    // Each server counts the sessions it opened: together, every one.
    let opened: u64 = apps
        .iter()
        .map(|app| app.state.audit.status().sessions_opened())
        .sum();
    let rows = apps[0]
        .db
        .scalar("SELECT count(*) FROM audit_sessions")
        .await;
    assert_eq!(opened, rows as u64);
}

#[tokio::test]
async fn one_servers_idle_sweep_leaves_a_session_another_server_keeps_alive() {
    let apps = three_servers().await;
    let (a, b, c) = (&apps[0], &apps[1], &apps[2]);
    let sam = a.new_user("sam").await;
    let first = me(a, &sam).await;
    advance(&apps, Duration::minutes(20));
    let kept_alive = me(b, &sam).await;
    // 35 minutes after its only request, A finds the session idle; B used
    // it 15 minutes ago. A's sweep runs each second, and at its shutdown.
    advance(&apps, Duration::minutes(15));
    a.stop().await;

    let client = a.db.client().await;
    let session = session_of(&client, first).await;
    assert_eq!(session_of(&client, kept_alive).await, session);
    let later = me(c, &sam).await;
    assert_eq!(session_of(&client, later).await, session);
    let sessions = sessions_of(&client, user_id(&sam)).await;
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert!(sessions[0].active, "A did not end what B kept alive");
}

#[tokio::test]
async fn servers_opening_one_session_at_once_open_it_once() {
    let apps = three_servers().await;
    let mut users = Vec::new();
    for i in 0..12 {
        users.push(apps[0].new_user(&format!("racer{i}")).await);
    }
    // Every user's first requests reach the three servers at once.
    let requests = users.iter().flat_map(|user| {
        apps.iter()
            .map(move |app| async move { me(app, user).await })
    });
    let requests: Vec<Uuid> = join_all(requests).await;

    let client = apps[0].db.client().await;
    for (user, requests) in users.iter().zip(requests.chunks(3)) {
        let sessions = sessions_of(&client, user_id(user)).await;
        assert_eq!(sessions.len(), 1, "{}: {sessions:?}", user.id);
        for request in requests {
            assert_eq!(session_of(&client, *request).await, sessions[0].id);
        }
    }
}

/// Opens `(user, hash)`'s session on `client` (a transaction may be open).
async fn open_session(client: &Client, user: Uuid, hash: &str, new_id: Uuid) -> (Uuid, bool) {
    let row = client
        .query_one(
            "SELECT session_id, opened FROM audit_sessions_open(
                 interval '30 minutes', $1, $2, $3, ARRAY[NULL]::inet[], ARRAY[NULL]::text[],
                 ARRAY[now()])",
            &[&vec![new_id], &vec![user], &vec![hash]],
        )
        .await
        .expect("audit_sessions_open");
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn two_openings_of_one_session_at_once_make_one() {
    let db = TestDb::new().await;
    let (first, second) = (db.client().await, db.client().await);
    let user = Uuid::now_v7();
    first.batch_execute("BEGIN").await.expect("begin");
    let (opened_first, opened) =
        open_session(&first, user, "00000000000000aa", Uuid::now_v7()).await;
    assert!(opened);
    // The second server opens while the first has not committed: it waits
    // on the unique index, then takes the first one's session.
    let other_id = Uuid::now_v7();
    let racing =
        tokio::spawn(
            async move { open_session(&second, user, "00000000000000aa", other_id).await },
        );
    let observer = db.client().await;
    let mut waiting = false;
    for _ in 0..600 {
        waiting = observer
            .query_one(
                "SELECT count(*) > 0 FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if waiting {
            break;
        }
        tokio::time::sleep(StdDuration::from_millis(50)).await;
    }
    assert!(waiting, "the second opening waits for the first");
    first.batch_execute("COMMIT").await.expect("commit");
    let (opened_second, opened) = racing.await.expect("the racing opening");
    assert_eq!(opened_second, opened_first);
    assert!(!opened, "the second server opened nothing");
    assert_eq!(
        db.scalar("SELECT count(*) FROM audit_sessions").await,
        1,
        "one session"
    );
}

/// An authenticated record of `user`'s token `hash` at `at`.
fn record(user: Uuid, hash: &str, at: OffsetDateTime) -> ActionRecord {
    ActionRecord {
        user_id: Some(user),
        session_token_hash: Some(hash.into()),
        ..ActionRecord::arrived(Uuid::now_v7(), at, "GET", "/spooled")
    }
}

#[tokio::test]
async fn records_spooled_while_the_database_was_down_get_their_session_on_replay() {
    let db = TestDb::new().await;
    let spool_dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open(spool_dir.path()).expect("spool");
    // A server whose database is away: nothing listens on that socket.
    let mut away = tokio_postgres::Config::new();
    away.host_path(spool_dir.path().join("no-such-socket"))
        .user("nobody")
        .dbname("nothing");
    let writer = nox_audit_store::AuditWriter::start(
        build_pool(away, &PoolOptions::default()).expect("pool"),
        spool.clone(),
        Arc::new(nox_audit_model::SystemClock),
        WriterConfig::default(),
    );
    let user = Uuid::now_v7();
    let t0 = OffsetDateTime::now_utc();
    let records: Vec<ActionRecord> = (0..3)
        .map(|i| record(user, "00000000000000bb", t0 + Duration::seconds(i)))
        .collect();
    for record in &records {
        writer
            .sink()
            .submit(record.clone(), true)
            .await
            .expect("spooled");
    }
    writer.shutdown().await;
    let spooled: Vec<ActionRecord> = spool
        .pending()
        .expect("pending")
        .iter()
        .flat_map(|path| Spool::read(path).expect("a spool file").actions)
        .collect();
    assert_eq!(spooled.len(), 3);
    assert!(
        spooled.iter().all(|r| r.session_id.is_none()),
        "no database, no session yet"
    );

    // The database is back: the spool is replayed.
    let writer = db.audit_writer(spool.clone(), WriterConfig::default());
    writer.shutdown().await;
    assert!(spool.pending().expect("pending").is_empty());
    let client = db.client().await;
    let sessions = sessions_of(&client, user).await;
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let ids: Vec<Uuid> = records.iter().map(|r| r.id).collect();
    let with_it = client
        .query_one(
            "SELECT count(*) FROM audit_actions WHERE id = ANY($1) AND session_id = $2",
            &[&ids, &sessions[0].id],
        )
        .await
        .expect("rows")
        .get::<_, i64>(0);
    assert_eq!(with_it, 3, "every spooled row has the session");
    assert_eq!(sessions[0].last_row, Some(sessions[0].last_activity));
}

#[tokio::test]
async fn a_spool_file_from_before_shared_sessions_is_replayed_with_its_session() {
    let db = TestDb::new().await;
    let spool_dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open(spool_dir.path()).expect("spool");
    let user = Uuid::now_v7();
    let hash = "00000000000000cc";
    let t0 = OffsetDateTime::now_utc();
    // Another server has the key's active session now.
    let client = db.client().await;
    let (active, _) = open_session(&client, user, hash, Uuid::now_v7()).await;
    // An older server spooled a session it had opened in its memory.
    let legacy = SessionRow {
        id: Uuid::now_v7(),
        user_id: user,
        session_token_hash: hash.into(),
        client_ip: None,
        user_agent: None,
        started_at: t0,
        last_activity: t0 + Duration::seconds(2),
        ended_at: None,
        is_active: true,
        idle_before: None,
    };
    let records: Vec<ActionRecord> = (0..3)
        .map(|i| ActionRecord {
            session_id: Some(legacy.id),
            ..record(user, hash, t0 + Duration::seconds(i))
        })
        .collect();
    spool
        .append(std::slice::from_ref(&legacy), &records)
        .expect("spool");

    let writer = db.audit_writer(spool.clone(), WriterConfig::default());
    writer.shutdown().await;
    assert!(spool.pending().expect("pending").is_empty());
    let sessions = sessions_of(&client, user).await;
    let ids: Vec<Uuid> = sessions.iter().map(|s| s.id).collect();
    assert_eq!(ids.len(), 2, "{sessions:?}");
    assert!(ids.contains(&active) && ids.contains(&legacy.id));
    let replayed = sessions.iter().find(|s| s.id == legacy.id).expect("legacy");
    assert!(
        !replayed.active && replayed.ended_at == Some(replayed.last_activity),
        "the key had an active session: the replayed one is ended"
    );
    assert_eq!(replayed.last_row, Some(replayed.last_activity));
}

#[tokio::test]
async fn the_migration_ends_all_but_the_newest_of_duplicate_active_sessions() {
    let db = TestDb::empty().await;
    let mut client = db.client().await;
    let before: Vec<_> = nox_api::migrations::MIGRATIONS
        .iter()
        .filter(|m| m.version < nox_audit_store::schema::AUDIT_SESSIONS_SHARED.version)
        .cloned()
        .collect();
    nox_audit_store::Migrator::new(&before)
        .up(&mut client)
        .await
        .expect("the migrations before 0013");
    // What three servers with sessions in memory left: one token, three
    // active sessions; and another token's single one.
    let user = Uuid::now_v7();
    let t0 = OffsetDateTime::now_utc();
    let ids: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    for (i, id) in ids.iter().enumerate() {
        let hash = if i < 3 {
            "00000000000000dd"
        } else {
            "00000000000000ee"
        };
        client
            .execute(
                "INSERT INTO audit_sessions (id, user_id, session_token_hash, started_at, last_activity)
                 VALUES ($1, $2, $3, $4, $5)",
                &[id, &user, &hash, &t0, &(t0 + Duration::seconds(i as i64))],
            )
            .await
            .expect("a session");
    }
    nox_audit_store::Migrator::new(nox_api::migrations::MIGRATIONS)
        .up(&mut client)
        .await
        .expect("0013 on duplicates");
    let active: Vec<Uuid> = client
        .query(
            "SELECT id FROM audit_sessions WHERE is_active ORDER BY id",
            &[],
        )
        .await
        .expect("active")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(active, vec![ids[2], ids[3]], "the newest of each token's");
    let ended_at_last: i64 = client
        .query_one(
            "SELECT count(*) FROM audit_sessions WHERE NOT is_active AND ended_at = last_activity",
            &[],
        )
        .await
        .expect("ended")
        .get(0);
    assert_eq!(ended_at_last, 2);
    let duplicate = client
        .execute(
            "INSERT INTO audit_sessions (id, user_id, session_token_hash, started_at, last_activity)
             VALUES ($1, $2, '00000000000000ee', now(), now())",
            &[&Uuid::now_v7(), &user],
        )
        .await;
    assert!(duplicate.is_err(), "a second active session is refused");
}

#[tokio::test]
async fn a_known_session_costs_its_batches_no_session_statement() {
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute(
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET track_functions = ''pl''',
                                        current_database()); END $$",
        )
        .await
        .expect("track function calls");
    let spool_dir = tempfile::tempdir().expect("tempdir");
    let writer = db.audit_writer(
        Spool::open(spool_dir.path()).expect("spool"),
        WriterConfig::default(),
    );
    // 40 batches (each waits for its commit) within one 60 s step.
    let (user, t0) = (Uuid::now_v7(), OffsetDateTime::now_utc());
    for i in 0..40 {
        let record = record(user, "00000000000000ff", t0 + Duration::seconds(i));
        writer.sink().submit(record, true).await.expect("committed");
    }
    writer.shutdown().await;

    // Backends report their counts when they exit.
    let client = db.client().await;
    for _ in 0..600 {
        let others: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if others == 0 {
            break;
        }
        tokio::time::sleep(StdDuration::from_millis(50)).await;
    }
    let calls = |function: &'static str| {
        let client = &client;
        async move {
            client
                .query_one(
                    "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_user_functions
                     WHERE funcname = $1",
                    &[&function],
                )
                .await
                .expect("pg_stat_user_functions")
                .get::<_, i64>(0)
        }
    };
    assert_eq!(calls("audit_sessions_open").await, 1, "opened once");
    assert_eq!(
        calls("audit_sessions_write").await,
        1,
        "its last activity written once, at shutdown: not in each batch"
    );
    let sessions = sessions_of(&client, user).await;
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].last_row, Some(sessions[0].last_activity));
}
