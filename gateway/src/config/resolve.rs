//! The loader's one lookup: endpoints of `static` upstreams written as
//! host names get their addresses (every one the system resolver gives),
//! and an endpoint an upstream lists twice (the same address, however
//! written) is an error. `dns` and `srv` upstreams are looked up while
//! running (`runtime::discovery`), never here. Kept out of validation, which does no I/O but read the files the
//! config names; a reload runs the loader off the async workers.

use std::net::{SocketAddr, ToSocketAddrs};

use super::error::Diagnostic;
use super::model::Config;
use super::validate::{endpoint_error, Lookup, ENDPOINT_FIX};

/// Look up `lookups` (in file order) into `config`'s endpoints; every
/// problem, with where it is written.
pub fn endpoints(mut config: Option<&mut Config>, lookups: &[Lookup]) -> Vec<Diagnostic> {
    let mut errors = Vec::new();
    // The addresses an upstream lists so far, as written in order.
    let mut seen: Vec<(&str, SocketAddr)> = Vec::new();
    for l in lookups {
        let addresses = match l.address {
            Some(a) => vec![a],
            None => match look_up(&l.addr) {
                Ok(a) => a,
                Err(why) => {
                    errors.push(
                        Diagnostic::new(l.span.clone(), endpoint_error(&l.addr, &why))
                            .fix(ENDPOINT_FIX),
                    );
                    continue;
                }
            },
        };
        let mut kept = Vec::with_capacity(addresses.len());
        for address in addresses {
            if seen.iter().any(|(u, a)| *u == l.upstream && *a == address) {
                errors.push(
                    Diagnostic::new(
                        l.span.clone(),
                        format!("upstream `{}` lists endpoint {address} twice", l.upstream),
                    )
                    .fix("list each endpoint once; use { addr = \"...\", weight = N } to send it more traffic"),
                );
                continue;
            }
            seen.push((&l.upstream, address));
            kept.push(address);
        }
        let endpoint = config
            .as_deref_mut()
            .and_then(|c| c.upstreams.iter_mut().find(|u| u.name == l.upstream))
            .and_then(|u| u.endpoints.get_mut(l.index));
        if let Some(e) = endpoint {
            e.sockets = kept;
        }
    }
    errors
}

/// Every address of `addr` (`HOST:PORT`), each once, in the resolver's order.
fn look_up(addr: &str) -> Result<Vec<SocketAddr>, String> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    match addr.to_socket_addrs() {
        Ok(found) => {
            let mut all: Vec<SocketAddr> = Vec::new();
            for a in found {
                if !all.contains(&a) {
                    all.push(a);
                }
            }
            if all.is_empty() {
                Err(format!("host `{host}` resolved to no address"))
            } else {
                Ok(all)
            }
        }
        Err(e) => Err(format!("cannot resolve host `{host}`: {e}")),
    }
}
