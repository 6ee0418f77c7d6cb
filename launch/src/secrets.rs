//! Tokens from a flag, a file or the environment: the cluster token (`--token`,
//! `--token-file`; `GANTRY_TOKEN`, `GANTRY_TOKEN_FILE`), the metrics token of the daemons
//! (`--metrics-token`, `--metrics-token-file`; `GANTRY_METRICS_TOKEN`,
//! `GANTRY_METRICS_TOKEN_FILE`) and the registry client's token (`--token`, `--token-file`;
//! `GANTRY_REGISTRY_TOKEN`, `GANTRY_REGISTRY_TOKEN_FILE`).
//!
//! A token file holds the token alone; surrounding whitespace (the trailing newline) is
//! ignored, and an unreadable, empty or multi-line file is an error naming the file. It is
//! read once, at start. The value and the file together are an error; on the command line
//! either wins over the environment; both variables set (non-empty) is an error too. A token
//! on the command line is visible to every local user in `ps`, and one in the environment
//! to the processes that inherit it: the file is the safe way.

use anyhow::{Context, bail};
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Where one kind of token may come from.
pub struct TokenSource<'a> {
    /// What to call it in errors, e.g. "cluster token".
    pub what: &'a str,
    /// The flags, for errors.
    pub flag: &'a str,
    pub file_flag: &'a str,
    /// The environment variables.
    pub env: &'a str,
    pub env_file: &'a str,
}

/// The cluster token.
pub const CLUSTER: TokenSource<'static> = TokenSource {
    what: "cluster token",
    flag: "--token",
    file_flag: "--token-file",
    env: "GANTRY_TOKEN",
    env_file: "GANTRY_TOKEN_FILE",
};

/// The daemons' `/metrics` token.
pub const METRICS: TokenSource<'static> = TokenSource {
    what: "metrics token",
    flag: "--metrics-token",
    file_flag: "--metrics-token-file",
    env: "GANTRY_METRICS_TOKEN",
    env_file: "GANTRY_METRICS_TOKEN_FILE",
};

/// The registry client's token.
pub const REGISTRY: TokenSource<'static> = TokenSource {
    what: "registry token",
    flag: "--token",
    file_flag: "--token-file",
    env: "GANTRY_REGISTRY_TOKEN",
    env_file: "GANTRY_REGISTRY_TOKEN_FILE",
};

/// The token in `path`: its contents without surrounding whitespace.
pub fn read_token_file(path: &Path, what: &str) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the {what} file {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        bail!("the {what} file {} is empty", path.display());
    }
    if token.contains(['\n', '\r']) {
        bail!(
            "the {what} file {} has more than one line; it must hold the token alone",
            path.display()
        );
    }
    Ok(token.to_string())
}

/// The token from `flag` or `file` (command line), else from the environment through
/// `lookup`; `None` when none is given. Empty variables count as unset.
pub fn resolve(
    src: &TokenSource,
    flag: Option<&str>,
    file: Option<&Path>,
    lookup: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Option<String>> {
    match (flag, file) {
        (Some(_), Some(_)) => bail!("give either {} or {}, not both", src.flag, src.file_flag),
        (Some(token), None) => return Ok(Some(token.to_string())),
        (None, Some(path)) => return read_token_file(path, src.what).map(Some),
        (None, None) => {}
    }
    let get = |k: &str| lookup(k).filter(|v| !v.is_empty());
    match (get(src.env), get(src.env_file)) {
        (Some(_), Some(_)) => bail!(
            "both {} and {} are set; unset one (the file keeps the {} out of the environment)",
            src.env,
            src.env_file,
            src.what
        ),
        (Some(token), None) => Ok(Some(token)),
        (None, Some(path)) => read_token_file(Path::new(&path), src.what)
            .with_context(|| format!("{} (from {})", src.what, src.env_file))
            .map(Some),
        (None, None) => Ok(None),
    }
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok()
}

/// `--token` / `--token-file`: the cluster token every daemon and client presents.
#[derive(Args, Clone, Debug)]
pub struct ClusterTokenArgs {
    /// Cluster token [env: GANTRY_TOKEN]. Visible to every local user in `ps`: prefer
    /// --token-file.
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    /// File holding the cluster token alone (surrounding whitespace is ignored)
    /// [env: GANTRY_TOKEN_FILE].
    #[arg(long, value_name = "PATH", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// The token once found (a command that makes several clients reads the file once).
    #[arg(skip)]
    resolved: OnceLock<String>,
}

impl ClusterTokenArgs {
    /// The cluster token; an error when none is given.
    pub fn get(&self) -> anyhow::Result<String> {
        if let Some(token) = self.resolved.get() {
            return Ok(token.clone());
        }
        let token = resolve(&CLUSTER, self.token.as_deref(), self.token_file.as_deref(), env)?
            .context("a cluster token is required: --token-file PATH, GANTRY_TOKEN_FILE, --token or GANTRY_TOKEN")?;
        Ok(self.resolved.get_or_init(|| token).clone())
    }
}

/// `--metrics-token` / `--metrics-token-file` of the coordinator and the workers.
#[derive(Args, Clone, Debug)]
pub struct MetricsTokenArgs {
    /// Require `Authorization: Bearer <token>` on /metrics [env: GANTRY_METRICS_TOKEN]
    /// (default: /metrics is open). Not the cluster token: scrapers should not hold that.
    #[arg(long, value_name = "TOKEN")]
    pub metrics_token: Option<String>,
    /// File holding the metrics token alone [env: GANTRY_METRICS_TOKEN_FILE].
    #[arg(long, value_name = "PATH", conflicts_with = "metrics_token")]
    pub metrics_token_file: Option<PathBuf>,
}

impl MetricsTokenArgs {
    /// The metrics token, `None` when /metrics stays open.
    pub fn get(&self) -> anyhow::Result<Option<String>> {
        resolve(
            &METRICS,
            self.metrics_token.as_deref(),
            self.metrics_token_file.as_deref(),
            env,
        )
    }
}

/// The registry client's token: `--token` / `--token-file` (optional: reads may be open).
pub fn registry_token(token: Option<&str>, file: Option<&Path>) -> anyhow::Result<Option<String>> {
    resolve(&REGISTRY, token, file, env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("gantry-secrets-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn token_files() {
        let d = dir("files");
        let ok = d.join("ok");
        std::fs::write(&ok, "  s3cret\n").unwrap();
        assert_eq!(read_token_file(&ok, "cluster token").unwrap(), "s3cret");
        std::fs::write(&ok, "s3cret\r\n").unwrap();
        assert_eq!(read_token_file(&ok, "cluster token").unwrap(), "s3cret");

        let empty = d.join("empty");
        std::fs::write(&empty, "\n \n").unwrap();
        let e = format!("{:#}", read_token_file(&empty, "cluster token").unwrap_err());
        assert!(
            e.contains("cluster token file") && e.contains("empty") && e.contains(&*empty.to_string_lossy()),
            "{e}"
        );

        let two = d.join("two");
        std::fs::write(&two, "read a\nwrite b\n").unwrap();
        let e = format!("{:#}", read_token_file(&two, "cluster token").unwrap_err());
        assert!(
            e.contains("more than one line") && e.contains(&*two.to_string_lossy()),
            "{e}"
        );

        let missing = d.join("missing");
        let e = format!("{:#}", read_token_file(&missing, "cluster token").unwrap_err());
        assert!(
            e.contains("cannot read") && e.contains(&*missing.to_string_lossy()),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn flags_win_over_the_environment() {
        let d = dir("resolve");
        let file = d.join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let vars = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let none = vars(&[]);
        let env_token = vars(&[("GANTRY_TOKEN", "from-env")]);
        let env_file = vars(&[("GANTRY_TOKEN_FILE", file.to_str().unwrap())]);
        let both = vars(&[("GANTRY_TOKEN", "x"), ("GANTRY_TOKEN_FILE", file.to_str().unwrap())]);
        let blank_file = vars(&[("GANTRY_TOKEN", "from-env"), ("GANTRY_TOKEN_FILE", "")]);
        let r = |flag: Option<&str>, path: Option<&Path>, env: &HashMap<String, String>| {
            resolve(&CLUSTER, flag, path, |k| env.get(k).cloned())
        };

        assert_eq!(r(None, None, &none).unwrap(), None);
        assert_eq!(r(Some("flag"), None, &env_token).unwrap().as_deref(), Some("flag"));
        assert_eq!(r(None, Some(&file), &env_token).unwrap().as_deref(), Some("from-file"));
        assert_eq!(r(None, None, &env_token).unwrap().as_deref(), Some("from-env"));
        assert_eq!(r(None, None, &env_file).unwrap().as_deref(), Some("from-file"));
        assert_eq!(r(None, None, &blank_file).unwrap().as_deref(), Some("from-env"));
        assert_eq!(r(Some("flag"), None, &both).unwrap().as_deref(), Some("flag"));
        let e = r(None, None, &both).unwrap_err().to_string();
        assert!(e.contains("GANTRY_TOKEN and GANTRY_TOKEN_FILE"), "{e}");
        let e = r(Some("a"), Some(&file), &none).unwrap_err().to_string();
        assert!(e.contains("--token or --token-file"), "{e}");
        let missing = d.join("missing");
        let e = format!("{:#}", r(None, Some(&missing), &none).unwrap_err());
        assert!(e.contains(&*missing.to_string_lossy()), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
