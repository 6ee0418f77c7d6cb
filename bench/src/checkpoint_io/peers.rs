//! The raw peers of the checkpoint benchmark (plain file writes and reads, object_store's own
//! `put_many`) and the file-tree chores around them (fsync, page-cache eviction).

use crate::error::{BenchError, Result};
use crate::host;
use gantry_checkpoint::{S3Options, Store, StoreConfig};
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::Instant;

fn secs(a: Instant, b: Instant) -> f64 {
    b.saturating_duration_since(a).as_secs_f64()
}

/// Wall time of a timed phase run by several threads: first start to last end.
pub(crate) fn span(times: &[(Instant, Instant)]) -> f64 {
    let start = times.iter().map(|t| t.0).min().expect("at least one rank");
    let end = times.iter().map(|t| t.1).max().expect("at least one rank");
    secs(start, end)
}

/// Every directory (including `dir`) and every regular file under `dir`, recursively.
fn walk(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let (mut dirs, mut files) = (Vec::new(), Vec::new());
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(&d).map_err(BenchError::io("cannot list", &d))? {
            let e = e.map_err(BenchError::io("cannot list", &d))?;
            let t = e.file_type().map_err(BenchError::io("cannot stat", &e.path()))?;
            if t.is_dir() {
                pending.push(e.path());
            } else if t.is_file() {
                files.push(e.path());
            }
        }
        dirs.push(d);
    }
    files.sort();
    Ok((dirs, files))
}

/// fsync every file and directory under `dir`.
pub(crate) fn fsync_tree(dir: &Path) -> Result<()> {
    let (dirs, files) = walk(dir)?;
    for f in files.iter().chain(&dirs) {
        std::fs::File::open(f)
            .and_then(|f| f.sync_all())
            .map_err(BenchError::io("fsync", f))?;
    }
    Ok(())
}

/// Write back and drop every file under `dir` from the page cache.
pub(crate) fn evict_tree(dir: &Path) -> Result<()> {
    walk(dir)?.1.iter().try_for_each(|f| host::evict_file(f))
}

/// `<dir>/<tag>-rank-R.bin`: rank R's file of the raw peer.
pub(crate) fn raw_file(dir: &Path, tag: &str, rank: usize) -> PathBuf {
    dir.join(format!("{tag}-rank-{rank:05}.bin"))
}

/// R threads each write their rank's bytes to [`raw_file`] (then `sync_all` if `sync`); wall
/// time from the first start to the last finish.
pub(crate) fn raw_write(dir: &Path, tag: &str, data: &[Vec<Vec<u8>>], sync: bool) -> Result<f64> {
    use std::io::Write;
    let barrier = Barrier::new(data.len());
    let times = std::thread::scope(|s| {
        let handles: Vec<_> = data
            .iter()
            .enumerate()
            .map(|(r, slices)| {
                let path = raw_file(dir, tag, r);
                let barrier = &barrier;
                s.spawn(move || -> Result<(Instant, Instant)> {
                    barrier.wait();
                    let t0 = Instant::now();
                    let mut f = std::fs::File::create(&path).map_err(BenchError::io("create", &path))?;
                    for b in slices {
                        f.write_all(b).map_err(BenchError::io("write", &path))?;
                    }
                    if sync {
                        f.sync_all().map_err(BenchError::io("fsync", &path))?;
                    }
                    Ok((t0, Instant::now()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("raw writer thread panicked"))
            .collect::<Result<Vec<_>>>()
    })?;
    Ok(span(&times))
}

/// R threads each read their [`raw_file`] whole; returns (bytes, wall seconds).
pub(crate) fn raw_read(dir: &Path, tag: &str, ranks: usize) -> Result<(u64, f64)> {
    let barrier = Barrier::new(ranks);
    let got = std::thread::scope(|s| {
        let handles: Vec<_> = (0..ranks)
            .map(|r| {
                let path = raw_file(dir, tag, r);
                let barrier = &barrier;
                s.spawn(move || -> Result<(u64, (Instant, Instant))> {
                    barrier.wait();
                    let t0 = Instant::now();
                    let b = std::fs::read(&path).map_err(BenchError::io("read", &path))?;
                    let t1 = Instant::now();
                    Ok((b.len() as u64, (t0, t1)))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("raw reader thread panicked"))
            .collect::<Result<Vec<_>>>()
    })?;
    let bytes = got.iter().map(|g| g.0).sum();
    let times: Vec<_> = got.iter().map(|g| g.1).collect();
    Ok((bytes, span(&times)))
}

/// Diagnostic: R threads, each with its own Store on `url`, put their slices as one object each
/// through `Store::put_many`: object_store's path without the Saver's chunking, checksums and
/// commit.
pub(crate) fn store_put_many(url: &str, s3: &S3Options, store_cfg: &StoreConfig, data: &[Vec<Vec<u8>>]) -> Result<f64> {
    let ranks = data.len();
    let stores = (0..ranks)
        .map(|_| Store::open_with(url, s3, store_cfg.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let barrier = Barrier::new(ranks);
    let times = std::thread::scope(|s| {
        let handles: Vec<_> = stores
            .into_iter()
            .zip(data)
            .enumerate()
            .map(|(r, (store, slices))| {
                let barrier = &barrier;
                s.spawn(move || -> Result<(Instant, Instant)> {
                    let objects: Vec<_> = slices
                        .iter()
                        .enumerate()
                        .map(|(i, b)| (format!("rank-{r:05}/{i:04}.bin"), vec![b.clone().into()]))
                        .collect();
                    barrier.wait();
                    let t0 = Instant::now();
                    store.put_many(objects)?;
                    Ok((t0, Instant::now()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("put thread panicked"))
            .collect::<Result<Vec<_>>>()
    })?;
    Ok(span(&times))
}
