//! Client connections before a request reaches the proxy: request heads
//! read whole and within their limits ([`head`]), under a memory budget
//! shared by every connection ([`pending`]).

pub mod head;
pub mod pending;
