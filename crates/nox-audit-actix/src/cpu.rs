//! CPU spent on one request: the worker thread's CPU time, measured around
//! each poll of the request's future and body (actix workers run one thread
//! each, so time between polls belongs to other requests and is not
//! counted), plus what handlers charge for work they ran on other threads.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use std::time::Duration;

use actix_web::HttpMessage;
use nix::time::{ClockId, clock_gettime};

/// Nanoseconds of CPU this thread has used so far.
fn thread_cpu_nanos() -> u64 {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// The CPU time this thread has used so far. With [`charge_cpu`], for work
/// a handler hands to another thread (a blocking pool), which the
/// middleware's per-poll measurement of the worker thread does not see.
pub fn thread_cpu_time() -> Duration {
    Duration::from_nanos(thread_cpu_nanos())
}

/// Whether the request's CPU is measured (it is audited): callers can skip
/// measuring work on other threads otherwise.
pub fn is_metered<M: HttpMessage>(message: &M) -> bool {
    message.extensions().contains::<CpuMeter>()
}

/// Adds CPU spent on the request on another thread to its record. Does
/// nothing when the request is not audited.
pub fn charge_cpu<M: HttpMessage>(message: &M, cpu: Duration) {
    let meter = message.extensions().get::<CpuMeter>().cloned();
    if let Some(meter) = meter {
        meter.add(cpu.as_nanos() as u64);
    }
}

/// Accumulated CPU nanoseconds of one request.
#[derive(Debug, Clone, Default)]
pub(crate) struct CpuMeter(Rc<Cell<u64>>);

impl CpuMeter {
    pub(crate) fn measure<T>(&self, work: impl FnOnce() -> T) -> T {
        let start = thread_cpu_nanos();
        let result = work();
        self.add(thread_cpu_nanos().saturating_sub(start));
        result
    }

    fn add(&self, nanos: u64) {
        self.0.set(self.0.get() + nanos);
    }

    pub(crate) fn millis(&self) -> f64 {
        // Microsecond precision, as stored.
        (self.0.get() / 1_000) as f64 / 1000.0
    }
}

/// Runs a future, charging the CPU of every poll to `meter`.
pub(crate) struct Metered<F> {
    pub(crate) inner: Pin<Box<F>>,
    pub(crate) meter: CpuMeter,
}

impl<F: Future> Future for Metered<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let inner = this.inner.as_mut();
        this.meter.measure(|| inner.poll(cx))
    }
}
