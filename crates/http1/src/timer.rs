//! One timer per connection, re-armed lazily.
//!
//! A keep-alive request moves a connection through several deadlines (idle, head, body,
//! receiver, answer). A tokio timeout per wait registers an entry in the timer wheel and removes
//! it again, each under the driver's lock, twice or more per request. [`Deadline`] keeps one
//! timer for the whole connection instead and only stores each new deadline: the timer is armed
//! at most [`Deadline::new`]'s `period` ahead, so any deadline at least that far off is never
//! earlier than it; when it fires before the deadline it is simply armed again. A request then
//! costs no timer operation at all, and a connection wakes once per `period` while it waits.
//! nginx (lazy timer updates) and HAProxy (a task whose expiry moved later is re-queued only
//! when it fires) avoid the same cost.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

/// A connection's timer: [`Deadline::passed`] resolves once the last deadline set has passed.
#[derive(Debug)]
pub struct Deadline {
    sleep: Pin<Box<Sleep>>,
    /// When `sleep` fires: never after `deadline`.
    armed: Instant,
    deadline: Instant,
    /// How far ahead the timer is armed at most: the shortest timeout the connection uses.
    period: Duration,
}

impl Deadline {
    /// A timer whose first deadline is `now + period`. Deadlines set later that are at least
    /// `period` after the time they are set cost no timer operation.
    pub fn new(now: Instant, period: Duration) -> Self {
        let at = now + period;
        Self {
            sleep: Box::pin(tokio::time::sleep_until(at)),
            armed: at,
            deadline: at,
            period,
        }
    }

    /// Sets the deadline of the next waits.
    pub fn set(&mut self, deadline: Instant) {
        self.deadline = deadline;
        if deadline < self.armed {
            self.arm(deadline);
        }
    }

    fn arm(&mut self, at: Instant) {
        self.sleep.as_mut().reset(at);
        self.armed = at;
    }

    /// Polls the timer: ready once the deadline has passed, re-armed if it fired before.
    fn poll_passed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            ready!(self.sleep.as_mut().poll(cx));
            let now = Instant::now();
            if now >= self.deadline {
                return Poll::Ready(());
            }
            self.arm(self.deadline.min(now + self.period));
        }
    }

    /// Resolves once the deadline has passed; cancel-safe.
    pub async fn passed(&mut self) {
        std::future::poll_fn(|cx| self.poll_passed(cx)).await;
    }

    /// Runs `work` until the deadline; `None` if the deadline passed first.
    pub fn run<F: Future>(&mut self, work: F) -> Run<'_, F> {
        Run {
            work,
            deadline: self,
        }
    }
}

pin_project! {
    /// [`Deadline::run`]'s future: the work, held once, and the timer. (`select!` in an
    /// `async fn` would store the work twice, as argument and as branch, and the work is a
    /// request's whole state, part of every connection's task.)
    #[derive(Debug)]
    #[must_use = "futures do nothing unless polled"]
    pub struct Run<'a, F> {
        #[pin]
        work: F,
        deadline: &'a mut Deadline,
    }
}

impl<F: Future> Future for Run<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.work.poll(cx) {
            return Poll::Ready(Some(out));
        }
        this.deadline.poll_passed(cx).map(|()| None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fires_at_the_deadline_not_the_period() {
        let start = Instant::now();
        let mut d = Deadline::new(start, Duration::from_millis(20));
        // Later than the armed timer: stored only; the timer fires early and re-arms.
        d.set(start + Duration::from_millis(70));
        d.passed().await;
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(70), "{waited:?}");
        assert!(waited < Duration::from_millis(1000), "{waited:?}");
    }

    #[tokio::test]
    async fn an_earlier_deadline_rearms_at_once() {
        let start = Instant::now();
        let mut d = Deadline::new(start, Duration::from_secs(60));
        d.set(start + Duration::from_millis(30));
        d.passed().await;
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(30), "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
    }

    #[tokio::test]
    async fn run_returns_the_work_or_none() {
        let start = Instant::now();
        let mut d = Deadline::new(start, Duration::from_millis(20));
        assert_eq!(d.run(async { 7 }).await, Some(7));
        d.set(Instant::now() + Duration::from_millis(40));
        assert_eq!(d.run(std::future::pending::<()>()).await, None);
        assert!(start.elapsed() >= Duration::from_millis(40));
        // Reusable after firing.
        d.set(Instant::now() + Duration::from_secs(5));
        assert_eq!(d.run(async { 1 }).await, Some(1));
    }
}
