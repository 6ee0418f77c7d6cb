//! The cluster token on every call, and TLS settings shared by the coordinator, the workers
//! and the CLI.
//!
//! The token travels as `authorization: Bearer <token>` metadata. The server side compares in
//! constant time and answers a missing or wrong token with `Unauthenticated` (and a log line
//! naming the peer), before any handler runs.

use std::path::PathBuf;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// Where the TLS files are. A server needs `cert` + `key`; a client needs `ca` (and uses
/// `domain` to check the server's name, default: the host of the URL).
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub domain: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read TLS file {path}: {source}")]
    TlsFile { path: PathBuf, source: std::io::Error },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("bad address `{url}`: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("the cluster token is empty or not valid in a header (use printable ASCII)")]
    BadToken,
}

fn read(path: &PathBuf) -> Result<Vec<u8>, AuthError> {
    std::fs::read(path).map_err(|source| AuthError::TlsFile {
        path: path.clone(),
        source,
    })
}

impl TlsFiles {
    pub fn is_enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.ca.is_some()
    }

    pub fn server_config(&self) -> Result<Option<ServerTlsConfig>, AuthError> {
        match (&self.cert, &self.key) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => {
                let identity = Identity::from_pem(read(cert)?, read(key)?);
                Ok(Some(ServerTlsConfig::new().identity(identity)))
            }
            _ => Err(AuthError::Tls("a server needs both --tls-cert and --tls-key".into())),
        }
    }

    pub fn client_config(&self, host: &str) -> Result<Option<ClientTlsConfig>, AuthError> {
        let Some(ca) = &self.ca else { return Ok(None) };
        let domain = self.domain.clone().unwrap_or_else(|| host.to_string());
        Ok(Some(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read(ca)?))
                .domain_name(domain),
        ))
    }
}

/// Server side: reject calls without the right token.
#[derive(Clone)]
pub struct RequireToken {
    expected: std::sync::Arc<Vec<u8>>,
}

impl RequireToken {
    pub fn new(token: &str) -> RequireToken {
        RequireToken {
            expected: std::sync::Arc::new(format!("Bearer {token}").into_bytes()),
        }
    }
}

impl tonic::service::Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let got = request.metadata().get("authorization").map(|v| v.as_bytes());
        let ok = got.is_some_and(|g| constant_time_eq(g, &self.expected));
        if ok {
            return Ok(request);
        }
        let peer = request
            .remote_addr()
            .map_or("unknown peer".to_string(), |a| a.to_string());
        let why = if got.is_some() {
            "wrong cluster token"
        } else {
            "no cluster token"
        };
        tracing::warn!(%peer, "rejected a call: {why}");
        Err(Status::unauthenticated(format!("{why} (pass --token or GANTRY_TOKEN)")))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Client side: add the token to every call.
#[derive(Clone)]
pub struct AddToken {
    header: MetadataValue<tonic::metadata::Ascii>,
}

impl AddToken {
    pub fn new(token: &str) -> Result<AddToken, AuthError> {
        if token.is_empty() {
            return Err(AuthError::BadToken);
        }
        let header = format!("Bearer {token}").parse().map_err(|_| AuthError::BadToken)?;
        Ok(AddToken { header })
    }
}

impl tonic::service::Interceptor for AddToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert("authorization", self.header.clone());
        Ok(request)
    }
}

/// An endpoint for `url` (`http://host:port`, `https://…`, or bare `host:port`), with TLS
/// when the files say so. Connection is lazy: the first call connects, and a dropped
/// connection is re-established by the next call.
pub fn endpoint(url: &str, tls: &TlsFiles) -> Result<Endpoint, AuthError> {
    let full = if url.contains("://") {
        url.to_string()
    } else if tls.ca.is_some() {
        format!("https://{url}")
    } else {
        format!("http://{url}")
    };
    let bad = |reason: String| AuthError::BadUrl {
        url: url.to_string(),
        reason,
    };
    let mut ep = Endpoint::from_shared(full.clone()).map_err(|e| bad(e.to_string()))?;
    let host = ep.uri().host().ok_or_else(|| bad("no host".into()))?.to_string();
    if let Some(cfg) = tls.client_config(&host)? {
        ep = ep.tls_config(cfg).map_err(|e| AuthError::Tls(e.to_string()))?;
    }
    Ok(ep
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(std::time::Duration::from_secs(10)))
}

/// A lazily connected channel (see [`endpoint`]).
pub fn channel(url: &str, tls: &TlsFiles) -> Result<Channel, AuthError> {
    Ok(endpoint(url, tls)?.connect_lazy())
}
