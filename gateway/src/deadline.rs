//! A connection's deadlines kept with one timer: registering a timer
//! costs about as much as the wait it bounds, so one timer, armed for the
//! earliest deadline, serves every wait of a connection (its idle waits,
//! and the fast lane's waits for its upstream) and is set again only when
//! it fires before the deadline asked for.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

/// A connection's idle deadline, kept with one of Pingora's (10 ms coarse)
/// timers that outlives the wait that set it. Registering a timer costs
/// about as much as the rest of the wait; a timer set by an earlier wait
/// fires before this one's deadline, and is then set again for the rest.
#[derive(Default)]
pub struct IdleTimer {
    /// When the armed timer fires, and the timer.
    armed: Option<(Instant, Sleep)>,
}

type Sleep = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Pingora's timer resolution: a deadline this close counts as reached.
pub const TIMER_SLACK: Duration = Duration::from_millis(10);

impl IdleTimer {
    /// Done once `deadline` has passed. Dropping this keeps the timer for
    /// the next wait.
    pub async fn until(&mut self, deadline: Instant) {
        loop {
            match &mut self.armed {
                Some((fires, sleep)) if *fires <= deadline => {
                    sleep.as_mut().await;
                    self.armed = None;
                    let now = Instant::now();
                    if now + TIMER_SLACK >= deadline {
                        return;
                    }
                    self.arm(deadline, deadline - now);
                }
                // None yet, or one for a later deadline (a reload shortened
                // `idle_timeout`).
                _ => self.arm(deadline, deadline.saturating_duration_since(Instant::now())),
            }
        }
    }

    fn arm(&mut self, deadline: Instant, rest: Duration) {
        let sleep = pingora::time::fast_timeout::fast_sleep(rest);
        self.armed = Some((deadline, Box::pin(sleep)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_timer_serves_several_waits_and_none_ends_early() {
        let mut idle = IdleTimer::default();
        let start = Instant::now();
        let first = start + Duration::from_millis(150);
        // A wait cut short by its read: the timer stays armed.
        let cut = tokio::time::timeout(Duration::from_millis(20), idle.until(first)).await;
        assert!(cut.is_err(), "fired before its deadline");
        assert_eq!(idle.armed.as_ref().map(|(at, _)| *at), Some(first));

        // The next wait, with a later deadline, keeps that timer until it
        // fires, then sets one for the rest.
        let second = Instant::now() + Duration::from_millis(300);
        let cut = tokio::time::timeout(Duration::from_millis(20), idle.until(second)).await;
        assert!(cut.is_err());
        assert_eq!(idle.armed.as_ref().map(|(at, _)| *at), Some(first));
        idle.until(second).await;
        assert!(
            Instant::now() + TIMER_SLACK >= second,
            "ended before the deadline"
        );

        // A shorter deadline than the armed one (a reload) gets its own timer.
        let later = Instant::now() + Duration::from_secs(60);
        let _ = tokio::time::timeout(Duration::from_millis(5), idle.until(later)).await;
        let sooner = Instant::now() + Duration::from_millis(50);
        tokio::time::timeout(Duration::from_secs(5), idle.until(sooner))
            .await
            .expect("a timer for the sooner deadline");
        assert!(Instant::now() + TIMER_SLACK >= sooner);
    }
}
