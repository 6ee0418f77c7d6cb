//! Real gantry daemons for the control-plane benchmarks: `gantry coordinator` (and `gantry
//! worker`) started as child processes of the given executable on loopback, with throwaway
//! state, so the figures include gRPC, the token check, the durable store and process start.

use crate::error::{BenchError, Result};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The token every benchmark daemon and client uses.
pub const TOKEN: &str = "bench-token";

/// Where the benchmarks find what they start: the `gantry` executable and a directory for
/// scratch state (the binary passes its own path and the system's temporary directory).
#[derive(Clone, Debug)]
pub struct Harness {
    pub gantry: PathBuf,
    pub scratch_root: PathBuf,
}

impl Harness {
    /// A fresh, empty `gantry-bench-<tag>-<pid>` directory under the scratch root.
    pub(crate) fn scratch(&self, tag: &str) -> Result<PathBuf> {
        let d = self
            .scratch_root
            .join(format!("gantry-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).map_err(BenchError::io("cannot create", &d))?;
        Ok(d)
    }

    /// A `gantry` command.
    pub(crate) fn gantry(&self) -> Command {
        Command::new(&self.gantry)
    }

    /// Start `gantry coordinator` on port 0 with its state in `state`; returns it and its
    /// address (read from its "listening on" line).
    pub(crate) fn start_coordinator(
        &self,
        state: &Path,
        heartbeat_ms: u64,
        deadline_s: f64,
    ) -> Result<(Daemon, String)> {
        let mut child = self
            .gantry()
            .args(["coordinator", "--listen", "127.0.0.1:0", "--token", TOKEN])
            .args([
                "--heartbeat-ms",
                &heartbeat_ms.to_string(),
                "--heartbeat-deadline-s",
                &deadline_s.to_string(),
            ])
            .arg("--state")
            .arg(state)
            .env("GANTRY_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(BenchError::io("cannot start the coordinator", &self.gantry))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let daemon = Daemon(child);
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(BenchError::io("cannot read the coordinator's output", &self.gantry))?;
        match line.trim().strip_prefix("listening on ") {
            Some(addr) => Ok((daemon, addr.to_string())),
            None => Err(BenchError::Harness(format!(
                "the coordinator did not start: `{}`",
                line.trim()
            ))),
        }
    }
}

/// A child daemon, killed and reaped when dropped.
pub struct Daemon(pub(crate) Child);

impl Daemon {
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
