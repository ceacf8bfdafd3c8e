//! Test harness: the real `meshgate` binary on ephemeral ports, real upstream
//! servers started by the test, and small real clients.
#![allow(dead_code)] // each test binary uses part of the harness

pub mod client;
pub mod dns;
pub mod redis;
pub mod tls;
pub mod upstream;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_meshgate");

/// The admin endpoint and one listener, on the addresses `Gateway::start` fills in.
pub const HEAD: &str = r#"
[admin]
listen = "@ADMIN@"
[listeners.public]
bind = "@LISTEN@"
"#;
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The value of the first sample line starting with `series` in a
/// Prometheus text exposition; 0 when there is none.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Send `raw` on a new connection, then half-close it if `half_close`, and
/// read until the gateway closes it, which must be `within`: what came
/// back, and how the read ended (a reset is an error, after the bytes
/// before it).
pub async fn read_to_close(
    addr: SocketAddr,
    raw: &[u8],
    half_close: bool,
    within: Duration,
) -> (Vec<u8>, std::io::Result<usize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    if half_close {
        s.shutdown().await.unwrap();
    }
    let mut out = Vec::new();
    let read = tokio::time::timeout(within, s.read_to_end(&mut out))
        .await
        .expect("the gateway closes the connection");
    (out, read)
}

/// The access log at `path` once `done` holds for its text (the writer
/// drains every 50 ms); fails after `within`.
pub async fn wait_for_log(
    path: &std::path::Path,
    within: Duration,
    done: impl Fn(&str) -> bool,
) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if done(&text) {
            return text;
        }
        assert!(start.elapsed() < within, "access log has: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The lines of a JSON access log.
pub fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

/// A test whose external tool (or privilege) is missing: skipped with the
/// reason printed, except where `CI` is set, where it fails: `make test`
/// installs every tool, so a skip there would hide a broken set-up.
pub fn skip(why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{why} (CI is set, so a missing tool fails the test)"
    );
    eprintln!("SKIPPED: {why}");
}

/// A port the OS just handed out and released, for a listener in a config.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Whether the gateway answering on `admin` is the one configured with
/// `listen`, and process `pid` (when the config binds `listen`) holds the
/// listening socket on it: a port handed out twice may be another test's,
/// and `/readyz` would then be answered through it.
async fn is_ours(admin: SocketAddr, listen: SocketAddr, pid: Option<u32>) -> bool {
    client::get(admin, "/config", &[])
        .await
        .is_ok_and(|c| c.text().contains(&format!("\"{listen}\"")))
        && pid.is_none_or(|pid| listens_on(pid, listen))
}

/// Whether process `pid` has a socket listening on the IPv4 address
/// `addr`: its inode in `/proc/net/tcp` among the process's descriptors.
fn listens_on(pid: u32, addr: SocketAddr) -> bool {
    let SocketAddr::V4(v4) = addr else {
        return true;
    };
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(v4.ip().octets()),
        v4.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        // Listening (state 0A) on the address.
        .filter(|f| f.len() > 9 && f[1] == local && f[3] == "0A")
        .map(|f| format!("socket:[{}]", f[9]))
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    })
}

/// `config` with one worker thread per listener unless it sets `workers`:
/// tests run many gateways at once on a small machine, and none but a test
/// about workers needs more.
pub fn one_worker(config: &str) -> String {
    let mut extra = String::new();
    if !config.contains("workers") {
        extra.push_str("workers = 1\n");
    }
    if let Some(engine) = http1_engine().filter(|_| !config.contains("http1_engine")) {
        extra.push_str(&format!("http1_engine = \"{engine}\"\n"));
    }
    if extra.is_empty() {
        config.to_string()
    } else if config.contains("[gateway]") {
        config.replacen("[gateway]", &format!("[gateway]\n{extra}"), 1)
    } else {
        format!("[gateway]\n{extra}{config}")
    }
}

/// The HTTP/1.1 driver the suite runs against (`MESHGATE_TEST_HTTP1_ENGINE`,
/// set by `make test` for its second pass, on Pingora's driver); `None`: the
/// config's default (the fast lane).
pub fn http1_engine() -> Option<String> {
    std::env::var("MESHGATE_TEST_HTTP1_ENGINE").ok()
}

/// A running gateway process; killed on drop.
pub struct Gateway {
    child: Child,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    _dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl Gateway {
    /// Start the gateway with `config`, where `@LISTEN@` and `@ADMIN@` stand for
    /// fresh loopback addresses, and wait until `/readyz` answers 200.
    pub async fn start(config: &str) -> Gateway {
        Self::start_with_env(config, &[]).await
    }

    /// [`Gateway::start`] with extra environment variables for the process.
    pub async fn start_with_env(config: &str, env: &[(&str, &str)]) -> Gateway {
        let mut last_err = String::new();
        // A released port can be taken by someone else before we bind it again.
        for _ in 0..3 {
            match Self::try_start(config, env).await {
                Ok(gw) => return gw,
                Err(e) => last_err = e,
            }
        }
        panic!("gateway did not start: {last_err}");
    }

    async fn try_start(config: &str, env: &[(&str, &str)]) -> Result<Gateway, String> {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let text = one_worker(
            &config
                .replace("@LISTEN@", &listen.to_string())
                .replace("@ADMIN@", &admin.to_string()),
        );
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("gateway.toml");
        std::fs::File::create(&config_path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .unwrap();
        let log = std::fs::File::create(dir.path().join("gateway.log")).unwrap();
        let child = Command::new(BIN)
            .args(["run", "-c"])
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut gw = Gateway {
            child,
            listen,
            admin,
            _dir: dir,
            config_path,
        };
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = gw.child.try_wait() {
                return Err(format!("exited with {status}: {}", gw.log()));
            }
            if let Ok(resp) = client::get(admin, "/readyz", &[]).await {
                // Another test's gateway may hold the same admin port (a
                // released port can be handed out twice; this process then
                // fails to bind it and exits): ready only if the admin
                // answering is this gateway's, serving this listen address.
                let pid = config.contains("@LISTEN@").then(|| gw.child.id());
                if resp.status == 200 && is_ours(admin, listen, pid).await {
                    return Ok(gw);
                }
            }
            if start.elapsed() > READY_TIMEOUT {
                return Err(format!("not ready after {READY_TIMEOUT:?}: {}", gw.log()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("gateway.log")).unwrap_or_default()
    }

    /// The process's log once `done` holds for it; fails after `within`.
    pub async fn wait_for_log(&self, within: Duration, done: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let log = self.log();
            if done(&log) {
                return log;
            }
            assert!(start.elapsed() < within, "the log has: {log}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.listen, path)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait until `/config` reports generation `want` or later (a reload
    /// took effect); the generation reached.
    pub async fn wait_for_generation(&self, want: u64) -> u64 {
        let start = Instant::now();
        loop {
            let c = client::get(self.admin, "/config", &[])
                .await
                .unwrap()
                .json();
            let g = c["generation"].as_u64().unwrap();
            if g >= want {
                return g;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "still at generation {g}: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Wait up to `within` until `/metrics` shows `series` at `at_least` or
    /// more; the scrape that did.
    pub async fn wait_for_metric(&self, series: &str, at_least: f64, within: Duration) -> String {
        let what = format!("{series} at {at_least} or more");
        self.wait_for_metrics(&what, within, |text| metric(text, series) >= at_least)
            .await
    }

    /// Wait until `/metrics` has the line `line` exactly (a gauge that
    /// settles, such as open connections while a closed one is torn down).
    pub async fn wait_for_metric_line(&self, line: &str, within: Duration) -> String {
        self.wait_for_metrics(line, within, |text| text.lines().any(|l| l == line))
            .await
    }

    /// Poll `/metrics` until `done` holds of it (`what` names it if not).
    async fn wait_for_metrics(
        &self,
        what: &str,
        within: Duration,
        done: impl Fn(&str) -> bool,
    ) -> String {
        let start = Instant::now();
        loop {
            let text = client::get(self.admin, "/metrics", &[])
                .await
                .unwrap()
                .text();
            if done(&text) {
                return text;
            }
            assert!(
                start.elapsed() < within,
                "no {what}:\n{text}\nlog:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Write `config` (with `@LISTEN@`/`@ADMIN@` filled in as at start) and
    /// send SIGHUP.
    pub fn reload(&self, config: &str) {
        self.write_config(config);
        signal(self.pid(), "HUP");
    }

    /// Write `config` and reload through `POST /reload`, which answers once
    /// the reload is done, listeners started and stopped included; the
    /// answer (200, or 422 with the errors).
    pub async fn reload_now(&self, config: &str) -> client::Resp {
        self.write_config(config);
        client::send(
            self.admin,
            http::Method::POST,
            "/reload",
            &[],
            bytes::Bytes::new(),
            false,
        )
        .await
        .unwrap()
    }

    /// Write `config` (with `@LISTEN@`/`@ADMIN@` filled in as at start) to
    /// the file the gateway runs from.
    pub fn write_config(&self, config: &str) {
        let text = one_worker(
            &config
                .replace("@LISTEN@", &self.listen.to_string())
                .replace("@ADMIN@", &self.admin.to_string()),
        );
        std::fs::write(&self.config_path, text).unwrap();
    }

    /// Wait up to `limit` for the process to exit; its status if it did.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

/// Send a signal to a process with the system's `kill`.
pub fn signal(pid: u32, name: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{name} {pid} failed");
}

#[test]
fn listens_on_tells_a_process_its_own_listening_sockets() {
    let mine = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = mine.local_addr().unwrap();
    assert!(listens_on(std::process::id(), addr));
    let mut other = Command::new("sleep").arg("30").spawn().unwrap();
    assert!(!listens_on(other.id(), addr));
    drop(mine);
    assert!(!listens_on(std::process::id(), addr));
    let _ = other.kill();
    let _ = other.wait();
}

/// A new process started with `run -c CONFIG --upgrade`, waiting on
/// `socket` for the running gateway's listening sockets; killed on drop.
pub struct Upgrading {
    child: Child,
    log: PathBuf,
}

impl Upgrading {
    /// Start it (its log in `log`) and wait until it waits.
    pub async fn start(config: &std::path::Path, socket: &std::path::Path, log: PathBuf) -> Self {
        let child = Command::new(BIN)
            .args(["run", "-c", config.to_str().unwrap(), "--upgrade"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let new = Upgrading { child, log };
        let start = Instant::now();
        while !new
            .log()
            .contains("waiting for the running meshgate's listening sockets")
            || !socket.exists()
        {
            assert!(start.elapsed() < Duration::from_secs(10), "{}", new.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        new
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Upgrading {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client that opens a new connection for each `GET path` to `addr`,
/// every 10 ms, until [`Prober::finish`]: each answer's body, or
/// `failed: …`.
pub struct Prober {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Prober {
    pub fn start(addr: SocketAddr, path: &'static str) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let task = {
            let (stop, seen) = (stop.clone(), seen.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let answer = match client::get(addr, path, &[]).await {
                        Ok(r) if r.status == 200 => r.text(),
                        other => format!("failed: {other:?}"),
                    };
                    seen.lock().unwrap().push(answer);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        Prober { stop, seen, task }
    }

    /// Stop; every answer seen, in order.
    pub async fn finish(self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.task.await.unwrap();
        let seen = self.seen.lock().unwrap().clone();
        seen
    }
}
