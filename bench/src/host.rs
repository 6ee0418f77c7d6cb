//! What the benchmarks ask the machine (Linux): CPU time of a process, the page cache, the
//! load. Kept apart from the pure [`crate::stats`].

use crate::error::{BenchError, Result};
use std::path::Path;

/// CPU seconds (user + system, all threads) process `pid` has used, from `/proc/<pid>/stat`;
/// `None` where that cannot be read.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (in parentheses, and it may hold spaces): state is
    // the first, utime the 12th, stime the 13th.
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// CPU seconds this process has used so far (see [`cpu_seconds`]).
pub fn own_cpu_seconds() -> Option<f64> {
    cpu_seconds(std::process::id())
}

/// Write back and drop one file from the page cache, so the next read comes from the disk.
pub fn evict_file(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).map_err(BenchError::io("open", path))?;
    file.sync_all().map_err(BenchError::io("fsync", path))?;
    // SAFETY: a valid open descriptor; advice only, no memory is touched.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(BenchError::Io {
            action: "posix_fadvise",
            path: path.to_path_buf(),
            error: std::io::Error::from_raw_os_error(rc),
        });
    }
    Ok(())
}

/// The 1, 5 and 15 minute load averages as `/proc/loadavg` prints them, or `?`.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Cores this process may run on (0 when unknown).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_cpu_time_is_readable_on_linux() {
        if std::path::Path::new("/proc/self/stat").exists() {
            assert!(super::own_cpu_seconds().is_some_and(|s| s >= 0.0));
        }
    }
}
