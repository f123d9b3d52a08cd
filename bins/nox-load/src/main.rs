//! `nox-load`: sends GET requests at a constant rate for a fixed time and
//! prints latency percentiles. Open loop: each request is due at its own
//! time whatever the earlier ones do, and its latency counts from when it
//! was due, so a stalled server shows up in the tail instead of quietly
//! lowering the rate (wrk's closed loop cannot show that).
//!
//!   nox-load --rate 20000 --seconds 8 --header "Authorization: Bearer …" URL
//!
//! Lean by design, so that it can drive a server near its peak from the
//! same small machine: one thread for the connections, a fixed set of
//! keep-alive connections speaking plain HTTP/1.1, one request buffer
//! written as is. A pacing thread releases the requests (Tokio's timer
//! ticks in whole milliseconds, which alone would add up to a millisecond
//! to every latency), at most 200 µs before they are due; a free connection
//! sends the oldest released request at once. A request sent early counts
//! from its send; when every connection is busy, requests leave late and
//! count from their due time, so the wait is part of their latency.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

#[derive(Debug, Parser)]
#[command(
    name = "nox-load",
    about = "Constant-rate (open-loop) HTTP/1.1 GET load; prints latency percentiles."
)]
struct Args {
    /// Requests per second.
    #[arg(long)]
    rate: u32,
    /// How long to send for.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Extra request headers, "Name: value".
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Requests still unanswered after this many seconds count as errors
    /// (and their connection is opened again).
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    /// Keep-alive connections, each with at most one request in flight; at
    /// most one per 10 req/s of `--rate`, so that none idles past a
    /// server's keep-alive timeout.
    #[arg(long, default_value_t = 256)]
    connections: usize,
    /// Requests due in the first this many seconds are sent but not
    /// counted (connections, caches and thread pools warm up).
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Also print each second's percentiles (by due time).
    #[arg(long)]
    per_second: bool,
    /// `http://host:port/path?query` (plain HTTP only).
    url: String,
}

/// The pacer releases requests up to this long before they are due (never
/// after), and wakes at most twice per window; the load's shape changes by
/// less than this.
const RELEASE_WINDOW: Duration = Duration::from_micros(200);

/// What every connection shares (one thread: no locks).
#[derive(Debug, Default)]
struct Shared {
    /// Released requests, by due time, oldest first.
    due: RefCell<VecDeque<Instant>>,
    released: Notify,
    /// Set once the pacer has released every request.
    all_released: Cell<bool>,
    /// Per answered request: when it was due (after the warm-up), its
    /// latency.
    latencies: RefCell<Vec<(Duration, Duration)>>,
    last_answer: Cell<Option<Instant>>,
    errors: Cell<u64>,
}

impl Shared {
    /// The oldest released request's due time; `None` once all were taken.
    async fn take(&self) -> Option<Instant> {
        loop {
            if let Some(due) = self.due.borrow_mut().pop_front() {
                return Some(due);
            }
            if self.all_released.get() {
                return None;
            }
            self.released.notified().await;
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.rate > 0, "--rate must be at least 1");
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    let (address, request) = build_request(&args.url, &args.headers)?;
    let total = args.rate as u64 * (args.warmup + args.seconds);
    let start = Instant::now() + Duration::from_millis(200);
    let interval = Duration::from_secs(1) / args.rate;
    let measured_from = start + Duration::from_secs(args.warmup);
    let (release, mut released) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let due = |index: u64| start + interval.mul_f64(index as f64);
        let mut index = 0;
        while index < total {
            let horizon = Instant::now() + RELEASE_WINDOW;
            while index < total && due(index) <= horizon {
                if release.send(due(index)).is_err() {
                    return;
                }
                index += 1;
            }
            if index < total {
                // The next request is due after the horizon: wake before it
                // is, but not sooner than half a window from now.
                let wake = (due(index) - RELEASE_WINDOW).max(Instant::now() + RELEASE_WINDOW / 2);
                if let Some(wait) = wake.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        }
    });
    let shared = Rc::new(Shared {
        latencies: RefCell::new(Vec::with_capacity(total as usize)),
        ..Shared::default()
    });
    let timeout = Duration::from_secs(args.timeout);
    let request = Rc::new(request);
    let local = tokio::task::LocalSet::new();
    let connections = args.connections.min((args.rate as usize / 10).max(1));
    for _ in 0..connections {
        let (shared, request) = (Rc::clone(&shared), Rc::clone(&request));
        local.spawn_local(connection(address, request, shared, measured_from, timeout));
    }
    let pacer_shared = Rc::clone(&shared);
    local.spawn_local(async move {
        while let Some(due) = released.recv().await {
            pacer_shared.due.borrow_mut().push_back(due);
            pacer_shared.released.notify_one();
        }
        pacer_shared.all_released.set(true);
        pacer_shared.released.notify_waiters();
    });
    local.await;
    // Achieved rate: answers over the time from the first measured request
    // to the last answer (not to the end of the last time-out).
    let elapsed = shared
        .last_answer
        .get()
        .map_or(0.0, |at| at.duration_since(measured_from).as_secs_f64())
        .max(args.seconds as f64);
    let answered = shared.latencies.take();
    let errors = shared.errors.get();
    if args.per_second {
        for second in 0..args.seconds {
            let window = Duration::from_secs(second)..Duration::from_secs(second + 1);
            let latencies = answered
                .iter()
                .filter(|(due, _)| window.contains(due))
                .map(|(_, latency)| *latency)
                .collect();
            println!("second {second}: {}", Percentiles::of(latencies));
        }
    }
    let count = answered.len();
    println!(
        "rate {} req/s for {} s: {count} ok, {} errors, achieved {:.0} req/s; {}",
        args.rate,
        args.seconds,
        errors,
        count as f64 / elapsed,
        Percentiles::of(answered.into_iter().map(|(_, latency)| latency).collect())
    );
    Ok(())
}

/// Latency percentiles, printed in milliseconds.
#[derive(Debug)]
struct Percentiles(Vec<Duration>);

impl Percentiles {
    fn of(mut latencies: Vec<Duration>) -> Self {
        latencies.sort();
        Percentiles(latencies)
    }

    fn millis(&self, p: f64) -> f64 {
        let index = ((self.0.len() as f64 * p) as usize).min(self.0.len().saturating_sub(1));
        self.0
            .get(index)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "latency ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
            self.millis(0.50),
            self.millis(0.90),
            self.millis(0.99),
            self.millis(1.0)
        )
    }
}

/// The server's address and the request's bytes.
fn build_request(url: &str, headers: &[String]) -> anyhow::Result<(SocketAddr, Vec<u8>)> {
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("{url:?} is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        bail!("{url:?}: only http:// URLs are supported");
    }
    let authority = uri.authority().context("the URL has no host")?;
    let address = std::net::ToSocketAddrs::to_socket_addrs(&(
        authority.host(),
        authority.port_u16().unwrap_or(80),
    ))?
    .next()
    .with_context(|| format!("{} does not resolve", authority.host()))?;
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = format!("GET {target} HTTP/1.1\r\nHost: {authority}\r\n");
    for header in headers {
        let (name, value) = header
            .split_once(':')
            .with_context(|| format!("{header:?} is not \"Name: value\""))?;
        request.push_str(&format!("{}: {}\r\n", name.trim(), value.trim()));
    }
    request.push_str("\r\n");
    Ok((address, request.into_bytes()))
}

/// One keep-alive connection taking due requests until none are left.
async fn connection(
    address: SocketAddr,
    request: Rc<Vec<u8>>,
    shared: Rc<Shared>,
    measured_from: Instant,
    timeout: Duration,
) {
    // Connected before the first request is due, so the first latencies do
    // not include the handshake.
    let mut stream = TcpStream::connect(address)
        .await
        .and_then(|stream| stream.set_nodelay(true).map(|()| stream))
        .ok();
    let mut buffer = Vec::with_capacity(16 * 1024);
    while let Some(due) = shared.take().await {
        // Released up to a window early: then the latency counts from the
        // send; sent late (every connection was busy): from the due time.
        let counted_from = due.min(Instant::now());
        let exchange = async {
            if stream.is_none() {
                let connected = TcpStream::connect(address).await?;
                connected.set_nodelay(true)?;
                stream = Some(connected);
            }
            let stream = stream.as_mut().expect("connected above");
            stream.write_all(&request).await?;
            read_response(stream, &mut buffer).await
        };
        let outcome = tokio::time::timeout(timeout, exchange).await;
        if matches!(outcome, Ok(Err(_)) | Err(_)) {
            stream = None;
        }
        // Requests due during the warm-up are sent but not counted.
        let Some(due_after_warmup) = due.checked_duration_since(measured_from) else {
            continue;
        };
        match outcome {
            Ok(Ok(status)) if (200..300).contains(&status) => {
                let latency = counted_from.elapsed();
                shared.last_answer.set(Some(Instant::now()));
                shared
                    .latencies
                    .borrow_mut()
                    .push((due_after_warmup, latency));
            }
            _ => shared.errors.set(shared.errors.get() + 1),
        }
    }
}

/// Reads one response (its head and a `Content-Length` body); returns its
/// status.
async fn read_response(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> anyhow::Result<u16> {
    buffer.clear();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head_len) = response.parse(buffer)? {
            let status = response.code.context("no status")?;
            let body_len: usize = response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .context("nox-load needs responses with a Content-Length")
                .and_then(|h| Ok(std::str::from_utf8(h.value)?.trim().parse()?))?;
            let whole = head_len + body_len;
            while buffer.len() < whole {
                read_more(stream, buffer).await?;
            }
            return Ok(status);
        }
        read_more(stream, buffer).await?;
    }
}

async fn read_more(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> anyhow::Result<()> {
    buffer.reserve(8 * 1024);
    if stream.read_buf(buffer).await? == 0 {
        bail!("the server closed the connection");
    }
    Ok(())
}
