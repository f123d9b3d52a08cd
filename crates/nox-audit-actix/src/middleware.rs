//! The audit middleware: mount it outermost, so requests refused by any
//! inner layer (authentication, limits, routing) are recorded too.

use std::cell::Cell;
use std::future::{Ready, ready};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::dev::{Payload, Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{Error, HttpMessage, HttpResponse, ResponseError};
use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use futures_util::{FutureExt, StreamExt};
use ipnet::IpNet;
use uuid::Uuid;

use nox_audit_model::storable::{mark_sanitized, text_from_bytes};
use nox_audit_model::{ActionRecord, Clock, GENERIC_TAXONOMY, SystemClock, Taxonomy};
use nox_audit_store::{AuditMode, AuditSink, SinkError};

use crate::client_ip::client_ip;
use crate::cpu::Metered;
use crate::request_record::{PendingRecord, RequestId};

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// How the middleware classifies, skips and attributes requests.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub taxonomy: Taxonomy,
    /// Exact paths that are not audited (health checks, scrapes).
    pub skip_paths: Vec<String>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    pub mode: AuditMode,
    pub clock: Arc<dyn Clock>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            taxonomy: GENERIC_TAXONOMY,
            skip_paths: vec!["/health".into(), "/metrics".into()],
            trusted_proxies: Vec::new(),
            mode: AuditMode::Durable,
            clock: Arc::new(SystemClock),
        }
    }
}

/// The middleware factory: `App::new().wrap(Audit::new(config, sink))`.
#[derive(Debug, Clone)]
pub struct Audit {
    config: Arc<AuditConfig>,
    sink: AuditSink,
}

impl Audit {
    pub fn new(config: AuditConfig, sink: AuditSink) -> Self {
        Audit {
            config: Arc::new(config),
            sink,
        }
    }
}

impl<S, B> Transform<S, ServiceRequest> for Audit
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<BoxBody>;
    type Error = Error;
    type Transform = AuditMiddleware<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(AuditMiddleware {
            service: Rc::new(service),
            config: Arc::clone(&self.config),
            sink: self.sink.clone(),
        }))
    }
}

#[derive(Debug)]
pub struct AuditMiddleware<S> {
    service: Rc<S>,
    config: Arc<AuditConfig>,
    sink: AuditSink,
}

impl<S, B> Service<ServiceRequest> for AuditMiddleware<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<BoxBody>;
    type Error = Error;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    forward_ready!(service);

    fn call(&self, mut request: ServiceRequest) -> Self::Future {
        let request_id = request
            .headers()
            .get(REQUEST_ID_HEADER)
            .and_then(|value| value.to_str().ok())
            .and_then(|text| Uuid::parse_str(text.trim()).ok())
            .unwrap_or_else(Uuid::now_v7);
        request.extensions_mut().insert(RequestId(request_id));
        let service = Rc::clone(&self.service);

        let audited = self.config.mode != AuditMode::Off
            && !self.config.skip_paths.iter().any(|p| p == request.path());
        if !audited {
            return Box::pin(async move {
                let response = service.call(request).await?.map_into_boxed_body();
                Ok(with_request_id(response, request_id))
            });
        }
        if self.sink.status().is_down() && !is_read_only(request.method()) {
            // Neither the database nor the spool takes records: a change
            // made now could not be accounted for, so refuse it up front.
            let response = unavailable(
                "the audit trail is unavailable: changes are refused until it recovers",
            );
            return Box::pin(ready(Ok(with_request_id(
                request.into_response(response),
                request_id,
            ))));
        }

        let body_bytes = Rc::new(Cell::new(0u64));
        count_request_body(&mut request, Rc::clone(&body_bytes));
        let mut record = ActionRecord {
            client_ip: client_ip(
                request.peer_addr().map(|a| a.ip()),
                request.headers(),
                &self.config.trusted_proxies,
            ),
            ..ActionRecord::arrived(
                request_id,
                self.config.clock.now(),
                request.method().as_str(),
                // The path as routed (percent-decoded), which is what was
                // served and what searches match.
                request.match_info().as_str(),
            )
        };
        if let Some(agent) = request.headers().get(header::USER_AGENT) {
            let (agent, replaced) = text_from_bytes(agent.as_bytes());
            if replaced {
                mark_sanitized(record.metadata_mut(), "user_agent");
            }
            record.user_agent = Some(agent);
        }
        let raw_path = request.path();
        if raw_path != record.endpoint {
            let metadata = record.metadata_mut();
            metadata.insert("raw_endpoint".into(), raw_path.into());
            if percent_encoding::percent_decode_str(raw_path)
                .decode_utf8()
                .is_err()
            {
                mark_sanitized(metadata, "endpoint");
            }
        }
        // Known before the handler runs, for a request whose handler is
        // dropped (the client reset the connection).
        // Of the routed path: `match_pattern()` reads the raw one, which
        // misses a route reached through percent-encoding (`/r%75n`).
        let route = request
            .resource_map()
            .match_pattern(request.match_info().as_str());
        let request_head = request_head_size(&request);
        let pending = PendingRecord::start(&request, record, route, body_bytes, request_head);
        let call = Metered {
            inner: Box::pin(service.call(request)),
            meter: pending.meter.clone(),
        };
        let config = Arc::clone(&self.config);
        let sink = self.sink.clone();
        let durable = config.mode == AuditMode::Durable;
        Box::pin(async move {
            // Dropped while the handler runs (the client reset the
            // connection), the guard still records the request.
            let mut unfinished = Unfinished {
                pending: Some(pending),
                sink: sink.clone(),
                taxonomy: config.taxonomy,
            };
            // A panicking handler is answered 500 and recorded as such (it
            // would otherwise take the connection down, recorded as if the
            // client had left).
            let response = AssertUnwindSafe(call)
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| Err(HandlerPanicked::new(&*panic).into()));
            let mut pending = unfinished.take();
            let response = match response {
                Ok(response) => response,
                Err(error) => {
                    // An error no inner layer turned into a response: record
                    // it with the status it will be answered with.
                    let status = error.as_response_error().status_code();
                    pending.classify(&config.taxonomy, status);
                    let mut record = pending.finish(0, None);
                    if error.as_error::<HandlerPanicked>().is_some() {
                        record.error_details = Some(HandlerPanicked::DETAIL.to_owned());
                    }
                    if let Err(sink_error) = sink.submit(record, durable).await {
                        tracing::error!(%sink_error, "a request's audit record could not be stored");
                    }
                    return Err(error);
                }
            };
            pending.classify(&config.taxonomy, response.status());
            let response = with_request_id(response.map_into_boxed_body(), request_id);
            pending.response_head = response_head_size(response.status(), response.headers());
            let (http_request, response) = response.into_parts();
            let (response, body) = response.into_parts();
            // The record is complete before anything is sent when the body
            // is in memory, when it is known to be empty (the dispatcher
            // never polls it: an empty file's download), and for a HEAD,
            // whose headers are the whole response (actix still pulls and
            // discards a HEAD's streamed body afterwards, unmetered: answer
            // HEAD with the size only, as Nox's `answer_head_as_get` does).
            // Otherwise it completes when the streamed body ends.
            let is_head = pending.read(|record| record.http_method == Method::HEAD.as_str());
            let (sent, body) = match body.try_into_bytes() {
                Ok(bytes) => (bytes.clone(), BoxBody::new(bytes)),
                Err(body) if is_head || body.size() == BodySize::Sized(0) => (Bytes::new(), body),
                Err(body) => {
                    // A client knows a chunked body is complete by its end
                    // marker, sent after the commit; a sized one (or any
                    // body to HTTP/1.0, read to the close) by its bytes.
                    let hold_last = durable
                        && (matches!(body.size(), BodySize::Sized(_))
                            || http_request.version() < actix_web::http::Version::HTTP_11);
                    let body = AuditBody {
                        inner: body,
                        pending: Some(pending),
                        sink,
                        durable,
                        hold_last,
                        sent: 0,
                        held: None,
                        committing: None,
                        finished: false,
                    };
                    return Ok(ServiceResponse::new(
                        http_request,
                        response.set_body(BoxBody::new(body)),
                    ));
                }
            };
            let error_body = pending.read(|record| !record.success).then_some(&sent[..]);
            let record = pending.finish(sent.len() as u64, error_body);
            if let Err(error) = sink.submit(record, durable).await {
                tracing::error!(%error, "a request's audit record could not be stored");
                let refusal = with_request_id(
                    ServiceResponse::new(
                        http_request,
                        unavailable("the audit trail is unavailable"),
                    ),
                    request_id,
                );
                return Ok(refusal);
            }
            Ok(ServiceResponse::new(http_request, response.set_body(body)))
        })
    }
}

/// A handler panicked: answered like any internal error.
#[derive(Debug)]
struct HandlerPanicked;

impl HandlerPanicked {
    const DETAIL: &str = "the request handler panicked";

    fn new(panic: &(dyn std::any::Any + Send)) -> Self {
        let message = panic
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        tracing::error!(panic = message, "a request handler panicked");
        HandlerPanicked
    }
}

impl std::fmt::Display for HandlerPanicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(Self::DETAIL)
    }
}

impl ResponseError for HandlerPanicked {
    fn error_response(&self) -> HttpResponse {
        HttpResponse::InternalServerError().json(serde_json::json!({
            "detail": "internal server error",
            "code": "internal",
        }))
    }
}

fn is_read_only(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

fn unavailable(detail: &str) -> HttpResponse {
    HttpResponse::ServiceUnavailable().json(serde_json::json!({
        "detail": detail,
        "code": "service_unavailable",
    }))
}

fn with_request_id(
    mut response: ServiceResponse<BoxBody>,
    request_id: Uuid,
) -> ServiceResponse<BoxBody> {
    if let Ok(value) = HeaderValue::from_str(&request_id.to_string()) {
        response
            .headers_mut()
            .insert(HeaderName::from_static(REQUEST_ID_HEADER), value);
    }
    response
}

/// Counts the request body's bytes as the handler reads them.
fn count_request_body(request: &mut ServiceRequest, counter: Rc<Cell<u64>>) {
    let payload = request.take_payload();
    let counted = payload.map(move |chunk| {
        if let Ok(bytes) = &chunk {
            counter.set(counter.get() + bytes.len() as u64);
        }
        chunk
    });
    request.set_payload(Payload::from(
        Box::pin(counted) as Pin<Box<dyn futures_util::Stream<Item = _>>>
    ));
}

fn headers_size(headers: &HeaderMap) -> u64 {
    headers
        .iter()
        .map(|(name, value)| (name.as_str().len() + value.len() + 4) as u64)
        .sum()
}

/// The request line and headers as they arrived (HTTP/1.1 framing).
fn request_head_size(request: &ServiceRequest) -> u64 {
    let target = request
        .uri()
        .path_and_query()
        .map_or(1, |pq| pq.as_str().len());
    (request.method().as_str().len() + 1 + target + 11) as u64 + headers_size(request.headers()) + 2
}

/// The status line and headers, plus the `content-length` and `date`
/// headers actix adds when it writes them.
fn response_head_size(status: StatusCode, headers: &HeaderMap) -> u64 {
    let reason = status.canonical_reason().map_or(0, str::len);
    (13 + reason + 2) as u64 + headers_size(headers) + 40 + 37 + 2
}

/// The status recorded for a request whose client went away before the
/// whole response was delivered (nginx's "client closed request").
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

/// What the record of a request whose client went away says.
const CLIENT_CLOSED_DETAIL: &str = "the client closed the connection before the response ended";

/// A request's record while its handler runs.
struct Unfinished {
    pending: Option<PendingRecord>,
    sink: AuditSink,
    taxonomy: Taxonomy,
}

impl Unfinished {
    fn take(&mut self) -> PendingRecord {
        self.pending.take().expect("taken once")
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(mut pending) = self.pending.take() {
            let status = StatusCode::from_u16(CLIENT_CLOSED_REQUEST).expect("a valid status");
            pending.classify(&self.taxonomy, status);
            let mut record = pending.finish(0, None);
            record
                .error_details
                .get_or_insert_with(|| CLIENT_CLOSED_DETAIL.to_owned());
            queue_detached(self.sink.clone(), record);
        }
    }
}

/// A streamed response body: counts what is sent and completes the record
/// when the body ends. In durable mode the end of the response waits for
/// the commit, so a client never has the whole response of a request that
/// left no record: the end marker of a chunked body, or the last chunk of a
/// sized one. Chunks before flow at once (a live stream's events are not
/// held back until the next one).
struct AuditBody {
    inner: BoxBody,
    pending: Option<PendingRecord>,
    sink: AuditSink,
    durable: bool,
    /// Hold each chunk until the next one shows it was not the last.
    hold_last: bool,
    sent: u64,
    held: Option<Bytes>,
    committing: Option<LocalBoxFuture<'static, Result<(), SinkError>>>,
    finished: bool,
}

impl MessageBody for AuditBody {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        self.inner.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        loop {
            if let Some(commit) = &mut this.committing {
                let result = std::task::ready!(commit.as_mut().poll(cx));
                this.committing = None;
                if let Err(error) = result {
                    tracing::error!(%error, "a streamed response's audit record could not be stored");
                    return Poll::Ready(Some(Err(Box::new(error))));
                }
            }
            if this.finished {
                return Poll::Ready(this.held.take().map(Ok));
            }
            let meter = this
                .pending
                .as_ref()
                .map(|p| p.meter.clone())
                .unwrap_or_default();
            let inner = &mut this.inner;
            let polled = meter.measure(|| Pin::new(inner).poll_next(cx));
            match polled {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => {
                    this.sent += chunk.len() as u64;
                    if !this.hold_last {
                        return Poll::Ready(Some(Ok(chunk)));
                    }
                    if let Some(previous) = this.held.replace(chunk) {
                        return Poll::Ready(Some(Ok(previous)));
                    }
                }
                Poll::Ready(Some(Err(error))) => {
                    this.finished = true;
                    this.submit_in_background("the response body failed", None);
                    return Poll::Ready(Some(Err(error)));
                }
                Poll::Ready(None) => {
                    this.finished = true;
                    if let Some(pending) = this.pending.take() {
                        let record = pending.finish(this.sent, None);
                        if this.durable {
                            let sink = this.sink.clone();
                            this.committing =
                                Some(Box::pin(async move { sink.submit(record, true).await }));
                        } else {
                            queue_detached(this.sink.clone(), record);
                        }
                    }
                }
            }
        }
    }
}

impl AuditBody {
    /// Completes the record without waiting (the client is gone or the body
    /// failed: nobody waits for the commit).
    /// `status` replaces the one sent (the client went away).
    fn submit_in_background(&mut self, error: &str, status: Option<u16>) {
        if let Some(pending) = self.pending.take() {
            let mut record = pending.finish(self.sent, None);
            if let Some(status) = status {
                record.status_code = status as i16;
                record.success = false;
            }
            record.error_details.get_or_insert_with(|| error.to_owned());
            queue_detached(self.sink.clone(), record);
        }
    }
}

impl Drop for AuditBody {
    fn drop(&mut self) {
        // The client disconnected before the body ended: still record it.
        self.submit_in_background(CLIENT_CLOSED_DETAIL, Some(CLIENT_CLOSED_REQUEST));
    }
}

fn queue_detached(sink: AuditSink, record: ActionRecord) {
    if let Err(error) = sink.submit_detached(record) {
        tracing::error!(%error, "an audit record could not be queued");
    }
}
