//! Which of its launcher's environment variables a rank process inherits.
//!
//! A rank starts from the environment of the process that starts it (the worker daemon, or
//! `gantry launch --nproc N -- CMD`) minus anything that looks like a secret: the daemon's
//! cluster token must never reach a job, nor its cloud or registry credentials. A job names
//! the variables it needs anyway (`[cluster] env_pass = ["AWS_ACCESS_KEY_ID", …]` in a job
//! file, which travels to the worker as [`ENV_PASS`] in the job's `env`).
//!
//! A name is a secret when, compared in upper case, it
//! - is one of [`SECRET_NAMES`] (`SSH_AUTH_SOCK`: the agent socket signs with the
//!   operator's keys; `PGPASSWORD`),
//! - starts with one of [`SECRET_PREFIXES`] (`GANTRY_TLS_`), or
//! - ends with one of [`SECRET_SUFFIXES`] or is one without its leading underscore:
//!   `_TOKEN` (`GANTRY_TOKEN`, `GANTRY_REGISTRY_TOKEN`, `GANTRY_METRICS_TOKEN`,
//!   `AWS_SESSION_TOKEN`, `HF_TOKEN`, …), `_TOKEN_FILE`, `_SECRET`, `_SECRET_KEY`,
//!   `_ACCESS_KEY` (`AWS_SECRET_ACCESS_KEY`), `_ACCESS_KEY_ID` (`AWS_ACCESS_KEY_ID`),
//!   `_PRIVATE_KEY`, `_PASSWORD`, `_API_KEY` (`WANDB_API_KEY`), `_CREDENTIALS`
//!   (`GOOGLE_APPLICATION_CREDENTIALS`).
//!
//! Everything else is inherited unchanged (`PATH`, `HOME`, `LD_LIBRARY_PATH`, `PYTHONPATH`,
//! `NCCL_*`, `CUDA_*`, …). The functions here are pure: the caller hands over the
//! environment it read.

use std::ffi::{OsStr, OsString};

/// The variable that names inherited variables to keep even though they look secret:
/// names separated by commas or spaces. Read from a job's `env` by the worker and from the
/// launcher's own environment by `gantry launch --nproc`.
pub const ENV_PASS: &str = "GANTRY_ENV_PASS";

/// Whole names that are secrets.
pub const SECRET_NAMES: &[&str] = &["SSH_AUTH_SOCK", "PGPASSWORD"];

/// Prefixes of secret names.
pub const SECRET_PREFIXES: &[&str] = &["GANTRY_TLS_"];

/// Suffixes of secret names (a name equal to a suffix without its `_` is one too).
pub const SECRET_SUFFIXES: &[&str] = &[
    "_TOKEN",
    "_TOKEN_FILE",
    "_SECRET",
    "_SECRET_KEY",
    "_ACCESS_KEY",
    "_ACCESS_KEY_ID",
    "_PRIVATE_KEY",
    "_PASSWORD",
    "_API_KEY",
    "_CREDENTIALS",
];

/// Whether a rank loses `name` unless its job asks for it (see the module docs).
pub fn is_secret(name: &OsStr) -> bool {
    let upper = name.to_string_lossy().to_ascii_uppercase();
    SECRET_NAMES.contains(&upper.as_str())
        || SECRET_PREFIXES.iter().any(|p| upper.starts_with(p))
        || SECRET_SUFFIXES.iter().any(|s| upper.ends_with(s) || upper == s[1..])
}

/// The names in an [`ENV_PASS`] value: separated by commas and/or whitespace, empty items
/// ignored.
pub fn parse_pass(list: &str) -> Vec<&str> {
    list.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|n| !n.is_empty())
        .collect()
}

/// The part of `parent` a rank inherits: every variable except the secrets, and the
/// secrets named in `pass` (exact, case-sensitive names). Order is kept.
pub fn inherited<I>(parent: I, pass: &[&str]) -> Vec<(OsString, OsString)>
where
    I: IntoIterator<Item = (OsString, OsString)>,
{
    parent
        .into_iter()
        .filter(|(k, _)| !is_secret(k) || pass.iter().any(|p| OsStr::new(p) == k))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs.iter().map(|(k, v)| (k.into(), v.into())).collect()
    }

    #[test]
    fn secrets_by_name_prefix_and_suffix() {
        for name in [
            "GANTRY_TOKEN",
            "GANTRY_TOKEN_FILE",
            "GANTRY_REGISTRY_TOKEN",
            "GANTRY_REGISTRY_TOKEN_FILE",
            "GANTRY_METRICS_TOKEN",
            "GANTRY_METRICS_TOKEN_FILE",
            "GANTRY_TLS_KEY",
            "GANTRY_TLS_CERT",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_SECURITY_TOKEN",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "HF_TOKEN",
            "GITHUB_TOKEN",
            "WANDB_API_KEY",
            "AZURE_CLIENT_SECRET",
            "DB_PASSWORD",
            "PGPASSWORD",
            "GOOGLE_APPLICATION_CREDENTIALS",
            "SSH_AUTH_SOCK",
            "TOKEN",
            "PASSWORD",
            "gantry_token",
            "my_private_key",
        ] {
            assert!(is_secret(OsStr::new(name)), "{name} should be a secret");
        }
        for name in [
            "PATH",
            "HOME",
            "LD_LIBRARY_PATH",
            "PYTHONPATH",
            "CUDA_VISIBLE_DEVICES",
            "NCCL_DEBUG",
            "GANTRY_LOG",
            "GANTRY_COORDINATOR",
            "GANTRY_REGISTRY",
            "GANTRY_ADVERTISE_HOST",
            "GANTRY_ENV_PASS",
            "AWS_REGION",
            "AWS_ENDPOINT_URL",
            "AWS_CA_BUNDLE",
            "TOKENIZERS_PARALLELISM",
            "MASTER_PORT",
        ] {
            assert!(!is_secret(OsStr::new(name)), "{name} should be inherited");
        }
    }

    #[test]
    fn inherited_drops_secrets_unless_passed() {
        let parent = os(&[
            ("PATH", "/bin"),
            ("GANTRY_TOKEN", "cluster"),
            ("AWS_ACCESS_KEY_ID", "id"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
            ("NCCL_DEBUG", "WARN"),
        ]);
        assert_eq!(
            inherited(parent.clone(), &[]),
            os(&[("PATH", "/bin"), ("NCCL_DEBUG", "WARN")])
        );
        assert_eq!(
            inherited(
                parent.clone(),
                &["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "NOT_SET"]
            ),
            os(&[
                ("PATH", "/bin"),
                ("AWS_ACCESS_KEY_ID", "id"),
                ("AWS_SECRET_ACCESS_KEY", "secret"),
                ("NCCL_DEBUG", "WARN"),
            ])
        );
        // Names are exact: a different case does not pass.
        assert_eq!(
            inherited(parent, &["gantry_token"]),
            os(&[("PATH", "/bin"), ("NCCL_DEBUG", "WARN")])
        );
    }

    #[test]
    fn pass_lists() {
        assert_eq!(parse_pass("A,B"), ["A", "B"]);
        assert_eq!(parse_pass(" A , B\tC\n"), ["A", "B", "C"]);
        assert!(parse_pass("").is_empty());
        assert!(parse_pass(" , ,").is_empty());
    }
}
