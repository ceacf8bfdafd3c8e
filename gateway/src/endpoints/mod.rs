//! What meshgate knows about each endpoint of an upstream, and the
//! decisions made from it, apart from any HTTP driver: whether an
//! endpoint may get requests now ([`outlier`]: ejected after failing
//! again and again). The runtime keeps one [`outlier::Endpoint`] per
//! endpoint and carries it over a reload for an endpoint that stays; the
//! proxy reports each attempt's outcome.

pub mod outlier;

use std::time::Instant;

/// How one attempt at an endpoint ended, as outlier detection counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer below 500.
    Success,
    /// A connect error, a reset, a timeout, or a 5xx from the endpoint.
    Failure,
}

impl Outcome {
    /// How an answer with this status counts.
    pub fn of_status(status: u16) -> Self {
        if status >= 500 {
            Outcome::Failure
        } else {
            Outcome::Success
        }
    }
}

/// The clock, read at most once per decision and only if it is needed.
#[derive(Debug, Default)]
pub struct Now(Option<Instant>);

impl Now {
    /// A clock fixed at `t`.
    pub fn at(t: Instant) -> Self {
        Now(Some(t))
    }

    pub fn get(&mut self) -> Instant {
        *self.0.get_or_insert_with(Instant::now)
    }
}
