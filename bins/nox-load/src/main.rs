//! `nox-load`: sends GET requests at a constant rate for a fixed time and
//! prints latency percentiles. Open loop: each request is due at its own
//! time whatever the earlier ones do, and its latency counts from when it
//! was due, so a stalled server shows up in the tail instead of quietly
//! lowering the rate (wrk's closed loop cannot show that).
//!
//!   nox-load --rate 20000 --seconds 8 --header "Authorization: Bearer …" URL

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use tokio::sync::Mutex;

#[derive(Debug, Parser)]
#[command(
    name = "nox-load",
    about = "Constant-rate HTTP GET load; prints latency percentiles."
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
    /// Requests still unanswered after this many seconds count as errors.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    url: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.rate > 0, "--rate must be at least 1");
    let mut headers = reqwest::header::HeaderMap::new();
    for header in &args.headers {
        let (name, value) = header
            .split_once(':')
            .with_context(|| format!("{header:?} is not \"Name: value\""))?;
        headers.insert(
            reqwest::header::HeaderName::from_bytes(name.trim().as_bytes())?,
            value.trim().parse()?,
        );
    }
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(args.timeout))
        .pool_max_idle_per_host(1024)
        .build()?;
    let total = args.rate as u64 * args.seconds;
    let interval = Duration::from_secs(1) / args.rate;
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = start + interval * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let (client, url) = (client.clone(), args.url.clone());
        let (latencies, errors) = (Arc::clone(&latencies), Arc::clone(&errors));
        tasks.push(tokio::spawn(async move {
            let ok = match client.get(&url).send().await {
                Ok(response) => response.status().is_success() && response.bytes().await.is_ok(),
                Err(_) => false,
            };
            if ok {
                latencies.lock().await.push(due.elapsed());
            } else {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut latencies = latencies.lock().await.clone();
    latencies.sort();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "rate {} req/s for {} s: {} ok, {} errors, achieved {:.0} req/s; latency ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
        args.rate,
        args.seconds,
        latencies.len(),
        errors.load(std::sync::atomic::Ordering::Relaxed),
        latencies.len() as f64 / elapsed,
        percentile(0.50),
        percentile(0.90),
        percentile(0.99),
        percentile(1.0)
    );
    Ok(())
}
