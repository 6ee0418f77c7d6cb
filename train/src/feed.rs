//! A rank's data: the training split streamed by a prefetch thread, the validation split, and
//! the data position (cursor) a checkpoint records. Only the first pipeline stage (tokens) and
//! the last (targets) read data; the others get empty micro-batches, since their units only
//! see activations.
//!
//! Both splits are opened before the first step, for the model's vocabulary, so an unusable
//! split or a token id the embedding cannot hold is an error naming the shard, document and id
//! before training starts (or, for a shard whose largest id neither the manifest nor this
//! host's dataset check recorded, on its first read). A resumed run's saved cursor must be
//! this run's data at the resumed step: another dataset, seed, sequence length or global batch
//! is refused by name.
//!
//! An `s3://` dataset is streamed (`data.stream`, set by the binary): the datasets open from
//! the manifest and `.idx` files alone, and a [`Streamer`] fetches the shards in the order
//! this rank's steps read them (the sampler knows them all), from the resumed step on, so
//! the first step runs once its own shards are in; a read of a shard not fetched yet waits
//! for it. With `data.cache_gb` the shards behind the reader are evicted.

use crate::error::TrainError;
use crate::model::MicroBatch;
use crate::place::RankPlace;
use crate::spec::JobSpec;
use gantry_sharding::gpt::{DatasetError, GptDataset, OpenOptions, Prefetcher, Split};
use gantry_sharding::remote::{StepShards, StreamConfig, StreamSetup, Streamer};
use gantry_sharding::sampler::{Cursor, SampleRef, Sampler};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// The validation split and its sampler.
struct ValidSet {
    data: GptDataset,
    sampler: Sampler,
}

/// The training stream of a data-reading rank.
struct TrainStream {
    prefetch: Prefetcher,
    /// The data position after the last completed step.
    cursor: Cursor,
}

pub struct DataFeed {
    train: Option<TrainStream>,
    valid: Option<ValidSet>,
    micro: usize,
    seq_len: usize,
    dp_rank: usize,
    dp: usize,
    device: Device,
    /// What the datasets were opened with (a streamed dataset's source included).
    options: OpenOptions,
    opened: Instant,
    /// The first step's data was delivered (and its wait logged).
    first_step: AtomicBool,
    /// Streams an `s3://` dataset; declared last so it is dropped after the datasets.
    stream: Option<Streamer>,
}

/// The split `valid` asks for under the spec's `data.valid_fraction` and `data.seed`.
pub(crate) fn split(spec: &JobSpec, valid: bool) -> Split {
    let (f, s) = (spec.data.valid_fraction, spec.data.seed);
    if f == 0.0 {
        Split::All
    } else if valid {
        Split::Valid {
            valid_fraction: f,
            seed: s,
        }
    } else {
        Split::Train {
            valid_fraction: f,
            seed: s,
        }
    }
}

impl DataFeed {
    /// Open this rank's data positioned after `start_step` steps; `saved` is the cursor a
    /// resumed checkpoint recorded, checked against this run's data.
    pub fn open(
        spec: &JobSpec,
        place: &RankPlace,
        start_step: u64,
        saved: Option<&Cursor>,
        opts: &OpenOptions,
    ) -> Result<DataFeed, TrainError> {
        let micro = spec.micro_batches();
        let mut feed = DataFeed {
            train: None,
            valid: None,
            micro,
            seq_len: spec.model.seq_len,
            dp_rank: place.dp_rank,
            dp: place.layout.dp(),
            device: place.device,
            options: opts.clone(),
            opened: Instant::now(),
            first_step: AtomicBool::new(false),
            stream: None,
        };
        if !(place.first_stage() || place.last_stage()) {
            return Ok(feed);
        }
        if let Some(setup) = &spec.data.stream {
            let streamer = start_stream(spec, setup)?;
            feed.options.shards = Some(streamer.shards());
            feed.stream = Some(streamer);
        }
        let opts = &feed.options.clone();
        let ds = Arc::new(GptDataset::open_with(
            spec.data.dir()?,
            feed.seq_len,
            split(spec, false),
            opts,
        )?);
        let sampler =
            Sampler::new(ds.num_samples(), spec.data.seed, spec.train.global_batch).map_err(DatasetError::from)?;
        let mut cursor = sampler.start(ds.data().fingerprint());
        cursor.advance(start_step).map_err(DatasetError::from)?;
        if let Some(saved) = saved {
            sampler
                .check_cursor(saved, ds.data().fingerprint())
                .map_err(DatasetError::from)?;
            if saved.consumed != cursor.consumed {
                return Err(TrainError::Internal(format!(
                    "checkpoint at step {start_step} says {} samples consumed, expected {}",
                    saved.consumed, cursor.consumed
                )));
            }
        }
        if let Some(streamer) = &feed.stream {
            let plan = step_shards(&ds, &sampler, &cursor, feed.dp_rank, feed.dp, micro);
            streamer.follow(start_step, plan);
        }
        let prefetch = Prefetcher::spawn(ds, sampler, cursor.clone(), feed.dp_rank, feed.dp, micro, 2 * micro);
        feed.train = Some(TrainStream { prefetch, cursor });
        if spec.data.valid_fraction > 0.0 {
            let data = GptDataset::open_with(spec.data.dir()?, feed.seq_len, split(spec, true), opts)?;
            let sampler = Sampler::new(data.num_samples(), spec.data.seed, spec.train.global_batch)
                .map_err(DatasetError::from)?;
            feed.valid = Some(ValidSet { data, sampler });
        }
        Ok(feed)
    }

    /// The next step's micro-batches; `seen` is told each micro-batch's samples.
    pub fn next_step(&self, seen: &mut dyn FnMut(&[SampleRef])) -> Result<Vec<MicroBatch>, TrainError> {
        let Some(train) = &self.train else {
            return Ok(self.empty_step());
        };
        let step = (0..self.micro)
            .map(|_| -> Result<MicroBatch, TrainError> {
                let b = train.prefetch.next_batch()?;
                seen(&b.samples);
                Ok(micro_batch(&b.tokens, b.samples.len(), self.seq_len, self.device))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !self.first_step.swap(true, Ordering::Relaxed) {
            let stats = self.stream.as_ref().map(Streamer::stats).unwrap_or_default();
            tracing::info!(
                seconds = self.opened.elapsed().as_secs_f64(),
                streamed = self.stream.is_some(),
                shards_fetched = stats.fetched,
                bytes_fetched = stats.bytes_fetched,
                "first step's data ready"
            );
        }
        Ok(step)
    }

    /// The options the datasets were opened with: for more datasets of the same data (the
    /// end-of-run samples), through the same stream.
    pub fn dataset_options(&self) -> OpenOptions {
        self.options.clone()
    }

    /// A step completed: the cursor moves past its global batch.
    pub fn step_done(&mut self) -> Result<(), TrainError> {
        if let Some(t) = self.train.as_mut() {
            t.cursor.advance(1).map_err(DatasetError::from)?;
        }
        Ok(())
    }

    /// The data position after the last completed step (on data-reading ranks).
    pub fn cursor(&self) -> Option<&Cursor> {
        self.train.as_ref().map(|t| &t.cursor)
    }

    /// A pass over the validation split from its start: the same batches every time.
    pub fn valid_pass(&self) -> ValidPass<'_> {
        ValidPass {
            feed: self,
            cursor: self
                .valid
                .as_ref()
                .map(|v| v.sampler.start(v.data.data().fingerprint())),
        }
    }

    fn empty_step(&self) -> Vec<MicroBatch> {
        (0..self.micro).map(|_| empty_batch()).collect()
    }
}

/// Validation batches, one global batch per step, from the split's start.
pub struct ValidPass<'a> {
    feed: &'a DataFeed,
    cursor: Option<Cursor>,
}

impl ValidPass<'_> {
    /// This rank's micro-batches of the next validation batch (empty where it reads no data).
    pub fn next_step(&mut self) -> Result<Vec<MicroBatch>, TrainError> {
        let f = self.feed;
        let (Some(v), Some(c)) = (&f.valid, &mut self.cursor) else {
            return Ok(f.empty_step());
        };
        let out = (0..f.micro)
            .map(|m| {
                v.data
                    .micro_batch(&v.sampler, c, f.dp_rank, f.dp, f.micro, m)
                    .map(|b| micro_batch(&b.tokens, b.samples.len(), f.seq_len, f.device))
            })
            .collect::<Result<Vec<_>, _>>()?;
        c.advance(1).map_err(DatasetError::from)?;
        Ok(out)
    }
}

/// Start streaming the `s3://` dataset `setup` describes, with the spec's cache budget, for
/// a run that ends at `train.stop_after` (or `train.steps`).
fn start_stream(spec: &JobSpec, setup: &StreamSetup) -> Result<Streamer, TrainError> {
    let end = match spec.train.stop_after {
        0 => spec.train.steps,
        n => n,
    };
    let cfg = StreamConfig {
        budget: spec.data.cache_budget(),
        sharers: setup.sharers.max(1),
        end: Some(end),
        // A read waits out the retries of its fetch (which end in an error naming the
        // object), with room for the fetches queued before it.
        wait: setup.options.retry.deadline * 2 + Duration::from_secs(60),
        ..StreamConfig::default()
    };
    let streamer = Streamer::start(setup.dir.clone(), setup.options.clone(), cfg)
        .map_err(|e| DatasetError::Remote(Arc::new(e)))?;
    tracing::info!(
        dataset = %setup.dir.location,
        dir = %setup.dir.dir.display(),
        bytes = setup.dir.total_bytes(),
        budget = spec.data.cache_budget().unwrap_or(0),
        ranks_on_host = setup.sharers,
        "streaming the dataset into the host's data cache"
    );
    Ok(streamer)
}

/// Which shards this rank reads at each step, for the stream's plan: the same sampler and
/// micro-batch split the prefetch thread reads with. It holds the dataset weakly, so the
/// stream does not keep the dataset alive (nothing is planned once it is gone).
fn step_shards(
    ds: &Arc<GptDataset>,
    sampler: &Sampler,
    start: &Cursor,
    dp_rank: usize,
    dp: usize,
    micro: usize,
) -> StepShards {
    let data = Arc::downgrade(ds);
    let sampler = sampler.clone();
    let origin = Cursor {
        consumed: 0,
        ..start.clone()
    };
    Box::new(move |step| {
        let Some(ds) = data.upgrade() else {
            return Ok(Vec::new());
        };
        let mut cursor = origin.clone();
        cursor.advance(step).map_err(|e| e.to_string())?;
        ds.step_shards(&sampler, &cursor, dp_rank, dp, micro)
            .map_err(|e| e.to_string())
    })
}

/// Token rows of a prefetched batch as model inputs and targets.
fn micro_batch(tokens: &[i64], rows: usize, seq_len: usize, device: Device) -> MicroBatch {
    let t = Tensor::from_slice(tokens).view([rows as i64, seq_len as i64 + 1]);
    MicroBatch {
        tokens: t.narrow(1, 0, seq_len as i64).to_device(device),
        targets: t.narrow(1, 1, seq_len as i64).contiguous().to_device(device),
    }
}

/// Middle pipeline stages read neither tokens nor targets: their units only see activations.
fn empty_batch() -> MicroBatch {
    MicroBatch {
        tokens: Tensor::zeros([0], (Kind::Int64, Device::Cpu)),
        targets: Tensor::zeros([0], (Kind::Int64, Device::Cpu)),
    }
}
