//! Which peer a failed rank blames, read from its log.
//!
//! A gantry rank that fails prints its error chain as the last line of its log,
//! `gantry: error: …`. When a collective failed because of a peer, the collectives' error
//! names that peer by its global rank, the same one on every surviving rank
//! (`gantry_collectives::CommError`): it `died or closed its connection`, `did not respond
//! within` the deadline, or the operation was `aborted because rank N failed`. The worker
//! passes that rank on in its report (`blamed_rank`) so the coordinator blames the rank
//! that failed, not the one that noticed, and suspects its worker. Other programs' logs
//! blame nobody.

use std::io::SeekFrom;
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// How much of the end of a log is read to find the last error line.
const TAIL_BYTES: u64 = 16 * 1024;

/// The prefix of the line a gantry rank prints when it fails.
const ERROR_PREFIX: &str = "gantry: error: ";

/// The peer rank named as failed by the last error line of `log`, if any.
pub fn blamed_peer(log: &str) -> Option<u32> {
    let line = log
        .lines()
        .rev()
        .find_map(|l| l.trim_start().strip_prefix(ERROR_PREFIX))?;
    blamed_in(line)
}

/// The first peer the error text names as failed: `rank N died or closed its connection`,
/// `rank N did not respond within …`, `… because rank N failed`.
fn blamed_in(error: &str) -> Option<u32> {
    const AFTER: [&str; 3] = [" died or closed its connection", " did not respond within", " failed"];
    let mut rest = error;
    let mut at = 0;
    while let Some(i) = rest.find("rank ") {
        let start = at + i;
        let digits_at = start + "rank ".len();
        let tail = &error[digits_at..];
        let len = tail.bytes().take_while(u8::is_ascii_digit).count();
        if len > 0
            && let Ok(n) = tail[..len].parse::<u32>()
        {
            let after = &tail[len..];
            let names_failure = AFTER[..2].iter().any(|s| after.starts_with(s))
                || (after.starts_with(AFTER[2]) && error[..start].ends_with("because "));
            if names_failure {
                return Some(n);
            }
        }
        at = digits_at;
        rest = &error[at..];
    }
    None
}

/// [`blamed_peer`] of the last [`TAIL_BYTES`] of the log at `path`; `None` when it cannot
/// be read.
pub async fn read_blamed_peer(path: &Path) -> Option<u32> {
    let mut file = tokio::fs::File::open(path).await.ok()?;
    let len = file.metadata().await.ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES))).await.ok()?;
    let mut bytes = Vec::with_capacity(TAIL_BYTES.min(len) as usize);
    file.read_to_end(&mut bytes).await.ok()?;
    blamed_peer(&String::from_utf8_lossy(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_collectives_errors_name_the_peer() {
        let cases = [
            (
                "gantry: error: rank 0: the data-parallel gradient thread failed: rank 1 died or closed its connection during all_reduce seq 812: connection reset by peer",
                Some(1),
            ),
            (
                "gantry: error: training failed: rank 3 did not respond within 300s during broadcast seq 4: it never reached this operation; this rank was waiting on rank 2: timed out",
                Some(3),
            ),
            (
                "gantry: error: all_reduce seq 9 aborted because rank 12 failed: rank 12 died or closed its connection",
                Some(12),
            ),
            // A mismatch is a bug in the program, not a dead peer.
            (
                "gantry: error: collective mismatch at seq 3: rank 0 called all_reduce but rank 1 called broadcast (its seq 3)",
                None,
            ),
            ("gantry: error: rank 0: loss is not finite at step 7 (NaN)", None),
            ("gantry: error: rank 2 failed to open the dataset", None),
            ("gantry: error: rank x died or closed its connection", None),
            ("gantry: error: rank 99999999999 died or closed its connection", None),
        ];
        for (log, want) in cases {
            assert_eq!(blamed_peer(log), want, "{log}");
        }
    }

    #[test]
    fn only_the_last_error_line_counts() {
        let log = "INFO step 10\n\
                   gantry: error: rank 1 died or closed its connection during barrier seq 1: eof\n\
                   INFO retrying\n\
                   gantry: error: rank 0: loss is not finite at step 7 (NaN)\n";
        assert_eq!(blamed_peer(log), None);
        let log = "gantry: error: rank 1 died or closed its connection during barrier seq 1: eof\n\
                   some later output\n";
        assert_eq!(blamed_peer(log), Some(1));
        assert_eq!(
            blamed_peer("Traceback (most recent call last):\nRuntimeError: rank 1 died or closed its connection\n"),
            None
        );
        assert_eq!(blamed_peer(""), None);
    }

    #[tokio::test]
    async fn reads_the_end_of_a_long_log() {
        let dir = std::env::temp_dir().join(format!("gantry-worker-blame-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rank-0.log");
        let mut text = "x".repeat(100_000);
        text.push_str("\ngantry: error: rank 4 did not respond within 5s during all_gather seq 2: timed out\n");
        std::fs::write(&path, text).unwrap();
        assert_eq!(read_blamed_peer(&path).await, Some(4));
        assert_eq!(read_blamed_peer(&dir.join("missing.log")).await, None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
