//! A real `redis-server` on a loopback port, for global rate limits.
//! `make test` installs it (Debian package `redis-server`).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

const READY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct RedisServer {
    child: Option<Child>,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        Self::start_with(|_| Vec::new()).await
    }

    /// A server with `extra(port)` options after the usual ones (later
    /// options win, so they may change the port's use).
    async fn start_with(extra: impl Fn(u16) -> Vec<String>) -> RedisServer {
        let mut last = String::new();
        // A released port can be taken before redis binds it.
        for _ in 0..3 {
            let mut server = RedisServer {
                child: None,
                addr: SocketAddr::from(([127, 0, 0, 1], super::free_port())),
                dir: tempfile::tempdir().unwrap(),
            };
            let extra = extra(server.addr.port());
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            match server.spawn_with(&extra).await {
                Ok(()) => return server,
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start: {last}");
    }

    async fn spawn(&mut self) -> Result<(), String> {
        self.spawn_with(&[]).await
    }

    async fn spawn_with(&mut self, extra: &[&str]) -> Result<(), String> {
        let log = std::fs::File::create(self.dir.path().join("redis.log")).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &self.addr.port().to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--dir"])
            .arg(self.dir.path())
            .args(extra)
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run redis-server ({e}); `make test-deps` installs it"))?;
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Err(format!("redis-server exited with {status}: {}", self.log()));
            }
            // A TLS port answers no plain PING: its log says when it listens.
            let tls = extra.contains(&"--tls-port");
            if (tls && self.log().contains("Ready to accept connections"))
                || (!tls && self.command("PING").await.as_deref() == Ok("+PONG"))
            {
                return Ok(());
            }
            if start.elapsed() > READY_TIMEOUT {
                return Err(format!("redis-server not ready: {}", self.log()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// One inline command; the first line of the reply.
    pub async fn command(&self, cmd: &str) -> Result<String, String> {
        let io = async {
            let mut s = tokio::net::TcpStream::connect(self.addr).await?;
            s.write_all(format!("{cmd}\r\n").as_bytes()).await?;
            let mut buf = vec![0u8; 512];
            let n = s.read(&mut buf).await?;
            Ok::<_, std::io::Error>(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string(),
            )
        };
        match tokio::time::timeout(Duration::from_secs(2), io).await {
            Ok(Ok(line)) => Ok(line),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    /// A `redis-server` taking only TLS connections (`rediss://`) with the
    /// certificate and key at `cert`, `key` (no client certificates asked;
    /// it wants a CA file all the same: its own certificate will do).
    pub async fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> RedisServer {
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        Self::start_with(|port| {
            [
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--tls-auth-clients",
                "no",
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                &key,
                "--tls-ca-cert-file",
                &cert,
            ]
            .map(String::from)
            .to_vec()
        })
        .await
    }

    /// One inline command; the whole reply as text.
    pub async fn command_text(&self, cmd: &str) -> Result<String, String> {
        let io = async {
            let mut s = tokio::net::TcpStream::connect(self.addr).await?;
            s.write_all(format!("{cmd}\r\n").as_bytes()).await?;
            let mut buf = vec![0u8; 8192];
            let n = s.read(&mut buf).await?;
            Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf[..n]).into_owned())
        };
        match tokio::time::timeout(Duration::from_secs(2), io).await {
            Ok(Ok(text)) => Ok(text),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis-server is running").id()
    }

    /// Kill the server (its data goes with it: no persistence).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        let start = Instant::now();
        // The port was ours a moment ago; retry briefly if the kernel still holds it.
        loop {
            match self.spawn().await {
                Ok(()) => return,
                Err(e) if start.elapsed() > READY_TIMEOUT => panic!("{e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Freeze the process: connections stay open, nothing is answered.
    pub fn pause(&self) {
        super::signal(self.pid(), "STOP");
    }

    pub fn resume(&self) {
        super::signal(self.pid(), "CONT");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis Cluster of `redis-server`s on loopback ports (each with its own
/// cluster bus port), made with `redis-cli --cluster create`, no replicas.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub async fn start(n: usize) -> RedisCluster {
        let mut nodes = Vec::new();
        for _ in 0..n {
            let bus = super::free_port().to_string();
            nodes.push(
                RedisServer::start_with(|_| {
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-port",
                        &bus,
                        "--cluster-node-timeout",
                        "1000",
                    ]
                    .map(String::from)
                    .to_vec()
                })
                .await,
            );
        }
        let addrs: Vec<String> = nodes.iter().map(|n| n.addr.to_string()).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("run redis-cli (Debian package redis-tools, with redis-server)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        let start = Instant::now();
        while !cluster.ok().await {
            assert!(
                start.elapsed() < READY_TIMEOUT,
                "the cluster did not come up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cluster
    }

    /// Every node says the cluster is up.
    async fn ok(&self) -> bool {
        for n in &self.nodes {
            let info = n.command_text("CLUSTER INFO").await.unwrap_or_default();
            if !info.contains("cluster_state:ok") {
                return false;
            }
        }
        true
    }

    /// The nodes' URLs, for `[redis] cluster`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://{}", n.addr))
            .collect()
    }
}
