//! CPU spent on one request: the worker thread's CPU time, measured around
//! each poll of the request's future and body. actix workers run one thread
//! each, so time between polls belongs to other requests and is not counted.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use nix::time::{ClockId, clock_gettime};

/// Nanoseconds of CPU this thread has used so far.
fn thread_cpu_nanos() -> u64 {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Accumulated CPU nanoseconds of one request.
#[derive(Debug, Clone, Default)]
pub(crate) struct CpuMeter(Rc<Cell<u64>>);

impl CpuMeter {
    pub(crate) fn measure<T>(&self, work: impl FnOnce() -> T) -> T {
        let start = thread_cpu_nanos();
        let result = work();
        self.0
            .set(self.0.get() + thread_cpu_nanos().saturating_sub(start));
        result
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
