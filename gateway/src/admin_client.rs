//! The command line's side of the admin endpoint, with nothing but the
//! binary (a container image's `HEALTHCHECK` has no curl): `meshgate
//! health` asks a running gateway whether it is ready, `meshgate reload`
//! makes it reload and reports the outcome, `meshgate upgrade` makes it
//! hand over to a new process of the binary on disk.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// The admin address `meshgate run` uses when the config names none.
pub const DEFAULT_ADMIN: &str = crate::config::model::DEFAULT_ADMIN_LISTEN;

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("`{0}` is not an address (write HOST:PORT, e.g. 127.0.0.1:9901)")]
    Address(String),
    #[error("cannot reach the admin endpoint at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the admin endpoint at {addr} gave no HTTP answer")]
    Garbled { addr: SocketAddr },
    #[error("not upgraded: {0}")]
    Upgrade(String),
    #[error("not ready ({addr} answered {status}): {body}")]
    NotReady {
        addr: SocketAddr,
        status: u16,
        body: String,
    },
}

/// Where to reach an admin endpoint that listens on `listen`: a wildcard
/// bind is reached on loopback.
pub fn reachable(mut listen: SocketAddr) -> SocketAddr {
    if listen.ip().is_unspecified() {
        listen.set_ip(match listen.ip() {
            IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    listen
}

/// Parse `HOST:PORT` (a name is resolved).
pub fn parse_admin(addr: &str) -> Result<SocketAddr, HealthError> {
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .map(reachable)
        .ok_or_else(|| HealthError::Address(addr.to_string()))
}

/// `GET /readyz` on `addr`: `Ok` with the body when it answers 200.
pub fn ready(addr: SocketAddr, timeout: Duration) -> Result<String, HealthError> {
    let (status, body) = exchange(addr, "GET", "/readyz", timeout)?;
    if status == 200 {
        Ok(body)
    } else {
        Err(HealthError::NotReady { addr, status, body })
    }
}

/// What `POST /reload` said.
#[derive(Debug)]
pub enum Reloaded {
    /// The new config serves, as this generation; a line per listener it
    /// started, stopped or moved.
    Yes {
        generation: u64,
        listeners: Vec<String>,
    },
    /// The new config was refused; the old one keeps serving. Each error
    /// as the gateway rendered it (`file:line:col`, the fix).
    Refused { errors: Vec<String> },
}

/// `POST /reload` on `addr`: the gateway reads its config file again.
pub fn reload(addr: SocketAddr, timeout: Duration) -> Result<Reloaded, HealthError> {
    let (status, body) = exchange(addr, "POST", "/reload", timeout)?;
    let json: serde_json::Value =
        serde_json::from_str(&body).map_err(|_| HealthError::Garbled { addr })?;
    match status {
        200 => Ok(Reloaded::Yes {
            generation: json["generation"].as_u64().unwrap_or(0),
            listeners: strings(&json["listeners"]),
        }),
        422 => Ok(Reloaded::Refused {
            errors: strings(&json["errors"]),
        }),
        _ => Err(HealthError::NotReady { addr, status, body }),
    }
}

/// `POST /upgrade` on `addr`, then `GET /config` until the new process
/// answers it: the old process's id and the new one's.
pub fn upgrade(addr: SocketAddr, timeout: Duration) -> Result<(u32, u32), HealthError> {
    let (status, body) = exchange(addr, "POST", "/upgrade", timeout)?;
    let json: serde_json::Value =
        serde_json::from_str(&body).map_err(|_| HealthError::Garbled { addr })?;
    let pid = |key: &str| json[key].as_u64().and_then(|p| u32::try_from(p).ok());
    let (from, to) = match (status, pid("from"), pid("to")) {
        (202, Some(from), Some(to)) => (from, to),
        _ => {
            let why = json["error"].as_str().map_or(body.clone(), str::to_string);
            return Err(HealthError::Upgrade(why));
        }
    };
    // Both processes accept on the admin socket until the old one drains:
    // asked until the new one answers.
    let start = std::time::Instant::now();
    loop {
        let answered = exchange(addr, "GET", "/config", timeout)
            .ok()
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
            .and_then(|c| c["pid"].as_u64());
        if answered == Some(u64::from(to)) {
            return Ok((from, to));
        }
        if start.elapsed() > timeout {
            return Err(HealthError::Upgrade(format!(
                "process {to} took the sockets but did not answer within {timeout:?}; see its log"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The strings of a JSON array (none when it is not one).
fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|e| {
            e.iter()
                .filter_map(|l| l.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// One request with an empty body; the status and the body of the answer.
fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), HealthError> {
    let connect = |source| HealthError::Connect { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(connect)?;
    stream.set_read_timeout(Some(timeout)).map_err(connect)?;
    stream.set_write_timeout(Some(timeout)).map_err(connect)?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(connect)?;
    // The answers are small JSON; more than this is not an admin endpoint.
    let mut answer = Vec::new();
    stream
        .take(1024 * 1024)
        .read_to_end(&mut answer)
        .map_err(connect)?;
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| text.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or(HealthError::Garbled { addr })?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .trim()
        .to_string();
    Ok((status, body))
}

/// `[admin] listen` of a config file that may not be valid (that is when
/// `meshgate reload` is needed most): read from its TOML alone, the
/// default when it names none.
pub fn admin_of(text: &str) -> Option<SocketAddr> {
    let table: toml::Table = toml::from_str(text).ok()?;
    let listen = table
        .get("admin")
        .and_then(|a| a.get("listen"))
        .and_then(|l| l.as_str())
        .unwrap_or(DEFAULT_ADMIN);
    listen.parse().ok().map(reachable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_admin_is_asked_on_loopback() {
        assert_eq!(
            parse_admin("0.0.0.0:9901").unwrap(),
            "127.0.0.1:9901".parse().unwrap()
        );
        assert_eq!(
            parse_admin("[::]:9901").unwrap(),
            "[::1]:9901".parse().unwrap()
        );
        assert!(matches!(
            parse_admin("nonsense"),
            Err(HealthError::Address(_))
        ));
    }

    #[test]
    fn the_admin_address_is_read_from_any_toml() {
        assert_eq!(
            admin_of("[admin]\nlisten = \"0.0.0.0:19901\"\n[routes.x]\nbogus = 1\n"),
            Some("127.0.0.1:19901".parse().unwrap())
        );
        assert_eq!(
            admin_of("[listeners.a]\nbind = \"127.0.0.1:1\"\n"),
            Some(DEFAULT_ADMIN.parse().unwrap())
        );
        assert_eq!(admin_of("not [toml"), None);
    }

    #[test]
    fn answers_other_than_200_are_not_ready() {
        let serve = |answer: &'static [u8]| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            std::thread::spawn(move || {
                let (mut s, _) = l.accept().unwrap();
                // The whole request, so that closing does not reset it.
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                s.write_all(answer).unwrap();
            });
            addr
        };
        let ok = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 18\r\n\r\n{\"status\":\"ready\"}");
        assert_eq!(
            ready(ok, Duration::from_secs(5)).unwrap(),
            "{\"status\":\"ready\"}"
        );
        let draining = serve(b"HTTP/1.1 503 Service Unavailable\r\n\r\n{\"status\":\"not ready\"}");
        let e = ready(draining, Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(e, HealthError::NotReady { status: 503, .. }),
            "{e}"
        );
        let garbage = serve(b"SSH-2.0-OpenSSH\r\n");
        assert!(matches!(
            ready(garbage, Duration::from_secs(5)),
            Err(HealthError::Garbled { .. })
        ));
    }
}
