//! The worker daemon's settings (the `gantry worker` flags) and their checks.

use crate::error::WorkerError;
use gantry_coordinator::auth::{AddToken, TlsFiles};
use gantry_coordinator::server::MetricsAccess;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The coordinator's URL (`http://host:port`, `https://…` or `host:port`).
    pub coordinator: String,
    /// The cluster token: sent to the coordinator, and required from callers of this
    /// worker's log service.
    pub token: String,
    /// When set, `/metrics` answers only requests with `Authorization: Bearer <this>`.
    pub metrics_token: Option<String>,
    /// `cert` + `key`: serve TLS; `ca`: use TLS towards the coordinator.
    pub tls: TlsFiles,
    /// Unique worker name (default: the hostname).
    pub name: Option<String>,
    /// CPU slots offered (default: the number of CPUs).
    pub slots: Option<u32>,
    pub labels: BTreeMap<String, String>,
    /// The address other hosts reach this worker's ranks at (default: the local address on
    /// the route to the coordinator).
    pub advertise_address: Option<String>,
    /// Rank run directories and logs go under `<state_dir>/jobs/`.
    pub state_dir: PathBuf,
    /// Inclusive range of ports the coordinator may hand out as MASTER_PORT here.
    pub port_range: (u16, u16),
    /// Time between SIGTERM and SIGKILL when stopping a rank.
    pub grace: Duration,
    /// The `gantry` binary that runs training ranks (`gantry rank …`).
    pub rank_program: PathBuf,
    /// The environment ranks start from, before secrets are removed ([`crate::scrub`]):
    /// the binary passes its own. Empty by default.
    pub env: Vec<(OsString, OsString)>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            coordinator: String::new(),
            token: String::new(),
            metrics_token: None,
            tls: TlsFiles::default(),
            name: None,
            slots: None,
            labels: BTreeMap::new(),
            advertise_address: None,
            state_dir: std::env::temp_dir().join("gantry-worker"),
            port_range: (29500, 29999),
            grace: Duration::from_secs(10),
            rank_program: PathBuf::from("gantry"),
            env: Vec::new(),
        }
    }
}

impl WorkerConfig {
    /// Checks what can be checked without the network; each error names the field.
    pub fn validate(&self) -> Result<(), WorkerError> {
        let bad = |field: &'static str, reason: &str| {
            Err(WorkerError::Config {
                field,
                reason: reason.to_string(),
            })
        };
        if self.coordinator.trim().is_empty() {
            return bad("coordinator", "the coordinator URL is empty");
        }
        if crate::resources::url_host_port(&self.coordinator).is_none() {
            return bad(
                "coordinator",
                "expected http://HOST:PORT, https://HOST:PORT or HOST:PORT",
            );
        }
        AddToken::new(&self.token)?;
        if let Err(e) = MetricsAccess::new(self.metrics_token.as_deref()) {
            return bad("metrics_token", &e.to_string());
        }
        if self.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
            return bad("name", "the worker name is empty");
        }
        if self.slots == Some(0) {
            return bad("slots", "a worker needs at least one slot");
        }
        for k in self.labels.keys() {
            if k.trim().is_empty() {
                return bad("labels", "a label key is empty");
            }
        }
        if self.advertise_address.as_deref().is_some_and(|a| a.trim().is_empty()) {
            return bad("advertise_address", "the advertised address is empty");
        }
        if self.state_dir.as_os_str().is_empty() {
            return bad("state_dir", "the state directory is empty");
        }
        let (lo, hi) = self.port_range;
        if lo == 0 || lo > hi {
            return bad("port_range", "expected 1 <= start <= end");
        }
        if self.rank_program.as_os_str().is_empty() {
            return bad("rank_program", "the rank program is empty");
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return bad("tls", "serving TLS needs both a certificate and a key");
        }
        Ok(())
    }
}

/// Parses `k=v,k2=v2` (spaces around items and keys are trimmed; an empty string is no
/// labels). Each item needs a non-empty key and an `=`; a key given twice is an error.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, WorkerError> {
    let mut labels = BTreeMap::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let bad = |reason: &str| WorkerError::BadLabel {
            item: item.to_string(),
            reason: reason.to_string(),
        };
        let (k, v) = item.split_once('=').ok_or_else(|| bad("no `=`"))?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() {
            return Err(bad("the key is empty"));
        }
        if labels.insert(k.to_string(), v.to_string()).is_some() {
            return Err(bad("this key is given twice"));
        }
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        let l = parse_labels("zone=a, gpu = h200,empty=").unwrap();
        assert_eq!(l.get("zone").map(String::as_str), Some("a"));
        assert_eq!(l.get("gpu").map(String::as_str), Some("h200"));
        assert_eq!(l.get("empty").map(String::as_str), Some(""));
        assert!(parse_labels("").unwrap().is_empty());
        assert!(parse_labels(" , ").unwrap().is_empty());
        let e = parse_labels("zone=a,oops").unwrap_err().to_string();
        assert!(e.contains("`oops`") && e.contains("no `=`"), "{e}");
        let e = parse_labels("=v").unwrap_err().to_string();
        assert!(e.contains("`=v`") && e.contains("key is empty"), "{e}");
        let e = parse_labels("a=1,a=2").unwrap_err().to_string();
        assert!(e.contains("`a=2`") && e.contains("twice"), "{e}");
    }

    fn good() -> WorkerConfig {
        WorkerConfig {
            coordinator: "http://127.0.0.1:7000".into(),
            token: "secret".into(),
            ..WorkerConfig::default()
        }
    }

    #[test]
    fn validation_names_the_field() {
        assert!(good().validate().is_ok());
        let field = |c: WorkerConfig| match c.validate() {
            Err(WorkerError::Config { field, .. }) => field,
            Err(WorkerError::Auth(_)) => "token",
            other => panic!("expected a config error, got {other:?}"),
        };
        assert_eq!(
            field(WorkerConfig {
                coordinator: String::new(),
                ..good()
            }),
            "coordinator"
        );
        assert_eq!(
            field(WorkerConfig {
                coordinator: "http://:1".into(),
                ..good()
            }),
            "coordinator"
        );
        assert_eq!(
            field(WorkerConfig {
                token: String::new(),
                ..good()
            }),
            "token"
        );
        assert_eq!(
            field(WorkerConfig {
                token: "a\nb".into(),
                ..good()
            }),
            "token"
        );
        assert_eq!(
            field(WorkerConfig {
                slots: Some(0),
                ..good()
            }),
            "slots"
        );
        assert_eq!(
            field(WorkerConfig {
                name: Some(" ".into()),
                ..good()
            }),
            "name"
        );
        assert_eq!(
            field(WorkerConfig {
                port_range: (30000, 29999),
                ..good()
            }),
            "port_range"
        );
        assert_eq!(
            field(WorkerConfig {
                port_range: (0, 10),
                ..good()
            }),
            "port_range"
        );
        let tls = TlsFiles {
            cert: Some("c.pem".into()),
            ..TlsFiles::default()
        };
        assert_eq!(field(WorkerConfig { tls, ..good() }), "tls");
        assert_eq!(
            field(WorkerConfig {
                metrics_token: Some(String::new()),
                ..good()
            }),
            "metrics_token"
        );
    }
}
