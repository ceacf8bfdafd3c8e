//! The process-wide sections: `[gateway]`, `[admin]` and `[telemetry]`.

use super::*;

const MAX_WORKERS: i64 = 1024;
/// One head at the largest `max_request_header_bytes`, at least.
const MIN_PENDING_HEAD_BYTES: i64 = 1024 * 1024;
const MAX_PENDING_HEAD_BYTES: i64 = 64 * 1024 * 1024 * 1024;
/// Below this the gateway sheds load from its start: a typo, surely.
const MIN_OVERLOAD_MEMORY: u64 = 16 * 1024 * 1024;

impl Validator {
    pub(super) fn gateway(&mut self, raw: RawGateway) -> GatewaySettings {
        let name = match raw.name {
            Some(n) if n.get_ref().trim().is_empty() => {
                self.error(
                    n.span(),
                    "gateway.name is empty",
                    "set a name such as \"edge-1\", or remove the key",
                );
                DEFAULT_GATEWAY_NAME.to_string()
            }
            Some(n) => n.into_inner(),
            None => DEFAULT_GATEWAY_NAME.to_string(),
        };
        let workers = raw.workers.and_then(|w| {
            let n = *w.get_ref();
            if (1..=MAX_WORKERS).contains(&n) {
                Some(n as usize)
            } else {
                self.error(
                    w.span(),
                    format!("gateway.workers = {n} is out of range"),
                    format!("use 1..={MAX_WORKERS}, or remove the key for one worker per core"),
                );
                None
            }
        });
        let shutdown_grace_period = self.duration_or(
            raw.shutdown_grace_period.as_ref(),
            "gateway.shutdown_grace_period",
            DEFAULT_SHUTDOWN_GRACE_PERIOD,
            true,
        );
        let shutdown_delay = self.duration_or(
            raw.shutdown_delay.as_ref(),
            "gateway.shutdown_delay",
            Duration::ZERO,
            true,
        );
        let header_case = match raw.header_case.as_ref() {
            None => HeaderCase::default(),
            Some(c) => match c.get_ref().as_str() {
                "preserve" => HeaderCase::Preserve,
                "lowercase" => HeaderCase::Lowercase,
                other => {
                    self.error(
                        c.span(),
                        format!("unknown gateway.header_case \"{other}\""),
                        "use \"preserve\" (the default) or \"lowercase\"",
                    );
                    HeaderCase::default()
                }
            },
        };
        let http1_engine = match raw.http1_engine.as_ref() {
            None => Http1Engine::default(),
            Some(e) => match e.get_ref().as_str() {
                "pingora" => Http1Engine::Pingora,
                "fast" => Http1Engine::Fast,
                other => {
                    self.error(
                        e.span(),
                        format!("unknown gateway.http1_engine \"{other}\""),
                        "use \"pingora\" (the default) or \"fast\"",
                    );
                    Http1Engine::default()
                }
            },
        };
        let max_pending_head_bytes = match raw.max_pending_head_bytes {
            None => DEFAULT_MAX_PENDING_HEAD_BYTES,
            Some(b) if (MIN_PENDING_HEAD_BYTES..=MAX_PENDING_HEAD_BYTES).contains(b.get_ref()) => {
                *b.get_ref() as usize
            }
            Some(b) => {
                self.error(
                    b.span(),
                    format!("gateway.max_pending_head_bytes = {} is out of range", b.get_ref()),
                    format!("use {MIN_PENDING_HEAD_BYTES}..={MAX_PENDING_HEAD_BYTES} bytes, or remove the key for {DEFAULT_MAX_PENDING_HEAD_BYTES} (32 MiB)"),
                );
                DEFAULT_MAX_PENDING_HEAD_BYTES
            }
        };
        let overload_memory = raw
            .overload
            .as_ref()
            .and_then(|o| o.get_ref().memory.as_ref())
            .and_then(|m| match parse_size(m.get_ref()) {
                Some(n) if n >= MIN_OVERLOAD_MEMORY => Some(n),
                Some(_) => {
                    self.error(
                        m.span(),
                        format!("gateway.overload.memory = \"{}\" is below 16 MiB, less than meshgate needs to run", m.get_ref()),
                        "give the memory at which to shed load, e.g. \"1GiB\"; keep it under the container's or unit's memory limit",
                    );
                    None
                }
                None => {
                    self.error(
                        m.span(),
                        format!("gateway.overload.memory = \"{}\" is not a size", m.get_ref()),
                        "write a size such as \"768MiB\" or \"2GiB\"",
                    );
                    None
                }
            });
        GatewaySettings {
            name,
            workers,
            work_stealing: raw.work_stealing.unwrap_or(DEFAULT_WORK_STEALING),
            shutdown_grace_period,
            shutdown_delay,
            header_case,
            http1_engine,
            max_pending_head_bytes,
            overload_memory,
            upgrade_socket: raw
                .upgrade_socket
                .as_ref()
                .map_or_else(|| PathBuf::from(DEFAULT_UPGRADE_SOCKET), |p| self.path(p)),
        }
    }

    #[allow(
        clippy::expect_used,
        reason = "a constant, parsed by the defaults test"
    )]
    pub(super) fn admin(&mut self, raw: RawAdmin) -> Admin {
        let default: SocketAddr = DEFAULT_ADMIN_LISTEN
            .parse()
            .expect("constant address parses");
        let listen = match raw.listen {
            Some(l) => self.socket_addr(&l, "admin.listen").unwrap_or(default),
            None => default,
        };
        Admin { listen }
    }

    pub(super) fn telemetry(&mut self, raw: RawTelemetry) -> Telemetry {
        let access_log = match raw.access_log.as_ref() {
            None => AccessLogFormat::Off,
            Some(f) => match f.get_ref().as_str() {
                "json" => AccessLogFormat::Json,
                "text" => AccessLogFormat::Text,
                "off" => AccessLogFormat::Off,
                other => {
                    self.error(
                        f.span(),
                        format!("unknown access_log format \"{other}\""),
                        "use \"json\", \"text\" or \"off\"",
                    );
                    AccessLogFormat::Off
                }
            },
        };
        let access_log_file = raw.access_log_file.and_then(|f| {
            if f.get_ref().trim().is_empty() {
                self.error(
                    f.span(),
                    "telemetry.access_log_file is empty",
                    "write a file path, or remove the key to log to standard output",
                );
                None
            } else {
                // Relative to the config file, as every path in it is.
                let path = self.path(&f);
                // `run` opens (and may create) the file; its directory must be there.
                let dir = match path.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                    _ => std::path::PathBuf::from("."),
                };
                if !dir.is_dir() {
                    self.error(
                        f.span(),
                        format!(
                            "telemetry.access_log_file: the directory {} does not exist",
                            dir.display()
                        ),
                        "create it (the systemd unit's LogsDirectory=meshgate makes /var/log/meshgate), or remove the key to log to standard output",
                    );
                }
                Some(path)
            }
        });
        let tracing = raw.tracing.and_then(|t| self.tracing(t));
        Telemetry {
            access_log,
            access_log_file,
            tracing,
        }
    }

    pub(super) fn tracing(&mut self, raw: Spanned<RawTracing>) -> Option<Tracing> {
        let raw = raw.into_inner();
        let endpoint = match &raw.endpoint {
            None => DEFAULT_OTLP_ENDPOINT.to_string(),
            Some(e) => {
                let url = e.get_ref().trim();
                let parsed = url.parse::<http::Uri>().ok().filter(|u| {
                    matches!(u.scheme_str(), Some("http") | Some("https"))
                        && u.host().is_some_and(|h| !h.is_empty())
                });
                match parsed {
                    // A bare collector address gets the standard traces path.
                    Some(u) if u.path() == "/" || u.path().is_empty() => {
                        format!("{}/v1/traces", url.trim_end_matches('/'))
                    }
                    Some(_) => url.to_string(),
                    None => {
                        self.error(e.span(), format!("telemetry.tracing.endpoint \"{url}\" is not an http(s) URL"), "write the collector's OTLP/HTTP URL, e.g. \"http://127.0.0.1:4318/v1/traces\"");
                        return None;
                    }
                }
            }
        };
        let service_name = match &raw.service_name {
            Some(n) if n.get_ref().trim().is_empty() => {
                self.error(
                    n.span(),
                    "telemetry.tracing.service_name is empty",
                    "set a name such as \"edge-gateway\", or remove the key for \"meshgate\"",
                );
                return None;
            }
            Some(n) => n.get_ref().clone(),
            None => DEFAULT_SERVICE_NAME.to_string(),
        };
        let sample_ratio = match &raw.sample_ratio {
            None => DEFAULT_SAMPLE_RATIO,
            Some(r) if (0.0..=1.0).contains(r.get_ref()) => *r.get_ref(),
            Some(r) => {
                self.error(
                    r.span(),
                    format!(
                        "telemetry.tracing.sample_ratio = {} is outside 0.0..=1.0",
                        r.get_ref()
                    ),
                    "use a fraction: 1.0 traces every request, 0.01 one in a hundred",
                );
                return None;
            }
        };
        let queue_size = match &raw.queue_size {
            None => DEFAULT_TRACE_QUEUE,
            Some(q) if (1..=1_000_000).contains(q.get_ref()) => *q.get_ref() as usize,
            Some(q) => {
                self.error(
                    q.span(),
                    format!(
                        "telemetry.tracing.queue_size = {} is out of range",
                        q.get_ref()
                    ),
                    "use 1..=1000000 spans",
                );
                return None;
            }
        };
        let export_interval = self.duration_or(
            raw.export_interval.as_ref(),
            "telemetry.tracing.export_interval",
            DEFAULT_EXPORT_INTERVAL,
            false,
        );
        let export_timeout = self.duration_or(
            raw.export_timeout.as_ref(),
            "telemetry.tracing.export_timeout",
            DEFAULT_EXPORT_TIMEOUT,
            false,
        );
        if raw.enabled == Some(false) {
            return None;
        }
        Some(Tracing {
            endpoint,
            service_name,
            sample_ratio,
            resource: raw.resource.unwrap_or_default().into_iter().collect(),
            export_interval,
            export_timeout,
            queue_size,
        })
    }
}
