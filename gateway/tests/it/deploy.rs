//! The container image: its build context holds what the Cargo workspace
//! needs, and the image built here (where podman can build one) starts and
//! answers on `/readyz`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One `COPY` of the Dockerfile's build stage: sources (relative to the
/// build context) and destination (relative to the stage's WORKDIR).
#[derive(Debug)]
struct Copy {
    sources: Vec<String>,
    dest: String,
}

/// The `COPY` lines of the Dockerfile's first stage (the build), in order,
/// with line continuations joined.
fn build_stage_copies(dockerfile: &str) -> Vec<Copy> {
    let joined = dockerfile.replace("\\\n", " ");
    let mut stages = 0;
    let mut out = Vec::new();
    for line in joined.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match words.next().map(str::to_ascii_uppercase).as_deref() {
            Some("FROM") => stages += 1,
            Some("COPY") if stages == 1 => {
                let args: Vec<String> = words
                    .filter(|w| !w.starts_with("--"))
                    .map(str::to_string)
                    .collect();
                if let Some((dest, sources)) = args.split_last() {
                    out.push(Copy {
                        sources: sources.to_vec(),
                        dest: dest.clone(),
                    });
                }
            }
            _ => {}
        }
    }
    out
}

/// Copy `src` (a file or a folder, build output left out) to `dest`.
fn copy_tree(src: &Path, dest: &Path) {
    if src.is_dir() {
        std::fs::create_dir_all(dest).unwrap();
        for entry in std::fs::read_dir(src).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name() == "target" {
                continue;
            }
            copy_tree(&entry.path(), &dest.join(entry.file_name()));
        }
    } else {
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(src, dest).unwrap();
    }
}

/// Do what `copies` do (Docker's rules: a folder's contents go into the
/// destination; several sources or a trailing `/` make it a folder) into
/// `scratch`, the stage's WORKDIR.
fn apply(copies: &[Copy], scratch: &Path) {
    for c in copies {
        let into_dir = c.dest.ends_with('/') || c.sources.len() > 1;
        for s in &c.sources {
            let src = root().join(s);
            assert!(src.exists(), "COPY source {s} is not in the repository");
            let name = Path::new(s).file_name().unwrap();
            let dest = if into_dir && src.is_file() {
                scratch.join(&c.dest).join(name)
            } else {
                scratch.join(&c.dest)
            };
            copy_tree(&src, &dest);
        }
    }
}

/// The platform the image's build runs on here (`rustc -vV`'s host).
fn host_triple() -> String {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("run rustc");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names its host")
        .to_string()
}

/// `cargo fetch --locked` in `dir`, for this platform and from what the
/// test build already fetched: resolving the workspace needs every member's
/// and path dependency's manifest, and the lock file as it is.
fn cargo_resolve(dir: &Path) -> Result<(), String> {
    let out = Command::new(env!("CARGO"))
        .args(["fetch", "--locked", "--offline", "--target", &host_triple()])
        .current_dir(dir)
        .output()
        .expect("run cargo");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The image builds from a clean checkout: what the build stage copies is
/// a workspace Cargo can resolve. Adding a member or a path dependency
/// without a COPY for it fails here, not in `docker build`.
#[test]
fn the_dockerfile_copies_everything_the_workspace_needs() {
    let dockerfile = std::fs::read_to_string(root().join("docker/Dockerfile")).unwrap();
    let copies = build_stage_copies(&dockerfile);
    assert!(
        copies
            .iter()
            .any(|c| c.sources.iter().any(|s| s == "gateway")),
        "no COPY of gateway/ in the build stage: {copies:?}"
    );
    let scratch = tempfile::tempdir().unwrap();
    apply(&copies, scratch.path());
    if let Err(e) = cargo_resolve(scratch.path()) {
        panic!("the build stage's COPY lines leave out part of the workspace:\n{e}");
    }

    // The check can fail: the manifests alone, without the members.
    let bare = tempfile::tempdir().unwrap();
    apply(&copies[..1], bare.path());
    let e = cargo_resolve(bare.path()).expect_err("a workspace without its members resolves");
    assert!(e.contains("failed to load manifest"), "{e}");
}

/// Everything the runtime stage copies from the build context exists, and
/// the context leaves build output out.
#[test]
fn the_runtime_stage_and_dockerignore_fit_the_repository() {
    let dockerfile = std::fs::read_to_string(root().join("docker/Dockerfile")).unwrap();
    let joined = dockerfile.replace("\\\n", " ");
    let context_copies: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from="))
        .collect();
    for line in &context_copies {
        let words: Vec<&str> = line.split_whitespace().skip(1).collect();
        for src in &words[..words.len() - 1] {
            assert!(root().join(src).exists(), "{line}: {src} missing");
        }
    }
    assert!(
        joined.contains("HEALTHCHECK"),
        "the image has no HEALTHCHECK"
    );
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    for big in ["target", ".git"] {
        assert!(
            ignore.lines().any(|l| l.trim() == big),
            ".dockerignore lets {big} into the build context"
        );
    }
}

/// Whether `tool` runs here.
fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The runtime image, built by `make image`'s script around the test build
/// of the binary, starts from its own entrypoint as its own user and
/// answers: its HEALTHCHECK command passes, `/readyz` is 200 and a request
/// is proxied to the demo upstream the entrypoint starts. `podman run` is
/// not possible here (no systemd, hybrid cgroups), so the image's
/// filesystem is exported and its entrypoint run under `chroot` in a
/// network namespace of the test's own, where the image's fixed ports
/// (8080, 9901) are free.
#[test]
fn the_image_starts_and_its_healthcheck_passes() {
    let missing: Vec<&str> = ["podman", "unshare", "chroot", "ip", "curl"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    let root_user = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    if !missing.is_empty() || !root_user {
        let why = format!(
            "the image test needs root and {missing:?} (make test-deps installs podman, debootstrap)"
        );
        crate::support::skip(&why);
        return;
    }
    let tag = format!("localhost/meshgate:test-{}", std::process::id());
    let built = Command::new(root().join("scripts/build-image.sh"))
        .args([crate::support::BIN, &tag])
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "scripts/build-image.sh failed:\n{}{}",
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    let _image = Image(tag.clone());
    let inspect = |format: &str| -> String {
        let out = Command::new("podman")
            .args(["image", "inspect", &tag, "--format", format])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let user = inspect("{{.User}}");
    assert_eq!(user, "10001", "the image runs as non-root");
    let health: Vec<String> = serde_json::from_str(&inspect("{{json .HealthCheck.Test}}")).unwrap();
    assert_eq!(
        health.first().map(String::as_str),
        Some("CMD"),
        "{health:?}"
    );
    let command: Vec<String> = [".Config.Entrypoint", ".Config.Cmd"]
        .iter()
        .flat_map(|f| {
            serde_json::from_str::<Vec<String>>(&inspect(&format!("{{{{json {f}}}}}"))).unwrap()
        })
        .collect();

    let fs = tempfile::tempdir().unwrap();
    let export = format!(
        "cid=$(podman create {tag}) && podman export \"$cid\" | tar -x -C {} && podman rm \"$cid\" >/dev/null",
        fs.path().display()
    );
    let out = Command::new("sh").args(["-c", &export]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let quote = |args: &[String]| -> String {
        args.iter()
            .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let run_as = format!("chroot --userspec={user}:{user} {}", fs.path().display());
    // Inside the namespace: start the entrypoint, wait (bounded) for the
    // HEALTHCHECK command to pass, then ask as a client would.
    let script = format!(
        r#"set -u
ip link set lo up
{run_as} {command} > {log} 2>&1 &
ok=no
for _ in $(seq 1 200); do
  if {run_as} {health} >/dev/null 2>&1; then ok=yes; break; fi
  sleep 0.1
done
echo "healthcheck=$ok"
echo "readyz=$(curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:9901/readyz)"
curl -s --max-time 5 http://127.0.0.1:8080/hello
"#,
        command = quote(&command),
        health = quote(&health[1..]),
        log = fs.path().join("gateway.log").display(),
    );
    let out = Command::new("timeout")
        .args(["60", "unshare", "--net", "--pid", "--fork", "--mount-proc"])
        .args(["sh", "-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = std::fs::read_to_string(fs.path().join("gateway.log")).unwrap_or_default();
    assert!(stdout.contains("healthcheck=yes"), "{stdout}\n{log}");
    assert!(stdout.contains("readyz=200"), "{stdout}\n{log}");
    assert!(
        stdout.contains(r#""path": "/hello""#),
        "no proxied answer from the demo upstream: {stdout}\n{log}"
    );
}

/// Removes the test's image.
struct Image(String);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rmi", "-f", &self.0]).output();
    }
}

/// The Debian package (`make deb`'s script, around the test build of the
/// binary): the binary in /usr/bin, the unit (enabled on install, not
/// started) calling it there, /etc/meshgate/gateway.toml as a conffile that
/// `meshgate check` accepts, the man page and completions made from the
/// command's definition; lintian finds no error.
#[test]
fn the_debian_package_holds_what_an_install_needs() {
    let missing: Vec<&str> = ["cargo-deb", "lintian", "dpkg-deb", "gzip"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    if !missing.is_empty() {
        crate::support::skip(&format!(
            "the package test needs {missing:?} (make test-deps installs cargo-deb and lintian)"
        ));
        return;
    }
    let built = Command::new(root().join("scripts/build-deb.sh"))
        .arg("dev")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&built.stdout);
    assert!(
        built.status.success(),
        "scripts/build-deb.sh failed:\n{stdout}{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let deb = root().join(stdout.lines().last().unwrap().trim());
    let name = deb.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(&format!("meshgate_{}-", env!("CARGO_PKG_VERSION")))
            && name.ends_with("_amd64.deb"),
        "{name}"
    );
    let run = |args: &[&str]| {
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let deb = deb.to_str().unwrap();
    let (_, contents) = run(&["dpkg-deb", "-c", deb]);
    for path in [
        "./usr/bin/meshgate",
        "./usr/lib/systemd/system/meshgate.service",
        "./etc/meshgate/gateway.toml",
        "./usr/share/man/man1/meshgate.1.gz",
        "./usr/share/bash-completion/completions/meshgate",
        "./usr/share/zsh/vendor-completions/_meshgate",
        "./usr/share/fish/vendor_completions.d/meshgate.fish",
        "./usr/share/doc/meshgate/copyright",
        "./usr/share/doc/meshgate/changelog.Debian.gz",
    ] {
        assert!(
            contents.contains(path),
            "{path} is not in the package:\n{contents}"
        );
    }
    let (_, package) = run(&["dpkg-deb", "-f", deb, "Package"]);
    assert_eq!(package.trim(), "meshgate");
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("DEBIAN");
    let (ok, out) = run(&["dpkg-deb", "-e", deb, control.to_str().unwrap()]);
    assert!(ok, "{out}");
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    assert_eq!(
        read(&control.join("conffiles")).trim(),
        "/etc/meshgate/gateway.toml"
    );
    let postinst = read(&control.join("postinst"));
    assert!(
        postinst.contains("deb-systemd-helper") && postinst.contains("enable"),
        "{postinst}"
    );
    assert!(
        !postinst.contains("deb-systemd-invoke start"),
        "started on install:\n{postinst}"
    );

    let files = dir.path().join("files");
    let (ok, out) = run(&["dpkg-deb", "-x", deb, files.to_str().unwrap()]);
    assert!(ok, "{out}");
    let unit = read(&files.join("usr/lib/systemd/system/meshgate.service"));
    assert!(
        unit.contains("ExecStart=/usr/bin/meshgate run -c /etc/meshgate/gateway.toml"),
        "{unit}"
    );
    assert!(!unit.contains("/usr/local/bin"), "{unit}");
    let (ok, out) = run(&[
        files.join("usr/bin/meshgate").to_str().unwrap(),
        "check",
        "-c",
        files.join("etc/meshgate/gateway.toml").to_str().unwrap(),
    ]);
    assert!(ok, "the packaged config: {out}");
    let (_, man) = run(&[
        "gzip",
        "-dc",
        files
            .join("usr/share/man/man1/meshgate.1.gz")
            .to_str()
            .unwrap(),
    ]);
    assert!(
        man.contains(".TH meshgate 1") && man.contains("check"),
        "{man}"
    );
    let bash = read(&files.join("usr/share/bash-completion/completions/meshgate"));
    assert!(
        bash.contains("complete -F") && bash.contains("reload"),
        "{bash}"
    );

    let (_, lint) = run(&["lintian", deb]);
    let errors: Vec<&str> = lint.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{lint}");
}
