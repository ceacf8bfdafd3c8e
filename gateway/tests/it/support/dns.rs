//! A real DNS server for discovery tests: dnsmasq (Debian `dnsmasq-base`)
//! on a loopback UDP/TCP port, answering from a hosts file the test
//! rewrites (SIGHUP makes it read the file again) and from SRV records
//! given at start. Killed when dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Dnsmasq {
    child: Child,
    pub addr: SocketAddr,
    hosts: PathBuf,
    _dir: tempfile::TempDir,
}

/// Where dnsmasq is, if it is installed (`make test` installs it).
pub fn binary() -> Option<&'static str> {
    ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

impl Dnsmasq {
    /// Start dnsmasq answering `hosts` (hosts-file lines) and `srv`
    /// (`--srv-host` values: `NAME,TARGET,PORT,PRIORITY,WEIGHT`), on
    /// `port` (a fresh one when `None`).
    pub fn start(hosts: &str, srv: &[String], port: Option<u16>) -> Dnsmasq {
        let bin = binary().expect("dnsmasq is installed by `make test` (dnsmasq-base)");
        let mut last = String::new();
        // A fresh port may be taken before dnsmasq binds it: try again.
        for _ in 0..5 {
            let port = port.unwrap_or_else(super::free_port);
            let dir = tempfile::tempdir().unwrap();
            let hosts_path = dir.path().join("hosts");
            std::fs::write(&hosts_path, hosts).unwrap();
            let mut cmd = Command::new(bin);
            cmd.args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--user=root",
                "--pid-file=",
                "--log-facility=-",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--addn-hosts={}", hosts_path.display()));
            for record in srv {
                cmd.arg(format!("--srv-host={record}"));
            }
            let log = std::fs::File::create(dir.path().join("log")).unwrap();
            let mut child = cmd
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start dnsmasq");
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if udp_bound(port) {
                    return Dnsmasq {
                        child,
                        addr,
                        hosts: hosts_path,
                        _dir: dir,
                    };
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
            last = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
        }
        panic!("dnsmasq did not start: {last}");
    }

    /// Replace the hosts file and make dnsmasq read it again.
    pub fn set_hosts(&self, hosts: &str) {
        std::fs::write(&self.hosts, hosts).unwrap();
        super::signal(self.child.id(), "HUP");
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a UDP socket is bound to 127.0.0.1:`port` (`/proc/net/udp`).
fn udp_bound(port: u16) -> bool {
    let local = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/udp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .any(|l| l.split_whitespace().nth(1) == Some(local.as_str()))
}
