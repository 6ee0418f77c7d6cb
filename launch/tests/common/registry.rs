//! A `gantry registry serve` process, the tokenizer-backed tinyshakespeare dataset the
//! serving tests train on, and the Python peers they check against.

use super::{GANTRY, text};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A registry server on a free port; killed when dropped.
pub struct RegistryProcess {
    child: Child,
    pub addr: String,
}

impl Drop for RegistryProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `gantry registry serve` with database `<dir>/<tag>.redb`, a token file of `token_lines`
/// (`write TOKEN`, `read TOKEN`) and `extra` flags; waits until it announces its address.
pub fn serve_registry(dir: &Path, tag: &str, token_lines: &str, extra: &[&str]) -> RegistryProcess {
    let tokens = dir.join(format!("{tag}.tokens"));
    std::fs::write(&tokens, token_lines).unwrap();
    let mut child = Command::new(GANTRY)
        .args(["registry", "serve", "--listen", "127.0.0.1:0", "--db"])
        .arg(dir.join(format!("{tag}.redb")))
        .arg("--token-file")
        .arg(&tokens)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = super::listening_address(&mut child).expect("the registry did not announce its address");
    RegistryProcess { child, addr }
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `../shared/data/tinyshakespeare.txt`.
pub fn shakespeare_text() -> PathBuf {
    repo().join("../shared/data/tinyshakespeare.txt")
}

/// tinyshakespeare as a byte-level BPE of 512 tokens, documents split at blank lines, in
/// `<dir>/ts`.
pub fn shakespeare_dataset(dir: &Path) -> PathBuf {
    let data = dir.join("ts");
    let out = Command::new(GANTRY)
        .args([
            "data",
            "prepare",
            "--vocab-size",
            "512",
            "--split-by",
            "blank-line",
            "--input",
        ])
        .arg(shakespeare_text())
        .arg("--output")
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    data
}

/// The Python of a peer venv (`$var`, else `<repo>/<default>`) if `import` works there;
/// `None` with one line saying why otherwise, except in CI (`CI=true`), where setup must have
/// made it and a missing peer is a failure.
pub fn peer_python(var: &str, default: &str, import: &str) -> Option<PathBuf> {
    let py = std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map_or_else(|| repo().join(default), PathBuf::from);
    let why = match Command::new(&py).args(["-c", &format!("import {import}")]).output() {
        Ok(o) if o.status.success() => return Some(py),
        Ok(o) => String::from_utf8_lossy(&o.stderr)
            .lines()
            .last()
            .unwrap_or("")
            .to_string(),
        Err(e) => e.to_string(),
    };
    let msg = format!(
        "no Python that imports {import} at {} ({why}); `bash scripts/setup.sh` installs it",
        py.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}");
    }
    eprintln!("skipped: {msg}");
    None
}
