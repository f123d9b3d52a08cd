//! `GET /admin/audit/stream`: matching records arrive once committed, in
//! chain order, from any server on the database; `Last-Event-ID` resumes
//! exactly; a client that stops reading is cut off with `lagged`; users
//! are refused; opening and closing are audited.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use nox_audit_model::{ActionRecord, GENERIC_TAXONOMY};
use nox_audit_store::{Spool, WriterConfig};
use nox_testkit::{TEST_ADMIN_TOKEN, TestApp, TestDb, spawn_app, spawn_app_on, spawn_app_with};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

const ADMIN: &str = TEST_ADMIN_TOKEN;

/// Generous: the stream's own promise (about 100 ms after a commit) is
/// measured by the benchmark, not asserted here.
const PATIENCE: Duration = Duration::from_secs(20);

/// One server-sent event.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Event {
    pub(crate) id: Option<i64>,
    pub(crate) kind: String,
    data: String,
}

impl Event {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).expect("an event's data is JSON")
    }
}

/// Parses `text/event-stream` as it arrives (comments skipped).
pub(crate) struct Events {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    pending: String,
    comments: usize,
}

impl Events {
    pub(crate) async fn open(app: &TestApp, query: &str, last_event_id: Option<i64>) -> Events {
        let mut request = app
            .client
            .get(app.url(&format!("/admin/audit/stream?{query}")))
            .bearer_auth(ADMIN);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        let response = request.send().await.expect("the stream opens");
        assert_eq!(response.status(), StatusCode::OK, "{query}");
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Events {
            body: response.bytes_stream().boxed(),
            pending: String::new(),
            comments: 0,
        }
    }

    /// The next event, or `None` when the server ended the stream.
    pub(crate) async fn next(&mut self) -> Option<Event> {
        // Keep-alive comments do not extend the wait.
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(end) = self.pending.find("\n\n") {
                let block: String = self.pending.drain(..end + 2).collect();
                let mut event = Event {
                    id: None,
                    kind: "message".into(),
                    data: String::new(),
                };
                let mut fields = 0;
                for line in block.lines().filter(|line| !line.is_empty()) {
                    if let Some(id) = line.strip_prefix("id: ") {
                        event.id = Some(id.parse().expect("a numeric id"));
                    } else if let Some(kind) = line.strip_prefix("event: ") {
                        event.kind = kind.into();
                    } else if let Some(data) = line.strip_prefix("data: ") {
                        event.data.push_str(data);
                    } else {
                        assert!(line.starts_with(':'), "unexpected line {line:?}");
                        self.comments += 1;
                        continue;
                    }
                    fields += 1;
                }
                if fields > 0 {
                    return Some(event);
                }
                continue;
            }
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Ok(Some(chunk)) => {
                    let chunk = chunk.expect("the stream continues");
                    self.pending
                        .push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
                }
                Ok(None) => return None,
                Err(_) => panic!("no event within {PATIENCE:?}"),
            }
        }
    }

    /// The next `n` record events.
    async fn records(&mut self, n: usize) -> Vec<Event> {
        let mut records = Vec::with_capacity(n);
        while records.len() < n {
            let event = self.next().await.expect("the stream stays open");
            assert_eq!(event.kind, "record", "{event:?}");
            records.push(event);
        }
        records
    }
}

/// `n` records written by a writer of its own, as another server's would
/// be, all with `user_id = marker`.
async fn write_records(db: &TestDb, marker: Uuid, n: usize) -> Vec<Uuid> {
    let spool_dir = tempfile::tempdir().expect("a spool dir");
    let writer = db.audit_writer(
        Spool::open(spool_dir.path()).expect("spool"),
        WriterConfig::default(),
    );
    let sink = writer.sink();
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let mut record = ActionRecord::arrived(
            Uuid::now_v7(),
            time::OffsetDateTime::now_utc(),
            "GET",
            &format!("/seeded/{i}"),
        );
        record.user_id = Some(marker);
        record.set_outcome(GENERIC_TAXONOMY.classify("GET", None), 200);
        ids.push(record.id);
        sink.submit(record, false).await.expect("queued");
    }
    writer.shutdown().await;
    ids
}

fn record_ids(events: &[Event]) -> Vec<Uuid> {
    events
        .iter()
        .map(|e| e.json()["id"].as_str().unwrap().parse().unwrap())
        .collect()
}

#[tokio::test]
async fn matching_records_arrive_once_committed_and_others_do_not() {
    let app = spawn_app().await;
    let alice = app.new_user("alice").await;
    let bob = app.new_user("bob").await;
    let mut stream = Events::open(
        &app,
        &format!("user_id={}&action_type=file_read", alice.id),
        None,
    )
    .await;
    // Bob's requests and Alice's /me match neither filter.
    for _ in 0..3 {
        app.get_as("/ls", &bob.token).await;
        app.get_as("/me", &alice.token).await;
    }
    let mut request_ids = Vec::new();
    for _ in 0..3 {
        let response = app.get_as("/ls", &alice.token).await;
        assert_eq!(response.status(), StatusCode::OK);
        request_ids.push(
            response.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
        // Durable: the row is committed before the response; it reaches the
        // stream without any further request.
        let event = stream.records(1).await.remove(0);
        let record = event.json();
        assert_eq!(record["request_id"], request_ids.last().unwrap().as_str());
        assert_eq!(record["user_id"], alice.id.as_str());
        assert_eq!(record["action_type"], "file_read");
        assert_eq!(event.id, record["seq"].as_i64(), "the event id is the seq");
    }
    assert!(stream.comments >= 1, "a comment when the stream opened");
}

#[tokio::test]
async fn resuming_with_last_event_id_yields_each_record_once_in_order() {
    let app = spawn_app().await;
    let marker = Uuid::new_v4();
    let filter = format!("user_id={marker}");
    let mut stream = Events::open(&app, &filter, None).await;
    let first = write_records(&app.db, marker, 1).await;
    let seen = stream.records(1).await;
    assert_eq!(record_ids(&seen), first);
    drop(stream);

    // Written while nobody listens, by another writer.
    let missed = write_records(&app.db, marker, 10_000).await;
    let mut resumed = Events::open(&app, &filter, seen[0].id).await;
    let events = resumed.records(missed.len()).await;
    assert_eq!(record_ids(&events), missed, "each exactly once, in order");
    let seqs: Vec<i64> = events.iter().map(|e| e.id.unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in chain order");
    assert!(seqs[0] > seen[0].id.unwrap());

    // `after=` does the same as the header.
    let middle = events[4_999].id.unwrap();
    let mut from_middle = Events::open(&app, &format!("{filter}&after={middle}"), None).await;
    assert_eq!(
        record_ids(&from_middle.records(5_000).await),
        missed[5_000..]
    );
}

#[tokio::test]
async fn a_subscriber_on_one_server_sees_what_another_server_writes() {
    let db = Arc::new(TestDb::new().await);
    let reader = spawn_app_on(Arc::clone(&db), |_| {}).await;
    let writer = spawn_app_on(Arc::clone(&db), |_| {}).await;
    let mut stream = Events::open(&reader, "endpoint=/me", None).await;
    let mut expected = Vec::new();
    for _ in 0..5 {
        let response = writer.get_as("/me", ADMIN).await;
        expected.push(
            response.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    let events = stream.records(5).await;
    let got: Vec<String> = events
        .iter()
        .map(|e| e.json()["request_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, expected);
}

/// Reads a raw HTTP response until `needle` has appeared `times` times.
async fn read_until(socket: &mut tokio::net::TcpStream, needle: &str, times: usize) -> String {
    let mut text = Vec::new();
    let mut buffer = [0u8; 4096];
    while String::from_utf8_lossy(&text).matches(needle).count() < times {
        let n = tokio::time::timeout(PATIENCE, socket.read(&mut buffer))
            .await
            .expect("data in time")
            .expect("read");
        assert!(n > 0, "the server closed before {needle:?}");
        text.extend_from_slice(&buffer[..n]);
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// A stream over a plain socket with a small receive window, read only
/// up to the opening comment.
async fn open_raw(app: &TestApp, query: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut socket = socket.connect(app.address).await.unwrap();
    let request = format!(
        "GET /admin/audit/stream?{query} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n\r\n"
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    read_until(&mut socket, ": keep-alive", 1).await;
    socket
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_with_lagged_and_can_resume() {
    let app = spawn_app_with(|config| config.audit_stream_stall_secs = 1).await;
    let marker = Uuid::new_v4();
    // A small window, so the server meets the stalled reader soon.
    let mut socket = open_raw(&app, &format!("user_id={marker}")).await;

    // Far more than the socket buffers and the stream's buffer hold.
    let written = 20_000;
    let ids = write_records(&app.db, marker, written).await;
    let status = |app: &TestApp| {
        let app_url = app.url("/admin/audit/status");
        let client = app.client.clone();
        async move {
            let body: Value = client
                .get(app_url)
                .bearer_auth(ADMIN)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            body["streams_open"].as_u64().unwrap()
        }
    };
    let deadline = tokio::time::Instant::now() + PATIENCE * 3;
    while status(&app).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled subscriber was never cut off"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Now read it all: some records, then `lagged` naming the last one sent.
    let mut text = Vec::new();
    tokio::time::timeout(PATIENCE, socket.read_to_end(&mut text))
        .await
        .expect("the server ends the stream")
        .expect("read");
    let text = String::from_utf8(text).unwrap();
    let received: Vec<i64> = text
        .lines()
        .filter_map(|line| line.strip_prefix("id: ")?.parse().ok())
        .collect();
    assert!(
        received.len() < written,
        "the server held only a bounded buffer for the stalled client ({} of {written} sent)",
        received.len()
    );
    let lagged = text
        .rsplit("event: lagged\ndata: ")
        .next()
        .filter(|_| text.contains("event: lagged"))
        .expect("a final lagged event");
    let lagged: Value = serde_json::from_str(lagged.lines().next().unwrap()).unwrap();
    assert_eq!(lagged["last_id"].as_i64(), received.last().copied());

    // Resuming from there yields the rest, in order.
    let mut resumed =
        Events::open(&app, &format!("user_id={marker}"), received.last().copied()).await;
    let rest = resumed.records(written - received.len()).await;
    assert_eq!(record_ids(&rest), ids[received.len()..]);
}

#[tokio::test]
async fn users_are_refused_and_bad_resume_points_are_400() {
    let app = spawn_app().await;
    let alice = app.new_user("alice").await;
    let response = app.get_as("/admin/audit/stream", &alice.token).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let response = app.get("/admin/audit/stream").await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    for (query, header) in [
        ("after=-1", None),
        ("after=x", None),
        ("after=%00", None),
        ("", Some("nope")),
        ("cursor=abc", None),
        ("user_id=not-a-uuid", None),
    ] {
        let mut request = app
            .client
            .get(app.url(&format!("/admin/audit/stream?{query}")))
            .bearer_auth(ADMIN);
        if let Some(header) = header {
            request = request.header("Last-Event-ID", header);
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "{query} {header:?}"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "invalid_parameter", "{body}");
    }
}

#[tokio::test]
async fn opening_and_closing_a_stream_are_audited_but_events_are_not() {
    let app = spawn_app().await;
    let alice = app.new_user("alice").await;
    let mut socket = open_raw(&app, &format!("user_id={}", alice.id)).await;
    for _ in 0..2 {
        app.get_as("/ls", &alice.token).await;
    }
    let text = read_until(&mut socket, "event: record", 2).await;
    let last_id: i64 = text
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix("id: ")?.parse().ok())
        .unwrap();
    // A reset, which the server notices at once (a FIN only at the next
    // write: the keep-alive comment).
    socket.set_zero_linger().unwrap();
    drop(socket);

    let client = app.db.client().await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let rows = loop {
        let rows = client
            .query(
                "SELECT request_id, status_code, metadata FROM audit_actions
                 WHERE endpoint = '/admin/audit/stream' ORDER BY seq",
                &[],
            )
            .await
            .unwrap();
        if rows.len() >= 2 || tokio::time::Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(rows.len(), 2, "one row when opened, one when closed");
    let facts: Vec<HashMap<String, Value>> = rows
        .iter()
        .map(|row| {
            let metadata: Value = row.get("metadata");
            serde_json::from_value(metadata["stream"].clone()).unwrap()
        })
        .collect();
    let request_ids: Vec<Uuid> = rows.iter().map(|row| row.get("request_id")).collect();
    assert_eq!(request_ids[0], request_ids[1], "the same request");
    assert_eq!(facts[0]["opened"], true);
    assert_eq!(facts[0]["filters"]["user_id"], alice.id.as_str());
    assert!(!facts[1].contains_key("opened"));
    assert_eq!(facts[1]["events"], 2);
    assert_eq!(facts[1]["last_id"].as_i64(), Some(last_id));
    let closed: i16 = rows[1].get("status_code");
    assert_eq!(closed, 499, "the client left");
}
