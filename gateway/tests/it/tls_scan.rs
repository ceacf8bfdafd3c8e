//! An outside TLS scanner (testssl.sh, installed by `make test`) against a
//! running TLS listener: no weak protocol, cipher or known TLS weakness.

use std::process::Command;

use crate::support::tls::{Ca, Leaf};
use crate::support::{Gateway, HEAD};

/// Findings testssl reports about the machine running it, not the server.
const ABOUT_THE_SCANNER: &[&str] = &["engine_problem", "scanTime", "optimal_proto"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testssl_finds_no_weak_protocol_or_cipher() {
    if Command::new("testssl").arg("--version").output().is_err() {
        // `make test` installs it; a bare `cargo test` elsewhere may not have it.
        crate::support::skip("testssl not installed (make test-deps installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("scan root");
    let (ec, ek) = ca
        .issue(Leaf {
            dns: &["edge.example"],
            ..Leaf::default()
        })
        .write(dir.path(), "edge");
    let (rc, rk) = ca
        .issue(Leaf {
            dns: &["rsa.example"],
            rsa: true,
            ..Leaf::default()
        })
        .write(dir.path(), "rsa");
    let gw = Gateway::start(&format!(
        "[certs.edge]\ncert = \"{}\"\nkey = \"{}\"\n[certs.rsa]\ncert = \"{}\"\nkey = \"{}\"\n{}\ntls = {{ certs = [\"edge\", \"rsa\"] }}\n[routes.r]\npath_prefix = \"/\"\nrespond = {{ body = \"ok\" }}\n",
        ec.display(),
        ek.display(),
        rc.display(),
        rk.display(),
        HEAD.trim_end()
    ))
    .await;
    let json = dir.path().join("scan.json");
    let target = gw.listen.to_string();
    let json_arg = json.to_str().unwrap().to_string();
    // Bounded: a few checks against one local port, well under a minute.
    let out = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .args([
                "240",
                "testssl",
                "--quiet",
                "--warnings",
                "off",
                "--color",
                "0",
            ])
            .args([
                "--protocols",
                "--std",
                "--fs",
                "--renegotiation",
                "--crime",
                "--heartbleed",
                "--ccs-injection",
            ])
            .args(["--jsonfile", &json_arg, &target])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = std::fs::read_to_string(&json).unwrap_or_else(|_| {
        panic!(
            "testssl wrote no results: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let findings: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let finding = |id: &str| {
        findings
            .iter()
            .find(|f| f["id"] == id)
            .and_then(|f| f["finding"].as_str())
            .unwrap_or_else(|| panic!("no `{id}` in the scan: {text}"))
            .to_string()
    };
    for old in ["SSLv2", "SSLv3", "TLS1", "TLS1_1"] {
        assert!(
            finding(old).starts_with("not offered"),
            "{old}: {}",
            finding(old)
        );
    }
    assert!(finding("TLS1_2").starts_with("offered"));
    assert!(finding("TLS1_3").starts_with("offered"));
    let bad: Vec<String> = findings
        .iter()
        .filter(|f| !matches!(f["severity"].as_str(), Some("OK" | "INFO")))
        .filter(|f| !ABOUT_THE_SCANNER.contains(&f["id"].as_str().unwrap_or("")))
        .map(|f| format!("{} [{}]: {}", f["id"], f["severity"], f["finding"]))
        .collect();
    assert!(
        bad.is_empty(),
        "testssl found weaknesses:\n{}",
        bad.join("\n")
    );
}
