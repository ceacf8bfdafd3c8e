//! The mTLS mesh pair across two network namespaces this test creates and
//! joins with a veth pair, so the traffic between the gateways crosses real
//! interfaces: client -> gateway A (namespace A, plain listener) -> mTLS over
//! the veth -> gateway B (namespace B, mesh listener requiring client
//! certificates) -> app (namespace B). Needs root (CAP_NET_ADMIN); where the
//! kernel or the sandbox forbids namespaces, the test says so and stops.
//!
//! Ports inside the namespaces are fixed: each namespace is new and private
//! to this test, so nothing else can hold them.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::tls::{Ca, Leaf};
use crate::support::BIN;

const WEB: &str = "spiffe://prod.example/ns/web/sa/frontend";

/// Namespaces, the veth between them, and the processes started in them;
/// all removed on drop.
struct Mesh {
    a: String,
    b: String,
    children: Vec<Child>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Mesh {
    fn create() -> Result<Mesh, String> {
        let id = std::process::id();
        let mesh = Mesh {
            a: format!("mg-a-{id}"),
            b: format!("mg-b-{id}"),
            children: Vec::new(),
        };
        let (va, vb) = (format!("mga{id}"), format!("mgb{id}"));
        // Interface names are at most 15 bytes.
        let (va, vb) = (&va[..va.len().min(15)], &vb[..vb.len().min(15)]);
        ip(&["netns", "add", &mesh.a])?;
        ip(&["netns", "add", &mesh.b])?;
        ip(&["link", "add", va, "type", "veth", "peer", "name", vb])?;
        ip(&["link", "set", va, "netns", &mesh.a])?;
        ip(&["link", "set", vb, "netns", &mesh.b])?;
        for (ns, dev, addr) in [(&mesh.a, va, "10.77.0.1/30"), (&mesh.b, vb, "10.77.0.2/30")] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        // Keep `mesh` so a failure half-way still cleans up on drop.
        Ok(mesh)
    }

    fn spawn(&mut self, ns: &str, args: &[&str], log: &Path) {
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns, BIN])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push(child);
    }
}

/// `curl` inside a namespace: (HTTP status, body).
fn curl(ns: &str, url: &str) -> Option<(u16, String)> {
    curl_with(ns, url, &[])
}

fn curl_with(ns: &str, url: &str, extra: &[&str]) -> Option<(u16, String)> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-s", "-m", "5"])
        .args(["-w", "\n%{http_code}"])
        .args(extra)
        .arg(url)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n')?;
    Some((code.trim().parse().ok()?, body.to_string()))
}

fn wait_ready(ns: &str, log: &Path) {
    let start = Instant::now();
    while curl(ns, "http://127.0.0.1:9901/readyz").map(|r| r.0) != Some(200) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "gateway in {ns} not ready: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn mesh_pair_across_network_namespaces() {
    let mut mesh = match Mesh::create() {
        Ok(m) => m,
        Err(e) => {
            crate::support::skip(&format!("network namespaces unavailable here ({e}); the loopback mesh pair test in tls.rs covers the protocol"));
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("mesh root");
    let ca_path = ca.write(d, "mesh-ca");
    let (bc, bk) = ca
        .issue(Leaf {
            uris: &["spiffe://prod.example/ns/orders/sa/api"],
            ..Leaf::default()
        })
        .write(d, "b");
    let (ac, ak) = ca
        .issue(Leaf {
            uris: &[WEB],
            ..Leaf::default()
        })
        .write(d, "a");

    let b_conf = d.join("b.toml");
    std::fs::write(
        &b_conf,
        format!(
            "[admin]\nlisten = \"127.0.0.1:9901\"\n[certs.b]\ncert = \"{}\"\nkey = \"{}\"\n[listeners.mesh]\nbind = \"10.77.0.2:15443\"\ndirection = \"mesh\"\ntls = {{ certs = [\"b\"], client_ca = \"{}\", forward_identity = true }}\n[policies.web_only]\nallow = [{{ identity = \"spiffe://prod.example/ns/web/*\" }}]\n[routes.orders]\npath_prefix = \"/\"\nupstream = \"app\"\npolicies = [\"web_only\"]\n[upstreams.app]\nendpoints = [\"127.0.0.1:9001\"]\n",
            bc.display(),
            bk.display(),
            ca_path.display()
        ),
    )
    .unwrap();
    let a_conf = d.join("a.toml");
    std::fs::write(
        &a_conf,
        format!(
            "[admin]\nlisten = \"127.0.0.1:9901\"\n[listeners.local]\nbind = \"127.0.0.1:8080\"\ndirection = \"egress\"\n[routes.orders]\npath_prefix = \"/\"\nupstream = \"orders\"\n[upstreams.orders]\nendpoints = [\"10.77.0.2:15443\"]\ntls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\", sni = \"orders.mesh\", verify = \"spiffe://prod.example/ns/orders/*\" }}\n",
            ca_path.display(),
            ac.display(),
            ak.display()
        ),
    )
    .unwrap();
    let (b_ns, a_ns) = (mesh.b.clone(), mesh.a.clone());
    mesh.spawn(
        &b_ns,
        &["demo-upstream", "--listen", "127.0.0.1:9001"],
        &d.join("app.log"),
    );
    mesh.spawn(
        &b_ns,
        &["run", "-c", b_conf.to_str().unwrap()],
        &d.join("b.log"),
    );
    mesh.spawn(
        &a_ns,
        &["run", "-c", a_conf.to_str().unwrap()],
        &d.join("a.log"),
    );
    wait_ready(&b_ns, &d.join("b.log"));
    wait_ready(&a_ns, &d.join("a.log"));

    let (status, body) =
        curl(&a_ns, "http://127.0.0.1:8080/orders/1").expect("curl in namespace A");
    assert_eq!(
        status,
        200,
        "{body}\nA: {}\nB: {}",
        std::fs::read_to_string(d.join("a.log")).unwrap_or_default(),
        std::fs::read_to_string(d.join("b.log")).unwrap_or_default()
    );
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    // B verified A's certificate across the veth and passed its identity on.
    assert_eq!(j["headers"]["x-meshgate-peer-identity"], WEB, "{body}");

    // Namespace A cannot reach the app directly: only the mesh listener is
    // on the wire, and it demands a client certificate.
    let direct = curl(&a_ns, "http://10.77.0.2:9001/").map(|r| r.0);
    assert!(matches!(direct, None | Some(0)), "{direct:?}");
    // Even skipping its own server check (-k), a client without a
    // certificate gets no answer from B.
    let no_cert = curl_with(&a_ns, "https://10.77.0.2:15443/", &["-k"]).map(|r| r.0);
    assert!(matches!(no_cert, None | Some(0)), "{no_cert:?}");
}
