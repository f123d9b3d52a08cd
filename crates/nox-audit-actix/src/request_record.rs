//! The record of a request while it is served: the middleware keeps the
//! [`ActionRecord`] under construction in the request's extensions, handlers
//! and inner middleware write into it with [`record`], and the middleware
//! completes it when the response ends ([`PendingRecord::finish`]).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Instant;

use actix_web::HttpMessage;
use actix_web::http::{Method, StatusCode};
use serde_json::Value;
use uuid::Uuid;

use nox_audit_model::{ActionRecord, Taxonomy};

use crate::cpu::CpuMeter;

/// The record shared between the middleware and the request's extensions;
/// empty once completed, so later writes change nothing.
#[derive(Debug, Clone)]
pub(crate) struct RecordCell(Rc<RefCell<Option<ActionRecord>>>);

/// Adds facts to the audit record of the request `message` belongs to (an
/// `HttpRequest` in a handler, a `ServiceRequest` in middleware). Does
/// nothing when the request is not audited.
///
/// The middleware fills in the rest when the response ends: timing, sizes,
/// status, route and kind. A `cpu_time_ms` set here replaces the measured
/// server CPU (a run reports its child's); `error_details` set here beats
/// the error response's `detail`; `metadata` keys added here (see
/// [`ActionRecord::metadata_mut`]) sit beside the middleware's own. What the
/// middleware saw on arrival (ids, time, endpoint, method, client address
/// and agent) is put back: a handler cannot rewrite it.
pub fn record<M: HttpMessage>(message: &M, add: impl FnOnce(&mut ActionRecord)) {
    let cell = message.extensions().get::<RecordCell>().cloned();
    if let Some(RecordCell(cell)) = cell
        && let Some(record) = cell.borrow_mut().as_mut()
    {
        add(record);
    }
}

/// The request id of an audited request (also sent back as `X-Request-ID`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestId(pub Uuid);

pub fn request_id<M: HttpMessage>(message: &M) -> Option<Uuid> {
    message.extensions().get::<RequestId>().map(|id| id.0)
}

/// What the middleware saw as the request arrived. A handler may write
/// into the record, but not over these: they are put back at the end.
struct Arrival {
    id: Uuid,
    request_id: Uuid,
    timestamp: time::OffsetDateTime,
    endpoint: String,
    http_method: String,
    client_ip: Option<std::net::IpAddr>,
    user_agent: Option<String>,
}

impl Arrival {
    fn of(record: &ActionRecord) -> Arrival {
        Arrival {
            id: record.id,
            request_id: record.request_id,
            timestamp: record.timestamp,
            endpoint: record.endpoint.clone(),
            http_method: record.http_method.clone(),
            client_ip: record.client_ip,
            user_agent: record.user_agent.clone(),
        }
    }

    fn restore(self, record: &mut ActionRecord) {
        record.id = self.id;
        record.request_id = self.request_id;
        record.timestamp = self.timestamp;
        record.endpoint = self.endpoint;
        record.http_method = self.http_method;
        record.client_ip = self.client_ip;
        record.user_agent = self.user_agent;
    }
}

/// A request's record until its response ends.
pub(crate) struct PendingRecord {
    record: RecordCell,
    arrival: Arrival,
    /// The matched route template, if any.
    route: Option<String>,
    started: Instant,
    pub(crate) meter: CpuMeter,
    body_bytes: Rc<Cell<u64>>,
    request_head: u64,
    pub(crate) response_head: u64,
}

impl PendingRecord {
    /// Starts the wait for `record`'s response; `message`'s extensions get
    /// the record (for [`record`]) and the CPU meter.
    pub(crate) fn start<M: HttpMessage>(
        message: &M,
        record: ActionRecord,
        route: Option<String>,
        body_bytes: Rc<Cell<u64>>,
        request_head: u64,
    ) -> PendingRecord {
        let arrival = Arrival::of(&record);
        let cell = RecordCell(Rc::new(RefCell::new(Some(record))));
        let meter = CpuMeter::default();
        message.extensions_mut().insert(cell.clone());
        message.extensions_mut().insert(meter.clone());
        PendingRecord {
            record: cell,
            arrival,
            route,
            started: Instant::now(),
            meter,
            body_bytes,
            request_head,
            response_head: 0,
        }
    }

    /// Reads the record (not completed yet).
    pub(crate) fn read<T>(&self, read: impl FnOnce(&ActionRecord) -> T) -> T {
        read(
            self.record
                .0
                .borrow()
                .as_ref()
                .expect("completed once, by finish"),
        )
    }

    pub(crate) fn classify(&mut self, taxonomy: &Taxonomy, status: StatusCode) {
        let mut cell = self.record.0.borrow_mut();
        let record = cell.as_mut().expect("completed once, by finish");
        let kind = taxonomy.classify(&record.http_method, self.route.as_deref());
        if let Some(route) = &self.route {
            record.route.clone_from(route);
        }
        record.set_outcome(kind, status.as_u16());
    }

    /// Completes the record once `body_len` bytes of body were sent.
    pub(crate) fn finish(self, body_len: u64, error_body: Option<&[u8]>) -> ActionRecord {
        let mut record = self
            .record
            .0
            .borrow_mut()
            .take()
            .expect("completed once, by finish");
        self.arrival.restore(&mut record);
        // HTTP/1 sends a HEAD response's headers only, whatever body the
        // handler produced.
        let body_len = if record.http_method == Method::HEAD.as_str() {
            0
        } else {
            body_len
        };
        let elapsed = self.started.elapsed();
        record.response_time_ms = (elapsed.as_micros() as f64) / 1000.0;
        record.request_size = (self.request_head + self.body_bytes.get()) as i64;
        record.response_size = (self.response_head + body_len) as i64;
        // A handler's figure (a run's child) replaces the worker's.
        record.cpu_time_ms = Some(record.cpu_time_ms.unwrap_or_else(|| self.meter.millis()));
        if matches!(&record.metadata, Some(Value::Object(map)) if map.is_empty()) {
            record.metadata = None;
        }
        // The handler knows better than the response's `detail`.
        if record.error_details.is_none() {
            record.error_details = error_body.and_then(error_detail);
        }
        record
    }
}

/// The `detail` of a JSON error body, or its text.
fn error_detail(body: &[u8]) -> Option<String> {
    if body.is_empty() {
        return None;
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value) => value.get("detail").map(|detail| {
            detail
                .as_str()
                .map_or_else(|| detail.to_string(), str::to_owned)
        }),
        Err(_) => Some(String::from_utf8_lossy(body).into_owned()),
    }
}

#[cfg(test)]
mod tests {
    use actix_web::test::TestRequest;
    use serde_json::json;

    use nox_audit_model::{Clock, SystemClock};

    use super::*;

    fn pending(request: &actix_web::HttpRequest) -> PendingRecord {
        let mut record = ActionRecord::arrived(Uuid::now_v7(), SystemClock.now(), "GET", "/x");
        record
            .metadata_mut()
            .insert("raw_endpoint".into(), "/%78".into());
        PendingRecord::start(request, record, None, Rc::default(), 10)
    }

    #[test]
    fn what_a_handler_sets_takes_precedence_and_metadata_merges() {
        let request = TestRequest::default().to_http_request();
        let pending = pending(&request);
        record(&request, |r| {
            r.cpu_time_ms = Some(42.0);
            r.error_details = Some("handler".into());
            r.metadata_mut().insert("stdin".into(), json!({"bytes": 1}));
        });
        let record = pending.finish(5, Some(br#"{"detail":"response"}"#));
        assert_eq!(record.cpu_time_ms, Some(42.0));
        assert_eq!(record.error_details.as_deref(), Some("handler"));
        assert_eq!(
            record.metadata,
            Some(json!({"raw_endpoint": "/%78", "stdin": {"bytes": 1}}))
        );
        assert_eq!(record.request_size, 10);
    }

    #[test]
    fn otherwise_the_middleware_measures_and_reads_the_response() {
        let request = TestRequest::default().to_http_request();
        let pending = pending(&request);
        record(&request, |r| r.metadata = Some(json!({})));
        let record = pending.finish(5, Some(br#"{"detail":"response"}"#));
        assert!(record.cpu_time_ms.is_some());
        assert_eq!(record.error_details.as_deref(), Some("response"));
        assert_eq!(record.metadata, None, "empty metadata is stored as NULL");
    }

    /// A handler (an embedder's, or a bug) cannot rewrite what the request
    /// was: a reused id would make its whole batch fail on the primary key.
    #[test]
    fn a_handler_cannot_rewrite_the_arrival() {
        let request = TestRequest::default().to_http_request();
        let pending = pending(&request);
        let arrived = pending.read(|r| r.clone());
        record(&request, |r| {
            r.id = Uuid::nil();
            r.request_id = Uuid::nil();
            r.timestamp = time::OffsetDateTime::UNIX_EPOCH;
            r.endpoint = "/elsewhere".into();
            r.http_method = "HEAD".into();
            r.client_ip = Some([10, 0, 0, 1].into());
            r.user_agent = Some("forged".into());
            r.file_path = Some("kept".into());
        });
        let record = pending.finish(5, None);
        assert_eq!(
            (record.id, record.request_id, record.timestamp),
            (arrived.id, arrived.request_id, arrived.timestamp)
        );
        assert_eq!(
            (record.endpoint.as_str(), record.http_method.as_str()),
            ("/x", "GET")
        );
        assert_eq!((record.client_ip, record.user_agent), (None, None));
        assert_eq!(record.response_size, 5, "not measured as a HEAD");
        assert_eq!(record.file_path.as_deref(), Some("kept"));
    }

    #[test]
    fn a_write_after_completion_is_ignored() {
        let request = TestRequest::default().to_http_request();
        pending(&request).finish(0, None);
        let mut called = false;
        record(&request, |_| called = true);
        assert!(!called);
    }
}
