//! `nox-load`: sends GET requests at a constant rate for a fixed time and
//! prints latency percentiles, for the 2xx answers and for each status
//! answered. Open loop: each request is due at its own time whatever the
//! earlier ones do, and its latency counts from when it was due, so a
//! stalled server shows up in the tail instead of quietly lowering the rate
//! (wrk's closed loop cannot show that).
//!
//!   nox-load --rate 20000 --seconds 8 --header "Authorization: Bearer …" URL
//!   nox-load --rate 2000 --seconds 10 --random-bearer 20000 URL   # a token flood
//!
//! Lean by design, so that it can drive a server near its peak from the
//! same small machine: one thread for the connections, a fixed set of
//! keep-alive connections speaking plain HTTP/1.1, request buffers made up
//! front and written as they are (one, or `--random-bearer`'s N in turn). A pacing thread releases the requests (Tokio's timer
//! ticks in whole milliseconds, which alone would add up to a millisecond
//! to every latency), at most 200 µs before they are due; a free connection
//! sends the oldest released request at once. A request sent early counts
//! from its send; when every connection is busy, requests leave late and
//! count from their due time, so the wait is part of their latency.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
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
    about = "Constant-rate (open-loop) HTTP/1.1 GET load; prints latency percentiles per status."
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
    /// Also print each second's percentiles of the 2xx answers (by due
    /// time).
    #[arg(long)]
    per_second: bool,
    /// Send each request with `Authorization: Bearer nox_<64 hex digits>`,
    /// taking N distinct random tokens, made up front, in turn (a flood of
    /// well-formed tokens no server knows).
    #[arg(long, value_name = "N")]
    random_bearer: Option<usize>,
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
    /// The request buffers, sent in turn.
    requests: Vec<Vec<u8>>,
    next_request: Cell<usize>,
    /// Released requests, by due time, oldest first.
    due: RefCell<VecDeque<Instant>>,
    released: Notify,
    /// Set once the pacer has released every request.
    all_released: Cell<bool>,
    /// Every answer to a request due after the warm-up.
    answers: RefCell<Vec<Answer>>,
    last_answer: Cell<Option<Instant>>,
    /// Requests due after the warm-up that got no answer (time-out, closed
    /// or refused connection, unreadable response).
    unanswered: Cell<u64>,
}

/// One answered request.
#[derive(Debug, Clone, Copy)]
struct Answer {
    /// When it was due, from the end of the warm-up.
    due: Duration,
    latency: Duration,
    status: u16,
}

impl Shared {
    /// The next request buffer to send.
    fn next_request(&self) -> &[u8] {
        let index = self.next_request.get();
        self.next_request.set((index + 1) % self.requests.len());
        &self.requests[index]
    }

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
    let (address, head) = request_head(&args.url, &args.headers)?;
    let requests = match args.random_bearer {
        Some(0) => bail!("--random-bearer must be at least 1"),
        Some(count) => random_tokens(count, seed())
            .iter()
            .map(|token| finish_request(&head, Some(token)))
            .collect(),
        None => vec![finish_request(&head, None)],
    };
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
        requests,
        answers: RefCell::new(Vec::with_capacity(total as usize)),
        ..Shared::default()
    });
    let timeout = Duration::from_secs(args.timeout);
    let local = tokio::task::LocalSet::new();
    let connections = args.connections.min((args.rate as usize / 10).max(1));
    for _ in 0..connections {
        let shared = Rc::clone(&shared);
        local.spawn_local(connection(address, shared, measured_from, timeout));
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
    // Achieved rate: 2xx answers over the time from the first measured
    // request to the last answer (not to the end of the last time-out).
    let elapsed = shared
        .last_answer
        .get()
        .map_or(0.0, |at| at.duration_since(measured_from).as_secs_f64())
        .max(args.seconds as f64);
    let answers = shared.answers.take();
    if args.per_second {
        for second in 0..args.seconds {
            let window = Duration::from_secs(second)..Duration::from_secs(second + 1);
            let in_window = answers.iter().filter(|a| window.contains(&a.due));
            println!("second {second}: {}", Summary::of(in_window).ok);
        }
    }
    let summary = Summary::of(&answers);
    let ok = summary.ok.0.len();
    let errors = answers.len() - ok + shared.unanswered.get() as usize;
    println!(
        "rate {} req/s for {} s: {ok} ok, {errors} errors, achieved {:.0} req/s; {}",
        args.rate,
        args.seconds,
        ok as f64 / elapsed,
        summary.ok
    );
    for (status, latencies) in &summary.by_status {
        println!(
            "status {status}: {} answers, {latencies}",
            latencies.0.len()
        );
    }
    if shared.unanswered.get() > 0 {
        println!("unanswered: {}", shared.unanswered.get());
    }
    Ok(())
}

/// The answers' latencies: of the 2xx ones together (the load's "ok"), and
/// per status.
#[derive(Debug)]
struct Summary {
    ok: Percentiles,
    by_status: BTreeMap<u16, Percentiles>,
}

impl Summary {
    fn of<'a>(answers: impl IntoIterator<Item = &'a Answer>) -> Self {
        let mut ok = Vec::new();
        let mut by_status: BTreeMap<u16, Vec<Duration>> = BTreeMap::new();
        for answer in answers {
            if (200..300).contains(&answer.status) {
                ok.push(answer.latency);
            }
            by_status
                .entry(answer.status)
                .or_default()
                .push(answer.latency);
        }
        Summary {
            ok: Percentiles::of(ok),
            by_status: by_status
                .into_iter()
                .map(|(status, latencies)| (status, Percentiles::of(latencies)))
                .collect(),
        }
    }
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

/// The server's address and the request's head up to its last header
/// line (without the blank line that ends it).
fn request_head(url: &str, headers: &[String]) -> anyhow::Result<(SocketAddr, String)> {
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
    let mut head = format!("GET {target} HTTP/1.1\r\nHost: {authority}\r\n");
    for header in headers {
        let (name, value) = header
            .split_once(':')
            .with_context(|| format!("{header:?} is not \"Name: value\""))?;
        head.push_str(&format!("{}: {}\r\n", name.trim(), value.trim()));
    }
    Ok((address, head))
}

/// A whole request: the head, a bearer token if given, the blank line.
fn finish_request(head: &str, bearer: Option<&str>) -> Vec<u8> {
    let mut request = head.to_owned();
    if let Some(token) = bearer {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    request.push_str("\r\n");
    request.into_bytes()
}

/// `count` distinct tokens of Nox's own form, `nox_` and 64 hex digits.
/// SplitMix64 maps successive states one-to-one to its outputs, so no two
/// of the first 2^64 outputs are equal, and each token begins with a
/// different one.
fn random_tokens(count: usize, seed: u64) -> Vec<String> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    (0..count)
        .map(|_| {
            let words = [next(), next(), next(), next()];
            format!(
                "nox_{:016x}{:016x}{:016x}{:016x}",
                words[0], words[1], words[2], words[3]
            )
        })
        .collect()
}

/// A different seed each run (no two runs send the same tokens).
fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ u64::from(std::process::id()).rotate_left(32)
}

/// One keep-alive connection taking due requests until none are left.
async fn connection(
    address: SocketAddr,
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
            stream.write_all(shared.next_request()).await?;
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
            Ok(Ok(status)) => {
                let latency = counted_from.elapsed();
                shared.last_answer.set(Some(Instant::now()));
                shared.answers.borrow_mut().push(Answer {
                    due: due_after_warmup,
                    latency,
                    status,
                });
            }
            _ => shared.unanswered.set(shared.unanswered.get() + 1),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_tokens_are_distinct_and_well_formed() {
        let tokens = random_tokens(20_000, 7);
        let distinct: std::collections::HashSet<_> = tokens.iter().collect();
        assert_eq!(distinct.len(), 20_000);
        for token in &tokens {
            let digits = token.strip_prefix("nox_").expect("nox_ prefix");
            assert_eq!(digits.len(), 64, "{token}");
            assert!(digits.bytes().all(|b| b.is_ascii_hexdigit()), "{token}");
        }
        assert_ne!(random_tokens(1, 8), random_tokens(1, 7), "seeds differ");
    }

    #[test]
    fn requests_carry_the_headers_and_the_bearer() {
        let (address, head) = request_head(
            "http://127.0.0.1:8099/me?x=1",
            &["X-Test:  yes ".to_owned()],
        )
        .expect("valid");
        assert_eq!(address, "127.0.0.1:8099".parse().expect("address"));
        let plain = finish_request(&head, None);
        assert_eq!(
            plain,
            b"GET /me?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8099\r\nX-Test: yes\r\n\r\n"
        );
        let flood = finish_request(&head, Some("nox_00"));
        assert!(flood.ends_with(b"X-Test: yes\r\nAuthorization: Bearer nox_00\r\n\r\n"));
        assert!(request_head("https://127.0.0.1/", &[]).is_err());
        assert!(request_head("http://127.0.0.1/", &["no colon".to_owned()]).is_err());
    }

    #[test]
    fn answers_are_summarised_per_status_and_2xx_together() {
        let answer = |millis, status| Answer {
            due: Duration::ZERO,
            latency: Duration::from_millis(millis),
            status,
        };
        let answers = [
            answer(3, 200),
            answer(1, 204),
            answer(2, 200),
            answer(40, 429),
            answer(10, 429),
            answer(5, 503),
        ];
        let summary = Summary::of(&answers);
        assert_eq!(summary.ok.0.len(), 3);
        assert_eq!(summary.ok.millis(0.0), 1.0);
        assert_eq!(summary.ok.millis(1.0), 3.0);
        let counts: Vec<_> = summary
            .by_status
            .iter()
            .map(|(status, latencies)| (*status, latencies.0.len()))
            .collect();
        assert_eq!(counts, [(200, 2), (204, 1), (429, 2), (503, 1)]);
        assert_eq!(summary.by_status[&429].millis(0.5), 40.0);
        assert_eq!(summary.by_status[&429].millis(0.0), 10.0);
        assert!(
            Summary::of(&[]).ok.millis(0.99).is_nan(),
            "no answers: no figure"
        );
    }

    #[test]
    fn requests_are_sent_in_turn() {
        let shared = Shared {
            requests: vec![b"a".to_vec(), b"b".to_vec()],
            ..Shared::default()
        };
        let sent: Vec<_> = (0..5).map(|_| shared.next_request().to_vec()).collect();
        assert_eq!(sent, [b"a", b"b", b"a", b"b", b"a"]);
    }
}
