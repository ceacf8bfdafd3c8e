//! `hash_key`: the bytes a request is placed on the consistent-hash ring
//! by. `None` when the request does not carry its key (the balancer then
//! falls back to `least_request`).

use std::borrow::Cow;
use std::net::IpAddr;

use http::HeaderMap;

use crate::config::model::HashKey;

pub fn of<'a>(
    key: &HashKey,
    headers: &'a HeaderMap,
    path: &'a str,
    client: Option<IpAddr>,
) -> Option<Cow<'a, [u8]>> {
    match key {
        HashKey::ClientIp => client.map(|ip| match ip {
            IpAddr::V4(v4) => Cow::Owned(v4.octets().to_vec()),
            IpAddr::V6(v6) => Cow::Owned(v6.octets().to_vec()),
        }),
        HashKey::Path => Some(Cow::Borrowed(path.as_bytes())),
        HashKey::Header(name) => headers
            .get(name)
            .map(|v| Cow::Borrowed(v.as_bytes()))
            .filter(|v| !v.is_empty()),
        HashKey::Cookie(name) => headers
            .get_all(http::header::COOKIE)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
            .find_map(|pair| {
                let pair = pair.trim_ascii();
                let value = pair.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
                (!value.is_empty()).then_some(Cow::Borrowed(value))
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_key() {
        let mut h = HeaderMap::new();
        h.insert("x-user", "alice".parse().unwrap());
        h.append("cookie", "a=1; session=s3cr3t".parse().unwrap());
        h.append("cookie", "other=2".parse().unwrap());
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let get = |k: HashKey| of(&k, &h, "/p", Some(ip)).map(|c| c.into_owned());
        assert_eq!(get(HashKey::ClientIp), Some(vec![10, 0, 0, 7]));
        assert_eq!(get(HashKey::Path), Some(b"/p".to_vec()));
        assert_eq!(
            get(HashKey::Header("x-user".parse().unwrap())),
            Some(b"alice".to_vec())
        );
        assert_eq!(get(HashKey::Header("x-none".parse().unwrap())), None);
        assert_eq!(
            get(HashKey::Cookie("session".into())),
            Some(b"s3cr3t".to_vec())
        );
        assert_eq!(get(HashKey::Cookie("other".into())), Some(b"2".to_vec()));
        assert_eq!(get(HashKey::Cookie("sess".into())), None);
        assert_eq!(of(&HashKey::ClientIp, &h, "/", None), None);
    }
}
