//! Leaf types every layer shares: host names and patterns ([`host`]),
//! identity patterns ([`identity`]) and the normal form of a path
//! ([`path`]). They import nothing of meshgate's.

pub mod host;
pub mod identity;
pub mod path;
