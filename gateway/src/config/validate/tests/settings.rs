//! `[gateway]`, `[admin]` and `[telemetry]`.

use super::*;

bad!(
    tracing_endpoint,
    format!("[telemetry.tracing]\nendpoint = \"collector:4318\"\n{OK_LISTENER}"),
    2,
    "is not an http(s) URL"
);

bad!(
    tracing_ratio,
    format!("[telemetry.tracing]\nsample_ratio = 1.5\n{OK_LISTENER}"),
    2,
    "sample_ratio = 1.5 is outside"
);

bad!(
    tracing_queue,
    format!("[telemetry.tracing]\nqueue_size = 0\n{OK_LISTENER}"),
    2,
    "queue_size = 0 is out of range"
);

bad!(
    tracing_service_name,
    format!("[telemetry.tracing]\nservice_name = \"\"\n{OK_LISTENER}"),
    2,
    "service_name is empty"
);

bad!(
    tracing_unknown_key,
    format!("[telemetry.tracing]\nendpont = \"x\"\n{OK_LISTENER}"),
    2,
    "unknown key `endpont`"
);

bad!(
    empty_gateway_name,
    format!("[gateway]\nname = \" \"\n{OK_LISTENER}"),
    2,
    "gateway.name is empty"
);

bad!(
    workers_range,
    format!("[gateway]\nworkers = 0\n{OK_LISTENER}"),
    2,
    "gateway.workers = 0 is out of range"
);

bad!(
    bad_admin_addr,
    format!("[admin]\nlisten = \"localhost\"\n{OK_LISTENER}"),
    2,
    "is not an IP address and port"
);

#[test]
fn tracing_defaults_and_bare_endpoint() {
    let cfg = parse(
        Path::new("t.toml"),
        &format!("[telemetry.tracing]\nendpoint = \"http://otel:4318\"\n{OK_LISTENER}"),
    )
    .unwrap();
    let t = cfg.config.telemetry.tracing.expect("tracing on");
    assert_eq!(t.endpoint, "http://otel:4318/v1/traces");
    assert_eq!(t.sample_ratio, model::DEFAULT_SAMPLE_RATIO);
    assert_eq!(t.service_name, model::DEFAULT_SERVICE_NAME);
    let off = parse(
        Path::new("t.toml"),
        &format!("[telemetry.tracing]\nenabled = false\n{OK_LISTENER}"),
    )
    .unwrap();
    assert!(off.telemetry.tracing.is_none());
    let absent = parse(Path::new("t.toml"), OK_LISTENER).unwrap();
    assert!(absent.telemetry.tracing.is_none());
}

bad!(
    access_log_directory_missing,
    format!("{OK_LISTENER}[telemetry]\naccess_log_file = \"/nonexistent/meshgate/access.log\"\n"),
    4,
    "the directory /nonexistent/meshgate does not exist"
);

bad!(
    header_case_unknown,
    format!("[gateway]\nheader_case = \"upper\"\n{OK_LISTENER}"),
    2,
    "unknown gateway.header_case \"upper\""
);

bad!(
    http1_engine_unknown,
    format!("[gateway]\nhttp1_engine = \"turbo\"\n{OK_LISTENER}"),
    2,
    "unknown gateway.http1_engine \"turbo\""
);

#[test]
fn http1_engine_is_read_and_defaults_to_fast() {
    let src = format!("[gateway]\nhttp1_engine = \"pingora\"\n{OK_LISTENER}");
    let cfg = parse(Path::new("t.toml"), &src).unwrap();
    assert_eq!(cfg.gateway.http1_engine, model::Http1Engine::Pingora);
    let cfg = parse(Path::new("t.toml"), OK_LISTENER).unwrap();
    assert_eq!(cfg.gateway.http1_engine, model::Http1Engine::Fast);
}

#[test]
fn header_case_is_read() {
    let src = format!("[gateway]\nheader_case = \"lowercase\"\n{OK_LISTENER}");
    let cfg = parse(Path::new("t.toml"), &src).unwrap();
    assert_eq!(cfg.gateway.header_case, model::HeaderCase::Lowercase);
}

bad!(
    work_stealing_not_a_bool,
    format!("[gateway]\nwork_stealing = \"no\"\n{OK_LISTENER}"),
    2,
    "`work_stealing` must be true or false, not the string \"no\""
);

bad!(
    overload_memory_too_small,
    format!("[gateway]\noverload = {{ memory = \"1MiB\" }}\n{OK_LISTENER}"),
    2,
    "gateway.overload.memory = \"1MiB\" is below 16 MiB"
);

bad!(
    overload_memory_not_a_size,
    format!("[gateway]\noverload = {{ memory = \"2 gigs\" }}\n{OK_LISTENER}"),
    2,
    "gateway.overload.memory = \"2 gigs\" is not a size"
);

bad!(
    pending_head_budget_out_of_range,
    format!("[gateway]\nmax_pending_head_bytes = 100\n{OK_LISTENER}"),
    2,
    "gateway.max_pending_head_bytes = 100 is out of range"
);
