//! The checkpoint benchmark's figures: samples per operation, one row per operation (median
//! seconds, GB/s, ratio to its raw peer), and the table or JSON the binary prints.

use super::ranks::RankSave;
use crate::stats;
use serde::Serialize;

pub(crate) const RAW_WRITE: &str = "raw write (write_all, no fsync)";
pub(crate) const RAW_WRITE_SYNC: &str = "raw write + fsync (dd conv=fdatasync style)";
pub(crate) const RAW_READ: &str = "raw read";
pub(crate) const RAW_READ_COLD: &str = "raw read, cold";
pub(crate) const RAW_PUT: &str = "raw put (1 object, Store::put multipart)";
pub(crate) const RAW_GET: &str = "raw get (1 object, Store::get)";
pub(crate) const PUT_MANY: &str = "Store::put_many of the slices (one object each, no checksums)";
pub(crate) const SAVE: &str = "checkpoint save (save() -> all committed)";
pub(crate) const LOAD: &str = "checkpoint load (open latest + load, R->1)";
pub(crate) const LOAD_SAME: &str = "checkpoint load, same layout (R->R)";
pub(crate) const LOAD_COLD: &str = "checkpoint load, cold";
pub(crate) const VERIFY: &str = "checkpoint verify";
pub(crate) const VERIFY_COLD: &str = "checkpoint verify, cold";

// The store fsyncs what it writes on local disks (a commit must survive a power loss), so its
// peer is the synced raw write; the unsynced one is shown for scale.
const COMPARISONS: [(&str, &str); 12] = [
    (PUT_MANY, RAW_WRITE_SYNC),
    (SAVE, RAW_WRITE_SYNC),
    (LOAD, RAW_READ),
    (LOAD_SAME, RAW_READ),
    (VERIFY, RAW_READ),
    (LOAD_COLD, RAW_READ_COLD),
    (VERIFY_COLD, RAW_READ_COLD),
    (LOAD, RAW_GET),
    (LOAD_SAME, RAW_GET),
    (VERIFY, RAW_GET),
    (PUT_MANY, RAW_PUT),
    (SAVE, RAW_PUT),
];

/// One operation's figures.
#[derive(Serialize, Clone, Debug)]
pub struct Row {
    pub op: String,
    pub bytes: u64,
    /// Median of the samples.
    pub seconds: f64,
    /// GB/s (10^9 bytes per second) at the median.
    pub gbps: f64,
    /// This row's GB/s over the `vs` row's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs: Option<String>,
    /// Median over repetitions of the per-repetition ratio to `vs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paired_ratio: Option<f64>,
    /// Seconds of every repetition, in order.
    pub samples: Vec<f64>,
}

/// Samples per operation, in the order operations were first measured.
#[derive(Default)]
pub(crate) struct Samples(Vec<(&'static str, Vec<f64>)>);

impl Samples {
    pub(crate) fn push(&mut self, op: &'static str, seconds: f64) {
        match self.0.iter_mut().find(|(o, _)| *o == op) {
            Some((_, v)) => v.push(seconds),
            None => self.0.push((op, vec![seconds])),
        }
    }

    /// One row per operation (median seconds), compared with its peer in [`COMPARISONS`]: the
    /// first listed peer that was measured in this run.
    pub(crate) fn rows(&self, bytes: u64) -> Vec<Row> {
        let mut rows: Vec<Row> = self
            .0
            .iter()
            .map(|(op, v)| {
                let seconds = stats::median(v);
                Row {
                    op: op.to_string(),
                    bytes,
                    seconds,
                    gbps: stats::gbps(bytes, seconds),
                    ratio: None,
                    vs: None,
                    paired_ratio: None,
                    samples: v.clone(),
                }
            })
            .collect();
        for i in 0..rows.len() {
            let found = COMPARISONS
                .iter()
                .filter(|(op, _)| *op == rows[i].op)
                .find_map(|(_, base)| rows.iter().find(|r| r.op == *base).cloned());
            if let Some(base) = found {
                rows[i].ratio = Some(rows[i].gbps / base.gbps);
                rows[i].paired_ratio = stats::paired_ratio(&rows[i].samples, &base.samples);
                rows[i].vs = Some(base.op);
            }
        }
        rows
    }
}

/// Everything `gantry bench checkpoint` reports.
#[derive(Clone, Debug)]
pub struct CheckpointReport {
    /// The scratch location the benchmark worked in.
    pub url: String,
    pub local: bool,
    pub ranks: usize,
    pub bytes: u64,
    pub tensors: usize,
    pub chunk_mib: usize,
    pub part_mib: usize,
    pub concurrency: usize,
    pub repeat: usize,
    pub rows: Vec<Row>,
    pub saves: Vec<RankSave>,
}

impl CheckpointReport {
    /// Per save the slowest rank's `f`, then the median over saves.
    fn slowest_rank_median(&self, f: fn(&RankSave) -> f64) -> f64 {
        let per_save: Vec<f64> = (1..=self.repeat as u64)
            .map(|step| self.saves.iter().filter(|r| r.step == step).map(f).fold(0.0, f64::max))
            .collect();
        stats::median(&per_save)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "url": self.url,
            "backend": if self.local { "local" } else { "s3" },
            "ranks": self.ranks,
            "bytes": self.bytes,
            "tensors": self.tensors,
            "chunk_mib": self.chunk_mib,
            "part_mib": self.part_mib,
            "concurrency": self.concurrency,
            "repeat": self.repeat,
            "rows": self.rows,
            "saves": self.saves,
            "stall_s": {
                "snapshot": self.slowest_rank_median(|r| r.snapshot_s),
                "handoff": self.slowest_rank_median(|r| r.handoff_s),
            },
            "loaded_ok": true,
        })
    }

    /// The table and its footnotes, one line each.
    pub fn text_lines(&self) -> Vec<String> {
        let w = self.rows.iter().map(|r| r.op.len()).max().unwrap_or(10);
        let mut out = vec![format!(
            "{:<w$}  {:>12}  {:>8}  {:>7}  {:>6}  {:>6}  vs",
            "operation", "bytes", "seconds", "GB/s", "ratio", "paired"
        )];
        let num = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}"));
        for r in &self.rows {
            out.push(format!(
                "{:<w$}  {:>12}  {:>8.3}  {:>7.3}  {:>6}  {:>6}  {}",
                r.op,
                r.bytes,
                r.seconds,
                r.gbps,
                num(r.ratio),
                num(r.paired_ratio),
                r.vs.as_deref().unwrap_or("")
            ));
        }
        out.push(format!(
            "# seconds: median of {} repetitions; ratio = GB/s over the vs row's GB/s; paired = median over \
             repetitions of the ratio within each repetition",
            self.repeat
        ));
        if self.repeat > 1 {
            for r in &self.rows {
                let s: Vec<String> = r.samples.iter().map(|s| format!("{s:.3}")).collect();
                out.push(format!("# samples (s) {}: {}", r.op, s.join(" ")));
            }
        }
        out.push(format!(
            "# stall (slowest rank, median over saves): snapshot memcpy {:.3} s, save() hand-off {:.3} ms",
            self.slowest_rank_median(|r| r.snapshot_s),
            self.slowest_rank_median(|r| r.handoff_s) * 1e3
        ));
        out.push(format!(
            "# inside the save (slowest rank, median): write_s {:.3} s (chunking + checksum + upload + index), \
             commit_s {:.3} s (hand-off to commit)",
            self.slowest_rank_median(|r| r.write_s),
            self.slowest_rank_median(|r| r.commit_s)
        ));
        out.push("# loaded tensors match the saved ones: ok".to_string());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_compare_with_the_first_measured_peer() {
        let mut s = Samples::default();
        for (write, save) in [(1.0, 2.0), (1.0, 4.0), (2.0, 4.0)] {
            s.push(RAW_WRITE_SYNC, write);
            s.push(SAVE, save);
        }
        s.push(LOAD, 1.0);
        let rows = s.rows(1_000_000_000);
        assert_eq!(rows[0].op, RAW_WRITE_SYNC);
        assert_eq!(rows[0].seconds, 1.0);
        assert!(rows[0].vs.is_none());
        let save = &rows[1];
        assert_eq!(save.vs.as_deref(), Some(RAW_WRITE_SYNC));
        assert_eq!(save.gbps, 0.25);
        assert_eq!(save.ratio, Some(0.25));
        assert_eq!(save.paired_ratio, Some(0.5));
        // No raw read was measured: the load has no peer.
        assert!(rows[2].ratio.is_none() && rows[2].paired_ratio.is_none());
    }
}
