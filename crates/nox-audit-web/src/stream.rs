//! `GET /admin/audit/stream`: the trail live, as Server-Sent Events.
//!
//! Each matching record is one `event: record` whose `id` is its `seq` on
//! the actions chain and whose `data` is the row as `/logs` shows it, sent
//! once committed, in commit order. `Last-Event-ID` (or `?after=`) resumes
//! right after that record. A subscriber is a task (on the work runtime)
//! that reads what it has not sent with keyset queries bounded by the
//! [`CommitFeed`]'s head, and waits for the head to move: every server on
//! the database sees every commit, and a lost notification only delays.
//! The database is the buffer: a slow reader falls behind in `seq`, not in
//! memory. A read served by the read replica stops at the `seq` the replica
//! has replayed, and the rest is read once it has: no record is passed over.
//! Each subscriber holds at most `buffer_events` events; one whose
//! buffer stays full for `stall` gets `event: lagged` with the last id sent
//! and is closed, and can resume from there.
//!
//! The request's own audit row is written when the stream closes (with the
//! events sent and the last id); a second row with the same request id
//! records the opening. Events themselves are not recorded.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, get, web};
use bytes::Bytes;
use nox_audit_metrics::{AUDIT_STREAM_LAGGED_TOTAL, AUDIT_STREAMS_OPEN};
use nox_audit_model::ActionRecord;
use nox_audit_query::StreamQuery;
use nox_audit_store::commit_feed::CommitFeed;
use nox_audit_store::{AuditSink, SinkError};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::AuditApi;
use crate::authorize::{Access, Authenticated};
use crate::error::{ErrorBody, WebError};
use crate::query_params::QueryParams;
use crate::reads::{ReadSource, Reads};

/// The most records one database read returns.
const READ_ROWS: usize = 500;

/// The live stream's bounds.
#[derive(Debug, Clone)]
pub struct StreamLimits {
    /// Streams open at once; more are answered 503.
    pub max_streams: usize,
    /// Database reads running at once for all streams together.
    pub max_reads: usize,
    /// Events waiting for one client.
    pub buffer_events: usize,
    /// How long a client may leave its full buffer untouched before it is
    /// cut off with `lagged`.
    pub stall: Duration,
    /// A comment line this often keeps proxies from closing an idle stream.
    pub heartbeat: Duration,
    /// The least time between two reads of one subscriber: on a busy trail
    /// a few reads a second, each taking everything new.
    pub min_read_interval: Duration,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            max_streams: 256,
            max_reads: 4,
            buffer_events: 256,
            stall: Duration::from_secs(10),
            heartbeat: Duration::from_secs(15),
            min_read_interval: Duration::from_millis(250),
        }
    }
}

/// What the stream endpoint shares across requests.
#[derive(Debug)]
pub(crate) struct Streams {
    feed: Option<CommitFeed>,
    limits: StreamLimits,
    open: Arc<Semaphore>,
    reads: Arc<Semaphore>,
}

impl Streams {
    pub(crate) fn new(feed: Option<CommitFeed>, limits: StreamLimits) -> Streams {
        Streams {
            feed,
            open: Arc::new(Semaphore::new(limits.max_streams)),
            reads: Arc::new(Semaphore::new(limits.max_reads)),
            limits,
        }
    }

    pub(crate) fn feed(&self) -> Option<&CommitFeed> {
        self.feed.as_ref()
    }

    /// Streams open now.
    pub(crate) fn open_count(&self) -> usize {
        self.limits.max_streams - self.open.available_permits()
    }

    pub(crate) fn limits(&self) -> &StreamLimits {
        &self.limits
    }

    /// Ends every open stream (each sends what it holds, then closes) and
    /// refuses new ones.
    pub(crate) fn close_all(&self) {
        if let Some(feed) = &self.feed {
            feed.close();
        }
    }
}

#[utoipa::path(
    params(
        ("after" = Option<i64>, Query, minimum = 0, description = "Resume after this record's seq (the Last-Event-ID header wins)"),
        ("Last-Event-ID" = Option<String>, Header, description = "The id of the last event received"),
        ("user_id" = Option<Uuid>, Query), ("session_id" = Option<Uuid>, Query), ("request_id" = Option<Uuid>, Query),
        ("action_type" = Option<String>, Query), ("action_category" = Option<String>, Query),
        ("endpoint" = Option<String>, Query), ("status_code" = Option<i16>, Query, minimum = 100, maximum = 599), ("success" = Option<bool>, Query),
        ("quota_violation" = Option<bool>, Query), ("client_ip" = Option<String>, Query),
        ("start_date" = Option<String>, Query), ("end_date" = Option<String>, Query), ("search" = Option<String>, Query),
    ),
    responses(
        (status = 200, description = "text/event-stream: `record` events (id = seq), a final `lagged` event for a client that fell behind, keep-alive comments", content_type = "text/event-stream"),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 503, body = ErrorBody, description = "Too many streams open, or the stream is not available"),
    ),
    security(("bearer" = [])),
    tag = "admin-audit"
)]
#[get("/admin/audit/stream")]
pub async fn stream(
    _: Authenticated,
    request: HttpRequest,
    api: web::Data<AuditApi>,
    query: QueryParams<HashMap<String, String>>,
) -> actix_web::Result<HttpResponse> {
    api.authorize.authorize(&request, Access::Read)?;
    let streams = &api.streams;
    let last_event_id = match request.headers().get("last-event-id") {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| {
            WebError::from(nox_audit_query::QueryError::InvalidParameter(
                "Last-Event-ID: expected a sequence number (0 or more)".into(),
            ))
        })?),
    };
    let query = StreamQuery::parse(&query, last_event_id, api.user_names.as_ref())
        .map_err(WebError::from)?;
    let unavailable = || WebError::Busy("the live stream is not available; retry".into());
    let feed = streams.feed.as_ref().ok_or_else(unavailable)?;
    let head = feed
        .head()
        .filter(|_| !feed.is_closed())
        .ok_or_else(unavailable)?;
    let permit = Arc::clone(&streams.open)
        .try_acquire_owned()
        .map_err(|_| WebError::Busy("too many streams are open; retry".into()))?;
    let from = query.after.unwrap_or(head);

    // The request's row, written at the close, says what the stream was.
    let description = json!({
        "filters": query.filters.applied(),
        "after": from,
        "events": 0,
        "last_id": Value::Null,
    });
    nox_audit_actix::record(&request, |row| {
        row.metadata_mut().insert("stream".into(), description);
    });

    let limits = streams.limits.clone();
    let (events, received) = mpsc::channel(limits.buffer_events);
    let lagged = Arc::new(OnceLock::new());
    let subscriber = Subscriber {
        reads: api.reads.clone(),
        query,
        position: from,
        head: feed.subscribe(),
        turns: Arc::clone(&streams.reads),
        limits,
        events,
        lagged: Arc::clone(&lagged),
        last_sent: None,
        _permit: permit,
    };
    match &api.work_runtime {
        Some(runtime) => drop(runtime.spawn(subscriber.run())),
        None => drop(tokio::spawn(subscriber.run())),
    }
    let body = Body {
        request: request.clone(),
        sink: api.sink.clone(),
        durable: api.mode == nox_audit_store::AuditMode::Durable,
        received,
        lagged,
        events: 0,
    };
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        // nginx would otherwise buffer the events.
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body.into_stream()))
}

/// Text ready to send: a record's event (with its `seq`) or a comment.
struct Event {
    seq: Option<i64>,
    text: Bytes,
}

fn record_event(seq: i64, record: &str) -> Event {
    Event {
        seq: Some(seq),
        text: Bytes::from(format!("id: {seq}\nevent: record\ndata: {record}\n\n")),
    }
}

fn keep_alive() -> Event {
    Event {
        seq: None,
        text: Bytes::from_static(KEEP_ALIVE),
    }
}

fn lagged_event(last_id: Option<i64>) -> Bytes {
    Bytes::from(format!(
        "event: lagged\ndata: {}\n\n",
        json!({ "last_id": last_id })
    ))
}

const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// One stream's reader of the database.
struct Subscriber {
    reads: Reads,
    query: StreamQuery,
    /// Every row up to this `seq` has been considered.
    position: i64,
    /// Fails once the feed is closed: the stream ends.
    head: watch::Receiver<Option<i64>>,
    /// Database reads running at once, all streams together.
    turns: Arc<Semaphore>,
    limits: StreamLimits,
    events: mpsc::Sender<Event>,
    /// Set (to the last id sent) when the client is cut off.
    lagged: Arc<OnceLock<Option<i64>>>,
    last_sent: Option<i64>,
    _permit: OwnedSemaphorePermit,
}

/// Why a subscriber stops.
enum Stop {
    ClientGone,
    Lagged,
    Closing,
}

impl Subscriber {
    async fn run(mut self) {
        let open = metrics::gauge!(AUDIT_STREAMS_OPEN);
        open.increment(1.0);
        if let Stop::Lagged = self.follow().await {
            let _ = self.lagged.set(self.last_sent);
            metrics::counter!(AUDIT_STREAM_LAGGED_TOTAL).increment(1);
        }
        open.decrement(1.0);
    }

    async fn follow(&mut self) -> Stop {
        let mut next_heartbeat = Instant::now() + self.limits.heartbeat;
        loop {
            let head = (*self.head.borrow_and_update()).unwrap_or(self.position);
            let read_started = Instant::now();
            while self.position < head {
                if self.head.has_changed().is_err() {
                    return Stop::Closing;
                }
                match self.read(head).await {
                    Ok((records, behind)) => {
                        for (seq, record) in records {
                            match timeout(self.limits.stall, self.events.send(record)).await {
                                Ok(Ok(())) => self.last_sent = Some(seq),
                                Ok(Err(_)) => return Stop::ClientGone,
                                Err(_) => return Stop::Lagged,
                            }
                        }
                        next_heartbeat = Instant::now() + self.limits.heartbeat;
                        if behind {
                            // The replica has not replayed up to the head
                            // yet: ask again shortly.
                            tokio::select! {
                                _ = sleep(self.limits.min_read_interval) => {}
                                _ = self.events.closed() => return Stop::ClientGone,
                            }
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "an audit stream's read failed; retrying");
                        tokio::select! {
                            _ = sleep(Duration::from_secs(1)) => {}
                            _ = self.events.closed() => return Stop::ClientGone,
                        }
                    }
                }
            }
            tokio::select! {
                changed = self.head.changed() => {
                    if changed.is_err() {
                        return Stop::Closing;
                    }
                    // Commits come in bursts: take them together.
                    sleep_until(read_started + self.limits.min_read_interval).await;
                }
                _ = sleep_until(next_heartbeat) => {
                    next_heartbeat = Instant::now() + self.limits.heartbeat;
                    match self.events.try_send(keep_alive()) {
                        Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                        Err(mpsc::error::TrySendError::Closed(_)) => return Stop::ClientGone,
                    }
                }
                _ = self.events.closed() => return Stop::ClientGone,
            }
        }
    }

    /// The next matching records up to `head`, as events; advances the
    /// position past what the read considered. `true` with them when a
    /// replica served the read and has not replayed up to `head`.
    async fn read(&mut self, head: i64) -> Result<(Vec<(i64, Event)>, bool), WebError> {
        let _turn = self.turns.acquire().await.expect("never closed");
        let read = self.reads.connection().await?;
        let upto = match read.source {
            ReadSource::Primary => head,
            // The head is the primary's: reading past what the replica has
            // replayed would pass over rows it does not have yet, for good.
            ReadSource::Replica { .. } => {
                head.min(nox_audit_query::replayed_head(&read.client).await?)
            }
        };
        if upto <= self.position {
            return Ok((Vec::new(), true));
        }
        let page = self
            .query
            .read(&read.client, self.position, upto, READ_ROWS)
            .await?;
        self.position = page.scanned_to;
        let records = page
            .records
            .iter()
            .map(|(seq, record)| (*seq, record_event(*seq, record)))
            .collect();
        Ok((records, self.position == upto && upto < head))
    }
}

/// The response body, on the HTTP worker: records the opening, then sends
/// the subscriber's events, keeping the request's row up to date with what
/// was sent (it is written when the body ends or is dropped).
struct Body {
    request: HttpRequest,
    sink: AuditSink,
    durable: bool,
    received: mpsc::Receiver<Event>,
    lagged: Arc<OnceLock<Option<i64>>>,
    events: u64,
}

enum BodyState {
    Opening(Body),
    Open(Body),
    Done,
}

impl Body {
    fn into_stream(self) -> impl futures_util::Stream<Item = Result<Bytes, SinkError>> {
        futures_util::stream::unfold(BodyState::Opening(self), |state| async move {
            match state {
                BodyState::Opening(body) => {
                    // Recorded before the first byte: a durable opening is
                    // committed before anything is streamed.
                    if let Err(error) = body.record_opening().await {
                        tracing::error!(%error, "an audit stream's opening could not be recorded");
                        return Some((Err(error), BodyState::Done));
                    }
                    Some((Ok(Bytes::from_static(KEEP_ALIVE)), BodyState::Open(body)))
                }
                BodyState::Open(mut body) => match body.received.recv().await {
                    Some(event) => {
                        if let Some(seq) = event.seq {
                            body.note_sent(seq);
                        }
                        Some((Ok(event.text), BodyState::Open(body)))
                    }
                    None => match body.lagged.get() {
                        Some(last_id) => {
                            nox_audit_actix::record(&body.request, |row| {
                                set_stream_fact(row, "lagged", Value::Bool(true));
                            });
                            Some((Ok(lagged_event(*last_id)), BodyState::Done))
                        }
                        None => None,
                    },
                },
                BodyState::Done => None,
            }
        })
    }

    /// A row for the opening: the request's pending record as it stands,
    /// under an id of its own.
    async fn record_opening(&self) -> Result<(), SinkError> {
        let mut opening = None;
        nox_audit_actix::record(&self.request, |row| opening = Some(row.clone()));
        let Some(mut opening) = opening else {
            return Ok(()); // not behind the audit middleware
        };
        opening.id = uuid::Uuid::now_v7();
        set_stream_fact(&mut opening, "opened", Value::Bool(true));
        self.sink.submit(opening, self.durable).await
    }

    /// Counts a record event and notes its id in the request's row.
    fn note_sent(&mut self, id: i64) {
        self.events += 1;
        let events = self.events;
        nox_audit_actix::record(&self.request, |row| {
            set_stream_fact(row, "events", json!(events));
            set_stream_fact(row, "last_id", json!(id));
        });
    }
}

/// Sets `metadata.stream.<name>` of a stream's audit row.
fn set_stream_fact(row: &mut ActionRecord, name: &str, value: Value) {
    if let Some(Value::Object(facts)) = row.metadata_mut().get_mut("stream") {
        facts.insert(name.into(), value);
    }
}
