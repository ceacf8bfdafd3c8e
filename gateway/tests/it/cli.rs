//! The command line and the admin listener, as an operator uses them.

use std::path::Path;
use std::process::Command;

use crate::support::client::get;
use crate::support::{Gateway, Prober, Upgrading, BIN, HEAD};

fn meshgate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run meshgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Copy `config` into `dir` and make throwaway files for the `tls/...`
/// paths it names: `X.pem` with a matching `X.key` becomes a certificate and
/// key, a lone `X.pem` a CA certificate.
fn with_example_certs(config: &Path, dir: &Path) -> std::path::PathBuf {
    // The file as shipped, byte for byte: what a user copies.
    let text = std::fs::read_to_string(config).unwrap();
    let copy = dir.join(config.file_name().unwrap());
    std::fs::write(&copy, &text).unwrap();
    let paths: std::collections::BTreeSet<&str> = text
        .split('"')
        .filter(|s| s.starts_with("tls/") && (s.ends_with(".pem") || s.ends_with(".key")))
        .collect();
    if paths.is_empty() {
        return copy;
    }
    std::fs::create_dir_all(dir.join("tls")).unwrap();
    let ca = crate::support::tls::Ca::new("example root");
    for p in &paths {
        let Some(stem) = p.strip_suffix(".pem") else {
            continue;
        };
        let key = format!("{stem}.key");
        if paths.contains(key.as_str()) {
            let pem = ca.issue(crate::support::tls::Leaf {
                dns: &["example.test"],
                rsa: stem.ends_with("rsa"),
                ..Default::default()
            });
            std::fs::write(dir.join(p), &pem.cert).unwrap();
            std::fs::write(dir.join(&key), &pem.key).unwrap();
        } else {
            std::fs::write(dir.join(p), ca.pem()).unwrap();
        }
    }
    copy
}

#[test]
fn every_example_config_passes_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = root.join("config");
    let mut checked = 0;
    // config/*.toml, and the container image's own config.
    let examples = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .chain([root.join("docker/gateway.toml")]);
    for path in examples {
        if path.extension().is_some_and(|e| e == "toml") {
            let scratch = tempfile::tempdir().unwrap();
            let path = with_example_certs(&path, scratch.path());
            let (code, out, err) = meshgate(&["check", "-c", path.to_str().unwrap()]);
            assert_eq!(code, 0, "{} failed check:\n{out}{err}", path.display());
            checked += 1;
        }
    }
    assert!(
        checked >= 4,
        "expected the example configs in {} and docker/gateway.toml",
        dir.display()
    );
}

#[test]
fn check_reports_every_mistake_with_location_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(
        &path,
        r#"[listeners.public]
bind = "0.0.0.0:8080"
[listeners.again]
bind = "0.0.0.0:8080"

[routes.api]
listeners = ["publc"]
path_prefix = "/v1/"
upstream = "apii"
timeout = "soon"

[routes.bad_regex]
path_regex = "^/v[0-9+$"
split = { api = 0 }

[upstreams.api]
endpoints = ["127.0.0.1:notaport"]
conect_timeout = "1s"
"#,
    )
    .unwrap();
    let (code, out, err) = meshgate(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 64, "stdout: {out}\nstderr: {err}");
    let p = path.display().to_string();
    for (line_col, what) in [
        ("4:8", "overlaps listener `public`"),
        ("7:14", "unknown listener `publc`"),
        ("9:12", "unknown upstream `apii`"),
        ("10:11", "is not a duration"),
        ("13:14", "invalid path_regex"),
        ("14:17", "split weight 0"),
        ("17:14", "is not a port"),
        ("18:1", "unknown key `conect_timeout`"),
    ] {
        let needle = format!("{p}:{line_col}: error: ");
        let line = err
            .lines()
            .find(|l| l.starts_with(&needle))
            .unwrap_or_else(|| panic!("no error at {line_col} in:\n{err}"));
        assert!(
            line.contains(what),
            "at {line_col} expected `{what}`, got: {line}"
        );
    }
    assert!(err.contains("did you mean `public`?"), "{err}");
    assert!(err.contains("did you mean `connect_timeout`?"), "{err}");
    assert!(err.contains("8 errors found"), "{err}");
}

#[test]
fn check_missing_file_and_syntax_error() {
    let (code, _, err) = meshgate(&["check", "-c", "/nonexistent/gateway.toml"]);
    assert_eq!(code, 64);
    assert!(
        err.contains("/nonexistent/gateway.toml: cannot read config file"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("syntax.toml");
    std::fs::write(&path, "[listeners.public\nbind = 1\n").unwrap();
    let (code, _, err) = meshgate(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 64);
    assert!(
        err.contains(&format!("{}:1:", path.display())) && err.contains("TOML syntax"),
        "{err}"
    );
}

#[test]
fn check_warns_of_certificates_clients_will_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let ca = crate::support::tls::Ca::new("warn root");
    let leaf = |issuer: &crate::support::tls::Ca, expired, valid_days, starts_in_days| {
        issuer.issue(crate::support::tls::Leaf {
            dns: &["edge.test"],
            expired,
            valid_days,
            starts_in_days,
            ..Default::default()
        })
    };
    leaf(&ca, true, None, None).write(dir.path(), "old");
    leaf(&ca, false, Some(2), None).write(dir.path(), "soon");
    leaf(&ca, false, Some(20), Some(3)).write(dir.path(), "early");
    leaf(&ca, false, None, None).write(dir.path(), "fresh");
    // A valid leaf whose intermediate expired: the chain is what clients check.
    let lapsed = ca.expired_intermediate("lapsed issuer");
    let via = leaf(&lapsed, false, None, None);
    std::fs::write(
        dir.path().join("via.pem"),
        format!("{}{}", via.cert, lapsed.pem()),
    )
    .unwrap();
    std::fs::write(dir.path().join("via.key"), &via.key).unwrap();
    // A client_ca holding a client's own certificate instead of its CA.
    let client = leaf(&ca, false, None, None);
    std::fs::write(dir.path().join("clients.pem"), &client.cert).unwrap();
    let path = dir.path().join("certs.toml");
    std::fs::write(
        &path,
        "[listeners.tls]\nbind = \"127.0.0.1:8443\"\n\
         tls = { certs = [\"old\", \"soon\", \"early\", \"fresh\", \"via\"], client_ca = \"clients.pem\" }\n\
         [routes.r]\nrespond = { body = \"x\" }\n\
         [certs.old]\ncert = \"old.pem\"\nkey = \"old.key\"\n\
         [certs.soon]\ncert = \"soon.pem\"\nkey = \"soon.key\"\n\
         [certs.early]\ncert = \"early.pem\"\nkey = \"early.key\"\n\
         [certs.fresh]\ncert = \"fresh.pem\"\nkey = \"fresh.key\"\n\
         [certs.via]\ncert = \"via.pem\"\nkey = \"via.key\"\n",
    )
    .unwrap();
    // The config is valid: the client decides about these certificates.
    let (code, out, err) = meshgate(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let warnings: Vec<&str> = err.lines().collect();
    assert_eq!(warnings.len(), 5, "{err}");
    let file = |name: &str| dir.path().join(name).display().to_string();
    assert!(
        warnings[0].starts_with(&format!(
            "{}: warning: certs.old: the certificate expired 1 day ago (",
            file("old.pem")
        )) && warnings[0].ends_with("install a renewed certificate"),
        "{err}"
    );
    assert!(
        // 2 days, or 1 day 23 hours if a second passed since it was made.
        warnings[1].contains("warning: certs.soon: the certificate expires in ")
            && warnings[1].ends_with("renew it"),
        "{err}"
    );
    assert!(
        warnings[2].starts_with(&format!(
            "{}: warning: certs.early: the certificate is not valid until ",
            file("early.pem")
        )),
        "{err}"
    );
    assert!(
        warnings[3].starts_with(&format!(
            "{}: warning: certs.via: its intermediate `lapsed issuer` expired 1 day ago",
            file("via.pem")
        )),
        "{err}"
    );
    assert!(
        warnings[4].starts_with(&format!(
            "{}: warning: listeners.tls.tls.client_ca: `edge.test` is not a CA certificate",
            file("clients.pem")
        )),
        "{err}"
    );
}

#[test]
fn version_and_help() {
    let (code, out, _) = meshgate(&["version"]);
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        format!("meshgate {}", env!("CARGO_PKG_VERSION"))
    );
    for sub in ["run", "check"] {
        let (code, out, _) = meshgate(&[sub, "--help"]);
        assert_eq!(code, 0);
        assert!(
            out.contains("--config <FILE>") && out.contains("/etc/meshgate/gateway.toml"),
            "{out}"
        );
    }
    let (_, out, _) = meshgate(&["--help"]);
    for sub in ["run", "check", "version", "demo-upstream"] {
        assert!(out.contains(sub), "{out}");
    }
}

#[test]
fn run_refuses_a_bad_config_and_a_taken_port() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[listeners.x]\nbind = \"nope\"\n").unwrap();
    let (code, _, err) = meshgate(&["run", "-c", bad.to_str().unwrap()]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("is not an IP address and port"), "{err}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let admin = crate::support::free_port();
    let cfg = dir.path().join("taken.toml");
    std::fs::write(
        &cfg,
        format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n[listeners.x]\nbind = \"127.0.0.1:{port}\"\n[routes.r]\nrespond = {{ body = \"x\" }}\n"),
    )
    .unwrap();
    let (code, _, err) = meshgate(&["run", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("cannot bind listener `x` 127.0.0.1:{port}")),
        "{err}"
    );
    assert_eq!(
        err.matches("os error").count(),
        1,
        "the OS error once: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints() {
    let gw = Gateway::start(
        r#"
[gateway]
name = "edge-7"
[admin]
listen = "@ADMIN@"
[listeners.public]
bind = "@LISTEN@"
direction = "mesh"
[routes.ping]
path = "/ping"
respond = { body = "pong" }
"#,
    )
    .await;
    let r = get(gw.admin, "/healthz", &[]).await.unwrap();
    assert_eq!(
        (r.status, r.json()["status"].as_str()),
        (200, Some("alive"))
    );
    let r = get(gw.admin, "/readyz", &[]).await.unwrap();
    assert_eq!(r.status, 200);
    let c = get(gw.admin, "/config", &[]).await.unwrap().json();
    assert_eq!(c["gateway"]["name"], "edge-7");
    assert_eq!(c["listeners"][0]["direction"], "mesh");
    assert_eq!(c["listeners"][0]["bind"], gw.listen.to_string());
    assert_eq!(c["routes"][0]["path"], "/ping");
    // Defaults are filled in.
    assert_eq!(c["routes"][0]["timeout_seconds"], 30.0);
    assert_eq!(c["routes"][0]["respond"]["status"], 200);
    assert_eq!(c["routes"][0]["max_body_bytes"], 10 * 1024 * 1024);
    let limits = &c["listeners"][0]["limits"];
    assert_eq!(limits["idle_timeout_seconds"], 60.0);
    assert_eq!(limits["max_request_headers"], 100);
    assert!(limits["max_connections"].is_null());
    assert!(c["listeners"][0]["tls"].is_null());
    assert_eq!(c["certs"], serde_json::json!([]));
    assert!(c["telemetry"]["tracing"].is_null());
    // Read-only: other methods are refused.
    let r = crate::support::client::send(
        gw.admin,
        http::Method::POST,
        "/healthz",
        &[],
        bytes::Bytes::new(),
        false,
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.header("allow")), (405, Some("GET, HEAD")));
    // Data-plane routes never shadow the admin port and vice versa.
    assert_eq!(get(gw.admin, "/ping", &[]).await.unwrap().status, 404);
    assert_eq!(get(gw.listen, "/healthz", &[]).await.unwrap().status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_a_bad_file_keeps_the_old_config() {
    let config = |body: &str| {
        format!("[admin]\nlisten = \"@ADMIN@\"\n[listeners.public]\nbind = \"@LISTEN@\"\n[routes.r]\npath = \"/v\"\nrespond = {{ body = \"{body}\" }}\n")
    };
    let mut gw = Gateway::start(&config("one")).await;
    let (admin, listen) = (gw.admin.to_string(), gw.listen.to_string());
    let concrete = |text: String| {
        crate::support::one_worker(&text.replace("@ADMIN@", &admin).replace("@LISTEN@", &listen))
    };
    assert_eq!(get(gw.listen, "/v", &[]).await.unwrap().text(), "one");

    std::fs::write(&gw.config_path, concrete(config("two"))).unwrap();
    crate::support::signal(gw.pid(), "HUP");
    let generation = gw.wait_for_generation(2).await;
    assert_eq!(generation, 2);
    assert_eq!(get(gw.listen, "/v", &[]).await.unwrap().text(), "two");

    // A broken file: rejected, reported, old config keeps serving.
    std::fs::write(
        &gw.config_path,
        concrete(config("three")).replace("[routes.r]", "[routes.r]\ncolour = 1"),
    )
    .unwrap();
    crate::support::signal(gw.pid(), "HUP");
    let start = std::time::Instant::now();
    while !gw.log().contains("config reload rejected") {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "no rejection logged: {}",
            gw.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(gw.log().contains("unknown key `colour`"), "{}", gw.log());
    assert!(gw.alive());
    assert_eq!(get(gw.listen, "/v", &[]).await.unwrap().text(), "two");
    let c = get(gw.admin, "/config", &[]).await.unwrap().json();
    assert_eq!(c["generation"], 2);

    // A changed bind moves the listener: the new address answers, the old
    // one is closed.
    let other: std::net::SocketAddr = format!("127.0.0.1:{}", crate::support::free_port())
        .parse()
        .unwrap();
    std::fs::write(
        &gw.config_path,
        concrete(config("four")).replace(&gw.listen.to_string(), &other.to_string()),
    )
    .unwrap();
    crate::support::signal(gw.pid(), "HUP");
    gw.wait_for_generation(3).await;
    assert_eq!(get(other, "/v", &[]).await.unwrap().text(), "four");
    let start = std::time::Instant::now();
    while tokio::net::TcpStream::connect(gw.listen).await.is_ok() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "the old address still accepts: {}",
            gw.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[test]
fn a_config_that_is_not_utf8_is_reported_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("latin1.toml");
    std::fs::write(
        &path,
        b"[listeners.public]\nbind = \"127.0.0.1:8080\"\n# caf\xe9\n",
    )
    .unwrap();
    let (code, out, err) = meshgate(&["check", "-c", path.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        (out.clone() + &err).contains("line 3, column 6: not UTF-8"),
        "{out}{err}"
    );
}

/// The mistakes a new user makes first, each reported in the config's words
/// with the line rewritten as it should be.
#[test]
fn check_explains_common_mistakes_in_the_configs_words() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dup.toml");
    std::fs::write(
        &path,
        "[listeners.public]\nbind = \"127.0.0.1:8080\"\n\n[routes.api]\nrespond = { body = \"a\" }\nmethods = [\"GET\"]\n\n[routes.api]\nrespond = { body = \"b\" }\nmethods = [\"POST\"]\n",
    )
    .unwrap();
    let (code, _, err) = meshgate(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 64, "{err}");
    let p = path.display().to_string();
    assert!(
        err.contains(&format!(
            "{p}:8:1: error: table [routes.api] is defined twice (first at line 4)"
        )),
        "{err}"
    );
    assert!(
        err.contains("fix: a table may be written once: merge the two [routes.api] tables, or rename one of them"),
        "{err}"
    );
    assert!(
        err.ends_with("1 error found\n"),
        "one error, not one per key: {err}"
    );
    assert!(!err.contains("duplicate key"), "{err}");

    let path = dir.path().join("types.toml");
    std::fs::write(
        &path,
        "[gateway]\nworkers = \"4\"\n[listeners.public]\nbind = \"127.0.0.1:8080\"\n[routes.api]\nlisteners = \"public\"\ntimeout = 30\nrespond = { body = \"a\" }\n[redis]\nurl = \"rediss://redis.internal:6380\"\n",
    )
    .unwrap();
    let (code, _, err) = meshgate(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 64, "{err}");
    let p = path.display().to_string();
    for (at, message, fix) in [
        (
            "2:11",
            "`workers` must be a whole number, not the string \"4\"",
            "write workers = 4, without quotes",
        ),
        (
            "6:13",
            "`listeners` must be a list, not the string \"public\"",
            "write it in brackets: listeners = [\"public\"]",
        ),
        (
            "7:11",
            "`timeout` must be a duration with a unit, in quotes, not the number 30",
            "write timeout = \"30s\" (a duration needs a unit: ms, s, m or h)",
        ),
    ] {
        let needle = format!("{p}:{at}: error: {message}");
        let pos = err
            .find(&needle)
            .unwrap_or_else(|| panic!("no `{needle}` in:\n{err}"));
        let fix_line = err[pos..].lines().nth(2).unwrap_or_default();
        assert!(fix_line.contains(fix), "fix for {at}: {fix_line}");
    }
    assert!(!err.contains("invalid type"), "{err}");
    assert!(!err.contains("feature"), "{err}");
    assert!(err.ends_with("3 errors found\n"), "{err}");
}

#[test]
fn check_warns_of_a_policy_without_rules_and_still_passes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    std::fs::write(
        &path,
        "[listeners.public]\nbind = \"127.0.0.1:8080\"\n[policies.locked]\nmode = \"enforce\"\n[routes.api]\npolicies = [\"locked\"]\nrespond = { body = \"a\" }\n",
    )
    .unwrap();
    let (code, out, err) = meshgate(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains(&format!(
            "{}:3:11: warning: policy `locked` has neither `allow` nor `deny` rules: it refuses every request of the routes that list it",
            path.display()
        )),
        "{err}"
    );
}

/// A relative `access_log_file` starts at the config file's directory, as
/// every path in it does: `check` gives the same answer from anywhere.
#[test]
fn a_relative_access_log_file_starts_at_the_config_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("logs")).unwrap();
    let path = dir.path().join("gw.toml");
    std::fs::write(
        &path,
        "[telemetry]\naccess_log = \"json\"\naccess_log_file = \"logs/access.log\"\n[listeners.public]\nbind = \"127.0.0.1:8080\"\n[routes.api]\nrespond = { body = \"a\" }\n",
    )
    .unwrap();
    for cwd in ["/", dir.path().to_str().unwrap()] {
        let out = Command::new(BIN)
            .args(["check", "-c", path.to_str().unwrap()])
            .current_dir(cwd)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "from {cwd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_start_up_lines() {
    let mut gw = Gateway::start(&format!(
        "{HEAD}[routes.ping]\nrespond = {{ body = \"pong\" }}\n"
    ))
    .await;
    // The start-up log names where the proxy listens (the line may come
    // just after the socket, bound at start, first accepts).
    let listening = format!("listener `public` (ingress) on http://{}", gw.listen);
    gw.wait_for_log(std::time::Duration::from_secs(5), |log| {
        log.contains(&listening)
    })
    .await;
    // `meshgate health`: what the container image's HEALTHCHECK runs.
    let admin = gw.admin.to_string();
    let (code, out, err) = meshgate(&["health", "--admin", &admin]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ready"), "{out}");
    let config = gw.config_path.to_str().unwrap().to_string();
    let (code, _, err) = meshgate(&["health", "-c", &config]);
    assert_eq!(code, 0, "{err}");
    let closed = format!("127.0.0.1:{}", crate::support::free_port());
    let (code, _, err) = meshgate(&["health", "--admin", &closed, "--timeout", "1s"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot reach the admin endpoint"), "{err}");

    // Draining: `health` says not ready, and exits 1.
    crate::support::signal(gw.pid(), "TERM");
    let _ = meshgate(&["health", "--admin", &admin]);
    assert!(gw
        .wait_exit(std::time::Duration::from_secs(10))
        .await
        .is_some());
    let (code, _, _) = meshgate(&["health", "--admin", &admin, "--timeout", "1s"]);
    assert_eq!(code, 1);
}

/// `meshgate reload` asks the running gateway to reload and reports the
/// outcome: exit 64 with every error (the old config keeps serving), 0
/// with the new generation and the listeners it started or stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_reports_what_happened() {
    let first = format!("{HEAD}[routes.a]\npath = \"/a\"\nrespond = {{ body = \"a\" }}\n");
    let gw = Gateway::start(&first).await;
    let path = gw.config_path.display().to_string();
    let reload = |path: String| async move {
        tokio::task::spawn_blocking(move || meshgate(&["reload", "-c", &path]))
            .await
            .unwrap()
    };

    gw.write_config(&format!(
        "{first}[routes.b]\npath = \"/b\"\nrespnd = {{ body = \"b\" }}\n"
    ));
    let (code, _, err) = reload(path.clone()).await;
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("reload rejected, the old config keeps serving"),
        "{err}"
    );
    assert!(
        err.contains("gateway.toml:") && err.contains("respnd"),
        "{err}"
    );
    assert_eq!(get(gw.listen, "/a", &[]).await.unwrap().text(), "a");

    gw.write_config(&format!(
        "{first}[routes.b]\npath = \"/b\"\nrespond = {{ body = \"b\" }}\n"
    ));
    let (code, out, err) = reload(path.clone()).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("reloaded: generation 2"), "{out}");
    assert_eq!(get(gw.listen, "/b", &[]).await.unwrap().text(), "b");

    // A listener added: the report says so.
    let side = format!("127.0.0.1:{}", crate::support::free_port());
    gw.write_config(&format!("{first}[listeners.side]\nbind = \"{side}\"\n"));
    let (code, out, err) = reload(path.clone()).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!("reloaded: generation 3\nlistener `side` added on {side}\n")
    );

    // Only POST; and nothing listening: exit 1.
    let r = get(gw.admin, "/reload", &[]).await.unwrap();
    assert_eq!(r.status, 405);
    let (code, _, err) = tokio::task::spawn_blocking(|| {
        meshgate(&[
            "reload",
            "--admin",
            &crate::support::upstream::dead_addr().to_string(),
            "--timeout",
            "2s",
        ])
    })
    .await
    .unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot reach the admin endpoint"), "{err}");
}

/// Read datagrams from `socket` into `heard` until it contains `want`.
async fn hear(socket: &tokio::net::UnixDatagram, heard: &mut String, want: &str) {
    let start = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    while !heard.contains(want) {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "no {want} in {heard}"
        );
        let wait = std::time::Duration::from_millis(200);
        if let Ok(Ok(n)) = tokio::time::timeout(wait, socket.recv(&mut buf)).await {
            heard.push_str(&String::from_utf8_lossy(&buf[..n]));
            heard.push('\n');
        }
    }
}

/// Under systemd (`Type=notify`): READY=1 once the listeners accept,
/// RELOADING=1 with MONOTONIC_USEC then READY=1 around a reload, the
/// watchdog fed, STOPPING=1 at SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_reloading_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&path).unwrap();
    let config = format!("{HEAD}[routes.a]\npath = \"/a\"\nrespond = {{ body = \"a\" }}\n");
    let mut gw = Gateway::start_with_env(
        &config,
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    )
    .await;
    let mut heard = String::new();
    for want in ["READY=1", "STATUS=serving config", "WATCHDOG=1"] {
        hear(&socket, &mut heard, want).await;
    }
    heard.clear();
    crate::support::signal(gw.pid(), "HUP");
    for want in [
        "RELOADING=1",
        "MONOTONIC_USEC=",
        "READY=1",
        "(generation 2)",
    ] {
        hear(&socket, &mut heard, want).await;
    }
    heard.clear();
    crate::support::signal(gw.pid(), "TERM");
    hear(&socket, &mut heard, "STOPPING=1").await;
    gw.wait_exit(std::time::Duration::from_secs(10)).await;
}

/// A binary upgrade: a new process started with `--upgrade` takes the
/// listening sockets over when the old one gets SIGQUIT; the old one
/// drains and exits; no client connection is refused meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_upgrade_hands_the_sockets_over_without_refusing_a_connection() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("upgrade.sock");
    let config = |body: &str| {
        format!(
            "[gateway]\nupgrade_socket = \"{}\"\n{HEAD}[routes.ping]\nrespond = {{ body = \"{body}\" }}\n",
            sock.display()
        )
    };
    let mut old = Gateway::start(&config("old")).await;
    let listen = old.listen;
    old.write_config(&config("new"));
    let new = Upgrading::start(&old.config_path, &sock, dir.path().join("new.log")).await;

    // A client that keeps opening connections through the handover.
    let client = Prober::start(listen, "/ping");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    crate::support::signal(old.pid(), "QUIT");
    let exited = old.wait_exit(std::time::Duration::from_secs(30)).await;
    assert!(
        exited.is_some(),
        "the old process did not exit: {}",
        old.log()
    );
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let seen = client.finish().await;
    let failed: Vec<&String> = seen.iter().filter(|s| s.starts_with("failed")).collect();
    assert!(
        failed.is_empty(),
        "{failed:?}\nold: {}\nnew: {}",
        old.log(),
        new.log()
    );
    assert_eq!(seen.first().map(String::as_str), Some("old"));
    assert_eq!(seen.last().map(String::as_str), Some("new"), "{seen:?}");
    assert!(
        old.log().contains("SIGQUIT: handing the listening sockets"),
        "{}",
        old.log()
    );
    // The new process serves on its own, admin included.
    assert_eq!(get(listen, "/ping", &[]).await.unwrap().text(), "new");
    assert_eq!(get(old.admin, "/healthz", &[]).await.unwrap().status, 200);
    drop(new);
}

/// `${VAR}` in a config's strings comes from the gateway's environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_variables_fill_in_the_config() {
    let config = "[admin]\nlisten = \"@ADMIN@\"\n[listeners.public]\nbind = \"${MESHGATE_TEST_BIND:-@LISTEN@}\"\n[routes.r]\nrespond = { body = \"node ${MESHGATE_TEST_NODE}\" }\n";
    let gw = Gateway::start_with_env(config, &[("MESHGATE_TEST_NODE", "edge-7")]).await;
    assert_eq!(
        get(gw.listen, "/", &[]).await.unwrap().text(),
        "node edge-7"
    );
}

/// A fleet's file: the node's own values, and the shared policy included;
/// `check --print` shows the merged config and where each table came from.
#[test]
fn check_print_shows_included_tables_and_where_they_came_from() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("conf.d")).unwrap();
    std::fs::write(
        dir.path().join("conf.d/routes.toml"),
        "[routes.api]\npath_prefix = \"/\"\nupstream = \"api\"\n\n[upstreams.api]\nendpoints = [\"${MESHGATE_TEST_API_ADDR}\"]\n",
    )
    .unwrap();
    let path = dir.path().join("gw.toml");
    std::fs::write(
        &path,
        "include = [\"conf.d/*.toml\"]\n[gateway]\nname = \"${NODE:-edge-0}\"\n[listeners.public]\nbind = \"127.0.0.1:8080\"\n",
    )
    .unwrap();
    let path = path.to_str().unwrap();
    let out = Command::new(BIN)
        .args(["check", "--print", "-c", path])
        .env("MESHGATE_TEST_API_ADDR", "127.0.0.1:9001")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("ok (1 listener(s), 1 route(s), 1 upstream(s))"),
        "{stderr}"
    );
    assert!(
        stdout.contains("gw.toml:2\n[gateway]\nname = \"edge-0\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("conf.d/routes.toml:1\n[routes.api]"),
        "{stdout}"
    );
    assert!(
        stdout.contains("conf.d/routes.toml:5\n[upstreams.api]\nendpoints = [\"127.0.0.1:9001\"]"),
        "{stdout}"
    );
    // What it prints is a config that checks the same.
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, stdout.as_bytes()).unwrap();
    let (code, _, err) = meshgate(&["check", "-c", printed.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");

    // Without the variable, the error is in the included file.
    let (code, _, err) = meshgate(&["check", "-c", path]);
    assert_eq!(code, 64);
    assert!(err.contains("conf.d/routes.toml:6:14: error:"), "{err}");
}

/// `meshgate schema` prints the JSON Schema checked in as
/// docs/meshgate.schema.json (regenerate it with
/// `meshgate schema > docs/meshgate.schema.json` when the format changes),
/// and every example config conforms to it under a real validator, while a
/// typo does not.
#[test]
fn the_checked_in_schema_is_current_and_every_example_config_conforms() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let (code, schema, err) = meshgate(&["schema"]);
    assert_eq!(code, 0, "{err}");
    let checked_in = std::fs::read_to_string(root.join("docs/meshgate.schema.json")).unwrap();
    assert!(
        schema == checked_in,
        "docs/meshgate.schema.json is stale: run `meshgate schema > docs/meshgate.schema.json`"
    );
    // TOML has no null: no key is offered one.
    assert!(!schema.contains("\"null\""), "{schema}");
    let have_validator = Command::new("python3")
        .args(["-c", "import jsonschema, tomllib"])
        .status()
        .is_ok_and(|s| s.success());
    if !have_validator {
        crate::support::skip(
            "the schema check needs python3-jsonschema (make test-deps installs it)",
        );
        return;
    }
    let mut configs: Vec<String> = std::fs::read_dir(root.join("config"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    configs.sort();
    assert!(configs.len() >= 3, "{configs:?}");
    let check = |files: &[String]| {
        let out = Command::new("python3")
            .arg(root.join("scripts/check-schema.py"))
            .arg(root.join("docs/meshgate.schema.json"))
            .args(files)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = check(&configs);
    assert!(ok, "{out}");
    // The validator does refuse: a key misspelt, a duration as a number.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[listeners.public]\nbind = \"127.0.0.1:8080\"\n[upstreams.api]\nendpoints = [\"127.0.0.1:9001\"]\nconect_timeout = \"1s\"\n[routes.api]\nupstream = \"api\"\ntimeout = 5\n",
    )
    .unwrap();
    let (ok, out) = check(&[bad.to_string_lossy().into_owned()]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("upstreams.api") && out.contains("conect_timeout"),
        "{out}"
    );
    assert!(out.contains("routes.api.timeout"), "{out}");
}

/// Kills a process the test did not start itself (the new process of an
/// upgrade, a child of the gateway) when dropped.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .status();
    }
}

/// Under systemd a new process must run in the unit: the gateway starts it
/// itself (`meshgate upgrade`, or SIGUSR2), and the new process says
/// `MAINPID=` with `READY=1` once it serves. A new process that cannot
/// start (an invalid config) aborts the upgrade: the old one serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_the_gateway_starts_itself_reports_the_new_main_pid() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&notify).unwrap();
    let sock = dir.path().join("upgrade.sock");
    let config = |body: &str| {
        format!(
            "[gateway]\nupgrade_socket = \"{}\"\nshutdown_grace_period = \"2s\"\n{HEAD}[routes.ping]\nrespond = {{ body = \"{body}\" }}\n",
            sock.display()
        )
    };
    let mut old = Gateway::start_with_env(
        &config("old"),
        &[("NOTIFY_SOCKET", notify.to_str().unwrap())],
    )
    .await;
    let listen = old.listen;
    let mut heard = String::new();
    hear(&socket, &mut heard, "READY=1").await;
    assert!(!heard.contains("MAINPID="), "{heard}");

    // A new process that cannot start: the upgrade is aborted.
    old.write_config("[listeners.public]\nbind = 7\n");
    crate::support::signal(old.pid(), "USR2");
    let start = std::time::Instant::now();
    while !old.log().contains("upgrade aborted") {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "{}",
            old.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(old.alive());
    assert_eq!(get(listen, "/ping", &[]).await.unwrap().text(), "old");

    old.write_config(&config("new"));
    let client = Prober::start(listen, "/ping");
    let admin = old.admin.to_string();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        meshgate(&["upgrade", "--admin", &admin, "--timeout", "30s"])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}{err}\n{}", old.log());
    let new_pid: u32 = out
        .split_whitespace()
        .nth(2)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no process id in {out}"));
    let _new = KillOnDrop(new_pid);
    assert_ne!(new_pid, old.pid());
    heard.clear();
    hear(&socket, &mut heard, &format!("MAINPID={new_pid}")).await;
    assert!(heard.contains("READY=1"), "{heard}");
    assert!(
        !heard.contains("STOPPING=1"),
        "the service is not stopping: {heard}"
    );
    let exited = old.wait_exit(std::time::Duration::from_secs(30)).await;
    assert!(
        exited.is_some(),
        "the old process did not exit: {}",
        old.log()
    );
    let seen = client.finish().await;
    let failed: Vec<&String> = seen.iter().filter(|s| s.starts_with("failed")).collect();
    assert!(failed.is_empty(), "{failed:?}\n{}", old.log());
    assert_eq!(seen.last().map(String::as_str), Some("new"), "{seen:?}");
    assert_eq!(get(listen, "/ping", &[]).await.unwrap().text(), "new");
}
