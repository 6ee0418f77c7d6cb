//! `gantry bench checkpoint`: save, load and verify throughput of the real gantry-checkpoint
//! code next to a raw peer writing and reading the same bytes in the same place, in one run.
//!
//! - **Save**: `--ranks` in-process ranks (threads), each with its own [`Store`] (its own I/O
//!   runtime, as a rank process would have) and [`Saver`], save `--gib / --ranks` GiB of f32
//!   slices each: rank r holds row block r of every global `[rows, 1024]` tensor, the per-rank
//!   slices cycling through 256, 64, 192 and 128 MiB. Timed from the first `save()` hand-off until
//!   every rank's `wait()` returned (committed). The snapshot copy (a memcpy of the rank's
//!   slices, what the trainer does off the device) and the `save()` call itself are reported
//!   as the stall.
//! - **Load**: a fresh store, `Checkpoint::open(Latest)` and `load` of every whole tensor
//!   (resharded from R ranks to 1), checked element by element; then the same layout back
//!   (R rank threads, each with its own store, loading its own row blocks); then `verify()`.
//! - **Raw peer**, local: R threads write R files with `write_all` (without and with a final
//!   `sync_all`, like `dd conv=fdatasync`) and read them back. gantry's Store fsyncs every
//!   object it writes on local disks, so the save's peer is the synced raw write.
//!   S3: one object of the same total size through a plain multipart `Store::put`, and a
//!   plain `Store::get` of it.
//! - **Diagnostic**: the same slices put as one object each through `Store::put_many` (R
//!   stores in parallel): object_store's own path, without the Saver's chunking, checksums
//!   and commit, to show where a gap to the raw peer comes from.
//!
//! With `--repeat N` every write-side operation runs N times round-robin (so all of them see the
//! machine's slow and fast phases alike), then every read-side one; the table shows medians, the
//! ratio of medians and the median of the per-repetition ratios.
//!
//! Everything lives under a fresh `gantry-bench-<pid>-<time>` prefix of `--url`, removed at the
//! end unless `--keep`.
//!
//! # Layout
//! - `plan.rs`: the tensors and their deterministic content; `peers.rs`: the raw peers;
//!   `ranks.rs`: the in-process ranks saving, loading and verifying; `report.rs`: the figures.

mod peers;
mod plan;
mod ranks;
mod report;

pub use ranks::RankSave;
pub use report::{CheckpointReport, Row};

use crate::error::{BenchError, Result};
use gantry_checkpoint::{S3Options, Store, StoreConfig};
use plan::{COLS, MIB, ROW_BYTES, TensorPlan};
use report::*;
use std::path::PathBuf;
use std::time::Instant;

/// The settings of one checkpoint benchmark (the flags of `gantry bench checkpoint`).
#[derive(Clone, Debug)]
pub struct CheckpointBenchConfig {
    /// A directory, file:///… or s3://bucket[/prefix]; the bench works in a fresh
    /// `gantry-bench-<pid>-<time>` sub-directory / prefix of it.
    pub url: String,
    /// Total checkpoint size in GiB, split evenly over the ranks.
    pub gib: f64,
    /// In-process ranks (threads), each with its own Store and Saver.
    pub ranks: usize,
    /// Chunk object size of the Saver in MiB (SaverConfig::chunk_bytes).
    pub chunk_mib: usize,
    /// Multipart part size in MiB; `None`: the Store's.
    pub part_mib: Option<usize>,
    /// Requests in flight per Store; `None`: the Store's.
    pub concurrency: Option<usize>,
    /// Local disks: also read everything back cold (dropped from the page cache first).
    pub cold: bool,
    /// Repetitions of every measurement (interleaved).
    pub repeat: usize,
    pub s3: S3Options,
}

impl Default for CheckpointBenchConfig {
    fn default() -> Self {
        CheckpointBenchConfig {
            url: String::new(),
            gib: 1.0,
            ranks: 2,
            chunk_mib: 256,
            part_mib: None,
            concurrency: None,
            cold: false,
            repeat: 3,
            s3: S3Options::default(),
        }
    }
}

impl CheckpointBenchConfig {
    pub fn validate(&self) -> Result<()> {
        let check = |ok: bool, flag, reason: &str| {
            if ok {
                Ok(())
            } else {
                Err(BenchError::setting(flag, reason))
            }
        };
        check(self.ranks >= 1, "--ranks", "must be at least 1")?;
        check(self.gib > 0.0, "--gib", "must be positive")?;
        check(self.repeat >= 1, "--repeat", "must be at least 1")?;
        check(self.chunk_mib >= 1, "--chunk-mib", "must be at least 1")?;
        let reason = format!("{} is too small for {} ranks", self.gib, self.ranks);
        check(self.per_rank_bytes() > 0, "--gib", &reason)?;
        check(
            self.part_mib.is_none_or(|p| p >= 5),
            "--part-mib",
            "must be at least 5 (S3's minimum part size)",
        )?;
        check(
            self.concurrency.is_none_or(|c| c >= 1),
            "--concurrency",
            "must be at least 1",
        )
    }

    /// Bytes each rank saves: its share of `gib`, in whole rows.
    fn per_rank_bytes(&self) -> u64 {
        ((self.gib * (1u64 << 30) as f64) as u64 / self.ranks as u64) / ROW_BYTES * ROW_BYTES
    }

    fn store_config(&self) -> StoreConfig {
        let mut store_cfg = StoreConfig::default();
        if let Some(p) = self.part_mib {
            store_cfg.part_size = p << 20;
        }
        if let Some(c) = self.concurrency {
            store_cfg.concurrency = c;
        }
        store_cfg
    }
}

/// A checkpoint benchmark set up in its fresh scratch location: [`Self::header_lines`] says
/// what it will do, [`Self::measure`] runs it, [`Self::clean_up`] removes what it wrote.
pub struct CheckpointBench {
    config: CheckpointBenchConfig,
    tensors: Vec<TensorPlan>,
    per_rank: u64,
    total: u64,
    store_cfg: StoreConfig,
    root: Store,
    root_url: String,
}

impl CheckpointBench {
    /// Check the settings, plan the tensors and open the scratch location under `config.url`.
    pub fn prepare(config: CheckpointBenchConfig) -> Result<CheckpointBench> {
        config.validate()?;
        let per_rank = config.per_rank_bytes();
        let tensors = plan::plan_tensors(per_rank);
        let store_cfg = config.store_config();
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let root_url = format!(
            "{}/gantry-bench-{}-{stamp}",
            config.url.trim_end_matches('/'),
            std::process::id()
        );
        let root = Store::open_with(&root_url, &config.s3, store_cfg.clone())?;
        Ok(CheckpointBench {
            total: per_rank * config.ranks as u64,
            config,
            tensors,
            per_rank,
            store_cfg,
            root,
            root_url,
        })
    }

    /// Where the benchmark works (the fresh scratch directory or prefix).
    pub fn url(&self) -> &str {
        self.root.url()
    }

    /// Two `#` lines: the checkpoint, the store's settings and the machine.
    pub fn header_lines(&self) -> [String; 2] {
        let (c, s) = (&self.config, &self.store_cfg);
        [
            format!(
                "# gantry bench checkpoint: {:.2} GiB as {} f32 tensors [rows, {COLS}] split by rows over {} ranks \
                 ({:.0} MiB per rank), {}",
                self.total as f64 / (1u64 << 30) as f64,
                self.tensors.len(),
                c.ranks,
                self.per_rank as f64 / MIB as f64,
                self.root.url()
            ),
            format!(
                "# chunk {} MiB, multipart above {} MiB in {} MiB parts, {} requests in flight per store; \
                 {} cores, load {}; median of {} interleaved repetitions",
                c.chunk_mib,
                s.multipart_threshold >> 20,
                s.part_size >> 20,
                s.concurrency,
                crate::host::cores(),
                crate::host::load_average(),
                c.repeat
            ),
        ]
    }

    /// Remove everything the benchmark wrote.
    pub fn clean_up(&self) -> Result<()> {
        if self.root.is_local() {
            std::fs::remove_dir_all(self.root.url()).map_err(BenchError::io("remove", self.root.url().as_ref()))
        } else {
            self.root.delete_prefix("").map(|_| ()).map_err(BenchError::from)
        }
    }

    /// Run every measurement and summarize it.
    pub fn measure(&self) -> Result<CheckpointReport> {
        let (samples, saves) = self.measure_all()?;
        Ok(CheckpointReport {
            url: self.root.url().to_string(),
            local: self.root.is_local(),
            ranks: self.config.ranks,
            bytes: self.total,
            tensors: self.tensors.len(),
            chunk_mib: self.config.chunk_mib,
            part_mib: self.store_cfg.part_size >> 20,
            concurrency: self.store_cfg.concurrency,
            repeat: self.config.repeat,
            rows: samples.rows(self.total),
            saves,
        })
    }

    /// The write-side operations round-robin (each repetition runs every one once, so they
    /// share the machine's moods), then the read side.
    fn measure_all(&self) -> Result<(Samples, Vec<RankSave>)> {
        let mut samples = Samples::default();
        let saves = self.write_rounds(&mut samples)?;
        self.read_rounds(&mut samples)?;
        Ok((samples, saves))
    }

    fn raw_dir(&self) -> PathBuf {
        PathBuf::from(self.root.url()).join("raw")
    }

    fn ckpt_url(&self) -> String {
        format!("{}/ckpt", self.root_url)
    }

    /// Raw write (or put), `put_many` and a checkpoint save, `repeat` times interleaved.
    fn write_rounds(&self, samples: &mut Samples) -> Result<Vec<RankSave>> {
        let (c, ranks, total) = (&self.config, self.config.ranks, self.total);
        let local = self.root.is_local();
        let root_dir = PathBuf::from(self.root.url());
        let raw_dir = self.raw_dir();
        let objects_url = format!("{}/objects", self.root_url);
        let data = plan::generate(&self.tensors, ranks);
        let one = if local {
            std::fs::create_dir_all(&raw_dir).map_err(BenchError::io("create", &raw_dir))?;
            None
        } else {
            let mut one = Vec::with_capacity(total as usize);
            for b in data.iter().flatten() {
                one.extend_from_slice(b);
            }
            Some(one)
        };
        let mut savers = ranks::open_savers(&self.ckpt_url(), &c.s3, &self.store_cfg, c.chunk_mib << 20, ranks)?;
        let mut saves = Vec::new();
        for rep in 0..c.repeat {
            if let Some(one) = &one {
                // The copy (into the byte type Store::put takes) is not timed.
                let payload = one.clone().into();
                let t0 = Instant::now();
                self.root.put("raw/raw.bin", payload)?;
                samples.push(RAW_PUT, t0.elapsed().as_secs_f64());
            } else {
                samples.push(RAW_WRITE, peers::raw_write(&raw_dir, "nosync", &data, false)?);
                // Write it back untimed, so the kernel's writeback does not overlap what follows.
                peers::fsync_tree(&raw_dir)?;
                for r in 0..ranks {
                    let f = peers::raw_file(&raw_dir, "nosync", r);
                    std::fs::remove_file(&f).map_err(BenchError::io("remove", &f))?;
                }
                samples.push(RAW_WRITE_SYNC, peers::raw_write(&raw_dir, "sync", &data, true)?);
            }
            samples.push(
                PUT_MANY,
                peers::store_put_many(&objects_url, &c.s3, &self.store_cfg, &data)?,
            );
            if local {
                let objects = root_dir.join("objects");
                peers::fsync_tree(&objects)?;
                std::fs::remove_dir_all(&objects).map_err(BenchError::io("remove", &objects))?;
            } else {
                self.root.delete_prefix("objects/")?;
            }
            let (ranks_save, save_s) = ranks::save_all(&mut savers, rep as u64 + 1, &self.tensors, &data)?;
            let saved: u64 = ranks_save.iter().map(|r| r.bytes).sum();
            if saved != total {
                return Err(BenchError::Mismatch(format!(
                    "the ranks wrote {saved} bytes, {total} were handed in"
                )));
            }
            saves.extend(ranks_save);
            samples.push(SAVE, save_s);
        }
        Ok(saves)
    }

    /// Raw read (or get), load and verify, `repeat` times interleaved; then, with `cold` on a
    /// local disk, the same from a dropped page cache.
    fn read_rounds(&self, samples: &mut Samples) -> Result<()> {
        let (c, ranks, total) = (&self.config, self.config.ranks, self.total);
        let local = self.root.is_local();
        let (raw_dir, ckpt_url) = (self.raw_dir(), self.ckpt_url());
        let load = || ranks::load_all(&ckpt_url, &c.s3, &self.store_cfg, &self.tensors, ranks);
        let load_same = || ranks::load_same_layout(&ckpt_url, &c.s3, &self.store_cfg, &self.tensors, ranks);
        let verify = || ranks::verify_all(&ckpt_url, &c.s3, &self.store_cfg, total);
        for _ in 0..c.repeat {
            if local {
                let (bytes, s) = peers::raw_read(&raw_dir, "sync", ranks)?;
                if bytes != total {
                    return Err(BenchError::Mismatch(format!("raw read {bytes} bytes of {total}")));
                }
                samples.push(RAW_READ, s);
            } else {
                let t0 = Instant::now();
                let got = self
                    .root
                    .get("raw/raw.bin")?
                    .ok_or_else(|| BenchError::Mismatch("the raw object vanished".into()))?;
                let s = t0.elapsed().as_secs_f64();
                if got.len() as u64 != total {
                    return Err(BenchError::Mismatch(format!(
                        "raw get returned {} bytes of {total}",
                        got.len()
                    )));
                }
                samples.push(RAW_GET, s);
            }
            samples.push(LOAD, load()?);
            samples.push(LOAD_SAME, load_same()?);
            samples.push(VERIFY, verify()?);
        }
        if local && c.cold {
            let root_dir = PathBuf::from(self.root.url());
            for _ in 0..c.repeat {
                peers::evict_tree(&root_dir)?;
                samples.push(RAW_READ_COLD, peers::raw_read(&raw_dir, "sync", ranks)?.1);
                peers::evict_tree(&root_dir)?;
                samples.push(LOAD_COLD, load()?);
                peers::evict_tree(&root_dir)?;
                samples.push(VERIFY_COLD, verify()?);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real (tiny) run on local disk: every row measured, loads checked element by element
    /// inside `measure`, each load compared with the raw read.
    #[test]
    fn a_small_local_run_measures_every_row_and_checks_what_it_loads() {
        let dir = std::env::temp_dir().join(format!("gantry-bench-ckpt-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bench = CheckpointBench::prepare(CheckpointBenchConfig {
            url: dir.to_str().unwrap().to_string(),
            gib: 4.0 / 1024.0,
            ranks: 2,
            chunk_mib: 1,
            repeat: 1,
            ..CheckpointBenchConfig::default()
        })
        .unwrap();
        let report = bench.measure().unwrap();
        let row = |op: &str| {
            report
                .rows
                .iter()
                .find(|r| r.op == op)
                .unwrap_or_else(|| panic!("no row {op}"))
        };
        for op in [LOAD, LOAD_SAME, VERIFY] {
            assert_eq!(row(op).vs.as_deref(), Some(RAW_READ), "{op}");
            assert!(row(op).gbps > 0.0, "{op}");
        }
        assert_eq!(row(SAVE).vs.as_deref(), Some(RAW_WRITE_SYNC));
        bench.clean_up().unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir(&dir).unwrap();
    }
}
