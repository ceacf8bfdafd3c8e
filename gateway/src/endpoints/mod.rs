//! What meshgate knows about each endpoint of an upstream, and the
//! decisions made from it, apart from any HTTP driver: which endpoints may
//! get a request now ([`health`]: active checks; [`outlier`]: ejected
//! after failing again and again; slow start; the panic threshold), which of them does ([`balance`]), and
//! what a request is placed on a hash ring by ([`key`]). [`set`] holds one
//! upstream's endpoints with their records; the runtime carries a record
//! over a reload for an endpoint that stays, and both HTTP drivers report
//! each attempt's outcome to it.

pub mod balance;
pub mod health;
pub mod key;
pub mod outlier;
pub mod set;

use std::cell::Cell;
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
pub struct Now(Cell<Option<Instant>>);

impl Now {
    /// A clock fixed at `t`.
    pub fn at(t: Instant) -> Self {
        Now(Cell::new(Some(t)))
    }

    pub fn get(&self) -> Instant {
        match self.0.get() {
            Some(t) => t,
            None => {
                let t = Instant::now();
                self.0.set(Some(t));
                t
            }
        }
    }
}
