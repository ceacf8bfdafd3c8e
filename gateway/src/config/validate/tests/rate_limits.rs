//! `[rate_limits.NAME]` and `[redis]`.

use super::*;

bad!(
    rate_limit_unknown,
    with_route("upstream = \"u\"\nrate_limits = [\"per_clinet\"]\n"),
    7,
    "unknown rate limit `per_clinet`"
);

bad!(
    rate_limit_key,
    format!("{OK_LISTENER}[rate_limits.p]\nkey = \"cookie\"\nrate = 1\n"),
    4,
    "unknown rate-limit key"
);

bad!(
    rate_limit_global_without_redis,
    format!("{OK_LISTENER}[rate_limits.p]\nkey = \"route\"\nrate = 1\nscope = \"global\"\n"),
    6,
    "there is no [redis] table"
);

const OK_REDIS: &str = "[redis]\nurl = \"redis://127.0.0.1:6379/0\"\n";

bad!(
    rate_limit_global_too_fine,
    format!("{OK_LISTENER}{OK_REDIS}[rate_limits.p]\nkey = \"route\"\nrate = 200000\nscope = \"global\"\n"),
    7,
    "finer than a global limit counts"
);

bad!(
    rate_limit_scope,
    format!("{OK_LISTENER}[rate_limits.p]\nkey = \"route\"\nrate = 1\nscope = \"cluster\"\n"),
    6,
    "unknown scope"
);

bad!(
    rate_limit_batch_local,
    format!("{OK_LISTENER}[rate_limits.p]\nkey = \"route\"\nrate = 1\nbatch = 2\n"),
    6,
    "applies only to scope = \"global\""
);

bad!(
    rate_limit_batch_above_burst,
    format!("{OK_LISTENER}{OK_REDIS}[rate_limits.p]\nkey = \"route\"\nrate = 10\nburst = 4\nscope = \"global\"\nbatch = 5\n"),
    10,
    "batch = 5 is out of range"
);

bad!(
    redis_url,
    format!("{OK_LISTENER}[redis]\nurl = \"http://127.0.0.1:6379\"\n"),
    4,
    "is not usable"
);

bad!(
    redis_on_error,
    format!("{OK_LISTENER}{OK_REDIS}on_error = \"retry\"\n"),
    5,
    "unknown on_error"
);

bad!(
    redis_timeout,
    format!("{OK_LISTENER}{OK_REDIS}timeout = \"0s\"\n"),
    5,
    "redis.timeout must be greater than zero"
);

bad!(
    redis_unknown_key,
    format!("{OK_LISTENER}{OK_REDIS}pool = 4\n"),
    5,
    "unknown key `pool`"
);

bad!(
    rate_limit_mode,
    format!("{OK_LISTENER}[rate_limits.p]\nkey = \"route\"\nrate = 1\nmode = \"loud\"\n"),
    6,
    "unknown mode"
);

bad!(
    rate_limit_rate,
    format!("{OK_LISTENER}[rate_limits.p]\nkey = \"route\"\nrate = 0\n"),
    5,
    "rate = 0 is out of range"
);

bad!(
    rate_limit_burst,
    format!("{OK_LISTENER}[rate_limits.p]\nkey = \"route\"\nrate = 1\nburst = -1\n"),
    6,
    "burst = -1 is out of range"
);

bad!(
    rate_limit_too_fine,
    format!("{OK_LISTENER}[rate_limits.p]\nkey = \"route\"\nrate = 1000000000\nper = \"1ms\"\n"),
    5,
    "finer than a nanosecond"
);

bad!(
    rate_limit_max_keys,
    format!("{OK_LISTENER}[rate_limits.p]\nkey = \"route\"\nrate = 1\nmax_keys = 0\n"),
    6,
    "max_keys = 0 is out of range"
);

#[test]
fn rate_limit_defaults() {
    let cfg = parse(
        Path::new("t.toml"),
        &format!("{OK_LISTENER}trusted_proxies = [\"10.0.0.0/8\", \"192.0.2.1\"]\n[rate_limits.p]\nkey = \"header:X-Api-Key\"\nrate = 7\n"),
    )
    .unwrap();
    let p = &cfg.rate_limits[0];
    assert_eq!(
        (p.rate, p.burst, p.per),
        (7, 7, model::DEFAULT_RATE_LIMIT_PER)
    );
    assert_eq!(p.mode, model::LimitMode::Enforce);
    assert_eq!(
        p.key,
        model::RateLimitKey::Header(http::HeaderName::from_static("x-api-key"))
    );
    assert!(!p.headers_on_allowed);
    assert_eq!(p.max_keys, model::DEFAULT_MAX_KEYS);
    assert_eq!(cfg.listeners[0].trusted_proxies.len(), 2);
}

#[test]
fn redis_and_global_defaults() {
    let cfg = parse(
        Path::new("t.toml"),
        &format!("{OK_LISTENER}[redis]\nurl = \"redis://:s3cret@127.0.0.1:6379/2\"\n[rate_limits.p]\nkey = \"route\"\nrate = 7\nscope = \"global\"\n"),
    )
    .unwrap();
    let r = cfg.redis.as_ref().unwrap();
    assert_eq!(r.on_error, model::OnError::Allow);
    assert_eq!(r.timeout, model::DEFAULT_REDIS_TIMEOUT);
    assert_eq!(r.key_prefix, model::DEFAULT_REDIS_KEY_PREFIX);
    assert_eq!(r.redacted_url(), "redis://:***@127.0.0.1:6379/2");
    assert_eq!(
        cfg.rate_limits[0].scope,
        model::LimitScope::Global { batch: 1 }
    );
}

#[test]
fn passwords_never_appear_in_errors_or_redacted_urls() {
    use model::redact_secrets;
    assert_eq!(
        redact_secrets("redis://user:pw@h:1/0"),
        "redis://user:***@h:1/0"
    );
    assert_eq!(redact_secrets("redis://pw@h:1/0"), "redis://***@h:1/0");
    assert_eq!(
        redact_secrets("unix:///run/redis.sock?db=1&pass=pw"),
        "unix:///run/redis.sock?db=1&pass=***"
    );
    assert_eq!(
        redact_secrets("url = \"rediss://:pw@h:6380/0\" # x"),
        "url = \"rediss://:***@h:6380/0\" # x"
    );
    assert_eq!(redact_secrets("redis://h:1/0"), "redis://h:1/0");
    assert_eq!(redact_secrets("bypass=1"), "bypass=1");

    // An invalid URL: the message and the quoted source line hide the password.
    let src = format!("{OK_LISTENER}[redis]\nurl = \"redis://:s3cret@127.0.0.1:6380/x\"\n");
    let err = parse(Path::new("t.toml"), &src).unwrap_err().to_string();
    assert!(err.contains("is not usable"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
    // TLS (rediss://) with a CA file that is not there: named, no password.
    let src = format!("{OK_LISTENER}[redis]\nurl = \"rediss://:s3cret@127.0.0.1:6380/0\"\nca = \"no-such-ca.pem\"\n");
    let err = parse(Path::new("t.toml"), &src).unwrap_err().to_string();
    assert!(
        err.contains("redis.ca: cannot read") && err.contains("no-such-ca.pem"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
    // A syntax error on the line shows it redacted too.
    let src = format!("{OK_LISTENER}[redis]\nurl = \"redis://:s3cret@h:1/0\" x\n");
    let err = parse(Path::new("t.toml"), &src).unwrap_err().to_string();
    assert!(!err.contains("s3cret"), "{err}");
    let cfg = parse(
        Path::new("t.toml"),
        &format!("{OK_LISTENER}[redis]\nurl = \"redis://:s3cret@h:1/0\"\n"),
    )
    .unwrap();
    assert!(!format!("{cfg:?}").contains("s3cret"));
}

#[test]
fn an_invalid_redis_table_is_not_reported_as_missing() {
    let all = diags(&format!(
        "{OK_LISTENER}[redis]\ntimeout = \"1s\"\n[rate_limits.p]\nkey = \"route\"\nrate = 1\nscope = \"global\"\n"
    ));
    assert!(all.iter().any(|d| d.message.contains("missing")), "{all:?}");
    assert!(!all.iter().any(|d| d.message.contains("no [redis] table")));
}

#[test]
fn redis_is_one_server_or_a_cluster() {
    let cfg = parse(
        Path::new("t.toml"),
        &format!("{OK_LISTENER}[redis]\ncluster = [\"redis://127.0.0.1:7000\", \"redis://:pw@127.0.0.1:7001\"]\n"),
    )
    .expect("valid")
    .config;
    let r = cfg.redis.unwrap();
    assert_eq!(r.cluster.len(), 2);
    assert_eq!(
        r.redacted_url(),
        "cluster redis://127.0.0.1:7000, redis://:***@127.0.0.1:7001"
    );
    for (redis, says) in [
        (
            "url = \"redis://h:1\"\ncluster = [\"redis://h:2\"]",
            "[redis] has both url and cluster",
        ),
        ("cluster = []", "redis.cluster = [] names no node"),
        (
            "cluster = [\"unix:///tmp/r.sock\"]",
            "redis.cluster has a unix:// socket",
        ),
        (
            "timeout = \"1s\"",
            "t.toml:3:2: error: [redis] is missing url (or cluster)",
        ),
        (
            "url = \"redis://h:1\"\nca = \"ca.pem\"",
            "redis.ca is set, but Redis is not reached over TLS",
        ),
    ] {
        let err = parse(
            Path::new("t.toml"),
            &format!("{OK_LISTENER}[redis]\n{redis}\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(says), "{redis}: {err}");
    }
}
