//! Who the client is when meshgate sits behind other proxies.
//!
//! The peer address is the client unless it is a trusted proxy. Then
//! `x-forwarded-for` is read from the right (the entry the nearest proxy
//! added) and trusted addresses are skipped; the first untrusted address is
//! the client. If every entry is trusted, the leftmost is. Entries that are
//! not IP addresses end the walk (the peer-nearest valid address is used).

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    walk(peer, headers, trusted).0
}

/// The client only when the chain is readable: `None` when a trusted peer
/// sent no `x-forwarded-for`, or an entry that is not an address stopped
/// the walk. Authorization uses this, so an unreadable chain never passes
/// for the proxy's own (trusted, often allowed) address.
pub fn client_ip_known(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> Option<IpAddr> {
    let (ip, known) = walk(peer, headers, trusted);
    known.then_some(ip)
}

fn walk(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> (IpAddr, bool) {
    let peer = peer.to_canonical();
    if !is_trusted(peer, trusted) {
        return (peer, true);
    }
    let mut client = peer;
    // Later header lines were added by nearer proxies, as were later entries.
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    if entries.is_empty() {
        return (peer, false);
    }
    for entry in entries.iter().rev() {
        let Some(ip) = parse_entry(entry) else {
            return (client, false);
        };
        client = ip.to_canonical();
        if !is_trusted(client, trusted) {
            break;
        }
    }
    (client, true)
}

/// An address as proxies write it: `203.0.113.9`, `203.0.113.9:5123`,
/// `2001:db8::1`, `[2001:db8::1]` or `[2001:db8::1]:5123`.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let e = entry.trim();
    if let Ok(ip) = e.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = e.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    e.parse::<std::net::SocketAddr>().ok().map(|a| a.ip())
}

fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|net| net.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_with_ports_and_brackets_are_read_and_garbage_is_unknown() {
        let t: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let p = ip("10.0.0.5");
        for (xff, want) in [
            ("198.51.100.7:5123", "198.51.100.7"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("[2001:db8::1]:443", "2001:db8::1"),
        ] {
            assert_eq!(
                client_ip_known(p, &headers(&[xff]), &t),
                Some(ip(want)),
                "{xff}"
            );
        }
        // Unreadable or missing chains: rate limiting falls back to the peer,
        // authorization knows no client.
        assert_eq!(client_ip(p, &headers(&["unknown"]), &t), p);
        assert_eq!(client_ip_known(p, &headers(&["unknown"]), &t), None);
        assert_eq!(client_ip_known(p, &headers(&[]), &t), None);
        assert_eq!(
            client_ip_known(ip("192.0.2.1"), &headers(&[]), &t),
            Some(ip("192.0.2.1"))
        );
    }

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_the_header_says() {
        let h = headers(&["1.2.3.4"]);
        assert_eq!(
            client_ip(ip("203.0.113.9"), &h, &["10.0.0.0/8".parse().unwrap()]),
            ip("203.0.113.9")
        );
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &[]), ip("10.0.0.1"));
    }

    #[test]
    fn trusted_chain_is_walked_from_the_right() {
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        let h = headers(&["198.51.100.1, 203.0.113.9", "10.0.0.2"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("203.0.113.9"));
        let all_trusted = headers(&["10.1.1.1, 10.0.0.2"]);
        assert_eq!(
            client_ip(ip("10.0.0.1"), &all_trusted, &trusted),
            ip("10.1.1.1")
        );
        let garbage = headers(&["203.0.113.9, not-an-ip, 10.0.0.3"]);
        assert_eq!(
            client_ip(ip("10.0.0.1"), &garbage, &trusted),
            ip("10.0.0.3")
        );
        assert_eq!(
            client_ip(ip("10.0.0.1"), &HeaderMap::new(), &trusted),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn ipv4_mapped_peers_are_matched_as_ipv4() {
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        let h = headers(&["203.0.113.9"]);
        assert_eq!(
            client_ip(ip("::ffff:10.0.0.1"), &h, &trusted),
            ip("203.0.113.9")
        );
    }
}
